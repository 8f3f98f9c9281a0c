//! `cpis demo` loads a data set with which the printed commands really work.

use crate::helpers::*;
use serde_json::json;

#[tokio::test]
async fn the_demo_prints_keys_and_commands_that_work() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cpis"))
            .arg("demo")
            .env("CPIS_CONFIG_DIR", "/nonexistent")
            .env("CPIS__DATABASE__URL", &app.db.url)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key = |name: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("no {name} key in:\n{stdout}"))
                .to_string()
        };
        let nhs = stdout
            .split("\"nhs_number\": \"")
            .nth(1)
            .and_then(|r| r.get(..10))
            .unwrap()
            .to_string();
        let check = app
            .post(
                "/v1/flag-checks",
                &key("ED_BSOL"),
                json!({"patient": {"nhs_number": nhs}, "setting_type": "ED"}),
            )
            .await;
        assert_eq!(check.body["match"]["status"], "matched", "{check:?}");
        assert_eq!(
            check.body["flags"][0]["responsible"]["name"],
            "Birmingham City Council"
        );
        let attendance = app
            .post(
                "/v1/attendances",
                &key("ED_CW"),
                json!({"attendance_id": "DEMO-ATT-1", "setting_ods": "RBT20", "setting_type": "ED", "arrived_at": chrono::Utc::now().to_rfc3339(),
                       "patient": {"identifier": {"system": cpis::demo::CW_MRN, "value": "CW000100"}}}),
            )
            .await;
        assert_eq!(
            attendance.body["match"]["method"], "identifier",
            "{attendance:?}"
        );
        assert_eq!(
            attendance.body["notifications"].as_array().unwrap().len(),
            1
        );
        let notes = app.get("/v1/notifications", &key("LA_BSOL")).await;
        assert!(!notes.body["items"].as_array().unwrap().is_empty());
        let plans = app.post("/v1/plans/search", &key("LA_CW"), json!({})).await;
        assert_eq!(plans.body["total"], 16);
        assert_eq!(
            app.get("/v1/audit/verify", &key("AUDITOR")).await.body["ok"],
            true
        );
    }
}
