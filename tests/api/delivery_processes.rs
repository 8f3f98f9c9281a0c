//! Delivery across process deaths and across instances, with the real `cpis serve` binary: killed with SIGKILL
//! in the middle of delivering hundreds of notifications and started again, nothing is lost and any repeat
//! carries the same `webhook-id` and `Message-ID`; two instances on one database deliver a batch once.

use crate::helpers::*;
use crate::receiver::{start_receiver, Receiver};
use crate::smtp::{start_smtp, SmtpServer};
use diesel::prelude::*;
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

const FLAGGED: usize = 200;

/// What the tests below share: the receivers, and the outbox they are to empty.
struct Outbox {
    app: TestApp,
    smtp: SmtpServer,
    receiver: Receiver,
    /// The SMTP server's port and CA certificate, as `cpis serve` is given them.
    smtp_port: String,
    smtp_ca: String,
}

/// A local SMTP server and webhook receiver (trusting the authority's secret), and an authority with email and
/// webhook endpoints, an ED, and `FLAGGED` attendances of flagged children, written by an in-process server
/// whose deliver job is off: the notifications wait in the outbox.
async fn outbox_full_of_notifications(backend: Backend) -> Outbox {
    let smtp = start_smtp(0).await;
    let receiver = start_receiver();
    let receiver_url = receiver.url.clone();
    let app = spawn_app_with(backend, |s| {
        s.webhook.allow_private_targets = true;
        s.webhook.allow_http = true;
    })
    .await;
    let World { la, care: ed, .. } = app.world().await;
    let put = app
        .put(
            "/v1/organisations/E08000025/delivery",
            &la,
            json!({"email": ["mash@birmingham.example.org"], "webhook": {"url": receiver_url}}),
        )
        .await;
    let secret = put.body["webhook"]["secret"].as_str().unwrap().to_string();
    for i in 0..FLAGGED {
        let nhs = test_nhs_number(1000 + i as u32);
        assert_eq!(
            app.post("/v1/plans", &la, cpp_plan(&format!("P-{i}"), &nhs))
                .await
                .status,
            201
        );
        let att = json!({"attendance_id": format!("A-{i}"), "setting_ods": "RXK01", "setting_type": "ED",
                         "arrived_at": "2026-11-20T22:15:00Z", "patient": {"nhs_number": nhs}});
        let resp = app.post("/v1/attendances", &ed, att).await;
        assert_eq!(
            resp.body["notifications"].as_array().unwrap().len(),
            1,
            "{resp:?}"
        );
    }
    receiver.trust(&secret);
    Outbox {
        app,
        smtp_port: smtp.port.to_string(),
        smtp_ca: smtp.ca_cert.display().to_string(),
        smtp,
        receiver,
    }
}

fn notification_ids(app: &TestApp) -> BTreeSet<String> {
    let db = app.db.db();
    let mut conn = db.get().unwrap();
    use cpis::db::schema::notifications::dsl::*;
    notifications
        .select(id)
        .load::<String>(&mut *conn)
        .unwrap()
        .into_iter()
        .collect()
}

fn statuses(app: &TestApp) -> HashMap<String, i64> {
    let db = app.db.db();
    let mut conn = db.get().unwrap();
    use cpis::db::schema::notifications::dsl::*;
    let rows: Vec<String> = notifications.select(status).load(&mut *conn).unwrap();
    let mut counts = HashMap::new();
    for r in rows {
        *counts.entry(r).or_insert(0) += 1;
    }
    counts
}

impl Outbox {
    /// The environment of a `cpis serve` that delivers to these receivers, its deliver job on `deliver` (cron).
    fn serve_env<'a>(&'a self, deliver: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("CPIS__MAIL__HOST", "localhost"),
            ("CPIS__MAIL__PORT", &self.smtp_port),
            ("CPIS__MAIL__CA_CERT", &self.smtp_ca),
            ("CPIS__MAIL__FROM", "cpis <cpis@cpis.test>"),
            ("CPIS__WEBHOOK__ALLOW_PRIVATE_TARGETS", "true"),
            ("CPIS__WEBHOOK__ALLOW_HTTP", "true"),
            ("CPIS__JOBS__DELIVER", deliver),
            ("CPIS__JOBS__EXPIRE", ""),
            ("CPIS__JOBS__PURGE", ""),
            ("CPIS__JOBS__REMATCH", ""),
            ("CPIS__DELIVERY__CONCURRENCY", "4"),
            ("CPIS__DELIVERY__BATCH_SIZE", "20"),
            ("CPIS__DELIVERY__LEASE_SECS", "5"),
            ("CPIS__DELIVERY__RETRY_SCHEDULE", "0s,1s,1s,1s,1s,1s,1s,1s"),
        ]
    }
}

/// Every second: the schedule of the tests that kill and share instances.
const EVERY_SECOND: &str = "*/1 * * * * *";

async fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < limit,
            "{what}: not done after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Notifications waiting when the service starts go out at once, not at the schedule's first tick (here, the
/// first of January).
#[tokio::test]
async fn a_backlog_waiting_at_start_is_delivered_without_waiting_for_the_schedule() {
    for backend in backends() {
        let outbox = outbox_full_of_notifications(backend).await;
        let env = outbox.serve_env("0 0 0 1 1 *");
        let mut server = serve(&outbox.app.db, &env);
        // Until every notification is received and recorded as delivered: the record follows the receipt, so
        // stopping at the last receipt could leave its record unwritten (it would be sent again on restart).
        wait_for(Duration::from_secs(60), "the backlog", || {
            outbox.receiver.hooks().len() >= FLAGGED
                && outbox.smtp.mails().len() >= FLAGGED
                && statuses(&outbox.app).get("delivered") == Some(&(FLAGGED as i64))
        })
        .await;
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        assert_eq!(
            statuses(&outbox.app).get("delivered"),
            Some(&(FLAGGED as i64))
        );
        let received: BTreeSet<String> = outbox
            .receiver
            .hooks()
            .iter()
            .map(|h| h.id.clone())
            .collect();
        assert_eq!(received, notification_ids(&outbox.app));
    }
}

#[tokio::test]
async fn a_service_killed_mid_delivery_and_restarted_loses_nothing_and_repeats_only_with_the_same_ids(
) {
    for backend in backends() {
        let outbox = outbox_full_of_notifications(backend).await;
        outbox.receiver.behaviour.lock().unwrap().delay = Duration::from_millis(15);
        let expected = notification_ids(&outbox.app);
        assert_eq!(expected.len(), FLAGGED);

        let env = outbox.serve_env(EVERY_SECOND);
        let mut first = serve(&outbox.app.db, &env);
        wait_for(Duration::from_secs(60), "first deliveries", || {
            outbox.receiver.hooks().len() >= 40
        })
        .await;
        first.child.kill().unwrap(); // SIGKILL: no chance to finish or clean up
        first.child.wait().unwrap();
        let at_kill = outbox.receiver.hooks().len();
        assert!(
            at_kill < FLAGGED,
            "the kill came too late to test anything ({at_kill} delivered)"
        );

        let mut second = serve(&outbox.app.db, &env);
        let started = Instant::now();
        while statuses(&outbox.app).get("delivered") != Some(&(FLAGGED as i64)) {
            if started.elapsed() > Duration::from_secs(120) {
                let log = second.log.lock().unwrap().clone();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "not all delivered after the restart: {:?}\n{}",
                    statuses(&outbox.app),
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        second.child.kill().unwrap();
        second.child.wait().unwrap();

        let hooks = outbox.receiver.hooks();
        let received: BTreeSet<String> = hooks.iter().map(|h| h.id.clone()).collect();
        assert_eq!(received, expected, "every notification reached the webhook");
        for h in &hooks {
            assert_eq!(
                h.body["data"]["notification_id"],
                h.id.as_str(),
                "a repeat carries its notification's webhook-id"
            );
            assert_eq!(h.verified_with.len(), 1);
        }
        let mails = outbox.smtp.mails();
        let message_ids: BTreeSet<String> = mails
            .iter()
            .map(|m| {
                assert!(
                    m.header("message-id").unwrap().ends_with("@cpis.test>"),
                    "the Message-ID is in the sender's domain"
                );
                m.notification_id().unwrap()
            })
            .collect();
        assert_eq!(
            message_ids, expected,
            "every notification reached the mailbox, each under its own Message-ID"
        );
        println!(
            "{backend:?}: killed after {at_kill} webhooks; {} webhook requests and {} emails for {FLAGGED} notifications",
            hooks.len(),
            mails.len()
        );
    }
}

#[tokio::test]
async fn two_instances_on_one_database_deliver_a_batch_once() {
    for backend in backends() {
        let outbox = outbox_full_of_notifications(backend).await;
        let env = outbox.serve_env(EVERY_SECOND);
        let mut a = serve(&outbox.app.db, &env);
        let mut b = serve(&outbox.app.db, &env);
        wait_for(
            Duration::from_secs(120),
            "all delivered by two instances",
            || statuses(&outbox.app).get("delivered") == Some(&(FLAGGED as i64)),
        )
        .await;
        // Give a straggler the chance to send a duplicate before counting.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for p in [&mut a, &mut b] {
            p.child.kill().unwrap();
            p.child.wait().unwrap();
        }
        let hooks = outbox.receiver.hooks();
        let distinct: BTreeSet<String> = hooks.iter().map(|h| h.id.clone()).collect();
        assert_eq!(distinct, notification_ids(&outbox.app));
        assert_eq!(hooks.len(), FLAGGED, "no notification was sent twice");
        assert_eq!(
            outbox.smtp.mails().len(),
            FLAGGED,
            "no email was sent twice"
        );
    }
}
