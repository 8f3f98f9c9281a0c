//! The FHIR R4 facade, shaped after NHS England's CP-IS FHIR API: `CareTeam`, `Flag` and `AuditEvent` searches
//! by NHS number (`patient:identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}`), by GET or by POST `_search` with
//! a form body, answering searchset Bundles in `application/fhir+json`, and OperationOutcome for every error.
//! A `CareTeam` search is a flag check: `IsUnscheduledAccessEvent: true` (the default) records an unscheduled
//! access and notifies, `false` is a silent read; `Flag` and `AuditEvent` searches are silent, audited reads.

use crate::api::flag_checks::{perform, CheckRequest, Checked};
use crate::api::{body_limit, declared_length, read_body};
use crate::auth::{Principal, Role};
use crate::clock::format_timestamp;
use crate::db::models::{Organisation, PlanRow, RecentAccess};
use crate::domain::{AccessKind, NhsNumber, PlanStatus, PlanType};
use crate::error::ApiError;
use crate::mpi::PatientQuery;
use crate::startup::AppState;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

pub const FHIR_JSON: &str = "application/fhir+json";
pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const SNOMED: &str = "http://snomed.info/sct";
const RESOURCES: [&str; 3] = ["CareTeam", "Flag", "AuditEvent"];

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/fhir/R4/metadata").get(metadata))
        .service(
            web::scope("/fhir/R4")
                .wrap(actix_web::middleware::from_fn(crate::auth::authenticate))
                .wrap(actix_web::middleware::from_fn(operation_outcomes))
                .service(web::resource("/CareTeam").get(care_team))
                .service(web::resource("/CareTeam/_search").post(care_team))
                .service(web::resource("/Flag").get(flag))
                .service(web::resource("/Flag/_search").post(flag))
                .service(web::resource("/AuditEvent").get(audit_event))
                .service(web::resource("/AuditEvent/_search").post(audit_event))
                .default_service(web::to(|| async {
                    ApiError::NotFound("no such FHIR resource type or operation".into())
                        .into_result()
                })),
        );
}

trait IntoResult {
    fn into_result(self) -> Result<HttpResponse, ApiError>;
}

impl IntoResult for ApiError {
    fn into_result(self) -> Result<HttpResponse, ApiError> {
        Err(self)
    }
}

fn fhir(status: actix_web::http::StatusCode, body: Value) -> HttpResponse {
    HttpResponse::build(status)
        .content_type(FHIR_JSON)
        .json(body)
}

/// The OperationOutcome for an error status and its text.
pub fn operation_outcome(status: u16, diagnostics: &str) -> Value {
    let code = match status {
        400 => "invalid",
        401 => "login",
        403 => "forbidden",
        404 => "not-found",
        405 => "not-supported",
        413 => "too-costly",
        415 | 422 => "processing",
        503 => "transient",
        _ => "exception",
    };
    json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]})
}

/// Middleware: any problem-details error inside the FHIR scope (401 and 403 from authentication included)
/// leaves as an OperationOutcome.
pub async fn operation_outcomes(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let res = match next.call(req).await {
        Ok(res) => res,
        Err(e) => {
            let status = e.as_response_error().status_code();
            let text = e.to_string();
            let mut response = fhir(status, operation_outcome(status.as_u16(), &text));
            if status == actix_web::http::StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"cpis\""),
                );
            }
            return Err(actix_web::error::InternalError::from_response(text, response).into());
        }
    };
    let is_problem = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("problem+json"));
    if !is_problem {
        return Ok(res.map_into_boxed_body());
    }
    let status = res.status();
    let challenge = res.headers().get(header::WWW_AUTHENTICATE).cloned();
    let (req, res) = res.into_parts();
    let body = actix_web::body::to_bytes(res.into_body())
        .await
        .unwrap_or_default();
    let problem: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut text = problem["detail"].as_str().unwrap_or("error").to_string();
    if let Some(errors) = problem["errors"].as_array() {
        let fields: Vec<String> = errors
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e["field"].as_str().unwrap_or(""),
                    e["message"].as_str().unwrap_or("")
                )
            })
            .collect();
        if !fields.is_empty() {
            text = fields.join("; ");
        }
    }
    let mut response = fhir(status, operation_outcome(status.as_u16(), &text));
    if let Some(c) = challenge {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, c);
    }
    Ok(ServiceResponse::new(req, response))
}

/// The search parameters, from the query string (GET) or a form body (POST `_search`).
async fn search_params(
    req: &HttpRequest,
    payload: &mut actix_web::dev::Payload,
) -> Result<Vec<(String, String)>, ApiError> {
    if req.method() == actix_web::http::Method::POST {
        let form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if !form {
            return Err(ApiError::UnsupportedMediaType(
                "_search takes application/x-www-form-urlencoded".into(),
            ));
        }
        let body = read_body(payload, body_limit(req), declared_length(req)).await?;
        let text = std::str::from_utf8(&body)
            .map_err(|_| ApiError::BadRequest("the form is not UTF-8".into()))?;
        return Ok(url::form_urlencoded::parse(text.as_bytes())
            .into_owned()
            .collect());
    }
    Ok(url::form_urlencoded::parse(req.query_string().as_bytes())
        .into_owned()
        .collect())
}

/// The NHS number in `patient:identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}`.
fn patient_nhs(params: &[(String, String)]) -> Result<NhsNumber, ApiError> {
    let value = params
        .iter()
        .find(|(k, _)| k == "patient:identifier" || k == "patient.identifier")
        .map(|(_, v)| v)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "the search needs patient:identifier={NHS_NUMBER_SYSTEM}|<NHS number>"
            ))
        })?;
    let (system, nhs) = value.split_once('|').ok_or_else(|| {
        ApiError::BadRequest(format!(
            "patient:identifier must be {NHS_NUMBER_SYSTEM}|<NHS number>"
        ))
    })?;
    if system != NHS_NUMBER_SYSTEM {
        return Err(ApiError::BadRequest(format!(
            "patient:identifier system must be {NHS_NUMBER_SYSTEM}"
        )));
    }
    NhsNumber::parse(nhs)
        .map_err(|e| ApiError::BadRequest(format!("patient:identifier NHS number {e}")))
}

fn unscheduled(req: &HttpRequest) -> Result<AccessKind, ApiError> {
    match req
        .headers()
        .get("IsUnscheduledAccessEvent")
        .map(HeaderValue::to_str)
    {
        None => Ok(AccessKind::Unscheduled),
        Some(Ok(v)) if v.eq_ignore_ascii_case("true") => Ok(AccessKind::Unscheduled),
        Some(Ok(v)) if v.eq_ignore_ascii_case("false") => Ok(AccessKind::Scheduled),
        _ => Err(ApiError::BadRequest(
            "IsUnscheduledAccessEvent must be true or false".into(),
        )),
    }
}

async fn run_check(
    state: &AppState,
    principal: &Principal,
    req: &HttpRequest,
    payload: &mut actix_web::dev::Payload,
    access: Option<AccessKind>,
    action: &'static str,
) -> Result<Checked, ApiError> {
    let role = principal.require(&[Role::CareSetting])?;
    let params = search_params(req, payload).await?;
    let nhs = patient_nhs(&params)?;
    let access = match access {
        Some(a) => a,
        None => unscheduled(req)?,
    };
    let check = CheckRequest {
        patient: PatientQuery {
            nhs_number: Some(nhs),
            identifier: None,
            demographics: None,
            region: principal.region.clone(),
        },
        access,
        practitioner: None,
        practitioner_name: None,
        practitioner_role: None,
        setting_ods: principal.org.clone(),
        setting_type: None,
        action,
    };
    perform(state, principal, role, check).await
}

fn bundle(resources: Vec<Value>) -> Value {
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|r| json!({"fullUrl": format!("urn:uuid:{}", r["id"].as_str().unwrap_or_default()), "resource": r, "search": {"mode": "match"}}))
        .collect();
    json!({"resourceType": "Bundle", "id": uuid::Uuid::new_v4().to_string(), "type": "searchset", "total": entries.len(), "entry": entries})
}

fn subject(nhs: &str) -> Value {
    json!({"identifier": {"system": NHS_NUMBER_SYSTEM, "value": nhs}})
}

fn plan_concept(plan: &PlanRow) -> Value {
    let (code, display) = PlanType::parse(&plan.plan_type)
        .map(|t| t.snomed())
        .unwrap_or(("", ""));
    json!({"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display})
}

fn period(plan: &PlanRow) -> Value {
    let mut p = json!({"start": plan.start_date.to_string()});
    if let Some(end) = plan.end_date {
        p["end"] = json!(end.to_string());
    }
    p
}

fn organisation(plan: &PlanRow, la: Option<&Organisation>) -> Value {
    let mut o = json!({"identifier": {"system": ODS_SYSTEM, "value": plan.la_ods}});
    if let Some(la) = la {
        o["display"] = json!(la.name);
    }
    o
}

fn active(plan: &PlanRow, today: chrono::NaiveDate) -> bool {
    plan.status(today) == PlanStatus::Active
}

/// One CareTeam per plan: the plan type as category, the plan period, the authority's name, office-hours
/// (`use=work`) and emergency-duty (`use=mobile`) phones, and the authority's ODS code.
pub fn care_team_resource(
    plan: &PlanRow,
    la: Option<&Organisation>,
    today: chrono::NaiveDate,
) -> Value {
    let office = plan
        .office_phone
        .clone()
        .or_else(|| la.and_then(|o| o.office_phone.clone()));
    let emergency = plan
        .emergency_duty_phone
        .clone()
        .or_else(|| la.and_then(|o| o.emergency_duty_phone.clone()));
    let mut telecom = Vec::new();
    if let Some(p) = office {
        telecom.push(json!({"system": "phone", "value": p, "use": "work"}));
    }
    if let Some(p) = emergency {
        telecom.push(json!({"system": "phone", "value": p, "use": "mobile"}));
    }
    let mut team = json!({
        "resourceType": "CareTeam",
        "id": plan.id,
        "status": if active(plan, today) { "active" } else { "inactive" },
        "category": [plan_concept(plan)],
        "name": la.map(|o| o.name.clone()).unwrap_or_else(|| plan.la_ods.clone()),
        "subject": subject(&plan.nhs_number),
        "period": period(plan),
        "managingOrganization": [organisation(plan, la)],
    });
    if !telecom.is_empty() {
        team["telecom"] = json!(telecom);
    }
    team
}

pub fn flag_resource(plan: &PlanRow, la: Option<&Organisation>, today: chrono::NaiveDate) -> Value {
    json!({
        "resourceType": "Flag",
        "id": plan.id,
        "status": if active(plan, today) { "active" } else { "inactive" },
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/flag-category", "code": "safety", "display": "Safety"}]}],
        "code": plan_concept(plan),
        "subject": subject(&plan.nhs_number),
        "period": period(plan),
        "author": organisation(plan, la),
    })
}

pub fn audit_event_resource(access: &RecentAccess, nhs: &str) -> Value {
    let who = {
        let mut w = json!({"identifier": {"system": ODS_SYSTEM, "value": access.setting_ods}});
        if let Some(name) = &access.setting_name {
            w["display"] = json!(name);
        }
        w
    };
    json!({
        "resourceType": "AuditEvent",
        "id": access.id,
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "search-type", "display": "search"}],
        "action": "R",
        "recorded": format_timestamp(access.at),
        "outcome": "0",
        "outcomeDesc": if access.kind == "attendance" { "unscheduled attendance" } else { "unscheduled access to the child protection flag" },
        "agent": [{"who": who.clone(), "requestor": true}],
        "source": {"observer": who, "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}]},
        "entity": [{"what": subject(nhs)}],
    })
}

/// One resource per plan the check found, each with its responsible authority.
fn each_plan(
    resource: fn(&PlanRow, Option<&Organisation>, chrono::NaiveDate) -> Value,
) -> impl FnOnce(&Checked, chrono::NaiveDate) -> Vec<Value> {
    move |checked, today| {
        let view = &checked.view;
        view.plans
            .iter()
            .map(|p| {
                let la = view.authorities.iter().find(|o| o.ods_code == p.la_ods);
                resource(p, la, today)
            })
            .collect()
    }
}

/// A search that is a flag check underneath: checks the patient (audited as `action`), then answers the
/// resources `build` makes of what the check found.
async fn search(
    principal: Principal,
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    access: Option<AccessKind>,
    action: &'static str,
    build: impl FnOnce(&Checked, chrono::NaiveDate) -> Vec<Value>,
) -> Result<HttpResponse, ApiError> {
    let mut payload = payload.into_inner();
    let checked = run_check(&state, &principal, &req, &mut payload, access, action).await?;
    let resources = build(&checked, state.clock.today());
    Ok(fhir(actix_web::http::StatusCode::OK, bundle(resources)))
}

pub async fn care_team(
    principal: Principal,
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    search(
        principal,
        state,
        req,
        payload,
        None,
        "fhir.careteam.search",
        each_plan(care_team_resource),
    )
    .await
}

pub async fn flag(
    principal: Principal,
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let access = Some(AccessKind::Scheduled);
    search(
        principal,
        state,
        req,
        payload,
        access,
        "fhir.flag.search",
        each_plan(flag_resource),
    )
    .await
}

pub async fn audit_event(
    principal: Principal,
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let access = Some(AccessKind::Scheduled);
    search(
        principal,
        state,
        req,
        payload,
        access,
        "fhir.auditevent.search",
        |checked, _| {
            let nhs = checked.view.nhs_number.clone().unwrap_or_default();
            checked
                .recent
                .iter()
                .map(|a| audit_event_resource(a, &nhs))
                .collect()
        },
    )
    .await
}

pub async fn metadata() -> HttpResponse {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .map(|r| {
            json!({
                "type": r,
                "interaction": [{"code": "search-type"}],
                "searchParam": [{"name": "patient", "type": "reference",
                                 "documentation": format!("patient:identifier={NHS_NUMBER_SYSTEM}|{{NHS number}}")}],
            })
        })
        .collect();
    fhir(
        actix_web::http::StatusCode::OK,
        json!({
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2026-11-25",
            "publisher": "cpis",
            "kind": "instance",
            "software": {"name": "cpis", "version": env!("CARGO_PKG_VERSION")},
            "implementation": {"description": "cpis child protection information sharing: FHIR R4 facade"},
            "fhirVersion": "4.0.1",
            "format": [FHIR_JSON],
            "rest": [{
                "mode": "server",
                "documentation": "Bearer API key with the care_setting role. CareTeam searches honour the IsUnscheduledAccessEvent header (true by default).",
                "resource": resources,
            }],
        }),
    )
}
