//! Attendances at unscheduled-care settings: stored as reported (idempotent on the setting and its own id),
//! matched through the MPI to flagged persons, and matched again later when the MPI was unavailable. A matched
//! attendance of a flagged child is recorded as an access that the next clinician sees.

use crate::audit::{self, Actor, Event};
use crate::db::models::AccessRow;
use crate::db::schema::attendances;
use crate::db::stamp::{Day, Stamp};
use crate::db::DbConnection;
use crate::domain::{Demographics, NhsNumber, PersonName, Postcode, SettingType, Sex};
use crate::flags::{self, FlagView};
use crate::mpi::builtin;
use crate::mpi::{LocalIdentifier, MatchStatus, PatientQuery, Resolution};
use crate::notify;
use crate::startup::AppState;
use chrono::{NaiveDate, NaiveDateTime};
use diesel::prelude::*;
use diesel::result::Error;
use serde_json::json;

/// `match_status` of an attendance whose MPI lookup failed and is to be tried again.
pub const PENDING: &str = "pending";

#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = attendances, treat_none_as_default_value = false, treat_none_as_null = true)]
pub struct AttendanceRow {
    pub id: String,
    pub setting_ods: String,
    pub attendance_id: String,
    pub setting_type: String,
    pub arrived_at: Stamp,
    pub reason: Option<String>,
    pub nhs_number: Option<String>,
    pub identifier_system: Option<String>,
    pub identifier_value: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub birth_date: Option<Day>,
    pub sex: Option<String>,
    pub postcode: Option<String>,
    pub region: Option<String>,
    pub match_status: String,
    pub match_method: Option<String>,
    pub match_score: Option<f64>,
    pub person_id: Option<String>,
    pub resolved_nhs_number: Option<String>,
    pub flagged: bool,
    pub rematch_attempts: i32,
    pub key_id: Option<String>,
    pub created_at: Stamp,
    pub updated_at: Stamp,
}

impl AttendanceRow {
    /// The recent access an attendance of a flagged child is recorded as, for the child with this NHS number:
    /// what a clinician's next check that hits lists.
    pub fn access(&self, nhs_number: String) -> AccessRow {
        AccessRow {
            id: crate::db::new_id(),
            nhs_number,
            at: self.arrived_at,
            setting_ods: self.setting_ods.clone(),
            setting_type: Some(self.setting_type.clone()),
            kind: "attendance".into(),
            access: "unscheduled".into(),
            practitioner_name: None,
            practitioner_role: None,
            key_id: self.key_id.clone(),
        }
    }

    /// The attendance a setting reported under `attendance_id`, committed or written earlier in this batch.
    pub fn find_by_source(
        conn: &mut DbConnection,
        setting: &str,
        attendance_id: &str,
    ) -> Result<Option<Self>, Error> {
        // On PostgreSQL a buffered attendance may yet turn out to be a copy ([`insert`]): only the table counts.
        if let DbConnection::Sqlite(_) = conn {
            let buffered = crate::db::deferred::with(|d| {
                d.attendances
                    .iter()
                    .find(|a| a.setting_ods == setting && a.attendance_id == attendance_id)
                    .cloned()
            });
            if let Some(Some(found)) = buffered {
                return Ok(Some(found));
            }
        }
        crate::on_backend!(conn, |c| attendances::table
            .filter(attendances::setting_ods.eq(setting))
            .filter(attendances::attendance_id.eq(attendance_id))
            .select(Self::as_select())
            .first(c)
            .optional())
    }

    pub fn pending(conn: &mut DbConnection, limit: i64) -> Result<Vec<Self>, Error> {
        attendances::table
            .filter(attendances::match_status.eq(PENDING))
            .order(attendances::created_at.asc())
            .limit(limit)
            .select(Self::as_select())
            .load(conn)
    }

    /// The patient as the setting described them, to ask the MPI again.
    pub fn query(&self) -> PatientQuery {
        let demographics = Demographics {
            given_name: self
                .given_name
                .as_deref()
                .and_then(|n| PersonName::parse(n).ok()),
            family_name: self
                .family_name
                .as_deref()
                .and_then(|n| PersonName::parse(n).ok()),
            birth_date: self.birth_date.map(Into::into),
            sex: self.sex.as_deref().and_then(|s| Sex::parse(s).ok()),
            postcode: self
                .postcode
                .as_deref()
                .and_then(|p| Postcode::parse(p).ok()),
        };
        let has_demographics = demographics != Demographics::default();
        PatientQuery {
            nhs_number: self
                .nhs_number
                .as_deref()
                .and_then(|n| NhsNumber::parse(n).ok()),
            identifier: match (&self.identifier_system, &self.identifier_value) {
                (Some(system), Some(value)) => Some(LocalIdentifier {
                    system: system.clone(),
                    value: value.clone(),
                }),
                _ => None,
            },
            demographics: has_demographics.then_some(demographics),
            region: self.region.clone(),
        }
    }

    pub fn setting(&self) -> Option<SettingType> {
        SettingType::parse(&self.setting_type).ok()
    }

    /// The resolution as stored, for answering a repeat.
    pub fn resolution(&self) -> Option<Resolution> {
        let status = match self.match_status.as_str() {
            "matched" => MatchStatus::Matched,
            "possible" => MatchStatus::Possible,
            "none" => MatchStatus::None,
            _ => return None,
        };
        let method = match self.match_method.as_deref() {
            Some("nhs_number") => crate::mpi::Method::NhsNumber,
            Some("identifier") => crate::mpi::Method::Identifier,
            _ => crate::mpi::Method::Demographics,
        };
        Some(Resolution {
            status,
            method,
            score: self.match_score.unwrap_or(0.0),
            nhs_number: self.resolved_nhs_number.clone(),
            person_id: self.person_id.clone(),
            candidates: Vec::new(),
            note: None,
        })
    }
}

/// Initials of the child a plan names, the most of a name a notification carries.
pub fn initials(plans: &[crate::db::models::PlanRow]) -> Option<String> {
    plans
        .iter()
        .find_map(|p| match (&p.given_name, &p.family_name) {
            (Some(g), Some(f)) => Some(format!(
                "{}.{}.",
                g.chars().next()?.to_uppercase(),
                f.chars().next()?.to_uppercase()
            )),
            _ => None,
        })
}

/// What an attendance's resolution finds, read before its write: the flags, and the setting's name for the
/// notification.
pub struct Found {
    pub view: FlagView,
    pub setting_name: Option<String>,
}

/// The reads for [`apply_resolution`]; they may run outside the write (on SQLite, at once on the asking
/// thread), so the writer does only the writes. `setting_name` is kept for the notification when there is one.
pub fn find_flags(
    conn: &mut DbConnection,
    today: NaiveDate,
    setting_name: Option<String>,
    setting: Option<SettingType>,
    resolution: &Resolution,
    plans: Option<builtin::PlansFound>,
) -> Result<Found, Error> {
    let view = flags::view(conn, resolution, plans, today, setting)?;
    let possible = resolution.status == MatchStatus::Possible && !view.active_plans.is_empty();
    let setting_name = setting_name.filter(|_| view.hit || possible);
    Ok(Found { view, setting_name })
}

/// Records an attendance's resolution: the match on the row, an access and notifications when it is flagged,
/// and what it teaches the built-in MPI. Answers the notifications' ids.
pub fn apply_resolution(
    conn: &mut DbConnection,
    now: NaiveDateTime,
    att: &mut AttendanceRow,
    resolution: &Resolution,
    found: &Found,
    settings: &crate::config::Settings,
) -> Result<Vec<String>, Error> {
    att.match_status = resolution.status.as_str().to_string();
    att.match_method = Some(resolution.method.as_str().to_string());
    att.match_score = Some(resolution.score);
    att.person_id = resolution.person_id.clone();
    att.resolved_nhs_number = resolution.nhs_number.clone();
    att.updated_at = now.into();
    let view = &found.view;
    att.flagged = view.hit;
    if let (true, Some(nhs)) = (view.hit, &view.nhs_number) {
        AccessRow::insert(conn, att.access(nhs.clone()))?;
    }
    learn(conn, now, att, resolution)?;
    // A flagged attendance is told to each responsible authority; a possible match too, marked for review.
    let mut notifications = Vec::new();
    let possible = resolution.status == MatchStatus::Possible && !view.active_plans.is_empty();
    if let (true, Some(nhs)) = (view.hit || possible, &view.nhs_number) {
        notifications = notify::enqueue(
            conn,
            now,
            settings,
            &view.active_plans,
            &notify::Occurrence {
                event: notify::ATTENDANCE_FLAGGED,
                nhs_number: nhs,
                initials: initials(&view.active_plans),
                setting_ods: &att.setting_ods,
                setting_name: found.setting_name.as_deref(),
                setting_type: att.setting(),
                occurred_at: *att.arrived_at,
                attendance_ref: Some(&att.id),
                review: possible,
                match_method: resolution.method.as_str(),
            },
        )?;
    }
    Ok(notifications)
}

/// Whether recording this attendance may teach the built-in MPI ([`learn`]: only a setting's own identifier,
/// with its region, is learnt).
pub fn may_teach_mpi(att: &AttendanceRow) -> bool {
    att.identifier_system.is_some() && att.identifier_value.is_some() && att.region.is_some()
}

/// Whether an attendance's own insert ([`insert`]) finds an earlier copy of it. On PostgreSQL it does (`ON CONFLICT
/// DO NOTHING`, which also sees a copy another instance is storing): nothing need look for a copy before it, which
/// would be a round trip on every attendance for a rare repeat. The repeat is resolved again, its write's rows are
/// dropped when the insert finds the first copy (at once, or at the batch's end), and it is answered as any
/// repeat is. A write that may teach the MPI still looks first, as a copy must not teach it again. On SQLite the
/// insert joins the batch and cannot tell; there a copy is looked for before it, in-process.
pub fn insert_finds_copies(db: &crate::db::Db) -> bool {
    !db.is_sqlite()
}

/// Whether a new attendance's write needs a savepoint of its own: only when it may teach the MPI ([`learn`], the
/// one part that changes rows in place). Its other rows are buffered by the writer, and its own row is added by
/// [`insert`], which cannot fail on a duplicate.
pub fn needs_savepoint(att: &AttendanceRow) -> bool {
    may_teach_mpi(att)
}

/// Feeds the built-in MPI: a setting that knows both the NHS number and its own identifier for a patient links
/// them; a confident demographic match links the identifier to the matched person. Possible matches never link.
fn learn(
    conn: &mut DbConnection,
    now: NaiveDateTime,
    att: &mut AttendanceRow,
    resolution: &Resolution,
) -> Result<(), Error> {
    if !may_teach_mpi(att) {
        return Ok(());
    }
    let query = att.query();
    let (Some(identifier), Some(region)) = (&query.identifier, &att.region) else {
        return Ok(());
    };
    let person_id = match (&query.nhs_number, resolution.status) {
        (Some(nhs), _) => Some(builtin::upsert_person(
            conn,
            now,
            Some(nhs.as_str()),
            &query.demographics.clone().unwrap_or_default(),
        )?),
        (None, MatchStatus::Matched) => resolution.person_id.clone(),
        _ => None,
    };
    if let Some(person_id) = person_id {
        builtin::link_identifier(conn, now, region, identifier, &person_id)?;
        att.person_id = Some(person_id);
    }
    Ok(())
}

pub fn update(conn: &mut DbConnection, att: &AttendanceRow) -> Result<(), Error> {
    diesel::update(attendances::table.find(&att.id))
        .set(att)
        .execute(conn)
        .map(|_| ())
}

/// What became of a new attendance's row ([`insert`]).
pub enum Stored {
    /// Stored, or buffered by the writer on SQLite, where a copy was looked for first.
    Yes,
    /// PostgreSQL: buffered by the writer, and inserted at its batch's end unless a copy is already stored; then
    /// the write's rows are dropped and this says so.
    AtBatchEnd(crate::db::deferred::CopyFound),
    /// PostgreSQL: a copy was already stored, and this one (handed back) was not.
    Copy(Box<AttendanceRow>),
}

/// Stores a new attendance (call last in its write: `since` is where the write began).
///
/// On SQLite, inside the group-commit writer, it joins the batch's multi-row insert ([`crate::db::deferred`]),
/// where [`AttendanceRow::find_by_source`] still finds it: the writer is the only one, and has looked for a copy
/// first, so no copy can be stored behind its back.
///
/// On PostgreSQL several instances may write at once, so the insert skips a copy already stored (`ON CONFLICT DO
/// NOTHING`, which waits for another instance's transaction holding one). Inside the writer it waits for the
/// batch's end too ([`Stored::AtBatchEnd`]), where a copy takes out every row the write buffered: one round trip
/// fewer for the writer per attendance. One that may teach the MPI ([`learn`]) changes rows in place, which
/// cannot be dropped at the batch's end: it is inserted at once ([`Stored::Copy`] if a copy is found, for the
/// caller to drop the write's rows).
pub fn insert(
    conn: &mut DbConnection,
    att: AttendanceRow,
    since: &crate::db::JobMark,
) -> Result<Stored, Error> {
    match conn {
        DbConnection::Sqlite(_) => {
            if let Some(att) = crate::db::deferred::keep(att, |d| &mut d.attendances) {
                crate::db::insert_attendances(conn, std::slice::from_ref(&att))?;
            }
            Ok(Stored::Yes)
        }
        DbConnection::Postgres(c) => {
            let att = if may_teach_mpi(&att) {
                att
            } else {
                match crate::db::deferred::keep_unsure(att, since) {
                    Ok(told) => return Ok(Stored::AtBatchEnd(told)),
                    Err(att) => *att,
                }
            };
            let stored = diesel::insert_into(attendances::table)
                .values(&att)
                .on_conflict_do_nothing()
                .execute(c)?;
            Ok(if stored == 1 {
                Stored::Yes
            } else {
                Stored::Copy(Box::new(att))
            })
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RematchReport {
    pub checked: usize,
    pub resolved: usize,
    pub flagged: usize,
    pub still_pending: usize,
}

/// The `rematch` job: asks the MPI again about attendances it could not resolve when they arrived.
pub async fn rematch(state: &AppState, batch: i64) -> anyhow::Result<RematchReport> {
    let pending = state
        .db
        .run(move |conn| Ok::<_, crate::db::DbError>(AttendanceRow::pending(conn, batch)?))
        .await?;
    let mut report = RematchReport {
        checked: pending.len(),
        ..Default::default()
    };
    for mut att in pending {
        match state.mpi.resolve(&att.query()).await {
            Err(e) => {
                tracing::warn!(attendance = %att.id, error = %e, "MPI still unavailable; attendance stays pending");
                let now = state.clock.now_naive();
                att.rematch_attempts += 1;
                att.updated_at = now.into();
                state
                    .db
                    .write(move |conn| Ok::<_, crate::db::DbError>(update(conn, &att)?))
                    .await?;
                report.still_pending += 1;
            }
            Ok(resolution) => {
                let now = state.clock.now_naive();
                let today = state.clock.today();
                let actor = Actor {
                    org: "cpis".into(),
                    role: Some("job:rematch".into()),
                    ..Default::default()
                };
                let settings = state.settings.clone();
                let (flagged, notified) = state
                    .db
                    .write(move |conn| {
                        let name = crate::db::models::Organisation::find(conn, &att.setting_ods)?.map(|o| o.name);
                        let found = find_flags(conn, today, name, att.setting(), &resolution, None)?;
                        let notified = apply_resolution(conn, now, &mut att, &resolution, &found, &settings)?;
                        let view = found.view;
                        att.rematch_attempts += 1;
                        update(conn, &att)?;
                        audit::append(conn, now, &actor, Event {
                            action: "attendance.rematch",
                            nhs_number: att.resolved_nhs_number.as_deref(),
                            subject: Some(&att.id),
                            outcome: if view.hit { "flagged" } else { att.match_status.as_str() },
                            detail: Some(json!({"setting_ods": att.setting_ods, "method": att.match_method}).to_string()),
                        })?;
                        Ok::<_, crate::db::DbError>((view.hit, !notified.is_empty()))
                    })
                    .await?;
                if notified {
                    state.wake_deliverer();
                }
                report.resolved += 1;
                report.flagged += usize::from(flagged);
            }
        }
    }
    tracing::info!(
        checked = report.checked,
        resolved = report.resolved,
        flagged = report.flagged,
        still_pending = report.still_pending,
        "rematch finished"
    );
    Ok(report)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An attendance at RBT01 (shared with the batch's tests).
    pub(crate) fn attendance(identifier: Option<&str>, region: Option<&str>) -> AttendanceRow {
        let at = NaiveDate::from_ymd_opt(2026, 11, 20)
            .unwrap()
            .and_hms_opt(22, 15, 0)
            .unwrap();
        AttendanceRow {
            id: "a".into(),
            setting_ods: "RBT01".into(),
            attendance_id: "ATT-1".into(),
            setting_type: "ED".into(),
            arrived_at: at.into(),
            reason: None,
            nhs_number: Some("9434765919".into()),
            identifier_system: identifier.map(|_| "https://cw.example.nhs.uk/Id/mrn".into()),
            identifier_value: identifier.map(str::to_string),
            given_name: None,
            family_name: None,
            birth_date: None,
            sex: None,
            postcode: None,
            region: region.map(str::to_string),
            match_status: PENDING.into(),
            match_method: None,
            match_score: None,
            person_id: None,
            resolved_nhs_number: None,
            flagged: false,
            rematch_attempts: 0,
            key_id: None,
            created_at: at.into(),
            updated_at: at.into(),
        }
    }

    #[test]
    fn only_an_attendance_the_mpi_may_learn_from_needs_a_savepoint() {
        let plain = attendance(None, Some("CW"));
        let with_identifier = attendance(Some("CW-7"), Some("CW"));
        let without_region = attendance(Some("CW-7"), None);
        assert!(!needs_savepoint(&plain));
        assert!(needs_savepoint(&with_identifier));
        assert!(!needs_savepoint(&without_region));
    }
}
