//! OpenTelemetry traces: one span per request, its stages as span events,
//! exported as OTLP/HTTP protobuf to `[tracing] otlp_endpoint` by one
//! background thread (never on a worker: a worker only hands a finished
//! span to a bounded queue, and drops it — counted — when the queue is full).
//!
//! A W3C `traceparent` from the client is continued (its trace id, its span
//! as our parent, its sampled flag obeyed); otherwise a trace is started and
//! sampled at `sample_ratio`. The protobuf messages below are the OTLP trace
//! protocol's (`opentelemetry/proto/trace/v1`, field numbers as published),
//! encoded with `prost`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::TracingConfig;

/// The process's exporter (made once at start; `None` without an endpoint).
pub struct Tracer {
    tx: SyncSender<Span>,
    ratio: f64,
    metrics: Arc<crate::metrics::Metrics>,
}

/// One request's span while it runs.
pub struct Trace {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    start_ns: u64,
    events: Vec<Event>,
    attrs: Vec<(&'static str, Value)>,
}

#[derive(Clone, Debug)]
pub enum Value {
    Str(String),
    Int(i64),
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_string())
    }
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v.min(i64::MAX as u64) as i64)
    }
}

struct Event {
    at_ns: u64,
    name: &'static str,
    attrs: Vec<(&'static str, Value)>,
}

/// A finished span, on its way to the exporter.
pub struct Span {
    trace: Trace,
    name: String,
    end_ns: u64,
    error: bool,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// A W3C `traceparent`: `00-<trace id>-<parent span id>-<flags>`, lower-case
/// hex, neither id all zeros. `None` when it isn't one.
pub fn parse_traceparent(v: &[u8]) -> Option<([u8; 16], [u8; 8], bool)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let mut it = s.split('-');
    let (ver, tid, pid, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
    if ver != "00" || it.next().is_some() || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let trace_id: [u8; 16] = hex(tid)?;
    let parent: [u8; 8] = hex(pid)?;
    let flags: [u8; 1] = hex(flags)?;
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace_id, parent, flags[0] & 1 == 1))
}

impl Tracer {
    /// Start the exporter thread, when an endpoint is configured.
    pub fn start(
        cfg: &TracingConfig,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> std::io::Result<Option<Arc<Tracer>>> {
        if cfg.otlp_endpoint.is_empty() {
            return Ok(None);
        }
        let addr = cfg
            .otlp_endpoint
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other("no address for tracing.otlp_endpoint"))?;
        let (tx, rx) = sync_channel::<Span>(cfg.max_queue);
        let m = metrics.clone();
        let (host, path, service) = (
            cfg.otlp_endpoint.clone(),
            cfg.otlp_path.clone(),
            cfg.service_name.clone(),
        );
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                let mut batch = Vec::new();
                loop {
                    let gone = match rx.recv_timeout(Duration::from_millis(500)) {
                        Ok(s) => {
                            batch.push(s);
                            batch.extend(rx.try_iter().take(511));
                            false
                        }
                        Err(RecvTimeoutError::Timeout) => false,
                        Err(RecvTimeoutError::Disconnected) => true,
                    };
                    if !batch.is_empty() {
                        let n = batch.len() as u64;
                        let body = encode(&service, std::mem::take(&mut batch));
                        let result = match post(addr, &host, &path, &body) {
                            Ok(()) => "exported",
                            Err(err) => {
                                tracing::warn!(error = %err, spans = n, "OTLP export failed; spans dropped");
                                "failed"
                            }
                        };
                        m.trace_spans.with_label_values(&[result]).inc_by(n);
                    }
                    if gone {
                        return;
                    }
                }
            })?;
        Ok(Some(Arc::new(Tracer {
            tx,
            ratio: cfg.sample_ratio,
            metrics,
        })))
    }

    /// A request's trace, when it is sampled: continuing the client's
    /// `traceparent` (and its decision), else a new one at `sample_ratio`.
    /// `draw` is a uniform number in [0, 1); `ids` fresh random bits.
    pub fn begin(
        &self,
        traceparent: Option<&[u8]>,
        draw: f64,
        ids: (u64, u64, u64),
    ) -> Option<Trace> {
        let (trace_id, parent) = match traceparent.and_then(parse_traceparent) {
            Some((t, p, true)) => (t, Some(p)),
            Some((_, _, false)) => return None,
            None if draw < self.ratio => {
                let mut t = [0u8; 16];
                t[..8].copy_from_slice(&ids.0.to_be_bytes());
                t[8..].copy_from_slice(&ids.1.to_be_bytes());
                (t, None)
            }
            None => return None,
        };
        Some(Trace {
            trace_id,
            span_id: (ids.2 | 1).to_be_bytes(),
            parent,
            start_ns: now_ns(),
            events: Vec::with_capacity(6),
            attrs: Vec::with_capacity(8),
        })
    }

    /// Hand a finished span to the exporter (dropped and counted when the
    /// queue is full: a worker never waits for the collector).
    pub fn finish(&self, trace: Trace, name: String, error: bool) {
        let span = Span {
            trace,
            name,
            end_ns: now_ns(),
            error,
        };
        if self.tx.try_send(span).is_err() {
            self.metrics
                .trace_spans
                .with_label_values(&["dropped"])
                .inc();
        }
    }
}

impl Trace {
    /// A stage's event, now.
    pub fn event(&mut self, name: &'static str, attrs: Vec<(&'static str, Value)>) {
        self.events.push(Event {
            at_ns: now_ns(),
            name,
            attrs,
        });
    }

    pub fn attr(&mut self, k: &'static str, v: impl Into<Value>) {
        self.attrs.push((k, v.into()));
    }

    /// The `traceparent` that names this span (for the backend).
    pub fn traceparent(&self) -> String {
        let h = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        format!("00-{}-{}-01", h(&self.trace_id), h(&self.span_id))
    }
}

// --- OTLP protobuf (opentelemetry/proto/collector/trace/v1 and trace/v1) ---

#[derive(Clone, PartialEq, prost::Message)]
struct ExportTraceServiceRequest {
    #[prost(message, repeated, tag = "1")]
    resource_spans: Vec<ResourceSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    scope_spans: Vec<ScopeSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Resource {
    #[prost(message, repeated, tag = "1")]
    attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ScopeSpans {
    #[prost(message, optional, tag = "1")]
    scope: Option<InstrumentationScope>,
    #[prost(message, repeated, tag = "2")]
    spans: Vec<PbSpan>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct InstrumentationScope {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbSpan {
    #[prost(bytes = "vec", tag = "1")]
    trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    span_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    parent_span_id: Vec<u8>,
    #[prost(string, tag = "5")]
    name: String,
    /// SPAN_KIND_SERVER = 2.
    #[prost(int32, tag = "6")]
    kind: i32,
    #[prost(fixed64, tag = "7")]
    start_time_unix_nano: u64,
    #[prost(fixed64, tag = "8")]
    end_time_unix_nano: u64,
    #[prost(message, repeated, tag = "9")]
    attributes: Vec<KeyValue>,
    #[prost(message, repeated, tag = "11")]
    events: Vec<PbEvent>,
    #[prost(message, optional, tag = "15")]
    status: Option<Status>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbEvent {
    #[prost(fixed64, tag = "1")]
    time_unix_nano: u64,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(message, repeated, tag = "3")]
    attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Status {
    #[prost(string, tag = "2")]
    message: String,
    /// STATUS_CODE_UNSET = 0, OK = 1, ERROR = 2.
    #[prost(int32, tag = "3")]
    code: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct KeyValue {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(message, optional, tag = "2")]
    value: Option<AnyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AnyValue {
    #[prost(oneof = "any_value::Value", tags = "1, 3")]
    value: Option<any_value::Value>,
}

mod any_value {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(string, tag = "1")]
        StringValue(String),
        #[prost(int64, tag = "3")]
        IntValue(i64),
    }
}

fn kv(k: &str, v: &Value) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue {
            value: Some(match v {
                Value::Str(s) => any_value::Value::StringValue(s.clone()),
                Value::Int(i) => any_value::Value::IntValue(*i),
            }),
        }),
    }
}

fn encode(service: &str, spans: Vec<Span>) -> Vec<u8> {
    use prost::Message;
    let spans = spans
        .into_iter()
        .map(|s| PbSpan {
            trace_id: s.trace.trace_id.to_vec(),
            span_id: s.trace.span_id.to_vec(),
            parent_span_id: s.trace.parent.map(|p| p.to_vec()).unwrap_or_default(),
            name: s.name,
            kind: 2,
            start_time_unix_nano: s.trace.start_ns,
            end_time_unix_nano: s.end_ns,
            attributes: s.trace.attrs.iter().map(|(k, v)| kv(k, v)).collect(),
            events: s
                .trace
                .events
                .iter()
                .map(|e| PbEvent {
                    time_unix_nano: e.at_ns,
                    name: e.name.to_string(),
                    attributes: e.attrs.iter().map(|(k, v)| kv(k, v)).collect(),
                })
                .collect(),
            status: Some(Status {
                message: String::new(),
                code: if s.error { 2 } else { 0 },
            }),
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", &Value::Str(service.to_string()))],
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "gateway".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                spans,
            }],
        }],
    }
    .encode_to_vec()
}

/// POST one batch; a 2xx answer is success.
fn post(addr: SocketAddr, host: &str, path: &str, body: &[u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut status = [0u8; 12];
    s.read_exact(&mut status)?;
    match &status[9..10] {
        b"2" => Ok(()),
        _ => Err(std::io::Error::other(format!(
            "collector answered {}",
            String::from_utf8_lossy(&status[9..12])
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing() {
        let ok = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (t, p, sampled) = parse_traceparent(ok).unwrap();
        assert_eq!(t[0], 0x4b);
        assert_eq!(p[7], 0xb7);
        assert!(sampled);
        assert!(
            !parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .unwrap()
                .2
        );
        for bad in [
            &b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"[..],
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            b"garbage",
        ] {
            assert!(
                parse_traceparent(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
