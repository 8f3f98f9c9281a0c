//! `POST /v1/attendances`: a care setting reports that a patient arrived. The attendance is stored (once per
//! setting and attendance id), resolved through the MPI and matched to active plans. When the MPI cannot be
//! asked, the attendance is still accepted, answered as `pending`, and matched again by the `rematch` job.

use super::flag_checks::{own_setting, short_text};
use super::patient::{parse_patient, PatientBody};
use super::ApiJson;
#[allow(unused_imports)]
use crate::api::openapi::ProblemDoc;
use crate::attendances::{self, AttendanceRow, Stored, PENDING};
use crate::audit::{self, Event};
use crate::auth::{Principal, Role};
use crate::db::stamp::Day;
use crate::domain::{OdsCode, SettingType};
use crate::error::{ApiError, Validator};
use crate::flags::{self, FlagView};
use crate::mpi::{MpiError, Resolution};
use crate::startup::AppState;
use actix_web::{web, HttpResponse};
use chrono::{DateTime, Duration, NaiveDateTime};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttendanceBody {
    attendance_id: Option<String>,
    setting_ods: Option<String>,
    setting_type: Option<String>,
    arrived_at: Option<String>,
    patient: Option<PatientBody>,
    reason: Option<String>,
}

fn parse_arrival(s: &str, now: NaiveDateTime) -> Result<NaiveDateTime, String> {
    let at = DateTime::parse_from_rfc3339(s.trim())
        .map_err(|_| {
            "must be an RFC 3339 date-time with a time zone, such as 2026-11-25T14:30:00Z"
                .to_string()
        })?
        .naive_utc();
    if at > now + Duration::minutes(5) {
        return Err("must not be in the future".into());
    }
    if at < now - Duration::days(366) {
        return Err("must be within the last year".into());
    }
    Ok(at)
}

fn answer(
    att: &AttendanceRow,
    resolution: Option<&Resolution>,
    view: &FlagView,
    notifications: &[String],
) -> Value {
    let matched = match resolution {
        Some(r) => flags::match_json(r),
        None => json!({"status": PENDING, "method": null, "score": null,
                       "detail": "the MPI could not be asked; cpis will match this attendance again"}),
    };
    json!({
        "id": att.id,
        "attendance_id": att.attendance_id,
        "setting_ods": att.setting_ods,
        "match": matched,
        "flags": view.flags,
        "notifications": notifications,
    })
}

#[utoipa::path(post, path = "/v1/attendances", tag = "attendances", request_body = AttendanceBody, security(("bearer" = [])), responses((status = 201, description = "`{id, match, flags, notifications}`"), (status = 200, description = "A repeat of a stored attendance"), (status = 422, body = ProblemDoc), (status = 503, description = "Not stored (database or MPI unavailable, or a conflict the database settled): send it again after `Retry-After`", body = ProblemDoc)))]
pub async fn create(
    principal: Principal,
    state: web::Data<AppState>,
    body: ApiJson<AttendanceBody>,
) -> Result<HttpResponse, ApiError> {
    let role = principal.require(&[Role::CareSetting])?;
    let now = state.clock.now_naive();
    let today = state.clock.today();
    let b = body.0;
    let mut v = Validator::default();
    let attendance_id = match b.attendance_id {
        None => {
            v.push("attendance_id", "is required");
            None
        }
        Some(s) => v.check("attendance_id", short_text(64)(s)),
    };
    let setting_ods = match b.setting_ods {
        None => {
            v.push("setting_ods", "is required");
            None
        }
        Some(s) => v.check("setting_ods", OdsCode::parse(&s)),
    };
    let setting_type = match b.setting_type {
        None => {
            v.push("setting_type", "is required");
            None
        }
        Some(s) => v.check("setting_type", SettingType::parse(&s)),
    };
    let arrived_at = match b.arrived_at {
        None => {
            v.push("arrived_at", "is required");
            None
        }
        Some(s) => v.check("arrived_at", parse_arrival(&s, now)),
    };
    let patient = parse_patient(&mut v, b.patient, today, principal.region.clone());
    let reason = v.optional("reason", b.reason, short_text(500));
    v.finish()?;
    let setting_ods = own_setting(&principal, setting_ods)?;
    let attendance_id = attendance_id.expect("validated");
    let patient = patient.expect("validated");
    let actor = principal.actor(role);

    // A repeat is answered from what was stored. Otherwise the resolution and the flags it finds are read
    // together; only the writes go to the group-commit writer.
    let (s, a, setting) = (setting_ods.clone(), attendance_id.clone(), setting_type);
    // The setting is the key's own organisation (`own_setting`), whose name came with the key.
    let name = principal.org_name.clone();
    let in_database = state.mpi.in_database(&patient).is_some();
    let insert_finds_copies = attendances::insert_finds_copies(&state.db);
    let look_in_read = in_database && !insert_finds_copies;
    if !in_database {
        // An external MPI is asked before the reads: look for a repeat first.
        let (s, a) = (s.clone(), a.clone());
        if let Some(existing) = state
            .db
            .read_before_write(move |conn| {
                Ok::<_, ApiError>(AttendanceRow::find_by_source(conn, &s, &a)?)
            })
            .await?
        {
            return repeat(&state, actor, existing).await;
        }
    }
    let read = crate::mpi::resolve_then(
        &*state.mpi,
        &state.db,
        &patient,
        crate::mpi::builtin::Needs::PersonId,
        move |conn, resolved| {
            if look_in_read {
                if let Some(existing) = AttendanceRow::find_by_source(conn, &s, &a)? {
                    return Ok::<_, ApiError>(Err(existing));
                }
            }
            let (resolution, plans) = match resolved {
                Ok(r) => (r.resolution, r.plans),
                Err(MpiError::Unavailable(why)) => return Ok(Ok((None, Some(why)))),
            };
            let found =
                attendances::find_flags(conn, today, Some(name), setting, &resolution, plans)?;
            Ok(Ok((Some((resolution, found)), None)))
        },
    )
    .await?;
    let resolved = match read {
        Err(existing) => return repeat(&state, actor, existing).await,
        Ok((Some((r, found)), _)) => {
            state
                .metrics
                .matches
                .with_label_values(&[r.status.as_str(), r.method.as_str()])
                .inc();
            Some((r, found))
        }
        Ok((None, why)) => {
            let why = why.unwrap_or_default();
            tracing::warn!(reason = %why, "MPI unavailable; attendance stored for re-matching");
            None
        }
    };
    let d = patient.demographics.clone().unwrap_or_default();
    let mut att = AttendanceRow {
        id: crate::db::new_id(),
        setting_ods,
        attendance_id,
        setting_type: setting_type.expect("validated").as_str().to_string(),
        arrived_at: arrived_at.expect("validated").into(),
        reason,
        nhs_number: patient.nhs_number.as_ref().map(|n| n.as_str().to_string()),
        identifier_system: patient.identifier.as_ref().map(|i| i.system.clone()),
        identifier_value: patient.identifier.as_ref().map(|i| i.value.clone()),
        given_name: d.given_name.as_ref().map(|n| n.as_str().to_string()),
        family_name: d.family_name.as_ref().map(|n| n.as_str().to_string()),
        birth_date: d.birth_date.map(Day),
        sex: d.sex.map(|s| s.as_str().to_string()),
        postcode: d.postcode.as_ref().map(|p| p.as_str().to_string()),
        region: patient.region.clone(),
        match_status: PENDING.into(),
        match_method: None,
        match_score: None,
        person_id: None,
        resolved_nhs_number: None,
        flagged: false,
        rematch_attempts: 0,
        key_id: Some(principal.key_id.clone()),
        created_at: now.into(),
        updated_at: now.into(),
    };
    let settings = state.settings.clone();
    // On SQLite, unless the MPI may learn a local identifier from it, an attendance only reads and adds rows the
    // writer holds until its batch commits (its own row among them), so it needs no savepoint of its own.
    let savepoint = attendances::needs_savepoint(&att);
    let look_first = !insert_finds_copies || savepoint;
    let stored = state
        .db
        .write_with(savepoint, move |conn| {
            // Two copies of one attendance racing: where the insert below cannot find the first
            // (`attendances::insert_finds_copies`), the second finds it here, committed or earlier in the batch.
            let mark = crate::db::JobMark::now();
            if look_first {
                if let Some(existing) = AttendanceRow::find_by_source(conn, &att.setting_ods, &att.attendance_id)? {
                    return Ok::<_, ApiError>(Err(existing));
                }
            }
            let (resolution, view, notified) = match resolved {
                Some((r, found)) => {
                    let notified = attendances::apply_resolution(conn, now, &mut att, &r, &found, &settings)?;
                    (Some(r), found.view, notified)
                }
                None => (None, FlagView::default(), Vec::new()),
            };
            let outcome = match (&resolution, view.hit) {
                (None, _) => PENDING,
                (Some(_), true) => "flagged",
                (Some(r), false) => r.status.as_str(),
            };
            audit::append(conn, now, &actor, Event {
                action: "attendance.create",
                nhs_number: att.resolved_nhs_number.as_deref().or(att.nhs_number.as_deref()),
                subject: Some(&att.id),
                outcome,
                detail: Some(json!({"setting_ods": att.setting_ods, "setting_type": att.setting_type, "method": att.match_method}).to_string()),
            })?;
            let json = answer(&att, resolution.as_ref(), &view, &notified);
            let notified = !notified.is_empty();
            match attendances::insert(conn, att, &mark)? {
                Stored::Yes => Ok(Ok((json, notified, None))),
                Stored::AtBatchEnd(copy) => Ok(Ok((json, notified, Some(copy)))),
                Stored::Copy(att) => {
                    // Another instance stored it a moment ago: this write's audit event and rows go, and the
                    // caller is answered as any repeat is.
                    mark.discard();
                    match AttendanceRow::find_by_source(conn, &att.setting_ods, &att.attendance_id)? {
                        Some(existing) => Ok(Err(existing)),
                        None => Err(being_recorded()),
                    }
                }
            }
        })
        .await?;
    match stored {
        Ok((_, _, Some(copy))) if copy.is_copy() => {
            // Its batch found a copy already stored and dropped this write's rows.
            let existing = state
                .db
                .read(move |conn| {
                    let (setting, id) = copy.source();
                    Ok::<_, ApiError>(AttendanceRow::find_by_source(conn, setting, id)?)
                })
                .await?
                .ok_or_else(being_recorded)?;
            repeat(&state, principal.actor(role), existing).await
        }
        Ok((json, notified, _)) => {
            if notified {
                state.wake_deliverer();
            }
            Ok(HttpResponse::Created().json(json))
        }
        Err(existing) => repeat(&state, principal.actor(role), existing).await,
    }
}

fn being_recorded() -> ApiError {
    ApiError::Conflict(
        "this attendance was being recorded by another request; send it again".into(),
    )
}

/// The answer to an attendance already stored: its match as recorded, flags as they stand now.
async fn repeat(
    state: &AppState,
    actor: audit::Actor,
    existing: AttendanceRow,
) -> Result<HttpResponse, ApiError> {
    let now = state.clock.now_naive();
    let today = state.clock.today();
    let json = state
        .db
        .write(move |conn| {
            let resolution = existing.resolution();
            let view = match &resolution {
                Some(r) => flags::view(conn, r, None, today, existing.setting())?,
                None => FlagView::default(),
            };
            let notified = crate::notify::NotificationRow::ids_for_attendance(conn, &existing.id)?;
            audit::append(
                conn,
                now,
                &actor,
                Event {
                    action: "attendance.create",
                    nhs_number: existing
                        .resolved_nhs_number
                        .as_deref()
                        .or(existing.nhs_number.as_deref()),
                    subject: Some(&existing.id),
                    outcome: "repeat",
                    ..Default::default()
                },
            )?;
            Ok::<_, ApiError>(answer(&existing, resolution.as_ref(), &view, &notified))
        })
        .await?;
    Ok(HttpResponse::Ok().json(json))
}
