//! Protection plans: checking a registration, storing it idempotently on the local authority's own reference,
//! applying changes, and shaping a plan for its owner. Used by the API and (later) the bulk importer alike.

use crate::audit::{self, Actor, Event};
use crate::clock::format_timestamp;
use crate::db::models::{Organisation, PlanRow};
use crate::db::stamp::{Day, Stamp};
use crate::db::DbConnection;
use crate::domain::{
    parse_date, parse_email, parse_phone, Demographics, NhsNumber, PersonName, PlanType, Postcode,
    Sex,
};
use crate::error::{ApiError, Validator};
use chrono::{NaiveDate, NaiveDateTime};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanBody {
    pub local_reference: Option<String>,
    pub nhs_number: Option<String>,
    pub plan_type: Option<String>,
    pub start_date: Option<String>,
    pub end_date: Option<String>,
    pub delete_date: Option<String>,
    pub expected_delivery_date: Option<String>,
    pub child: Option<ChildBody>,
    pub contacts: Option<ContactsBody>,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChildBody {
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub birth_date: Option<String>,
    pub sex: Option<String>,
    pub postcode: Option<String>,
}

/// Contacts for this plan where they differ from the local authority's own (a named team, say).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactsBody {
    pub office_phone: Option<String>,
    pub emergency_duty_phone: Option<String>,
    pub email: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contacts {
    pub office_phone: Option<String>,
    pub emergency_duty_phone: Option<String>,
    pub email: Option<String>,
}

/// A registration whose every field has been checked.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub local_reference: String,
    pub nhs_number: NhsNumber,
    pub plan_type: PlanType,
    pub start_date: NaiveDate,
    pub end_date: Option<NaiveDate>,
    pub delete_date: Option<NaiveDate>,
    pub expected_delivery_date: Option<NaiveDate>,
    pub child: Demographics,
    pub contacts: Contacts,
}

pub fn parse_reference(input: &str) -> Result<String, String> {
    let r = input.trim();
    if r.is_empty() || r.chars().count() > 64 || r.chars().any(char::is_control) {
        return Err("must be 1 to 64 characters without control characters".into());
    }
    Ok(r.to_string())
}

fn required<T>(
    v: &mut Validator,
    field: &str,
    value: Option<String>,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Option<T> {
    match value {
        None => {
            v.push(field, "is required");
            None
        }
        Some(s) => v.check(field, parse(&s)),
    }
}

pub fn parse_child(
    v: &mut Validator,
    prefix: &str,
    child: ChildBody,
    today: NaiveDate,
) -> Demographics {
    // The field's full name is only written out for an error: a bulk file parses a child per row.
    fn field<T>(
        v: &mut Validator,
        prefix: &str,
        name: &str,
        value: Option<String>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match parse(&value?) {
            Ok(parsed) => Some(parsed),
            Err(message) => {
                v.push(&format!("{prefix}{name}"), message);
                None
            }
        }
    }
    let birth_date = field(v, prefix, "birth_date", child.birth_date, |s| {
        let d = parse_date(s)?;
        if d > today {
            return Err("must not be in the future".into());
        }
        Ok(d)
    });
    Demographics {
        given_name: field(v, prefix, "given_name", child.given_name, PersonName::parse),
        family_name: field(
            v,
            prefix,
            "family_name",
            child.family_name,
            PersonName::parse,
        ),
        birth_date,
        sex: field(v, prefix, "sex", child.sex, Sex::parse),
        postcode: field(v, prefix, "postcode", child.postcode, Postcode::parse),
    }
}

pub fn parse_contacts(v: &mut Validator, c: ContactsBody) -> Contacts {
    Contacts {
        office_phone: v.optional("contacts.office_phone", c.office_phone, |s| parse_phone(&s)),
        emergency_duty_phone: v.optional(
            "contacts.emergency_duty_phone",
            c.emergency_duty_phone,
            |s| parse_phone(&s),
        ),
        email: v.optional("contacts.email", c.email, |s| parse_email(&s)),
    }
}

/// The rules that tie a plan's dates together, checked on registration and on every change.
pub fn check_dates(
    v: &mut Validator,
    plan_type: Option<PlanType>,
    start: Option<NaiveDate>,
    end: Option<NaiveDate>,
    delete: Option<NaiveDate>,
    edd: Option<NaiveDate>,
) {
    if let (Some(start), Some(end)) = (start, end) {
        if end < start {
            v.push("end_date", "must not be before start_date");
        }
    }
    if let Some(delete) = delete {
        if end.is_some_and(|end| delete < end) {
            v.push("delete_date", "must not be before end_date");
        } else if start.is_some_and(|start| delete < start) {
            v.push("delete_date", "must not be before start_date");
        }
    }
    match plan_type {
        Some(PlanType::Ucpp) if edd.is_none() => v.push(
            "expected_delivery_date",
            "is required for a UCPP (unborn child protection plan)",
        ),
        Some(PlanType::Cpp | PlanType::Lac) if edd.is_some() => {
            v.push("expected_delivery_date", "applies only to UCPP plans")
        }
        _ => {}
    }
}

impl PlanInput {
    pub fn parse(body: PlanBody, today: NaiveDate) -> Result<Self, ApiError> {
        let mut v = Validator::default();
        let local_reference = required(
            &mut v,
            "local_reference",
            body.local_reference,
            parse_reference,
        );
        let nhs_number = required(&mut v, "nhs_number", body.nhs_number, |s| {
            NhsNumber::parse(s).map_err(|e| e.to_string())
        });
        let plan_type = required(&mut v, "plan_type", body.plan_type, PlanType::parse);
        let start_date = required(&mut v, "start_date", body.start_date, parse_date);
        let end_date = v.optional("end_date", body.end_date, |s| parse_date(&s));
        let delete_date = v.optional("delete_date", body.delete_date, |s| parse_date(&s));
        let edd = v.optional("expected_delivery_date", body.expected_delivery_date, |s| {
            parse_date(&s)
        });
        let child = body
            .child
            .map(|c| parse_child(&mut v, "child.", c, today))
            .unwrap_or_default();
        let contacts = body
            .contacts
            .map(|c| parse_contacts(&mut v, c))
            .unwrap_or_default();
        check_dates(&mut v, plan_type, start_date, end_date, delete_date, edd);
        v.finish()?;
        Ok(PlanInput {
            local_reference: local_reference.expect("validated"),
            nhs_number: nhs_number.expect("validated"),
            plan_type: plan_type.expect("validated"),
            start_date: start_date.expect("validated"),
            end_date,
            delete_date,
            expected_delivery_date: edd,
            child,
            contacts,
        })
    }
}

/// What registering did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    Created,
    Updated,
    Unchanged,
}

fn row_from_input(
    input: &PlanInput,
    la: &str,
    id: String,
    version: i32,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
) -> PlanRow {
    PlanRow {
        id,
        la_ods: la.to_string(),
        local_reference: input.local_reference.clone(),
        nhs_number: input.nhs_number.as_str().to_string(),
        plan_type: input.plan_type.as_str().to_string(),
        start_date: input.start_date.into(),
        end_date: input.end_date.map(Day),
        delete_date: input.delete_date.map(Day),
        expected_delivery_date: input.expected_delivery_date.map(Day),
        given_name: input
            .child
            .given_name
            .as_ref()
            .map(|n| n.as_str().to_string()),
        family_name: input
            .child
            .family_name
            .as_ref()
            .map(|n| n.as_str().to_string()),
        birth_date: input.child.birth_date.map(Day),
        sex: input.child.sex.map(|s| s.as_str().to_string()),
        postcode: input
            .child
            .postcode
            .as_ref()
            .map(|p| p.as_str().to_string()),
        office_phone: input.contacts.office_phone.clone(),
        emergency_duty_phone: input.contacts.emergency_duty_phone.clone(),
        email: input.contacts.email.clone(),
        version,
        created_at: created_at.into(),
        updated_at: updated_at.into(),
        ended_at: None,
    }
}

/// A plan sent again under its local reference: `None` when it says what the stored plan says, otherwise the
/// stored plan updated to it (next version; its id, creation and end stay).
fn reregistered(input: &PlanInput, la: &str, old: &PlanRow, now: NaiveDateTime) -> Option<PlanRow> {
    let same = PlanRow {
        ended_at: old.ended_at,
        ..row_from_input(
            input,
            la,
            old.id.clone(),
            old.version,
            *old.created_at,
            *old.updated_at,
        )
    };
    (same != *old).then(|| PlanRow {
        version: old.version + 1,
        updated_at: now.into(),
        ..same
    })
}

/// Registers a plan for local authority `la`: creates it, or updates the plan with the same local reference,
/// or changes nothing when the body is the same as before. Writes the audit event in the same transaction.
pub fn register(
    conn: &mut DbConnection,
    now: NaiveDateTime,
    actor: &Actor,
    la: &str,
    input: &PlanInput,
) -> Result<(PlanRow, Registered), ApiError> {
    let existing = PlanRow::find_by_reference(conn, la, &input.local_reference)?;
    let (row, outcome) = match existing {
        None => {
            let row = row_from_input(input, la, crate::db::new_id(), 1, now, now);
            PlanRow::insert(conn, &row)?;
            (row, Registered::Created)
        }
        Some(old) => match reregistered(input, la, &old, now) {
            None => (old, Registered::Unchanged),
            Some(row) => {
                PlanRow::update(conn, &row)?;
                if old.nhs_number != row.nhs_number {
                    // The plan has moved to another person: the one it left is recorded too.
                    audit::append(
                        conn,
                        now,
                        actor,
                        Event {
                            action: "plan.update",
                            nhs_number: Some(&old.nhs_number),
                            subject: Some(&row.id),
                            outcome: "moved_to_other_nhs_number",
                            ..Default::default()
                        },
                    )?;
                }
                (row, Registered::Updated)
            }
        },
    };
    // The built-in MPI learns every person a plan names (for UCPP, the mother), with the newest demographics.
    if outcome != Registered::Unchanged {
        crate::mpi::builtin::upsert_person(conn, now, Some(&row.nhs_number), &input.child)?;
    }
    let (action, outcome_text) = match outcome {
        Registered::Created => ("plan.create", "created"),
        Registered::Updated => ("plan.update", "updated"),
        Registered::Unchanged => ("plan.register", "unchanged"),
    };
    audit::append(
        conn,
        now,
        actor,
        Event {
            action,
            nhs_number: Some(&row.nhs_number),
            subject: Some(&row.id),
            outcome: outcome_text,
            ..Default::default()
        },
    )?;
    Ok((row, outcome))
}

/// `register` for many plans of one authority at once (a bulk file's rows, references already distinct):
/// one query finds the plans that exist, new ones go in with multi-row inserts, and the audit events are
/// appended together. Same outcomes, same audit trail, far fewer round trips.
pub fn register_many(
    conn: &mut DbConnection,
    now: NaiveDateTime,
    actor: &Actor,
    la: &str,
    inputs: &[PlanInput],
) -> Result<Vec<(PlanRow, Registered)>, ApiError> {
    use crate::db::schema::plans as p;
    use diesel::prelude::*;
    let references: Vec<&str> = inputs.iter().map(|i| i.local_reference.as_str()).collect();
    let existing: std::collections::HashMap<String, PlanRow> = p::table
        .filter(p::la_ods.eq(la))
        .filter(p::local_reference.eq_any(&references))
        .select(PlanRow::as_select())
        .load(conn)?
        .into_iter()
        .map(|r| (r.local_reference.clone(), r))
        .collect();
    // New plans are inserted together and then moved, in order, into the places `None` keeps for them.
    let mut results = Vec::with_capacity(inputs.len());
    let mut fresh = Vec::with_capacity(inputs.len());
    let mut moved: Vec<(String, String)> = Vec::new();
    for input in inputs {
        match existing.get(&input.local_reference) {
            None => {
                fresh.push(row_from_input(input, la, crate::db::new_id(), 1, now, now));
                results.push(None);
            }
            Some(old) => match reregistered(input, la, old, now) {
                None => results.push(Some((old.clone(), Registered::Unchanged))),
                Some(row) => {
                    PlanRow::update(conn, &row)?;
                    if old.nhs_number != row.nhs_number {
                        moved.push((old.nhs_number.clone(), row.id.clone()));
                    }
                    results.push(Some((row, Registered::Updated)));
                }
            },
        }
    }
    crate::db::insert_plans(conn, &fresh)?;
    let mut fresh = fresh.into_iter();
    let results: Vec<(PlanRow, Registered)> = results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| (fresh.next().expect("one new row each"), Registered::Created))
        })
        .collect();
    let people: Vec<(&str, &Demographics)> = inputs
        .iter()
        .zip(&results)
        .filter(|(_, (_, outcome))| *outcome != Registered::Unchanged)
        .map(|(input, _)| (input.nhs_number.as_str(), &input.child))
        .collect();
    crate::mpi::builtin::upsert_persons(conn, now, &people)?;
    let mut events: Vec<Event> = moved
        .iter()
        .map(|(nhs, id)| Event {
            action: "plan.update",
            nhs_number: Some(nhs),
            subject: Some(id),
            outcome: "moved_to_other_nhs_number",
            ..Default::default()
        })
        .collect();
    for (row, outcome) in &results {
        let (action, text) = match outcome {
            Registered::Created => ("plan.create", "created"),
            Registered::Updated => ("plan.update", "updated"),
            Registered::Unchanged => ("plan.register", "unchanged"),
        };
        events.push(Event {
            action,
            nhs_number: Some(&row.nhs_number),
            subject: Some(&row.id),
            outcome: text,
            detail: Some("bulk file".into()),
        });
    }
    audit::append_many(conn, now, actor, events)?;
    Ok(results)
}

/// A plan as its owner (or an admin) sees it.
pub fn to_json(row: &PlanRow, la: Option<&Organisation>, today: NaiveDate) -> Value {
    let child = if row.given_name.is_some()
        || row.family_name.is_some()
        || row.birth_date.is_some()
        || row.sex.is_some()
        || row.postcode.is_some()
    {
        json!({
            "given_name": row.given_name,
            "family_name": row.family_name,
            "birth_date": row.birth_date,
            "sex": row.sex,
            "postcode": row.postcode,
        })
    } else {
        Value::Null
    };
    json!({
        "id": row.id,
        "local_reference": row.local_reference,
        "nhs_number": row.nhs_number,
        "plan_type": row.plan_type,
        "status": row.status(today).as_str(),
        "start_date": row.start_date,
        "end_date": row.end_date,
        "delete_date": row.delete_date,
        "expected_delivery_date": row.expected_delivery_date,
        "child": child,
        "contacts": {
            "office_phone": row.office_phone,
            "emergency_duty_phone": row.emergency_duty_phone,
            "email": row.email,
        },
        "responsible": responsible(row, la, true),
        "version": row.version,
        "created_at": format_timestamp(row.created_at),
        "updated_at": format_timestamp(row.updated_at),
    })
}

/// The responsible local authority with the plan's own contacts preferred to the authority's defaults.
pub fn responsible(row: &PlanRow, la: Option<&Organisation>, with_email: bool) -> Value {
    let office = row
        .office_phone
        .clone()
        .or_else(|| la.and_then(|o| o.office_phone.clone()));
    let emergency = row
        .emergency_duty_phone
        .clone()
        .or_else(|| la.and_then(|o| o.emergency_duty_phone.clone()));
    let mut v = json!({
        "ods_code": row.la_ods,
        "name": la.map(|o| o.name.clone()),
        "office_phone": office,
        "emergency_duty_phone": emergency,
    });
    if with_email {
        v["email"] = json!(row
            .email
            .clone()
            .or_else(|| la.and_then(|o| o.email.clone())));
    }
    v
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ExpireReport {
    pub ended: usize,
}

/// The `expire` job: records, with an audit event each, the plans whose end date has passed. A plan's status is
/// computed from its end date wherever it is shown, so nothing waits on this job to stop flagging.
///
/// As the purge does ([`crate::retention::ROWS_PER_WRITE`]), it finds the plans with a read (a scan of the plans,
/// which no write waits for) and records them in writes of at most that many, each checking again that the plan
/// is still due and not yet recorded.
pub async fn expire(state: &crate::startup::AppState) -> anyhow::Result<ExpireReport> {
    use crate::db::schema::plans;
    use diesel::prelude::*;
    let now = state.clock.now_naive();
    let today = state.clock.today();
    let due: Vec<String> = state
        .db
        .run(move |conn| {
            plans::table
                .filter(plans::end_date.lt(Day(today)))
                .filter(plans::ended_at.is_null())
                .select(plans::id)
                .load(conn)
                .map_err(crate::db::DbError::from)
        })
        .await?;
    let mut ended = 0;
    for ids in due.chunks(crate::retention::ROWS_PER_WRITE) {
        let ids = ids.to_vec();
        ended += state
            .db
            .write(move |conn| {
                let due: Vec<(String, String)> = plans::table
                    .filter(plans::id.eq_any(&ids))
                    .filter(plans::end_date.lt(Day(today)))
                    .filter(plans::ended_at.is_null())
                    .select((plans::id, plans::nhs_number))
                    .load(conn)?;
                let actor = Actor {
                    org: "cpis".into(),
                    role: Some("job:expire".into()),
                    ..Default::default()
                };
                let ids: Vec<&str> = due.iter().map(|(id, _)| id.as_str()).collect();
                diesel::update(plans::table.filter(plans::id.eq_any(&ids)))
                    .set(plans::ended_at.eq(Some(Stamp(now))))
                    .execute(conn)?;
                for (id, nhs) in &due {
                    audit::append(
                        conn,
                        now,
                        &actor,
                        Event {
                            action: "plan.expire",
                            nhs_number: Some(nhs),
                            subject: Some(id),
                            outcome: "ended",
                            ..Default::default()
                        },
                    )?;
                }
                Ok::<_, crate::db::DbError>(due.len())
            })
            .await?;
    }
    tracing::info!(ended, "expire finished");
    Ok(ExpireReport { ended })
}
