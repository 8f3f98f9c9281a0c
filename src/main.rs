use clap::Parser;
use cpis::cli::{self, Cli};
use cpis::config::Settings;

/// mimalloc instead of the system allocator: a request allocates and frees many small buffers on whichever
/// worker thread runs it, and glibc's malloc was a tenth of the workers' time under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cpis: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    cpis::telemetry::init(&settings.log);
    match cli::run(cli, settings).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "command failed");
            eprintln!("cpis: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
