//! Error kinds: every module error says which kind it is (bad input, interrupted, findings or a
//! failure), and [`kind_of`] reads the kind of an error chain; `main` maps kinds to exit codes.

/// What kind of failure an error is; decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The user's input is wrong (image.yaml, flags, references): exit 2.
    BadInput,
    /// Interrupted by SIGINT/SIGTERM: exit 130.
    Interrupted,
    /// `--fail-on`: the image scan found findings at or above the threshold: exit 3.
    Findings,
    /// A build, provision, engine or registry failure: exit 1.
    Failure,
}

/// Exit code: success.
pub const EXIT_OK: i32 = 0;

impl ErrorKind {
    /// The process exit code of this kind.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::BadInput => 2,
            ErrorKind::Interrupted => 130,
            ErrorKind::Findings => 3,
            ErrorKind::Failure => 1,
        }
    }
}

/// An operation stopped by SIGINT/SIGTERM (exit 130).
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

impl HasKind for Interrupted {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Interrupted
    }
}

/// An error that knows its kind.
pub trait HasKind {
    /// The kind of this error (delegating to its cause where the cause decides).
    fn kind(&self) -> ErrorKind;
}

/// The kind of the outermost error of the chain that knows its kind (errors from wpimg's
/// modules); [`ErrorKind::Failure`] when none does.
pub fn kind_of(error: &anyhow::Error) -> ErrorKind {
    for cause in error.chain() {
        if let Some(kind) = known_kind(cause) {
            return kind;
        }
    }
    ErrorKind::Failure
}

fn known_kind(e: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    macro_rules! kinds {
        ($($t:ty),* $(,)?) => {
            $( if let Some(x) = e.downcast_ref::<$t>() { return Some(x.kind()); } )*
        };
    }
    kinds!(
        Interrupted,
        crate::cli::InputError,
        crate::spec::SpecError,
        crate::build::BuildError,
        crate::publish::PublishError,
        crate::ecr::EcrError,
        crate::registry::RegistryError,
        crate::inspect::InspectError,
        crate::runtime::RuntimeError,
        crate::layout::LayoutError,
        crate::reference::ReferenceError,
        crate::sign::SignError,
        crate::sbom::SbomError,
        crate::supply::SupplyError,
        crate::outputs::OutputsError,
        crate::provision::ProvisionError,
    );
    None
}
