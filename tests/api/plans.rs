use crate::helpers::*;
use serde_json::json;

#[tokio::test]
async fn registering_the_same_plan_twice_answers_the_same_plan_and_a_change_updates_it() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let body = cpp_plan("BCC-0001", "943 476 5919");
        let first = app.post("/v1/plans", &w.la, body.clone()).await;
        assert_eq!(first.status, 201, "{first:?}");
        assert_eq!(first.body["nhs_number"], "9434765919");
        assert_eq!(first.body["status"], "active");
        assert_eq!(first.body["child"]["postcode"], "B1 1AA");
        assert_eq!(first.body["responsible"]["name"], "Birmingham City Council");
        assert_eq!(first.body["version"], 1);

        let again = app.post("/v1/plans", &w.la, body.clone()).await;
        assert_eq!(again.status, 200, "{again:?}");
        assert_eq!(
            again.body, first.body,
            "a repeat must answer the same plan, unchanged"
        );

        let mut changed = body.clone();
        changed["end_date"] = json!("2026-09-30");
        let updated = app.post("/v1/plans", &w.la, changed).await;
        assert_eq!(updated.status, 200, "{updated:?}");
        assert_eq!(updated.body["id"], first.body["id"]);
        assert_eq!(updated.body["end_date"], "2026-09-30");
        assert_eq!(updated.body["version"], 2);

        // The same local reference at another authority is another plan.
        let other = app.post("/v1/plans", &w.other_la, body).await;
        assert_eq!(other.status, 201);
        assert_ne!(other.body["id"], first.body["id"]);

        let search = app
            .post(
                "/v1/plans/search",
                &w.la,
                json!({"nhs_number": "9434765919"}),
            )
            .await;
        assert_eq!(search.body["total"], 1, "{search:?}");
    }
}

#[tokio::test]
async fn one_local_authority_cannot_read_change_or_find_anothers_plans() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let plan = app
            .post("/v1/plans", &w.la, cpp_plan("BCC-0002", "9434765919"))
            .await;
        let id = plan.body["id"].as_str().unwrap();
        let path = format!("/v1/plans/{id}");

        assert_eq!(app.get(&path, &w.la).await.status, 200);
        let read = app.get(&path, &w.other_la).await;
        read.problem(404);
        let patch = app
            .patch(&path, &w.other_la, json!({"end_date": "2026-02-01"}))
            .await;
        patch.problem(404);
        let search = app
            .post(
                "/v1/plans/search",
                &w.other_la,
                json!({"nhs_number": "9434765919"}),
            )
            .await;
        assert_eq!(search.body["total"], 0, "{search:?}");
        assert_eq!(search.body["items"], json!([]));
        // The failed change changed nothing.
        assert_eq!(
            app.get(&path, &w.la).await.body["end_date"],
            serde_json::Value::Null
        );
        // A plan id that does not exist looks exactly like another authority's.
        let missing = app
            .get(
                "/v1/plans/00000000-0000-0000-0000-000000000000",
                &w.other_la,
            )
            .await;
        assert_eq!(missing.body["detail"], read.body["detail"]);
        // An admin may read any plan.
        assert_eq!(app.get(&path, &app.admin_key).await.status, 200);
    }
}

#[tokio::test]
async fn a_plan_is_ended_by_setting_its_end_date_and_searches_tell_active_from_ended() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let a = app
            .post("/v1/plans", &w.la, cpp_plan("A", &test_nhs_number(1)))
            .await;
        app.post("/v1/plans", &w.la, cpp_plan("B", &test_nhs_number(2)))
            .await;
        let path = format!("/v1/plans/{}", a.body["id"].as_str().unwrap());

        let ended = app
            .patch(
                &path,
                &w.la,
                json!({"end_date": "2026-02-01", "contacts": {"office_phone": "0121 464 0000"}}),
            )
            .await;
        assert_eq!(ended.status, 200, "{ended:?}");
        assert_eq!(ended.body["status"], "ended");
        assert_eq!(ended.body["version"], 2);
        assert_eq!(ended.body["responsible"]["office_phone"], "0121 464 0000");

        let active = app
            .post("/v1/plans/search", &w.la, json!({"status": "active"}))
            .await;
        assert_eq!(active.body["total"], 1);
        assert_eq!(active.body["items"][0]["local_reference"], "B");
        let ended_list = app
            .post("/v1/plans/search", &w.la, json!({"status": "ended"}))
            .await;
        assert_eq!(ended_list.body["total"], 1);
        assert_eq!(ended_list.body["items"][0]["local_reference"], "A");

        // null clears a field (JSON merge patch); an end before the start is refused.
        let reopened = app.patch(&path, &w.la, json!({"end_date": null})).await;
        assert_eq!(reopened.body["status"], "active", "{reopened:?}");
        let bad = app
            .patch(&path, &w.la, json!({"end_date": "2025-01-01"}))
            .await;
        bad.problem(422);
        assert_eq!(bad.error_fields(), ["end_date"]);
        let immutable = app
            .patch(&path, &w.la, json!({"nhs_number": "9434765919"}))
            .await;
        immutable.problem(422);
    }
}

#[tokio::test]
async fn registration_rejects_each_bad_field_precisely() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let cases = [
            (json!({"nhs_number": "9434765918"}), "nhs_number"),
            (json!({"nhs_number": "1000000010"}), "nhs_number"),
            (json!({"nhs_number": "94347659"}), "nhs_number"),
            (json!({"nhs_number": "943476591A"}), "nhs_number"),
            (json!({"plan_type": "CP"}), "plan_type"),
            (json!({"start_date": "2026-02-30"}), "start_date"),
            (json!({"start_date": "10/01/2026"}), "start_date"),
            (json!({"end_date": "2025-12-31"}), "end_date"),
            (json!({"local_reference": ""}), "local_reference"),
            (
                json!({"expected_delivery_date": "2026-05-01"}),
                "expected_delivery_date",
            ),
            (json!({"plan_type": "UCPP"}), "expected_delivery_date"),
            (
                json!({"child": {"birth_date": "2999-01-01"}}),
                "child.birth_date",
            ),
            (json!({"child": {"postcode": "nowhere"}}), "child.postcode"),
            (json!({"child": {"sex": "x"}}), "child.sex"),
            (
                json!({"contacts": {"email": "not an email"}}),
                "contacts.email",
            ),
        ];
        for (change, field) in cases {
            let mut body = cpp_plan("BAD", "9434765919");
            for (k, v) in change.as_object().unwrap() {
                body[k] = v.clone();
            }
            let resp = app.post("/v1/plans", &w.la, body).await;
            resp.problem(422);
            assert_eq!(resp.error_fields(), [field], "{resp:?}");
        }
        // Every missing required field is named at once.
        let resp = app.post("/v1/plans", &w.la, json!({})).await;
        let mut fields = resp.error_fields();
        fields.sort();
        assert_eq!(
            fields,
            ["local_reference", "nhs_number", "plan_type", "start_date"]
        );
        // Nothing was stored.
        assert_eq!(
            app.post("/v1/plans/search", &w.la, json!({})).await.body["total"],
            0
        );
    }
}

#[tokio::test]
async fn an_unborn_child_plan_is_held_against_the_mothers_nhs_number_with_a_delivery_date() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let mother = test_nhs_number(7);
        let resp = app
            .post(
                "/v1/plans",
                &w.la,
                json!({"local_reference": "UC-1", "nhs_number": mother, "plan_type": "UCPP", "start_date": "2026-03-01",
                       "expected_delivery_date": "2026-12-20"}),
            )
            .await;
        assert_eq!(resp.status, 201, "{resp:?}");
        let check = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": mother}}),
            )
            .await;
        assert_eq!(check.body["flags"][0]["plan_type"], "UCPP");
        assert_eq!(
            check.body["flags"][0]["expected_delivery_date"],
            "2026-12-20"
        );
    }
}
