//! TLS termination against real rustls clients: SNI picks the certificate
//! (ECDSA and RSA), ALPN says http/1.1, TLS 1.2 and 1.3, session resumption,
//! mutual TLS, certificate hot reload with no failed request, refusal of a
//! mismatched key, handshake timeout, plaintext on the TLS port.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use gateway_tests::gateway::{free_port, gateway_bin, temp_dir};
use gateway_tests::tls::{connect, der_of, write_pair, Ca, ClientOpts};
use gateway_tests::{one_cluster, Backend, Driver, Gateway, Spec};

struct Pki {
    dir: PathBuf,
    ca: Ca,
    api: (String, String),
    rsa: (String, String),
}

fn pki() -> Pki {
    let dir = temp_dir("tls");
    let ca = Ca::new("gateway test CA");
    let api = ca.leaf(&["api.test", "*.api.test"]);
    let rsa = ca.rsa_leaf(&["rsa.test"], &dir);
    write_pair(&dir, "api", &api);
    write_pair(&dir, "rsa", &rsa);
    Pki { dir, ca, api, rsa }
}

fn tls_section(p: &Pki, port: u16, extra: &str) -> String {
    format!(
        "[tls]\nlisten = [\"127.0.0.1:{port}\"]\nhandshake_timeout = \"1s\"\nreload_check = \"200ms\"\n{extra}\n\
         [[tls.certificates]]\ncert = \"{d}/api.crt\"\nkey = \"{d}/api.key\"\n\
         [[tls.certificates]]\ncert = \"{d}/rsa.crt\"\nkey = \"{d}/rsa.key\"\n",
        d = p.dir.display()
    )
}

fn start(p: &Pki, driver: Driver, extra: &str) -> (Gateway, SocketAddr, Backend) {
    let backend = Backend::start("tls");
    let port = free_port();
    let body = format!(
        "{}\n{}",
        one_cluster(backend.addr),
        tls_section(p, port, extra)
    );
    let g = Gateway::start(Spec::new(driver, &body));
    (g, format!("127.0.0.1:{port}").parse().unwrap(), backend)
}

fn serves_over_tls(driver: Driver) {
    let p = pki();
    let (g, addr, _b) = start(&p, driver, "");
    let opts = ClientOpts::trusting(&p.ca.pem);
    let cfg = opts.config();

    let mut c = connect(addr, "api.test", cfg.clone()).expect("handshake with SNI api.test");
    assert_eq!(
        c.peer_cert(),
        der_of(&p.api.0),
        "SNI api.test gets the ECDSA api certificate"
    );
    assert_eq!(c.alpn().as_deref(), Some(&b"http/1.1"[..]), "ALPN");
    assert_eq!(c.version(), Some(rustls::ProtocolVersion::TLSv1_3));
    for _ in 0..3 {
        let (status, body) = c.get("/v1/models", "api.test").expect("request over TLS");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    let mut r = connect(addr, "rsa.test", cfg.clone()).expect("handshake with SNI rsa.test");
    assert_eq!(
        r.peer_cert(),
        der_of(&p.rsa.0),
        "SNI rsa.test gets the RSA certificate"
    );
    assert_eq!(r.get("/", "rsa.test").unwrap().0, 200);

    let w = connect(addr, "x.api.test", cfg.clone()).expect("wildcard name");
    assert_eq!(
        w.peer_cert(),
        der_of(&p.api.0),
        "*.api.test covers x.api.test"
    );

    // Unknown name: the default (first) certificate, which the client then rejects.
    let e = connect(addr, "unknown.test", cfg.clone())
        .err()
        .expect("name mismatch");
    assert!(
        e.to_string().contains("NotValidForName") || e.to_string().contains("certificate"),
        "{e}"
    );

    // TLS 1.2 still works (min_version = 1.2 by default).
    let mut o12 = opts.clone();
    o12.tls12_only = true;
    let mut c12 = connect(addr, "api.test", o12.config()).expect("TLS 1.2 handshake");
    assert_eq!(c12.version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(c12.get("/", "api.test").unwrap().0, 200);

    // A second connection with the same client config resumes.
    drop(c);
    let c2 = connect(addr, "api.test", cfg.clone()).unwrap();
    assert!(c2.resumed(), "TLS 1.3 session resumed with a ticket");
    assert!(g.wait_metric(&["gateway_tls_handshakes_total", "resumed=\"true\""], 1.0) >= 1.0);
    assert!(g.wait_metric(&["gateway_tls_handshakes_total", "version=\"1.2\""], 1.0) >= 1.0);
    assert!(g.wait_metric(&["gateway_requests_total", "status=\"200\""], 5.0) >= 5.0);
}

#[test]
fn serves_over_tls_io_uring() {
    serves_over_tls(Driver::IoUring);
}

#[test]
fn serves_over_tls_epoll() {
    serves_over_tls(Driver::Epoll);
}

#[test]
fn min_version_1_3_refuses_tls12_clients() {
    let p = pki();
    let (g, addr, _b) = start(&p, Driver::Auto, "min_version = \"1.3\"");
    let mut o = ClientOpts::trusting(&p.ca.pem);
    o.tls12_only = true;
    assert!(
        connect(addr, "api.test", o.config()).is_err(),
        "TLS 1.2 refused"
    );
    assert!(
        g.wait_metric(
            &[
                "gateway_tls_handshake_errors_total",
                "kind=\"incompatible\""
            ],
            1.0
        ) >= 1.0
    );
    o.tls12_only = false;
    assert!(
        connect(addr, "api.test", o.config()).is_ok(),
        "TLS 1.3 accepted"
    );
}

#[test]
fn mutual_tls_required() {
    let p = pki();
    let clients = Ca::new("client CA");
    std::fs::write(p.dir.join("clients-ca.pem"), &clients.pem).unwrap();
    let extra = format!(
        "client_auth = \"required\"\nclient_ca = \"{}/clients-ca.pem\"",
        p.dir.display()
    );
    let (g, addr, _b) = start(&p, Driver::Auto, &extra);

    let mut o = ClientOpts::trusting(&p.ca.pem);
    // No certificate: refused (TLS 1.3 reports it on the first read).
    let refused =
        connect(addr, "api.test", o.config()).and_then(|mut c| c.get("/", "api.test").map(|_| ()));
    assert!(
        refused.is_err(),
        "a client without a certificate is refused"
    );

    // A certificate from the wrong CA: refused.
    o.client_cert = Some(p.ca.client("intruder"));
    let refused =
        connect(addr, "api.test", o.config()).and_then(|mut c| c.get("/", "api.test").map(|_| ()));
    assert!(refused.is_err(), "a certificate from another CA is refused");

    // A certificate from the client CA: served.
    o.client_cert = Some(clients.client("svc-a"));
    let mut c = connect(addr, "api.test", o.config()).expect("mTLS handshake");
    assert_eq!(c.get("/", "api.test").unwrap().0, 200);
    let errs = g.wait_metric(&["gateway_tls_handshake_errors_total"], 2.0);
    assert!(errs >= 2.0, "both refusals counted: {errs}");
}

#[test]
fn certificates_reload_without_failed_requests_and_bad_files_are_refused() {
    let p = pki();
    let (g, addr, _b) = start(&p, Driver::Auto, "");
    let cfg = ClientOpts::trusting(&p.ca.pem).config();
    // A connection from before the change, kept alive across it.
    let mut old = connect(addr, "api.test", cfg.clone()).unwrap();
    assert_eq!(old.peer_cert(), der_of(&p.api.0));

    // Keep requesting while the files change: no request may fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let cfg = cfg.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 5000 {
                let mut c =
                    connect(addr, "api.test", cfg.clone()).expect("handshake during reload");
                assert_eq!(
                    c.get("/", "api.test").expect("request during reload").0,
                    200
                );
                n += 1;
            }
            n
        })
    };
    let renewed = p.ca.leaf(&["api.test", "*.api.test"]);
    write_pair(&p.dir, "api", &renewed);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // A fresh client config each time: a resumed session would report
        // the certificate of the session it resumed.
        let c = connect(addr, "api.test", ClientOpts::trusting(&p.ca.pem).config()).unwrap();
        if c.peer_cert() == der_of(&renewed.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "renewed certificate not served within 5 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = load.join().expect("no request failed during the reload");
    assert!(n > 0);
    assert_eq!(
        old.get("/", "api.test").unwrap().0,
        200,
        "the pre-reload connection still works"
    );
    assert!(
        g.wait_metric(
            &["gateway_tls_certificate_reloads_total", "result=\"ok\""],
            1.0
        ) >= 1.0
    );

    // A key that doesn't match its certificate: refused, the renewed pair stays.
    let other = p.ca.leaf(&["api.test"]);
    std::fs::write(p.dir.join("api.key"), &other.1).unwrap();
    assert!(
        g.wait_metric(
            &["gateway_tls_certificate_reloads_total", "result=\"error\""],
            1.0
        ) >= 1.0
    );
    assert!(
        g.log_shows("does not match the certificate"),
        "the log names the problem"
    );
    let c = connect(addr, "api.test", ClientOpts::trusting(&p.ca.pem).config())
        .expect("still serving with the certificates in force");
    assert_eq!(c.peer_cert(), der_of(&renewed.0));

    // The admin API says the same when asked to reload.
    let post = b"POST /tls/reload HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\n\r\n";
    let r = gateway_tests::request(g.admin, post);
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("does not match"));
    write_pair(&p.dir, "api", &renewed);
    let r = gateway_tests::request(g.admin, post);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("\"reloaded\":2"));
}

#[test]
fn mismatched_key_is_refused_at_start() {
    let p = pki();
    let other = p.ca.leaf(&["api.test"]);
    std::fs::write(p.dir.join("api.key"), &other.1).unwrap();
    let cfg = p.dir.join("bad.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{}\"]\n{}",
            free_port(),
            tls_section(&p, free_port(), "")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(gateway_bin())
        .arg("check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("api.key") && msg.contains("does not match"),
        "{msg}"
    );
}

#[test]
fn silent_and_plaintext_clients_are_cut_off() {
    let p = pki();
    let (g, addr, _b) = start(&p, Driver::Auto, "");
    // Connect and say nothing: closed after the 1 s handshake timeout.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "closed by the handshake timeout"
    );
    assert!(
        g.wait_metric(
            &["gateway_tls_handshake_errors_total", "kind=\"timeout\""],
            1.0
        ) >= 1.0
    );

    // Plain HTTP on the TLS port: an alert (or a close), never a response.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut got);
    assert!(!got.starts_with(b"HTTP/"), "no plaintext answer");
    assert!(
        g.wait_metric(
            &[
                "gateway_tls_handshake_errors_total",
                "kind=\"invalid_message\""
            ],
            1.0
        ) >= 1.0
    );
}

#[test]
fn testssl_finds_no_weak_protocol_cipher_or_vulnerability() {
    let p = pki();
    let (_g, addr, _b) = start(&p, Driver::Auto, "");
    let json = p.dir.join("testssl.json");
    let out = std::process::Command::new("testssl")
        .args([
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--ip",
            "one",
            "-p",
            "-s",
            "-f",
            "-U",
            "-S",
            "--jsonfile",
        ])
        .arg(&json)
        .arg(addr.to_string())
        .output()
        .expect("testssl (Debian package testssl.sh; `cargo xtask setup` installs it)");
    let text = std::fs::read_to_string(&json).unwrap_or_else(|_| {
        panic!(
            "testssl wrote no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let findings: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(
        findings.len() > 30,
        "testssl ran its checks: {} findings",
        findings.len()
    );
    // The test CA's certificate is untrusted, has no OCSP/CRL and no CAA record:
    // those findings are about the test PKI, not the gateway.
    let about_test_pki =
        |id: &str| id.starts_with("cert_") || id.starts_with("DNS_CAA") || id == "OCSP_stapling";
    let bad: Vec<String> = findings
        .iter()
        .filter(|f| {
            matches!(
                f["severity"].as_str(),
                Some("LOW" | "MEDIUM" | "HIGH" | "CRITICAL")
            )
        })
        .filter(|f| !about_test_pki(f["id"].as_str().unwrap_or("")))
        .map(|f| format!("{} [{}]: {}", f["id"], f["severity"], f["finding"]))
        .collect();
    assert!(bad.is_empty(), "testssl findings: {bad:#?}");
    let offered = |id: &str| {
        findings
            .iter()
            .find(|f| f["id"] == id)
            .map(|f| f["finding"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    for old in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert!(
            offered(old).contains("not offered"),
            "{old}: {}",
            offered(old)
        );
    }
    assert!(
        offered("TLS1_3").contains("offered"),
        "TLS 1.3: {}",
        offered("TLS1_3")
    );
}

#[test]
fn client_certificates_authenticate_by_name() {
    let p = pki();
    let clients = Ca::new("client CA");
    std::fs::write(p.dir.join("clients-ca.pem"), &clients.pem).unwrap();
    let extra = format!(
        "client_auth = \"required\"\nclient_ca = \"{}/clients-ca.pem\"\n\
         [[authn.mtls_clients]]\nname = \"svc-a\"\nclient = \"service-a\"\ntenant = \"acme\"\n\
         [[authz.rules]]\nid = \"any-cert\"\ntenants = [\"*\"]\n",
        p.dir.display()
    );
    let (_g, addr, _b) = start(&p, Driver::Auto, &extra);
    let echo = |cert: (String, String)| {
        let mut o = ClientOpts::trusting(&p.ca.pem);
        o.client_cert = Some(cert);
        let mut c = connect(addr, "api.test", o.config()).expect("mTLS handshake");
        let (status, body) = c.get("/who", "api.test").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        (status, v["headers"].clone())
    };
    let (status, h) = echo(clients.client("svc-a"));
    assert_eq!(status, 200);
    assert_eq!(
        h["x-gateway-principal"], "service-a",
        "mapped by the certificate's CN"
    );
    assert_eq!(h["x-gateway-tenant"], "acme");
    assert_eq!(h["x-forwarded-proto"], "https");
    // An unmapped certificate is still an identity (its name), with no tenant:
    // the "*" tenant rule needs an authenticated caller, which it is.
    let (status, h) = echo(clients.client("svc-b"));
    assert_eq!(status, 200);
    assert_eq!(h["x-gateway-principal"], "svc-b");
    assert!(h.get("x-gateway-tenant").is_none());
}

#[test]
fn large_bodies_cross_tls_intact() {
    // Many full 16 KiB records: socket reads that end mid-record and
    // complete two records at once must not overflow rustls' plaintext buffer.
    let p = pki();
    let (_g, addr, _b) = start(&p, Driver::IoUring, "");
    let cfg = ClientOpts::trusting(&p.ca.pem).config();
    let mut c = connect(addr, "api.test", cfg).unwrap();
    let body: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let (status, resp) = c
        .post("/upload", "api.test", &body)
        .expect("24 MiB over TLS");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    let v: serde_json::Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(v["body_len"], body.len() as u64, "every byte arrived");
    // And the connection is still good for the next request.
    assert_eq!(c.get("/", "api.test").unwrap().0, 200);
}

/// `[[tls.listeners]]`: one TLS listener requires client certificates, the
/// other (the `[tls]` default) does not; both serve the same routes.
#[test]
fn mutual_tls_per_listener() {
    let p = pki();
    let clients = Ca::new("client CA");
    std::fs::write(p.dir.join("clients-ca.pem"), &clients.pem).unwrap();
    let backend = Backend::start("tls");
    let (open_port, mtls_port) = (free_port(), free_port());
    let body = format!(
        "{}\n[tls]\nlisten = [\"127.0.0.1:{open_port}\", \"127.0.0.1:{mtls_port}\"]\nhandshake_timeout = \"1s\"\n\
         [[tls.listeners]]\nlisten = \"127.0.0.1:{mtls_port}\"\nclient_auth = \"required\"\nclient_ca = \"{d}/clients-ca.pem\"\n\
         [[tls.certificates]]\ncert = \"{d}/api.crt\"\nkey = \"{d}/api.key\"\n",
        one_cluster(backend.addr),
        d = p.dir.display()
    );
    let g = Gateway::start(Spec::new(Driver::Auto, &body));
    let open: SocketAddr = format!("127.0.0.1:{open_port}").parse().unwrap();
    let mtls: SocketAddr = format!("127.0.0.1:{mtls_port}").parse().unwrap();

    let mut o = ClientOpts::trusting(&p.ca.pem);
    let mut c = connect(open, "api.test", o.config()).expect("no client certificate needed");
    assert_eq!(c.get("/", "api.test").unwrap().0, 200);
    let refused =
        connect(mtls, "api.test", o.config()).and_then(|mut c| c.get("/", "api.test").map(|_| ()));
    assert!(
        refused.is_err(),
        "the mTLS listener refuses a client without a certificate"
    );

    o.client_cert = Some(clients.client("svc-a"));
    let mut c = connect(mtls, "api.test", o.config()).expect("mTLS handshake");
    assert_eq!(c.get("/", "api.test").unwrap().0, 200);
    assert!(g.wait_metric(&["gateway_tls_handshake_errors_total"], 1.0) >= 1.0);

    // A reload that drops the mTLS port from tls.listen (a restart would
    // unbind it) must not leave it serving without client certificates.
    let reloaded = format!(
        "{}\n[tls]\nlisten = [\"127.0.0.1:{open_port}\"]\nhandshake_timeout = \"1s\"\n\
         [[tls.certificates]]\ncert = \"{d}/api.crt\"\nkey = \"{d}/api.key\"\n",
        one_cluster(backend.addr),
        d = p.dir.display()
    );
    g.rewrite_config(&reloaded);
    g.reload();
    let anonymous = ClientOpts::trusting(&p.ca.pem);
    let refused = connect(mtls, "api.test", anonymous.config())
        .and_then(|mut c| c.get("/", "api.test").map(|_| ()));
    assert!(
        refused.is_err(),
        "the unlisted port refuses handshakes until a restart"
    );
    let mut c = connect(open, "api.test", anonymous.config()).expect("the open port still serves");
    assert_eq!(c.get("/", "api.test").unwrap().0, 200);

    // A listener entry must name one of tls.listen.
    let bad = format!(
        "{}\n[tls]\nlisten = [\"127.0.0.1:{open_port}\"]\n[[tls.listeners]]\nlisten = \"127.0.0.1:1\"\n\
         [[tls.certificates]]\ncert = \"{d}/api.crt\"\nkey = \"{d}/api.key\"\n",
        one_cluster(backend.addr),
        d = p.dir.display()
    );
    let file = p.dir.join("bad-listeners.toml");
    std::fs::write(&file, bad).unwrap();
    let out = std::process::Command::new(gateway_bin())
        .args(["check-config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tls.listeners[0].listen"), "{text}");
}

/// Session tickets survive a configuration reload: a client resumes after
/// SIGHUP instead of paying a full handshake again.
#[test]
fn resumption_survives_a_reload() {
    let p = pki();
    let (g, addr, _b) = start(&p, Driver::Auto, "");
    let cfg = ClientOpts::trusting(&p.ca.pem).config();
    let mut c = connect(addr, "api.test", cfg.clone()).unwrap();
    // The ticket arrives after the handshake: one request makes sure it's read.
    assert_eq!(c.get("/", "api.test").unwrap().0, 200);
    drop(c);
    g.reload();
    let mut c = connect(addr, "api.test", cfg).unwrap();
    assert!(
        c.resumed(),
        "the ticket issued before the reload still resumes"
    );
    assert_eq!(c.get("/", "api.test").unwrap().0, 200);
}

#[test]
fn requests_reach_tls_backends_verified_and_with_a_client_certificate() {
    // The backend side: a second gateway terminating TLS, requiring a client
    // certificate, in front of the test backend (it names the caller).
    let p = pki();
    let clients = Ca::new("gateway client CA");
    std::fs::write(p.dir.join("clients-ca.pem"), &clients.pem).unwrap();
    std::fs::write(p.dir.join("ca.pem"), &p.ca.pem).unwrap();
    write_pair(&p.dir, "front", &clients.client("front-gw"));
    let extra = format!(
        "client_auth = \"required\"\nclient_ca = \"{d}/clients-ca.pem\"\n\
         [[authn.mtls_clients]]\nname = \"front-gw\"\nclient = \"front\"\ntenant = \"edge\"\n\
         [[authz.rules]]\nid = \"any\"\ntenants = [\"*\"]\n",
        d = p.dir.display()
    );
    let (_back, back_addr, _b) = start(&p, Driver::Auto, &extra);
    // The gateway under test: its cluster's backend speaks TLS.
    let front = |tls: &str| {
        let body = format!(
            "[clusters.b]\nbackends = [\"{back_addr}\"]\n[clusters.b.tls]\n{tls}\n\
             [[routes]]\nname = \"all\"\npath_prefix = \"/\"\ncluster = \"b\"\n"
        );
        Gateway::start(Spec::new(Driver::Auto, &body))
    };
    let d = p.dir.display();
    let g = front(&format!(
        "ca = \"{d}/ca.pem\"\nserver_name = \"api.test\"\nclient_cert = \"{d}/front.crt\"\nclient_key = \"{d}/front.key\""
    ));
    let r = gateway_tests::request(g.addr, b"GET /who HTTP/1.1\r\nhost: t\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        v["headers"]["x-gateway-principal"], "front",
        "the backend saw the gateway's certificate"
    );
    // A body streamed through TLS on both sides arrives whole.
    let body = vec![b'z'; 300_000];
    let mut raw = format!(
        "PUT /echo HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(&body);
    let r = gateway_tests::request(g.addr, &raw);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 300_000);
    // The wrong name: the backend's certificate is refused, nothing is sent.
    let bad = front(&format!("ca = \"{d}/ca.pem\"\nserver_name = \"other.test\"\nclient_cert = \"{d}/front.crt\"\nclient_key = \"{d}/front.key\""));
    let r = gateway_tests::request(bad.addr, b"GET /who HTTP/1.1\r\nhost: t\r\n\r\n");
    assert_eq!(r.status, 502);
    assert!(bad.log_shows("TLS handshake with the backend failed"));
    // A CA file that isn't one is a configuration error.
    let body = format!(
        "[clusters.b]\nbackends = [\"{back_addr}\"]\n[clusters.b.tls]\nca = \"{d}/api.key\"\n[[routes]]\ncluster = \"b\"\n"
    );
    let out = std::process::Command::new(gateway_bin())
        .args(["check-config"])
        .arg({
            let f = p.dir.join("bad-upstream.toml");
            std::fs::write(&f, &body).unwrap();
            f
        })
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("clusters.b.tls"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
