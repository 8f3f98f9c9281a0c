//! The retention jobs with a fixed clock: `expire` records ended plans, `purge` removes what is past its
//! delete date and nothing else, and the audit chain still verifies afterwards.

use crate::helpers::*;
use chrono::TimeZone;
use cpis::clock::FixedClock;
use cpis::startup::AppState;
use diesel::prelude::*;
use serde_json::{json, Value};
use std::sync::Arc;

fn at(y: i32, m: u32, d: u32) -> Arc<FixedClock> {
    Arc::new(FixedClock::new(
        chrono::Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap(),
    ))
}

fn plan(reference: &str, nhs: &str, kind: &str, extra: Value) -> Value {
    let mut p = json!({"local_reference": reference, "nhs_number": nhs, "plan_type": kind, "start_date": "2024-06-01",
                       "child": {"given_name": "Test", "family_name": "Child", "birth_date": "2020-01-01"}});
    for (k, v) in extra.as_object().unwrap() {
        p[k] = v.clone();
    }
    p
}

fn remaining_references(app: &TestApp) -> Vec<String> {
    let db = app.db.db();
    let mut conn = db.get().unwrap();
    use cpis::db::schema::plans::dsl::*;
    let mut refs: Vec<String> = plans.select(local_reference).load(&mut *conn).unwrap();
    refs.sort();
    refs
}

fn count_persons(app: &TestApp, nhs: &str) -> i64 {
    let db = app.db.db();
    let mut conn = db.get().unwrap();
    use cpis::db::schema::persons::dsl::*;
    persons
        .filter(nhs_number.eq(nhs))
        .count()
        .get_result(&mut *conn)
        .unwrap()
}

#[tokio::test]
async fn purge_removes_what_is_past_its_delete_date_and_nothing_else_and_the_audit_still_verifies()
{
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let (kept_child, gone_child, unborn_mother) = (
            test_nhs_number(21),
            test_nhs_number(22),
            test_nhs_number(23),
        );
        let register = |b: Value, key: String| {
            let app = &app;
            async move {
                let r = app.post("/v1/plans", &key, b).await;
                assert_eq!(r.status, 201, "{r:?}");
            }
        };
        register(
            plan(
                "A-ended-long-ago",
                &kept_child,
                "CPP",
                json!({"end_date": "2025-01-31"}),
            ),
            w.la.clone(),
        )
        .await;
        register(
            plan(
                "B-ended-recently",
                &test_nhs_number(24),
                "CPP",
                json!({"end_date": "2026-06-30"}),
            ),
            w.la.clone(),
        )
        .await;
        register(
            plan("C-open", &test_nhs_number(25), "LAC", json!({})),
            w.la.clone(),
        )
        .await;
        register(
            plan(
                "D-unborn-delivered",
                &unborn_mother,
                "UCPP",
                json!({"expected_delivery_date": "2026-10-01"}),
            ),
            w.la.clone(),
        )
        .await;
        register(
            plan(
                "E-own-delete-date",
                &test_nhs_number(26),
                "LAC",
                json!({"end_date": "2026-10-01", "delete_date": "2026-11-01"}),
            ),
            w.la.clone(),
        )
        .await;
        register(
            plan("F-other-authority-open", &kept_child, "CPP", json!({})),
            w.other_la.clone(),
        )
        .await;
        register(
            plan(
                "G-only-plan-ended",
                &gone_child,
                "CPP",
                json!({"end_date": "2025-01-01"}),
            ),
            w.la.clone(),
        )
        .await;
        // An access of each child before the purge.
        for nhs in [&kept_child, &gone_child] {
            app.post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": nhs}}),
            )
            .await;
        }

        let mut settings = app.db.settings();
        settings.jobs = Default::default();
        let state = AppState::new(settings, at(2026, 12, 1)).unwrap();
        let expired = cpis::jobs::run_now(&state, "expire").await.unwrap();
        assert!(expired.contains("\"ended\":4"), "{expired}");
        // Sending a plan again after `expire` recorded its end is still a no-op.
        let again = app
            .post(
                "/v1/plans",
                &w.la,
                plan(
                    "B-ended-recently",
                    &test_nhs_number(24),
                    "CPP",
                    json!({"end_date": "2026-06-30"}),
                ),
            )
            .await;
        assert_eq!(
            (again.status.as_u16(), again.body["version"].as_i64()),
            (200, Some(1)),
            "{again:?}"
        );
        let report = cpis::jobs::run_now(&state, "purge").await.unwrap();
        let report: Value = serde_json::from_str(&report).unwrap();
        assert_eq!(report["plans"], 4, "{report}");

        assert_eq!(
            remaining_references(&app),
            ["B-ended-recently", "C-open", "F-other-authority-open"]
        );
        assert_eq!(
            count_persons(&app, &gone_child),
            0,
            "a person with no plan left is removed"
        );
        assert_eq!(count_persons(&app, &unborn_mother), 0);
        assert_eq!(
            count_persons(&app, &kept_child),
            1,
            "a person with another authority's plan stays"
        );
        let kept = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": kept_child}}),
            )
            .await;
        assert_eq!(
            kept.body["recent_accesses"].as_array().unwrap().len(),
            1,
            "their accesses stay"
        );
        let gone = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": gone_child}}),
            )
            .await;
        assert_eq!(gone.body["match"]["status"], "none");
        assert_eq!(gone.body["flags"], json!([]));

        let verify = app.get("/v1/audit/verify", &w.auditor).await;
        assert_eq!(verify.body["ok"], true, "{verify:?}");
        // A second run finds nothing more to do.
        let again: Value =
            serde_json::from_str(&cpis::jobs::run_now(&state, "purge").await.unwrap()).unwrap();
        assert_eq!(again["plans"], 0);
    }
}

#[tokio::test]
async fn audit_events_past_their_retention_go_and_the_rest_of_the_chain_still_verifies() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        app.post("/v1/plans", &w.la, cpp_plan("X-1", "9434765919"))
            .await;
        let before = app.get("/v1/audit/verify", &w.auditor).await.body["checked"]
            .as_i64()
            .unwrap();
        let mut settings = app.db.settings();
        settings.audit.retention_days = 365;
        let state = AppState::new(settings, at(2028, 12, 1)).unwrap();
        let report: Value =
            serde_json::from_str(&cpis::jobs::run_now(&state, "purge").await.unwrap()).unwrap();
        assert_eq!(report["audit_events"], before, "{report}");
        let verify = app.get("/v1/audit/verify", &w.auditor).await;
        assert_eq!(verify.body["ok"], true, "{verify:?}");
        assert_eq!(
            verify.body["checked"], 1,
            "only the purge's own event remains"
        );
        // Tampering is still caught after a purge.
        let db = app.db.db();
        let mut conn = db.get().unwrap();
        use diesel::connection::SimpleConnection;
        conn.batch_execute("UPDATE audit_events SET outcome = 'changed'")
            .unwrap();
        assert_eq!(
            app.get("/v1/audit/verify", &w.auditor).await.body["ok"],
            false
        );
    }
}

/// The writes the group-commit writer of `state` has carried so far (`cpis_db_writes_total`).
fn writes(state: &AppState) -> u64 {
    state
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("cpis_db_writes_total "))
        .and_then(|n| n.parse().ok())
        .expect("the writer's counter is exported")
}

fn rows_about(app: &TestApp, nhs: &str) -> (i64, i64, i64) {
    use cpis::db::schema::{accesses, attendances, notifications};
    let db = app.db.db();
    let mut conn = db.get().unwrap();
    let counted = |n: Result<i64, _>| n.unwrap();
    (
        counted(
            attendances::table
                .filter(attendances::resolved_nhs_number.eq(nhs))
                .count()
                .get_result(&mut *conn),
        ),
        counted(
            accesses::table
                .filter(accesses::nhs_number.eq(nhs))
                .count()
                .get_result(&mut *conn),
        ),
        counted(
            notifications::table
                .filter(notifications::nhs_number.eq(nhs))
                .filter(notifications::payload.is_not_null())
                .count()
                .get_result(&mut *conn),
        ),
    )
}

/// The purge removes what it finds in writes of its own, each of a few rows, so that flag checks and attendances
/// never wait behind the whole of it. Done a row a write, it removes exactly what it would in one: people past
/// their plans with what only they kept, activity past its retention, and audit events past theirs, with the
/// rest of the chain still verifying.
#[tokio::test]
async fn a_purge_done_a_row_a_write_removes_what_is_due_and_nothing_else() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let gone: Vec<String> = (31..34).map(test_nhs_number).collect();
        let kept = test_nhs_number(34);
        // Each child is seen while their plan is open (a hit: an access and a notification), then the plan is
        // recorded as ended long ago.
        for (i, nhs) in gone.iter().enumerate() {
            let body = plan(&format!("ENDED-{i}"), nhs, "CPP", json!({}));
            let registered = app.post("/v1/plans", &w.la, body).await;
            assert_eq!(registered.status, 201, "{registered:?}");
            let seen = app
                .post(
                    "/v1/flag-checks",
                    &w.care,
                    json!({"patient": {"nhs_number": nhs}}),
                )
                .await;
            assert_eq!(seen.body["flags"][0]["status"], "active", "{seen:?}");
            let path = format!("/v1/plans/{}", registered.body["id"].as_str().unwrap());
            let ended = app
                .patch(&path, &w.la, json!({"end_date": "2025-01-31"}))
                .await;
            assert_eq!(ended.status, 200, "{ended:?}");
        }
        let open = plan("OPEN", &kept, "CPP", json!({}));
        assert_eq!(app.post("/v1/plans", &w.la, open).await.status, 201);
        for (id, arrived) in [
            ("OLD-1", "2026-06-01T10:00:00Z"),
            ("NEW-1", "2026-11-20T22:15:00Z"),
        ] {
            let att = json!({"attendance_id": id, "setting_ods": "RXK01", "setting_type": "ED",
                             "arrived_at": arrived, "patient": {"nhs_number": kept}});
            let r = app.post("/v1/attendances", &w.care, att).await;
            assert_eq!(r.status, 201, "{r:?}");
        }
        for nhs in &gone {
            assert_eq!(rows_about(&app, nhs), (0, 1, 1), "a check of {nhs}");
        }
        assert_eq!(rows_about(&app, &kept), (2, 2, 2));
        // Two people the MPI met without a plan, one last seen in January, one today; the first has an
        // identifier link.
        let (stale, seen) = (test_nhs_number(35), test_nhs_number(36));
        {
            use cpis::db::schema::{person_identifiers, persons};
            use cpis::db::stamp::Stamp;
            let db = app.db.db();
            let mut conn = db.get().unwrap();
            let january = chrono::NaiveDate::from_ymd_opt(2026, 1, 5)
                .unwrap()
                .and_hms_opt(9, 0, 0)
                .unwrap();
            let today = chrono::Utc::now().naive_utc();
            for (id, nhs, last) in [("P-STALE", &stale, january), ("P-SEEN", &seen, today)] {
                let person = cpis::mpi::builtin::PersonRow {
                    id: id.into(),
                    ..cpis::mpi::builtin::PersonRow::blank(Some(nhs), last)
                };
                diesel::insert_into(persons::table)
                    .values(&person)
                    .execute(&mut *conn)
                    .unwrap();
            }
            diesel::insert_into(person_identifiers::table)
                .values((
                    person_identifiers::system.eq("https://example.org/mrn"),
                    person_identifiers::value.eq("MRN-35"),
                    person_identifiers::region.eq("BSOL"),
                    person_identifiers::person_id.eq("P-STALE"),
                    person_identifiers::created_at.eq(Stamp(january)),
                    person_identifiers::updated_at.eq(Stamp(january)),
                ))
                .execute(&mut *conn)
                .unwrap();
        }
        let events = app.get("/v1/audit/verify", &w.auditor).await.body["checked"]
            .as_u64()
            .unwrap();

        let mut settings = app.db.settings();
        settings.jobs = Default::default();
        // Activity before 2 September 2026 is old; every audit event so far is past its retention.
        settings.retention.activity_days = 90;
        settings.audit.retention_days = 1;
        let state = AppState::new(settings, at(2026, 12, 1)).unwrap();
        let before = writes(&state);
        let report = cpis::retention::purge_in_writes_of(&state, 1)
            .await
            .unwrap();
        let report = serde_json::to_value(report).unwrap();
        assert_eq!(
            report,
            json!({"plans": 3, "persons": 4, "identifier_links": 1, "attendances": 1, "accesses": 4,
                   "notifications_cleared": 4, "audit_events": events}),
            "the three ended plans' people and what they kept, the old attendance, its access and its \
             notification's contents, the person not seen since January with their link, and every audit event"
        );
        let used = writes(&state) - before;
        assert_eq!(
            (count_persons(&app, &stale), count_persons(&app, &seen)),
            (0, 1)
        );
        assert!(
            used > 3 + 4 + events,
            "a write for each person, each old row and each audit event, and the purge's own event: {used}"
        );

        for nhs in &gone {
            assert_eq!(rows_about(&app, nhs), (0, 0, 0), "{nhs} is gone");
            assert_eq!(count_persons(&app, nhs), 0);
        }
        assert_eq!(
            rows_about(&app, &kept),
            (1, 1, 1),
            "the recent attendance, its access and its notification stay"
        );
        assert_eq!(remaining_references(&app), ["OPEN"]);
        let verify = app.get("/v1/audit/verify", &w.auditor).await;
        assert_eq!(
            (verify.body["ok"].as_bool(), verify.body["checked"].as_i64()),
            (Some(true), Some(1)),
            "the purge's own event, verified from the chain's new start: {verify:?}"
        );
        let again = cpis::retention::purge_in_writes_of(&state, 1)
            .await
            .unwrap();
        assert_eq!((again.plans, again.attendances, again.accesses), (0, 0, 0));
    }
}
