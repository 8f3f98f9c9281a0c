use crate::helpers::*;
use serde_json::json;

#[tokio::test]
async fn a_check_that_hits_returns_the_contacts_and_is_listed_in_the_next_check() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        app.post("/v1/plans", &w.la, cpp_plan("BCC-1", "9434765919"))
            .await;

        let first = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": "943-476-5919"}, "setting_type": "ED",
                   "practitioner": {"name": "Dr Jones", "role": "ED registrar"}}),
            )
            .await;
        assert_eq!(first.status, 200, "{first:?}");
        assert_eq!(first.body["match"]["status"], "matched");
        assert_eq!(first.body["match"]["method"], "nhs_number");
        let flag = &first.body["flags"][0];
        assert_eq!(flag["plan_type"], "CPP");
        assert_eq!(flag["status"], "active");
        assert_eq!(flag["responsible"]["ods_code"], "E08000025");
        assert_eq!(flag["responsible"]["name"], "Birmingham City Council");
        assert_eq!(flag["responsible"]["office_phone"], "0121 303 1888");
        assert_eq!(flag["responsible"]["emergency_duty_phone"], "0121 675 4806");
        // A clinician gets the flag, not the child's demographics.
        assert!(flag.get("child").is_none());
        assert_eq!(first.body["recent_accesses"], json!([]));

        let second = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": "9434765919"}}),
            )
            .await;
        let recent = second.body["recent_accesses"].as_array().unwrap();
        assert_eq!(recent.len(), 1, "{second:?}");
        assert_eq!(recent[0]["setting_ods"], "RXK01");
        assert_eq!(
            recent[0]["setting_name"],
            "Sandwell General Emergency Department"
        );
        assert_eq!(recent[0]["setting_type"], "ED");
    }
}

#[tokio::test]
async fn recent_accesses_are_the_25_newest_newest_first() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        app.post("/v1/plans", &w.la, cpp_plan("BCC-1", "9434765919"))
            .await;
        let check = json!({"patient": {"nhs_number": "9434765919"}});
        for _ in 0..27 {
            assert_eq!(
                app.post("/v1/flag-checks", &w.care, check.clone())
                    .await
                    .status,
                200
            );
        }
        let last = app.post("/v1/flag-checks", &w.care, check).await;
        let recent = last.body["recent_accesses"].as_array().unwrap();
        assert_eq!(recent.len(), 25);
        let times: Vec<&str> = recent.iter().map(|a| a["at"].as_str().unwrap()).collect();
        let mut sorted = times.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(times, sorted, "newest first");
    }
}

#[tokio::test]
async fn a_scheduled_check_is_audited_but_not_listed_as_an_unscheduled_access() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        app.post("/v1/plans", &w.la, cpp_plan("BCC-1", "9434765919"))
            .await;
        let scheduled = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": "9434765919"}, "access": "scheduled"}),
            )
            .await;
        assert_eq!(scheduled.body["flags"][0]["plan_type"], "CPP");
        let next = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": "9434765919"}}),
            )
            .await;
        assert_eq!(next.body["recent_accesses"], json!([]), "{next:?}");

        let audit = app
            .post(
                "/v1/audit/search",
                &w.auditor,
                json!({"nhs_number": "9434765919"}),
            )
            .await;
        let checks: Vec<_> = audit.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "flag_check")
            .collect();
        assert_eq!(checks.len(), 2, "{audit:?}");
        assert!(checks
            .iter()
            .any(|e| e["detail"].as_str().unwrap().contains("\"scheduled\"")));
    }
}

#[tokio::test]
async fn a_miss_answers_no_flags_and_is_audited_too() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let nhs = test_nhs_number(3);
        let resp = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": nhs}}),
            )
            .await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body["match"]["status"], "none");
        assert_eq!(resp.body["flags"], json!([]));
        let audit = app
            .post("/v1/audit/search", &w.auditor, json!({"nhs_number": nhs}))
            .await;
        assert_eq!(audit.body["items"][0]["action"], "flag_check");
        assert_eq!(audit.body["items"][0]["outcome"], "miss");
        assert_eq!(audit.body["items"][0]["actor_ods"], "RXK01");
    }
}

#[tokio::test]
async fn an_ended_plan_is_shown_as_ended_and_does_not_count_as_a_hit() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let mut plan = cpp_plan("BCC-9", "9434765919");
        plan["end_date"] = json!("2026-02-01");
        app.post("/v1/plans", &w.la, plan).await;
        let resp = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": "9434765919"}}),
            )
            .await;
        assert_eq!(resp.body["flags"][0]["status"], "ended");
        let audit = app
            .post(
                "/v1/audit/search",
                &w.auditor,
                json!({"nhs_number": "9434765919"}),
            )
            .await;
        assert_eq!(audit.body["items"][0]["outcome"], "miss");
    }
}

#[tokio::test]
async fn checks_validate_the_patient_and_the_setting() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let bad = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": "9434765918"}}),
            )
            .await;
        bad.problem(422);
        assert_eq!(bad.error_fields(), ["patient.nhs_number"]);
        let none = app
            .post("/v1/flag-checks", &w.care, json!({"patient": {}}))
            .await;
        assert_eq!(none.error_fields(), ["patient"]);
        let unknown_identifier = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"identifier": {"system": "urn:bsol:mrn", "value": "A1"}}}),
            )
            .await;
        assert_eq!(
            unknown_identifier.body["match"],
            json!({"status": "none", "method": "identifier", "score": 0.0})
        );
        let half_identifier = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"identifier": {"system": "urn:bsol:mrn"}}}),
            )
            .await;
        assert_eq!(half_identifier.error_fields(), ["patient.identifier.value"]);
        let thin = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"demographics": {"family_name": "Smith"}}}),
            )
            .await;
        assert_eq!(thin.error_fields(), ["patient.demographics"]);
        let access = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": "9434765919"}, "access": "sometimes"}),
            )
            .await;
        assert_eq!(access.error_fields(), ["access"]);
        let elsewhere = app
            .post(
                "/v1/flag-checks",
                &w.care,
                json!({"patient": {"nhs_number": "9434765919"}, "setting_ods": "RYY99"}),
            )
            .await;
        elsewhere.problem(403);
    }
}

/// A child with plans from two authorities, the later-starting one registered first, is shown both, earliest
/// start first, each with its own authority; a child the index knows without a plan is matched and shown none.
/// On PostgreSQL the lookup by NHS number reads the person and the plans in one statement, one round trip,
/// whatever it finds.
#[tokio::test]
async fn a_match_by_nhs_number_shows_every_plan_in_start_order_and_costs_postgresql_one_statement()
{
    use cpis::db::DbConnection;
    use cpis::mpi::builtin::{resolve_for, Needs};
    use cpis::mpi::{MatchStatus, PatientQuery, Thresholds};
    use diesel::connection::{Connection, InstrumentationEvent};
    use std::sync::{Arc, Mutex};

    for backend in backends() {
        let app = spawn_app(backend).await;
        let w = app.world().await;
        let (child, planless, unknown) =
            (test_nhs_number(1), test_nhs_number(2), test_nhs_number(3));
        let mut later = cpp_plan("BCC-2", &child);
        later["start_date"] = json!("2026-03-01");
        let mut earlier = cpp_plan("CCC-1", &child);
        earlier["plan_type"] = json!("LAC");
        for (key, plan) in [(&w.la, later), (&w.other_la, earlier)] {
            let resp = app.post("/v1/plans", key, plan).await;
            assert_eq!(resp.status, 201, "{backend:?}: {resp:?}");
        }
        let db = app.db.db();
        let now = chrono::Utc::now().naive_utc();
        db.write_blocking(|conn| {
            cpis::mpi::builtin::upsert_person(conn, now, Some(&planless), &Default::default())
                .map_err(cpis::db::DbError::from)
        })
        .unwrap();

        let check = |nhs: &str| {
            let app = &app;
            let (care, nhs) = (w.care.clone(), nhs.to_string());
            async move {
                let resp = app
                    .post(
                        "/v1/flag-checks",
                        &care,
                        json!({"patient": {"nhs_number": nhs}}),
                    )
                    .await;
                assert_eq!(resp.status, 200, "{resp:?}");
                resp.body
            }
        };
        let shown = check(&child).await;
        assert_eq!(shown["match"]["status"], "matched", "{backend:?}");
        let flags: Vec<(String, String, String)> = shown["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["plan_type"].as_str().unwrap().to_string(),
                    f["start_date"].as_str().unwrap().to_string(),
                    f["responsible"]["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            flags,
            [
                (
                    "LAC".into(),
                    "2026-01-10".into(),
                    "Coventry City Council".into()
                ),
                (
                    "CPP".into(),
                    "2026-03-01".into(),
                    "Birmingham City Council".into()
                ),
            ],
            "{backend:?}"
        );
        let none = check(&planless).await;
        assert_eq!(none["match"]["status"], "matched", "{backend:?}");
        assert_eq!(none["flags"], json!([]), "{backend:?}");
        let missed = check(&unknown).await;
        assert_eq!(missed["match"]["status"], "none", "{backend:?}");

        // The statements one lookup sends, for a check and for an attendance, whatever it finds.
        let thresholds = Thresholds {
            matched: 0.8,
            possible: 0.5,
        };
        let sent = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = sent.clone();
        db.write_blocking(|conn| {
            let count = move |event: InstrumentationEvent<'_>| {
                if let InstrumentationEvent::StartQuery { query, .. } = event {
                    seen.lock().unwrap().push(query.to_string());
                }
            };
            match &mut *conn {
                DbConnection::Postgres(c) => c.set_instrumentation(count),
                DbConnection::Sqlite(c) => c.set_instrumentation(count),
            }
            for needs in [Needs::MatchOnly, Needs::PersonId] {
                for (nhs, status, plans) in [
                    (&child, MatchStatus::Matched, Some(2)),
                    (&planless, MatchStatus::Matched, Some(0)),
                    (&unknown, MatchStatus::None, None),
                ] {
                    sent.lock().unwrap().clear();
                    let query = PatientQuery {
                        nhs_number: Some(cpis::domain::NhsNumber::parse(nhs).unwrap()),
                        ..Default::default()
                    };
                    let found = resolve_for(conn, &query, thresholds, needs)?;
                    assert_eq!(found.resolution.status, status, "{backend:?} {needs:?}");
                    assert_eq!(found.plans.map(|p| p.len()), plans, "{backend:?} {needs:?}");
                    assert_eq!(
                        found.resolution.person_id.is_some(),
                        needs == Needs::PersonId && status == MatchStatus::Matched,
                        "{backend:?} {needs:?}"
                    );
                    if backend == Backend::Postgres {
                        let sent = sent.lock().unwrap();
                        assert_eq!(sent.len(), 1, "{needs:?}: {sent:?}");
                    }
                }
            }
            let quiet = |_: InstrumentationEvent<'_>| {};
            match &mut *conn {
                DbConnection::Postgres(c) => c.set_instrumentation(quiet),
                DbConnection::Sqlite(c) => c.set_instrumentation(quiet),
            }
            Ok::<_, cpis::db::DbError>(())
        })
        .unwrap();
    }
}
