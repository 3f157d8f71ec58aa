//! Flow control through the real binary, in front of simulated GPU servers
//! (`gpusim`: continuous batching, vLLM's metric names): a saturated pool
//! queues instead of answering 503, in arrival order within a tenant; a
//! higher band overtakes a lower one; a tenant flooding at many times its
//! share leaves another tenant's time to first token near its unloaded
//! value; the bounds (`max_requests` → 429, `max_wait` → 503, both with
//! `Retry-After`); a client that hangs up while queued leaves at once and
//! never reaches a backend.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_tests::gpusim::{GpuSim, SimConfig};
use gateway_tests::jwt::key_digest;
use gateway_tests::{Driver, Gateway, Spec};

const KEYS: [(&str, &str, &str); 3] = [
    ("sk-tenant-a-0123456789", "a", "acme"),
    ("sk-tenant-b-0123456789", "b", "globex"),
    ("sk-tenant-g-0123456789", "g", "gold"),
];
/// An operator key (the admin API's scope).
const OPS: &str = "sk-ops-0123456789abcdef";

/// One cluster of `sims` with `balance` and `queue` settings, an OpenAI
/// route, three tenants by API key (`gold` in a class of priority 10).
fn config(sims: &[&GpuSim], balance: &str, queue: &str) -> String {
    let b: Vec<String> = sims.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    let mut c = format!(
        "[clusters.p]\nbackends = [{}]\n[clusters.p.balance]\nalgorithm = \"gpu_aware\"\nmetrics_interval = \"50ms\"\nmetrics_max_age = \"300ms\"\nwarmup = \"0s\"\n{balance}\n[clusters.p.queue]\n{queue}\n\
         [[models]]\nname = \"m\"\n[[routes]]\nname = \"chat\"\npath_prefix = \"/v1/\"\nprotocol = \"openai\"\ncluster = \"p\"\n\
         [[authz.rules]]\nid = \"all\"\ntenants = [\"*\"]\nmodels = [\"*\"]\n\
         [[authz.rules]]\nid = \"ops\"\nroles = [\"admin\"]\nscopes = [\"admin\"]\n\
         [ratelimit.classes.gold]\npriority = 10\n[ratelimit.tenant_classes]\ngold = \"gold\"\n",
        b.join(", ")
    );
    c += &format!(
        "[[authn.api_keys]]\nclient = \"ops\"\nroles = [\"admin\"]\nsha256 = [\"{}\"]\n",
        key_digest(OPS)
    );
    for (key, client, tenant) in KEYS {
        c += &format!(
            "[[authn.api_keys]]\nclient = \"{client}\"\ntenant = \"{tenant}\"\nsha256 = [\"{}\"]\n",
            key_digest(key)
        );
    }
    c
}

fn start(body: &str) -> Gateway {
    Gateway::start(Spec::new(Driver::Auto, body))
}

static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A streamed chat completion as raw bytes, for `key`: a prompt of `words`
/// words no other request shares (no prefix-cache hit).
fn chat_bytes(key: &str, words: usize, max_tokens: u64, extra_header: &str) -> Vec<u8> {
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let content: String = (0..words).map(|i| format!("r{n}w{i} ")).collect();
    let body = format!(
        r#"{{"model":"m","stream":true,"max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{content}"}}]}}"#
    );
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\n{extra_header}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What one request saw: status, time to its first body byte after the
/// head (TTFT for a stream), when it finished, its head.
#[derive(Debug, Clone)]
struct Seen {
    status: u16,
    ttft: Duration,
    done: Instant,
    head: String,
    body: String,
}

fn send(addr: SocketAddr, raw: &[u8]) -> Seen {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(raw).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut ttft = None;
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if ttft.is_none() {
                    if let Some(h) = find(&buf, b"\r\n\r\n") {
                        if buf.len() > h + 4 {
                            ttft = Some(t0.elapsed());
                        }
                    }
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Seen {
        status: head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        ttft: ttft.unwrap_or_else(|| t0.elapsed()),
        done: Instant::now(),
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Start `raw` on a thread; its result lands in the returned slot.
fn spawn(addr: SocketAddr, raw: Vec<u8>) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || send(addr, &raw))
}

fn depth(g: &Gateway) -> f64 {
    g.metric(&["gateway_queue_depth"])
}

fn wait_depth(g: &Gateway, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while depth(g) < n {
        assert!(Instant::now() < deadline, "queue depth never reached {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn slow_sim() -> GpuSim {
    GpuSim::start(SimConfig {
        max_batch: 1,
        step_ms: 20.0,
        ..Default::default()
    })
}

#[test]
fn a_saturated_pool_queues_in_arrival_order_instead_of_answering_503() {
    let sim = slow_sim();
    let g = start(&config(&[&sim], "max_inflight = 1", "max_wait = \"20s\""));
    let key = KEYS[0].0;
    // Each takes ~10 decode steps of 20 ms: one at a time, the rest wait.
    let mut hs = Vec::new();
    for _ in 0..6 {
        hs.push(spawn(g.addr, chat_bytes(key, 8, 10, "")));
        std::thread::sleep(Duration::from_millis(40));
    }
    let seen: Vec<Seen> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    for s in &seen {
        assert_eq!(s.status, 200, "{}", s.head);
        assert!(s.body.contains("[DONE]"));
    }
    for w in seen.windows(2) {
        assert!(w[0].done <= w[1].done, "served out of arrival order");
    }
    assert_eq!(g.metric(&["gateway_balance_shed_total"]), 0.0);
    assert!(g.metric(&["gateway_queue_dispatched_total"]) >= 4.0);
    assert_eq!(depth(&g), 0.0);
    assert!(g.metric(&["gateway_queue_wait_seconds_count"]) >= 4.0);
    // The backend never ran two at once: the cap held.
    assert_eq!(sim.requests(), 6);
}

#[test]
fn a_higher_band_overtakes_a_lower_one() {
    let sim = slow_sim();
    let g = start(&config(&[&sim], "max_inflight = 1", ""));
    let (low, gold) = (KEYS[0].0, KEYS[2].0);
    let first = spawn(g.addr, chat_bytes(low, 8, 15, ""));
    wait_for_running(&sim);
    let lows: Vec<_> = (0..3)
        .map(|_| {
            let h = spawn(g.addr, chat_bytes(low, 8, 5, ""));
            std::thread::sleep(Duration::from_millis(30));
            h
        })
        .collect();
    wait_depth(&g, 3.0);
    let high = spawn(g.addr, chat_bytes(gold, 8, 5, ""));
    let high = high.join().unwrap();
    let lows: Vec<Seen> = lows.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(first.join().unwrap().status, 200);
    assert_eq!(high.status, 200);
    for l in &lows {
        assert_eq!(l.status, 200);
        assert!(
            high.done < l.done,
            "the gold tenant's request (band 10), sent last, went before band 0's"
        );
    }
    assert!(g.metric(&["gateway_queue_dispatched_total", "band=\"10\""]) >= 1.0);
}

fn wait_for_running(sim: &GpuSim) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.load().0 == 0 {
        assert!(
            Instant::now() < deadline,
            "the backend never got the request"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn queue_bounds_answer_429_and_503_with_retry_after() {
    let sim = slow_sim();
    let g = start(&config(
        &[&sim],
        "max_inflight = 1",
        "max_requests = 2\nmax_wait = \"400ms\"",
    ));
    let key = KEYS[0].0;
    // Holds the only slot for ~2 s.
    let long = spawn(g.addr, chat_bytes(key, 8, 100, ""));
    wait_for_running(&sim);
    let waiting: Vec<_> = (0..2)
        .map(|_| spawn(g.addr, chat_bytes(key, 8, 5, "")))
        .collect();
    wait_depth(&g, 2.0);
    let full = send(g.addr, &chat_bytes(key, 8, 5, ""));
    assert_eq!(full.status, 429, "{}", full.head);
    assert!(full.head.contains("retry-after: "), "{}", full.head);
    let err: serde_json::Value = serde_json::from_str(&full.body).unwrap();
    assert_eq!(err["error"]["code"], "queue_full");
    assert_eq!(err["error"]["type"], "rate_limit_error");
    for w in waiting {
        let s = w.join().unwrap();
        assert_eq!(s.status, 503, "{}", s.head);
        assert!(s.head.contains("retry-after: "));
        let err: serde_json::Value = serde_json::from_str(&s.body).unwrap();
        assert_eq!(err["error"]["code"], "queue_timeout");
    }
    assert_eq!(
        g.metric(&["gateway_queue_refused_total", "reason=\"full\""]),
        1.0
    );
    assert_eq!(
        g.metric(&["gateway_queue_refused_total", "reason=\"timeout\""]),
        2.0
    );
    assert_eq!(long.join().unwrap().status, 200);
    // None of the refused ones reached the backend.
    assert_eq!(sim.requests(), 1);
}

#[test]
fn a_client_that_hangs_up_while_queued_leaves_at_once() {
    let sim = slow_sim();
    let g = start(&config(&[&sim], "max_inflight = 1", ""));
    let key = KEYS[0].0;
    let long = spawn(g.addr, chat_bytes(key, 8, 60, ""));
    wait_for_running(&sim);
    let mut s = TcpStream::connect(g.addr).unwrap();
    s.write_all(&chat_bytes(key, 8, 5, "")).unwrap();
    wait_depth(&g, 1.0);
    let raw = format!("GET /balance/queues HTTP/1.1\r\nhost: admin\r\nx-api-key: {OPS}\r\n\r\n");
    let q = gateway_tests::request(g.admin, raw.as_bytes()).json();
    assert_eq!(q["queues"][0]["waiting"], 1, "{q}");
    assert_eq!(
        q["queues"][0]["bands"][0]["flows"][0]["flow"], "acme",
        "{q}"
    );
    let gone = Instant::now();
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.metric(&["gateway_queue_refused_total", "reason=\"disconnected\""]) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the departed client stayed queued"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        gone.elapsed() < Duration::from_millis(1000),
        "left after {:?}",
        gone.elapsed()
    );
    assert_eq!(depth(&g), 0.0);
    assert_eq!(long.join().unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        sim.requests(),
        1,
        "the departed request never reached a backend"
    );
}

/// Percentile of durations (ms).
fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

#[test]
fn a_tenant_flooding_at_five_times_its_share_leaves_another_tenants_ttft_near_unloaded() {
    // Two servers, batch 32, capped at 32 in flight each: 64 slots, as a
    // real pool has many (slots free every few ms, not in bursts). B's
    // prompts are long: prefill is most of its TTFT, as in production.
    let cfg = SimConfig {
        max_batch: 32,
        step_ms: 8.0,
        per_seq_ms: 0.1,
        prefill_ms_per_1k_tokens: 40.0,
        kv_tokens: 1 << 20,
        ..Default::default()
    };
    let (s1, s2) = (GpuSim::start(cfg.clone()), GpuSim::start(cfg));
    let g = start(&config(
        &[&s1, &s2],
        "max_inflight = 32",
        "max_wait = \"30s\"",
    ));
    let (a, b) = (KEYS[0].0, KEYS[1].0);
    let b_ttfts = |n: usize| -> Vec<Duration> {
        (0..n)
            .map(|_| {
                let s = send(g.addr, &chat_bytes(b, 1000, 4, ""));
                assert_eq!(s.status, 200, "{}", s.head);
                std::thread::sleep(Duration::from_millis(30));
                s.ttft
            })
            .collect()
    };
    // Warm up, then B alone.
    b_ttfts(5);
    let mut alone = b_ttfts(20);
    // A floods: 160 requests always outstanding (5× its fair half of the
    // 64 slots), outputs of 16 to 47 tokens.
    let stop = Arc::new(Mutex::new(false));
    let a_ok = Arc::new(Mutex::new(0usize));
    let flood: Vec<_> = (0..160u64)
        .map(|i| {
            let (stop, a_ok, addr) = (stop.clone(), a_ok.clone(), g.addr);
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(30);
                while !*stop.lock().unwrap() && Instant::now() < end {
                    let out = 16 + (i * 7 + SEQ.load(std::sync::atomic::Ordering::Relaxed)) % 32;
                    if send(addr, &chat_bytes(a, 8, out, "")).status == 200 {
                        *a_ok.lock().unwrap() += 1;
                    }
                }
            })
        })
        .collect();
    wait_depth(&g, 50.0);
    // Past the flood's first wave (all of it admitted at once, finishing together).
    std::thread::sleep(Duration::from_millis(1500));
    let mut loaded = b_ttfts(20);
    let queued_meanwhile = depth(&g);
    *stop.lock().unwrap() = true;
    for f in flood {
        f.join().unwrap();
    }
    let (p99_alone, p99_loaded) = (pct(&mut alone, 0.99), pct(&mut loaded, 0.99));
    eprintln!(
        "B TTFT p99 alone {p99_alone:.1} ms, under A's flood {p99_loaded:.1} ms; A served {}, queue {queued_meanwhile}",
        a_ok.lock().unwrap()
    );
    assert!(queued_meanwhile >= 30.0, "A's flood kept the queue full");
    assert!(
        p99_loaded <= 2.0 * p99_alone,
        "B's TTFT p99 {p99_loaded:.1} ms under A's flood vs {p99_alone:.1} ms alone"
    );
    assert_eq!(g.metric(&["gateway_balance_shed_total"]), 0.0);
}
