use clap::Parser;
use cpis::cli::{self, Cli};
use cpis::config::Settings;

/// mimalloc instead of the system allocator: a request allocates and frees many small buffers on whichever
/// worker thread runs it, and glibc's malloc was a tenth of the workers' time under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process before it allocates in earnest.
///
/// mimalloc asks the kernel for huge pages on its arenas (`MADV_HUGEPAGE`), and it hands freed memory back in
/// pieces as small as 64 KiB. A fault in such a range then takes a whole 2 MiB page, zeroed before use: during
/// a bulk file's import, zeroing pages was a tenth of the registering thread (`clear_page_erms`, mostly from
/// SQLite preparing a chunk's `IN` lists and growing its page cache), and the resident set held memory that
/// was never touched. With 4 KiB pages the resident set under load fell by a fifth and its peak during an
/// import by 50 MB (BENCHMARKS.md, change 53). The allocator's first pages, taken before `main`, keep theirs.
/// Only a child process would inherit the setting, and cpis starts none. Other systems have no such pages.
#[cfg(target_os = "linux")]
fn without_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes a flag and changes only how the kernel backs this process's memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        // Kernels before 3.15 lack it; the process then runs as it would have, only with more memory.
        eprintln!(
            "cpis: transparent huge pages stay on: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn without_huge_pages() {}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    without_huge_pages();
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cpis: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // Held to the end of `main`, so that what is queued for the log is written before the process exits.
    let _log = cpis::telemetry::init(&settings.log);
    match cli::run(cli, settings).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "command failed");
            eprintln!("cpis: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
