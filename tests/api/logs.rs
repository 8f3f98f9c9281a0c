//! The service's own log output, captured from the real binary, never carries an NHS number.

use crate::helpers::*;
use serde_json::json;
use std::process::Command;

#[tokio::test]
async fn a_full_scenario_leaves_no_nhs_number_in_the_logs() {
    for backend in backends() {
        let db = TestDb::new(backend);
        let mut served = serve(&db, &[("CPIS__LOG__LEVEL", "debug")]);
        let app = TestApp {
            address: served.address.clone(),
            admin_key: {
                let out = Command::new(env!("CARGO_BIN_EXE_cpis"))
                    .args([
                        "orgs",
                        "add",
                        "--ods",
                        "X26",
                        "--name",
                        "Operators",
                        "--kind",
                        "other",
                    ])
                    .env("CPIS_CONFIG_DIR", "/nonexistent")
                    .env("CPIS__DATABASE__URL", &db.url)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let out = Command::new(env!("CARGO_BIN_EXE_cpis"))
                    .args(["keys", "create", "--org", "X26", "--role", "admin"])
                    .env("CPIS_CONFIG_DIR", "/nonexistent")
                    .env("CPIS__DATABASE__URL", &db.url)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8(out.stdout)
                    .unwrap()
                    .lines()
                    .last()
                    .unwrap()
                    .to_string()
            },
            client: reqwest::Client::new(),
            db,
        };
        let w = app.world().await;
        let numbers = ["9434765919", &test_nhs_number(11), &test_nhs_number(12)];
        for (i, nhs) in numbers.iter().enumerate() {
            let resp = app
                .post("/v1/plans", &w.la, cpp_plan(&format!("REF-{i}"), nhs))
                .await;
            assert_eq!(resp.status, 201, "{resp:?}");
            app.post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": nhs}}),
            )
            .await;
            app.post("/v1/plans/search", &w.la, json!({"nhs_number": nhs}))
                .await;
            app.post("/v1/audit/search", &w.auditor, json!({"nhs_number": nhs}))
                .await;
        }
        // Errors that echo the input back to the caller must not echo it into the log.
        app.post(
            "/v1/flag-checks",
            &w.care,
            json!({"patient": {"nhs_number": "9434765918"}}),
        )
        .await;
        app.post(
            "/v1/flag-checks",
            &w.care,
            json!({"patient": {"nhs_number": 9434765919u64}}),
        )
        .await;
        app.post_raw(
            "/v1/flag-checks",
            &w.care,
            "application/json",
            b"{\"patient\": {\"nhs_number\": \"9434765919\"".to_vec(),
        )
        .await;
        app.post(
            "/v1/plans",
            &w.other_la,
            json!({"nhs_number": "943 476 5919", "local_reference": "Amelia Smith"}),
        )
        .await;
        // A request refused before any handler is logged like any other, without what it carried.
        let refused = app
            .post(
                "/v1/flag-checks",
                "cpis_not-a-key",
                json!({"patient": {"nhs_number": numbers[1]}}),
            )
            .await;
        assert_eq!(refused.status, 401);
        // A query string never reaches the log either.
        app.get("/v1/organisations/RXK01?nhs_number=9434765919", &w.care)
            .await;

        // Lines are written by the server's log thread: wait for the last request's before stopping it.
        let last = r#""path":"/v1/organisations/RXK01""#;
        for _ in 0..100 {
            if served.log.lock().unwrap().contains(last) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        served.child.kill().unwrap();
        served.child.wait().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let log = served.log.lock().unwrap().clone();
        assert!(log.contains(last), "the last request was logged: {log}");
        assert!(
            log.lines().any(|l| l.contains("request completed")
                && l.contains(r#""route":"/v1/flag-checks""#)
                && l.contains(r#""status":401"#)),
            "the refused request was logged: {log}"
        );
        assert!(log.lines().count() > 20, "{log}");
        for nhs in numbers.iter().chain(["9434765918", "943 476 5919"].iter()) {
            let spaced = format!("{} {} {}", &nhs[..3], &nhs[3..6], &nhs[6..]);
            assert!(
                !log.contains(nhs) && !log.contains(&spaced),
                "{nhs} appears in the log:\n{log}"
            );
        }
        for name in ["Amelia", "Smith"] {
            assert!(!log.contains(name), "{name} appears in the log");
        }
    }
}

#[test]
fn a_new_database_is_set_up_without_an_error_in_the_log() {
    // The pool's connections used to race each other into WAL mode on a new file; SQLite refused all but one at
    // once and r2d2 logged `database is locked` at ERROR, in about one first start in ten.
    for _ in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_cpis"))
            .arg("migrate")
            .env("CPIS_CONFIG_DIR", "/nonexistent")
            .env(
                "CPIS__DATABASE__URL",
                format!("sqlite://{}", dir.path().join("cpis.db").display()),
            )
            .env("CPIS__LOG__FORMAT", "json")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert!(!log.contains(r#""level":"ERROR""#), "{log}");
    }
}

/// An operator running cpis on a PostgreSQL with autovacuum off is warned at start-up, and only then: without it
/// the planner's statistics go stale and lookups can become scans of whole tables.
#[test]
fn a_postgresql_with_autovacuum_off_is_warned_about_at_start_up() {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        autovacuum: String,
    }
    for backend in backends() {
        let db = TestDb::new(backend);
        let off = match backend {
            Backend::Sqlite => false,
            Backend::Postgres => {
                let mut c = diesel::PgConnection::establish(&db.url).unwrap();
                let s: Setting = diesel::sql_query("SHOW autovacuum")
                    .get_result(&mut c)
                    .unwrap();
                s.autovacuum == "off"
            }
        };
        let mut server = serve(&db, &[]);
        let _ = server.child.kill();
        let _ = server.child.wait();
        let log = server.log.lock().unwrap().clone();
        let warned = log.lines().any(|l| {
            l.contains(r#""level":"WARN""#) && l.contains("PostgreSQL's autovacuum is off")
        });
        assert_eq!(warned, off, "{backend:?}, autovacuum off: {off}\n{log}");
    }
}
