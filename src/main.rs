//! The wpimg command line.

use clap::Parser;

fn main() {
    let cli = wpimg::cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(wpimg::error::ErrorKind::Failure.exit_code());
        }
    };
    let code = rt.block_on(wpimg::cli::run(cli));
    // Blocking tasks (a cancelled layer writer) must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    std::process::exit(code);
}
