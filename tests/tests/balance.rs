//! The balance stage through the real binary: model-server metrics scraped
//! (vLLM names), stale and garbage reports not trusted, saturation shedding,
//! ORCA load headers, passive ejection of a killed backend and its
//! re-admission, active health checks, model pools, and the GPU-aware
//! algorithm sending long generations to the fast GPU of a simulated pool.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_tests::gpusim::{GpuSim, SimConfig};
use gateway_tests::{request, Backend, Driver, Gateway, Response, Spec};

/// A model server stand-in whose `/metrics`, `/health` status and response
/// headers the test sets; counts what it serves.
struct Fake {
    addr: SocketAddr,
    metrics: Arc<Mutex<String>>,
    health: Arc<Mutex<u16>>,
    extra_header: Arc<Mutex<String>>,
    served: Arc<AtomicUsize>,
}

impl Fake {
    fn start(metrics: &str) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let f = Fake {
            addr: l.local_addr().unwrap(),
            metrics: Arc::new(Mutex::new(metrics.to_string())),
            health: Arc::new(Mutex::new(200)),
            extra_header: Arc::new(Mutex::new(String::new())),
            served: Arc::new(AtomicUsize::new(0)),
        };
        let (m, h, x, n) = (
            f.metrics.clone(),
            f.health.clone(),
            f.extra_header.clone(),
            f.served.clone(),
        );
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (m, h, x, n) = (m.clone(), h.clone(), x.clone(), n.clone());
                std::thread::spawn(move || {
                    let _ = serve(c, &m, &h, &x, &n);
                });
            }
        });
        f
    }

    fn set_metrics(&self, text: &str) {
        *self.metrics.lock().unwrap() = text.to_string();
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

fn serve(
    c: TcpStream,
    m: &Mutex<String>,
    h: &Mutex<u16>,
    x: &Mutex<String>,
    n: &AtomicUsize,
) -> std::io::Result<()> {
    let mut r = BufReader::new(c.try_clone()?);
    let mut w = c;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut len = 0;
        loop {
            let mut l = String::new();
            r.read_line(&mut l)?;
            if l.trim().is_empty() {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        let (status, text, extra) = match path.as_str() {
            "/metrics" => {
                let t = m.lock().unwrap().clone();
                if t.is_empty() {
                    (404, "not found".to_string(), String::new())
                } else {
                    (200, t, String::new())
                }
            }
            "/health" => (*h.lock().unwrap(), "{}".into(), String::new()),
            _ => {
                n.fetch_add(1, Ordering::SeqCst);
                (
                    200,
                    "{\"ok\":true,\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}".into(),
                    x.lock().unwrap().clone(),
                )
            }
        };
        write!(
            w,
            "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{extra}\r\n{text}",
            text.len()
        )?;
        w.flush()?;
    }
}

fn vllm(waiting: u32, running: u32, kv: f64) -> String {
    format!(
        "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"m\"}} {waiting}.0\n\
         vllm:num_requests_running{{model_name=\"m\"}} {running}.0\nvllm:kv_cache_usage_perc{{model_name=\"m\"}} {kv}\n"
    )
}

fn cluster(name: &str, backends: &[SocketAddr], balance: &str) -> String {
    let b: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[clusters.{name}]\nbackends = [{}]\n[clusters.{name}.balance]\n{balance}\n",
        b.join(", ")
    )
}

fn route_all(cluster: &str) -> String {
    format!("[[routes]]\nname = \"all\"\npath_prefix = \"/\"\ncluster = \"{cluster}\"\n")
}

fn start(body: &str) -> Gateway {
    Gateway::start(Spec::new(Driver::Auto, body))
}

fn get(g: &Gateway) -> Response {
    request(g.addr, b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n")
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn scraped_load_steers_traffic_and_stale_or_garbage_reports_are_ignored() {
    let busy = Fake::start(&vllm(50, 8, 0.5));
    let idle = Fake::start(&vllm(0, 1, 0.1));
    let body = cluster(
        "p",
        &[busy.addr, idle.addr],
        "algorithm = \"gpu_aware\"\nmetrics_interval = \"50ms\"\nmetrics_max_age = \"300ms\"\nqueue_saturation = 10\nwarmup = \"0s\"",
    ) + &route_all("p");
    let g = start(&body);
    g.wait_metric(&["gateway_balance_scrapes_total", "result=\"ok\""], 4.0);
    for _ in 0..20 {
        assert_eq!(get(&g).status, 200);
    }
    assert_eq!(
        busy.served(),
        0,
        "a backend with 50 queued (≥ queue_saturation) gets nothing"
    );
    assert_eq!(idle.served(), 20);
    assert_eq!(
        g.metric(&[
            "gateway_backend_queue",
            &format!("backend=\"{}\"", busy.addr)
        ]),
        50.0
    );

    // Its metrics page turns to garbage: the last report goes stale and is
    // no longer trusted; the backend is back in rotation on local signals.
    busy.set_metrics("<html>maintenance</html>\n");
    g.wait_metric(
        &[
            "gateway_balance_scrapes_total",
            "result=\"no_load_metrics\"",
        ],
        1.0,
    );
    std::thread::sleep(Duration::from_millis(400));
    for _ in 0..20 {
        assert_eq!(get(&g).status, 200);
    }
    assert!(
        busy.served() > 0,
        "stale report ignored: busy served {}",
        busy.served()
    );
    assert_eq!(
        g.metric(&[
            "gateway_backend_queue",
            &format!("backend=\"{}\"", busy.addr)
        ]),
        -1.0
    );

    // No /metrics at all (404): counted, traffic still flows.
    busy.set_metrics("");
    g.wait_metric(
        &["gateway_balance_scrapes_total", "result=\"http_error\""],
        1.0,
    );
    assert_eq!(get(&g).status, 200);
}

#[test]
fn every_backend_saturated_sheds_with_503_and_orca_headers_update_load() {
    let a = Fake::start(&vllm(100, 8, 0.5));
    let b = Fake::start(&vllm(0, 8, 0.99));
    let body = cluster(
        "p",
        &[a.addr, b.addr],
        "algorithm = \"gpu_aware\"\nmetrics_interval = \"50ms\"\nmetrics_max_age = \"2s\"\nqueue_saturation = 10\nkv_saturation = 0.95",
    ) + &route_all("p");
    let g = start(&body);
    g.wait_metric(&["gateway_balance_scrapes_total", "result=\"ok\""], 4.0);
    let r = get(&g);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.error_type(), "service_unavailable");
    g.wait_metric(&["gateway_balance_shed_total"], 1.0);
    assert_eq!(a.served() + b.served(), 0);

    // ORCA: with scraping off, a response's endpoint-load-metrics header is
    // the only load report; it takes a backend out until it goes stale.
    let (c, d) = (Fake::start(""), Fake::start(""));
    *c.extra_header.lock().unwrap() = "endpoint-load-metrics: TEXT named_metrics.num_requests_waiting=40, named_metrics.kv_cache_usage_perc=0.3\r\n".into();
    let body = cluster(
        "q",
        &[c.addr, d.addr],
        "algorithm = \"gpu_aware\"\nmetrics_interval = \"0s\"\nmetrics_max_age = \"5s\"\nqueue_saturation = 10\nwarmup = \"0s\"",
    ) + &route_all("q");
    let g = start(&body);
    for _ in 0..10 {
        assert_eq!(get(&g).status, 200);
    }
    assert_eq!(
        c.served(),
        1,
        "after its first answer reported 40 queued, c got nothing more"
    );
    assert_eq!(d.served(), 9);
}

/// The demo backend as a process (killing it closes every connection too).
fn demo_backend(addr: SocketAddr) -> std::process::Child {
    let c = std::process::Command::new(gateway_tests::gateway::bin(
        "DEMO_BACKEND_BIN",
        "demo-backend",
    ))
    .args(["--listen", &addr.to_string()])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("start demo-backend");
    wait_for("demo-backend listening", || {
        TcpStream::connect(addr).is_ok()
    });
    c
}

#[test]
fn a_killed_backend_is_ejected_then_readmitted() {
    let a = Backend::start("a");
    let b_addr: SocketAddr = format!("127.0.0.1:{}", gateway_tests::gateway::free_port())
        .parse()
        .unwrap();
    let mut b = demo_backend(b_addr);
    let body = cluster(
        "p",
        &[a.addr, b_addr],
        "algorithm = \"round_robin\"\neject_after = 2\nejection = \"3s\"\nmax_ejection = \"6s\"",
    ) + &route_all("p");
    let g = start(&body);
    for _ in 0..4 {
        assert_eq!(get(&g).status, 200);
    }
    // b dies mid-load: no request fails (a connect error moves on to a),
    // and after two failures b is out.
    let _ = b.kill();
    let _ = b.wait();
    for _ in 0..10 {
        assert_eq!(get(&g).status, 200);
    }
    assert!(
        g.wait_metric(
            &[
                "gateway_balance_ejections_total",
                &format!("backend=\"{b_addr}\"")
            ],
            1.0
        ) >= 1.0
    );
    wait_for("b marked unavailable", || {
        g.metric(&[
            "gateway_backend_available",
            &format!("backend=\"{b_addr}\""),
        ]) == 0.0
    });
    assert!(g.log_shows("backend ejected after consecutive failures"));
    let a_before = a.requests();
    for _ in 0..6 {
        assert_eq!(get(&g).status, 200);
    }
    assert_eq!(a.requests() - a_before, 6, "ejected: no attempt on b");
    // Back on the same address: re-admitted after the ejection, traffic returns.
    let mut b2 = demo_backend(b_addr);
    wait_for("b back in rotation", || {
        g.metric(&[
            "gateway_backend_available",
            &format!("backend=\"{b_addr}\""),
        ]) == 1.0
    });
    let a_before = a.requests();
    for _ in 0..6 {
        assert_eq!(get(&g).status, 200);
    }
    assert!(a.requests() - a_before < 6, "b serves again");
    let _ = b2.kill();
    let _ = b2.wait();
}

#[test]
fn failing_health_check_takes_a_backend_out_of_rotation() {
    let a = Fake::start("");
    let b = Fake::start("");
    let body = cluster(
        "p",
        &[a.addr, b.addr],
        "algorithm = \"least_request\"\nhealth_path = \"/health\"\nhealth_interval = \"100ms\"",
    ) + &route_all("p");
    let g = start(&body);
    *a.health.lock().unwrap() = 503;
    wait_for("a failing its health check", || {
        g.metric(&[
            "gateway_backend_available",
            &format!("backend=\"{}\"", a.addr),
        ]) == 0.0
    });
    let before = a.served();
    for _ in 0..10 {
        assert_eq!(get(&g).status, 200);
    }
    assert_eq!(a.served(), before, "out of rotation while unhealthy");
    *a.health.lock().unwrap() = 200;
    wait_for("a healthy again", || {
        g.metric(&[
            "gateway_backend_available",
            &format!("backend=\"{}\"", a.addr),
        ]) == 1.0
    });
    wait_for("a serving again", || {
        let _ = get(&g);
        a.served() > before
    });
}

fn chat(g: &Gateway, model: &str, max_tokens: u64) -> Response {
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":{max_tokens}}}"#
    );
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    request(g.addr, raw.as_bytes())
}

#[test]
fn models_are_served_by_their_own_pools() {
    let a = Fake::start("");
    let b = Fake::start("");
    let other = Fake::start("");
    let body = cluster("pool-a", &[a.addr], "")
        + &cluster("pool-b", &[b.addr], "")
        + &cluster("default", &[other.addr], "")
        + "[[models]]\nname = \"llama\"\ncluster = \"pool-a\"\n[[models]]\nname = \"mistral\"\ncluster = \"pool-b\"\n[[models]]\nname = \"phi\"\n\
           [[routes]]\nname = \"chat\"\npath_prefix = \"/v1/\"\nprotocol = \"openai\"\ncluster = \"default\"\n";
    let g = start(&body);
    for _ in 0..3 {
        assert_eq!(chat(&g, "llama", 5).status, 200);
    }
    assert_eq!(chat(&g, "mistral", 5).status, 200);
    assert_eq!(chat(&g, "phi", 5).status, 200);
    assert_eq!((a.served(), b.served(), other.served()), (3, 1, 1));
    // A model pool naming no cluster is a config error.
    let bad = "[clusters.x]\nbackends = [\"127.0.0.1:1\"]\n[[models]]\nname = \"m\"\ncluster = \"nope\"\n[[routes]]\npath_prefix = \"/\"\ncluster = \"x\"\n";
    let Err(e) = gateway::generation::Resolved::from_str(bad, "t.toml") else {
        panic!("a pool naming no cluster was accepted");
    };
    assert!(e.to_string().contains("no cluster `nope`"), "{e}");
}

#[test]
fn gpu_aware_sends_long_generations_to_the_fast_gpu() {
    // A fast GPU (batch 8) and a slow one (5× slower per step, batch 2).
    let fast = GpuSim::start(SimConfig {
        name: "fast".into(),
        speed: 1.0,
        max_batch: 8,
        ..Default::default()
    });
    let slow = GpuSim::start(SimConfig {
        name: "slow".into(),
        speed: 0.2,
        max_batch: 2,
        ..Default::default()
    });
    let body = cluster(
        "p",
        &[fast.addr, slow.addr],
        "algorithm = \"gpu_aware\"\nmetrics_interval = \"50ms\"\nmetrics_max_age = \"200ms\"\nwarmup = \"0s\"",
    ) + "[[models]]\nname = \"m\"\n[[routes]]\nname = \"chat\"\npath_prefix = \"/v1/\"\nprotocol = \"openai\"\ncluster = \"p\"\n";
    let g = start(&body);
    // Learn both: a few short requests each way.
    let addr = g.addr;
    let run = |n: usize, tokens: u64| {
        let hs: Vec<_> = (0..n)
            .map(|i| {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(20 * i as u64));
                    let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"max_tokens":{tokens}}}"#);
                    let raw = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    request(addr, raw.as_bytes()).status
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<u16>>()
    };
    assert!(run(6, 4).iter().all(|&s| s == 200));
    let (f0, s0) = (fast.completed(), slow.completed());
    // Now 12 long generations: the slow GPU would take 5× as long on each.
    assert!(run(12, 64).iter().all(|&s| s == 200));
    // The simulators count a completion just after the last byte is sent.
    let deadline = Instant::now() + Duration::from_secs(2);
    while fast.completed() - f0 + slow.completed() - s0 < 12 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (f, s) = (fast.completed() - f0, slow.completed() - s0);
    assert_eq!(f + s, 12);
    assert!(
        f >= 10,
        "long generations went to the fast GPU: fast {f}, slow {s}"
    );
    let m = g.metrics();
    assert!(
        m.contains(&format!(
            "gateway_backend_latency_ewma_seconds{{backend=\"{}\",cluster=\"p\"}}",
            slow.addr
        )),
        "per-backend gauges exported"
    );
}

fn chat_pinned(g: &Gateway, version: Option<&str>) -> Response {
    let body = r#"{"model":"llama","messages":[{"role":"user","content":"hello"}],"max_tokens":5}"#;
    let pin = version
        .map(|v| format!("x-model-version: {v}\r\n"))
        .unwrap_or_default();
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{pin}\r\n{body}",
        body.len()
    );
    request(g.addr, raw.as_bytes())
}

fn canary_config(
    stable: SocketAddr,
    canary: SocketAddr,
    split: (u32, u32),
    sticky: bool,
) -> String {
    cluster("stable", &[stable], "") + &cluster("canary", &[canary], "")
        + &format!(
            "[[models]]\nname = \"llama\"\nversions = [\"1.0\", \"2.0\"]\ncluster = \"stable\"\nsticky = {sticky}\n\
             version_clusters = {{ \"2.0\" = \"canary\" }}\n\
             split = [{{ cluster = \"stable\", weight = {} }}, {{ cluster = \"canary\", weight = {} }}]\n\
             [[routes]]\nname = \"chat\"\npath_prefix = \"/v1/\"\nprotocol = \"openai\"\ncluster = \"stable\"\n",
            split.0, split.1
        )
}

#[test]
fn canary_split_header_pins_reload_and_sticky_assignment() {
    let stable = Fake::start("");
    let canary = Fake::start("");
    let g = start(&canary_config(stable.addr, canary.addr, (80, 20), false));
    for _ in 0..400 {
        assert_eq!(chat_pinned(&g, None).status, 200);
    }
    let c = canary.served();
    // 20 % of 400 = 80; ±24 is beyond 4 standard deviations (8).
    assert!(
        (56..=104).contains(&c),
        "canary got {c} of 400 at weight 20"
    );
    g.wait_metric(
        &[
            "gateway_balance_split_total",
            "cluster=\"canary\"",
            "model=\"llama\"",
        ],
        c as f64,
    );
    // A request naming its version goes to that version's pool, never split.
    let before = (stable.served(), canary.served());
    for _ in 0..20 {
        assert_eq!(chat_pinned(&g, Some("2.0")).status, 200);
        assert_eq!(chat_pinned(&g, Some("1.0")).status, 200);
    }
    assert_eq!(
        (stable.served() - before.0, canary.served() - before.1),
        (20, 20)
    );

    // Promote the canary on reload: 0 / 100, no restart.
    g.rewrite_config(&canary_config(stable.addr, canary.addr, (0, 100), false));
    g.signal(libc::SIGHUP);
    wait_for("the reload", || {
        g.metric(&["gateway_config_generation"]) >= 1.0
    });
    let before = stable.served();
    for _ in 0..30 {
        assert_eq!(chat_pinned(&g, None).status, 200);
    }
    assert_eq!(
        stable.served(),
        before,
        "all unpinned traffic on the promoted pool"
    );

    // Sticky: one caller (anonymous: by address) always lands on the same side.
    let (s2, c2) = (Fake::start(""), Fake::start(""));
    let g = start(&canary_config(s2.addr, c2.addr, (50, 50), true));
    for _ in 0..40 {
        assert_eq!(chat_pinned(&g, None).status, 200);
    }
    assert!(
        (s2.served(), c2.served()) == (40, 0) || (s2.served(), c2.served()) == (0, 40),
        "sticky: {} / {}",
        s2.served(),
        c2.served()
    );
}

#[test]
fn an_operator_drains_a_backend_and_brings_it_back() {
    let a = Fake::start("");
    let b = Fake::start("");
    let g =
        start(&(cluster("p", &[a.addr, b.addr], "algorithm = \"round_robin\"") + &route_all("p")));
    let admin = |method: &str, path: &str, body: &str| {
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        request(g.admin, raw.as_bytes())
    };
    let spec = format!(r#"{{"cluster":"p","backend":"{}"}}"#, a.addr);
    let r = admin("POST", "/balance/drain", &spec);
    assert_eq!(r.status, 200, "{}", r.text());
    let before = a.served();
    for _ in 0..10 {
        assert_eq!(get(&g).status, 200);
    }
    assert_eq!(a.served(), before, "drained: no new requests");
    let list = admin("GET", "/balance/backends", "");
    assert_eq!(list.status, 200);
    let v = list.json();
    let entry = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["backend"] == a.addr.to_string().as_str())
        .cloned()
        .expect("listed");
    assert_eq!(
        (entry["draining"].as_bool(), entry["available"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(
        admin(
            "POST",
            "/balance/drain",
            r#"{"cluster":"p","backend":"127.0.0.1:1"}"#
        )
        .status,
        404
    );
    assert_eq!(admin("POST", "/balance/drain", "not json").status, 400);
    assert_eq!(admin("POST", "/balance/undrain", &spec).status, 200);
    for _ in 0..10 {
        assert_eq!(get(&g).status, 200);
    }
    assert!(a.served() > before, "back in rotation");
    assert!(g.log_shows("backend drained (admin API)"));
}

/// Answers every request with 500 after `delay`, then closes; records bodies.
fn slow_failing_server(delay: Duration) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                if r.read_exact(&mut body).is_err() {
                    return;
                }
                s.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                std::thread::sleep(delay);
                let mut w = c;
                let _ = w.write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\nconnection: close\r\n\r\noops");
            });
        }
    });
    (addr, seen)
}

#[test]
fn shadow_traffic_is_recorded_and_never_touches_the_client_answer() {
    let primary = Fake::start("");
    let (shadow, seen) = slow_failing_server(Duration::from_millis(400));
    let body = cluster("primary", &[primary.addr], "")
        + &cluster("shadow", &[shadow], "")
        + "[[models]]\nname = \"llama\"\ncluster = \"primary\"\nshadow = { cluster = \"shadow\", fraction = 1.0 }\n\
           [[routes]]\nname = \"chat\"\npath_prefix = \"/v1/\"\nprotocol = \"openai\"\ncluster = \"primary\"\n";
    let g = start(&body);
    let t = Instant::now();
    for _ in 0..10 {
        let r = chat(&g, "llama", 5);
        assert_eq!(r.status, 200, "the client gets the primary's answer");
        assert!(r.text().contains("\"ok\":true"));
    }
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "ten answers never waited on the 400 ms shadow: {:?}",
        t.elapsed()
    );
    g.wait_metric(
        &[
            "gateway_shadow_requests_total",
            "cluster=\"shadow\"",
            "model=\"llama\"",
            "result=\"500\"",
        ],
        10.0,
    );
    assert_eq!(
        g.metric(&["gateway_shadow_requests_total", "result=\"500\""]),
        10.0
    );
    let copies = seen.lock().unwrap().clone();
    assert_eq!(copies.len(), 10);
    assert!(
        copies.iter().all(|b| b.contains("\"model\":\"llama\"")),
        "{copies:?}"
    );
    assert_eq!(primary.served(), 10);
    assert!(
        g.metric(&[
            "gateway_shadow_duration_seconds_count",
            "cluster=\"shadow\""
        ]) >= 10.0
    );
}

/// Reads each request, then closes without answering; counts them.
fn hangup_server() -> (SocketAddr, Arc<AtomicUsize>) {
    dying_server(b"", false)
}

/// Reads each request, writes `partial` (the start of an answer), then
/// closes, or with `freeze` holds the connection open and says no more;
/// counts the requests.
fn dying_server(partial: &'static [u8], freeze: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let h = h.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(c);
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    if line == "\r\n" {
                        h.fetch_add(1, Ordering::SeqCst);
                        let _ = r.get_mut().write_all(partial);
                        if freeze {
                            std::thread::sleep(Duration::from_secs(30));
                        }
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    (addr, hits)
}

/// A backend can die or freeze partway through its answer (a head cut
/// short; a head whole but its small body not): nothing of it has reached
/// the client, so an idempotent request still goes to the other backend.
#[test]
fn idempotent_requests_survive_a_backend_dying_mid_answer() {
    let good = Fake::start("");
    for (partial, freeze) in [
        (&b"HTTP/1.1 200 OK\r\ncontent-"[..], false),
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n{\"status\":"[..],
            false,
        ),
        (&b"HTTP/1.1 200 OK\r\ncontent-"[..], true),
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n{\"status\":"[..],
            true,
        ),
    ] {
        let (bad, hits) = dying_server(partial, freeze);
        let g = start(
            &(cluster(
                "p",
                &[bad, good.addr],
                "algorithm = \"round_robin\"\neject_after = 0",
            ) + "[timeouts]\nupstream_response = \"300ms\"\n"
                + &route_all("p")),
        );
        for _ in 0..6 {
            let r = get(&g);
            assert_eq!(r.status, 200, "freeze {freeze}: {}", r.text());
            assert!(
                r.text().contains("\"ok\":true"),
                "whole answer: {}",
                r.text()
            );
        }
        let tried_bad = hits.load(Ordering::SeqCst);
        assert!(
            tried_bad >= 2,
            "round robin reached the dying backend: {tried_bad}"
        );
        assert_eq!(
            g.wait_metric(
                &["gateway_upstream_retries_total", "cluster=\"p\""],
                tried_bad as f64
            ),
            tried_bad as f64,
            "freeze {freeze}: each answer cut short was retried"
        );
    }
}

#[test]
fn idempotent_requests_retry_on_another_backend_within_the_budget() {
    let good = Fake::start("");
    let (bad, hits) = hangup_server();
    let body = |budget: &str| {
        cluster(
            "p",
            &[bad, good.addr],
            &format!("algorithm = \"round_robin\"\neject_after = 0\n{budget}"),
        ) + &route_all("p")
    };
    let g = start(&body(""));
    for _ in 0..12 {
        assert_eq!(
            get(&g).status,
            200,
            "a GET that met the hang-up went to the other backend"
        );
    }
    let tried_bad = hits.load(Ordering::SeqCst);
    assert!(
        tried_bad >= 4,
        "round robin sent some to the bad backend first: {tried_bad}"
    );
    assert_eq!(
        g.wait_metric(
            &["gateway_upstream_retries_total", "cluster=\"p\""],
            tried_bad as f64
        ),
        tried_bad as f64
    );
    // A POST is not repeated: the client hears of the failure.
    let statuses: Vec<u16> = (0..6)
        .map(|_| {
            request(
                g.addr,
                b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\nhi",
            )
            .status
        })
        .collect();
    assert!(
        statuses.contains(&502) && statuses.contains(&200),
        "{statuses:?}"
    );

    // No budget, no reserve: no retries.
    let g = start(&body("retry_budget = 0.0\nretry_reserve = 0"));
    let statuses: Vec<u16> = (0..8).map(|_| get(&g).status).collect();
    assert!(statuses.contains(&502), "{statuses:?}");
    assert_eq!(
        g.metric(&["gateway_upstream_retries_total", "cluster=\"p\""]),
        0.0
    );
}

/// A chat request with a system prompt and a question; the backend's name.
fn chat_with(g: &Gateway, system: &str, question: &str) -> String {
    let body = serde_json::json!({"model": "m", "max_tokens": 8, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": question}]})
    .to_string();
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = request(g.addr, raw.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["backend"].as_str().unwrap_or_default().to_string()
}

/// Four named backends behind a `prefix_aware` cluster `p` with an OpenAI
/// chat route (defaults: sub-millisecond answers, so the prefill a cached
/// backend saves, 50 ms per 1k tokens until measured, decides), plus
/// `extra` config.
fn prefix_pool(extra: &str) -> (Vec<Backend>, Vec<SocketAddr>, String) {
    let backends: Vec<Backend> = (0..4).map(|i| Backend::start(&format!("b{i}"))).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let body = cluster(
        "p",
        &addrs,
        "algorithm = \"prefix_aware\"\nengine = \"none\"\nwarmup = \"0s\"",
    ) + "[[models]]\nname = \"m\"\n[[routes]]\nname = \"chat\"\npath_prefix = \"/v1/\"\nprotocol = \"openai\"\ncluster = \"p\"\n"
        + extra;
    (backends, addrs, body)
}

#[test]
fn prefix_aware_keeps_each_shared_prompt_on_one_backend() {
    let (_backends, _, body) = prefix_pool("");
    let g = start(&body);
    // 12 groups, each a distinct ~2 KB system prompt, 5 questions each,
    // interleaved, over both workers' connections.
    let systems: Vec<String> = (0..12)
        .map(|k| format!("You are assistant number {k}. ").repeat(70))
        .collect();
    let mut homes: Vec<std::collections::HashSet<String>> = vec![Default::default(); 12];
    for q in 0..5 {
        for (k, sys) in systems.iter().enumerate() {
            homes[k].insert(chat_with(&g, sys, &format!("question {q} for group {k}?")));
        }
    }
    for (k, h) in homes.iter().enumerate() {
        assert_eq!(h.len(), 1, "group {k} was split over {h:?}");
    }
    // The groups spread over the pool (rendezvous hashing, not one hot backend).
    let used: std::collections::HashSet<&String> = homes.iter().flatten().collect();
    assert!(used.len() >= 3, "groups landed on {used:?}");
    // Worker counters are folded in every 200 ms: wait for the whole count.
    let cached = g.wait_metric(&["gateway_prefix_routes_total", "result=\"cached\""], 36.0);
    assert!(
        cached >= 12.0 * 3.0,
        "requests after a group's first found it cached: {cached}"
    );
    assert!(g.metric(&["gateway_prefix_index_bytes", "cluster=\"p\""]) > 0.0);

    // Streams time the backends: first token, inter-token time, tokens/s.
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = request(g.addr, raw.as_bytes());
    assert!(r.text().contains("[DONE]"), "{}", r.text());
    wait_for("stream timings", || {
        let m = g.metrics();
        let positive = |name: &str| {
            m.lines().filter(|l| l.starts_with(name)).any(|l| {
                l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v > 0.0)
            })
        };
        positive("gateway_backend_itl_ewma_seconds")
            && positive("gateway_backend_ttft_ewma_seconds")
            && positive("gateway_backend_stream_tokens_per_second")
    });
}

#[test]
fn two_gateways_keep_a_prefix_where_the_first_one_put_it() {
    let dir = gateway_tests::gateway::temp_dir("fleet-prefix");
    let redis = gateway_tests::redis::Redis::start_on(gateway_tests::gateway::free_port(), &dir);
    let (_backends, addrs, body) = prefix_pool(&format!(
        "[ratelimit.redis]\naddress = \"127.0.0.1:{}\"\nsync_interval = \"20ms\"\n",
        redis.port
    ));
    let (a, b) = (start(&body), start(&body));
    let admin = |g: &Gateway, path: &str, backend: SocketAddr| {
        let spec = format!(r#"{{"cluster":"p","backend":"{backend}"}}"#);
        let raw = format!(
            "POST {path} HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{spec}",
            spec.len()
        );
        assert_eq!(request(g.admin, raw.as_bytes()).status, 200);
    };
    // Gateway A can only reach the last backend while it places 8 groups
    // (their homes are spread over all four): that is where they are.
    for &x in &addrs[..3] {
        admin(&a, "/balance/drain", x);
    }
    let systems: Vec<String> = (0..8)
        .map(|k| format!("You are fleet assistant number {k}. ").repeat(70))
        .collect();
    for (k, sys) in systems.iter().enumerate() {
        assert_eq!(chat_with(&a, sys, &format!("first question of {k}?")), "b3");
    }
    for &x in &addrs[..3] {
        admin(&a, "/balance/undrain", x);
    }
    // B learns A's placements through Redis, within a few syncs.
    let applied = b.wait_metric(
        &[
            "gateway_prefix_fleet_placements_total",
            "result=\"applied\"",
        ],
        8.0,
    );
    assert!(applied >= 8.0, "applied {applied}");
    assert!(a.metric(&["gateway_prefix_fleet_placements_total", "result=\"sent\""]) >= 8.0);
    assert_eq!(a.metric(&["gateway_prefix_fleet_redis_up"]), 1.0);
    // B has served some traffic of its own (a gateway weighs caches once a
    // backend has been timed: its first completion).
    for k in 0..4 {
        chat_with(&b, &format!("Warm-up {k}. ").repeat(70), "q?");
    }
    // B, whose own index never saw these prompts, sends them where they
    // are cached (without the fleet: their homes, 3 in 4 elsewhere).
    for (k, sys) in systems.iter().enumerate() {
        assert_eq!(
            chat_with(&b, sys, &format!("second question of {k}?")),
            "b3",
            "group {k}"
        );
    }
    // A prompt B never heard of is routed as usual (not everything to b3).
    let fresh: std::collections::HashSet<String> = (0..8)
        .map(|k| chat_with(&b, &format!("Another assistant {k}. ").repeat(70), "q?"))
        .collect();
    assert!(fresh.len() >= 2, "new prompts all went to {fresh:?}");
}
