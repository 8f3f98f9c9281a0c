//! Cross-region identity: a plan registered in one region is found when the child attends in another, by that
//! region's local identifier or by demographics with the usual errors, and never for a different child.

use crate::helpers::*;
use serde_json::{json, Value};

const CW_MRN: &str = "https://cw.example.nhs.uk/Id/mrn";

struct Regions {
    la: String,
    cw_feed: String,
    cw_ed: String,
    bsol_ed: String,
    admin: String,
}

/// Birmingham (region BSOL) registers a plan with the child's demographics; Cheshire (region CW) runs its own
/// record system with its own identifiers.
async fn regions(app: &TestApp) -> Regions {
    app.add_org_in(
        "E08000025",
        "Birmingham City Council",
        "local_authority",
        "BSOL",
    )
    .await;
    app.add_org_in("RXK01", "Sandwell General ED", "care_setting", "BSOL")
        .await;
    app.add_org_in("CWMPI", "Cheshire and Wirral MPI", "mpi_source", "CW")
        .await;
    app.add_org_in("RBT01", "Warrington Hospital ED", "care_setting", "CW")
        .await;
    let r = Regions {
        la: app.key("E08000025", &["social_care"]).await,
        cw_feed: app.key("CWMPI", &["mpi_feed"]).await,
        cw_ed: app.key("RBT01", &["care_setting"]).await,
        bsol_ed: app.key("RXK01", &["care_setting"]).await,
        admin: app.admin_key.clone(),
    };
    let plan = app
        .post("/v1/plans", &r.la, cpp_plan("BCC-77", "9434765919"))
        .await;
    assert_eq!(plan.status, 201, "{plan:?}");
    r
}

fn attendance(id: &str, patient: Value) -> Value {
    json!({"attendance_id": id, "setting_ods": "RBT01", "setting_type": "ED", "arrived_at": "2026-11-20T22:15:00Z", "patient": patient})
}

#[tokio::test]
async fn a_region_b_attendance_with_only_its_local_identifier_finds_the_region_a_flag() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let r = regions(&app).await;
        let link = app.post("/v1/mpi/links", &r.cw_feed, json!({"identifier": {"system": CW_MRN, "value": "CW-0042"}, "nhs_number": "9434765919"})).await;
        assert_eq!(link.status, 201, "{link:?}");
        assert_eq!(link.body["link"], "created");
        assert_eq!(link.body["region"], "CW");

        let resp = app
            .post(
                "/v1/attendances",
                &r.cw_ed,
                attendance(
                    "ATT-1",
                    json!({"identifier": {"system": CW_MRN, "value": "CW-0042"}}),
                ),
            )
            .await;
        assert_eq!(resp.status, 201, "{resp:?}");
        assert_eq!(resp.body["match"]["status"], "matched");
        assert_eq!(resp.body["match"]["method"], "identifier");
        assert_eq!(resp.body["flags"][0]["plan_type"], "CPP");
        assert_eq!(
            resp.body["flags"][0]["responsible"]["name"],
            "Birmingham City Council"
        );

        // The Birmingham ED now sees the Warrington attendance among the recent accesses.
        let check = app
            .post(
                "/v1/flag-checks",
                &r.bsol_ed,
                json!({"patient": {"nhs_number": "9434765919"}}),
            )
            .await;
        let recent = &check.body["recent_accesses"][0];
        assert_eq!(recent["setting_name"], "Warrington Hospital ED");
        assert_eq!(recent["setting_type"], "ED");
        assert_eq!(recent["at"], "2026-11-20T22:15:00.000000Z");
    }
}

#[tokio::test]
async fn demographics_with_a_typo_and_a_swapped_birth_date_still_find_the_child() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let r = regions(&app).await;
        let patient = json!({"demographics": {"given_name": "Amelia", "family_name": "Smtih", "birth_date": "2019-04-03", "sex": "female", "postcode": "B1 1AA"}});
        let resp = app
            .post("/v1/attendances", &r.cw_ed, attendance("ATT-2", patient))
            .await;
        assert_eq!(resp.status, 201, "{resp:?}");
        assert_eq!(resp.body["match"]["method"], "demographics");
        let status = resp.body["match"]["status"].as_str().unwrap();
        match status {
            "matched" => assert_eq!(resp.body["flags"][0]["plan_type"], "CPP"),
            "possible" => assert_eq!(resp.body["flags"][0]["status"], "possible_match"),
            other => panic!("the child was not found: {other} {resp:?}"),
        }
        // With these thresholds the evidence is strong enough to match.
        assert_eq!(status, "matched", "{resp:?}");
    }
}

#[tokio::test]
async fn an_unrelated_child_with_a_similar_name_is_not_matched() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let r = regions(&app).await;
        let patient = json!({"demographics": {"given_name": "Amelie", "family_name": "Smyth", "birth_date": "2018-07-22", "sex": "female", "postcode": "M1 1AE"}});
        let resp = app
            .post("/v1/attendances", &r.cw_ed, attendance("ATT-3", patient))
            .await;
        assert_eq!(resp.status, 201, "{resp:?}");
        assert_eq!(resp.body["match"]["status"], "none", "{resp:?}");
        assert_eq!(resp.body["flags"], json!([]));
        let check = app
            .post(
                "/v1/flag-checks",
                &r.bsol_ed,
                json!({"patient": {"nhs_number": "9434765919"}}),
            )
            .await;
        assert_eq!(
            check.body["recent_accesses"],
            json!([]),
            "an unmatched attendance is not the child's access"
        );
    }
}

#[tokio::test]
async fn a_possible_match_names_whom_to_contact_and_discloses_nothing_else() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let r = regions(&app).await;
        // Same name and birth date, but another district and no sex: evidence short of a match.
        let patient = json!({"demographics": {"given_name": "Amelia", "family_name": "Smith", "birth_date": "2019-03-04", "postcode": "WA1 1QQ"}});
        let resp = app
            .post("/v1/flag-checks", &r.cw_ed, json!({"patient": patient}))
            .await;
        assert_eq!(resp.status, 200, "{resp:?}");
        assert_eq!(resp.body["match"]["status"], "possible", "{resp:?}");
        let flags = resp.body["flags"].as_array().unwrap();
        assert_eq!(flags.len(), 1);
        let flag = flags[0].as_object().unwrap();
        let mut keys: Vec<&str> = flag.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["message", "responsible", "status"]);
        assert_eq!(flag["status"], "possible_match");
        assert_eq!(flag["responsible"]["emergency_duty_phone"], "0121 675 4806");
        let text = resp.body.to_string();
        for secret in ["9434765919", "CPP", "2026-01-10", "Smith\"", "B1 1AA"] {
            assert!(
                !text.contains(secret),
                "{secret} disclosed on a possible match: {text}"
            );
        }
        assert_eq!(resp.body["recent_accesses"], json!([]));
    }
}

/// A sender that sends an attendance again after it was stored (a retry after a lost answer) is answered from the
/// first: same id, match, flags and notifications. Nothing the first recorded is recorded twice (on PostgreSQL
/// the second is resolved again and its rows dropped when its insert finds the first), and the trail shows the
/// repeat.
#[tokio::test]
async fn the_same_attendance_posted_twice_is_stored_once() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let r = regions(&app).await;
        let body = attendance("ATT-9", json!({"nhs_number": "9434765919"}));
        let first = app.post("/v1/attendances", &r.cw_ed, body.clone()).await;
        assert_eq!(first.status, 201, "{first:?}");
        let second = app.post("/v1/attendances", &r.cw_ed, body).await;
        assert_eq!(second.status, 200, "{second:?}");
        for field in ["id", "match", "flags", "notifications"] {
            assert_eq!(second.body[field], first.body[field], "{backend:?} {field}");
        }
        assert_eq!(first.body["notifications"].as_array().unwrap().len(), 1);
        let list = app.get("/v1/notifications", &r.la).await;
        assert_eq!(list.body["items"].as_array().unwrap().len(), 1, "{list:?}");
        let outcomes = app.audit_outcomes("9434765919", "attendance.create").await;
        assert_eq!(outcomes, ["repeat", "flagged"], "{backend:?}: newest first");
        let check = app
            .post(
                "/v1/flag-checks",
                &r.bsol_ed,
                json!({"patient": {"nhs_number": "9434765919"}}),
            )
            .await;
        assert_eq!(
            check.body["recent_accesses"].as_array().unwrap().len(),
            1,
            "{check:?}"
        );
        assert_eq!(app.stored_attendances(), 1);
    }
}

/// The app, a second instance on its database (two HTTP workers), and the CW emergency department's key.
struct TwoInstances {
    app: TestApp,
    other: String,
    key: String,
}

impl TwoInstances {
    async fn start(backend: Backend) -> Self {
        let app = spawn_app(backend).await;
        let key = regions(&app).await.cw_ed;
        let mut settings = app.db.settings();
        settings.server.workers = 2;
        let other = cpis::startup::Application::build(settings).expect("a second instance");
        let address = format!("http://127.0.0.1:{}", other.port());
        tokio::spawn(other.run_until_stopped());
        Self {
            app,
            other: address,
            key,
        }
    }

    /// Sends attendance `id` of the child 9434765919, to the second instance if `other`.
    fn send(&self, other: bool, id: &str) -> impl std::future::Future<Output = Resp> + 'static {
        let address = if other {
            &self.other
        } else {
            &self.app.address
        };
        let request = self
            .app
            .client
            .post(format!("{address}/v1/attendances"))
            .bearer_auth(&self.key)
            .json(&attendance(id, json!({"nhs_number": "9434765919"})));
        async move { TestApp::read(request.send().await.unwrap()).await }
    }
}

/// Two cpis instances on one PostgreSQL database, each sent the same attendances at the same moment (a care
/// system retrying through a load balancer): each attendance is stored once, one instance answers 201 and the
/// other 200 with the same record, and no request fails.
#[tokio::test]
async fn the_same_attendance_sent_to_two_instances_at_once_is_stored_once_and_both_are_answered() {
    for backend in backends().into_iter().filter(|b| *b == Backend::Postgres) {
        let t = TwoInstances::start(backend).await;
        for n in 0..20 {
            let id = format!("RACE-{n}");
            let (a, b) = tokio::join!(t.send(false, &id), t.send(true, &id));
            let mut statuses = [a.status.as_u16(), b.status.as_u16()];
            statuses.sort();
            assert_eq!(statuses, [200, 201], "{a:?} {b:?}");
            assert_eq!(a.body["id"], b.body["id"], "{a:?} {b:?}");
        }
        assert_eq!(t.app.stored_attendances(), 20);
    }
}

/// A care system retrying a run of attendances through two instances at once, in opposite orders: every
/// attendance is stored once and every request is answered (201 or 200 with the same record). Each instance's
/// writer stores its batch's attendances in one order, so the two never wait on each other crosswise, which
/// PostgreSQL would end by failing one of the batches.
#[tokio::test]
async fn runs_of_attendances_sent_to_two_instances_in_opposite_orders_are_all_stored_once_and_answered(
) {
    for backend in backends().into_iter().filter(|b| *b == Backend::Postgres) {
        let t = TwoInstances::start(backend).await;
        for round in 0..20 {
            let ids: Vec<String> = (0..16).map(|n| format!("RUN-{round}-{n:02}")).collect();
            let forwards = ids.iter().map(|id| t.send(false, id));
            let backwards = ids.iter().rev().map(|id| t.send(true, id));
            let answers = futures_util::future::join_all(forwards.chain(backwards)).await;
            let sent = ids.iter().chain(ids.iter().rev());
            let answers: Vec<(&String, Resp)> = sent.zip(answers).collect();
            for id in &ids {
                let mine: Vec<_> = answers
                    .iter()
                    .filter(|(i, _)| *i == id)
                    .map(|(_, a)| a)
                    .collect();
                let mut statuses: Vec<u16> = mine.iter().map(|a| a.status.as_u16()).collect();
                statuses.sort();
                assert_eq!(statuses, [200, 201], "{id}: {mine:?}");
                assert_eq!(mine[0].body["id"], mine[1].body["id"], "{id}: {mine:?}");
            }
        }
        assert_eq!(t.app.stored_attendances(), 320);
    }
}

#[tokio::test]
async fn a_confident_demographic_match_teaches_the_mpi_the_local_identifier() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let r = regions(&app).await;
        let patient = json!({"identifier": {"system": CW_MRN, "value": "CW-7"},
                             "demographics": {"given_name": "Amelia", "family_name": "Smith", "birth_date": "2019-03-04", "sex": "female", "postcode": "B1 1AA"}});
        let first = app
            .post("/v1/attendances", &r.cw_ed, attendance("ATT-5", patient))
            .await;
        assert_eq!(first.body["match"]["status"], "matched", "{first:?}");
        let by_id = app
            .post(
                "/v1/flag-checks",
                &r.cw_ed,
                json!({"patient": {"identifier": {"system": CW_MRN, "value": "CW-7"}}}),
            )
            .await;
        assert_eq!(by_id.body["match"]["method"], "identifier", "{by_id:?}");
        assert_eq!(by_id.body["flags"][0]["plan_type"], "CPP");
    }
}

#[tokio::test]
async fn an_unborn_child_plan_matches_the_mothers_attendance_at_maternity_but_not_elsewhere() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let r = regions(&app).await;
        let mother = test_nhs_number(40);
        let plan = json!({"local_reference": "UC-9", "nhs_number": mother, "plan_type": "UCPP", "start_date": "2026-05-01",
                          "expected_delivery_date": "2026-12-24"});
        assert_eq!(app.post("/v1/plans", &r.la, plan).await.status, 201);
        let at = |id: &str, setting: &str| {
            json!({"attendance_id": id, "setting_ods": "RBT01", "setting_type": setting,
                                                  "arrived_at": "2026-11-21T03:00:00Z", "patient": {"nhs_number": mother}})
        };
        let maternity = app
            .post("/v1/attendances", &r.cw_ed, at("M-1", "MATERNITY"))
            .await;
        assert_eq!(
            maternity.body["flags"][0]["plan_type"], "UCPP",
            "{maternity:?}"
        );
        let sexual_health = app
            .post("/v1/attendances", &r.cw_ed, at("M-2", "SEXUAL_HEALTH"))
            .await;
        assert_eq!(sexual_health.body["flags"], json!([]), "{sexual_health:?}");
    }
}

#[tokio::test]
async fn attendances_are_validated_and_a_setting_reports_only_for_itself() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let r = regions(&app).await;
        let resp = app.post("/v1/attendances", &r.cw_ed, json!({})).await;
        let mut fields = resp.error_fields();
        fields.sort();
        assert_eq!(
            fields,
            [
                "arrived_at",
                "attendance_id",
                "patient",
                "setting_ods",
                "setting_type"
            ]
        );
        let mut future = attendance("F-1", json!({"nhs_number": "9434765919"}));
        future["arrived_at"] = json!("2999-01-01T00:00:00Z");
        assert_eq!(
            app.post("/v1/attendances", &r.cw_ed, future)
                .await
                .error_fields(),
            ["arrived_at"]
        );
        let mut no_zone = attendance("F-2", json!({"nhs_number": "9434765919"}));
        no_zone["arrived_at"] = json!("2026-11-20 22:15");
        assert_eq!(
            app.post("/v1/attendances", &r.cw_ed, no_zone)
                .await
                .error_fields(),
            ["arrived_at"]
        );
        let mut kind = attendance("F-3", json!({"nhs_number": "9434765919"}));
        kind["setting_type"] = json!("A&E");
        assert_eq!(
            app.post("/v1/attendances", &r.cw_ed, kind)
                .await
                .error_fields(),
            ["setting_type"]
        );
        // Warrington cannot report an attendance at Sandwell.
        let mut elsewhere = attendance("F-4", json!({"nhs_number": "9434765919"}));
        elsewhere["setting_ods"] = json!("RXK01");
        app.post("/v1/attendances", &r.cw_ed, elsewhere)
            .await
            .problem(403);
        // Only care settings report attendances; only feeds link identifiers.
        app.post(
            "/v1/attendances",
            &r.la,
            attendance("F-5", json!({"nhs_number": "9434765919"})),
        )
        .await
        .problem(403);
        app.post(
            "/v1/mpi/links",
            &r.cw_ed,
            json!({"identifier": {"system": CW_MRN, "value": "1"}, "nhs_number": "9434765919"}),
        )
        .await
        .problem(403);
        app.post(
            "/v1/mpi/resolve",
            &r.cw_ed,
            json!({"patient": {"nhs_number": "9434765919"}}),
        )
        .await
        .problem(403);
        let _ = r.admin;
    }
}

#[tokio::test]
async fn an_admin_sees_how_a_patient_resolves_with_each_candidates_score_parts() {
    for backend in backends() {
        let app = spawn_app(backend).await;
        let r = regions(&app).await;
        let resp = app
            .post("/v1/mpi/resolve", &r.admin, json!({"patient": {"demographics": {"given_name": "Amelia", "family_name": "Smith", "birth_date": "2019-04-03", "postcode": "B1 1AB"}}}))
            .await;
        assert_eq!(resp.status, 200, "{resp:?}");
        let best = &resp.body["candidates"][0];
        assert_eq!(best["nhs_number"], "9434765919");
        let parts: Vec<(&str, &str)> = best["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["field"].as_str().unwrap(),
                    p["agreement"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            parts,
            [
                ("family_name", "exact"),
                ("given_name", "exact"),
                ("birth_date", "day_month_swapped"),
                ("postcode", "sector")
            ]
        );
        let sum: f64 = best["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["weight"].as_f64().unwrap())
            .sum();
        assert!(sum > 0.0 && best["score"].as_f64().unwrap() > 0.5);
    }
}
