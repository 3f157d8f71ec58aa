//! OpenTelemetry traces: a real OTLP/HTTP receiver (started here) gets the
//! gateway's spans and decodes them with the OpenTelemetry project's own
//! protobuf types (`opentelemetry-proto`), independent of the gateway's
//! encoder. A client's `traceparent` is continued; one that says "not
//! sampled" is obeyed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_tests::{one_cluster, Backend, Client, Driver, Gateway, Spec};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// An OTLP/HTTP receiver: every POSTed body decoded, its spans kept.
fn receiver() -> (std::net::SocketAddr, Arc<Mutex<Vec<Span>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let out = spans.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut len = 0usize;
            let mut line = String::new();
            let mut ctype = String::new();
            let mut first = true;
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if first {
                    assert!(line.starts_with("POST /v1/traces "), "{line}");
                    first = false;
                }
                let l = line.trim_end().to_ascii_lowercase();
                if l.is_empty() {
                    break;
                }
                if let Some(v) = l.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if let Some(v) = l.strip_prefix("content-type:") {
                    ctype = v.trim().to_string();
                }
            }
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).unwrap();
            assert_eq!(ctype, "application/x-protobuf");
            let req =
                ExportTraceServiceRequest::decode(body.as_slice()).expect("valid OTLP protobuf");
            for rs in req.resource_spans {
                let service = rs.resource.unwrap().attributes;
                assert!(service.iter().any(|kv| kv.key == "service.name"));
                for ss in rs.scope_spans {
                    out.lock().unwrap().extend(ss.spans);
                }
            }
            let mut w = c;
            let _ =
                w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (addr, spans)
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(v) => Some(v.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            _ => None,
        }
    })
}

#[test]
fn spans_reach_an_otlp_receiver_with_their_stages() {
    let (otlp, spans) = receiver();
    let b = Backend::start("t");
    let body = format!(
        "{}\n[tracing]\notlp_endpoint = \"{otlp}\"\nsample_ratio = 1.0\n",
        one_cluster(b.addr)
    );
    let g = Gateway::start(Spec::new(Driver::Auto, &body));
    let mut c = Client::connect(g.addr);
    // Continued: the client's trace and span.
    c.send(b"GET /traced HTTP/1.1\r\nHost: a\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 200);
    // The backend got the gateway's span as its parent, in the same trace.
    let sent = r.json()["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // Not sampled by the client: obeyed.
    c.send(b"GET /untraced HTTP/1.1\r\nHost: a\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4737-00f067aa0ba902b7-00\r\n\r\n");
    assert_eq!(c.read_response().status, 200);
    // None: a new trace (ratio 1.0).
    assert_eq!(c.get("/fresh").status, 200);

    let deadline = Instant::now() + Duration::from_secs(10);
    while spans.lock().unwrap().len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(700));
    let spans = spans.lock().unwrap().clone();
    let by_path = |p: &str| {
        spans
            .iter()
            .find(|s| attr(s, "url.path").as_deref() == Some(p))
            .cloned()
    };
    let traced = by_path("/traced").expect("the continued trace was exported");
    assert_eq!(hex(&traced.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&traced.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(
        sent,
        format!("00-{}-{}-01", hex(&traced.trace_id), hex(&traced.span_id))
    );
    assert_eq!(traced.span_id.len(), 8);
    assert!(traced.end_time_unix_nano >= traced.start_time_unix_nano);
    let names: Vec<&str> = traced.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        ["authn", "validate", "ratelimit", "upstream"],
        "stage events in order"
    );
    let up = &traced.events[3];
    assert!(up.attributes.iter().any(|kv| kv.key == "backend"), "{up:?}");
    assert!(
        by_path("/untraced").is_none(),
        "an unsampled traceparent was traced"
    );
    let fresh = by_path("/fresh").expect("a new trace");
    assert_eq!(fresh.trace_id.len(), 16);
    assert!(fresh.parent_span_id.is_empty());
    assert_ne!(fresh.trace_id, traced.trace_id);
    assert!(g.wait_metric(&["gateway_trace_spans_total", "result=\"exported\""], 2.0) >= 2.0);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
