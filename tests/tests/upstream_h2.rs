//! HTTP routes to backends that speak HTTP/2 (`[clusters.X] http = "h2c"`
//! and `"2"` over TLS), through the real binary, against nginx (Debian's,
//! an HTTP/2 implementation not ours) in front of the test backend — the
//! shape of a model server behind a mesh sidecar. nginx's access log says
//! which protocol each request reached it by.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway_tests::gateway::{free_port, temp_dir};
use gateway_tests::tls::{write_pair, Ca};
use gateway_tests::{request, Backend, Client, Driver, Gateway, Spec};

/// nginx with an h2c listener and a TLS HTTP/2 listener (client
/// certificates from `client_ca` required there when given), proxying to
/// `backend` over HTTP/1.1.
struct Nginx {
    child: Child,
    dir: PathBuf,
    h2c: SocketAddr,
    tls: SocketAddr,
    /// TLS offering HTTP/1.1 only.
    tls_h1: SocketAddr,
}

impl Nginx {
    fn start(backend: SocketAddr, cert: &Path, key: &Path, client_ca: Option<&Path>) -> Nginx {
        Self::start_with(backend, cert, key, client_ca, "")
    }

    /// `extra`: more `http` block directives.
    fn start_with(
        backend: SocketAddr,
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        extra: &str,
    ) -> Nginx {
        let dir = temp_dir("nginx-h2");
        let (h2c, tls, tls_h1) = (free_port(), free_port(), free_port());
        let d = dir.display();
        let verify = client_ca.map_or(String::new(), |ca| {
            format!(
                "ssl_client_certificate {};\n    ssl_verify_client on;",
                ca.display()
            )
        });
        let conf = format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  log_format proto '$server_protocol $request_method $request_uri $status $http_x_request_id $connection';\n\
               access_log {d}/access.log proto;\n  {extra}\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;\n\
               uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               upstream b {{ server {backend}; keepalive 8; }}\n\
               server {{\n    listen 127.0.0.1:{h2c} http2;\n    listen 127.0.0.1:{tls} ssl http2;\n\
                 listen 127.0.0.1:{tls_h1} ssl;\n\
                 ssl_certificate {cert};\n    ssl_certificate_key {key};\n    {verify}\n\
                 client_max_body_size 50m;\n\
                 location / {{\n      proxy_pass http://b;\n      proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
                   proxy_buffering off;\n      proxy_request_buffering off;\n    }}\n  }}\n}}\n",
            cert = cert.display(),
            key = key.display(),
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx runs (cargo xtask setup installs it)");
        let n = Nginx {
            child,
            dir,
            h2c: format!("127.0.0.1:{h2c}").parse().unwrap(),
            tls: format!("127.0.0.1:{tls}").parse().unwrap(),
            tls_h1: format!("127.0.0.1:{tls_h1}").parse().unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(n.tls).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                std::fs::read_to_string(n.dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        n
    }

    /// Access log lines: `PROTOCOL METHOD URI STATUS X-REQUEST-ID CONNECTION`.
    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Wait for `n` access lines (nginx writes after the response).
    fn wait_log(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let l = self.log();
            if l.len() >= n || Instant::now() > deadline {
                return l;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gateway(cluster: &str) -> Gateway {
    Gateway::start(Spec::new(
        Driver::Auto,
        &format!("{cluster}\n[[routes]]\nname = \"all\"\npath_prefix = \"/\"\ncluster = \"b\"\n"),
    ))
}

/// nginx's connection numbers for the requests to `path` it logged.
fn connections_for(nginx: &Nginx, path: &str) -> std::collections::BTreeSet<String> {
    nginx
        .log()
        .iter()
        .filter(|l| l.contains(&format!(" {path} ")))
        .filter_map(|l| l.rsplit(' ').next().map(String::from))
        .collect()
}

/// `n` requests for `path` at once, each on its own client connection; their statuses.
fn concurrently(g: &Gateway, path: &str, n: usize) -> Vec<u16> {
    let addr = g.addr;
    let raw = format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n");
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let raw = raw.clone();
            std::thread::spawn(move || request(addr, raw.as_bytes()).status)
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn streams_share_a_connection_up_to_the_limit_then_more_open() {
    let backend = Backend::start("b1");
    let (_dir, _ca, cert, key) = certificates("h2pool");
    let nginx = Nginx::start(backend.addr, &cert, &key, None);
    let start = |extra: &str| {
        Gateway::start(Spec {
            workers: 1,
            ..Spec::new(
                Driver::Auto,
                &format!(
                    "[clusters.b]\nbackends = [\"{}\"]\nhttp = \"h2c\"\n{extra}\n\
                     [[routes]]\nname = \"all\"\npath_prefix = \"/\"\ncluster = \"b\"\n",
                    nginx.h2c
                ),
            )
        })
    };
    // Default (100 streams a connection): four at once share one.
    let g = start("");
    assert_eq!(concurrently(&g, "/slow?ms=1500", 4), vec![200; 4]);
    let one = connections_for(&nginx, "/slow?ms=1500");
    assert_eq!(one.len(), 1, "{:?}", nginx.log());
    // One stream a connection: each of four at once gets its own…
    let g = start("max_streams_per_connection = 1");
    assert_eq!(concurrently(&g, "/slow?ms=1501", 4), vec![200; 4]);
    let four = connections_for(&nginx, "/slow?ms=1501");
    assert_eq!(four.len(), 4, "{:?}", nginx.log());
    // …and they are reused after, not opened again.
    for _ in 0..3 {
        assert_eq!(
            request(g.addr, b"GET /slow?ms=1 HTTP/1.1\r\nhost: t\r\n\r\n").status,
            200
        );
    }
    let after = connections_for(&nginx, "/slow?ms=1");
    assert!(after.is_subset(&four), "{after:?} ⊄ {four:?}");
    // A cap of two connections: four at once wait their turn on them.
    let g = start("max_streams_per_connection = 1\nmax_connections = 2\npool_max_idle = 2");
    assert_eq!(concurrently(&g, "/slow?ms=1502", 4), vec![200; 4]);
    assert!(
        connections_for(&nginx, "/slow?ms=1502").len() <= 2,
        "{:?}",
        nginx.log()
    );
}

fn certificates(tag: &str) -> (PathBuf, Ca, PathBuf, PathBuf) {
    let dir = temp_dir(tag);
    let ca = Ca::new("h2 backend CA");
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    let (cert, key) = write_pair(&dir, "backend", &ca.leaf(&["model.test"]));
    (dir, ca, cert, key)
}

#[test]
fn http_routes_reach_an_h2c_backend_whole_and_streamed() {
    let backend = Backend::start("b1");
    let (_dir, _ca, cert, key) = certificates("h2c");
    let nginx = Nginx::start(backend.addr, &cert, &key, None);
    // A dead backend first: its refusal moves each request on to nginx.
    let dead = format!("127.0.0.1:{}", free_port());
    let g = gateway(&format!(
        "[clusters.b]\nbackends = [\"{dead}\", \"{}\"]\nhttp = \"h2c\"\n[clusters.b.balance]\nalgorithm = \"round_robin\"\n",
        nginx.h2c
    ));

    // A bodiless GET: the backend saw the gateway's forwarding headers.
    let r = request(g.addr, b"GET /echo?q=1 HTTP/1.1\r\nhost: api.test\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["path"], "/echo");
    assert_eq!(v["headers"]["host"], "api.test", "{v}");
    assert!(v["headers"]["x-forwarded-for"].as_str().is_some(), "{v}");
    let id = r.header("x-request-id").expect("request id").to_string();
    let log = nginx.wait_log(1);
    assert!(
        log.iter()
            .any(|l| l.starts_with("HTTP/2.0 GET /echo?q=1 200") && l.contains(&id)),
        "nginx got it over HTTP/2 with the gateway's request id: {log:?}"
    );

    // Bodies both ways, larger than the HTTP/2 windows: a length-framed
    // upload, a chunked one (re-framed as DATA), a 3 MB answer.
    let body = vec![b'q'; 3_000_000];
    let mut raw = format!(
        "PUT /echo HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(&body);
    let r = request(g.addr, &raw);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], 3_000_000);
    assert_eq!(
        r.json()["body_fnv"],
        format!("{:016x}", gateway_tests::backend::fnv(&body))
    );
    let mut c = Client::connect(g.addr);
    c.send(b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], 11);
    assert_eq!(
        r.json()["body_fnv"],
        format!("{:016x}", gateway_tests::backend::fnv(b"hello world"))
    );
    // The same connection carries on (keep-alive through the relay).
    let r = c.get("/big?bytes=3000000");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 3_000_000);

    // A stream: every event, in order, chunked to the HTTP/1.1 client.
    let r = c.get("/sse?n=5&gap_ms=20");
    assert_eq!(r.status, 200);
    assert!(r.chunked, "a stream without a length goes chunked");
    let text = r.text();
    for i in 0..5 {
        assert!(text.contains(&format!("data: {{\"token\":{i}}}")), "{text}");
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // HEAD: the head only.
    let mut c = Client::connect(g.addr);
    c.send(b"HEAD /echo HTTP/1.1\r\nhost: t\r\n\r\n");
    let r = c.read_response_to(true);
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());

    // A client that leaves while the model works: its stream is reset, and
    // the generation behind nginx is aborted (the GPU is freed).
    let mut c = Client::connect(g.addr);
    c.send(b"GET /generate?ms=4000 HTTP/1.1\r\nhost: t\r\n\r\n");
    std::thread::sleep(Duration::from_millis(300));
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(3);
    while backend.aborted() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        backend.aborted(),
        1,
        "the generation was aborted when its client left"
    );

    // Every request that reached nginx did so over HTTP/2, and the dead
    // backend cost no request.
    let log = nginx.wait_log(6);
    assert!(log.len() >= 6, "{log:?}");
    assert!(log.iter().all(|l| l.starts_with("HTTP/2.0 ")), "{log:?}");
    assert!(
        g.wait_metric(
            &["gateway_upstream_errors_total", "kind=\"connect_refused\""],
            1.0
        ) >= 1.0,
        "round robin tried the dead backend: {}",
        g.metrics()
    );
}

#[test]
fn http_routes_reach_a_tls_h2_backend_with_a_client_certificate() {
    let backend = Backend::start("b1");
    let (dir, _ca, cert, key) = certificates("h2tls");
    let clients = Ca::new("gateway client CA");
    std::fs::write(dir.join("clients-ca.pem"), &clients.pem).unwrap();
    let (ccert, ckey) = write_pair(&dir, "gw", &clients.client("front-gw"));
    let nginx = Nginx::start(backend.addr, &cert, &key, Some(&dir.join("clients-ca.pem")));
    let d = dir.display();
    let cluster = |extra: &str| {
        format!(
            "[clusters.b]\nbackends = [\"{}\"]\nhttp = \"2\"\n[clusters.b.tls]\nca = \"{d}/ca.pem\"\nserver_name = \"model.test\"\n{extra}",
            nginx.tls
        )
    };
    let g = gateway(&cluster(&format!(
        "client_cert = \"{}\"\nclient_key = \"{}\"\n",
        ccert.display(),
        ckey.display()
    )));
    let chat = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = request(
        g.addr,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{chat}",
            chat.len()
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("data: [DONE]"), "{}", r.text());
    let log = nginx.wait_log(1);
    assert!(
        log.iter()
            .any(|l| l.starts_with("HTTP/2.0 POST /v1/chat/completions 200")),
        "{log:?}"
    );

    // Without the client certificate nginx refuses the gateway (400 from
    // nginx: no certificate sent), relayed as the backend's answer.
    let g2 = gateway(&cluster(""));
    let r = request(g2.addr, b"GET /echo HTTP/1.1\r\nhost: t\r\n\r\n");
    assert_eq!(r.status, 400, "{}", r.text());

    // A TLS backend that doesn't offer h2 by ALPN: a connect error (502),
    // and the log says why.
    let g3 = gateway(&cluster("").replace(&nginx.tls.to_string(), &nginx.tls_h1.to_string()));
    let r = request(g3.addr, b"GET /echo HTTP/1.1\r\nhost: t\r\n\r\n");
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        g3.log_shows("did not negotiate HTTP/2"),
        "{}",
        g3.log_text()
    );

    // "2" without TLS, or "h2c" with it, is a configuration error.
    for (http, tls) in [("2", ""), ("h2c", "\n[clusters.b.tls]\nverify = false")] {
        let cfg = temp_dir("h2cfg").join("gateway.toml");
        let mut f = std::fs::File::create(&cfg).unwrap();
        write!(
            f,
            "[clusters.b]\nbackends = [\"127.0.0.1:1\"]\nhttp = \"{http}\"{tls}\n\n[[routes]]\npath_prefix = \"/\"\ncluster = \"b\"\n"
        )
        .unwrap();
        let out = Command::new(gateway_tests::gateway::gateway_bin())
            .arg("check-config")
            .arg(&cfg)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{http}: {text}");
        assert!(text.contains("clusters.b.http"), "{http}: {text}");
    }
}

/// curl over h2c with prior knowledge: (HTTP version, status, body as text).
fn curl_h2c(addr: SocketAddr, path: &str, args: &[&str]) -> (String, u16, String) {
    let (v, code, body) = gateway_tests::curl_h2c(addr, path, args);
    (v, code, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn http2_on_both_sides_keeps_every_pipeline_stage() {
    let backend = Backend::start("b1");
    let (_dir, _ca, cert, key) = certificates("h2both");
    let nginx = Nginx::start(backend.addr, &cert, &key, None);
    let key_text = "sk-h2-both-0123456789";
    let g = Gateway::start(Spec {
        server_extra: "h2c = true",
        ..Spec::new(
            Driver::Auto,
            &format!(
                "[clusters.b]\nbackends = [\"{}\"]\nhttp = \"h2c\"\n\
                 [[models]]\nname = \"m\"\n[[models]]\nname = \"secret\"\n\
                 [[routes]]\nname = \"chat\"\npath_prefix = \"/v1/\"\nprotocol = \"openai\"\ncluster = \"b\"\n\
                 [[authn.api_keys]]\nclient = \"app\"\ntenant = \"acme\"\nsha256 = [\"{}\"]\n\
                 [[authz.rules]]\nid = \"acme\"\ntenants = [\"acme\"]\nmodels = [\"m\"]\n",
                nginx.h2c,
                gateway_tests::jwt::key_digest(key_text)
            ),
        )
    });
    let auth = format!("authorization: Bearer {key_text}");
    let post = |body: &str| {
        curl_h2c(
            g.addr,
            "/v1/chat/completions",
            &[
                "-H",
                &auth,
                "-H",
                "content-type: application/json",
                "-d",
                body,
            ],
        )
    };
    // A stream, HTTP/2 from the client to the gateway and from the gateway
    // to nginx: every event, and the usage the gateway asked for counted.
    let (v, code, body) = post(
        r#"{"model":"m","stream":true,"max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!((v.as_str(), code), ("2", 200), "{body}");
    assert!(body.contains("data: [DONE]"), "{body}");
    // Refusals come from the gateway, in OpenAI's shape, and never reach nginx.
    let (_, code, body) = post(r#"{"model":"secret","messages":[{"role":"user","content":"hi"}]}"#);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("permission_error"), "{body}");
    let (_, code, body) = post(r#"{"model":"m","messages":"not a list"}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("invalid_request_error"), "{body}");
    let (_, code, _) = curl_h2c(g.addr, "/v1/models", &[]);
    assert_eq!(code, 401, "no key");
    let log = nginx.wait_log(1);
    assert_eq!(
        log.len(),
        1,
        "only the allowed request reached nginx: {log:?}"
    );
    assert!(
        log[0].starts_with("HTTP/2.0 POST /v1/chat/completions 200"),
        "{log:?}"
    );
    assert!(
        g.wait_metric(
            &[
                "gateway_requests_total",
                "status=\"200\"",
                "protocol=\"h2c\""
            ],
            1.0
        ) >= 1.0
    );
}

#[test]
fn a_backend_that_closes_connections_after_n_requests_costs_no_request() {
    // nginx ends each client connection with GOAWAY after 3 requests: with
    // one backend, each request that meets a closing connection goes again
    // on a fresh one, to the same backend.
    let backend = Backend::start("b1");
    let (_dir, _ca, cert, key) = certificates("h2goaway");
    let nginx = Nginx::start_with(backend.addr, &cert, &key, None, "keepalive_requests 3;");
    let g = gateway(&format!(
        "[clusters.b]\nbackends = [\"{}\"]\nhttp = \"h2c\"\n",
        nginx.h2c
    ));
    let mut c = Client::connect(g.addr);
    for i in 0..20 {
        let r = c.get(&format!("/echo?i={i}"));
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    assert_eq!(concurrently(&g, "/echo?burst", 12), vec![200; 12]);
    let log = nginx.wait_log(32);
    assert_eq!(log.len(), 32, "{log:?}");
    let conns = log
        .iter()
        .filter_map(|l| l.rsplit(' ').next())
        .collect::<std::collections::BTreeSet<_>>();
    assert!(
        conns.len() >= 32 / 3,
        "nginx closed connections as asked: {conns:?}"
    );
}
