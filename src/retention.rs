//! The `purge` job: personal data goes when its time is up. Plans past their delete date (given, or by default
//! 12 months after the end of a CPP or LAC plan and 28 days after the end or expected delivery of a UCPP plan),
//! then whatever only they kept (the person, their identifier links, recorded accesses, attendances and
//! notification contents), and activity older than `retention.activity_days`. Audit events are kept apart and
//! go after `audit.retention_days`, with the chain kept verifiable. Reports counts only.

use crate::audit::{self, Actor, Event};
use crate::config::RetentionSettings;
use crate::db::models::PlanRow;
use crate::db::schema::{accesses, attendances, notifications, person_identifiers, persons, plans};
use crate::db::stamp::Stamp;
use crate::db::{DbConnection, DbError};
use crate::domain::PlanType;
use crate::startup::AppState;
use chrono::{Months, NaiveDate};
use diesel::prelude::*;
use diesel::result::Error;
use std::collections::HashMap;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PurgeReport {
    pub plans: usize,
    pub persons: usize,
    pub identifier_links: usize,
    pub attendances: usize,
    pub accesses: usize,
    pub notifications_cleared: usize,
    pub audit_events: usize,
}

/// The day a plan's personal data is to go: its own delete date, or the default for its type.
pub fn delete_date(plan: &PlanRow, r: &RetentionSettings) -> Option<NaiveDate> {
    if plan.delete_date.is_some() {
        return plan.delete_date.map(Into::into);
    }
    match PlanType::parse(&plan.plan_type).ok()? {
        PlanType::Cpp | PlanType::Lac => plan
            .end_date?
            .checked_add_months(Months::new(r.cpp_lac_months_after_end)),
        PlanType::Ucpp => {
            let from = match (plan.end_date, plan.expected_delivery_date) {
                (Some(end), Some(edd)) => end.min(edd),
                (end, edd) => end.or(edd)?,
            };
            from.checked_add_days(chrono::Days::new(r.ucpp_days_after_end.into()))
        }
    }
}

/// The most rows one of the purge's writes removes or clears.
///
/// The purge finds what is due with reads, which never hold up a write, and removes it in writes of at most this
/// many rows, each through the group-commit writer like any other write. Flag checks and attendances queued behind
/// the writer then wait for one such write at most, not for the whole purge: as one write, the purge scanned the
/// plans, persons, attendances, accesses and notifications tables while every other write waited, 2.1 s a night
/// at the benchmark's default size with nothing due (BENCHMARKS.md, twenty-sixth session).
pub const ROWS_PER_WRITE: usize = 1_000;

/// How many writes' worth one read finds, at most (old rows by id, or the people past their plans whose rows no
/// index leads to): each read of a table without an index for the purge's condition scans it, so a read finds
/// many writes' worth.
const READ_BATCHES: usize = 20;

impl PurgeReport {
    fn add(&mut self, other: PurgeReport) {
        self.plans += other.plans;
        self.persons += other.persons;
        self.identifier_links += other.identifier_links;
        self.attendances += other.attendances;
        self.accesses += other.accesses;
        self.notifications_cleared += other.notifications_cleared;
        self.audit_events += other.audit_events;
    }
}

/// Plans past their delete date, as (NHS number, plan id), found by a read.
fn due_plans(
    conn: &mut DbConnection,
    today: NaiveDate,
    r: &RetentionSettings,
) -> Result<Vec<(String, String)>, Error> {
    let candidates: Vec<PlanRow> = plans::table
        .filter(
            plans::delete_date
                .is_not_null()
                .or(plans::end_date.is_not_null())
                .or(plans::plan_type.eq("UCPP")),
        )
        .select(PlanRow::as_select())
        .load(conn)?;
    let mut due: Vec<(String, String)> = candidates
        .into_iter()
        .filter(|p| delete_date(p, r).is_some_and(|d| d <= today))
        .map(|p| (p.nhs_number, p.id))
        .collect();
    due.sort();
    Ok(due)
}

/// Rows about people that no index leads to, by NHS number: attendances sent with the number (those resolved to
/// it are found by their index in the write), and notifications about them.
#[derive(Default)]
struct Unindexed {
    sent: HashMap<String, Vec<String>>,
    told: HashMap<String, Vec<String>>,
}

impl Unindexed {
    /// One read (a scan of each table) for many writes' people.
    fn read(conn: &mut DbConnection, numbers: &[String]) -> Result<Self, Error> {
        let by_number = |rows: Vec<(Option<String>, String)>| {
            let mut found: HashMap<String, Vec<String>> = HashMap::new();
            for (nhs, id) in rows {
                if let Some(nhs) = nhs {
                    found.entry(nhs).or_default().push(id);
                }
            }
            found
        };
        let sent = attendances::table
            .filter(attendances::nhs_number.eq_any(numbers))
            .select((attendances::nhs_number, attendances::id))
            .load(conn)?;
        let told = notifications::table
            .filter(notifications::nhs_number.eq_any(numbers))
            .select((notifications::nhs_number, notifications::id))
            .load(conn)?;
        Ok(Unindexed {
            sent: by_number(sent),
            told: by_number(told),
        })
    }

    /// The ids of these people's rows, for their write.
    fn of(&self, numbers: &[&str]) -> (Vec<String>, Vec<String>) {
        let ids = |found: &HashMap<String, Vec<String>>| {
            numbers
                .iter()
                .filter_map(|n| found.get(*n))
                .flatten()
                .cloned()
                .collect()
        };
        (ids(&self.sent), ids(&self.told))
    }
}

/// One write: removes these plans if they are still due, and for each of their people left with no plan, the
/// person, their identifier links, accesses and attendances, and their notifications' contents. `sent` and `told`
/// are the [`Unindexed`] rows of the same people; only those about a person removed here are touched.
fn purge_people(
    conn: &mut DbConnection,
    today: NaiveDate,
    r: &RetentionSettings,
    plan_ids: &[String],
    sent: &[String],
    told: &[String],
) -> Result<PurgeReport, Error> {
    let mut report = PurgeReport::default();
    // Read again inside the write: a plan changed since the read (its end date moved) is judged as it is now.
    let still_due: Vec<PlanRow> = plans::table
        .filter(plans::id.eq_any(plan_ids))
        .select(PlanRow::as_select())
        .load::<PlanRow>(conn)?
        .into_iter()
        .filter(|p| delete_date(p, r).is_some_and(|d| d <= today))
        .collect();
    let ids: Vec<&str> = still_due.iter().map(|p| p.id.as_str()).collect();
    report.plans += diesel::delete(plans::table.filter(plans::id.eq_any(&ids))).execute(conn)?;
    let mut numbers: Vec<&str> = still_due.iter().map(|p| p.nhs_number.as_str()).collect();
    numbers.sort();
    numbers.dedup();
    // People who have no plan left: nothing of theirs is needed any more.
    let still_planned: std::collections::HashSet<String> = plans::table
        .filter(plans::nhs_number.eq_any(&numbers))
        .select(plans::nhs_number)
        .load::<String>(conn)?
        .into_iter()
        .collect();
    let gone: Vec<&str> = numbers
        .into_iter()
        .filter(|n| !still_planned.contains(*n))
        .collect();
    if gone.is_empty() {
        return Ok(report);
    }
    let person_ids: Vec<String> = persons::table
        .filter(persons::nhs_number.eq_any(&gone))
        .select(persons::id)
        .load(conn)?;
    report.identifier_links += diesel::delete(
        person_identifiers::table.filter(person_identifiers::person_id.eq_any(&person_ids)),
    )
    .execute(conn)?;
    report.persons +=
        diesel::delete(persons::table.filter(persons::id.eq_any(&person_ids))).execute(conn)?;
    report.accesses +=
        diesel::delete(accesses::table.filter(accesses::nhs_number.eq_any(&gone))).execute(conn)?;
    report.attendances +=
        diesel::delete(attendances::table.filter(attendances::resolved_nhs_number.eq_any(&gone)))
            .execute(conn)?;
    // Statements of at most ROWS_PER_WRITE ids each: SQLite and PostgreSQL bound the values one may carry.
    for ids in sent.chunks(ROWS_PER_WRITE) {
        report.attendances += diesel::delete(
            attendances::table
                .filter(attendances::id.eq_any(ids))
                .filter(attendances::nhs_number.eq_any(&gone)),
        )
        .execute(conn)?;
    }
    for ids in told.chunks(ROWS_PER_WRITE) {
        report.notifications_cleared += diesel::update(
            notifications::table
                .filter(notifications::id.eq_any(ids))
                .filter(notifications::nhs_number.eq_any(&gone)),
        )
        .set(contents_cleared())
        .execute(conn)?;
    }
    Ok(report)
}

/// What a notification keeps once its contents go: its row and delivery record, without the child's NHS number or
/// the payload.
fn contents_cleared() -> (
    diesel::dsl::Eq<notifications::nhs_number, Option<String>>,
    diesel::dsl::Eq<notifications::payload, Option<String>>,
) {
    (
        notifications::nhs_number.eq(None::<String>),
        notifications::payload.eq(None::<String>),
    )
}

/// Persons with no plan not seen since `before` (met only through attendances or feeds).
fn stale_persons(
    before: Stamp,
) -> persons::BoxedQuery<'static, <DbConnection as diesel::Connection>::Backend> {
    persons::table
        .filter(persons::updated_at.lt(before))
        .filter(diesel::dsl::not(diesel::dsl::exists(
            plans::table.filter(plans::nhs_number.nullable().eq(persons::nhs_number)),
        )))
        .into_boxed()
}

/// What a purge of activity older than the retention period removes: one table's rows, found by a read of up to
/// `limit` ids and removed by id in writes, each checking the condition again.
#[derive(Clone, Copy)]
enum Old {
    Attendances,
    Accesses,
    /// Notifications keep their row (delivery records) and lose their contents.
    NotificationContents,
    /// Persons met only through attendances or feeds, with no plan, not seen for the retention period.
    Persons,
}

impl Old {
    fn find(
        self,
        conn: &mut DbConnection,
        before: Stamp,
        limit: i64,
    ) -> Result<Vec<String>, Error> {
        match self {
            Old::Attendances => attendances::table
                .filter(attendances::arrived_at.lt(before))
                .select(attendances::id)
                .limit(limit)
                .load(conn),
            Old::Accesses => accesses::table
                .filter(accesses::at.lt(before))
                .select(accesses::id)
                .limit(limit)
                .load(conn),
            Old::NotificationContents => notifications::table
                .filter(notifications::occurred_at.lt(before))
                .filter(notifications::payload.is_not_null())
                .select(notifications::id)
                .limit(limit)
                .load(conn),
            Old::Persons => stale_persons(before)
                .select(persons::id)
                .limit(limit)
                .load(conn),
        }
    }

    /// One write: removes (or clears) those of `ids` that still meet the condition.
    fn remove(
        self,
        conn: &mut DbConnection,
        before: Stamp,
        ids: &[String],
    ) -> Result<PurgeReport, Error> {
        let mut report = PurgeReport::default();
        match self {
            Old::Attendances => {
                report.attendances = diesel::delete(
                    attendances::table
                        .filter(attendances::id.eq_any(ids))
                        .filter(attendances::arrived_at.lt(before)),
                )
                .execute(conn)?
            }
            Old::Accesses => {
                report.accesses = diesel::delete(
                    accesses::table
                        .filter(accesses::id.eq_any(ids))
                        .filter(accesses::at.lt(before)),
                )
                .execute(conn)?
            }
            Old::NotificationContents => {
                report.notifications_cleared = diesel::update(
                    notifications::table
                        .filter(notifications::id.eq_any(ids))
                        .filter(notifications::occurred_at.lt(before))
                        .filter(notifications::payload.is_not_null()),
                )
                .set(contents_cleared())
                .execute(conn)?
            }
            Old::Persons => {
                // Checked again inside the write: a person seen or planned since the read stays.
                let stale: Vec<String> = stale_persons(before)
                    .filter(persons::id.eq_any(ids))
                    .select(persons::id)
                    .load(conn)?;
                report.identifier_links = diesel::delete(
                    person_identifiers::table.filter(person_identifiers::person_id.eq_any(&stale)),
                )
                .execute(conn)?;
                report.persons = diesel::delete(persons::table.filter(persons::id.eq_any(&stale)))
                    .execute(conn)?;
            }
        }
        Ok(report)
    }
}

/// Removes what one kind of old activity holds, a read's worth at a time, `rows` a write.
async fn purge_old(
    state: &AppState,
    old: Old,
    before: Stamp,
    rows: usize,
) -> anyhow::Result<PurgeReport> {
    let mut report = PurgeReport::default();
    let limit = rows * READ_BATCHES;
    loop {
        let found: Vec<String> = state
            .db
            .run(move |conn| old.find(conn, before, limit as i64).map_err(DbError::from))
            .await?;
        for ids in found.chunks(rows) {
            let ids = ids.to_vec();
            let part = state
                .db
                .write(move |conn| old.remove(conn, before, &ids).map_err(DbError::from))
                .await?;
            report.add(part);
        }
        // A read that found less than its limit found all there was. What it found is gone now, or no longer
        // meets the condition (a person seen since) and so is not found again: each round makes progress.
        if found.len() < limit {
            return Ok(report);
        }
    }
}

/// Runs the purge with writes of at most `rows` rows each ([`ROWS_PER_WRITE`] in service; tests pass fewer).
///
/// Each write is whole on its own: a purge stopped part way (a crash, a lost database) leaves every plan either
/// with what only it kept or gone with it, and the next run carries on. The purge's own audit event, with the
/// counts, comes last.
pub async fn purge_in_writes_of(state: &AppState, rows: usize) -> anyhow::Result<PurgeReport> {
    let rows = rows.max(1);
    let now = state.clock.now_naive();
    let today = state.clock.today();
    let retention = state.settings.retention.clone();
    let audit_before = now - chrono::Duration::days(state.settings.audit.retention_days.into());
    let mut report = PurgeReport::default();

    // Plans past their delete date, and what only they kept, a write for each `rows` people.
    let r = retention.clone();
    let due = state
        .db
        .run(move |conn| due_plans(conn, today, &r).map_err(DbError::from))
        .await?;
    // A person's plans are together (sorted by NHS number), and a person's plans go in one write. The rows no
    // index leads to are found by one read for as many people as READ_BATCHES writes take.
    let people: Vec<&[(String, String)]> = due.chunk_by(|a, b| a.0 == b.0).collect();
    for read in people.chunks(rows * READ_BATCHES) {
        let numbers: Vec<String> = read.iter().map(|plans| plans[0].0.clone()).collect();
        let unindexed = state
            .db
            .run(move |conn| Unindexed::read(conn, &numbers).map_err(DbError::from))
            .await?;
        for group in read.chunks(rows) {
            let numbers: Vec<&str> = group.iter().map(|plans| plans[0].0.as_str()).collect();
            let (sent, told) = unindexed.of(&numbers);
            let plan_ids: Vec<String> = group
                .iter()
                .flat_map(|plans| plans.iter().map(|(_, id)| id.clone()))
                .collect();
            let r = retention.clone();
            let part = state
                .db
                .write(move |conn| {
                    purge_people(conn, today, &r, &plan_ids, &sent, &told).map_err(DbError::from)
                })
                .await?;
            report.add(part);
        }
    }

    // Activity older than the retention period, whoever it was about; then the persons it alone kept.
    let activity_before = Stamp(now - chrono::Duration::days(retention.activity_days.into()));
    for old in [
        Old::Attendances,
        Old::Accesses,
        Old::NotificationContents,
        Old::Persons,
    ] {
        report.add(purge_old(state, old, activity_before, rows).await?);
    }

    // Audit events past their retention, oldest first, `rows` a write; the chain stays verifiable after each.
    let last_old = state
        .db
        .run(move |conn| audit::last_before(conn, audit_before).map_err(DbError::from))
        .await?;
    if let Some(last_old) = last_old {
        loop {
            let deleted = state
                .db
                .write(move |conn| {
                    audit::purge_through(conn, last_old, rows as i64).map_err(DbError::from)
                })
                .await?;
            report.audit_events += deleted;
            if deleted == 0 {
                break;
            }
        }
    }

    let actor = Actor {
        org: "cpis".into(),
        role: Some("job:purge".into()),
        ..Default::default()
    };
    state
        .db
        .write(move |conn| {
            audit::append(
                conn,
                now,
                &actor,
                Event {
                    action: "purge.run",
                    outcome: "ok",
                    detail: Some(serde_json::to_string(&report).unwrap_or_default()),
                    ..Default::default()
                },
            )
            .map_err(DbError::from)
        })
        .await?;
    Ok(report)
}

pub async fn purge(state: &AppState) -> anyhow::Result<PurgeReport> {
    let report = purge_in_writes_of(state, ROWS_PER_WRITE).await?;
    for (kind, n) in [
        ("plans", report.plans),
        ("persons", report.persons),
        ("identifier_links", report.identifier_links),
        ("attendances", report.attendances),
        ("accesses", report.accesses),
        ("notifications_cleared", report.notifications_cleared),
        ("audit_events", report.audit_events),
    ] {
        state
            .metrics
            .purged
            .with_label_values(&[kind])
            .inc_by(n as u64);
    }
    tracing::info!(
        plans = report.plans,
        persons = report.persons,
        attendances = report.attendances,
        accesses = report.accesses,
        notifications_cleared = report.notifications_cleared,
        audit_events = report.audit_events,
        "purge finished"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(kind: &str, end: Option<&str>, delete: Option<&str>, edd: Option<&str>) -> PlanRow {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        PlanRow {
            end_date: end.map(d).map(Into::into),
            delete_date: delete.map(d).map(Into::into),
            expected_delivery_date: edd.map(d).map(Into::into),
            ..PlanRow::sample(kind, d("2025-01-01"))
        }
    }

    #[test]
    fn default_delete_dates_follow_the_plan_type() {
        let r = RetentionSettings::default();
        let d = |s: &str| Some(NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap());
        assert_eq!(
            delete_date(&plan("CPP", Some("2025-06-30"), None, None), &r),
            d("2026-06-30")
        );
        assert_eq!(
            delete_date(&plan("LAC", None, None, None), &r),
            None,
            "an open plan stays"
        );
        assert_eq!(
            delete_date(&plan("UCPP", None, None, Some("2025-03-01")), &r),
            d("2025-03-29")
        );
        assert_eq!(
            delete_date(
                &plan("UCPP", Some("2025-02-01"), None, Some("2025-03-01")),
                &r
            ),
            d("2025-03-01")
        );
        assert_eq!(
            delete_date(
                &plan("CPP", Some("2025-06-30"), Some("2025-07-01"), None),
                &r
            ),
            d("2025-07-01")
        );
    }
}
