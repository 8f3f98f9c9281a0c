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
use chrono::{Months, NaiveDate, NaiveDateTime};
use diesel::prelude::*;
use diesel::result::Error;

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

fn purge_in(
    conn: &mut DbConnection,
    now: NaiveDateTime,
    today: NaiveDate,
    r: &RetentionSettings,
    audit_before: NaiveDateTime,
) -> Result<PurgeReport, Error> {
    let mut report = PurgeReport::default();
    let candidates: Vec<PlanRow> = plans::table
        .filter(
            plans::delete_date
                .is_not_null()
                .or(plans::end_date.is_not_null())
                .or(plans::plan_type.eq("UCPP")),
        )
        .select(PlanRow::as_select())
        .load(conn)?;
    let due: Vec<&PlanRow> = candidates
        .iter()
        .filter(|p| delete_date(p, r).is_some_and(|d| d <= today))
        .collect();
    let mut numbers: Vec<String> = due.iter().map(|p| p.nhs_number.clone()).collect();
    numbers.sort();
    numbers.dedup();
    for chunk in due.chunks(500) {
        let ids: Vec<&str> = chunk.iter().map(|p| p.id.as_str()).collect();
        report.plans += diesel::delete(plans::table.filter(plans::id.eq_any(ids))).execute(conn)?;
    }
    // People who have no plan left: nothing of theirs is needed any more.
    let still_planned: Vec<String> = plans::table
        .filter(plans::nhs_number.eq_any(&numbers))
        .select(plans::nhs_number)
        .load(conn)?;
    let gone: Vec<String> = numbers
        .into_iter()
        .filter(|n| !still_planned.contains(n))
        .collect();
    for chunk in gone.chunks(500) {
        let person_ids: Vec<String> = persons::table
            .filter(persons::nhs_number.eq_any(chunk))
            .select(persons::id)
            .load(conn)?;
        report.identifier_links += diesel::delete(
            person_identifiers::table.filter(person_identifiers::person_id.eq_any(&person_ids)),
        )
        .execute(conn)?;
        report.persons +=
            diesel::delete(persons::table.filter(persons::id.eq_any(&person_ids))).execute(conn)?;
        report.accesses +=
            diesel::delete(accesses::table.filter(accesses::nhs_number.eq_any(chunk)))
                .execute(conn)?;
        report.attendances += diesel::delete(
            attendances::table.filter(
                attendances::resolved_nhs_number
                    .eq_any(chunk)
                    .or(attendances::nhs_number.eq_any(chunk)),
            ),
        )
        .execute(conn)?;
        report.notifications_cleared +=
            diesel::update(notifications::table.filter(notifications::nhs_number.eq_any(chunk)))
                .set((
                    notifications::nhs_number.eq(None::<String>),
                    notifications::payload.eq(None::<String>),
                ))
                .execute(conn)?;
    }
    // Activity older than the retention period, whoever it was about.
    let activity_before = now - chrono::Duration::days(r.activity_days.into());
    report.attendances += diesel::delete(
        attendances::table.filter(attendances::arrived_at.lt(Stamp(activity_before))),
    )
    .execute(conn)?;
    report.accesses +=
        diesel::delete(accesses::table.filter(accesses::at.lt(Stamp(activity_before))))
            .execute(conn)?;
    report.notifications_cleared += diesel::update(
        notifications::table
            .filter(notifications::occurred_at.lt(Stamp(activity_before)))
            .filter(notifications::payload.is_not_null()),
    )
    .set((
        notifications::nhs_number.eq(None::<String>),
        notifications::payload.eq(None::<String>),
    ))
    .execute(conn)?;
    // Persons met only through attendances or feeds, with no plan, not seen for the retention period.
    let stale: Vec<String> = persons::table
        .filter(persons::updated_at.lt(Stamp(activity_before)))
        .filter(diesel::dsl::not(diesel::dsl::exists(
            plans::table.filter(plans::nhs_number.nullable().eq(persons::nhs_number)),
        )))
        .select(persons::id)
        .load(conn)?;
    for chunk in stale.chunks(500) {
        report.identifier_links += diesel::delete(
            person_identifiers::table.filter(person_identifiers::person_id.eq_any(chunk)),
        )
        .execute(conn)?;
        report.persons +=
            diesel::delete(persons::table.filter(persons::id.eq_any(chunk))).execute(conn)?;
    }
    report.audit_events = audit::purge_before(conn, audit_before)?;
    let actor = Actor {
        org: "cpis".into(),
        role: Some("job:purge".into()),
        ..Default::default()
    };
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
    )?;
    Ok(report)
}

pub async fn purge(state: &AppState) -> anyhow::Result<PurgeReport> {
    let now = state.clock.now_naive();
    let today = state.clock.today();
    let retention = state.settings.retention.clone();
    let audit_before = now - chrono::Duration::days(state.settings.audit.retention_days.into());
    let report = state
        .db
        .write(move |conn| {
            purge_in(conn, now, today, &retention, audit_before).map_err(DbError::from)
        })
        .await?;
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
