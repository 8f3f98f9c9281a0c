//! Notifications end to end: the outbox written with the attendance or check, delivery by email through a real
//! SMTP server that requires STARTTLS and by webhook to a real receiver that checks signatures, retries, dead
//! letters, 410, and the delivery endpoint API.

use crate::helpers::*;
use crate::receiver::{start_receiver, Receiver};
use crate::smtp::{start_smtp, SmtpServer};
use cpis::config::{MailTls, Settings};
use cpis::startup::AppState;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD: &str = "9434765919";

pub struct Setup {
    pub app: TestApp,
    pub settings: Settings,
    pub la: String,
    pub other_la: String,
    pub ed: String,
    pub webhook_secret: String,
}

pub fn with_outbound(
    s: &mut Settings,
    smtp_port: u16,
    ca_cert: &std::path::Path,
    schedule: &[&str],
) {
    s.mail.host = "localhost".into();
    s.mail.port = smtp_port;
    s.mail.tls = MailTls::Starttls;
    s.mail.ca_cert = Some(ca_cert.to_path_buf());
    s.mail.from = "cpis <cpis@cpis.test>".into();
    s.mail.fallback_address = Some("cpis-operations@cpis.test".into());
    s.mail.timeout_secs = 3;
    s.webhook.allow_private_targets = true;
    s.webhook.allow_http = true;
    s.webhook.timeout_secs = 3;
    s.delivery.retry_schedule = schedule.iter().map(|d| d.to_string()).collect();
}

/// Birmingham (webhook and email) and Coventry (email) as authorities, an ED, and a plan for one child at
/// Birmingham.
pub async fn setup(
    backend: Backend,
    smtp: &SmtpServer,
    receiver: &Receiver,
    schedule: &[&str],
) -> Setup {
    setup_on(backend, smtp.port, &smtp.ca_cert, receiver, schedule).await
}

pub async fn setup_on(
    backend: Backend,
    port: u16,
    ca: &std::path::Path,
    receiver: &Receiver,
    schedule: &[&str],
) -> Setup {
    let ca = ca.to_path_buf();
    let schedule: Vec<String> = schedule.iter().map(|s| s.to_string()).collect();
    let app = spawn_app_with(backend, |s| {
        with_outbound(
            s,
            port,
            &ca,
            &schedule.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    })
    .await;
    let mut settings = app.db.settings();
    with_outbound(
        &mut settings,
        port,
        &ca,
        &schedule.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let World {
        la,
        other_la,
        care: ed,
        ..
    } = app.world().await;
    let put = app
        .request(
            reqwest::Method::PUT,
            "/v1/organisations/E08000025/delivery",
            Some(&la),
            Some(
                json!({"email": ["mash@birmingham.example.org"], "webhook": {"url": receiver.url}}),
            ),
        )
        .await;
    assert_eq!(put.status, 200, "{put:?}");
    let webhook_secret = put.body["webhook"]["secret"]
        .as_str()
        .expect("a generated secret, shown once")
        .to_string();
    receiver.trust(&webhook_secret);
    let put = app
        .request(
            reqwest::Method::PUT,
            "/v1/organisations/E08000026/delivery",
            Some(&other_la),
            Some(json!({"email": ["mash@coventry.example.org"]})),
        )
        .await;
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(
        app.post("/v1/plans", &la, cpp_plan("BCC-1", CHILD))
            .await
            .status,
        201
    );
    Setup {
        app,
        settings,
        la,
        other_la,
        ed,
        webhook_secret,
    }
}

/// An `AppState` on the test's database, as a second process would have, to run jobs from the test.
pub fn state(settings: &Settings) -> AppState {
    AppState::new(settings.clone(), Arc::new(cpis::clock::SystemClock)).unwrap()
}

/// Runs `deliver` ticks until `done` holds (or fails the test after `limit`).
pub async fn deliver_until(state: &AppState, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    loop {
        cpis::jobs::run_now(state, "deliver").await.unwrap();
        if done() {
            return;
        }
        assert!(started.elapsed() < limit, "not done after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn attendance(id: &str, setting_type: &str) -> Value {
    json!({"attendance_id": id, "setting_ods": "RXK01", "setting_type": setting_type, "arrived_at": "2026-11-20T22:15:00Z",
           "patient": {"nhs_number": CHILD}})
}

async fn notification(s: &Setup, id: &str) -> Value {
    let resp = s.app.get(&format!("/v1/notifications/{id}"), &s.la).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    resp.body
}

#[tokio::test]
async fn a_flagged_attendance_reaches_the_right_authority_by_signed_webhook_and_starttls_email() {
    for backend in backends() {
        let smtp = start_smtp(0).await;
        let receiver = start_receiver();
        let s = setup(backend, &smtp, &receiver, &["0s", "1s"]).await;
        let resp = s
            .app
            .post("/v1/attendances", &s.ed, attendance("ATT-1", "ED"))
            .await;
        assert_eq!(resp.status, 201, "{resp:?}");
        let ids: Vec<String> = resp.body["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "one notification per responsible authority: {resp:?}"
        );
        let id = ids[0].clone();

        let st = state(&s.settings);
        deliver_until(&st, Duration::from_secs(20), || {
            receiver.hooks().len() == 1 && smtp.mails().len() == 1
        })
        .await;

        let hook = &receiver.hooks()[0];
        assert_eq!(hook.id, id);
        assert_eq!(
            hook.verified_with,
            std::slice::from_ref(&s.webhook_secret),
            "signature checked independently"
        );
        assert!((chrono::Utc::now().timestamp() - hook.timestamp).abs() < 60);
        let data = &hook.body["data"];
        assert_eq!(hook.body["type"], "attendance.flagged");
        assert_eq!(
            data["setting"]["name"],
            "Sandwell General Emergency Department"
        );
        assert_eq!(data["setting"]["type"], "ED");
        assert_eq!(data["occurred_at"], "2026-11-20T22:15:00.000000Z");
        assert_eq!(data["child"]["nhs_number"], CHILD);
        assert_eq!(data["child"]["initials"], "A.S.");
        assert_eq!(data["plans"][0]["plan_type"], "CPP");
        assert_eq!(data["plans"][0]["local_reference"], "BCC-1");
        assert!(data["link"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/v1/notifications/{id}")));

        let mail = &smtp.mails()[0];
        assert!(mail.over_tls, "mail must travel over STARTTLS");
        assert_eq!(mail.from, "cpis@cpis.test");
        assert_eq!(mail.to, ["mash@birmingham.example.org"]);
        let subject = mail.header("subject").unwrap();
        for secret in [CHILD, "943 476 5919", "A.S.", "Amelia", "Smith"] {
            assert!(!subject.contains(secret), "{secret} in subject {subject}");
        }
        assert_eq!(
            mail.header("message-id").unwrap(),
            format!("<{id}@cpis.test>")
        );
        let body = mail.body();
        for part in [
            "Sandwell General Emergency Department",
            "ED",
            "2026-11-20T22:15",
            "CPP",
            "A.S.",
            CHILD,
            &format!("/v1/notifications/{id}"),
        ] {
            assert!(
                body.contains(part),
                "{part} missing from the email body:\n{body}"
            );
        }
        assert!(
            !body.contains("Amelia") && !body.contains("Smith"),
            "names in the body:\n{body}"
        );

        let n = notification(&s, &id).await;
        assert_eq!(n["status"], "delivered");
        let outcomes: Vec<(&str, &str)> = n["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["channel"].as_str().unwrap(),
                    a["outcome"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(outcomes.len(), 2);
        assert!(
            outcomes.contains(&("email", "delivered"))
                && outcomes.contains(&("webhook", "delivered"))
        );
        // Coventry has no plan for this child: it was told nothing and cannot read Birmingham's notification.
        assert!(smtp
            .mails()
            .iter()
            .all(|m| !m.to.contains(&"mash@coventry.example.org".to_string())));
        s.app
            .get(&format!("/v1/notifications/{id}"), &s.other_la)
            .await
            .problem(404);
        let theirs = s.app.get("/v1/notifications", &s.other_la).await;
        assert_eq!(theirs.body["items"], json!([]));
    }
}

#[tokio::test]
async fn a_scheduled_check_sends_nothing_and_a_check_of_the_same_visit_is_not_notified_twice() {
    for backend in backends() {
        let smtp = start_smtp(0).await;
        let receiver = start_receiver();
        let s = setup(backend, &smtp, &receiver, &["0s"]).await;
        let scheduled = s
            .app
            .post(
                "/v1/flag-checks",
                &s.ed,
                json!({"patient": {"nhs_number": CHILD}, "access": "scheduled"}),
            )
            .await;
        assert_eq!(scheduled.body["flags"][0]["plan_type"], "CPP");
        let list = s.app.get("/v1/notifications", &s.la).await;
        assert_eq!(list.body["items"], json!([]), "a scheduled check is silent");

        let check = s
            .app
            .post(
                "/v1/flag-checks",
                &s.ed,
                json!({"patient": {"nhs_number": CHILD}, "setting_type": "ED"}),
            )
            .await;
        assert_eq!(check.status, 200);
        let list = s.app.get("/v1/notifications", &s.la).await;
        assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
        assert_eq!(list.body["items"][0]["event"], "flag.accessed");
        // The attendance of the same visit, within the window, joins that notification.
        let mut same_visit = attendance("ATT-2", "ED");
        same_visit["arrived_at"] = json!(chrono::Utc::now().to_rfc3339());
        let att = s.app.post("/v1/attendances", &s.ed, same_visit).await;
        assert_eq!(
            att.body["notifications"],
            json!([list.body["items"][0]["id"]]),
            "{att:?}"
        );
        assert_eq!(
            s.app.get("/v1/notifications", &s.la).await.body["items"]
                .as_array()
                .unwrap()
                .len(),
            1
        );

        let st = state(&s.settings);
        deliver_until(&st, Duration::from_secs(20), || receiver.hooks().len() == 1).await;
        cpis::jobs::run_now(&st, "deliver").await.unwrap();
        assert_eq!(receiver.hooks().len(), 1);
        assert_eq!(receiver.hooks()[0].body["type"], "flag.accessed");
    }
}

#[tokio::test]
async fn checks_of_one_visit_at_the_same_moment_make_one_notification_and_every_access_is_recorded()
{
    for backend in backends() {
        let smtp = start_smtp(0).await;
        let receiver = start_receiver();
        let s = setup(backend, &smtp, &receiver, &["0s"]).await;
        let body = json!({"patient": {"nhs_number": CHILD}, "setting_type": "ED"});
        // Sent together, they are written together (one group commit, or a few).
        let checks = futures_util::future::join_all(
            (0..16).map(|_| s.app.post("/v1/flag-checks", &s.ed, body.clone())),
        )
        .await;
        assert!(checks.iter().all(|c| c.status == 200), "{checks:?}");
        let list = s.app.get("/v1/notifications", &s.la).await;
        let items = list.body["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "one visit, one notification: {list:?}");
        assert_eq!(items[0]["event"], "flag.accessed");
        let next = s.app.post("/v1/flag-checks", &s.ed, body).await;
        assert_eq!(
            next.body["recent_accesses"].as_array().unwrap().len(),
            16,
            "every check of the visit is in the child's recent accesses: {next:?}"
        );
        let st = state(&s.settings);
        deliver_until(&st, Duration::from_secs(20), || {
            receiver.hooks().len() == 1 && smtp.mails().len() == 1
        })
        .await;
        cpis::jobs::run_now(&st, "deliver").await.unwrap();
        assert_eq!(
            (receiver.hooks().len(), smtp.mails().len()),
            (1, 1),
            "one webhook and one email"
        );
    }
}

#[tokio::test]
async fn copies_of_one_attendance_sent_at_once_are_stored_once_and_notified_once() {
    for backend in backends() {
        let smtp = start_smtp(0).await;
        let receiver = start_receiver();
        let s = setup(backend, &smtp, &receiver, &["0s"]).await;
        // A retrying sender's copies, written together (one group commit, or a few): the copies after the first
        // must find it, whether it is committed or still waiting in the same batch.
        let copies = futures_util::future::join_all((0..12).map(|_| {
            s.app
                .post("/v1/attendances", &s.ed, attendance("ATT-R", "ED"))
        }))
        .await;
        let created: Vec<_> = copies.iter().filter(|c| c.status == 201).collect();
        assert_eq!(created.len(), 1, "one copy creates it: {copies:?}");
        assert!(
            copies.iter().all(|c| c.status == 201 || c.status == 200),
            "the others are answered as repeats: {copies:?}"
        );
        let id = &created[0].body["id"];
        assert!(copies.iter().all(|c| &c.body["id"] == id), "{copies:?}");
        assert!(
            copies
                .iter()
                .all(|c| c.body["notifications"] == created[0].body["notifications"]),
            "every copy names the one notification: {copies:?}"
        );
        let list = s.app.get("/v1/notifications", &s.la).await;
        assert_eq!(
            list.body["items"].as_array().unwrap().len(),
            1,
            "one attendance, one notification: {list:?}"
        );
        let check = s
            .app
            .post(
                "/v1/flag-checks",
                &s.ed,
                json!({"patient": {"nhs_number": CHILD}, "access": "scheduled"}),
            )
            .await;
        assert_eq!(
            check.body["recent_accesses"].as_array().unwrap().len(),
            1,
            "one attendance in the child's recent accesses: {check:?}"
        );
        assert_eq!(s.app.stored_attendances(), 1);
        // The trail shows one attendance and eleven repeats: a copy's own event goes with its other rows.
        let mut outcomes = s.app.audit_outcomes(CHILD, "attendance.create").await;
        outcomes.sort();
        assert_eq!(
            outcomes,
            [&["flagged"][..], &["repeat"; 11]].concat(),
            "{backend:?}"
        );
    }
}

#[tokio::test]
async fn a_failing_webhook_is_retried_with_the_same_webhook_id_until_delivered() {
    for backend in backends() {
        let smtp = start_smtp(0).await;
        let receiver = start_receiver();
        receiver.answer(&[500, 503], 200);
        let s = setup(
            backend,
            &smtp,
            &receiver,
            &["0s", "200ms", "200ms", "200ms"],
        )
        .await;
        let resp = s
            .app
            .post("/v1/attendances", &s.ed, attendance("ATT-3", "ED"))
            .await;
        let id = resp.body["notifications"][0].as_str().unwrap().to_string();
        let st = state(&s.settings);
        deliver_until(&st, Duration::from_secs(20), || receiver.hooks().len() >= 3).await;
        let hooks = receiver.hooks();
        assert_eq!(hooks.len(), 3);
        assert!(
            hooks
                .iter()
                .all(|h| h.id == id && h.verified_with.len() == 1),
            "the same webhook-id on every retry"
        );
        let n = notification(&s, &id).await;
        assert_eq!(n["status"], "delivered", "{n}");
        let webhook_attempts: Vec<Value> = n["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["channel"] == "webhook")
            .cloned()
            .collect();
        let codes: Vec<i64> = webhook_attempts
            .iter()
            .map(|a| a["response_code"].as_i64().unwrap())
            .collect();
        assert_eq!(codes, [500, 503, 200]);
        assert!(webhook_attempts[0]["error"]
            .as_str()
            .unwrap()
            .contains("500"));
    }
}

#[tokio::test]
async fn one_tick_records_each_of_many_outcomes_against_its_own_notification() {
    for backend in backends() {
        let smtp = start_smtp(0).await;
        let receiver = start_receiver();
        // Half the webhooks of the tick fail, in whatever order they arrive.
        receiver.answer(&[500, 204, 500, 204, 500, 204, 500, 204], 204);
        let s = setup(backend, &smtp, &receiver, &["0s", "1h"]).await;
        let mut ids = Vec::new();
        for day in 1..=8 {
            let mut visit = attendance(&format!("ATT-B{day}"), "ED");
            visit["arrived_at"] = json!(format!("2026-11-{:02}T10:00:00Z", day * 2));
            let resp = s.app.post("/v1/attendances", &s.ed, visit).await;
            assert_eq!(resp.status, 201, "{resp:?}");
            ids.push(resp.body["notifications"][0].as_str().unwrap().to_string());
        }
        let st = state(&s.settings);
        let report: Value =
            serde_json::from_str(&cpis::jobs::run_now(&st, "deliver").await.unwrap()).unwrap();
        assert_eq!(report["claimed"], 16, "{report}");
        assert_eq!(report["delivered"], 12, "8 emails and 4 webhooks: {report}");
        assert_eq!(report["retrying"], 4, "{report}");
        let hooks = receiver.hooks();
        assert_eq!(hooks.len(), 8);
        for id in &ids {
            let answered = hooks
                .iter()
                .find(|h| &h.id == id)
                .expect("a webhook per notification")
                .status;
            let n = notification(&s, id).await;
            let channel = |name: &str| {
                n["deliveries"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|d| d["channel"] == name)
                    .cloned()
                    .unwrap()
            };
            let (webhook, email) = (channel("webhook"), channel("email"));
            assert_eq!(email["status"], "delivered", "{n}");
            assert_eq!(webhook["attempts"], 1, "{n}");
            let attempts = n["attempts"].as_array().unwrap();
            assert_eq!(attempts.len(), 2, "one attempt per channel: {n}");
            let webhook_attempt = attempts.iter().find(|a| a["channel"] == "webhook").unwrap();
            assert_eq!(webhook_attempt["response_code"], answered, "{n}");
            if answered == 204 {
                assert_eq!(webhook["status"], "delivered", "{n}");
                assert_eq!(n["status"], "delivered", "{n}");
            } else {
                assert_eq!(webhook["status"], "pending", "{n}");
                assert!(
                    webhook["last_error"].as_str().unwrap().contains("500"),
                    "{n}"
                );
                assert_eq!(n["status"], "pending", "{n}");
            }
        }
    }
}

/// `count` flagged attendances of one child, two days apart from the `from`th such date on (each its own visit,
/// so each its own notification to Birmingham: a webhook and an email). Answers the notification ids.
async fn visits(s: &Setup, from: i64, count: i64) -> Vec<String> {
    let first = chrono::NaiveDate::from_ymd_opt(2026, 9, 1).unwrap();
    let mut ids = Vec::new();
    for n in from..from + count {
        let day = first + chrono::Duration::days(2 * n);
        let mut visit = attendance(&format!("ATT-V{n}"), "ED");
        visit["arrived_at"] = json!(format!("{day}T10:00:00Z"));
        let resp = s.app.post("/v1/attendances", &s.ed, visit).await;
        assert_eq!(resp.status, 201, "{resp:?}");
        ids.push(resp.body["notifications"][0].as_str().unwrap().to_string());
    }
    ids
}

/// The notifications the SMTP server has been mailed, sorted.
fn mailed(smtp: &SmtpServer) -> Vec<String> {
    let mut ids: Vec<String> = smtp
        .mails()
        .iter()
        .filter_map(|m| m.notification_id())
        .collect();
    ids.sort();
    ids
}

/// Asserts that a server never had more than `limit` connections (or requests) at once, nor accepted more in all.
fn at_most(limit: usize, most_at_once: &AtomicUsize, accepted: &AtomicUsize, what: &str) {
    let (most, all) = (
        most_at_once.load(Ordering::SeqCst),
        accepted.load(Ordering::SeqCst),
    );
    assert!(
        (1..=limit).contains(&most),
        "at most {limit} {what} at once, {most} were"
    );
    assert!(
        all <= limit,
        "{what} over the {limit} connections kept open, not {all} connections"
    );
}

/// The deliverer sends email over no more SMTP sessions than `mail.max_connections`, and webhooks to one
/// receiver over no more connections than `webhook.max_connections`, and keeps them open for the next messages:
/// a relay or an authority's receiver is not flooded with connections (each with a TLS handshake) when a backlog
/// goes out, and every message after a connection's first reuses it.
#[tokio::test]
async fn a_backlog_goes_out_over_at_most_the_configured_connections_kept_open_between_messages() {
    for backend in backends() {
        let smtp = start_smtp(0).await;
        let receiver = start_receiver();
        // A receiver that takes a moment over each webhook, so that sends would pile up on it.
        receiver.behaviour.lock().unwrap().delay = Duration::from_millis(20);
        let s = setup(backend, &smtp, &receiver, &["0s", "1h"]).await;
        let mut first = visits(&s, 0, 12).await;
        let mut settings = s.settings.clone();
        settings.mail.max_connections = 2;
        settings.webhook.max_connections = 3;
        let st = state(&settings);
        let report: Value =
            serde_json::from_str(&cpis::jobs::run_now(&st, "deliver").await.unwrap()).unwrap();
        assert_eq!(
            report["delivered"], 24,
            "12 emails and 12 webhooks: {report}"
        );
        // More later, in another tick: the same connections carry it.
        let mut second = visits(&s, 12, 6).await;
        let report: Value =
            serde_json::from_str(&cpis::jobs::run_now(&st, "deliver").await.unwrap()).unwrap();
        assert_eq!(report["delivered"], 12, "{report}");

        first.append(&mut second);
        first.sort();
        assert_eq!(mailed(&smtp), first, "each notification mailed once");
        assert!(smtp.mails().iter().all(|m| m.over_tls));
        let mut hooked: Vec<String> = receiver.hooks().iter().map(|h| h.id.clone()).collect();
        hooked.sort();
        assert_eq!(hooked, first, "each notification posted once");

        let c = &smtp.connections;
        at_most(2, &c.most_open, &c.accepted, "SMTP sessions");
        let load = &receiver.load;
        at_most(3, &load.most_in_hand, &load.connections, "webhooks");
    }
}

/// Mail to a relay that speaks TLS from the first byte (`mail.tls = "tls"`, port 465) goes out as over STARTTLS.
#[tokio::test]
async fn mail_goes_out_over_implicit_tls() {
    let smtp = crate::smtp::start_smtp_implicit_tls().await;
    let receiver = start_receiver();
    let s = setup(Backend::Sqlite, &smtp, &receiver, &["0s", "1h"]).await;
    let ids = visits(&s, 0, 3).await;
    let mut settings = s.settings.clone();
    settings.mail.tls = MailTls::Tls;
    let st = state(&settings);
    let report: Value =
        serde_json::from_str(&cpis::jobs::run_now(&st, "deliver").await.unwrap()).unwrap();
    assert_eq!(report["delivered"], 6, "{report}");
    assert!(smtp.mails().iter().all(|m| m.over_tls));
    let mut ids = ids;
    ids.sort();
    assert_eq!(mailed(&smtp), ids);

    // A relay whose certificate the service does not trust gets nothing.
    let stranger = crate::smtp::start_smtp_implicit_tls().await;
    let mut settings = s.settings.clone();
    settings.mail.tls = MailTls::Tls;
    settings.mail.port = stranger.port;
    let st = state(&settings);
    visits(&s, 3, 1).await;
    let report: Value =
        serde_json::from_str(&cpis::jobs::run_now(&st, "deliver").await.unwrap()).unwrap();
    assert_eq!(
        report["retrying"], 1,
        "the email fails and waits for its retry: {report}"
    );
    assert!(stranger.mails().is_empty());
}

/// A tick starts no send so late that it could outlive the tick's lease (after which another instance may take
/// the same delivery and send it too): what a slow relay leaves unstarted by then is handed back unsent, with
/// no attempt counted, and goes out with the next tick.
#[tokio::test]
async fn a_tick_hands_back_unsent_what_it_cannot_start_before_its_lease_ends() {
    for backend in backends() {
        let smtp = start_smtp(0).await;
        let receiver = start_receiver();
        let s = setup(backend, &smtp, &receiver, &["0s", "1h"]).await;
        let ids = visits(&s, 0, 6).await;
        let mut settings = s.settings.clone();
        // One session, a relay taking 1.5 s per message, and a 5 s lease: with sends given up to 3 s (the
        // webhook's timeout; an email's whole send gets twice the 1 s of `mail.timeout_secs`), a send may start
        // up to 2.5 s into the tick. Two emails start by then; the third would start at about 3 s.
        settings.mail.max_connections = 1;
        settings.mail.timeout_secs = 1;
        settings.delivery.lease_secs = 5;
        *smtp.delay.lock().unwrap() = Duration::from_millis(1500);
        let st = state(&settings);
        let report = cpis::notify::deliver::tick(&st).await.unwrap();
        assert_eq!(report.claimed, 12, "{report:?}");
        assert_eq!(
            report.delivered,
            6 + 2,
            "every webhook and two emails: {report:?}"
        );
        assert_eq!(report.released, 4, "{report:?}");
        assert_eq!(smtp.mails().len(), 2);

        let sent = mailed(&smtp);
        for id in ids.iter().filter(|id| !sent.contains(id)) {
            let n = notification(&s, id).await;
            let email = n["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["channel"] == "email")
                .unwrap()
                .clone();
            assert_eq!(email["status"], "pending", "{n}");
            assert_eq!(email["attempts"], 0, "handed back without an attempt: {n}");
            let attempts = n["attempts"].as_array().unwrap();
            assert!(
                attempts.iter().all(|a| a["channel"] != "email"),
                "no email attempt recorded: {n}"
            );
        }

        // The relay is quick again: the next tick takes what was handed back at once.
        *smtp.delay.lock().unwrap() = Duration::ZERO;
        let report = cpis::notify::deliver::tick(&st).await.unwrap();
        assert_eq!(report.claimed, 4, "{report:?}");
        assert_eq!(report.delivered, 4, "{report:?}");
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(mailed(&smtp), expected, "each email sent once");
    }
}

#[tokio::test]
async fn an_smtp_server_that_is_down_then_up_gets_the_mail_after_a_retry() {
    for backend in backends() {
        let receiver = start_receiver();
        // Reserve a port for the mail server, then leave it closed for now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let placeholder = start_smtp(0).await; // provides a CA file; its own port is not used
        let s = setup_on(
            backend,
            port,
            &placeholder.ca_cert,
            &receiver,
            &["0s", "300ms", "300ms", "300ms", "300ms"],
        )
        .await;
        let resp = s
            .app
            .post("/v1/attendances", &s.ed, attendance("ATT-4", "ED"))
            .await;
        let id = resp.body["notifications"][0].as_str().unwrap().to_string();
        let st = state(&s.settings);
        cpis::jobs::run_now(&st, "deliver").await.unwrap();
        let n = notification(&s, &id).await;
        let email = n["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["channel"] == "email")
            .unwrap()
            .clone();
        assert_eq!(email["status"], "pending");
        assert_eq!(email["attempts"], 1);
        assert!(email["last_error"].is_string());

        // The mail server comes up (with the CA the service trusts) and the retry gets through.
        let up = crate::smtp::start_smtp_like(port, &placeholder).await;
        deliver_until(&st, Duration::from_secs(20), || !up.mails().is_empty()).await;
        assert_eq!(
            up.mails()[0].header("message-id").unwrap(),
            format!("<{id}@cpis.test>")
        );
        let n = notification(&s, &id).await;
        assert_eq!(n["status"], "delivered", "{n}");
    }
}

#[tokio::test]
async fn a_webhook_that_always_fails_is_dead_after_the_schedule_and_the_fallback_is_told() {
    for backend in backends() {
        let smtp = start_smtp(0).await;
        let receiver = start_receiver();
        receiver.answer(&[], 500);
        let s = setup(backend, &smtp, &receiver, &["0s", "100ms", "100ms"]).await;
        let resp = s
            .app
            .post("/v1/attendances", &s.ed, attendance("ATT-5", "ED"))
            .await;
        let id = resp.body["notifications"][0].as_str().unwrap().to_string();
        let st = state(&s.settings);
        let fallback = |smtp: &SmtpServer| {
            smtp.mails()
                .into_iter()
                .find(|m| m.to == ["cpis-operations@cpis.test"])
        };
        deliver_until(&st, Duration::from_secs(20), || fallback(&smtp).is_some()).await;
        assert_eq!(
            receiver.hooks().len(),
            3,
            "every attempt of the schedule, then no more"
        );
        let n = notification(&s, &id).await;
        assert_eq!(n["status"], "dead", "{n}");
        let channels: Vec<(String, String)> = n["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["channel"].as_str().unwrap().into(),
                    d["status"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert!(
            channels.contains(&("email".into(), "delivered".into())),
            "the channel that delivered stays recorded: {channels:?}"
        );
        assert!(channels.contains(&("webhook".into(), "dead".into())));
        let mail = fallback(&smtp).unwrap();
        assert!(mail
            .header("subject")
            .unwrap()
            .contains("could not be delivered"));
        assert!(mail.body().contains(&id));
        assert!(
            !mail.body().contains(CHILD),
            "the fallback needs no child's identity"
        );
        let dead = s.app.get("/v1/notifications?status=dead", &s.la).await;
        assert_eq!(dead.body["items"][0]["id"], id.as_str());

        // Redelivery queues it again; a now-healthy receiver gets it with the same id.
        receiver.answer(&[], 204);
        let again = s
            .app
            .post(
                &format!("/v1/notifications/{id}/redeliver"),
                &s.la,
                json!({}),
            )
            .await;
        assert_eq!(again.status, 202, "{again:?}");
        deliver_until(&st, Duration::from_secs(20), || receiver.hooks().len() == 4).await;
        assert_eq!(receiver.hooks()[3].id, id);
    }
}

#[tokio::test]
async fn a_410_disables_the_webhook_endpoint() {
    for backend in backends() {
        let smtp = start_smtp(0).await;
        let receiver = start_receiver();
        receiver.answer(&[410], 204);
        let s = setup(backend, &smtp, &receiver, &["0s", "100ms", "100ms"]).await;
        s.app
            .post("/v1/attendances", &s.ed, attendance("ATT-6", "ED"))
            .await;
        let st = state(&s.settings);
        deliver_until(&st, Duration::from_secs(20), || {
            receiver.hooks().len() == 1 && !smtp.mails().is_empty()
        })
        .await;
        cpis::jobs::run_now(&st, "deliver").await.unwrap();
        assert_eq!(receiver.hooks().len(), 1, "no retry after 410");
        // The next notification has no webhook channel until the authority configures one again.
        let mut later = attendance("ATT-7", "MIU");
        later["arrived_at"] = json!("2026-11-23T10:00:00Z");
        let resp = s.app.post("/v1/attendances", &s.ed, later).await;
        let id = resp.body["notifications"][0].as_str().unwrap().to_string();
        let n = notification(&s, &id).await;
        let channels: Vec<&str> = n["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["channel"].as_str().unwrap())
            .collect();
        assert_eq!(channels, ["email"], "{n}");
    }
}

#[tokio::test]
async fn delivery_endpoints_are_checked_and_secrets_rotate_with_both_signatures_sent() {
    for backend in backends() {
        let smtp = start_smtp(0).await;
        let receiver = start_receiver();
        let s = setup(backend, &smtp, &receiver, &["0s"]).await;
        let bad = s
            .app
            .put(
                &format!("/v1/organisations/{}/delivery", "E08000025"),
                &s.la,
                json!({"email": ["nope"], "webhook": {"url": "ftp://x"}, "events": ["everything"]}),
            )
            .await;
        let mut fields = bad.error_fields();
        fields.sort();
        assert_eq!(fields, ["email[0]", "events[0]", "webhook.url"]);
        s.app
            .put(
                &format!("/v1/organisations/{}/delivery", "E08000025"),
                &s.other_la,
                json!({"email": ["x@evil.example.org"]}),
            )
            .await
            .problem(403);
        s.app
            .put(
                &format!("/v1/organisations/{}/delivery", "RXK01"),
                &s.ed,
                json!({"email": ["x@y.example.org"]}),
            )
            .await
            .problem(403);

        // Without a new secret the current one stays (and is not shown again).
        let same = s
            .app
            .put(
                &format!("/v1/organisations/{}/delivery", "E08000025"),
                &s.la,
                json!({"email": ["mash@birmingham.example.org"], "webhook": {"url": receiver.url}}),
            )
            .await;
        assert_eq!(same.status, 200);
        assert!(same.body["webhook"].get("secret").is_none());
        // A new secret: both old and new sign for a while.
        let new_secret = cpis::notify::webhook::generate_secret();
        let rotated = s
            .app
            .put(
                &format!("/v1/organisations/{}/delivery", "E08000025"),
                &s.la,
                json!({"email": [], "webhook": {"url": receiver.url, "secret": new_secret}}),
            )
            .await;
        assert_eq!(rotated.status, 200, "{rotated:?}");
        receiver.trust(&new_secret);
        s.app
            .post("/v1/attendances", &s.ed, attendance("ATT-8", "ED"))
            .await;
        let st = state(&s.settings);
        deliver_until(&st, Duration::from_secs(20), || receiver.hooks().len() == 1).await;
        let hook = &receiver.hooks()[0];
        assert_eq!(hook.signatures, 2);
        let mut verified = hook.verified_with.clone();
        verified.sort();
        let mut both = vec![s.webhook_secret.clone(), new_secret.clone()];
        both.sort();
        assert_eq!(verified, both);
    }
}

#[tokio::test]
async fn webhook_targets_on_private_addresses_are_refused_unless_allowed() {
    let app = spawn_app(Backend::Sqlite).await;
    app.add_org("E08000025", "Birmingham City Council", "local_authority")
        .await;
    let la = app.key("E08000025", &["social_care"]).await;
    for url in [
        "https://127.0.0.1/hook",
        "https://10.0.0.5/hook",
        "https://169.254.169.254/",
        "https://localhost/hook",
        "http://la.example.org/hook",
    ] {
        let resp = app
            .request(
                reqwest::Method::PUT,
                "/v1/organisations/E08000025/delivery",
                Some(&la),
                Some(json!({"webhook": {"url": url}})),
            )
            .await;
        resp.problem(422);
        assert_eq!(resp.error_fields(), ["webhook.url"], "{url}");
    }
    let ok = app
        .request(
            reqwest::Method::PUT,
            "/v1/organisations/E08000025/delivery",
            Some(&la),
            Some(json!({"webhook": {"url": "https://la.example.org/cpis"}})),
        )
        .await;
    assert_eq!(ok.status, 200);
    assert!(ok.body["webhook"]["secret"]
        .as_str()
        .unwrap()
        .starts_with("whsec_"));
}

#[tokio::test]
async fn a_sensitive_setting_is_notified_without_its_name_by_default() {
    for backend in backends() {
        let smtp = start_smtp(0).await;
        let receiver = start_receiver();
        let s = setup(backend, &smtp, &receiver, &["0s"]).await;
        s.app
            .post("/v1/attendances", &s.ed, attendance("ATT-9", "SARC"))
            .await;
        let st = state(&s.settings);
        deliver_until(&st, Duration::from_secs(20), || {
            receiver.hooks().len() == 1 && smtp.mails().len() == 1
        })
        .await;
        let setting = &receiver.hooks()[0].body["data"]["setting"];
        assert_eq!(setting["type"], "SARC");
        assert_eq!(setting["name"], Value::Null);
        assert_eq!(setting["ods_code"], Value::Null);
        assert!(!smtp.mails()[0].body().contains("Sandwell"));
    }
}

#[tokio::test]
async fn the_deliver_job_is_woken_at_once_when_a_notification_is_written() {
    let smtp = start_smtp(0).await;
    let receiver = start_receiver();
    let (port, ca) = (smtp.port, smtp.ca_cert.clone());
    // A schedule so slow that only the wake-up can explain a prompt delivery.
    let app = spawn_app_with(Backend::Sqlite, |s| {
        with_outbound(s, port, &ca, &["0s"]);
        s.jobs.deliver = "0 0 0 1 1 * 2099".into();
    })
    .await;
    let World { la, care: ed, .. } = app.world().await;
    let put = app
        .request(
            reqwest::Method::PUT,
            "/v1/organisations/E08000025/delivery",
            Some(&la),
            Some(
                json!({"email": ["mash@birmingham.example.org"], "webhook": {"url": receiver.url}}),
            ),
        )
        .await;
    receiver.trust(put.body["webhook"]["secret"].as_str().unwrap());
    app.post("/v1/plans", &la, cpp_plan("BCC-1", CHILD)).await;
    let started = Instant::now();
    app.post("/v1/attendances", &ed, attendance("ATT-W", "ED"))
        .await;
    while receiver.hooks().is_empty() || smtp.mails().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the deliver job was not woken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(receiver.hooks()[0].verified_with.len(), 1);
    let (_, arrived) = receiver.arrivals()[0];
    assert!(
        arrived.duration_since(started) < Duration::from_secs(5),
        "woken, not waiting for a tick"
    );
    let mail = &smtp.mails()[0];
    assert_eq!(
        mail.notification_id().as_deref(),
        Some(receiver.hooks()[0].id.as_str()),
        "the email is the same notification"
    );
    assert!(
        mail.received.duration_since(started) < Duration::from_secs(5),
        "the email went at once too"
    );
}

#[tokio::test]
async fn mail_sent_in_clear_is_refused_by_a_server_that_requires_starttls() {
    let smtp = start_smtp(0).await;
    let receiver = start_receiver();
    let s = setup(Backend::Sqlite, &smtp, &receiver, &["0s", "1h"]).await;
    let mut insecure = s.settings.clone();
    insecure.mail.tls = MailTls::None;
    insecure.mail.allow_insecure = true;
    let resp = s
        .app
        .post("/v1/attendances", &s.ed, attendance("ATT-P", "ED"))
        .await;
    let id = resp.body["notifications"][0].as_str().unwrap().to_string();
    cpis::jobs::run_now(&state(&insecure), "deliver")
        .await
        .unwrap();
    assert!(smtp.mails().is_empty());
    assert!(*smtp.refused_plain.lock().unwrap() >= 1);
    let n = notification(&s, &id).await;
    let email = n["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["channel"] == "email")
        .unwrap()
        .clone();
    assert_eq!(email["status"], "pending");
    assert!(
        email["last_error"].as_str().unwrap().contains("530"),
        "{email}"
    );
}

#[tokio::test]
async fn an_authority_without_an_endpoint_keeps_its_notifications_and_the_fallback_hears_daily() {
    for backend in backends() {
        let smtp = start_smtp(0).await;
        let receiver = start_receiver();
        let s = setup(backend, &smtp, &receiver, &["0s"]).await;
        // Coventry has a plan for another child but no delivery endpoint at all.
        let other = test_nhs_number(77);
        s.app
            .put(
                "/v1/organisations/E08000026/delivery",
                &s.other_la,
                json!({"email": []}),
            )
            .await;
        assert_eq!(
            s.app
                .post("/v1/plans", &s.other_la, cpp_plan("CCC-1", &other))
                .await
                .status,
            201
        );
        let mut body = attendance("ATT-U", "ED");
        body["patient"] = json!({"nhs_number": other});
        let id = s.app.post("/v1/attendances", &s.ed, body).await.body["notifications"][0]
            .as_str()
            .unwrap()
            .to_string();
        let st = state(&s.settings);
        cpis::jobs::run_now(&st, "deliver").await.unwrap();
        cpis::jobs::run_now(&st, "deliver").await.unwrap();
        let alerts: Vec<_> = smtp
            .mails()
            .into_iter()
            .filter(|m| m.to == ["cpis-operations@cpis.test"])
            .collect();
        assert_eq!(alerts.len(), 1, "told once a day, not once a tick");
        assert!(
            alerts[0].body().contains("E08000026: 1 waiting"),
            "{}",
            alerts[0].body()
        );
        let waiting = s
            .app
            .get(&format!("/v1/notifications/{id}"), &s.other_la)
            .await;
        assert_eq!(waiting.body["status"], "pending");
        assert_eq!(waiting.body["deliveries"], json!([]));
        // Once Coventry configures an endpoint, the waiting notification goes out.
        s.app
            .put(
                "/v1/organisations/E08000026/delivery",
                &s.other_la,
                json!({"email": ["mash@coventry.example.org"]}),
            )
            .await;
        deliver_until(&st, Duration::from_secs(20), || {
            smtp.mails()
                .iter()
                .any(|m| m.to == ["mash@coventry.example.org"])
        })
        .await;
    }
}
