//! Issue: remote telemetry. The real binary exports to a small OTLP/HTTP receiver started by the
//! test, which decodes what arrives with the official protobuf definitions: a run's span tree,
//! its attributes, the log records, and no secret anywhere in them.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::post;
use bynder_usage_sync::simulator::{Client, Options};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::common::*;

const CLIENT_ID: &str = "0b1c2d3e-telemetry-app";
const CLIENT_SECRET: &str = "telemetry-client-5ecr3t";
/// What a hosted collector would want in `OTEL_EXPORTER_OTLP_HEADERS`.
const API_KEY: &str = "collector-api-key-5ecr3t";

/// What the receiver got: every request body as sent, and decoded.
#[derive(Default)]
pub(crate) struct Received {
    bodies: Vec<Vec<u8>>,
    traces: Vec<ExportTraceServiceRequest>,
    logs: Vec<ExportLogsServiceRequest>,
    /// Requests that were not protobuf.
    wrong_content_type: Vec<String>,
    /// The `x-api-key` header of each request (`OTEL_EXPORTER_OTLP_HEADERS`).
    api_keys: Vec<Option<String>>,
}

/// An OTLP/HTTP receiver on a loopback port: `POST /v1/traces` and `POST /v1/logs` with
/// `application/x-protobuf` bodies, answered as the specification says.
pub(crate) struct Receiver {
    base_url: String,
    received: Arc<Mutex<Received>>,
}

impl Receiver {
    pub(crate) async fn start() -> Receiver {
        let received = Arc::new(Mutex::new(Received::default()));
        let app = axum::Router::new()
            .route("/v1/traces", post(traces))
            .route("/v1/logs", post(logs))
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            base_url: format!("http://{address}"),
            received,
        }
    }

    /// Forgets what arrived so far (e.g. from the `migrate` that set the app up).
    pub(crate) fn clear(&self) {
        *self.received.lock().unwrap() = Received::default();
    }

    /// The `[telemetry]` section pointing at this receiver.
    pub(crate) fn section(&self) -> String {
        format!("[telemetry]\notlp_endpoint = \"{}\"\n", self.base_url)
    }

    pub(crate) fn spans(&self) -> Vec<Span> {
        let received = self.received.lock().unwrap();
        received
            .traces
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    pub(crate) fn log_records(&self) -> Vec<LogRecord> {
        let received = self.received.lock().unwrap();
        received
            .logs
            .iter()
            .flat_map(|r| &r.resource_logs)
            .flat_map(|r| &r.scope_logs)
            .flat_map(|s| s.log_records.clone())
            .collect()
    }

    /// The values of a resource attribute, in every request (spans and logs).
    pub(crate) fn resource_values(&self, key: &str) -> Vec<String> {
        let received = self.received.lock().unwrap();
        let spans = received
            .traces
            .iter()
            .flat_map(|r| &r.resource_spans)
            .filter_map(|r| r.resource.as_ref());
        let logs = received
            .logs
            .iter()
            .flat_map(|r| &r.resource_logs)
            .filter_map(|r| r.resource.as_ref());
        spans
            .chain(logs)
            .flat_map(|r| &r.attributes)
            .filter(|kv| kv.key == key)
            .filter_map(
                |kv| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                },
            )
            .collect()
    }

    /// Every text the receiver got: attribute values, span names, log bodies and resource
    /// attributes, flattened.
    fn texts(&self) -> Vec<String> {
        let received = self.received.lock().unwrap();
        let mut texts = Vec::new();
        for request in &received.traces {
            for resource in &request.resource_spans {
                if let Some(r) = &resource.resource {
                    flatten_attributes(&r.attributes, &mut texts);
                }
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        texts.push(span.name.clone());
                        flatten_attributes(&span.attributes, &mut texts);
                        for event in &span.events {
                            texts.push(event.name.clone());
                            flatten_attributes(&event.attributes, &mut texts);
                        }
                        if let Some(status) = &span.status {
                            texts.push(status.message.clone());
                        }
                    }
                }
            }
        }
        for request in &received.logs {
            for resource in &request.resource_logs {
                if let Some(r) = &resource.resource {
                    flatten_attributes(&r.attributes, &mut texts);
                }
                for scope in &resource.scope_logs {
                    for record in &scope.log_records {
                        if let Some(body) = &record.body {
                            flatten_value(body, &mut texts);
                        }
                        flatten_attributes(&record.attributes, &mut texts);
                    }
                }
            }
        }
        texts
    }

    /// Asserts that no secret is in anything that arrived: neither in a decoded text nor
    /// anywhere in the raw bodies (protobuf keeps strings as they are).
    pub(crate) fn assert_no_secret(&self, secrets: &[&str]) {
        let texts = self.texts();
        assert!(!texts.is_empty(), "nothing arrived");
        for secret in secrets {
            assert!(!secret.is_empty());
            for text in &texts {
                assert!(!text.contains(secret), "a secret was sent: {text:?}");
            }
            let received = self.received.lock().unwrap();
            for body in &received.bodies {
                assert!(
                    !body.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "a secret is in a body sent to the collector"
                );
            }
        }
        for text in &texts {
            for leak in [
                "Bearer ",
                "integration_id=",
                "client_secret",
                "access_token=",
            ] {
                assert!(!text.contains(leak), "{leak:?} was sent: {text:?}");
            }
        }
    }
}

fn protobuf(headers: &HeaderMap) -> Result<(), String> {
    match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        Some("application/x-protobuf") => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

fn answer(body: Vec<u8>) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        body,
    )
}

async fn traces(
    State(received): State<Arc<Mutex<Received>>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
    let mut received = received.lock().unwrap();
    if let Err(e) = protobuf(&headers) {
        received.wrong_content_type.push(e);
    }
    received.api_keys.push(
        headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    );
    received.bodies.push(body.to_vec());
    received
        .traces
        .push(ExportTraceServiceRequest::decode(body).expect("an ExportTraceServiceRequest"));
    answer(ExportTraceServiceResponse::default().encode_to_vec())
}

async fn logs(
    State(received): State<Arc<Mutex<Received>>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
    let mut received = received.lock().unwrap();
    if let Err(e) = protobuf(&headers) {
        received.wrong_content_type.push(e);
    }
    received.api_keys.push(
        headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    );
    received.bodies.push(body.to_vec());
    received
        .logs
        .push(ExportLogsServiceRequest::decode(body).expect("an ExportLogsServiceRequest"));
    answer(ExportLogsServiceResponse::default().encode_to_vec())
}

/// A log record's body, when it is text.
pub(crate) fn log_body(record: &LogRecord) -> Option<&str> {
    match record.body.as_ref().and_then(|b| b.value.as_ref()) {
        Some(Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn flatten_value(value: &AnyValue, out: &mut Vec<String>) {
    match &value.value {
        Some(Value::StringValue(s)) => out.push(s.clone()),
        Some(Value::BytesValue(b)) => out.push(String::from_utf8_lossy(b).into_owned()),
        Some(Value::ArrayValue(a)) => a.values.iter().for_each(|v| flatten_value(v, out)),
        Some(Value::KvlistValue(kv)) => flatten_attributes(&kv.values, out),
        Some(other) => out.push(format!("{other:?}")),
        None => {}
    }
}

fn flatten_attributes(attributes: &[KeyValue], out: &mut Vec<String>) {
    for kv in attributes {
        out.push(kv.key.clone());
        if let Some(value) = &kv.value {
            flatten_value(value, out);
        }
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

pub(crate) fn text<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match attribute(span, key) {
        Some(Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn int(span: &Span, key: &str) -> Option<i64> {
    match attribute(span, key) {
        Some(Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

/// The one run span named `name`.
pub(crate) fn run_span(spans: &[Span], name: &str) -> Span {
    let runs: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(
        runs.len(),
        1,
        "one {name:?} span expected among {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    runs[0].clone()
}

/// The request spans of `endpoint` (`api` or `auth`).
pub(crate) fn requests<'a>(spans: &'a [Span], endpoint: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| text(s, "request.endpoint") == Some(endpoint))
        .collect()
}

/// Asserts that `span` is a request span of `run`: its child in the same trace, a client span
/// with a method, a path and no query, and the status code Bynder answered.
pub(crate) fn assert_request_of(span: &Span, run: &Span) {
    assert_eq!(span.trace_id, run.trace_id, "{}: another trace", span.name);
    assert_eq!(
        span.parent_span_id, run.span_id,
        "{}: not a child of the run span",
        span.name
    );
    assert_eq!(
        span.kind,
        opentelemetry_proto::tonic::trace::v1::span::SpanKind::Client as i32
    );
    let method = text(span, "http.request.method").expect("http.request.method");
    let path = text(span, "url.path").expect("url.path");
    assert!(matches!(method, "GET" | "POST" | "DELETE"), "{method}");
    assert!(path.starts_with('/') && !path.contains('?'), "{path}");
    assert_eq!(span.name, format!("{method} {path}"));
    let status = int(span, "http.response.status_code").expect("http.response.status_code");
    assert!((200..300).contains(&status), "{}: {status}", span.name);
    assert_eq!(text(span, "request.outcome"), Some("ok"));
}

async fn fill(app: &App, rows: u32) {
    for n in 0..rows {
        app.insert(&asset(n), &page(n % 3), Some(&format!("note {n}")))
            .await;
    }
}

#[tokio::test]
async fn a_resync_sends_its_run_span_with_the_bynder_requests_as_children_and_its_logs() {
    let receiver = Receiver::start().await;
    let app = spawn_app_with(Setup {
        extra: receiver.section(),
        ..Setup::default()
    })
    .await;
    receiver.clear();
    fill(&app, 6).await;
    // Debug lines are written inside the request spans: stderr must not show them.
    let out = app.run_env(&["resync"], &[("RUST_LOG", "debug")]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    app.assert_converged().await;

    // The process flushed before it exited: everything has arrived.
    let spans = receiver.spans();
    for span in &spans {
        let mut keys: Vec<&str> = span.attributes.iter().map(|kv| kv.key.as_str()).collect();
        let count = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), count, "{}: an attribute twice", span.name);
    }
    let run = run_span(&spans, "run resync");
    assert!(run.parent_span_id.is_empty(), "the run span is a root");
    assert_eq!(text(&run, "run.command"), Some("resync"));
    assert_eq!(text(&run, "run.outcome"), Some("converged"));
    assert!(int(&run, "run.id").is_some_and(|id| id > 0), "{run:?}");
    assert_eq!(int(&run, "run.creates"), Some(6));
    assert_eq!(int(&run, "run.succeeded"), Some(6));
    let api = requests(&spans, "api");
    assert_eq!(
        int(&run, "run.requests"),
        Some(api.len() as i64),
        "one span per request"
    );
    assert!(!api.is_empty());
    for request in &api {
        assert_request_of(request, &run);
    }
    assert!(api.iter().all(|s| text(s, "url.path")
        .unwrap()
        .starts_with("/api/media/usage/")));
    assert!(
        spans
            .iter()
            .all(|s| s.name == "run resync" || text(s, "request.endpoint").is_some()),
        "only run and request spans are exported: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );

    let logs = receiver.log_records();
    let finished = logs
        .iter()
        .find(|r| log_body(r) == Some("run finished"))
        .expect("the run's last log line arrived as a log record");
    assert_eq!(finished.severity_text, "INFO");
    assert_eq!(
        finished.trace_id, run.trace_id,
        "a log line written in a run belongs to the run's trace"
    );
    assert!(
        logs.iter().any(|r| r.severity_text == "DEBUG"),
        "the log level applies to the exported records too"
    );
    let resource_names = receiver.resource_values("service.name");
    assert!(resource_names.iter().all(|n| n == "bynder-usage-sync"));
    assert!(!resource_names.is_empty());
    assert!(receiver
        .received
        .lock()
        .unwrap()
        .wrong_content_type
        .is_empty());
    receiver.assert_no_secret(&[TOKEN]);

    // What stderr shows is the same as without telemetry: no exported span in its lines.
    let err = stderr(&out);
    assert!(err.contains("bynder request"), "{err}");
    assert!(!err.contains("request{") && !err.contains("run{"), "{err}");
    assert!(!err.contains("telemetry"), "{err}");
}

#[tokio::test]
async fn a_token_request_gets_a_span_in_the_run_without_the_client_secret_or_the_token() {
    let receiver = Receiver::start().await;
    let app = spawn_app_with(Setup {
        portal: Options {
            clients: vec![Client {
                client_id: CLIENT_ID.to_owned(),
                client_secret: CLIENT_SECRET.to_owned(),
                scopes: vec![
                    "asset.usage:read".to_owned(),
                    "asset.usage:write".to_owned(),
                ],
                redirect_uris: vec![],
            }],
            ..Options::default()
        },
        auth: format!(
            "method = \"client_credentials\"\nclient_id = \"{CLIENT_ID}\"\n\
             client_secret = \"{CLIENT_SECRET}\""
        ),
        extra: receiver.section(),
        ..Setup::default()
    })
    .await;
    receiver.clear();
    fill(&app, 4).await;
    let out = app
        .run_env(
            &["resync"],
            &[
                ("RUST_LOG", "trace"),
                ("OTEL_SERVICE_NAME", "sync-eu-1"),
                ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=e2e"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    format!("x-api-key={API_KEY}").as_str(),
                ),
            ],
        )
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    app.assert_converged().await;
    // The standard variables: the collector's key in every request and in no log line, the
    // service's name and attributes in every resource.
    {
        let received = receiver.received.lock().unwrap();
        assert!(!received.api_keys.is_empty());
        assert!(received
            .api_keys
            .iter()
            .all(|k| k.as_deref() == Some(API_KEY)));
    }
    assert!(!stderr(&out).contains(API_KEY) && !stdout(&out).contains(API_KEY));
    for (key, value) in [
        ("service.name", "sync-eu-1"),
        ("deployment.environment", "e2e"),
    ] {
        assert!(
            receiver.resource_values(key).iter().all(|v| v == value)
                && !receiver.resource_values(key).is_empty(),
            "{key}: {:?}",
            receiver.resource_values(key)
        );
    }

    let spans = receiver.spans();
    let run = run_span(&spans, "run resync");
    assert_eq!(text(&run, "run.outcome"), Some("converged"));
    let tokens = requests(&spans, "auth");
    assert_eq!(tokens.len(), 1, "one token for the run");
    assert_request_of(tokens[0], &run);
    assert_eq!(tokens[0].name, "POST /v6/authentication/oauth2/token");
    for request in requests(&spans, "api") {
        assert_request_of(request, &run);
    }

    let issued = app.portal.access_tokens();
    assert_eq!(issued.len(), 1);
    receiver.assert_no_secret(&[CLIENT_SECRET, issued[0].as_str(), API_KEY]);
}

#[tokio::test]
async fn an_unreachable_collector_never_fails_a_run_and_is_warned_about_once() {
    // A port nothing listens on: every export is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let app = spawn_app_with(Setup {
        extra: format!("[telemetry]\notlp_endpoint = \"http://127.0.0.1:{port}\"\n"),
        ..Setup::default()
    })
    .await;
    fill(&app, 5).await;
    let started = std::time::Instant::now();
    let out = app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    app.assert_converged().await;
    let err = stderr(&out);
    assert_eq!(
        err.matches("cannot send telemetry").count(),
        1,
        "one warning, however many exports fail:\n{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "the exit waited for the collector"
    );
}

/// stderr's lines, without what differs from run to run (times, durations, temp folders,
/// ports), in order.
fn normalized_lines(out: &std::process::Output, app: &App) -> Vec<String> {
    let folder = app.dir.path().display().to_string();
    let portal = app.portal.base_url();
    let mut lines: Vec<String> = stderr(out)
        .lines()
        .map(|line| {
            let line = line.split_once(' ').map_or(line, |(_, rest)| rest);
            let line = line.replace(&folder, "DIR").replace(&portal, "PORTAL");
            line.chars()
                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                .collect()
        })
        .collect();
    // Workers run concurrently: their lines may interleave differently.
    lines.sort();
    lines
}

#[tokio::test]
async fn stderr_reads_the_same_with_telemetry_on_or_off() {
    let receiver = Receiver::start().await;
    let mut outputs = Vec::new();
    for extra in [String::new(), receiver.section()] {
        for format in ["text", "json"] {
            let app = spawn_app_with(Setup {
                extra: format!("{extra}[log]\nformat = \"{format}\"\n"),
                ..Setup::default()
            })
            .await;
            fill(&app, 4).await;
            let out = app
                .run_env(&["resync"], &[("RUST_LOG", "bynder_usage_sync=debug")])
                .await;
            assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
            outputs.push(normalized_lines(&out, &app));
        }
    }
    assert!(!receiver.spans().is_empty(), "telemetry was on");
    assert!(
        outputs[0].iter().any(|l| l.contains("bynder request")),
        "{:#?}",
        outputs[0]
    );
    assert_eq!(outputs[0], outputs[2], "text lines changed");
    assert_eq!(outputs[1], outputs[3], "JSON lines changed");
}

#[tokio::test]
async fn a_failing_portal_shows_as_error_spans_with_the_status_bynder_answered() {
    let receiver = Receiver::start().await;
    let app = spawn_app_with(Setup {
        extra: receiver.section(),
        ..Setup::default()
    })
    .await;
    receiver.clear();
    fill(&app, 2).await;
    app.portal.set_faults(bynder_usage_sync::simulator::Faults {
        server_error_rate: 1.0,
        ..Default::default()
    });
    let out = app.run(&["resync"]).await;
    // Every attempt failed; the operations wait in the queue for the next run.
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));

    let spans = receiver.spans();
    let run = run_span(&spans, "run resync");
    assert_eq!(text(&run, "run.outcome"), Some("partial"));
    assert_eq!(int(&run, "run.succeeded"), Some(0));
    assert_eq!(int(&run, "run.left_pending"), Some(2));
    let api = requests(&spans, "api");
    assert_eq!(int(&run, "run.requests"), Some(api.len() as i64));
    assert!(api.len() > 1, "each attempt is a span");
    for request in api {
        assert_eq!(request.parent_span_id, run.span_id);
        let status = int(request, "http.response.status_code").expect("a status");
        assert!(status >= 500, "{status}");
        assert_eq!(text(request, "request.outcome"), Some("server_error"));
        assert_eq!(
            text(request, "error.type"),
            Some(status.to_string().as_str())
        );
        assert_eq!(
            request.status.as_ref().map(|s| s.code),
            Some(opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32)
        );
    }
}

#[tokio::test]
async fn rejected_credentials_make_the_run_span_an_error_without_showing_the_token() {
    const WRONG: &str = "revoked-token-5ecr3t";
    let receiver = Receiver::start().await;
    let app = spawn_app_with(Setup {
        auth: format!("method = \"permanent_token\"\npermanent_token = \"{WRONG}\""),
        extra: receiver.section(),
        ..Setup::default()
    })
    .await;
    receiver.clear();
    fill(&app, 2).await;
    let out = app.run(&["resync"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    let spans = receiver.spans();
    let run = run_span(&spans, "run resync");
    assert_eq!(text(&run, "run.outcome"), Some("credentials_rejected"));
    assert_eq!(
        run.status.as_ref().map(|s| s.code),
        Some(opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32)
    );
    let api = requests(&spans, "api");
    assert!(!api.is_empty());
    for request in api {
        assert_eq!(request.parent_span_id, run.span_id);
        assert_eq!(int(request, "http.response.status_code"), Some(401));
        assert_eq!(text(request, "request.outcome"), Some("unauthorized"));
    }
    receiver.assert_no_secret(&[WRONG]);
}
