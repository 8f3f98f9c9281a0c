//! Rows as diesel reads and writes them, with the queries that belong to each table beside them.
//! These are storage shapes; `domain` and `api` turn them into and out of checked values.

use super::schema::{accesses, api_keys, organisations, plans};
use super::stamp::{Day, Stamp};
use super::DbConnection;
use chrono::{NaiveDate, NaiveDateTime};
use diesel::prelude::*;
use diesel::result::Error;

pub const PAGE_SIZE: i64 = 50;

#[derive(Debug, Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = organisations, treat_none_as_default_value = false)]
pub struct Organisation {
    pub ods_code: String,
    pub name: String,
    pub kind: String,
    pub region: Option<String>,
    pub office_phone: Option<String>,
    pub emergency_duty_phone: Option<String>,
    pub email: Option<String>,
    pub created_at: Stamp,
    pub updated_at: Stamp,
}

/// What a request needs of its key's organisation: its name (the setting's name in notifications) and region.
#[derive(Debug, Clone, Queryable)]
pub struct KeyOrg {
    pub name: String,
    pub region: Option<String>,
}

impl Organisation {
    pub fn find(conn: &mut DbConnection, ods: &str) -> Result<Option<Self>, Error> {
        crate::on_backend!(conn, |c| organisations::table
            .find(ods)
            .select(Self::as_select())
            .first(c)
            .optional())
    }

    /// The organisations of a few codes (a child's responsible authorities), one cached primary-key lookup
    /// each: an `IN` list of varying length would be parsed and planned afresh on every call.
    pub fn find_many(conn: &mut DbConnection, codes: &[String]) -> Result<Vec<Self>, Error> {
        let mut found = Vec::with_capacity(codes.len());
        for code in codes {
            found.extend(Self::find(conn, code)?);
        }
        Ok(found)
    }

    /// Inserts, or updates everything but `created_at`; answers whether the row was new.
    pub fn upsert(conn: &mut DbConnection, org: &Organisation) -> Result<bool, Error> {
        match Self::find(conn, &org.ods_code)? {
            None => {
                diesel::insert_into(organisations::table)
                    .values(org)
                    .execute(conn)?;
                Ok(true)
            }
            Some(existing) => {
                let updated = Organisation {
                    created_at: existing.created_at,
                    ..org.clone()
                };
                diesel::update(organisations::table.find(&org.ods_code))
                    .set(&updated)
                    .execute(conn)?;
                Ok(false)
            }
        }
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = api_keys, treat_none_as_default_value = false)]
pub struct ApiKeyRow {
    pub id: String,
    pub org_ods: String,
    /// Comma-separated role names.
    pub roles: String,
    /// SHA-256 of the key, hex. The key itself is never stored.
    pub key_hash: String,
    pub created_at: Stamp,
    pub revoked_at: Option<Stamp>,
}

impl ApiKeyRow {
    pub fn insert(conn: &mut DbConnection, row: &ApiKeyRow) -> Result<(), Error> {
        diesel::insert_into(api_keys::table)
            .values(row)
            .execute(conn)
            .map(|_| ())
    }

    /// The active key with this hash, with its organisation's region.
    pub fn find_active_by_hash(
        conn: &mut DbConnection,
        hash: &str,
    ) -> Result<Option<(Self, KeyOrg)>, Error> {
        api_keys::table
            .inner_join(organisations::table)
            .filter(api_keys::key_hash.eq(hash))
            .filter(api_keys::revoked_at.is_null())
            .select((
                Self::as_select(),
                (organisations::name, organisations::region),
            ))
            .first(conn)
            .optional()
    }

    pub fn find(conn: &mut DbConnection, key_id: &str) -> Result<Option<Self>, Error> {
        api_keys::table
            .find(key_id)
            .select(Self::as_select())
            .first(conn)
            .optional()
    }

    pub fn revoke(conn: &mut DbConnection, key_id: &str, at: NaiveDateTime) -> Result<bool, Error> {
        diesel::update(
            api_keys::table
                .find(key_id)
                .filter(api_keys::revoked_at.is_null()),
        )
        .set(api_keys::revoked_at.eq(Some(Stamp(at))))
        .execute(conn)
        .map(|n| n == 1)
    }

    pub fn list(conn: &mut DbConnection) -> Result<Vec<Self>, Error> {
        api_keys::table
            .order(api_keys::created_at.asc())
            .select(Self::as_select())
            .load(conn)
    }
}

#[derive(Debug, Clone, PartialEq, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = plans, treat_none_as_default_value = false, treat_none_as_null = true)]
pub struct PlanRow {
    pub id: String,
    pub la_ods: String,
    pub local_reference: String,
    pub nhs_number: String,
    pub plan_type: String,
    pub start_date: Day,
    pub end_date: Option<Day>,
    pub delete_date: Option<Day>,
    pub expected_delivery_date: Option<Day>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub birth_date: Option<Day>,
    pub sex: Option<String>,
    pub postcode: Option<String>,
    pub office_phone: Option<String>,
    pub emergency_duty_phone: Option<String>,
    pub email: Option<String>,
    pub version: i32,
    pub created_at: Stamp,
    pub updated_at: Stamp,
    /// Set by the `expire` job once the end date has passed.
    pub ended_at: Option<Stamp>,
}

/// Which plans a search returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Any,
    Active,
    Ended,
}

#[cfg(test)]
impl PlanRow {
    /// A plan of `kind` from `start` with only what identifies it set (plan `p` of authority `E1`), for a unit test
    /// to adjust with struct update syntax.
    pub fn sample(kind: &str, start: NaiveDate) -> Self {
        let at = start.and_time(chrono::NaiveTime::MIN);
        PlanRow {
            id: "p".into(),
            la_ods: "E1".into(),
            local_reference: "r".into(),
            nhs_number: "9434765919".into(),
            plan_type: kind.into(),
            start_date: start.into(),
            end_date: None,
            delete_date: None,
            expected_delivery_date: None,
            given_name: None,
            family_name: None,
            birth_date: None,
            sex: None,
            postcode: None,
            office_phone: None,
            emergency_duty_phone: None,
            email: None,
            version: 1,
            created_at: at.into(),
            updated_at: at.into(),
            ended_at: None,
        }
    }
}

impl PlanRow {
    /// Whether the plan is in force on `today`.
    pub fn status(&self, today: NaiveDate) -> crate::domain::PlanStatus {
        crate::domain::PlanStatus::of(self.end_date.map(Into::into), today)
    }

    pub fn find(conn: &mut DbConnection, plan_id: &str) -> Result<Option<Self>, Error> {
        plans::table
            .find(plan_id)
            .select(Self::as_select())
            .first(conn)
            .optional()
    }

    pub fn find_by_reference(
        conn: &mut DbConnection,
        la: &str,
        reference: &str,
    ) -> Result<Option<Self>, Error> {
        plans::table
            .filter(plans::la_ods.eq(la))
            .filter(plans::local_reference.eq(reference))
            .select(Self::as_select())
            .first(conn)
            .optional()
    }

    pub fn insert(conn: &mut DbConnection, row: &PlanRow) -> Result<(), Error> {
        diesel::insert_into(plans::table)
            .values(row)
            .execute(conn)
            .map(|_| ())
    }

    pub fn update(conn: &mut DbConnection, row: &PlanRow) -> Result<(), Error> {
        diesel::update(plans::table.find(&row.id))
            .set(row)
            .execute(conn)
            .map(|_| ())
    }

    /// Every plan held against an NHS number, oldest first, each with its responsible authority, in one query
    /// (on PostgreSQL, one round trip rather than one more per authority).
    pub fn for_nhs_number(
        conn: &mut DbConnection,
        nhs: &str,
    ) -> Result<Vec<(Self, Option<Organisation>)>, Error> {
        crate::on_backend!(conn, |c| plans::table
            .left_join(organisations::table.on(organisations::ods_code.eq(plans::la_ods)))
            .filter(plans::nhs_number.eq(nhs))
            .order((plans::start_date.asc(), plans::id.asc()))
            .select((Self::as_select(), Option::<Organisation>::as_select()))
            .load(c))
    }

    /// One page of plans, newest registration first, with the total count.
    pub fn search(
        conn: &mut DbConnection,
        la: Option<&str>,
        nhs: Option<&str>,
        status: StatusFilter,
        today: NaiveDate,
        page: i64,
    ) -> Result<(Vec<Self>, i64), Error> {
        let filtered = || {
            let mut q = plans::table.into_boxed();
            if let Some(la) = la {
                q = q.filter(plans::la_ods.eq(la.to_string()));
            }
            if let Some(nhs) = nhs {
                q = q.filter(plans::nhs_number.eq(nhs.to_string()));
            }
            match status {
                StatusFilter::Any => q,
                StatusFilter::Active => {
                    q.filter(plans::end_date.is_null().or(plans::end_date.ge(Day(today))))
                }
                StatusFilter::Ended => q.filter(plans::end_date.lt(Day(today))),
            }
        };
        let total = filtered().count().get_result(conn)?;
        let rows = filtered()
            .order((plans::created_at.desc(), plans::id.asc()))
            .limit(PAGE_SIZE)
            .offset(page.saturating_sub(1).saturating_mul(PAGE_SIZE))
            .select(Self::as_select())
            .load(conn)?;
        Ok((rows, total))
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = accesses, treat_none_as_default_value = false)]
pub struct AccessRow {
    pub id: String,
    pub nhs_number: String,
    pub at: Stamp,
    pub setting_ods: String,
    pub setting_type: Option<String>,
    /// `check` or `attendance`.
    pub kind: String,
    /// `unscheduled` or `scheduled`.
    pub access: String,
    pub practitioner_name: Option<String>,
    pub practitioner_role: Option<String>,
    pub key_id: Option<String>,
}

/// A recent access with the setting's name, as a clinician sees it.
#[derive(Debug, Clone, Queryable)]
pub struct RecentAccess {
    pub id: String,
    /// `check` or `attendance`.
    pub kind: String,
    pub at: Stamp,
    pub setting_ods: String,
    pub setting_name: Option<String>,
    pub setting_type: Option<String>,
}

impl AccessRow {
    /// Records an access; inside the group-commit writer it joins the batch's multi-row insert
    /// ([`crate::db::deferred`]).
    pub fn insert(conn: &mut DbConnection, row: AccessRow) -> Result<(), Error> {
        let Some(row) = crate::db::deferred::keep(row, |d| &mut d.accesses) else {
            return Ok(());
        };
        crate::db::insert_accesses(conn, std::slice::from_ref(&row)).map(|_| ())
    }

    /// The most recent unscheduled accesses and attendances, newest first.
    pub fn recent_unscheduled(
        conn: &mut DbConnection,
        nhs: &str,
        limit: i64,
    ) -> Result<Vec<RecentAccess>, Error> {
        crate::on_backend!(conn, |c| accesses::table
            .left_join(organisations::table.on(organisations::ods_code.eq(accesses::setting_ods)))
            .filter(accesses::nhs_number.eq(nhs))
            .filter(accesses::access.eq("unscheduled"))
            .order((accesses::at.desc(), accesses::id.desc()))
            .limit(limit)
            .select((
                accesses::id,
                accesses::kind,
                accesses::at,
                accesses::setting_ods,
                organisations::name.nullable(),
                accesses::setting_type,
            ))
            .load(c))
    }
}
