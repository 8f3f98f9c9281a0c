use crate::helpers::*;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn no_key_or_an_unknown_key_is_refused_with_401_and_a_bearer_challenge() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let cases = [None, Some("cpis_not-a-real-key"), Some("")];
        for key in cases {
            let resp = app
                .request(
                    Method::POST,
                    "/v1/flag-checks",
                    key,
                    Some(json!({"patient": {"nhs_number": "9434765919"}})),
                )
                .await;
            resp.problem(401);
            assert!(
                resp.headers["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .starts_with("Bearer"),
                "{resp:?}"
            );
        }
        let basic = app
            .client
            .get(format!("{}/v1/audit/verify", app.address))
            .header("authorization", "Basic dXNlcjpwYXNz")
            .send()
            .await
            .unwrap();
        TestApp::read(basic).await.problem(401);
    }
}

#[tokio::test]
async fn a_revoked_key_stops_working_at_once() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        app.add_org("RXK01", "Sandwell ED", "care_setting").await;
        let created = app
            .post(
                "/v1/keys",
                &app.admin_key,
                json!({"org": "RXK01", "roles": ["care_setting"]}),
            )
            .await;
        let (id, key) = (
            created.body["id"].as_str().unwrap(),
            created.body["key"].as_str().unwrap(),
        );
        let check = json!({"patient": {"nhs_number": "9434765919"}});
        assert_eq!(
            app.post("/v1/flag-checks", key, check.clone()).await.status,
            200
        );
        let revoked = app
            .request(
                Method::DELETE,
                &format!("/v1/keys/{id}"),
                Some(&app.admin_key),
                None,
            )
            .await;
        assert_eq!(revoked.status, 204, "{revoked:?}");
        app.post("/v1/flag-checks", key, check).await.problem(401);
        // Revoking twice, or an unknown id, is a 404.
        app.request(
            Method::DELETE,
            &format!("/v1/keys/{id}"),
            Some(&app.admin_key),
            None,
        )
        .await
        .problem(404);
    }
}

#[tokio::test]
async fn keys_are_made_for_existing_organisations_with_known_roles_only() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let resp = app
            .post(
                "/v1/keys",
                &app.admin_key,
                json!({"org": "NOPE1", "roles": ["care_setting"]}),
            )
            .await;
        resp.problem(422);
        assert_eq!(resp.error_fields(), ["org"]);
        app.add_org("RXK01", "Sandwell ED", "care_setting").await;
        let resp = app
            .post(
                "/v1/keys",
                &app.admin_key,
                json!({"org": "RXK01", "roles": ["superuser"]}),
            )
            .await;
        resp.problem(422);
        assert_eq!(resp.error_fields(), ["roles[0]"]);
        let resp = app
            .post(
                "/v1/keys",
                &app.admin_key,
                json!({"org": "RXK01", "roles": []}),
            )
            .await;
        assert_eq!(resp.error_fields(), ["roles"]);
        let resp = app
            .post(
                "/v1/keys",
                &app.admin_key,
                json!({"org": "rxk01", "roles": ["care_setting", "auditor"]}),
            )
            .await;
        assert_eq!(resp.status, 201, "{resp:?}");
        assert_eq!(resp.body["org"], "RXK01");
        assert!(resp.body["key"].as_str().unwrap().len() >= 43);
    }
}

/// Each endpoint refuses every role SPEC does not give it, with 403.
#[tokio::test]
async fn each_role_is_refused_where_the_spec_does_not_allow_it() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        app.add_org("ORG01", "Multi-purpose test organisation", "other")
            .await;
        let mut keys = std::collections::HashMap::new();
        for role in [
            "care_setting",
            "social_care",
            "mpi_feed",
            "auditor",
            "admin",
        ] {
            keys.insert(role, app.key("ORG01", &[role]).await);
        }
        let plan = cpp_plan("REF-1", "9434765919");
        let endpoints: Vec<(Method, &str, Option<serde_json::Value>, &[&str])> = vec![
            (
                Method::POST,
                "/v1/keys",
                Some(json!({"org": "ORG01", "roles": ["auditor"]})),
                &["admin"],
            ),
            (
                Method::DELETE,
                "/v1/keys/00000000-0000-0000-0000-000000000000",
                None,
                &["admin"],
            ),
            (
                Method::POST,
                "/v1/organisations",
                Some(json!({"ods_code": "ORG02", "name": "x", "kind": "other"})),
                &["admin"],
            ),
            (Method::POST, "/v1/plans", Some(plan), &["social_care"]),
            (
                Method::GET,
                "/v1/plans/00000000-0000-0000-0000-000000000000",
                None,
                &["social_care", "admin"],
            ),
            (
                Method::PATCH,
                "/v1/plans/00000000-0000-0000-0000-000000000000",
                Some(json!({"end_date": "2026-06-01"})),
                &["social_care"],
            ),
            (
                Method::POST,
                "/v1/plans/search",
                Some(json!({})),
                &["social_care", "admin"],
            ),
            (
                Method::POST,
                "/v1/flag-checks",
                Some(json!({"patient": {"nhs_number": "9434765919"}})),
                &["care_setting"],
            ),
            (
                Method::POST,
                "/v1/audit/search",
                Some(json!({})),
                &["auditor"],
            ),
            (Method::GET, "/v1/audit/verify", None, &["auditor"]),
        ];
        for (method, path, body, allowed) in endpoints {
            for (role, key) in &keys {
                let resp = app
                    .request(method.clone(), path, Some(key), body.clone())
                    .await;
                if allowed.contains(role) {
                    assert_ne!(
                        resp.status, 403,
                        "{role} should be allowed {method} {path}: {resp:?}"
                    );
                    assert_ne!(resp.status, 401, "{resp:?}");
                } else {
                    resp.problem(403);
                }
            }
        }
        // Organisations are readable with any key.
        for key in keys.values() {
            assert_eq!(app.get("/v1/organisations/ORG01", key).await.status, 200);
        }
    }
}
