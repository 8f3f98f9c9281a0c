//! Logging: one subscriber (JSON or human) and one span per request carrying a request id, the route and the
//! caller's organisation. Spans and events record ids only: never a query string, a body, an NHS number or a
//! name.

use crate::config::{LogFormat, LogSettings};
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::HttpMessage;
use std::sync::OnceLock;
use std::time::Instant;
use tracing::Instrument;
use tracing::{span, Event, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The request id, available to handlers through the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Log lines waiting for the log thread at most; past that a line is dropped and counted
/// ([`dropped_lines`]) rather than holding up a request. At 25,000 requests a second this is over half a second of
/// lines, about 6 MB.
const LOG_QUEUE_LINES: usize = 16_384;
/// The log thread's buffer: it writes what has queued up in one system call, up to this much.
const LOG_WRITE_BUFFER: usize = 64 * 1024;

/// Counts the lines dropped because the log thread fell behind (the metrics' `cpis_log_lines_dropped_total`).
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines dropped so far because standard error could not take them as fast as they came.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Keeps the log thread running; dropping it (at the end of `main`) writes out what is queued.
#[must_use = "the log thread stops when the guard is dropped"]
pub struct LogGuard {
    _worker: Option<WorkerGuard>,
}

/// Installs the global subscriber writing to standard error; a second call is a no-op.
///
/// Lines are formatted on the thread that logs them and written by a thread of their own (`cpis-log`), which
/// writes whatever has queued in one call: a request's "request completed" line costs it no system call, and a
/// slow reader of standard error never holds up an answer. If the queue is full the line is dropped and
/// counted, not waited for; the audit trail, not the log, is the record of who saw what.
pub fn init(settings: &LogSettings) -> LogGuard {
    let filter = EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("cpis-log")
        .finish(std::io::BufWriter::with_capacity(
            LOG_WRITE_BUFFER,
            std::io::stderr(),
        ));
    let dropped = writer.error_counter();
    let installed = match settings.format {
        LogFormat::Json => json_subscriber(filter, writer).try_init().is_ok(),
        LogFormat::Human => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .try_init()
            .is_ok(),
    };
    if installed {
        let _ = DROPPED.set(dropped);
        LogGuard {
            _worker: Some(guard),
        }
    } else {
        LogGuard { _worker: None }
    }
}

/// The JSON subscriber: [`JsonLine`] lines, span fields kept by [`JsonSpanFields`].
fn json_subscriber<W>(filter: EnvFilter, writer: W) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .fmt_fields(JsonSpanFields(JsonFields::new()))
        .event_format(JsonLine)
        .finish()
}

/// One JSON object a line: `timestamp`, `level`, the event's fields (`message` among them), `target`, and the
/// span the event happened in as `span` (its fields and `name`). This is the shape of tracing-subscriber's JSON
/// format with `flatten_event` and `with_current_span`; that format reads each span's stored fields back with a
/// JSON parser for every line, which made a request's "request completed" line cost more than answering
/// `/health/live`. This one copies the stored fields (JSON written by [`JsonFields`]) as they are.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut fields = String::new();
        ctx.format_fields(Writer::new(&mut fields), event)?;
        writer.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut writer)?;
        write!(writer, "\",\"level\":\"{}\"", meta.level())?;
        let fields = object_members(&fields);
        if !fields.is_empty() {
            write!(writer, ",{fields}")?;
        }
        // A target is a module path or a name the code chose; written as a JSON string all the same.
        write!(writer, ",\"target\":{}", json_string(meta.target()))?;
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(span) = span {
            writer.write_str(",\"span\":{")?;
            if let Some(stored) = span.extensions().get::<FormattedFields<N>>() {
                let members = object_members(&stored.fields);
                if !members.is_empty() {
                    write!(writer, "{members},")?;
                }
            }
            write!(writer, "\"name\":{}}}", json_string(span.metadata().name()))?;
        }
        writer.write_str("}\n")
    }
}

/// A span's fields as a JSON object, written by [`JsonFields`]. A field recorded later (the route, the status, the
/// caller's organisation) is appended to the object. [`JsonFields`] would parse the object, add the field and
/// write it all out again each time; for the three fields a request records, that was a seventh of an HTTP
/// worker's time under flag checks. A field recorded twice appears twice; cpis records each once.
struct JsonSpanFields(JsonFields);

impl<'w> FormatFields<'w> for JsonSpanFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> std::fmt::Result {
        self.0.format_fields(writer, fields)
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &span::Record<'_>,
    ) -> std::fmt::Result {
        let mut added = String::new();
        self.0.format_fields(Writer::new(&mut added), fields)?;
        let added = object_members(&added);
        if added.is_empty() {
            return Ok(());
        }
        let existing = object_members(&current.fields);
        current.fields = if existing.is_empty() {
            format!("{{{added}}}")
        } else {
            format!("{{{existing},{added}}}")
        };
        Ok(())
    }
}

/// The members of a JSON object as [`JsonFields`] writes it (`{"a":1,"b":"x"}` gives `"a":1,"b":"x"`); empty for
/// no fields.
fn object_members(object: &str) -> &str {
    let object = object.trim();
    object
        .strip_prefix('{')
        .and_then(|o| o.strip_suffix('}'))
        .unwrap_or("")
        .trim()
}

/// `s` as a JSON string, quoted and escaped.
fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serialises")
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

/// Middleware: the request span, the completion log line, the request metrics and the `X-Request-Id` response
/// header.
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
        // Middleware inside this one answer their refusals as responses ([`crate::auth::authenticate`]), so that
        // every request is logged, counted and given its request id.
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::sync::{Arc, Mutex};

    /// What the subscriber wrote, line by line, parsed.
    fn lines(buffer: &Mutex<Vec<u8>>) -> Vec<Value> {
        String::from_utf8(buffer.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[test]
    fn a_json_line_carries_the_event_and_its_span_with_the_fields_recorded_later() {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let writer = move || SinkWriter(sink.clone());
        let subscriber = json_subscriber(EnvFilter::new("info"), writer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(port = 8080u64, "listening on 8080");
            let span = tracing::info_span!(
                "request",
                request_id = "r-1",
                route = tracing::field::Empty,
                org = tracing::field::Empty,
                status = tracing::field::Empty,
            );
            let _entered = span.enter();
            tracing::warn!("before the route is known");
            span.record("route", "/v1/flag-checks");
            span.record("org", "say \"A\"\n");
            span.record("status", 200u16);
            tracing::info!(latency_ms = 1.5, "request completed");
            tracing::debug!("below the filter");
        });
        let lines = lines(&buffer);
        assert_eq!(lines.len(), 3, "{lines:?}");
        let (started, early, done) = (&lines[0], &lines[1], &lines[2]);
        assert_eq!(started["message"], "listening on 8080");
        assert_eq!(started["port"], 8080);
        assert_eq!(started["level"], "INFO");
        assert_eq!(started["target"], module_path!());
        assert!(started.get("span").is_none(), "{started}");
        assert!(
            chrono::DateTime::parse_from_rfc3339(started["timestamp"].as_str().unwrap()).is_ok()
        );
        assert_eq!(early["level"], "WARN");
        assert_eq!(
            early["span"],
            serde_json::json!({"request_id": "r-1", "name": "request"})
        );
        assert_eq!(done["message"], "request completed");
        assert_eq!(done["latency_ms"], 1.5);
        assert_eq!(
            done["span"],
            serde_json::json!({
                "request_id": "r-1",
                "route": "/v1/flag-checks",
                "org": "say \"A\"\n",
                "status": 200,
                "name": "request",
            })
        );
    }

    struct SinkWriter(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SinkWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
