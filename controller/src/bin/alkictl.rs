//! alkictl: pack, sign and push bundles; devices; rollouts.

use clap::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = alki_controller::cli::Cli::parse();
    match alki_controller::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("alkictl: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
