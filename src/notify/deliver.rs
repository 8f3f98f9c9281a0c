//! The `deliver` job: claims due deliveries (one row per notification and channel), sends each by email or
//! webhook, records every attempt, and schedules the next try, or declares the channel dead and tells the
//! fallback address. A crash between sending and recording resends later with the same `webhook-id` and
//! `Message-ID`, so a receiver can recognise the repeat (at-least-once).

use super::backoff;
use super::email::{Mailer, OutgoingEmail};
use super::webhook::{WebhookClient, WebhookOutcome, WebhookRequest};
use super::{
    compose_email, enqueue_exhausted, refresh_status, AttemptRow, DeliveryRow, EndpointRow,
    NotificationRow, DEAD, DELIVERED, DELIVERY_EXHAUSTED, EMAIL, PENDING, WEBHOOK,
};
use crate::db::schema::{deliveries, delivery_attempts};
use crate::db::{claim_deliveries, DbError};
use crate::startup::AppState;
use chrono::NaiveDateTime;
use diesel::prelude::*;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The ways out, chosen at start-up.
pub struct Outbound {
    pub mailer: Arc<dyn Mailer>,
    pub webhooks: Arc<dyn WebhookClient>,
    /// Domain of `Message-ID`s.
    pub mail_domain: String,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TickReport {
    pub claimed: usize,
    pub delivered: usize,
    pub retrying: usize,
    pub dead: usize,
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

/// One tick: claims a batch and delivers it with bounded concurrency. Answers what happened.
pub async fn tick(state: &AppState) -> anyhow::Result<TickReport> {
    let now = state.clock.now_naive();
    let lease = now + chrono::Duration::seconds(state.settings.delivery.lease_secs as i64);
    let instance = state.instance_id.clone();
    let batch = state.settings.delivery.batch_size;
    let claimed = state
        .db
        .write(move |conn| Ok::<_, DbError>(claim_deliveries(conn, now, lease, &instance, batch)?))
        .await?;
    let mut report = TickReport {
        claimed: claimed.len(),
        ..Default::default()
    };
    let outcomes: Vec<anyhow::Result<Outcome>> = futures_util::stream::iter(claimed)
        .map(|c| deliver_one(state, c.notification_id, c.channel))
        .buffer_unordered(state.settings.delivery.concurrency)
        .collect()
        .await;
    for outcome in outcomes {
        match outcome {
            Ok(Outcome::Delivered) => report.delivered += 1,
            Ok(Outcome::Retrying) => report.retrying += 1,
            Ok(Outcome::Dead) => report.dead += 1,
            Ok(Outcome::Skipped) => {}
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "delivery could not be recorded; its lease will expire and it will be retried")
            }
        }
    }
    Ok(report)
}

async fn deliver_one(
    state: &AppState,
    notification_id: String,
    channel: String,
) -> anyhow::Result<Outcome> {
    let (nid, ch) = (notification_id.clone(), channel.clone());
    let loaded = state
        .db
        .read(move |conn| {
            let n = NotificationRow::find(conn, &nid)?;
            let d: Option<DeliveryRow> = crate::on_backend!(conn, |c| deliveries::table
                .find((&nid, &ch))
                .select(DeliveryRow::as_select())
                .first(c)
                .optional())?;
            let ep = match &n {
                Some(n) => EndpointRow::find(conn, &n.org_ods)?,
                None => None,
            };
            Ok::<_, DbError>((n, d, ep))
        })
        .await?;
    let (Some(n), Some(d), endpoint) = loaded else {
        return Ok(Outcome::Skipped);
    };
    if d.status != PENDING || d.leased_by.as_deref() != Some(state.instance_id.as_str()) {
        return Ok(Outcome::Skipped);
    }
    let span = tracing::info_span!("delivery", notification = %n.id, channel = %d.channel, attempt = d.attempts + 1);
    let _enter = span.enter();
    let started = Instant::now();
    let sent = send(state, &n, &d, endpoint.as_ref()).await;
    let elapsed = started.elapsed();
    drop(_enter);
    record(state, n, d, sent, elapsed).await
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

async fn record(
    state: &AppState,
    n: NotificationRow,
    d: DeliveryRow,
    sent: Sent,
    elapsed: Duration,
) -> anyhow::Result<Outcome> {
    let now = state.clock.now_naive();
    let attempts = d.attempts + 1;
    let (status, next_at) = next_state(
        &sent,
        attempts,
        &state.retry_schedule,
        now,
        backoff::random_jitter(),
    );
    let instance = state.instance_id.clone();
    let settings = state.settings.clone();
    if let Some(e) = &sent.error {
        tracing::warn!(notification = %n.id, channel = %d.channel, attempt = attempts, status, code = ?sent.code, error = %e, "delivery attempt failed");
    }
    let outcome_label = if sent.delivered {
        "delivered"
    } else {
        "failed"
    };
    state
        .metrics
        .delivery_attempts
        .with_label_values(&[d.channel.as_str(), outcome_label])
        .inc();
    state
        .metrics
        .delivery_seconds
        .with_label_values(&[d.channel.as_str()])
        .observe(elapsed.as_secs_f64());
    let outcome = state
        .db
        .write(move |conn| {
            crate::db::lock_notification(conn, &d.notification_id)?;
            let updated = crate::on_backend!(conn, |c| diesel::update(
                deliveries::table
                    .find((&d.notification_id, &d.channel))
                    .filter(deliveries::leased_by.eq(&instance))
                    .filter(deliveries::status.eq(PENDING)),
            )
            .set((
                deliveries::status.eq(status),
                deliveries::attempts.eq(attempts),
                deliveries::next_attempt_at.eq(next_at),
                deliveries::lease_until.eq(None::<NaiveDateTime>),
                deliveries::leased_by.eq(None::<String>),
                deliveries::last_error.eq(&sent.error),
                deliveries::delivered_at.eq(sent.delivered.then_some(now)),
            ))
            .execute(c))?;
            let attempt = AttemptRow {
                id: crate::db::new_id(),
                notification_id: d.notification_id.clone(),
                channel: d.channel.clone(),
                at: now,
                outcome: if sent.delivered { "delivered".into() } else { "failed".into() },
                response_code: sent.code.map(i32::from),
                error: sent.error.clone(),
                duration_ms: elapsed.as_millis() as i64,
            };
            crate::on_backend!(conn, |c| diesel::insert_into(delivery_attempts::table)
                .values(&attempt)
                .execute(c))?;
            if updated == 0 {
                // The lease ran out and another instance took the row over; it records its own outcome.
                return Ok::<_, DbError>(Outcome::Skipped);
            }
            if sent.gone && d.channel == super::WEBHOOK {
                EndpointRow::disable_webhook(conn, &n.org_ods, now)?;
            }
            let before = NotificationRow::find(conn, &n.id)?.map(|r| r.status).unwrap_or_default();
            let overall = refresh_status(conn, &n.id, now)?;
            if overall == DEAD && before != DEAD && n.event != DELIVERY_EXHAUSTED {
                match &settings.mail.fallback_address {
                    Some(address) => {
                        enqueue_exhausted(conn, now, &n, address, &settings.server.public_base_url)?;
                    }
                    None => tracing::error!(notification = %n.id, "notification is dead and no mail.fallback_address is configured"),
                }
            }
            Ok(match status {
                DELIVERED => Outcome::Delivered,
                DEAD => Outcome::Dead,
                _ => Outcome::Retrying,
            })
        })
        .await?;
    if matches!(outcome, Outcome::Dead) {
        state.wake_deliverer();
    }
    Ok(outcome)
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
    if let Err(e) = state.outbound.mailer.send(&email).await {
        tracing::error!(error = %e.message, waiting = total, "could not tell the fallback address about authorities without endpoints");
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

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
