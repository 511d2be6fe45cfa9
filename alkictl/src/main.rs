//! alkictl: pack, sign and push bundles; devices; rollouts.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = match alkictl::parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        // Help, version and usage errors print themselves and set the exit code, as clap's `parse` does.
        Err(e) => e.exit(),
    };
    match alkictl::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("alkictl: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
