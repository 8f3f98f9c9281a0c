//! Logging: one subscriber (JSON or human) and one span per request carrying a request id, the route and the
//! caller's organisation. Spans and events record ids only: never a query string, a body, an NHS number or a
//! name.

use crate::config::{LogFormat, LogSettings};
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::HttpMessage;
use std::time::Instant;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;

/// The request id, available to handlers through the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Installs the global subscriber writing to standard error; a second call is a no-op.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// Accepts a caller's request id if it is a short token, so ids can be followed across systems; otherwise
/// makes one. A caller cannot smuggle arbitrary text into the logs this way.
fn request_id_from(req: &ServiceRequest) -> String {
    req.headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Middleware: the request span, the completion log line and the `X-Request-Id` response header.
pub async fn request_span(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let request_id = request_id_from(&req);
    req.extensions_mut().insert(RequestId(request_id.clone()));
    // The path only: query strings can carry NHS numbers (FHIR searches) and are never recorded.
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %req.method(),
        path = %req.path(),
        route = tracing::field::Empty,
        org = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    let started = Instant::now();
    async move {
        let mut res = next.call(req).await?;
        let span = tracing::Span::current();
        if let Some(route) = res.request().match_pattern() {
            span.record("route", route.as_str());
        }
        span.record("status", res.status().as_u16());
        if let Some(state) = res
            .request()
            .app_data::<actix_web::web::Data<crate::startup::AppState>>()
        {
            let route = res
                .request()
                .match_pattern()
                .unwrap_or_else(|| "unmatched".into());
            let elapsed = started.elapsed().as_secs_f64();
            state
                .metrics
                .requests
                .with_label_values(&[
                    route.as_str(),
                    res.request().method().as_str(),
                    res.status().as_str(),
                ])
                .inc();
            state
                .metrics
                .request_seconds
                .with_label_values(&[route.as_str()])
                .observe(elapsed);
        }
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            res.headers_mut()
                .insert(HeaderName::from_static(REQUEST_ID_HEADER), value);
        }
        tracing::info!(
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request completed"
        );
        Ok(res)
    }
    .instrument(span)
    .await
}
