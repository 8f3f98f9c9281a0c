//! The FHIR R4 facade: searches answer Bundles of resources that an independent FHIR R4 validator (the
//! `fhir.resources` Python models, R4 4.0.1) accepts, CareTeam searches behave as flag checks with the
//! `IsUnscheduledAccessEvent` header, and every error is an OperationOutcome.

use crate::helpers::*;
use serde_json::{json, Value};
use std::process::{Command, Stdio};

const NHS_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
/// Validates resources with `fhir.resources` 6.5 (FHIR R4 4.0.1, on pydantic 1), installed on first use into the
/// test's scratch folder.
fn validate_fhir(resources: &[Value]) {
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fhir-py");
    let python = || {
        let mut c = Command::new("python3");
        c.env("PYTHONPATH", &target);
        c
    };
    let installed = python()
        .args(["-c", "import fhir.resources"])
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        let out = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--upgrade",
                "--target",
            ])
            .arg(&target)
            .args(["fhir.resources==6.5.0", "pydantic<2"])
            .output()
            .expect("python3 and pip are needed for FHIR validation");
        assert!(
            out.status.success(),
            "could not install fhir.resources: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let script = r#"
import json, sys
from fhir.resources import construct_fhir_element
failures = 0
for r in json.load(sys.stdin):
    try:
        construct_fhir_element(r["resourceType"], r)
    except Exception as e:
        failures += 1
        print(r["resourceType"], e)
sys.exit(1 if failures else 0)
"#;
    let mut child = python()
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(resources).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "FHIR R4 validation failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn entries(bundle: &Value) -> Vec<Value> {
    bundle["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e["resource"].clone())
        .collect()
}

async fn fhir_get(app: &TestApp, path: &str, key: Option<&str>, unscheduled: Option<&str>) -> Resp {
    let mut req = app.client.get(format!("{}{}", app.address, path));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(u) = unscheduled {
        req = req.header("IsUnscheduledAccessEvent", u);
    }
    TestApp::read(req.send().await.unwrap()).await
}

#[tokio::test]
async fn fhir_searches_answer_valid_r4_resources_and_a_careteam_search_is_a_flag_check() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        app.post("/v1/plans", &w.la, cpp_plan("BCC-1", "9434765919"))
            .await;
        let query = format!("patient:identifier={NHS_SYSTEM}|9434765919");
        let mut captured = Vec::new();

        let metadata = fhir_get(&app, "/fhir/R4/metadata", None, None).await;
        assert_eq!(metadata.status, 200);
        assert_eq!(metadata.content_type(), "application/fhir+json");
        assert_eq!(metadata.body["fhirVersion"], "4.0.1");
        captured.push(metadata.body.clone());

        let teams = fhir_get(
            &app,
            &format!("/fhir/R4/CareTeam?{query}"),
            Some(&w.care),
            Some("true"),
        )
        .await;
        assert_eq!(teams.status, 200, "{teams:?}");
        assert_eq!(teams.content_type(), "application/fhir+json");
        assert_eq!(teams.body["type"], "searchset");
        let team = &entries(&teams.body)[0];
        assert_eq!(team["category"][0]["coding"][0]["code"], "342191000000101");
        assert_eq!(
            team["category"][0]["coding"][0]["system"],
            "http://snomed.info/sct"
        );
        assert_eq!(team["name"], "Birmingham City Council");
        assert_eq!(team["period"]["start"], "2026-01-10");
        assert_eq!(
            team["managingOrganization"][0]["identifier"]["system"],
            "https://fhir.nhs.uk/Id/ods-organization-code"
        );
        assert_eq!(
            team["managingOrganization"][0]["identifier"]["value"],
            "E08000025"
        );
        assert_eq!(
            team["telecom"],
            json!([{"system": "phone", "value": "0121 303 1888", "use": "work"}, {"system": "phone", "value": "0121 675 4806", "use": "mobile"}])
        );
        captured.push(teams.body.clone());

        // The unscheduled search was an access: the next check lists it, and the authority is told.
        let check = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": "9434765919"}}),
            )
            .await;
        assert_eq!(
            check.body["recent_accesses"].as_array().unwrap().len(),
            1,
            "{check:?}"
        );
        assert_eq!(
            app.get("/v1/notifications", &w.la).await.body["items"]
                .as_array()
                .unwrap()
                .len(),
            1
        );

        // A scheduled (silent) search is audited but not an access.
        let silent = fhir_get(
            &app,
            &format!("/fhir/R4/CareTeam?{query}"),
            Some(&w.care),
            Some("false"),
        )
        .await;
        assert_eq!(entries(&silent.body).len(), 1);
        let check = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": "9434765919"}, "access": "scheduled"}),
            )
            .await;
        assert_eq!(
            check.body["recent_accesses"].as_array().unwrap().len(),
            2,
            "the silent search added nothing: {check:?}"
        );
        let audit = app
            .post(
                "/v1/audit/search",
                &w.auditor,
                json!({"nhs_number": "9434765919"}),
            )
            .await;
        let fhir_searches = audit.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "fhir.careteam.search")
            .count();
        assert_eq!(fhir_searches, 2);

        // POST _search with a form body answers the same.
        let form = app
            .client
            .post(format!("{}/fhir/R4/CareTeam/_search", app.address))
            .bearer_auth(&w.care)
            .header("IsUnscheduledAccessEvent", "false")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "patient%3Aidentifier={}%7C9434765919",
                NHS_SYSTEM.replace(':', "%3A").replace('/', "%2F")
            ))
            .send()
            .await
            .unwrap();
        let form = TestApp::read(form).await;
        assert_eq!(entries(&form.body)[0]["id"], team["id"], "{form:?}");

        let flags = fhir_get(&app, &format!("/fhir/R4/Flag?{query}"), Some(&w.care), None).await;
        let flag = &entries(&flags.body)[0];
        assert_eq!(flag["status"], "active");
        assert_eq!(flag["code"]["coding"][0]["code"], "342191000000101");
        captured.push(flags.body.clone());

        let events = fhir_get(
            &app,
            &format!("/fhir/R4/AuditEvent?{query}"),
            Some(&w.care),
            None,
        )
        .await;
        let events = entries(&events.body);
        assert_eq!(
            events.len(),
            2,
            "the unscheduled FHIR search and the unscheduled v1 check"
        );
        assert_eq!(events[0]["agent"][0]["who"]["identifier"]["value"], "RXK01");
        captured.push(
            fhir_get(
                &app,
                &format!("/fhir/R4/AuditEvent?{query}"),
                Some(&w.care),
                None,
            )
            .await
            .body,
        );

        let missing = fhir_get(&app, "/fhir/R4/CareTeam", Some(&w.care), None).await;
        assert_eq!(missing.status, 400);
        captured.push(missing.body.clone());
        let inner: Vec<Value> = captured
            .iter()
            .flat_map(|b| {
                if b["resourceType"] == "Bundle" {
                    entries(b)
                } else {
                    vec![]
                }
            })
            .collect();
        captured.extend(inner);
        validate_fhir(&captured);
    }
}

#[tokio::test]
async fn fhir_errors_are_operation_outcomes() {
    let app = spawn_app(Backend::Sqlite).await;
    let w = app.world().await;
    let good = format!("patient:identifier={NHS_SYSTEM}|9434765919");
    let cases: Vec<(String, Option<&str>, Option<&str>, u16)> = vec![
        (format!("/fhir/R4/CareTeam?{good}"), None, None, 401),
        (
            format!("/fhir/R4/CareTeam?{good}"),
            Some(w.la.as_str()),
            None,
            403,
        ),
        (
            "/fhir/R4/CareTeam".to_string(),
            Some(w.care.as_str()),
            None,
            400,
        ),
        (
            format!("/fhir/R4/CareTeam?patient:identifier={NHS_SYSTEM}|9434765918"),
            Some(w.care.as_str()),
            None,
            400,
        ),
        (
            "/fhir/R4/CareTeam?patient:identifier=urn:other|9434765919".to_string(),
            Some(w.care.as_str()),
            None,
            400,
        ),
        (
            format!("/fhir/R4/CareTeam?{good}"),
            Some(w.care.as_str()),
            Some("maybe"),
            400,
        ),
        (
            format!("/fhir/R4/Patient?{good}"),
            Some(w.care.as_str()),
            None,
            404,
        ),
    ];
    let mut outcomes = Vec::new();
    for (path, key, header, status) in cases {
        let resp = fhir_get(&app, &path, key, header).await;
        assert_eq!(resp.status.as_u16(), status, "{path}: {resp:?}");
        assert_eq!(resp.content_type(), "application/fhir+json", "{path}");
        assert_eq!(resp.body["resourceType"], "OperationOutcome", "{path}");
        assert!(resp.body["issue"][0]["diagnostics"]
            .as_str()
            .is_some_and(|d| !d.is_empty()));
        if status == 401 {
            assert!(resp.headers.contains_key("www-authenticate"));
        }
        outcomes.push(resp.body);
    }
    validate_fhir(&outcomes);
}
