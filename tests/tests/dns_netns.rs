//! Backend names are re-resolved: in a network namespace with its own
//! `/etc/hosts` (`ip netns exec` bind-mounts `/etc/netns/NS/hosts`), a name
//! moves from one backend to another and the gateway follows, without a
//! restart and without a failed request. Needs root (CI runs as root),
//! iproute2 and curl.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use gateway_tests::gateway::{bin, gateway_bin};
use gateway_tests::netns::NetPair;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn backend(net: &NetPair, addr: &str) -> Proc {
    Proc(
        NetPair::cmd(&net.gw, bin("DEMO_BACKEND_BIN", "demo-backend"))
            .args(["--listen", addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start demo-backend"),
    )
}

#[test]
fn a_backend_name_that_moves_in_dns_is_followed() {
    let net = NetPair::new("h", 78, 1);
    let etc = std::path::PathBuf::from(format!("/etc/netns/{}", net.gw));
    std::fs::create_dir_all(&etc).unwrap();
    let hosts = etc.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.2 model.test\n").unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(etc.clone());

    let mut first = Some(backend(&net, "127.0.0.2:8000"));
    let _second = backend(&net, "127.0.0.3:8000");
    let dir = std::env::temp_dir().join(format!("gw-dns-{}", net.gw));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = [\"127.0.0.1:8080\"]\nworkers = 1\ndns_refresh = \"500ms\"\n[admin]\nlisten = \"127.0.0.1:9903\"\n\
         [log]\naccess_log = true\n[clusters.m]\nbackends = [\"model.test:8000\"]\n\
         [[routes]]\npath_prefix = \"/\"\ncluster = \"m\"\n",
    )
    .unwrap();
    let log = dir.join("gateway.log");
    let out = std::fs::File::create(&log).unwrap();
    let _gw = Proc(
        NetPair::cmd(&net.gw, gateway_bin())
            .args(["run", "--config"])
            .arg(&config)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start gateway"),
    );
    let ok = |net: &NetPair| {
        net.curl_gw("http://127.0.0.1:8080/v1/x")
            .contains("\"method\"")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok(&net) {
        assert!(
            Instant::now() < deadline,
            "gateway never served through model.test"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The access log is written off the request path: wait for its line.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("\"upstream\":\"127.0.0.2:8000\"") {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The name moves (same file, rewritten in place: the bind mount sees it).
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.3 model.test\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("backend addresses changed in DNS")
            && text.contains("configuration reloaded")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no DNS-triggered reload:\n{text}"
        );
        assert!(ok(&net), "served throughout");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The old address goes away: every request still succeeds, on the new one.
    drop(first.take());
    for _ in 0..5 {
        assert!(ok(&net));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("\"upstream\":\"127.0.0.3:8000\""), "{text}");
}
