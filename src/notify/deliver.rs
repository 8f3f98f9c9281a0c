//! The `deliver` job: claims due deliveries (one row per notification and channel), sends each by email or
//! webhook, records every attempt, and schedules the next try, or declares the channel dead and tells the
//! fallback address. A crash between sending and recording resends later with the same `webhook-id` and
//! `Message-ID`, so a receiver can recognise the repeat (at-least-once).

use super::backoff;
use super::email::{Mailer, OutgoingEmail};
use super::webhook::{WebhookClient, WebhookOutcome, WebhookRequest};
use super::{
    compose_email, enqueue_exhausted, refresh_statuses, AttemptRow, DeliveryRow, EndpointRow,
    NotificationRow, DEAD, DELIVERED, DELIVERY_EXHAUSTED, EMAIL, PENDING, WEBHOOK,
};
use crate::db::schema::deliveries;
use crate::db::stamp::Stamp;
use crate::db::{claim_deliveries, DbError};
use crate::startup::AppState;
use chrono::NaiveDateTime;
use diesel::prelude::*;
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// The ways out, chosen at start-up.
pub struct Outbound {
    pub mailer: Arc<dyn Mailer>,
    pub webhooks: Arc<dyn WebhookClient>,
    /// Domain of `Message-ID`s.
    pub mail_domain: String,
    /// One permit per SMTP session the mailer's pool keeps (`mail.max_connections`): an email is sent only
    /// while it holds one, so every send finds a session open (after the first few) instead of opening a
    /// connection and a TLS handshake that the pool would close again.
    pub mail_sessions: Arc<tokio::sync::Semaphore>,
    /// The same for webhooks, per receiver (`webhook.max_connections` each).
    pub webhook_sessions: WebhookSessions,
}

/// Permits for requests in flight to each webhook receiver, by origin (scheme, host and port).
pub struct WebhookSessions {
    each: usize,
    by_origin: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl WebhookSessions {
    pub fn new(each: usize) -> Self {
        Self {
            each,
            by_origin: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The permits of `url`'s receiver. A URL that does not parse is refused when sent; it shares one set.
    fn of(&self, url: &str) -> Arc<tokio::sync::Semaphore> {
        let origin = url::Url::parse(url)
            .map(|u| u.origin().ascii_serialization())
            .unwrap_or_default();
        let mut by_origin = self
            .by_origin
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        by_origin
            .entry(origin)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.each)))
            .clone()
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TickReport {
    pub claimed: usize,
    pub delivered: usize,
    pub retrying: usize,
    pub dead: usize,
    /// Claimed channels not sent because the tick ran too close to the end of its lease; handed back at once,
    /// with no attempt counted, for the next tick.
    pub released: usize,
}

/// What one send came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub delivered: bool,
    pub code: Option<u16>,
    pub error: Option<String>,
    pub retry_after: Option<Duration>,
    /// The receiver asked for no more (webhook 410); the endpoint is disabled and the channel ends.
    pub gone: bool,
}

enum Outcome {
    Delivered,
    Retrying,
    Dead,
    Skipped,
}

/// Most finished sends recorded by one write: under load, sends finish faster than one write per send could
/// record them (on PostgreSQL each recording was eight round trips on the one writer connection).
const RECORD_AT_ONCE: usize = 256;

/// A claimed channel with what it needs to be sent.
struct Claim {
    n: NotificationRow,
    d: DeliveryRow,
    endpoint: Option<EndpointRow>,
}

/// What became of a claimed channel: sent (whatever the answer), or handed back unsent.
enum Sending {
    Done(Box<Done>),
    Released(DeliveryRow),
}

/// A send that has finished, waiting to be recorded.
struct Done {
    n: NotificationRow,
    d: DeliveryRow,
    sent: Sent,
    elapsed: Duration,
}

/// One tick: claims a batch, delivers it with bounded concurrency, and records the sends as they finish, those
/// that finish together in one write. A channel whose send has not started by [`start_by`] is handed back
/// unsent. Answers what happened.
pub async fn tick(state: &AppState) -> anyhow::Result<TickReport> {
    let now = state.clock.now_naive();
    // The lease runs from here, before the claim's write, and so does the time a send may still start.
    let claimed_at = Instant::now();
    let lease_secs = state.settings.delivery.lease_secs;
    let lease = now + chrono::Duration::seconds(lease_secs as i64);
    let instance = state.instance_id.clone();
    let batch = state.settings.delivery.batch_size;
    let claimed = state
        .db
        .write(move |conn| Ok::<_, DbError>(claim_deliveries(conn, now, lease, &instance, batch)?))
        .await?;
    let start_by = claimed_at + start_by(&state.settings, Duration::from_secs(lease_secs));
    let mut report = TickReport {
        claimed: claimed.len(),
        ..Default::default()
    };
    if claimed.is_empty() {
        return Ok(report);
    }
    let claims = load(state, claimed).await?;
    let (finished, mut finishing) = tokio::sync::mpsc::unbounded_channel::<Done>();
    let sending = async move {
        futures_util::stream::iter(claims)
            .map(|c| send_claim(state, c, start_by))
            .buffer_unordered(state.settings.delivery.concurrency)
            .fold(Vec::new(), |mut released, sending| {
                match sending {
                    // The receiver lives until every sender is gone, which is after this stream ends.
                    Sending::Done(done) => {
                        let _ = finished.send(*done);
                    }
                    Sending::Released(d) => released.push(d),
                }
                std::future::ready(released)
            })
            .await
    };
    let recording = async {
        let mut outcomes = Vec::new();
        while let Some(first) = finishing.recv().await {
            let mut chunk = vec![first];
            while chunk.len() < RECORD_AT_ONCE {
                match finishing.try_recv() {
                    Ok(done) => chunk.push(done),
                    Err(_) => break,
                }
            }
            let count = chunk.len();
            match record(state, chunk).await {
                Ok(recorded) => outcomes.extend(recorded),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), deliveries = count, "deliveries could not be recorded; their lease will expire and they will be retried")
                }
            }
        }
        outcomes
    };
    let (released, outcomes) = tokio::join!(sending, recording);
    for outcome in outcomes {
        match outcome {
            Outcome::Delivered => report.delivered += 1,
            Outcome::Retrying => report.retrying += 1,
            Outcome::Dead => report.dead += 1,
            Outcome::Skipped => {}
        }
    }
    if !released.is_empty() {
        report.released = released.len();
        match release(state, released).await {
            Ok(()) => tracing::info!(
                released = report.released,
                "deliveries not started before the end of their lease were handed back unsent"
            ),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), deliveries = report.released, "deliveries could not be handed back; their lease will expire and they will be sent then")
            }
        }
    }
    if report.dead > 0 {
        state.wake_deliverer();
    }
    Ok(report)
}

/// How long after its claim a tick may still start a send: the lease less the longest a send may take (an
/// email's whole session, or a webhook request), so that no send outlives the claim and is made again by
/// another instance meanwhile. A lease shorter than twice that keeps its first half for sending.
pub fn start_by(settings: &crate::config::Settings, lease: Duration) -> Duration {
    let longest = settings
        .mail
        .send_limit()
        .max(Duration::from_secs(settings.webhook.timeout_secs));
    lease.saturating_sub(longest).max(lease / 2)
}

/// Hands claimed channels back unsent: their lease ends now and they stay due, with no attempt counted.
async fn release(state: &AppState, rows: Vec<DeliveryRow>) -> anyhow::Result<()> {
    let instance = state.instance_id.clone();
    state
        .db
        .write(move |conn| {
            for channel in [EMAIL, WEBHOOK] {
                let ids: Vec<&str> = rows
                    .iter()
                    .filter(|d| d.channel == channel)
                    .map(|d| d.notification_id.as_str())
                    .collect();
                for ids in ids.chunks(500) {
                    crate::on_backend!(conn, |c| diesel::update(
                        deliveries::table
                            .filter(deliveries::channel.eq(channel))
                            .filter(deliveries::notification_id.eq_any(ids))
                            .filter(deliveries::leased_by.eq(&instance)),
                    )
                    .set((
                        deliveries::lease_until.eq(None::<Stamp>),
                        deliveries::leased_by.eq(None::<String>),
                    ))
                    .execute(c))?;
                }
            }
            Ok::<_, DbError>(())
        })
        .await?;
    Ok(())
}

/// The claimed channels' notifications, delivery rows and endpoints, in one read (three queries).
async fn load(state: &AppState, claimed: Vec<crate::db::Claimed>) -> anyhow::Result<Vec<Claim>> {
    let instance = state.instance_id.clone();
    let claims = state
        .db
        .read(move |conn| {
            let ids: Vec<&str> = claimed.iter().map(|c| c.notification_id.as_str()).collect();
            let notifications: HashMap<String, NotificationRow> =
                NotificationRow::find_many(conn, &ids)?
                    .into_iter()
                    .map(|n| (n.id.clone(), n))
                    .collect();
            let mut rows: HashMap<(String, String), DeliveryRow> =
                crate::on_backend!(conn, |c| deliveries::table
                    .filter(deliveries::notification_id.eq_any(&ids))
                    .select(DeliveryRow::as_select())
                    .load(c))?
                .into_iter()
                .map(|d| ((d.notification_id.clone(), d.channel.clone()), d))
                .collect();
            let orgs: Vec<&str> = notifications.values().map(|n| n.org_ods.as_str()).collect();
            let endpoints: HashMap<String, EndpointRow> = EndpointRow::find_many(conn, &orgs)?
                .into_iter()
                .map(|e| (e.org_ods.clone(), e))
                .collect();
            let mut claims = Vec::with_capacity(claimed.len());
            for c in &claimed {
                let (Some(n), Some(d)) = (
                    notifications.get(&c.notification_id),
                    rows.remove(&(c.notification_id.clone(), c.channel.clone())),
                ) else {
                    continue;
                };
                // Taken over by another instance since (its lease ran out), or already settled.
                if d.status != PENDING || d.leased_by.as_deref() != Some(instance.as_str()) {
                    continue;
                }
                let endpoint = endpoints.get(&n.org_ods).cloned();
                claims.push(Claim {
                    n: n.clone(),
                    d,
                    endpoint,
                });
            }
            Ok::<_, DbError>(claims)
        })
        .await?;
    Ok(claims)
}

async fn send_claim(state: &AppState, claim: Claim, start_by: Instant) -> Sending {
    let Claim { n, d, endpoint } = claim;
    // An email waits here for one of the sessions the mailer keeps open, a webhook for one of its receiver's.
    let _session = match d.channel.as_str() {
        EMAIL => state
            .outbound
            .mail_sessions
            .clone()
            .acquire_owned()
            .await
            .ok(),
        WEBHOOK => {
            let url = endpoint
                .as_ref()
                .and_then(|e| e.webhook_url.as_deref())
                .unwrap_or(&d.target);
            state
                .outbound
                .webhook_sessions
                .of(url)
                .acquire_owned()
                .await
                .ok()
        }
        _ => None,
    };
    if Instant::now() >= start_by {
        return Sending::Released(d);
    }
    let span = tracing::info_span!("delivery", notification = %n.id, channel = %d.channel, attempt = d.attempts + 1);
    let started = Instant::now();
    let sent = send(state, &n, &d, endpoint.as_ref())
        .instrument(span)
        .await;
    let elapsed = started.elapsed();
    Sending::Done(Box::new(Done {
        n,
        d,
        sent,
        elapsed,
    }))
}

async fn send(
    state: &AppState,
    n: &NotificationRow,
    d: &DeliveryRow,
    endpoint: Option<&EndpointRow>,
) -> Sent {
    let now = state.clock.now_naive();
    match d.channel.as_str() {
        EMAIL => {
            let mut email: OutgoingEmail = compose_email(
                n,
                state.settings.mail.include_identifiers,
                &state.outbound.mail_domain,
            );
            email.to = d
                .target
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            match state.outbound.mailer.send(&email).await {
                Ok(()) => Sent {
                    delivered: true,
                    code: Some(250),
                    error: None,
                    retry_after: None,
                    gone: false,
                },
                Err(e) => Sent {
                    delivered: false,
                    code: e.code,
                    error: Some(e.message),
                    retry_after: None,
                    gone: false,
                },
            }
        }
        WEBHOOK => {
            let Some(ep) = endpoint.filter(|e| e.webhook_disabled_at.is_none()) else {
                return Sent {
                    delivered: false,
                    code: None,
                    error: Some("the webhook endpoint is disabled".into()),
                    retry_after: None,
                    gone: true,
                };
            };
            let request = WebhookRequest {
                url: ep.webhook_url.clone().unwrap_or_else(|| d.target.clone()),
                id: n.id.clone(),
                timestamp: state.clock.now().timestamp(),
                body: n.payload.clone().unwrap_or_else(|| "{}".into()),
                secrets: ep.signing_secrets(now),
            };
            match state.outbound.webhooks.post(&request).await {
                WebhookOutcome::Delivered { status } => Sent {
                    delivered: true,
                    code: Some(status),
                    error: None,
                    retry_after: None,
                    gone: false,
                },
                WebhookOutcome::Gone => Sent {
                    delivered: false,
                    code: Some(410),
                    error: Some("the receiver answered 410 Gone; the endpoint is disabled".into()),
                    retry_after: None,
                    gone: true,
                },
                WebhookOutcome::Failed {
                    status,
                    error,
                    retry_after,
                } => Sent {
                    delivered: false,
                    code: status,
                    error: Some(error),
                    retry_after,
                    gone: false,
                },
            }
        }
        other => Sent {
            delivered: false,
            code: None,
            error: Some(format!("unknown channel {other}")),
            retry_after: None,
            gone: true,
        },
    }
}

/// The channel's state after an attempt: delivered, due again at a time, or dead.
pub fn next_state(
    sent: &Sent,
    attempts_done: i32,
    schedule: &[Duration],
    now: NaiveDateTime,
    jitter: f64,
) -> (&'static str, NaiveDateTime) {
    if sent.delivered {
        return (DELIVERED, now);
    }
    if sent.gone {
        return (DEAD, now);
    }
    match backoff::next_delay(schedule, attempts_done as usize, jitter) {
        None => (DEAD, now),
        Some(delay) => {
            let wait = backoff::honour_retry_after(delay, sent.retry_after);
            (
                PENDING,
                now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::days(1)),
            )
        }
    }
}

/// Records finished sends in one write: each channel's new state and its attempt, then each notification's
/// overall status, and a fallback notice for a notification that has just died. A channel whose lease has gone
/// to another instance meanwhile is left to that instance (its attempt is still recorded).
async fn record(state: &AppState, chunk: Vec<Done>) -> anyhow::Result<Vec<Outcome>> {
    let now = state.clock.now_naive();
    let mut changes = Vec::with_capacity(chunk.len());
    for done in chunk {
        let attempts = done.d.attempts + 1;
        let (status, next_at) = next_state(
            &done.sent,
            attempts,
            &state.retry_schedule,
            now,
            backoff::random_jitter(),
        );
        let channel = done.d.channel.as_str();
        if let Some(e) = &done.sent.error {
            tracing::warn!(notification = %done.n.id, channel, attempt = attempts, status, code = ?done.sent.code, error = %e, "delivery attempt failed");
        }
        let outcome_label = if done.sent.delivered {
            "delivered"
        } else {
            "failed"
        };
        state
            .metrics
            .delivery_attempts
            .with_label_values(&[channel, outcome_label])
            .inc();
        state
            .metrics
            .delivery_seconds
            .with_label_values(&[channel])
            .observe(done.elapsed.as_secs_f64());
        changes.push((done, attempts, status, next_at));
    }
    let instance = state.instance_id.clone();
    let settings = state.settings.clone();
    let outcomes = state
        .db
        .write(move |conn| {
            let mut ids: Vec<&str> = changes.iter().map(|(done, ..)| done.n.id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            // Locked (on PostgreSQL) so that two instances recording channels of one notification cannot each
            // miss the other's outcome when its status is recomputed; in id order, so they cannot deadlock.
            let before: HashMap<String, String> = crate::db::lock_notifications(conn, &ids)?.into_iter().collect();
            // The channels still leased to this instance (locked on PostgreSQL): another instance takes a channel
            // over only once its lease has run out, and then records its own outcome.
            let ours: HashSet<(String, String)> =
                crate::db::lock_leased_deliveries(conn, &ids, &instance)?.into_iter().collect();
            let still_ours: Vec<bool> = changes
                .iter()
                .map(|(done, ..)| ours.contains(&(done.d.notification_id.clone(), done.d.channel.clone())))
                .collect();
            // Delivered channels, the usual outcome, change the same way: one update per channel type.
            for channel in [EMAIL, WEBHOOK] {
                let delivered: Vec<&str> = changes
                    .iter()
                    .zip(&still_ours)
                    .filter(|((done, ..), ours)| **ours && done.sent.delivered && done.d.channel == channel)
                    .map(|((done, ..), _)| done.d.notification_id.as_str())
                    .collect();
                if delivered.is_empty() {
                    continue;
                }
                crate::on_backend!(conn, |c| diesel::update(
                    deliveries::table
                        .filter(deliveries::channel.eq(channel))
                        .filter(deliveries::notification_id.eq_any(&delivered)),
                )
                .set((
                    deliveries::status.eq(DELIVERED),
                    deliveries::attempts.eq(deliveries::attempts + 1),
                    deliveries::next_attempt_at.eq(Stamp(now)),
                    deliveries::lease_until.eq(None::<Stamp>),
                    deliveries::leased_by.eq(None::<String>),
                    deliveries::last_error.eq(None::<String>),
                    deliveries::delivered_at.eq(Some(Stamp(now))),
                ))
                .execute(c))?;
            }
            let mut attempts = Vec::with_capacity(changes.len());
            let mut outcomes = Vec::with_capacity(changes.len());
            let mut settled: Vec<&NotificationRow> = Vec::new();
            let mut settled_ids: HashSet<&str> = HashSet::new();
            for ((done, attempt_number, status, next_at), &still_ours) in changes.iter().zip(&still_ours) {
                let Done { n, d, sent, elapsed } = done;
                if still_ours && !sent.delivered {
                    crate::on_backend!(conn, |c| diesel::update(
                        deliveries::table.find((&d.notification_id, &d.channel)),
                    )
                    .set((
                        deliveries::status.eq(*status),
                        deliveries::attempts.eq(attempt_number),
                        deliveries::next_attempt_at.eq(Stamp(*next_at)),
                        deliveries::lease_until.eq(None::<Stamp>),
                        deliveries::leased_by.eq(None::<String>),
                        deliveries::last_error.eq(&sent.error),
                        deliveries::delivered_at.eq(None::<Stamp>),
                    ))
                    .execute(c))?;
                }
                attempts.push(AttemptRow {
                    id: crate::db::new_id(),
                    notification_id: d.notification_id.clone(),
                    channel: d.channel.clone(),
                    at: now.into(),
                    outcome: if sent.delivered { "delivered".into() } else { "failed".into() },
                    response_code: sent.code.map(i32::from),
                    error: sent.error.clone(),
                    duration_ms: elapsed.as_millis() as i64,
                });
                if !still_ours {
                    // The lease ran out and another instance took the row over; it records its own outcome.
                    outcomes.push(Outcome::Skipped);
                    continue;
                }
                if sent.gone && d.channel == super::WEBHOOK {
                    EndpointRow::disable_webhook(conn, &n.org_ods, now)?;
                }
                if settled_ids.insert(n.id.as_str()) {
                    settled.push(n);
                }
                outcomes.push(match *status {
                    DELIVERED => Outcome::Delivered,
                    DEAD => Outcome::Dead,
                    _ => Outcome::Retrying,
                });
            }
            crate::db::insert_delivery_attempts(conn, &attempts)?;
            let settled_ids: Vec<&str> = settled.iter().map(|n| n.id.as_str()).collect();
            let overall = refresh_statuses(conn, &settled_ids, now)?;
            for n in settled {
                let was = before.get(&n.id).map(String::as_str).unwrap_or_default();
                if overall.get(&n.id).copied() == Some(DEAD) && was != DEAD && n.event != DELIVERY_EXHAUSTED {
                    match &settings.mail.fallback_address {
                        Some(address) => {
                            enqueue_exhausted(conn, now, n, address, &settings.server.public_base_url)?;
                        }
                        None => tracing::error!(notification = %n.id, "notification is dead and no mail.fallback_address is configured"),
                    }
                }
            }
            Ok::<_, DbError>(outcomes)
        })
        .await?;
    Ok(outcomes)
}

/// Once a day, tells the fallback address which authorities have notifications waiting because they have no
/// delivery endpoint. Answers how many notifications were waiting (0 when nothing was sent).
pub async fn alert_unconfigured(state: &AppState) -> anyhow::Result<i64> {
    use crate::db::schema::{job_runs, notifications};
    let Some(fallback) = state.settings.mail.fallback_address.clone() else {
        return Ok(0);
    };
    let now = state.clock.now_naive();
    let waiting = state
        .db
        .write(move |conn| {
            let last: Option<NaiveDateTime> = job_runs::table
                .find("unconfigured_alert")
                .select(job_runs::last_tick)
                .first(conn)
                .optional()?;
            if last.is_some_and(|l| l > now - chrono::Duration::hours(24)) {
                return Ok::<_, DbError>(Vec::new());
            }
            let counts: Vec<(String, i64)> = notifications::table
                .filter(notifications::status.eq(PENDING))
                .filter(diesel::dsl::not(diesel::dsl::exists(
                    deliveries::table.filter(deliveries::notification_id.eq(notifications::id)),
                )))
                .group_by(notifications::org_ods)
                .select((notifications::org_ods, diesel::dsl::count_star()))
                .load(conn)?;
            if !counts.is_empty() {
                match last {
                    Some(_) => diesel::update(job_runs::table.find("unconfigured_alert"))
                        .set(job_runs::last_tick.eq(now))
                        .execute(conn)?,
                    None => diesel::insert_into(job_runs::table)
                        .values((
                            job_runs::name.eq("unconfigured_alert"),
                            job_runs::last_tick.eq(now),
                        ))
                        .execute(conn)?,
                };
            }
            Ok(counts)
        })
        .await?;
    if waiting.is_empty() {
        return Ok(0);
    }
    let total: i64 = waiting.iter().map(|(_, n)| n).sum();
    let mut body = String::from(
        "These local authorities have cpis notifications waiting because no delivery endpoint (email or webhook) is \
         configured for them. The notifications are kept and will be delivered once one is set with \
         PUT /v1/organisations/{ods}/delivery.\n\n",
    );
    for (org, n) in &waiting {
        body.push_str(&format!("{org}: {n} waiting\n"));
    }
    let email = OutgoingEmail {
        to: vec![fallback],
        subject: "cpis: notifications waiting for authorities with no delivery endpoint".into(),
        body,
        message_id: format!(
            "unconfigured-{}@{}",
            now.format("%Y%m%d"),
            state.outbound.mail_domain
        ),
    };
    // Within the sessions the deliverer may use, as every other email.
    let _session = state.outbound.mail_sessions.acquire().await.ok();
    if let Err(e) = state.outbound.mailer.send(&email).await {
        tracing::error!(error = %e.message, waiting = total, "could not tell the fallback address about authorities without endpoints");
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_starts_sends_until_the_longest_send_would_outlive_its_lease() {
        let mut s = crate::config::Settings::for_database("sqlite::memory:");
        // The defaults: an email may take 30 s (twice the 15 s step), a webhook 10 s; the lease is 120 s.
        let lease = Duration::from_secs(s.delivery.lease_secs);
        assert_eq!(start_by(&s, lease), Duration::from_secs(90));
        s.webhook.timeout_secs = 45;
        assert_eq!(start_by(&s, lease), Duration::from_secs(75));
        // A lease shorter than twice the longest send keeps its first half for sending.
        assert_eq!(
            start_by(&s, Duration::from_secs(60)),
            Duration::from_secs(30)
        );
        s.mail.timeout_secs = 1;
        s.webhook.timeout_secs = 3;
        assert_eq!(
            start_by(&s, Duration::from_secs(5)),
            Duration::from_millis(2500)
        );
    }

    fn at() -> NaiveDateTime {
        chrono::NaiveDate::from_ymd_opt(2026, 11, 25)
            .unwrap()
            .and_hms_opt(12, 0, 0)
            .unwrap()
    }

    fn failed(retry_after: Option<Duration>) -> Sent {
        Sent {
            delivered: false,
            code: Some(500),
            error: Some("answered 500".into()),
            retry_after,
            gone: false,
        }
    }

    #[test]
    fn a_failure_waits_for_the_next_step_of_the_schedule_and_the_last_one_is_dead() {
        let schedule = [
            Duration::ZERO,
            Duration::from_secs(5),
            Duration::from_secs(300),
        ];
        assert_eq!(
            next_state(&failed(None), 1, &schedule, at(), 0.0),
            (PENDING, at() + chrono::Duration::seconds(5))
        );
        assert_eq!(
            next_state(&failed(None), 2, &schedule, at(), 0.0),
            (PENDING, at() + chrono::Duration::seconds(300))
        );
        assert_eq!(next_state(&failed(None), 3, &schedule, at(), 0.0).0, DEAD);
    }

    #[test]
    fn retry_after_is_honoured_and_gone_ends_at_once() {
        let schedule = [
            Duration::ZERO,
            Duration::from_secs(5),
            Duration::from_secs(300),
        ];
        let (_, next) = next_state(
            &failed(Some(Duration::from_secs(120))),
            1,
            &schedule,
            at(),
            0.0,
        );
        assert_eq!(next, at() + chrono::Duration::seconds(120));
        let gone = Sent {
            gone: true,
            ..failed(None)
        };
        assert_eq!(next_state(&gone, 1, &schedule, at(), 0.0).0, DEAD);
        let ok = Sent {
            delivered: true,
            code: Some(204),
            error: None,
            retry_after: None,
            gone: false,
        };
        assert_eq!(next_state(&ok, 1, &schedule, at(), 0.0).0, DELIVERED);
    }
}
