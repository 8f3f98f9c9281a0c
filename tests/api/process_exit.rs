//! A process that uses the database exits cleanly even while other threads are still connecting and querying:
//! the server's last moments (and a test run's) have pool, writer and job threads still winding down.
//!
//! With PostgreSQL, libpq uses OpenSSL, whose clean-up runs from an `atexit` handler by default and frees its
//! state under any thread still using it, a segmentation fault after everything else succeeded (it ended a CI
//! run once). The child process below keeps threads connecting and querying while its main thread exits.

use crate::helpers::{backends, TestDb};
use cpis::db::Db;
use diesel::connection::SimpleConnection;

const CHILD_ENV: &str = "CPIS_TEST_EXIT_CHILD_URL";
const THIS_TEST: &str =
    "process_exit::a_process_exits_cleanly_while_other_threads_are_still_using_the_database";

/// Runs in the child: threads open databases and query them in a loop; the main thread exits under them.
fn child(url: &str) -> ! {
    let mut settings = cpis::config::Settings::for_database(url).database;
    // Few connections each, so the children stay well inside the server's connection limit beside other tests.
    settings.pool_size = 4;
    for _ in 0..2 {
        let settings = settings.clone();
        std::thread::spawn(move || loop {
            if let Ok(db) = Db::connect(&settings) {
                let _ = db.write_blocking(|conn| {
                    conn.batch_execute("SELECT 1")
                        .map_err(cpis::db::DbError::from)
                });
            }
        });
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    std::process::exit(0)
}

#[test]
fn a_process_exits_cleanly_while_other_threads_are_still_using_the_database() {
    if let Ok(url) = std::env::var(CHILD_ENV) {
        child(&url);
    }
    for backend in backends() {
        let db = TestDb::new(backend);
        // The race is one of timing, so the child runs several times; each run exits while threads are busy.
        for run in 1..=25 {
            let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
                .args([THIS_TEST, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, &db.url)
                .output()
                .expect("run the child");
            assert!(
                out.status.success(),
                "{backend:?} run {run}: the child ended with {} and said {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
