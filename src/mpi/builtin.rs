//! The built-in MPI: persons and their per-region identifier links in cpis's own database, resolved by NHS
//! number, then a linked local identifier, then demographics. Demographic lookups read only the persons that
//! share a blocking key with the query (birth date or its day-month swap, name codes either way round, postcode
//! and birth year), each capped, so a lookup touches a few hundred rows however many persons there are.

use super::matcher::{self, Record};
use super::{
    Candidate, LocalIdentifier, MatchStatus, Method, Mpi, MpiError, PatientQuery, Resolution,
    Thresholds,
};
use crate::db::models::{Organisation, PlanRow};
use crate::db::schema::{person_identifiers, persons};
use crate::db::stamp::{Day, Stamp};
use crate::db::{Db, DbConnection, DbError};
use crate::domain::Demographics;
use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::result::Error;

/// How many persons one blocking key may bring in; a key shared by more is too common to be useful alone.
const PER_KEY_LIMIT: i64 = 200;
/// How many scored candidates a resolution reports.
const REPORTED_CANDIDATES: usize = 5;
/// Candidates scoring below this are not worth reporting.
const REPORT_FLOOR: f64 = 0.3;

#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = persons, treat_none_as_default_value = false, treat_none_as_null = true)]
pub struct PersonRow {
    pub id: String,
    pub nhs_number: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub birth_date: Option<Day>,
    pub sex: Option<String>,
    pub postcode: Option<String>,
    pub name_key: Option<String>,
    pub postcode_key: Option<String>,
    pub created_at: Stamp,
    pub updated_at: Stamp,
}

impl PersonRow {
    fn record(&self) -> Record<'_> {
        Record {
            nhs_number: self.nhs_number.as_deref(),
            given_name: self.given_name.as_deref(),
            family_name: self.family_name.as_deref(),
            birth_date: self.birth_date.map(Into::into),
            sex: self.sex.as_deref(),
            postcode: self.postcode.as_deref(),
        }
    }

    /// Recomputes the blocking keys after the demographics change.
    fn rekey(&mut self) {
        self.name_key = match (&self.given_name, &self.family_name) {
            (Some(g), Some(f)) => matcher::name_key(g, f),
            _ => None,
        };
        self.postcode_key = match (&self.postcode, self.birth_date) {
            (Some(p), Some(d)) => Some(matcher::postcode_key(p, *d)),
            _ => None,
        };
    }

    pub fn find_by_nhs(conn: &mut DbConnection, nhs: &str) -> Result<Option<Self>, Error> {
        crate::on_backend!(conn, |c| persons::table
            .filter(persons::nhs_number.eq(nhs))
            .select(Self::as_select())
            .first(c)
            .optional())
    }

    /// Whether a person with this NHS number is known, read from the NHS number's index alone (no table row).
    pub fn is_known(conn: &mut DbConnection, nhs: &str) -> Result<bool, Error> {
        crate::on_backend!(conn, |c| diesel::select(diesel::dsl::exists(
            persons::table
                .filter(persons::nhs_number.eq(nhs))
                .select(persons::nhs_number)
        ))
        .get_result(c))
    }

    pub fn find(conn: &mut DbConnection, id: &str) -> Result<Option<Self>, Error> {
        persons::table
            .find(id)
            .select(Self::as_select())
            .first(conn)
            .optional()
    }
}

pub struct BuiltinMpi {
    db: Db,
    thresholds: Thresholds,
}

impl BuiltinMpi {
    pub fn new(db: Db, thresholds: Thresholds) -> Self {
        Self { db, thresholds }
    }
}

impl From<DbError> for MpiError {
    fn from(e: DbError) -> Self {
        MpiError::Unavailable(format!("built-in MPI: {e}"))
    }
}

#[async_trait::async_trait]
impl Mpi for BuiltinMpi {
    async fn resolve(&self, query: &PatientQuery) -> Result<Resolution, MpiError> {
        let query = query.clone();
        let thresholds = self.thresholds;
        self.db
            .run(move |conn| {
                resolve(conn, &query, thresholds).map_err(|e| MpiError::from(DbError::Query(e)))
            })
            .await
    }

    fn in_database(&self, _query: &PatientQuery) -> Option<Thresholds> {
        Some(self.thresholds)
    }
}

/// What a caller needs of a person matched by NHS number: an attendance records the person's id; a flag check
/// needs only to know the person is known, which the NHS number's index answers without reading the person's row
/// (a hit reads a fifth fewer pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    PersonId,
    MatchOnly,
}

/// The plans held against one NHS number, each with its responsible authority (none if the authority is not in
/// the directory), earliest start first.
pub type PlansFound = Vec<(PlanRow, Option<Organisation>)>;

/// A resolution, and the plans held against its NHS number when the lookup that matched it read them too
/// ([`find_with_plans`]); `None` when they are still to be read.
#[derive(Debug)]
pub struct Resolved {
    pub resolution: Resolution,
    pub plans: Option<PlansFound>,
}

impl From<Resolution> for Resolved {
    fn from(resolution: Resolution) -> Self {
        Resolved {
            resolution,
            plans: None,
        }
    }
}

/// The person with this NHS number (their id when `needs` asks for it) and the plans held against it; `None` if
/// no person has it.
///
/// On PostgreSQL, where each statement is a round trip, in one statement: the NHS number's index joined to the
/// plans and their authorities. A hit or an attendance by NHS number then makes one round trip for both where it
/// made two, and PostgreSQL spends 40 to 60 µs less on it; a miss, which finds no person, costs 5 to 7 µs more
/// than looking up the index alone (pgbench, BENCHMARKS.md). On SQLite, which reads in-process, the join cost
/// misses 10 µs and hits 5 µs more than two statements (the joined tables' cursors are opened for every lookup),
/// so there the person is looked up first and the plans read only for a known person.
pub fn find_with_plans(
    conn: &mut DbConnection,
    nhs: &str,
    needs: Needs,
) -> Result<Option<(Option<String>, PlansFound)>, Error> {
    use crate::db::schema::{organisations, plans};
    let c = match conn {
        DbConnection::Postgres(c) => c,
        DbConnection::Sqlite(_) => {
            let person_id = match needs {
                Needs::PersonId => match PersonRow::find_by_nhs(conn, nhs)? {
                    Some(person) => Some(person.id),
                    None => return Ok(None),
                },
                Needs::MatchOnly if PersonRow::is_known(conn, nhs)? => None,
                Needs::MatchOnly => return Ok(None),
            };
            return Ok(Some((person_id, PlanRow::for_nhs_number(conn, nhs)?)));
        }
    };
    // `$person` is the first column: the person's id, or for a check their NHS number (read from the index).
    macro_rules! joined {
        ($person:expr) => {
            persons::table
                .left_join(plans::table.on(plans::nhs_number.nullable().eq(persons::nhs_number)))
                .left_join(
                    organisations::table.on(organisations::ods_code
                        .nullable()
                        .eq(plans::la_ods.nullable())),
                )
                .filter(persons::nhs_number.eq(nhs))
                .select((
                    $person,
                    Option::<PlanRow>::as_select(),
                    Option::<Organisation>::as_select(),
                ))
                .load::<(Option<String>, Option<PlanRow>, Option<Organisation>)>(c)?
        };
    }
    let rows = match needs {
        Needs::PersonId => joined!(persons::id.nullable()),
        Needs::MatchOnly => joined!(persons::nhs_number),
    };
    let Some((first, _, _)) = rows.first() else {
        return Ok(None);
    };
    let person_id = match needs {
        Needs::PersonId => first.clone(),
        Needs::MatchOnly => None,
    };
    let mut plans: PlansFound = rows
        .into_iter()
        .filter_map(|(_, plan, org)| plan.map(|p| (p, org)))
        .collect();
    // Sorted here, as `PlanRow::for_nhs_number` sorts them, rather than by the statement: a sort step adds
    // about a tenth to a miss's CPU in PostgreSQL, though a miss reads no plan (pgbench, BENCHMARKS.md).
    plans.sort_by(|(a, _), (b, _)| (a.start_date, &a.id).cmp(&(b.start_date, &b.id)));
    Ok(Some((person_id, plans)))
}

/// NHS number, then linked identifier, then demographics; the first that finds someone wins. For the `Mpi` trait,
/// whose callers read the plans themselves if they need them: a person matched by NHS number is read alone.
pub fn resolve(
    conn: &mut DbConnection,
    query: &PatientQuery,
    thresholds: Thresholds,
) -> Result<Resolution, Error> {
    let by_nhs = |conn: &mut DbConnection, nhs: &str| {
        Ok(PersonRow::find_by_nhs(conn, nhs)?.map(|p| (Some(p.id), None)))
    };
    resolve_by(conn, query, thresholds, by_nhs).map(|r| r.resolution)
}

/// [`resolve`], leaving out a person's id matched by NHS number when the caller does not need it. A match by NHS
/// number comes with the plans held against it, read in the same statement ([`find_with_plans`]).
pub fn resolve_for(
    conn: &mut DbConnection,
    query: &PatientQuery,
    thresholds: Thresholds,
    needs: Needs,
) -> Result<Resolved, Error> {
    let by_nhs = |conn: &mut DbConnection, nhs: &str| {
        Ok(find_with_plans(conn, nhs, needs)?.map(|(id, plans)| (id, Some(plans))))
    };
    resolve_by(conn, query, thresholds, by_nhs)
}

/// The chain both share; `by_nhs` finds a person by NHS number: their id, and the plans if it read them.
fn resolve_by(
    conn: &mut DbConnection,
    query: &PatientQuery,
    thresholds: Thresholds,
    by_nhs: impl FnOnce(
        &mut DbConnection,
        &str,
    ) -> Result<Option<(Option<String>, Option<PlansFound>)>, Error>,
) -> Result<Resolved, Error> {
    if let Some(nhs) = &query.nhs_number {
        let nhs = nhs.as_str();
        if let Some((person_id, plans)) = by_nhs(conn, nhs)? {
            return Ok(Resolved {
                resolution: Resolution::matched(
                    Method::NhsNumber,
                    Some(nhs.to_string()),
                    person_id,
                ),
                plans,
            });
        }
    }
    if let Some(identifier) = &query.identifier {
        if let Some(p) = find_by_identifier(conn, identifier)? {
            return Ok(Resolution::matched(Method::Identifier, p.nhs_number, Some(p.id)).into());
        }
    }
    if let Some(demographics) = &query.demographics {
        if can_match(demographics) {
            return Ok(Resolution::from_candidates(
                score_candidates(conn, &query.record())?,
                thresholds,
            )
            .into());
        }
    }
    Ok(Resolution::none(
        if query.identifier.is_some() && query.nhs_number.is_none() {
            Method::Identifier
        } else if query.nhs_number.is_some() {
            Method::NhsNumber
        } else {
            Method::Demographics
        },
    )
    .into())
}

/// Demographic matching needs a birth date and a name; less than that cannot tell children apart.
pub fn can_match(d: &Demographics) -> bool {
    d.birth_date.is_some() && (d.family_name.is_some() || d.given_name.is_some())
}

pub fn find_by_identifier(
    conn: &mut DbConnection,
    id: &LocalIdentifier,
) -> Result<Option<PersonRow>, Error> {
    persons::table
        .inner_join(person_identifiers::table)
        .filter(person_identifiers::system.eq(&id.system))
        .filter(person_identifiers::value.eq(&id.value))
        .select(PersonRow::as_select())
        .first(conn)
        .optional()
}

/// The persons sharing a blocking key with the record, scored, best first.
pub fn score_candidates(conn: &mut DbConnection, record: &Record) -> Result<Vec<Candidate>, Error> {
    let mut found: Vec<PersonRow> = Vec::new();
    let mut add = |rows: Vec<PersonRow>| {
        for r in rows {
            if !found.iter().any(|f| f.id == r.id) {
                found.push(r);
            }
        }
    };
    if let Some(dob) = record.birth_date {
        let mut dates = vec![dob];
        dates.extend(matcher::swapped(dob));
        add(persons::table
            .filter(persons::birth_date.eq_any(dates))
            .limit(PER_KEY_LIMIT)
            .select(PersonRow::as_select())
            .load(conn)?);
        if let Some(pc) = record.postcode {
            let key = matcher::postcode_key(pc, dob);
            add(persons::table
                .filter(persons::postcode_key.eq(key))
                .limit(PER_KEY_LIMIT)
                .select(PersonRow::as_select())
                .load(conn)?);
        }
    }
    if let (Some(g), Some(f)) = (record.given_name, record.family_name) {
        let keys: Vec<String> = [matcher::name_key(g, f), matcher::name_key(f, g)]
            .into_iter()
            .flatten()
            .collect();
        add(persons::table
            .filter(persons::name_key.eq_any(keys))
            .limit(PER_KEY_LIMIT)
            .select(PersonRow::as_select())
            .load(conn)?);
    }
    let mut scored: Vec<Candidate> = found
        .iter()
        .map(|p| {
            let s = matcher::score(record, &p.record());
            Candidate {
                person_id: Some(p.id.clone()),
                nhs_number: p.nhs_number.clone(),
                status: MatchStatus::None,
                score: s.score,
                parts: s.parts,
            }
        })
        .filter(|c| c.score >= REPORT_FLOOR)
        .collect();
    scored.sort_by(|a, b| b.score.total_cmp(&a.score));
    scored.truncate(REPORTED_CANDIDATES);
    Ok(scored)
}

/// Takes the demographics given as the newest known; answers whether anything changed.
fn apply_demographics(row: &mut PersonRow, d: &Demographics) -> bool {
    fn take<T: PartialEq>(field: &mut Option<T>, given: Option<T>) -> bool {
        match given {
            Some(v) if field.as_ref() != Some(&v) => {
                *field = Some(v);
                true
            }
            _ => false,
        }
    }
    let changed = [
        take(
            &mut row.given_name,
            d.given_name.as_ref().map(|g| g.as_str().to_string()),
        ),
        take(
            &mut row.family_name,
            d.family_name.as_ref().map(|f| f.as_str().to_string()),
        ),
        take(&mut row.birth_date, d.birth_date.map(Day)),
        take(&mut row.sex, d.sex.map(|s| s.as_str().to_string())),
        take(
            &mut row.postcode,
            d.postcode.as_ref().map(|p| p.as_str().to_string()),
        ),
    ]
    .contains(&true);
    if changed {
        row.rekey();
    }
    changed
}

/// Applies demographics to a stored person and writes the row back if they changed anything.
fn update_demographics(
    conn: &mut DbConnection,
    now: NaiveDateTime,
    row: &mut PersonRow,
    d: &Demographics,
) -> Result<(), Error> {
    if apply_demographics(row, d) {
        row.updated_at = now.into();
        diesel::update(persons::table.find(&row.id))
            .set(&*row)
            .execute(conn)?;
    }
    Ok(())
}

impl PersonRow {
    /// A new person with no demographics yet.
    pub fn blank(nhs: Option<&str>, now: NaiveDateTime) -> Self {
        PersonRow {
            id: crate::db::new_id(),
            nhs_number: nhs.map(str::to_string),
            given_name: None,
            family_name: None,
            birth_date: None,
            sex: None,
            postcode: None,
            name_key: None,
            postcode_key: None,
            created_at: now.into(),
            updated_at: now.into(),
        }
    }
}

/// Finds or makes the person for an NHS number (or a new person without one), taking any demographics given
/// as the newest known. Answers the person's id.
pub fn upsert_person(
    conn: &mut DbConnection,
    now: NaiveDateTime,
    nhs: Option<&str>,
    d: &Demographics,
) -> Result<String, Error> {
    if let Some(nhs) = nhs {
        if let Some(mut row) = PersonRow::find_by_nhs(conn, nhs)? {
            update_demographics(conn, now, &mut row, d)?;
            return Ok(row.id);
        }
    }
    let mut row = PersonRow::blank(nhs, now);
    apply_demographics(&mut row, d);
    diesel::insert_into(persons::table)
        .values(&row)
        .execute(conn)?;
    Ok(row.id)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linked {
    Created,
    Unchanged,
    /// The identifier pointed at someone else before; the feed is authoritative for its own region.
    Moved,
}

impl Linked {
    pub fn as_str(self) -> &'static str {
        match self {
            Linked::Created => "created",
            Linked::Unchanged => "unchanged",
            Linked::Moved => "moved",
        }
    }
}

pub fn link_identifier(
    conn: &mut DbConnection,
    now: NaiveDateTime,
    region: &str,
    id: &LocalIdentifier,
    person_id: &str,
) -> Result<Linked, Error> {
    let existing: Option<String> = person_identifiers::table
        .find((&id.system, &id.value))
        .select(person_identifiers::person_id)
        .first(conn)
        .optional()?;
    match existing {
        None => {
            diesel::insert_into(person_identifiers::table)
                .values((
                    person_identifiers::system.eq(&id.system),
                    person_identifiers::value.eq(&id.value),
                    person_identifiers::region.eq(region),
                    person_identifiers::person_id.eq(person_id),
                    person_identifiers::created_at.eq(Stamp(now)),
                    person_identifiers::updated_at.eq(Stamp(now)),
                ))
                .execute(conn)?;
            Ok(Linked::Created)
        }
        Some(current) if current == person_id => Ok(Linked::Unchanged),
        Some(_) => {
            diesel::update(person_identifiers::table.find((&id.system, &id.value)))
                .set((
                    person_identifiers::person_id.eq(person_id),
                    person_identifiers::region.eq(region),
                    person_identifiers::updated_at.eq(Stamp(now)),
                ))
                .execute(conn)?;
            Ok(Linked::Moved)
        }
    }
}

/// Bulk insert for benchmarks and the evaluation tool: persons with their keys computed, no audit.
pub fn insert_persons(conn: &mut DbConnection, rows: &mut [PersonRow]) -> Result<(), Error> {
    for r in rows.iter_mut() {
        r.rekey();
    }
    crate::db::insert_persons(conn, rows)?;
    Ok(())
}

/// `upsert_person` for many NHS numbers at once (a bulk file): one query finds who exists, new persons go in
/// with multi-row inserts, known ones are updated only when their demographics change.
pub fn upsert_persons(
    conn: &mut DbConnection,
    now: NaiveDateTime,
    people: &[(&str, &Demographics)],
) -> Result<(), Error> {
    let numbers: Vec<&str> = people.iter().map(|(n, _)| *n).collect();
    let mut existing: std::collections::HashMap<String, PersonRow> = persons::table
        .filter(persons::nhs_number.eq_any(&numbers))
        .select(PersonRow::as_select())
        .load(conn)?
        .into_iter()
        .filter_map(|p| Some((p.nhs_number.clone()?, p)))
        .collect();
    let mut fresh: Vec<PersonRow> = Vec::with_capacity(people.len());
    // A child may be on more than one row of a file: where each new person is in `fresh`.
    let mut fresh_at: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (nhs, d) in people {
        if let Some(row) = existing.get_mut(*nhs) {
            update_demographics(conn, now, row, d)?;
        } else if let Some(&at) = fresh_at.get(*nhs) {
            apply_demographics(&mut fresh[at], d);
        } else {
            let mut row = PersonRow::blank(Some(nhs), now);
            apply_demographics(&mut row, d);
            fresh_at.insert(nhs, fresh.len());
            fresh.push(row);
        }
    }
    // Their keys were computed as their demographics were applied.
    crate::db::insert_persons(conn, &fresh)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::NhsNumber;

    /// On SQLite a flag check by NHS number asks first whether the person is known, which the NHS number's index
    /// answers without reading the person's row, and reads plans only for a known person; an attendance, which
    /// records the person, gets the id. Either way an unknown number matches no one. (PostgreSQL's one-statement
    /// lookup, and the plans both bring, are checked in `tests/api/flag_checks.rs`.)
    #[test]
    fn on_sqlite_a_check_reads_the_person_from_the_index_alone_and_plans_only_for_a_known_person() {
        let mut conn = crate::db::tests::memory_sqlite();
        let now = chrono::NaiveDate::from_ymd_opt(2026, 11, 1)
            .unwrap()
            .and_hms_opt(9, 0, 0)
            .unwrap();
        let id =
            upsert_person(&mut conn, now, Some("9434765919"), &Demographics::default()).unwrap();
        let thresholds = Thresholds {
            matched: 0.8,
            possible: 0.5,
        };
        let query = |nhs: &str| PatientQuery {
            nhs_number: Some(NhsNumber::parse(nhs).unwrap()),
            ..Default::default()
        };

        let (check, plans) = crate::db::tests::query_plans(&mut conn, |c| {
            resolve_for(c, &query("9434765919"), thresholds, Needs::MatchOnly).unwrap()
        });
        assert_eq!(check.resolution.status, MatchStatus::Matched);
        assert_eq!(check.resolution.method, Method::NhsNumber);
        assert_eq!(check.resolution.nhs_number.as_deref(), Some("9434765919"));
        assert_eq!(check.resolution.person_id, None);
        assert_eq!(check.plans.map(|p| p.len()), Some(0));
        let [person, plans] = &plans[..] else {
            panic!("the person, then the plans: {plans:?}")
        };
        let step = |plan: &[String], step: &str| {
            assert!(plan.iter().any(|s| s.contains(step)), "{step}: {plan:?}")
        };
        step(person, "SEARCH persons USING COVERING INDEX");
        step(plans, "SEARCH plans USING INDEX plans_nhs_number");

        let attendance =
            resolve_for(&mut conn, &query("9434765919"), thresholds, Needs::PersonId).unwrap();
        assert_eq!(attendance.resolution.status, MatchStatus::Matched);
        assert_eq!(attendance.resolution.person_id, Some(id));

        for needs in [Needs::MatchOnly, Needs::PersonId] {
            let (unknown, plans) = crate::db::tests::query_plans(&mut conn, |c| {
                resolve_for(c, &query("9434765870"), thresholds, needs).unwrap()
            });
            assert_eq!(unknown.resolution.status, MatchStatus::None, "{needs:?}");
            assert_eq!(unknown.resolution.person_id, None);
            assert!(unknown.plans.is_none(), "{needs:?}");
            assert_eq!(
                plans.len(),
                1,
                "no plans read for an unknown child: {plans:?}"
            );
        }
    }
}
