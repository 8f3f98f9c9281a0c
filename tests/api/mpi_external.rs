//! The PIXm/PDQm client against a real HTTP server on loopback that answers as a regional MPI would: found,
//! not found (404), unknown identifier domain (400), slow, failing, and not there at all.

use crate::helpers::*;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use cpis::mpi::external::{ExternalMpi, ExternalSettings, NHS_NUMBER_SYSTEM};
use cpis::mpi::{LocalIdentifier, MatchStatus, Method, Mpi, MpiError, PatientQuery, Thresholds};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
struct Fake {
    requests: AtomicUsize,
    failing: AtomicBool,
}

fn outcome(code: &str, text: &str) -> Value {
    json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]})
}

async fn pix(req: HttpRequest, fake: web::Data<Fake>) -> HttpResponse {
    fake.requests.fetch_add(1, Ordering::SeqCst);
    if fake.failing.load(Ordering::SeqCst) {
        return HttpResponse::ServiceUnavailable().json(outcome("transient", "maintenance"));
    }
    let query =
        web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .unwrap();
    assert_eq!(query["targetSystem"], NHS_NUMBER_SYSTEM);
    let (system, value) = query["sourceIdentifier"].split_once('|').unwrap();
    let fhir = |status: actix_web::http::StatusCode, body: Value| {
        HttpResponse::build(status)
            .content_type("application/fhir+json")
            .json(body)
    };
    if system != "https://cw.example.nhs.uk/Id/mrn" {
        return fhir(
            actix_web::http::StatusCode::BAD_REQUEST,
            outcome(
                "code-invalid",
                "sourceIdentifier Assigning Authority not found",
            ),
        );
    }
    match value {
        "CW-1" | "SLOW" => {
            if value == "SLOW" {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            fhir(
                actix_web::http::StatusCode::OK,
                json!({"resourceType": "Parameters", "parameter": [
                    {"name": "targetIdentifier", "valueIdentifier": {"system": NHS_NUMBER_SYSTEM, "value": "9434765919"}},
                    {"name": "targetId", "valueReference": {"reference": "Patient/abc"}}
                ]}),
            )
        }
        _ => fhir(
            actix_web::http::StatusCode::NOT_FOUND,
            outcome("not-found", "sourceIdentifier not found"),
        ),
    }
}

async fn pdq(body: web::Json<Value>, fake: web::Data<Fake>) -> HttpResponse {
    fake.requests.fetch_add(1, Ordering::SeqCst);
    let patient = &body["parameter"][0]["resource"];
    assert_eq!(body["parameter"][0]["name"], "resource");
    let entries = if patient["name"][0]["family"] == "Smith" && patient["birthDate"] == "2019-03-04"
    {
        json!([{
            "resource": {"resourceType": "Patient", "identifier": [{"system": NHS_NUMBER_SYSTEM, "value": "9434765919"}]},
            "search": {"mode": "match", "score": 0.97, "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/match-grade", "valueCode": "certain"}]}
        }, {
            "resource": {"resourceType": "Patient", "identifier": [{"system": NHS_NUMBER_SYSTEM, "value": "9990000018"}]},
            "search": {"mode": "match", "score": 0.2, "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/match-grade", "valueCode": "certainly-not"}]}
        }])
    } else {
        json!([])
    };
    HttpResponse::Ok()
        .content_type("application/fhir+json")
        .json(json!({"resourceType": "Bundle", "type": "searchset", "entry": entries}))
}

/// Starts the fake regional MPI; answers its FHIR base URL.
fn start_fake() -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let data = web::Data::from(fake.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/fhir/Patient/$ihe-pix", web::get().to(pix))
            .route("/fhir/Patient/$match", web::post().to(pdq))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    (format!("http://127.0.0.1:{port}/fhir"), fake)
}

fn client(base_url: &str, timeout_ms: u64, rate: u32) -> ExternalMpi {
    ExternalMpi::new(
        "CW",
        ExternalSettings {
            base_url: base_url.into(),
            timeout: Duration::from_millis(timeout_ms),
            rate_per_second: rate,
            cache_ttl: Duration::from_secs(60),
        },
        Thresholds {
            matched: 0.8,
            possible: 0.5,
        },
    )
    .unwrap()
}

fn by_identifier(system: &str, value: &str) -> PatientQuery {
    PatientQuery {
        identifier: Some(LocalIdentifier {
            system: system.into(),
            value: value.into(),
        }),
        region: Some("CW".into()),
        ..Default::default()
    }
}

const MRN: &str = "https://cw.example.nhs.uk/Id/mrn";

#[tokio::test]
async fn pixm_answers_found_not_found_and_unknown_domain_as_clear_outcomes() {
    let (base, fake) = start_fake();
    let mpi = client(&base, 1000, 50);
    let found = mpi.resolve(&by_identifier(MRN, "CW-1")).await.unwrap();
    assert_eq!(
        (found.status, found.method),
        (MatchStatus::Matched, Method::Identifier)
    );
    assert_eq!(found.nhs_number.as_deref(), Some("9434765919"));

    let missing = mpi.resolve(&by_identifier(MRN, "CW-404")).await.unwrap();
    assert_eq!(missing.status, MatchStatus::None);
    assert_eq!(missing.note, None);

    let unknown = mpi
        .resolve(&by_identifier("urn:other-trust", "X"))
        .await
        .unwrap();
    assert_eq!(unknown.status, MatchStatus::None);
    assert!(unknown
        .note
        .unwrap()
        .contains("Assigning Authority not found"));

    // A repeat within the cache lifetime does not ask again.
    let before = fake.requests.load(Ordering::SeqCst);
    mpi.resolve(&by_identifier(MRN, "CW-1")).await.unwrap();
    assert_eq!(fake.requests.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn pdqm_candidates_are_ranked_and_certainly_not_is_dropped() {
    let (base, _) = start_fake();
    let mpi = client(&base, 1000, 50);
    let query = PatientQuery {
        demographics: Some(cpis::domain::Demographics {
            given_name: Some(cpis::domain::PersonName::parse("Amelia").unwrap()),
            family_name: Some(cpis::domain::PersonName::parse("Smith").unwrap()),
            birth_date: Some(chrono::NaiveDate::from_ymd_opt(2019, 3, 4).unwrap()),
            ..Default::default()
        }),
        region: Some("CW".into()),
        ..Default::default()
    };
    let r = mpi.resolve(&query).await.unwrap();
    assert_eq!(
        (r.status, r.method),
        (MatchStatus::Matched, Method::Demographics)
    );
    assert_eq!(r.nhs_number.as_deref(), Some("9434765919"));
    assert_eq!(r.candidates.len(), 1);
}

#[tokio::test]
async fn a_slow_failing_or_absent_mpi_is_unavailable_not_a_wrong_answer() {
    let (base, fake) = start_fake();
    let slow = client(&base, 300, 50)
        .resolve(&by_identifier(MRN, "SLOW"))
        .await;
    assert!(
        matches!(slow, Err(MpiError::Unavailable(ref m)) if m.contains("timed out")),
        "{slow:?}"
    );

    fake.failing.store(true, Ordering::SeqCst);
    let failing = client(&base, 1000, 50)
        .resolve(&by_identifier(MRN, "CW-1"))
        .await;
    assert!(
        matches!(failing, Err(MpiError::Unavailable(ref m)) if m.contains("503")),
        "{failing:?}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let absent = client(&format!("http://127.0.0.1:{port}/fhir"), 1000, 50)
        .resolve(&by_identifier(MRN, "CW-1"))
        .await;
    assert!(
        matches!(absent, Err(MpiError::Unavailable(_))),
        "{absent:?}"
    );
}

#[tokio::test]
async fn the_rate_limit_spaces_requests_to_the_regions_mpi() {
    let (base, _) = start_fake();
    let mpi = client(&base, 3000, 2);
    let started = std::time::Instant::now();
    for i in 0..5 {
        let _ = mpi
            .resolve(&by_identifier(MRN, &format!("CW-R{i}")))
            .await
            .unwrap();
    }
    // Two at once, then one every half second: five take at least 1.5 s.
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_attendance_is_kept_while_the_regions_mpi_is_down_and_matched_once_it_is_back() {
    for backend in backends() {
        let (base, fake) = start_fake();
        fake.failing.store(true, Ordering::SeqCst);
        let base_for_settings = base.clone();
        let change = move |s: &mut cpis::config::Settings| {
            s.mpi.regions.insert(
                "CW".into(),
                cpis::config::RegionMpiSettings {
                    kind: cpis::config::MpiKind::Pixm,
                    base_url: Some(base_for_settings),
                    timeout_ms: 1000,
                    rate_per_second: 50,
                    cache_secs: 60,
                },
            );
        };
        let app = spawn_app_with(backend, change.clone()).await;
        app.add_org_in(
            "E08000025",
            "Birmingham City Council",
            "local_authority",
            "BSOL",
        )
        .await;
        app.add_org_in("RBT01", "Warrington Hospital ED", "care_setting", "CW")
            .await;
        app.add_org_in("RXK01", "Sandwell General ED", "care_setting", "BSOL")
            .await;
        let la = app.key("E08000025", &["social_care"]).await;
        let cw_ed = app.key("RBT01", &["care_setting"]).await;
        let bsol_ed = app.key("RXK01", &["care_setting"]).await;
        app.post("/v1/plans", &la, cpp_plan("BCC-1", "9434765919"))
            .await;

        let body = json!({"attendance_id": "ATT-DOWN", "setting_ods": "RBT01", "setting_type": "ED", "arrived_at": "2026-11-22T01:00:00Z",
                          "patient": {"identifier": {"system": MRN, "value": "CW-1"}}});
        let resp = app.post("/v1/attendances", &cw_ed, body.clone()).await;
        assert_eq!(resp.status, 201, "{resp:?}");
        assert_eq!(resp.body["match"]["status"], "pending");

        // A job run while it is still down changes nothing and loses nothing.
        let mut settings = app.db.settings();
        change(&mut settings);
        let state =
            cpis::startup::AppState::new(settings, Arc::new(cpis::clock::SystemClock)).unwrap();
        let report = cpis::attendances::rematch(&state, 100).await.unwrap();
        assert_eq!((report.checked, report.still_pending), (1, 1));

        fake.failing.store(false, Ordering::SeqCst);
        let report = cpis::attendances::rematch(&state, 100).await.unwrap();
        assert_eq!((report.resolved, report.flagged), (1, 1), "{report:?}");

        let check = app
            .post(
                "/v1/flag-checks",
                &bsol_ed,
                json!({"patient": {"nhs_number": "9434765919"}}),
            )
            .await;
        assert_eq!(
            check.body["recent_accesses"][0]["setting_ods"], "RBT01",
            "{check:?}"
        );
        let repeat = app.post("/v1/attendances", &cw_ed, body).await;
        assert_eq!(repeat.status, 200);
        assert_eq!(repeat.body["match"]["status"], "matched");
        assert_eq!(repeat.body["flags"][0]["plan_type"], "CPP");
    }
}
