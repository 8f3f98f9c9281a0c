use crate::helpers::*;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn malformed_bodies_get_problem_details_naming_what_is_wrong() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let syntax = app
            .post_raw(
                "/v1/plans",
                &w.la,
                "application/json",
                b"{\"local_reference\": ".to_vec(),
            )
            .await;
        syntax.problem(400);
        let trailing = app
            .post_raw("/v1/plans", &w.la, "application/json", b"{} {}".to_vec())
            .await;
        trailing.problem(400);
        let empty = app
            .post_raw("/v1/plans", &w.la, "application/json", Vec::new())
            .await;
        empty.problem(400);
        let not_utf8 = app
            .post_raw(
                "/v1/plans",
                &w.la,
                "application/json",
                vec![b'"', 0xff, 0xfe, b'"'],
            )
            .await;
        not_utf8.problem(400);
        let deep = app
            .post_raw(
                "/v1/plans",
                &w.la,
                "application/json",
                "[".repeat(10_000).into_bytes(),
            )
            .await;
        deep.problem(422);
        assert_eq!(deep.error_fields(), ["body"]);
        let mut deep_field = b"{\"child\": ".to_vec();
        deep_field.extend("{\"a\": ".repeat(10_000).into_bytes());
        let deep_field = app
            .post_raw("/v1/plans", &w.la, "application/json", deep_field)
            .await;
        assert!(deep_field.status.is_client_error(), "{deep_field:?}");
        assert_eq!(deep_field.content_type(), "application/problem+json");

        let unknown = app
            .post(
                "/v1/plans",
                &w.la,
                json!({"local_reference": "X", "nhs_numbr": "9434765919"}),
            )
            .await;
        unknown.problem(422);
        assert_eq!(unknown.error_fields(), ["nhs_numbr"]);
        assert!(unknown.body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field"));
        let wrong_type = app
            .post("/v1/plans", &w.la, json!({"local_reference": 42}))
            .await;
        wrong_type.problem(422);
        assert_eq!(wrong_type.error_fields(), ["local_reference"]);
        let nested = app
            .post("/v1/plans", &w.la, json!({"child": {"given_name": ["A"]}}))
            .await;
        assert_eq!(nested.error_fields(), ["child.given_name"]);
        let array = app.post("/v1/plans", &w.la, json!([1, 2, 3])).await;
        array.problem(422);
        assert_eq!(array.error_fields(), ["body"]);

        let text = app
            .post_raw("/v1/plans", &w.la, "text/plain", b"{}".to_vec())
            .await;
        text.problem(415);
        let form = app
            .post_raw(
                "/v1/flag-checks",
                &w.care,
                "application/x-www-form-urlencoded",
                b"a=b".to_vec(),
            )
            .await;
        form.problem(415);
    }
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_413_before_they_are_read() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let mut big = cpp_plan("BIG", "9434765919");
        big["local_reference"] = json!("x".repeat(70 * 1024));
        let resp = app.post("/v1/plans", &w.la, big).await;
        resp.problem(413);
        assert!(resp.body["detail"].as_str().unwrap().contains("65536"));
        // Chunked, so the size is not declared up front.
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            (0..100).map(|_| Ok(vec![b' '; 1024])).collect();
        let res = app
            .client
            .post(format!("{}/v1/plans", app.address))
            .bearer_auth(&w.la)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .unwrap();
        TestApp::read(res).await.problem(413);
        assert_eq!(
            app.post("/v1/plans/search", &w.la, json!({})).await.body["total"],
            0
        );
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_get_problem_details() {
    let app = spawn_app(Backend::Sqlite).await;
    let w = app.world().await;
    app.get("/v1/nothing-here", &w.la).await.problem(404);
    app.request(Method::GET, "/nothing", None, None)
        .await
        .problem(404);
    app.request(Method::PUT, "/health/live", None, None)
        .await
        .problem(405);
    app.request(Method::DELETE, "/v1/plans/search", Some(&w.la), None)
        .await
        .problem(405);
}

#[tokio::test]
async fn odd_but_well_formed_values_are_refused_not_crashed_on() {
    let app = spawn_app(Backend::Sqlite).await;
    let w = app.world().await;
    let odd = [
        json!({"patient": {"nhs_number": "9434765919\u{0000}"}}),
        json!({"patient": {"nhs_number": "٩٤٣٤٧٦٥٩١٩"}}),
        json!({"patient": {"nhs_number": 9434765919u64}}),
        json!({"patient": {"nhs_number": "9434765919"}, "practitioner": {"name": "x".repeat(5000)}}),
        json!({"patient": null}),
        json!({"patient": {"nhs_number": "9434765919"}, "setting_ods": "🙂"}),
    ];
    for body in odd {
        let resp = app.post("/v1/flag-checks", &w.care, body.clone()).await;
        assert!(resp.status.is_client_error(), "{body} -> {resp:?}");
        assert_eq!(resp.content_type(), "application/problem+json");
    }
    let page = app
        .post("/v1/plans/search", &w.la, json!({"page": -1}))
        .await;
    assert_eq!(page.error_fields(), ["page"]);
    let huge_page = app
        .post("/v1/plans/search", &w.la, json!({"page": 1e300}))
        .await;
    huge_page.problem(422);
}

/// PostgreSQL ends a transaction to settle a deadlock (with another instance's batch, say) or a serialisation
/// failure. The requests whose writes it held are answered 503 with `Retry-After`, never 500; nothing of them is
/// kept (no attendance, notification or audit event); sent again, each is stored once. Here a trigger fails the
/// first insert of an attendance as a deadlock does, which ends the writer's whole batch, and the first insert of
/// a plan as a serialisation failure does, which ends only that write's savepoint (and then a bulk file's).
#[tokio::test]
async fn a_write_the_database_ends_to_settle_a_conflict_is_answered_503_keeps_nothing_and_succeeds_when_sent_again(
) {
    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    for backend in backends().into_iter().filter(|b| *b == Backend::Postgres) {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let plan = app
            .post("/v1/plans", &w.la, cpp_plan("BCC-1", "9434765919"))
            .await;
        assert_eq!(plan.status, 201, "{plan:?}");
        let db = app.db.db();
        db.get()
            .unwrap()
            .batch_execute(
                "CREATE SEQUENCE deadlocks; CREATE SEQUENCE serialisations;
                 CREATE FUNCTION fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                   IF TG_TABLE_NAME = 'attendances' AND nextval('deadlocks') = 1 THEN
                     RAISE EXCEPTION 'deadlock detected' USING ERRCODE = 'deadlock_detected';
                   END IF;
                   IF TG_TABLE_NAME = 'plans' AND nextval('serialisations') = 1 THEN
                     RAISE EXCEPTION 'could not serialize access' USING ERRCODE = 'serialization_failure';
                   END IF;
                   RETURN NULL;
                 END $$;
                 CREATE TRIGGER fail_once BEFORE INSERT ON attendances
                   FOR EACH STATEMENT EXECUTE FUNCTION fail_once();
                 CREATE TRIGGER fail_once BEFORE INSERT ON plans
                   FOR EACH STATEMENT EXECUTE FUNCTION fail_once();",
            )
            .unwrap();
        let notifications = || -> i64 {
            cpis::db::schema::notifications::table
                .count()
                .get_result(&mut *db.get().unwrap())
                .unwrap()
        };

        let attendance = json!({"attendance_id": "ATT-1", "setting_ods": "RXK01", "setting_type": "ED",
                                "arrived_at": "2026-11-20T22:15:00Z", "patient": {"nhs_number": "9434765919"}});
        let refused = app
            .post("/v1/attendances", &w.care, attendance.clone())
            .await;
        assert_eq!(refused.problem(503)["type"], "/problems/unavailable");
        assert_eq!(refused.headers["retry-after"], "1");
        assert!(
            refused.body["detail"]
                .as_str()
                .unwrap()
                .contains("send it again"),
            "{refused:?}"
        );
        assert_eq!(app.stored_attendances(), 0);
        assert_eq!(notifications(), 0);
        assert!(app
            .audit_outcomes("9434765919", "attendance.create")
            .await
            .is_empty());

        let stored = app.post("/v1/attendances", &w.care, attendance).await;
        assert_eq!(stored.status, 201, "{stored:?}");
        assert_eq!(stored.body["notifications"].as_array().unwrap().len(), 1);
        assert_eq!(app.stored_attendances(), 1);
        assert_eq!(notifications(), 1);
        assert_eq!(
            app.audit_outcomes("9434765919", "attendance.create").await,
            ["flagged"]
        );

        let second = cpp_plan("BCC-2", "9434765927");
        let refused = app.post("/v1/plans", &w.la, second.clone()).await;
        assert_eq!(refused.problem(503)["type"], "/problems/unavailable");
        assert_eq!(refused.headers["retry-after"], "1");
        let check = json!({"patient": {"nhs_number": "9434765927"}});
        let missed = app.post("/v1/flag-checks", &w.care, check.clone()).await;
        assert_eq!(missed.status, 200, "{missed:?}");
        assert_eq!(missed.body["flags"], json!([]));
        let created = app.post("/v1/plans", &w.la, second).await;
        assert_eq!(created.status, 201, "{created:?}");
        let hit = app.post("/v1/flag-checks", &w.care, check).await;
        assert_eq!(hit.body["flags"][0]["status"], "active", "{hit:?}");

        // A bulk file the database fails the same way is not a corrupt file (422, CPF01): 503, nothing of it kept.
        db.get()
            .unwrap()
            .batch_execute("ALTER SEQUENCE serialisations RESTART")
            .unwrap();
        let file = "local_reference,nhs_number,plan_type,start_date,end_date,expected_delivery_date,given_name,\
                    family_name,birth_date,sex,postcode\n\
                    BCC-3,9434765935,CPP,2026-01-10,,,Amelia,Smith,2019-03-04,female,B1 1AA\n";
        let refused = app
            .post_raw("/v1/plans/bulk", &w.la, "text/csv", file.into())
            .await;
        assert_eq!(refused.problem(503)["type"], "/problems/unavailable");
        assert_eq!(refused.headers["retry-after"], "1");
        let check = json!({"patient": {"nhs_number": "9434765935"}});
        let missed = app.post("/v1/flag-checks", &w.care, check.clone()).await;
        assert_eq!(missed.body["flags"], json!([]), "{missed:?}");
        let imported = app
            .post_raw("/v1/plans/bulk", &w.la, "text/csv", file.into())
            .await;
        assert_eq!(imported.status, 200, "{imported:?}");
        assert_eq!(imported.body["accepted"], 1, "{imported:?}");
        let hit = app.post("/v1/flag-checks", &w.care, check).await;
        assert_eq!(hit.body["flags"][0]["status"], "active", "{hit:?}");
    }
}
