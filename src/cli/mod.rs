//! The command line: clap types ([`args`]), settings resolved from flags and image.yaml
//! ([`settings`]), output ([`output`], the only place that prints), and one module per command.

pub mod args;
mod build;
mod cache;
mod inspect;
pub mod output;
mod prune;
mod push;
mod sbom;
mod schema;
pub mod settings;
mod validate;
mod verify;

use std::sync::Arc;

pub use args::{
    BuildArgs, CacheAction, CacheCmd, Cli, Command, GlobalArgs, InspectCmd, LoginArgs, PruneArgs,
    PushArgs, PushCmd, SbomCmd, ValidateArgs, VerifyCmd,
};
pub use output::Output;

use crate::error::{ErrorKind, HasKind, EXIT_OK};

/// A wrong flag or argument (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct InputError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl InputError {
    /// A wrong flag or argument.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// A wrong flag or argument, found through `source`.
    pub fn caused(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

impl HasKind for InputError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::BadInput
    }
}

/// Run a parsed command line; returns the exit code.
pub async fn run(cli: Cli) -> i32 {
    let out = Output::new(&cli.global);
    match dispatch(&cli, &out).await {
        Ok(()) => EXIT_OK,
        Err(e) => {
            let code = crate::error::kind_of(&e).exit_code();
            out.error(code, &e);
            code
        }
    }
}

async fn dispatch(cli: &Cli, out: &Arc<Output>) -> anyhow::Result<()> {
    let g = &cli.global;
    match &cli.command {
        Command::Validate(v) => validate::run(g, v, out),
        Command::Build(b) => build::run(g, b, out).await,
        Command::Push(p) => push::run(g, p, out).await,
        Command::Inspect(i) => inspect::run(g, i, out).await,
        Command::Sbom(c) => sbom::run(g, c, out).await,
        Command::Verify(v) => verify::run(g, v, out).await,
        Command::Cache(c) => match &c.action {
            CacheAction::Prune(p) => cache::prune(g, p, out).await,
        },
        Command::Schema => schema::run(),
        Command::Prune(p) => prune::run(g, p, out).await,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "wpimg", &mut std::io::stdout());
            Ok(())
        }
    }
}
