//! HTTP API v1: routes, the JSON body extractor, and the handlers grouped by resource. Handlers turn DTOs into
//! domain values, run one transaction through `Db`, and shape the answer; they never send anything out.

mod attendances;
mod audit;
pub(crate) mod flag_checks;
mod health;
mod keys;
mod mpi;
mod notifications;
pub mod openapi;
mod organisations;
mod patient;
mod plans;

use crate::auth;
use crate::error::{ApiError, FieldError};
use crate::startup::AppState;
use actix_web::body::{BoxBody, EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{from_fn, ErrorHandlerResponse, ErrorHandlers};
use actix_web::{web, FromRequest, HttpRequest, ResponseError};
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

pub use keys::{create_key, parse_roles, revoke_key};
pub use organisations::store as store_organisation;

/// Checks an organisation given as JSON (the CLI builds one from its flags).
pub fn parse_organisation(
    body: serde_json::Value,
) -> Result<organisations::NewOrganisation, ApiError> {
    let body: organisations::OrganisationBody =
        serde_json::from_value(body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    organisations::NewOrganisation::try_from(body)
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/health/live").get(health::live))
        .service(web::resource("/health/ready").get(health::ready))
        .service(web::resource("/metrics").get(health::metrics))
        .service(web::resource("/openapi.json").get(openapi::openapi_json))
        .configure(crate::fhir::configure)
        .service(
            web::scope("/v1")
                .wrap(from_fn(auth::authenticate))
                // A scope tries its routes in order, matching each one with a path parameter by regular
                // expression; the clinical routes come first, before the six such routes (1.5% of a flag check).
                .service(web::resource("/flag-checks").post(flag_checks::check))
                .service(web::resource("/attendances").post(attendances::create))
                .service(web::resource("/keys").post(keys::create))
                .service(web::resource("/keys/{id}").delete(keys::revoke))
                .service(web::resource("/organisations").post(organisations::upsert))
                .service(web::resource("/organisations/{ods}").get(organisations::read))
                .service(
                    web::resource("/organisations/{ods}/delivery").put(notifications::put_delivery),
                )
                .service(web::resource("/notifications").get(notifications::list))
                .service(web::resource("/notifications/{id}").get(notifications::read))
                .service(
                    web::resource("/notifications/{id}/redeliver").post(notifications::redeliver),
                )
                .service(web::resource("/plans").post(plans::register))
                .service(web::resource("/plans/search").post(plans::search))
                .service(web::resource("/plans/bulk").post(plans::bulk))
                .service(
                    web::resource("/plans/{id}")
                        .get(plans::read)
                        .patch(plans::patch),
                )
                .service(web::resource("/mpi/links").post(mpi::link))
                .service(web::resource("/mpi/resolve").post(mpi::resolve))
                .service(web::resource("/audit/search").post(audit::search))
                .service(web::resource("/audit/verify").get(audit::verify)),
        );
}

/// Turns actix's own empty-bodied errors (unknown route, wrong method) into problem details.
pub fn problem_errors<B: MessageBody + 'static>() -> ErrorHandlers<B> {
    ErrorHandlers::new().default_handler(|res: ServiceResponse<B>| {
        let is_problem = res
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("problem+json") || v.contains("fhir+json"));
        if is_problem {
            return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
        }
        let error = match res.status().as_u16() {
            404 => ApiError::NotFound("no such resource".into()),
            405 => ApiError::MethodNotAllowed,
            401 => ApiError::Unauthenticated {
                detail: "an API key is required",
            },
            403 => ApiError::Forbidden("forbidden".into()),
            413 => ApiError::PayloadTooLarge("the request body is too large".into()),
            415 => ApiError::UnsupportedMediaType("unsupported content type".into()),
            400..=499 => ApiError::BadRequest("the request could not be understood".into()),
            _ => ApiError::internal(anyhow::anyhow!("unhandled error status {}", res.status())),
        };
        let (req, _) = res.into_parts();
        let response: actix_web::HttpResponse<BoxBody> = error.error_response();
        let res: ServiceResponse<EitherBody<B, BoxBody>> =
            ServiceResponse::new(req, response).map_into_right_body();
        Ok(ErrorHandlerResponse::Response(res))
    })
}

pub async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such resource".into()))
}

/// A JSON body: `application/json` (or another `+json` type), within the configured size, deserialised with the
/// path of the first field that does not fit, so the caller is told exactly what is wrong.
pub struct ApiJson<T>(pub T);

fn is_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
        .unwrap_or(false)
}

pub fn body_limit(req: &HttpRequest) -> usize {
    req.app_data::<web::Data<AppState>>()
        .map(|s| s.settings.server.json_limit)
        .unwrap_or(64 * 1024)
}

pub fn declared_length(req: &HttpRequest) -> Option<usize> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Reads a whole body up to `limit` bytes; a longer one is refused without reading the rest.
pub async fn read_body(
    payload: &mut Payload,
    limit: usize,
    declared: Option<usize>,
) -> Result<Vec<u8>, ApiError> {
    let too_large =
        || ApiError::PayloadTooLarge(format!("the request body must be at most {limit} bytes"));
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::BadRequest(format!("the request body could not be read: {e}"))
        })?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Every body cpis accepts is a JSON object; serde would otherwise read an array as a struct's fields in order.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::validation("body", "must be a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => ApiError::Validation(vec![FieldError {
                field: if path == "." { "body".into() } else { path },
                message: inner.to_string(),
            }]),
            _ => ApiError::BadRequest(format!("the body is not valid JSON: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?;
    Ok(value)
}

impl<T: DeserializeOwned + 'static> FromRequest for ApiJson<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let json = is_json(req);
        let limit = body_limit(req);
        let declared = declared_length(req);
        let mut payload = payload.take();
        Box::pin(async move {
            if !json {
                return Err(ApiError::UnsupportedMediaType(
                    "send the body as application/json".into(),
                ));
            }
            let body = read_body(&mut payload, limit, declared).await?;
            parse_json(&body).map(ApiJson)
        })
    }
}

/// For merge-patch fields: absent is `None`, `null` is `Some(None)`, a value is `Some(Some(v))`.
pub fn double_option<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Page numbers start at 1.
pub fn page_number(page: Option<i64>) -> Result<i64, ApiError> {
    match page {
        None => Ok(1),
        Some(p) if (1..=100_000).contains(&p) => Ok(p),
        Some(_) => Err(ApiError::validation("page", "must be between 1 and 100000")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        inner: Option<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        count: u32,
    }

    #[test]
    fn json_errors_name_the_field_and_tell_syntax_from_shape() {
        match parse_json::<Body>(br#"{"name": "a", "inner": {"count": "x"}}"#) {
            Err(ApiError::Validation(e)) => assert_eq!(e[0].field, "inner.count"),
            other => panic!("{other:?}"),
        }
        match parse_json::<Body>(br#"{"name": "a", "nmae": 1}"#) {
            Err(ApiError::Validation(e)) => assert!(e[0].message.contains("unknown field `nmae`")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_json::<Body>(br#"{"name": "a""#),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            parse_json::<Body>(br#"{"name": "a"} trailing"#),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            parse_json::<Body>(b""),
            Err(ApiError::BadRequest(_))
        ));
    }
}
