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
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
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
        .fmt_fields(JsonSpanFields)
        .event_format(JsonLine)
        .finish()
}

/// One JSON object a line: `timestamp`, `level`, the event's fields (`message` among them), `target`, and the
/// span the event happened in as `span` (its fields and `name`). This is the shape of tracing-subscriber's JSON
/// format with `flatten_event` and `with_current_span`; that format reads each span's stored fields back with a
/// JSON parser for every line, which made a request's "request completed" line cost more than answering
/// `/health/live`. This one writes the event's fields as it visits them ([`JsonMembers`]) and copies the span's
/// stored fields (written by [`JsonSpanFields`]) as they are.
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
        writer.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut writer)?;
        write!(writer, "\",\"level\":\"{}\"", meta.level())?;
        // The event's fields go straight into the line, after the level.
        let mut members = JsonMembers::new(&mut writer, false);
        event.record(&mut members);
        members.result?;
        // A target is a module path or a name the code chose; written as a JSON string all the same.
        writer.write_str(",\"target\":")?;
        json_string_into(&mut writer, meta.target())?;
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
            writer.write_str("\"name\":")?;
            json_string_into(&mut writer, span.metadata().name())?;
            writer.write_char('}')?;
        }
        writer.write_str("}\n")
    }
}

/// Fields as a JSON object, written straight into the line or the span's stored object by [`JsonMembers`]. A
/// field recorded on a span later (the route, the status, the caller's organisation) is appended to the stored
/// object in place. tracing-subscriber's `JsonFields` writes the same members, but gathers each call's fields
/// into a map of `serde_json::Value`s first and, for a field recorded later, parses the stored object, adds the
/// field and writes it all out again: under flag checks that made the tracing subscriber a fifth of an HTTP
/// worker's time. Members come in the order they were recorded (the callsite's), not sorted by name; a field
/// recorded twice appears twice, and cpis records each once.
struct JsonSpanFields;

impl<'w> FormatFields<'w> for JsonSpanFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        writer.write_char('{')?;
        let mut members = JsonMembers::new(&mut writer, true);
        fields.record(&mut members);
        members.result?;
        writer.write_char('}')
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &span::Record<'_>,
    ) -> std::fmt::Result {
        let stored = &mut current.fields;
        // Reopen the stored object (`{...}`, or nothing for a span made with no fields) and close it again after.
        let first = if stored.ends_with('}') {
            stored.pop();
            stored.ends_with('{')
        } else {
            stored.clear();
            stored.push('{');
            true
        };
        let mut members = JsonMembers::new(stored, first);
        fields.record(&mut members);
        let result = members.result;
        stored.push('}');
        result
    }
}

/// Writes each field it visits as a JSON object member (`"name":value`), with what tracing-subscriber's
/// `JsonFields` makes of each kind of value: numbers and booleans as such (a float that is not finite as `null`),
/// strings quoted and escaped, anything else (bytes among them) as its `Debug` form in a string.
struct JsonMembers<'a> {
    out: &'a mut dyn std::fmt::Write,
    first: bool,
    result: std::fmt::Result,
}

impl<'a> JsonMembers<'a> {
    /// `first`: no member precedes these in the object.
    fn new(out: &'a mut dyn std::fmt::Write, first: bool) -> Self {
        Self {
            out,
            first,
            result: Ok(()),
        }
    }

    fn member(
        &mut self,
        name: &str,
        value: impl FnOnce(&mut dyn std::fmt::Write) -> std::fmt::Result,
    ) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                self.out.write_char(',')?;
            }
            json_string_into(self.out, name)?;
            self.out.write_char(':')?;
            value(self.out)
        })();
    }
}

impl tracing::field::Visit for JsonMembers<'_> {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.member(field.name(), |out| {
            if value.is_finite() {
                write!(out, "{value}")
            } else {
                out.write_str("null")
            }
        });
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.member(field.name(), |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.member(field.name(), |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.member(field.name(), |out| write!(out, "{value}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.member(field.name(), |out| json_string_into(out, value));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let name = field.name();
        // A `log` record's own metadata, which the line carries already.
        if name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.member(name, |out| json_string_into(out, &format!("{value:?}")));
    }
}

/// Writes `s` to `out` as a JSON string, quoted and escaped by serde_json.
fn json_string_into(out: &mut dyn std::fmt::Write, s: &str) -> std::fmt::Result {
    /// serde_json writes to an `io::Write`, in pieces that are each valid UTF-8 (the string's own runs between
    /// escapes, the quotes and the escapes), which this passes on.
    struct Utf8<'a>(&'a mut dyn std::fmt::Write);

    impl std::io::Write for Utf8<'_> {
        fn write(&mut self, piece: &[u8]) -> std::io::Result<usize> {
            let text = std::str::from_utf8(piece).map_err(std::io::Error::other)?;
            self.0.write_str(text).map_err(std::io::Error::other)?;
            Ok(piece.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    serde_json::to_writer(Utf8(out), s).map_err(|_| std::fmt::Error)
}

/// The members of a JSON object as [`JsonSpanFields`] writes it (`{"a":1,"b":"x"}` gives `"a":1,"b":"x"`); empty for
/// no fields.
fn object_members(object: &str) -> &str {
    object
        .strip_prefix('{')
        .and_then(|o| o.strip_suffix('}'))
        .unwrap_or("")
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

    /// Logs one of each kind of field, in and out of a span with fields recorded later, to `subscriber`.
    fn every_kind_of_field(subscriber: impl Subscriber + Send + Sync + 'static) {
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                count = 3u64,
                delta = -7i64,
                ok = true,
                ratio = 0.25f64,
                nothing = f64::NAN,
                wide = 12345678901234567890u128,
                bytes = &b"ab"[..],
                shown = %"Zoë \u{1}\t\"quoted\"",
                debugged = ?Some("x"),
                r#type = "raw",
                "every kind: {}", "Zoë"
            );
            let span = tracing::info_span!(
                "request",
                request_id = %"r-\u{2028}-1",
                route = tracing::field::Empty,
                status = tracing::field::Empty,
            );
            let _entered = span.enter();
            span.record("route", "/v1/\u{1F600}");
            span.record("status", 503u16);
            tracing::error!(latency_ms = 12.5, "request completed");
        });
    }

    #[test]
    fn a_line_holds_what_tracing_subscribers_own_json_format_writes() {
        let (ours, theirs) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(Mutex::new(Vec::new())),
        );
        let sink = ours.clone();
        every_kind_of_field(json_subscriber(EnvFilter::new("info"), move || {
            SinkWriter(sink.clone())
        }));
        let sink = theirs.clone();
        every_kind_of_field(
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(move || SinkWriter(sink.clone()))
                .finish(),
        );
        let without_time = |mut line: Value| {
            line.as_object_mut().unwrap().remove("timestamp");
            line
        };
        let ours: Vec<Value> = lines(&ours).into_iter().map(without_time).collect();
        let theirs: Vec<Value> = lines(&theirs).into_iter().map(without_time).collect();
        assert_eq!(ours.len(), 2);
        assert_eq!(ours, theirs);
        assert_eq!(ours[0]["shown"], "Zoë \u{1}\t\"quoted\"");
        assert_eq!(ours[0]["nothing"], Value::Null);
        assert_eq!(ours[0]["type"], "raw");
        assert_eq!(ours[1]["span"]["route"], "/v1/\u{1F600}");
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
