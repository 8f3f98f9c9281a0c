//! `POST /v1/flag-checks`: a care setting asks whether a child is flagged. The answer carries each plan with the
//! responsible authority's contacts and the child's recent unscheduled accesses. Every check, hit or miss, is
//! audited; an unscheduled check of a flagged child is recorded as an access.

use super::ApiJson;
use crate::audit::{self, Event};
use crate::auth::{Principal, Role};
use crate::clock::format_timestamp;
use crate::db::models::{AccessRow, Organisation, PlanRow};
use crate::domain::{AccessKind, NhsNumber, OdsCode, PlanStatus, SettingType};
use crate::error::{ApiError, Validator};
use crate::plans;
use crate::startup::AppState;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

pub const RECENT_ACCESSES: i64 = 25;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatientBody {
    pub nhs_number: Option<String>,
    pub identifier: Option<IdentifierBody>,
    pub demographics: Option<crate::plans::ChildBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read once the MPI lookup resolves local identifiers
pub struct IdentifierBody {
    pub system: Option<String>,
    pub value: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PractitionerBody {
    pub name: Option<String>,
    pub role: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckBody {
    patient: Option<PatientBody>,
    access: Option<String>,
    practitioner: Option<PractitionerBody>,
    setting_ods: Option<String>,
    setting_type: Option<String>,
}

struct Check {
    nhs_number: NhsNumber,
    access: AccessKind,
    practitioner: Option<String>,
    practitioner_name: Option<String>,
    practitioner_role: Option<String>,
    setting_ods: String,
    setting_type: Option<SettingType>,
}

fn short_text(max: usize) -> impl Fn(String) -> Result<String, String> {
    move |s| {
        let t = s.trim();
        if t.is_empty() || t.chars().count() > max || t.chars().any(char::is_control) {
            return Err(format!(
                "must be 1 to {max} characters without control characters"
            ));
        }
        Ok(t.to_string())
    }
}

fn parse_check(body: CheckBody, principal: &Principal) -> Result<Check, ApiError> {
    let mut v = Validator::default();
    let nhs_number = match body.patient {
        None => {
            v.push("patient", "is required");
            None
        }
        Some(p) => match p.nhs_number {
            Some(n) => v.check("patient.nhs_number", NhsNumber::parse(&n).map_err(|e| e.to_string())),
            None if p.identifier.is_some() || p.demographics.is_some() => {
                return Err(ApiError::Unprocessable(
                    "checks by local identifier or demographics need the MPI lookup, which this deployment does not \
                     offer yet; send patient.nhs_number"
                        .into(),
                ))
            }
            None => {
                v.push("patient.nhs_number", "is required");
                None
            }
        },
    };
    let access = v
        .optional("access", body.access, |s| AccessKind::parse(&s))
        .unwrap_or(AccessKind::Unscheduled);
    let (practitioner_name, practitioner_role) = match body.practitioner {
        Some(p) => (
            v.optional("practitioner.name", p.name, short_text(100)),
            v.optional("practitioner.role", p.role, short_text(100)),
        ),
        None => (None, None),
    };
    let setting_ods = match v.optional("setting_ods", body.setting_ods, |s| OdsCode::parse(&s)) {
        Some(code) if code.as_str() != principal.org => {
            return Err(ApiError::Forbidden(
                "setting_ods must be the organisation of this API key".into(),
            ))
        }
        _ => principal.org.clone(),
    };
    let setting_type = v.optional("setting_type", body.setting_type, |s| {
        SettingType::parse(&s)
    });
    v.finish()?;
    let practitioner = match (&practitioner_name, &practitioner_role) {
        (Some(n), Some(r)) => Some(format!("{n} ({r})")),
        (Some(n), None) => Some(n.clone()),
        (None, Some(r)) => Some(format!("({r})")),
        (None, None) => None,
    };
    Ok(Check {
        nhs_number: nhs_number.expect("validated"),
        access,
        practitioner,
        practitioner_name,
        practitioner_role,
        setting_ods,
        setting_type,
    })
}

/// A flag as a clinician sees it: no child demographics, the authority's phone numbers.
fn flag_json(row: &PlanRow, la: Option<&Organisation>, status: PlanStatus) -> Value {
    json!({
        "plan_type": row.plan_type,
        "status": status.as_str(),
        "start_date": row.start_date,
        "end_date": row.end_date,
        "expected_delivery_date": row.expected_delivery_date,
        "responsible": plans::responsible(row, la, false),
    })
}

pub async fn check(
    principal: Principal,
    state: web::Data<AppState>,
    body: ApiJson<CheckBody>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::CareSetting])?;
    let check = parse_check(body.0, &principal)?;
    let actor = principal
        .actor(role)
        .with_practitioner(check.practitioner.clone());
    let now = state.clock.now_naive();
    let today = state.clock.today();
    let key_id = principal.key_id.clone();
    let json = state
        .db
        .write(move |conn| {
            let nhs = check.nhs_number.as_str();
            let plans = PlanRow::for_nhs_number(conn, nhs)?;
            let hit = plans.iter().any(|p| PlanStatus::of(p.end_date, today) == PlanStatus::Active);
            // The caller sees the accesses before this one; this one shows up in the next check.
            let recent = if plans.is_empty() { Vec::new() } else { AccessRow::recent_unscheduled(conn, nhs, RECENT_ACCESSES)? };
            if hit {
                AccessRow::insert(conn, &AccessRow {
                    id: uuid::Uuid::new_v4().to_string(),
                    nhs_number: nhs.to_string(),
                    at: now,
                    setting_ods: check.setting_ods.clone(),
                    setting_type: check.setting_type.map(|t| t.as_str().to_string()),
                    kind: "check".into(),
                    access: check.access.as_str().into(),
                    practitioner_name: check.practitioner_name.clone(),
                    practitioner_role: check.practitioner_role.clone(),
                    key_id: Some(key_id),
                })?;
            }
            audit::append(conn, now, &actor, Event {
                action: "flag_check",
                nhs_number: Some(nhs),
                outcome: if hit { "hit" } else { "miss" },
                detail: Some(json!({"access": check.access.as_str(), "setting_ods": check.setting_ods, "plans": plans.len()}).to_string()),
                ..Default::default()
            })?;
            let mut codes: Vec<String> = plans.iter().map(|p| p.la_ods.clone()).collect();
            codes.dedup();
            let orgs = Organisation::find_many(conn, &codes)?;
            let flags: Vec<Value> = plans
                .iter()
                .map(|p| flag_json(p, orgs.iter().find(|o| o.ods_code == p.la_ods), PlanStatus::of(p.end_date, today)))
                .collect();
            let recent: Vec<Value> = recent
                .into_iter()
                .map(|a| json!({"at": format_timestamp(a.at), "setting_ods": a.setting_ods, "setting_name": a.setting_name, "setting_type": a.setting_type}))
                .collect();
            let matched = if plans.is_empty() {
                json!({"status": "none", "method": "nhs_number", "score": 0.0})
            } else {
                json!({"status": "matched", "method": "nhs_number", "score": 1.0})
            };
            Ok::<_, ApiError>(json!({"match": matched, "flags": flags, "recent_accesses": recent}))
        })
        .await?;
    Ok(HttpResponse::Ok().json(json))
}
