//! `POST /v1/flag-checks`: a care setting asks whether a patient is flagged. The patient is resolved through the
//! MPI (NHS number, local identifier or demographics); a matched patient's plans come back with the responsible
//! authority's contacts and the recent unscheduled accesses; a possible match names only whom to call. Every
//! check, hit or miss, is audited; an unscheduled check that hits is recorded as an access.

use super::patient::{parse_patient, PatientBody};
use super::ApiJson;
#[allow(unused_imports)]
use crate::api::openapi::ProblemDoc;
use crate::audit::{self, Event};
use crate::auth::{Principal, Role};
use crate::clock::format_timestamp;
use crate::db::models::AccessRow;
use crate::domain::{AccessKind, OdsCode, SettingType};
use crate::error::{ApiError, Validator};
use crate::flags;
use crate::mpi::{MatchStatus, MpiError, PatientQuery};
use crate::notify;
use crate::startup::AppState;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

pub const RECENT_ACCESSES: i64 = 25;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PractitionerBody {
    pub name: Option<String>,
    pub role: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckBody {
    patient: Option<PatientBody>,
    access: Option<String>,
    practitioner: Option<PractitionerBody>,
    setting_ods: Option<String>,
    setting_type: Option<String>,
}

/// A checked flag-check request, whichever API it came through.
pub struct CheckRequest {
    pub patient: PatientQuery,
    pub access: AccessKind,
    pub practitioner: Option<String>,
    pub practitioner_name: Option<String>,
    pub practitioner_role: Option<String>,
    pub setting_ods: String,
    pub setting_type: Option<SettingType>,
    /// The audit action: `flag_check`, or the FHIR search that carried it.
    pub action: &'static str,
}

pub fn short_text(max: usize) -> impl Fn(String) -> Result<String, String> {
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

/// A setting may only speak for itself: `setting_ods`, when sent, must be the key's organisation.
pub fn own_setting(principal: &Principal, sent: Option<OdsCode>) -> Result<String, ApiError> {
    match sent {
        Some(code) if code.as_str() != principal.org => Err(ApiError::Forbidden(
            "setting_ods must be the organisation of this API key".into(),
        )),
        _ => Ok(principal.org.clone()),
    }
}

fn parse_check(
    body: CheckBody,
    principal: &Principal,
    today: chrono::NaiveDate,
) -> Result<CheckRequest, ApiError> {
    let mut v = Validator::default();
    let patient = parse_patient(&mut v, body.patient, today, principal.region.clone());
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
    let setting_ods = v.optional("setting_ods", body.setting_ods, |s| OdsCode::parse(&s));
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
    Ok(CheckRequest {
        action: "flag_check",
        patient: patient.expect("validated"),
        access,
        practitioner,
        practitioner_name,
        practitioner_role,
        setting_ods: own_setting(principal, setting_ods)?,
        setting_type,
    })
}

pub fn mpi_unavailable(e: MpiError) -> ApiError {
    ApiError::Unavailable(format!("{e}; an NHS number can still be checked"))
}

/// What a check found, for whichever API asked.
pub struct Checked {
    pub resolution: crate::mpi::Resolution,
    pub view: flags::FlagView,
    pub recent: Vec<crate::db::models::RecentAccess>,
}

/// A flag check: resolves the patient, records the access (and notifies) when an unscheduled check hits, and
/// audits it whatever it found. Shared by `POST /v1/flag-checks` and the FHIR `CareTeam` search.
pub async fn perform(
    state: &AppState,
    principal: &Principal,
    role: Role,
    check: CheckRequest,
) -> Result<Checked, ApiError> {
    let today = state.clock.today();
    // The resolution and the reads it leads to (plans, contacts, recent accesses) share one read; only the
    // writes go to the group-commit writer.
    let (view, recent, resolution) = crate::mpi::resolve_then(
        &*state.mpi,
        &state.db,
        &check.patient,
        crate::mpi::builtin::Needs::MatchOnly,
        move |conn, resolved| {
            let resolved = resolved.map_err(mpi_unavailable)?;
            let resolution = resolved.resolution;
            let view = flags::view(conn, &resolution, resolved.plans, today, None)?;
            let matched = resolution.status == MatchStatus::Matched;
            // The caller sees the accesses before this one; this one shows up in the next check.
            let recent = match (&view.nhs_number, matched && !view.flags.is_empty()) {
                (Some(nhs), true) => AccessRow::recent_unscheduled(conn, nhs, RECENT_ACCESSES)?,
                _ => Vec::new(),
            };
            Ok::<_, ApiError>((view, recent, resolution))
        },
    )
    .await?;
    state
        .metrics
        .matches
        .with_label_values(&[resolution.status.as_str(), resolution.method.as_str()])
        .inc();
    let access_label = check.access.as_str();
    let actor = principal
        .actor(role)
        .with_practitioner(check.practitioner.clone());
    let now = state.clock.now_naive();
    let key_id = principal.key_id.clone();
    let settings = state.settings.clone();
    let outcome = match resolution.status {
        MatchStatus::Matched if view.hit => "hit",
        MatchStatus::Possible if !view.flags.is_empty() => "possible_hit",
        _ => "miss",
    };
    let audited_nhs = view.nhs_number.clone().or(check
        .patient
        .nhs_number
        .as_ref()
        .map(|n| n.as_str().to_string()));
    let detail = json!({
        "access": check.access.as_str(),
        "setting_ods": check.setting_ods,
        "match": resolution.status.as_str(),
        "method": resolution.method.as_str(),
        "score": resolution.score,
    })
    .to_string();
    let action = check.action;
    let hit = match (view.hit, &view.nhs_number) {
        (true, Some(nhs)) => Some(nhs.clone()),
        _ => None,
    };
    let method = resolution.method.as_str();
    let mut checked = Checked {
        resolution,
        view,
        recent,
    };
    let Some(nhs) = hit else {
        // Nothing to record but the check itself.
        audit::record(
            &state.db,
            now,
            &actor,
            check_event(action, audited_nhs.as_deref(), outcome, detail),
        )
        .await?;
        count_check(state, outcome, access_label);
        return Ok(checked);
    };
    let (setting_ods, setting_type, access) = (check.setting_ods, check.setting_type, check.access);
    let (practitioner_name, practitioner_role) = (check.practitioner_name, check.practitioner_role);
    // The setting is the key's own organisation (`own_setting`), whose name came with the key.
    let setting_name = principal.org_name.clone();
    // The write borrows the active plans for the notification and gives them back. Its rows (the access, the
    // outbox rows, the audit event) join the batch's multi-row inserts, so it needs no savepoint of its own.
    let active_plans = std::mem::take(&mut checked.view.active_plans);
    let (notified, active_plans) = state
        .db
        .write_buffered(move |conn| {
            AccessRow::insert(
                conn,
                AccessRow {
                    id: crate::db::new_id(),
                    nhs_number: nhs.clone(),
                    at: now.into(),
                    setting_ods: setting_ods.clone(),
                    setting_type: setting_type.map(|t| t.as_str().to_string()),
                    kind: "check".into(),
                    access: access.as_str().into(),
                    practitioner_name,
                    practitioner_role,
                    key_id: Some(key_id),
                },
            )?;
            // An unscheduled check of a flagged child is told to the responsible authorities; a scheduled one is
            // a silent read.
            let mut notified = Vec::new();
            if access == AccessKind::Unscheduled {
                notified = notify::enqueue(
                    conn,
                    now,
                    &settings,
                    &active_plans,
                    &notify::Occurrence {
                        event: notify::FLAG_ACCESSED,
                        nhs_number: &nhs,
                        initials: crate::attendances::initials(&active_plans),
                        setting_ods: &setting_ods,
                        setting_name: Some(&setting_name),
                        setting_type,
                        occurred_at: now,
                        attendance_ref: None,
                        review: false,
                        match_method: method,
                    },
                )?;
            }
            audit::append(
                conn,
                now,
                &actor,
                check_event(action, audited_nhs.as_deref(), outcome, detail),
            )?;
            Ok::<_, ApiError>((!notified.is_empty(), active_plans))
        })
        .await?;
    checked.view.active_plans = active_plans;
    if notified {
        state.wake_deliverer();
    }
    count_check(state, outcome, access_label);
    Ok(checked)
}

fn check_event<'a>(
    action: &'a str,
    nhs_number: Option<&'a str>,
    outcome: &'a str,
    detail: String,
) -> Event<'a> {
    Event {
        action,
        nhs_number,
        outcome,
        detail: Some(detail),
        ..Default::default()
    }
}

fn count_check(state: &AppState, outcome: &str, access: &str) {
    state
        .metrics
        .checks
        .with_label_values(&[outcome, access])
        .inc();
}

#[utoipa::path(post, path = "/v1/flag-checks", tag = "flags", request_body = CheckBody, security(("bearer" = [])), responses((status = 200, description = "`{match: {status, method, score}, flags: [...], recent_accesses: [...]}`"), (status = 422, body = ProblemDoc), (status = 503, description = "The region's MPI or the database is unavailable, or the database settled a conflict: send it again after `Retry-After`", body = ProblemDoc)))]
pub async fn check(
    principal: Principal,
    state: web::Data<AppState>,
    body: ApiJson<CheckBody>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::CareSetting])?;
    let check = parse_check(body.0, &principal, state.clock.today())?;
    let Checked {
        resolution,
        view,
        recent,
    } = perform(&state, &principal, role, check).await?;
    let recent: Vec<Value> = recent
        .into_iter()
        .map(|a| json!({"at": format_timestamp(a.at), "setting_ods": a.setting_ods, "setting_name": a.setting_name, "setting_type": a.setting_type}))
        .collect();
    Ok(HttpResponse::Ok().json(CheckAnswer {
        flags: view.flags,
        r#match: flags::match_json(&resolution),
        recent_accesses: recent,
    }))
}

/// The answer to a check, serialised as it stands (a `json!` literal would copy the flags and accesses).
#[derive(serde::Serialize)]
struct CheckAnswer {
    flags: Vec<Value>,
    r#match: Value,
    recent_accesses: Vec<Value>,
}
