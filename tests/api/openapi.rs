//! `/openapi.json` describes the v1 API as the handlers really are: every route is in it, every route in it
//! answers, and the request schemas are the handlers' own types.

use crate::helpers::*;
use reqwest::Method;
use serde_json::Value;
use std::collections::BTreeSet;

const ROUTES: &[(&str, &str)] = &[
    ("get", "/health/live"),
    ("get", "/health/ready"),
    ("get", "/metrics"),
    ("post", "/v1/keys"),
    ("delete", "/v1/keys/{id}"),
    ("post", "/v1/organisations"),
    ("get", "/v1/organisations/{ods}"),
    ("put", "/v1/organisations/{ods}/delivery"),
    ("post", "/v1/plans"),
    ("get", "/v1/plans/{id}"),
    ("patch", "/v1/plans/{id}"),
    ("post", "/v1/plans/search"),
    ("post", "/v1/plans/bulk"),
    ("post", "/v1/flag-checks"),
    ("post", "/v1/attendances"),
    ("post", "/v1/mpi/links"),
    ("post", "/v1/mpi/resolve"),
    ("get", "/v1/notifications"),
    ("get", "/v1/notifications/{id}"),
    ("post", "/v1/notifications/{id}/redeliver"),
    ("post", "/v1/audit/search"),
    ("get", "/v1/audit/verify"),
];

#[tokio::test]
async fn the_openapi_document_parses_and_lists_every_route() {
    let app = spawn_app(Backend::Sqlite).await;
    let res = app
        .client
        .get(format!("{}/openapi.json", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let doc: Value = res.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, expected);

    // Every documented route exists on the server: a made-up id may be "not found", but never "no such resource".
    for (method, path) in ROUTES {
        let concrete = path
            .replace("{id}", "00000000-0000-0000-0000-000000000000")
            .replace("{ods}", "X26");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let resp = app
            .request(
                method.clone(),
                &concrete,
                Some(&app.admin_key),
                Some(serde_json::json!({})),
            )
            .await;
        assert!(
            !(resp.status == 404 && resp.body["detail"] == "no such resource"),
            "{method} {concrete} is not routed"
        );
        assert_ne!(resp.status, 405, "{method} {concrete}");
    }

    // Request bodies are the handlers' own types, unknown fields refused as the handlers refuse them.
    let plan = &doc["components"]["schemas"]["PlanBody"];
    for field in [
        "local_reference",
        "nhs_number",
        "plan_type",
        "start_date",
        "end_date",
        "delete_date",
        "expected_delivery_date",
        "child",
    ] {
        assert!(
            plan["properties"].get(field).is_some(),
            "PlanBody lacks {field}: {plan}"
        );
    }
    assert_eq!(plan["additionalProperties"], false);
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    let check = &doc["paths"]["/v1/flag-checks"]["post"]["requestBody"]["content"]
        ["application/json"]["schema"]["$ref"];
    assert_eq!(check, "#/components/schemas/CheckBody");
}
