use crate::helpers::*;
use diesel::connection::SimpleConnection;
use serde_json::json;

async fn scenario(app: &TestApp, w: &World) {
    app.post("/v1/plans", &w.la, cpp_plan("BCC-1", "9434765919"))
        .await;
    for _ in 0..3 {
        app.post(
            "/v1/flag-checks",
            &w.care,
            json!({"patient": {"nhs_number": "9434765919"}}),
        )
        .await;
    }
}

async fn verify(app: &TestApp, w: &World) -> serde_json::Value {
    let resp = app.get("/v1/audit/verify", &w.auditor).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    resp.body
}

fn tamper(app: &TestApp, sql: &str) {
    let db = app.db.db();
    let mut conn = db.get().unwrap();
    conn.batch_execute(sql).unwrap();
}

#[tokio::test]
async fn every_write_and_check_is_in_the_audit_trail_with_who_and_what() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        scenario(&app, &w).await;
        let resp = app
            .post(
                "/v1/audit/search",
                &w.auditor,
                json!({"nhs_number": "943 476 5919"}),
            )
            .await;
        let actions: Vec<&str> = resp.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert_eq!(
            actions,
            ["flag_check", "flag_check", "flag_check", "plan.create"],
            "newest first"
        );
        let create = &resp.body["items"][3];
        assert_eq!(create["actor_ods"], "E08000025");
        assert_eq!(create["role"], "social_care");
        assert!(create["key_id"].is_string() && create["request_id"].is_string());
        // Key and organisation changes are audited too.
        let admin = app
            .post("/v1/audit/search", &w.auditor, json!({"actor_ods": "X26"}))
            .await;
        let admin_actions: Vec<&str> = admin.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert!(
            admin_actions.contains(&"organisation.create") && admin_actions.contains(&"key.create"),
            "{admin_actions:?}"
        );
        let report = verify(&app, &w).await;
        assert_eq!(report["ok"], true, "{report}");
        assert!(report["checked"].as_i64().unwrap() >= 10);
    }
}

#[tokio::test]
async fn changing_an_audit_row_in_the_database_is_detected() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        scenario(&app, &w).await;
        tamper(
            &app,
            "UPDATE audit_events SET outcome = 'miss' WHERE seq = 12",
        );
        let report = verify(&app, &w).await;
        assert_eq!(
            report,
            json!({"ok": false, "checked": 11, "first_broken_seq": 12})
        );
    }
}

#[tokio::test]
async fn removing_or_reordering_audit_rows_is_detected() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        scenario(&app, &w).await;
        tamper(&app, "DELETE FROM audit_events WHERE seq = 5");
        assert_eq!(verify(&app, &w).await["first_broken_seq"], 5);

        let app = spawn_app(backend).await;
        let w = app.world().await;
        scenario(&app, &w).await;
        // Swap two events' positions by renumbering them.
        tamper(&app, "UPDATE audit_events SET seq = -1 WHERE seq = 7; UPDATE audit_events SET seq = 7 WHERE seq = 8; UPDATE audit_events SET seq = 8 WHERE seq = -1");
        assert_eq!(verify(&app, &w).await["first_broken_seq"], 7);

        let app = spawn_app(backend).await;
        let w = app.world().await;
        scenario(&app, &w).await;
        // Dropping the newest event is caught by the chain head.
        tamper(
            &app,
            "DELETE FROM audit_events WHERE seq = (SELECT MAX(seq) FROM audit_events)",
        );
        let report = verify(&app, &w).await;
        assert_eq!(report["ok"], false, "{report}");
    }
}

#[tokio::test]
async fn the_cli_verifies_the_chain_and_fails_when_it_is_broken() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        scenario(&app, &w).await;
        let run = || {
            std::process::Command::new(env!("CARGO_BIN_EXE_cpis"))
                .args(["audit", "verify"])
                .env("CPIS__DATABASE__URL", &app.db.url)
                .env("CPIS_CONFIG_DIR", "/nonexistent")
                .output()
                .unwrap()
        };
        let good = run();
        assert!(
            good.status.success(),
            "{}",
            String::from_utf8_lossy(&good.stderr)
        );
        assert!(String::from_utf8_lossy(&good.stdout).contains("\"ok\":true"));
        tamper(
            &app,
            "UPDATE audit_events SET nhs_number = '9990000018' WHERE seq = 12",
        );
        let bad = run();
        assert!(!bad.status.success());
        assert!(String::from_utf8_lossy(&bad.stdout).contains("\"first_broken_seq\":12"));
    }
}

#[tokio::test]
async fn audit_search_filters_by_time_and_validates_its_input() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        scenario(&app, &w).await;
        let future = app
            .post(
                "/v1/audit/search",
                &w.auditor,
                json!({"from": "2999-01-01"}),
            )
            .await;
        assert_eq!(future.body["total"], 0, "{future:?}");
        let past = app
            .post(
                "/v1/audit/search",
                &w.auditor,
                json!({"from": "2000-01-01T00:00:00Z", "nhs_number": "9434765919"}),
            )
            .await;
        assert_eq!(past.body["total"], 4);
        let bad = app
            .post(
                "/v1/audit/search",
                &w.auditor,
                json!({"from": "yesterday", "nhs_number": "123"}),
            )
            .await;
        let mut fields = bad.error_fields();
        fields.sort();
        assert_eq!(fields, ["from", "nhs_number"]);
    }
}
