//! Authentication and authorization through the real binary: JWTs per
//! algorithm and every classic attack, API keys with rotation and
//! revocation, JWKS rotation from a live JWKS server, the policy rules, and
//! what the backend sees (identity headers, never client-forged ones).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_tests::gateway::temp_dir;
use gateway_tests::jwt::{b64, claims, jwks, key_digest, now, SigningKey};
use gateway_tests::{request, Backend, Driver, Gateway, Response, Spec};

const ISS: &str = "https://idp.test";
const AUD: &str = "inference";

struct Setup {
    g: Gateway,
    _b: Backend,
    es: SigningKey,
    rs: SigningKey,
    ed: SigningKey,
}

fn config(backend: SocketAddr, jwks_source: &str, extra: &str) -> String {
    format!(
        r#"
[clusters.b]
backends = ["{backend}"]

[[models]]
name = "llama-3-8b"
[[models]]
name = "mistral-7b"

[[routes]]
name = "health"
path_exact = "/health"
cluster = "b"
anonymous = true

[[routes]]
name = "chat"
path_prefix = "/v1/"
protocol = "openai"
cluster = "b"

[[routes]]
name = "keys-only"
path_prefix = "/batch/"
cluster = "b"
auth = ["api_key"]

[[routes]]
name = "all"
path_prefix = "/"
cluster = "b"

[[authn.jwt]]
issuer = "{ISS}"
audiences = ["{AUD}"]
algorithms = ["ES256", "RS256", "EdDSA"]
{jwks_source}
leeway = "5s"
unknown_kid_refetch = "1s"

[[authn.api_keys]]
client = "batch-jobs"
tenant = "acme"
roles = ["batch"]
sha256 = ["{k1}", "{k2}"]

[[authn.api_keys]]
client = "ops"
roles = ["admin"]
sha256 = ["{k3}"]

[[authz.rules]]
id = "ops-admin"
roles = ["admin"]
scopes = ["admin"]

[[authz.rules]]
id = "acme-llama"
tenants = ["acme"]
models = ["llama-3-*"]

[[authz.rules]]
id = "anyone-no-model"
tenants = ["*"]
models = [""]

[[authz.rules]]
id = "globex-all"
tenants = ["globex"]
models = ["*"]
{extra}
"#,
        k1 = key_digest("key-one-0123456789"),
        k2 = key_digest("key-two-0123456789"),
        k3 = key_digest("ops-key-0123456789"),
    )
}

fn setup() -> Setup {
    let dir = temp_dir("auth");
    let es = SigningKey::es256("es-1");
    let rs = SigningKey::rs256("rs-1", &dir);
    let ed = SigningKey::eddsa("ed-1");
    let path = dir.join("jwks.json");
    std::fs::write(&path, jwks(&[&es, &rs, &ed])).unwrap();
    let b = Backend::start("auth");
    let g = Gateway::start(Spec::new(
        Driver::Auto,
        &config(b.addr, &format!("jwks_file = \"{}\"", path.display()), ""),
    ));
    Setup {
        g,
        _b: b,
        es,
        rs,
        ed,
    }
}

fn get(g: &Gateway, path: &str, auth: &str) -> Response {
    let raw = format!("GET {path} HTTP/1.1\r\nhost: t\r\n{auth}\r\n");
    request(g.addr, raw.as_bytes())
}

fn bearer(t: &str) -> String {
    format!("authorization: Bearer {t}\r\n")
}

fn chat(g: &Gateway, model: &str, auth: &str) -> Response {
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":5}}"#
    );
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{auth}\r\n{body}",
        body.len()
    );
    request(g.addr, raw.as_bytes())
}

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn echoed(r: &Response) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_default()
}

#[test]
fn valid_tokens_per_algorithm_and_identity_reaches_the_backend() {
    let s = setup();
    for key in [&s.es, &s.rs, &s.ed] {
        let t = key.sign(&claims(ISS, AUD, "alice", "globex"));
        // A forged identity header from the client must not survive.
        let r = get(
            &s.g,
            "/echo",
            &format!(
                "{}x-gateway-tenant: root\r\nx_gateway_principal: root\r\n",
                bearer(&t)
            ),
        );
        assert_eq!(
            r.status,
            200,
            "{:?}: {}",
            key.alg,
            String::from_utf8_lossy(&r.body)
        );
        let h = &echoed(&r)["headers"];
        assert_eq!(h["x-gateway-principal"], "alice", "{:?}", key.alg);
        assert_eq!(
            h["x-gateway-tenant"], "globex",
            "the forged tenant header was replaced"
        );
        assert_eq!(h["x-gateway-roles"], "user");
        assert!(
            h.get("authorization").is_none(),
            "credentials are not forwarded by default"
        );
        assert!(
            h.get("x_gateway_principal").is_none(),
            "the underscore spelling is stripped too"
        );
    }
    assert!(
        s.g.wait_metric(
            &["gateway_authn_total", "method=\"jwt\"", "result=\"ok\""],
            3.0
        ) >= 3.0
    );
}

#[test]
fn every_classic_jwt_attack_is_a_uniform_401() {
    let s = setup();
    let good = claims(ISS, AUD, "mallory", "globex");
    let t = now();
    let other = SigningKey::es256("es-1"); // same kid, different key
    let tamper = {
        let tok = s.es.sign(&good);
        let parts: Vec<&str> = tok.split('.').collect();
        let mut c = good.clone();
        c["tenant"] = "acme".into();
        format!(
            "{}.{}.{}",
            parts[0],
            b64(c.to_string().as_bytes()),
            parts[2]
        )
    };
    let alg_none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT","kid":"es-1"}"#),
        b64(good.to_string().as_bytes())
    );
    // HS256 keyed with the RSA public key: the classic RS/HS confusion.
    let confusion = {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some("rs-1".into());
        jsonwebtoken::encode(
            &h,
            &good,
            &jsonwebtoken::EncodingKey::from_secret(s.rs.public_pem.as_bytes()),
        )
        .unwrap()
    };
    let mut expired = good.clone();
    expired["exp"] = (t - 60).into();
    let mut future = good.clone();
    future["nbf"] = (t + 600).into();
    let mut iat_future = good.clone();
    iat_future["iat"] = (t + 600).into();
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = "https://evil.test".into();
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = "someone-else".into();
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    let unknown_kid = SigningKey::es256("nobody").sign(&good);
    let mut big = good.clone();
    big["pad"] = "x".repeat(9000).into();
    let cases: Vec<(&str, String, &str)> = vec![
        // `none` isn't even an algorithm the parser knows.
        ("alg none", alg_none, "malformed_token"),
        (
            "HS256 with the RSA public key",
            confusion,
            "algorithm_not_allowed",
        ),
        (
            "signed by another key with the same kid",
            other.sign(&good),
            "bad_signature",
        ),
        ("tampered payload", tamper, "bad_signature"),
        ("expired", s.es.sign(&expired), "expired"),
        ("not yet valid", s.es.sign(&future), "not_yet_valid"),
        (
            "issued in the future",
            s.es.sign(&iat_future),
            "issued_in_future",
        ),
        ("wrong issuer", s.es.sign(&wrong_iss), "wrong_issuer"),
        ("wrong audience", s.es.sign(&wrong_aud), "wrong_audience"),
        ("no exp", s.es.sign(&no_exp), "missing_claim"),
        ("unknown kid", unknown_kid, "unknown_kid"),
        ("oversized", s.es.sign(&big), "token_too_large"),
        (
            "malformed base64",
            "eyJ!!!.eyJ???.sig".to_string(),
            "malformed_token",
        ),
    ];
    let mut bodies = Vec::new();
    for (what, token, reason) in &cases {
        let r = get(&s.g, "/echo", &bearer(token));
        assert_eq!(
            r.status,
            401,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            header(&r, "www-authenticate"),
            Some("Bearer realm=\"gateway\", error=\"invalid_token\""),
            "{what}"
        );
        let mut v = echoed(&r);
        v["error"]["request_id"] = serde_json::Value::Null;
        bodies.push(v);
        let n = s.g.wait_metric(
            &["gateway_authn_total", &format!("result=\"{reason}\"")],
            1.0,
        );
        assert!(n >= 1.0, "{what}: reason {reason} counted");
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "one answer for every failure: no oracle"
    );
    assert_eq!(bodies[0]["error"]["type"], "authentication_error");

    // Two Authorization headers: which would the backend read? Refused.
    let ok = s.es.sign(&good);
    let r = get(
        &s.g,
        "/echo",
        &format!("{}{}", bearer(&ok), bearer("junk.junk.junk")),
    );
    assert_eq!(r.status, 401, "repeated credentials");
    assert!(
        s.g.wait_metric(
            &["gateway_authn_total", "result=\"repeated_credentials\""],
            1.0
        ) >= 1.0
    );

    let r = get(&s.g, "/echo", "");
    assert_eq!(r.status, 401);
    assert_eq!(
        header(&r, "www-authenticate"),
        Some("Bearer realm=\"gateway\""),
        "no error attribute without credentials"
    );
    // A 401 keeps the connection (no body was sent): the same client can retry.
    assert!(header(&r, "connection").is_none());
}

#[test]
fn api_keys_rotation_revocation_and_route_methods() {
    let s = setup();
    for key in ["key-one-0123456789", "key-two-0123456789"] {
        let r = get(&s.g, "/batch/x", &format!("x-api-key: {key}\r\n"));
        assert_eq!(r.status, 200, "both active keys work (rotation)");
        assert_eq!(echoed(&r)["headers"]["x-gateway-principal"], "batch-jobs");
        assert!(
            echoed(&r)["headers"].get("x-api-key").is_none(),
            "the key is not forwarded"
        );
    }
    // OpenAI clients send the key as a bearer token.
    assert_eq!(
        get(&s.g, "/batch/x", &bearer("key-one-0123456789")).status,
        200
    );
    assert_eq!(
        get(&s.g, "/batch/x", "x-api-key: wrong-key-0123456789\r\n").status,
        401
    );
    // This route takes API keys only: a valid JWT is refused there.
    let t = s.es.sign(&claims(ISS, AUD, "alice", "globex"));
    assert_eq!(
        get(&s.g, "/batch/x", &bearer(&t)).status,
        401,
        "JWT not accepted on an api_key route"
    );

    // Revoke key one through the admin API: refused from the next request on.
    let digest = key_digest("key-one-0123456789");
    let body = format!(r#"{{"sha256":"{digest}"}}"#);
    let revoke = |cred: &str| {
        let raw = format!(
            "POST /authn/revoke HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n{cred}content-length: {}\r\n\r\n{body}",
            body.len()
        );
        request(s.g.admin, raw.as_bytes())
    };
    // The control plane needs credentials with the admin scope.
    let r = revoke("");
    assert_eq!(
        r.status,
        401,
        "no credentials: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(header(&r, "www-authenticate").is_some());
    assert_eq!(
        revoke("x-api-key: key-two-0123456789\r\n").status,
        403,
        "a client without the admin scope"
    );
    let r = revoke("x-api-key: ops-key-0123456789\r\n");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("batch-jobs"));
    assert_eq!(
        get(&s.g, "/batch/x", "x-api-key: key-one-0123456789\r\n").status,
        401,
        "revoked at once"
    );
    assert_eq!(
        get(&s.g, "/batch/x", "x-api-key: key-two-0123456789\r\n").status,
        200,
        "the other key still works"
    );
    assert_eq!(
        revoke("x-api-key: ops-key-0123456789\r\n").status,
        404,
        "revoking twice: not found"
    );
    // The CLI passes the credential along.
    let cli = |bearer: Option<&str>| {
        let mut c = std::process::Command::new(gateway_tests::gateway::gateway_bin());
        c.args(["xdp", "list", "--admin", &s.g.admin.to_string()])
            .env_remove("GATEWAY_ADMIN_BEARER");
        if let Some(b) = bearer {
            c.args(["--bearer", b]);
        }
        c.output().unwrap()
    };
    let out = cli(None);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("401"));
    let out = cli(Some("ops-key-0123456789"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Metrics and probes stay open.
    assert_eq!(
        request(s.g.admin, b"GET /readyz HTTP/1.1\r\nhost: a\r\n\r\n").status,
        200
    );
}

#[test]
fn authorization_rules_decide_by_tenant_and_model() {
    let s = setup();
    let acme = bearer(&s.es.sign(&claims(ISS, AUD, "bob", "acme")));
    let r = chat(&s.g, "llama-3-8b", &acme);
    assert_eq!(
        r.status,
        200,
        "acme may use llama-3-*: {}",
        String::from_utf8_lossy(&r.body)
    );
    let r = chat(&s.g, "mistral-7b", &acme);
    assert_eq!(r.status, 403, "acme may not use mistral");
    assert_eq!(echoed(&r)["error"]["type"], "permission_error");
    assert!(s.g.wait_metric(&["gateway_authz_decisions_total", "decision=\"deny\""], 1.0) >= 1.0);
    assert!(
        s.g.wait_metric(
            &["gateway_authz_decisions_total", "rule=\"acme-llama\""],
            1.0
        ) >= 1.0
    );
    let log = s.g.log_text();
    assert!(
        log.contains("no authorization rule allows this request")
            && log.contains("mistral-7b")
            && log.contains("bob"),
        "the denial is in the audit log with principal and model"
    );
    // The API-key client is tenant acme too.
    assert_eq!(
        chat(&s.g, "llama-3-8b", "x-api-key: key-two-0123456789\r\n").status,
        200
    );
    // GET /v1/models lists what each caller may use.
    let list = |auth: &str| -> Vec<String> {
        let r = get(&s.g, "/v1/models", auth);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        echoed(&r)["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(list(&acme), vec!["llama-3-8b"], "acme sees only llama-3-*");
    let globex = bearer(&s.es.sign(&claims(ISS, AUD, "carol", "globex")));
    let mut all = list(&globex);
    all.sort();
    assert_eq!(
        all,
        vec!["llama-3-8b", "mistral-7b"],
        "globex sees every model"
    );
    assert_eq!(
        get(&s.g, "/v1/models", "").status,
        401,
        "the list needs credentials"
    );
    // Anonymous route: no credentials, no rules.
    assert_eq!(get(&s.g, "/health", "").status, 200);
    // A route without a model: the "anyone-no-model" rule.
    assert_eq!(get(&s.g, "/echo", &acme).status, 200);
}

/// A JWKS server whose document can be swapped, counting fetches.
fn jwks_server(doc: Arc<Mutex<String>>, fetches: Arc<Mutex<u32>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            *fetches.lock().unwrap() += 1;
            let body = doc.lock().unwrap().clone();
            let mut c = c;
            let _ = write!(c, "HTTP/1.0 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        }
    });
    addr
}

#[test]
fn jwks_rotation_from_a_live_server_with_bounded_refetch() {
    let k1 = SigningKey::es256("k1");
    let k2 = SigningKey::es256("k2");
    let doc = Arc::new(Mutex::new(jwks(&[&k1])));
    let fetches = Arc::new(Mutex::new(0));
    let addr = jwks_server(doc.clone(), fetches.clone());
    let b = Backend::start("auth");
    let g = Gateway::start(Spec::new(
        Driver::Auto,
        &config(
            b.addr,
            &format!("jwks_url = \"http://{addr}/jwks.json\""),
            "",
        ),
    ));
    let t1 = k1.sign(&claims(ISS, AUD, "alice", "globex"));
    assert_eq!(get(&g, "/echo", &bearer(&t1)).status, 200);

    // The IdP rotates: k2 appears. A k2 token is refused at first (unknown
    // kid: never a blocking fetch on the request path), then accepted once
    // the background refetch ran.
    *doc.lock().unwrap() = jwks(&[&k1, &k2]);
    let t2 = k2.sign(&claims(ISS, AUD, "alice", "globex"));
    let before = *fetches.lock().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut first = None;
    loop {
        let st = get(&g, "/echo", &bearer(&t2)).status;
        first.get_or_insert(st);
        if st == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "k2 never accepted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(first, Some(401));
    // A burst of unknown kids causes at most one fetch per unknown_kid_refetch (1 s).
    let junk = SigningKey::es256("junk").sign(&claims(ISS, AUD, "x", "y"));
    let start = *fetches.lock().unwrap();
    for _ in 0..50 {
        assert_eq!(get(&g, "/echo", &bearer(&junk)).status, 401);
    }
    std::thread::sleep(Duration::from_millis(300));
    let burst = *fetches.lock().unwrap() - start;
    assert!(
        burst <= 2,
        "refetches are rate limited: {burst} for 50 unknown-kid requests"
    );
    assert!(*fetches.lock().unwrap() > before);
}

#[test]
fn a_reload_invalidates_cached_verifications() {
    let s = setup();
    let t = bearer(&s.es.sign(&claims(ISS, AUD, "alice", "globex")));
    for _ in 0..3 {
        assert_eq!(
            get(&s.g, "/echo", &t).status,
            200,
            "verified, then served from the cache"
        );
    }
    // The audience this token carries is withdrawn by a reload: the cached
    // verification must not outlive it.
    let dir = temp_dir("auth-reload");
    let path = dir.join("jwks.json");
    std::fs::write(&path, jwks(&[&s.es, &s.rs, &s.ed])).unwrap();
    let body = config(
        s._b.addr,
        &format!("jwks_file = \"{}\"", path.display()),
        "",
    )
    .replace(
        &format!("audiences = [\"{AUD}\"]"),
        "audiences = [\"someone-else\"]",
    );
    s.g.rewrite_config(&body);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(s.g.pid(), libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&s.g, "/echo", &t).status != 401 {
        assert!(
            Instant::now() < deadline,
            "the cached token still works after the reload"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn identity_headers_are_stripped_even_without_authentication() {
    let b = Backend::start("open");
    let g = Gateway::start(Spec::new(Driver::Auto, &gateway_tests::one_cluster(b.addr)));
    let r = get(
        &g,
        "/echo",
        "x-gateway-tenant: root\r\nX_Gateway_Roles: admin\r\nx-other: kept\r\n",
    );
    assert_eq!(r.status, 200);
    let h = &echoed(&r)["headers"];
    assert!(
        h.get("x-gateway-tenant").is_none() && h.get("x_gateway_roles").is_none(),
        "{h}"
    );
    assert_eq!(h["x-other"], "kept");
}
