//! Process lifecycle: graceful drain on SIGTERM, the grace deadline, the
//! io_uring → epoll fallback, the CLI's config commands and quick start.

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use gateway_tests::gateway::{admin_get, free_port, gateway_bin, temp_dir};
use gateway_tests::{both_drivers, one_cluster, Backend, Client, Driver, Gateway, Spec};

both_drivers!(sigterm_drains_in_flight_requests, |d: Driver| {
    let b = Backend::start("slow");
    let mut g = Gateway::start(Spec::new(d, &one_cluster(b.addr)));
    // One request in flight, one idle keep-alive connection.
    let mut busy = Client::connect(g.addr);
    busy.send(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: a\r\n\r\n");
    let mut idle = Client::connect(g.addr);
    assert_eq!(idle.get("/").status, 200);
    std::thread::sleep(Duration::from_millis(300));
    g.signal(libc::SIGTERM);

    // The idle connection is closed promptly, without a response.
    assert!(
        idle.closed_within(Duration::from_secs(2)),
        "idle keep-alive connection not closed on drain"
    );
    // Readiness drops while draining, so load balancers stop sending.
    let (status, _) = admin_get(g.admin, "/readyz").expect("admin still up while draining");
    assert_eq!(status, 503);
    // New connections are no longer accepted.
    std::thread::sleep(Duration::from_millis(100));
    let refused = TcpStream::connect_timeout(&g.addr, Duration::from_millis(500)).is_err();
    assert!(refused, "listener still accepting after SIGTERM");

    // The in-flight request completes, with `connection: close`.
    let r = busy.read_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["slept_ms"], 1500);
    assert_eq!(r.header("connection"), Some("close"));
    let st = g
        .wait_exit(Duration::from_secs(10))
        .expect("gateway did not exit after draining");
    assert!(st.success(), "exit status {st}");
});

#[test]
fn grace_period_bounds_the_drain() {
    let b = Backend::start("slow");
    let body = one_cluster(b.addr);
    let mut spec = Spec::new(Driver::Auto, &body);
    spec.server_extra = "shutdown_grace = \"500ms\"";
    let mut g = Gateway::start(spec);
    let mut busy = Client::connect(g.addr);
    busy.send(b"GET /slow?ms=20000 HTTP/1.1\r\nHost: a\r\n\r\n");
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    g.signal(libc::SIGTERM);
    let st = g
        .wait_exit(Duration::from_secs(10))
        .expect("gateway ignored its grace period");
    assert!(st.success());
    assert!(t.elapsed() < Duration::from_secs(8));
    assert!(busy.closed_within(Duration::from_secs(2)));
    assert!(g.log_text().contains("grace period over"));
}

#[test]
fn falls_back_to_epoll_when_io_uring_is_blocked() {
    let b = Backend::start("b");
    let body = one_cluster(b.addr);
    let mut spec = Spec::new(Driver::Auto, &body);
    spec.deny_io_uring = true;
    let g = Gateway::start(spec);
    let mut c = Client::connect(g.addr);
    for _ in 0..3 {
        assert_eq!(c.get("/").status, 200);
    }
    assert_eq!(
        g.metric(&["gateway_runtime_driver", "driver=\"epoll\""]),
        2.0
    );
    assert_eq!(
        g.metric(&["gateway_runtime_driver", "driver=\"io_uring\""]),
        0.0
    );
    // Said once, not once per worker.
    assert_eq!(
        g.log_text().matches("falling back to epoll").count(),
        1,
        "{}",
        g.log_text()
    );
}

#[test]
fn forced_io_uring_fails_clearly_when_blocked() {
    let b = Backend::start("b");
    let body = one_cluster(b.addr);
    let dir = temp_dir("forced");
    let cfg = dir.join("g.toml");
    std::fs::write(
        &cfg,
        format!("[server]\nlisten = [\"127.0.0.1:{}\"]\ndriver = \"io_uring\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n{body}", free_port(), free_port()),
    )
    .unwrap();
    let mut cmd = Command::new(gateway_bin());
    cmd.args(["run", "--config"]).arg(&cfg);
    // SAFETY: prctl only, between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(gateway_tests::gateway::deny_io_uring_setup);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("io_uring is unavailable"), "{text}");
}

#[test]
fn config_commands() {
    let bin = gateway_bin();
    let dir = temp_dir("cfg");
    // The default config is printed and passes the checker.
    let out = Command::new(&bin)
        .args(["config", "default"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let default = dir.join("default.toml");
    std::fs::write(&default, &out.stdout).unwrap();
    let out = Command::new(&bin)
        .arg("check-config")
        .arg(&default)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A bad file: exit 1, one message per problem, with file, line and key.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[clusters.a]\nbackends = [\"127.0.0.1:1\"]\n\n[[routes]]\npath_prefix = \"v1\"\ncluster = \"missing\"\n").unwrap();
    let out = Command::new(&bin)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let bad_name = bad.display().to_string();
    assert!(
        err.contains(&format!("{bad_name}:5: `routes[0].path_prefix`")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{bad_name}:6: `routes[0].cluster`")),
        "{err}"
    );
    assert!(err.contains("define [clusters.missing]"), "{err}");

    // Unknown keys are errors too, and `run` refuses to start on them.
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "[server]\nworkerz = 2\n").unwrap();
    let out = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&typo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":2: `workerz`") && err.contains("unknown field"),
        "{err}"
    );
}

#[test]
fn quick_start_without_a_config_file() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let port = free_port();
    let admin = free_port();
    let mut child = Command::new(gateway_bin())
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &format!("{},{}", a.addr, b.addr),
        ])
        .args(["--admin", &format!("127.0.0.1:{admin}"), "--workers", "1"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let admin_addr = format!("127.0.0.1:{admin}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(admin_get(admin_addr, "/readyz"), Ok((200, _))) {
        assert!(Instant::now() < deadline, "quick start not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = Client::connect(format!("127.0.0.1:{port}").parse().unwrap());
    let names: Vec<String> = (0..4)
        .map(|_| c.get("/").json()["backend"].as_str().unwrap().to_string())
        .collect();
    assert!(
        names.contains(&"a".to_string()) && names.contains(&"b".to_string()),
        "{names:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn readme_shows_the_embedded_default_config() {
    let out = Command::new(gateway_bin())
        .args(["config", "default"])
        .output()
        .unwrap();
    let default = String::from_utf8(out.stdout).unwrap();
    let body = default
        .split_once("[server]")
        .map(|(_, b)| format!("[server]{b}"))
        .unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    assert!(
        readme.contains(&body),
        "README's config reference is out of date with `gateway config default`"
    );
}

#[test]
fn max_connections_applies_back_pressure() {
    let b = Backend::start("b");
    let body = one_cluster(b.addr);
    let mut spec = Spec::new(Driver::Auto, &body);
    spec.workers = 1;
    spec.server_extra = "max_connections = 1";
    let g = Gateway::start(spec);
    let mut first = Client::connect(g.addr);
    assert_eq!(first.get("/").status, 200);
    // Busy (a request in flight), the first connection can't be reclaimed:
    // the second completes in the kernel backlog but is not served…
    first.send(b"GET /slow?ms=1200 HTTP/1.1\r\nHost: a\r\n\r\n");
    std::thread::sleep(Duration::from_millis(100));
    let mut second = Client::connect(g.addr);
    second.send(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(!second.closed_within(Duration::from_millis(500)));
    assert!(second.leftover().is_empty(), "served past max_connections");
    assert_eq!(b.requests(), 2);
    // …until its response is done and it goes idle: then it makes room.
    assert_eq!(first.read_response().status, 200);
    let r = second.read_response();
    assert_eq!(r.json()["path"], "/second");
    assert_eq!(
        g.wait_metric(&["gateway_connections_accepted_total"], 2.0),
        2.0
    );
    assert!(g.wait_metric(&["gateway_connections_shed_total", "reason=\"idle\""], 1.0) >= 1.0);
}

/// At max_connections, idle keep-alive connections and slow request heads
/// (slowloris) make room for new clients: a new client is served at once
/// when an idle one can go, within `client_header_overload` when only slow
/// heads hold the places — not after `client_header`.
#[test]
fn at_max_connections_idle_and_slow_connections_make_room() {
    let b = Backend::start("b");
    let body = format!(
        "{}\n[timeouts]\nclient_header = \"30s\"\nclient_header_overload = \"1s\"\n",
        one_cluster(b.addr)
    );
    let mut spec = Spec::new(Driver::Auto, &body);
    spec.workers = 1;
    spec.server_extra = "max_connections = 4";
    let g = Gateway::start(spec);
    // Two idle keep-alive connections, two slow heads.
    let mut idle: Vec<Client> = (0..2).map(|_| Client::connect(g.addr)).collect();
    for c in &mut idle {
        assert_eq!(c.get("/").status, 200);
    }
    let slowloris = |n: usize| -> Vec<Client> {
        (0..n)
            .map(|_| {
                let mut c = Client::connect(g.addr);
                c.send(b"GET /slowloris HTTP/1.1\r\nHost: a\r\n");
                c
            })
            .collect()
    };
    let mut slow = slowloris(2);
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let mut fresh = Client::connect(g.addr);
    assert_eq!(fresh.get("/fresh").status, 200);
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "an idle connection made room at once: {:?}",
        t.elapsed()
    );
    assert!(g.wait_metric(&["gateway_connections_shed_total", "reason=\"idle\""], 1.0) >= 1.0);
    drop(fresh);
    // Now the places are held by slow heads (and what is left idle): fill
    // them all with slowloris connections; a new client still gets in.
    for c in &mut idle {
        let _ = c.closed_within(Duration::from_millis(1));
    }
    let mut more = slowloris(4);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let mut late = Client::connect(g.addr);
    assert_eq!(late.get("/late").status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "slow heads made room within client_header_overload, not client_header (30 s): {:?}",
        t.elapsed()
    );
    assert!(
        g.wait_metric(
            &["gateway_connections_shed_total", "reason=\"slow_head\""],
            1.0
        ) >= 1.0
    );
    let closed = slow
        .iter_mut()
        .chain(more.iter_mut())
        .map(|c| c.closed_within(Duration::from_millis(50)))
        .filter(|&gone| gone)
        .count();
    assert!(closed >= 1, "slowloris connections were closed");
}

both_drivers!(sighup_reloads_without_dropping_requests, |d: Driver| {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let g = Gateway::start(Spec::new(d, &one_cluster(a.addr)));
    let mut c = Client::connect(g.addr);
    assert_eq!(c.get("/x").json()["backend"], "a");
    // A request in flight across the reload.
    let mut slow = Client::connect(g.addr);
    slow.send(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: a\r\n\r\n");
    std::thread::sleep(Duration::from_millis(200));

    g.rewrite_config(&one_cluster(b.addr));
    g.signal(libc::SIGHUP);
    assert_eq!(
        g.wait_metric(&["gateway_config_generation"], 1.0),
        1.0,
        "{}",
        g.log_text()
    );
    // The same keep-alive client connection now reaches the new backend.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if c.get("/x").json()["backend"] == "b" {
            break;
        }
        assert!(Instant::now() < deadline, "reload never took effect");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The in-flight request finished on the configuration it started with.
    let r = slow.read_response();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["backend"], "a");

    // A broken file is refused; the running configuration stays.
    g.rewrite_config("[[routes]]\npath_prefix = \"/\"\ncluster = \"missing\"\n");
    g.signal(libc::SIGHUP);
    assert_eq!(
        g.wait_metric(&["gateway_config_reloads_total", "result=\"error\""], 1.0),
        1.0
    );
    assert_eq!(c.get("/x").json()["backend"], "b");
    assert_eq!(g.metric(&["gateway_config_generation"]), 1.0);
    let log = g.log_text();
    assert!(
        log.contains("reload refused") && log.contains("gateway.toml:"),
        "{log}"
    );
});

#[test]
fn readiness_drops_a_drain_delay_before_the_listeners_stop() {
    let b = Backend::start("d");
    let body = one_cluster(b.addr);
    let mut spec = Spec::new(Driver::Auto, &body);
    spec.server_extra = "drain_delay = \"1500ms\"";
    let mut g = Gateway::start(spec);
    let t = Instant::now();
    g.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    // Not ready any more…
    assert_eq!(admin_get(g.admin, "/readyz").unwrap().0, 503);
    // …but still serving new connections while endpoints catch up.
    let mut c = Client::connect(g.addr);
    assert_eq!(c.get("/").status, 200);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "the check ran too late to mean anything"
    );
    // After the delay the listeners stop.
    std::thread::sleep(Duration::from_millis(1800).saturating_sub(t.elapsed()));
    let mut refused = false;
    for _ in 0..20 {
        if TcpStream::connect_timeout(&g.addr, Duration::from_millis(200)).is_err() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(refused, "listener still accepting after the drain delay");
    assert!(g
        .wait_exit(Duration::from_secs(10))
        .expect("exited")
        .success());
}

#[test]
fn slow_admin_clients_dont_stall_probes_and_a_second_gateway_can_share_the_admin_port() {
    use std::io::Write;
    let b = Backend::start("a");
    let g = Gateway::start(Spec::new(Driver::Auto, &one_cluster(b.addr)));
    // Ten clients connect to the admin port and send half a request.
    let slow: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(g.admin).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    assert_eq!(admin_get(g.admin, "/readyz").unwrap().0, 200);
    assert_eq!(admin_get(g.admin, "/metrics").unwrap().0, 200);
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "probes waited behind slow clients: {:?}",
        t.elapsed()
    );
    drop(slow);
    // An overlapping restart: a second gateway binds the same admin address
    // (SO_REUSEPORT) while the first still runs.
    let dir = temp_dir("reuse");
    let cfg = dir.join("g.toml");
    let port = free_port();
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nworkers = 1\n[admin]\nlisten = \"{}\"\n{}",
            g.admin,
            one_cluster(b.addr)
        ),
    )
    .unwrap();
    let mut second = Command::new(gateway_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut up = false;
    while Instant::now() < deadline {
        assert!(
            second.try_wait().unwrap().is_none(),
            "the second gateway could not start beside the first"
        );
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = second.kill();
    let _ = second.wait();
    assert!(up, "the second gateway never listened");
}

#[test]
fn audit_events_go_to_their_own_rotated_file() {
    let b = Backend::start("a");
    let dir = temp_dir("audit");
    let audit = dir.join("audit.log");
    let key = "sk-audit-0123456789abcdef";
    let body = format!(
        "[clusters.b]\nbackends = [\"{}\"]\n[[models]]\nname = \"allowed\"\n[[models]]\nname = \"secret\"\n\
         [[routes]]\nname = \"chat\"\npath_prefix = \"/v1/\"\nprotocol = \"openai\"\ncluster = \"b\"\n\
         [[authn.api_keys]]\nclient = \"app\"\ntenant = \"t\"\nsha256 = [\"{}\"]\n\
         [[authz.rules]]\nid = \"t-allowed\"\ntenants = [\"t\"]\nmodels = [\"allowed\"]\n",
        b.addr,
        gateway_tests::jwt::key_digest(key)
    );
    let log_extra = format!(
        "audit_file = \"{}\"\naudit_max_bytes = 4096\naudit_keep = 2",
        audit.display()
    );
    let mut spec = Spec::new(Driver::Auto, &body);
    spec.log_extra = &log_extra;
    let g = Gateway::start(spec);
    let chat = |model: &str| {
        let body =
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        let raw = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        gateway_tests::request(g.addr, raw.as_bytes()).status
    };
    assert_eq!(chat("allowed"), 200);
    for _ in 0..30 {
        assert_eq!(chat("secret"), 403);
    }
    // Every denial is in the audit file (or its rotations), none on stdout.
    let deadline = Instant::now() + Duration::from_secs(5);
    let count = || {
        ["audit.log", "audit.log.1", "audit.log.2"]
            .iter()
            .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default())
            .map(|t| {
                t.lines()
                    .filter(|l| l.contains("\"target\":\"audit\"") && l.contains("secret"))
                    .count()
            })
            .sum::<usize>()
    };
    while count() < 30 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let kept = count();
    assert!(dir.join("audit.log.1").exists(), "rotated at 4 KiB");
    assert!(
        !dir.join("audit.log.3").exists(),
        "only audit_keep old files"
    );
    // 30 denials; the oldest rotated out past `audit_keep` may be gone.
    assert!(kept >= 6, "audit lines kept: {kept}");
    assert!(
        !g.log_text().contains("\"target\":\"audit\""),
        "audit events also on stdout"
    );
}
