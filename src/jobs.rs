//! The scheduler: each job runs on its cron schedule (seconds field; an empty expression disables it) inside
//! `cpis serve`, one span per run; a failing or panicking run is logged and the scheduler carries on. `deliver`
//! is also woken at once when a notification is written. With several instances on one PostgreSQL, each tick of
//! the other jobs runs once (an advisory lock plus the last tick recorded in `job_runs`); `deliver` instead
//! relies on `FOR UPDATE SKIP LOCKED`, so every instance can deliver at once.

use crate::db::schema::job_runs;
use crate::db::{release_job_lock, try_job_lock, DbError};
use crate::startup::AppState;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use std::sync::Arc;
use tracing::Instrument;

pub const JOBS: [&str; 4] = ["deliver", "expire", "purge", "rematch"];

fn lock_key(name: &str) -> i64 {
    // A fixed key per job, stable across versions: "cpis" and the job's position.
    0x6370_6973_0000 + JOBS.iter().position(|j| *j == name).unwrap_or(99) as i64
}

/// Runs one tick of a job now, whatever its schedule; answers a one-line JSON report.
pub async fn run_now(state: &AppState, name: &str) -> anyhow::Result<String> {
    match name {
        "deliver" => {
            let mut total = crate::notify::deliver::TickReport::default();
            loop {
                let r = crate::notify::deliver::tick(state).await?;
                total.claimed += r.claimed;
                total.delivered += r.delivered;
                total.retrying += r.retrying;
                total.dead += r.dead;
                total.released += r.released;
                // What a tick handed back unsent is due at once: the next tick takes it.
                if (r.claimed as i64) < state.settings.delivery.batch_size && r.released == 0 {
                    break;
                }
            }
            crate::notify::deliver::alert_unconfigured(state).await?;
            Ok(serde_json::to_string(&total)?)
        }
        "rematch" => Ok(serde_json::to_string(
            &crate::attendances::rematch(state, 1000).await?,
        )?),
        "expire" => Ok(serde_json::to_string(&crate::plans::expire(state).await?)?),
        "purge" => Ok(serde_json::to_string(
            &crate::retention::purge(state).await?,
        )?),
        other => anyhow::bail!("no job is called {other}; jobs are {}", JOBS.join(", ")),
    }
}

/// Claims the tick for this instance: false if another instance holds the job or already ran this tick.
async fn claim_tick(
    state: &AppState,
    name: &'static str,
    tick: DateTime<Utc>,
) -> anyhow::Result<bool> {
    let tick = tick.naive_utc();
    let key = lock_key(name);
    state
        .db
        .run(move |conn| {
            if !try_job_lock(conn, key)? {
                return Ok::<_, DbError>(false);
            }
            let result: Result<bool, diesel::result::Error> = (|| {
                let last: Option<chrono::NaiveDateTime> = job_runs::table
                    .find(name)
                    .select(job_runs::last_tick)
                    .first(conn)
                    .optional()?;
                match last {
                    Some(l) if l >= tick => Ok(false),
                    Some(_) => {
                        diesel::update(job_runs::table.find(name))
                            .set(job_runs::last_tick.eq(tick))
                            .execute(conn)?;
                        Ok(true)
                    }
                    None => {
                        diesel::insert_into(job_runs::table)
                            .values((job_runs::name.eq(name), job_runs::last_tick.eq(tick)))
                            .execute(conn)?;
                        Ok(true)
                    }
                }
            })();
            release_job_lock(conn, key)?;
            result.map_err(DbError::from)
        })
        .await
        .map_err(Into::into)
}

async fn run_tick(state: Arc<AppState>, name: &'static str, tick: DateTime<Utc>) {
    let span = tracing::info_span!("job", job = name, tick = %tick.format("%Y-%m-%dT%H:%M:%SZ"));
    async move {
        if name != "deliver" {
            match claim_tick(&state, name, tick).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!("another instance runs this tick");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "could not claim the job tick");
                    return;
                }
            }
        }
        let started = std::time::Instant::now();
        // A panic in a job is caught here, logged, and the scheduler goes on.
        let handle = tokio::spawn({
            let state = state.clone();
            async move { run_now(&state, name).await }.in_current_span()
        });
        let result = handle.await;
        let label = match &result {
            Ok(Ok(_)) => "ok",
            Ok(Err(_)) => "error",
            Err(_) => "panic",
        };
        state.metrics.job_runs.with_label_values(&[name, label]).inc();
        state.metrics.job_seconds.with_label_values(&[name]).observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(report)) => {
                if name != "deliver" || !report.contains("\"claimed\":0") {
                    tracing::info!(report = %report, ms = started.elapsed().as_millis() as u64, "job finished");
                }
            }
            Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "job failed"),
            Err(e) => tracing::error!(error = %e, "job panicked"),
        }
    }
    .instrument(span)
    .await
}

/// Starts every enabled job; they run until the process ends.
pub fn spawn(state: Arc<AppState>) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut handles = Vec::new();
    for (name, schedule) in state.settings.jobs.schedules()? {
        let state = state.clone();
        if name == "deliver" {
            // A backlog left by the last run (stopped, killed, or the whole machine restarted) goes out at
            // once, not at the first tick of the schedule: the first wait below ends on this.
            state.wake_deliverer();
        }
        handles.push(tokio::spawn(async move {
            while let Some(next) = schedule.upcoming(Utc).next() {
                let wait = (next - Utc::now()).to_std().unwrap_or_default();
                if name == "deliver" {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = state.deliver_wakeup.notified() => {}
                    }
                } else {
                    tokio::time::sleep(wait).await;
                }
                run_tick(state.clone(), name, next.min(Utc::now())).await;
            }
        }));
    }
    Ok(handles)
}
