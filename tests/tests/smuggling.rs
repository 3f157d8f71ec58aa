//! Request smuggling and desync vectors, each sent to the real gateway: each
//! is refused with its status, the connection is closed (its framing can't
//! be trusted), and no smuggled request reaches the backend.

use std::time::Duration;

use gateway_tests::{both_drivers, one_cluster, Backend, Client, Driver, Gateway, Spec};

struct Case {
    what: &'static str,
    raw: &'static [u8],
    status: u16,
}

const CASES: &[Case] = &[
    Case { what: "CL.CL duplicate", raw: b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 30\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n", status: 400 },
    Case { what: "CL.CL same value", raw: b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd", status: 400 },
    Case { what: "CL list", raw: b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\nabcd", status: 400 },
    Case { what: "CL.TE", raw: b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n", status: 400 },
    Case { what: "TE.CL", raw: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n", status: 400 },
    Case { what: "TE not final chunked", raw: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", status: 400 },
    Case { what: "TE chunked twice", raw: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", status: 400 },
    Case { what: "TE unknown coding", raw: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", status: 501 },
    Case { what: "TE obfuscated", raw: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", status: 501 },
    Case { what: "TE with space before colon", raw: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", status: 400 },
    Case { what: "TE in HTTP/1.0", raw: b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", status: 400 },
    Case { what: "obs-fold", raw: b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n", status: 400 },
    Case { what: "obs-fold hiding TE", raw: b"POST / HTTP/1.1\r\nHost: a\r\nX: y\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", status: 400 },
    Case { what: "bare LF line ending", raw: b"GET / HTTP/1.1\nHost: a\n\n", status: 400 },
    Case { what: "bare CR in header", raw: b"GET / HTTP/1.1\r\nHost: a\rX-Injected: 1\r\n\r\n", status: 400 },
    Case { what: "NUL in header value", raw: b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", status: 400 },
    Case { what: "invalid header name", raw: b"GET / HTTP/1.1\r\nHost: a\r\nBad[Name]: 1\r\n\r\n", status: 400 },
    Case { what: "missing Host", raw: b"GET / HTTP/1.1\r\n\r\n", status: 400 },
    Case { what: "repeated Host", raw: b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", status: 400 },
    Case { what: "signed CL", raw: b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nabcd", status: 400 },
    Case { what: "hex CL", raw: b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x4\r\n\r\nabcd", status: 400 },
    Case { what: "absolute-form target", raw: b"GET http://internal/admin HTTP/1.1\r\nHost: a\r\n\r\n", status: 400 },
    Case { what: "unknown version", raw: b"GET / HTTP/1.7\r\nHost: a\r\n\r\n", status: 400 },
    Case { what: "CONNECT", raw: b"CONNECT internal:22 HTTP/1.1\r\nHost: internal:22\r\n\r\n", status: 501 },
    Case { what: "chunk size not hex", raw: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nz\r\nabc\r\n0\r\n\r\n", status: 400 },
    Case { what: "negative chunk size", raw: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n", status: 400 },
    Case { what: "chunk size overflow", raw: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000001\r\nabc\r\n0\r\n\r\n", status: 400 },
    Case { what: "chunk data longer than size", raw: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n", status: 400 },
    Case { what: "chunk size with bare LF", raw: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", status: 400 },
];

both_drivers!(smuggling_vectors_are_refused_and_close, |d: Driver| {
    let b = Backend::start("b");
    let g = Gateway::start(Spec::new(d, &one_cluster(b.addr)));
    for case in CASES {
        let mut c = Client::connect(g.addr);
        c.send(case.raw);
        let r = c.read_response();
        assert_eq!(r.status, case.status, "{}: wrong status", case.what);
        let ty = r.error_type();
        assert!(
            ["invalid_request", "not_implemented"].contains(&ty.as_str()),
            "{}: type {ty}",
            case.what
        );
        assert_eq!(
            r.header("connection"),
            Some("close"),
            "{}: must close",
            case.what
        );
        assert!(
            c.closed_within(Duration::from_secs(3)),
            "{}: connection left open",
            case.what
        );
        assert!(
            !r.text().contains("smuggled"),
            "{}: payload echoed",
            case.what
        );
    }
    // Nothing complete reached the backend: no smuggled request, no half-framed one.
    assert_eq!(
        b.requests(),
        0,
        "the backend received {} request(s)",
        b.requests()
    );
    let rejected = g.wait_metric(
        &["gateway_request_errors_total", "source=\"client\""],
        CASES.len() as f64,
    );
    assert_eq!(rejected, CASES.len() as f64);
});

both_drivers!(valid_edge_cases_still_pass, |d: Driver| {
    let b = Backend::start("b");
    let g = Gateway::start(Spec::new(d, &one_cluster(b.addr)));
    let mut c = Client::connect(g.addr);
    // Case-insensitive chunked, OWS around values, chunk extensions, trailers.
    c.send(b"POST /ok HTTP/1.1\r\nhost: a\r\ntransfer-encoding:  Chunked \r\n\r\n3;x=\"y\"\r\nabc\r\n0\r\nX-T: 1\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 3);
    // OPTIONS *.
    c.send(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read_response().status, 200);
    // HEAD: no body follows even though the upstream announces a length.
    c.send(b"HEAD /big?bytes=5000 HTTP/1.1\r\nHost: a\r\n\r\n");
    let r = c.read_response_to(true);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("5000"));
    assert_eq!(c.get("/after-head").json()["path"], "/after-head");
});

both_drivers!(connection_header_cannot_strip_framing, |d: Driver| {
    let b = Backend::start("b");
    let g = Gateway::start(Spec::new(d, &one_cluster(b.addr)));
    let inner = b"GET /smuggled HTTP/1.1\r\nHost: internal\r\n\r\n";
    let mut c = Client::connect(g.addr);
    c.send(format!("POST /outer HTTP/1.1\r\nHost: a\r\nConnection: content-length, host\r\nContent-Length: {}\r\n\r\n", inner.len()).as_bytes());
    c.send(inner);
    let r = c.read_response();
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["path"], "/outer");
    assert_eq!(
        v["body_len"],
        inner.len() as u64,
        "the body must stay the body"
    );
    assert_eq!(v["headers"]["host"], "a");
    // The backend saw exactly one request: nothing was smuggled.
    assert_eq!(c.get("/next").json()["path"], "/next");
    assert_eq!(b.requests(), 2);
});

both_drivers!(head_errors_have_no_body, |d: Driver| {
    let b = Backend::start("b");
    let body = format!(
        "{}\n[[routes]]\npath_prefix = \"/never\"\ncluster = \"b\"\n",
        one_cluster(b.addr)
    )
    .replace("path_prefix = \"/\"", "path_prefix = \"/api/\"");
    let g = Gateway::start(Spec::new(d, &body));
    let mut c = Client::connect(g.addr);
    c.send(b"HEAD /nowhere HTTP/1.1\r\nHost: a\r\n\r\n");
    let r = c.read_response_to(true);
    assert_eq!(r.status, 404);
    assert!(r.header("content-length").is_some());
    // No stray body: the next response on this connection parses cleanly.
    let r = c.get("/api/x");
    assert_eq!(r.status, 200, "{:?}", r.text());
});

both_drivers!(unsupported_response_codings_are_refused, |d: Driver| {
    let b = Backend::start("b");
    let g = Gateway::start(Spec::new(d, &one_cluster(b.addr)));
    let mut c = Client::connect(g.addr);
    let r = c.get("/te-gzip");
    assert_eq!(r.status, 502);
    assert_eq!(r.error_type(), "bad_gateway");
});
