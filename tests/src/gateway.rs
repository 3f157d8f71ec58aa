//! Start the real `gateway` binary with a generated config, wait until it is
//! ready, scrape its metrics, signal it, and kill it when the test ends.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The I/O driver a test runs the gateway on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    IoUring,
    Epoll,
    Auto,
}

impl Driver {
    pub fn name(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
            Driver::Auto => "auto",
        }
    }
}

/// Whether this kernel lets us use io_uring (tests on the io_uring driver are
/// skipped, loudly, where it is disabled).
pub fn io_uring_available() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim() == "0")
        .unwrap_or(true)
}

pub fn bin(env: &str, name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} binary not found: run `cargo xtask test` (it builds it and sets {env})");
}

pub fn gateway_bin() -> PathBuf {
    bin("GATEWAY_BIN", "gateway")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("gw-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub child: Option<Child>,
    pub dir: PathBuf,
    log: PathBuf,
    /// The `[server]`/`[admin]`/`[log]` part of the config file, kept for rewrites.
    header: String,
}

/// How to start a gateway: `body` is the TOML after `[server]`/`[admin]`/`[log]`
/// (limits, timeouts, clusters, routes); `server_extra` lines go in `[server]`.
pub struct Spec<'a> {
    pub driver: Driver,
    pub workers: usize,
    pub server_extra: &'a str,
    /// More `[log]` keys.
    pub log_extra: &'a str,
    pub body: &'a str,
    /// Run the child under a seccomp filter that makes io_uring_setup fail.
    pub deny_io_uring: bool,
}

impl<'a> Spec<'a> {
    pub fn new(driver: Driver, body: &'a str) -> Spec<'a> {
        Spec {
            driver,
            workers: 2,
            server_extra: "",
            log_extra: "",
            body,
            deny_io_uring: false,
        }
    }
}

/// A cluster + catch-all route to one backend, the most common test body.
pub fn one_cluster(backend: SocketAddr) -> String {
    format!("[clusters.b]\nbackends = [\"{backend}\"]\n\n[[routes]]\nname = \"all\"\npath_prefix = \"/\"\ncluster = \"b\"\n")
}

impl Gateway {
    /// Start the real binary with `spec`. A port picked by `free_port` can be
    /// taken by some other socket before the gateway binds it (the tests run
    /// in parallel and open many client connections): then try new ports.
    ///
    /// Any other exit during start is retried too, once, with the log shown:
    /// on this 2-core box dozens of gateways start in parallel and a rare
    /// start can lose a race for a resource (a port, locked memory for an
    /// io_uring ring); a configuration the gateway refuses fails every try.
    pub fn start(spec: Spec<'_>) -> Gateway {
        let mut other_failures = 0;
        for _ in 0..5 {
            match Self::try_start(&spec) {
                Ok(g) => return g,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) if other_failures == 0 => {
                    other_failures += 1;
                    eprintln!("gateway exited during start; trying once more. Its log:\n{log}");
                }
                Err(log) => panic!("gateway exited during start:\n{log}"),
            }
        }
        panic!("gateway could not bind free ports in 5 tries");
    }

    fn try_start(spec: &Spec<'_>) -> Result<Gateway, String> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let dir = temp_dir("gw");
        let header = format!(
            "[server]\nlisten = [\"{addr}\"]\nworkers = {}\ndriver = \"{}\"\n{}\n\n[admin]\nlisten = \"{admin}\"\n\n[log]\nformat = \"json\"\nlevel = \"info\"\n{}\n\n",
            spec.workers,
            spec.driver.name(),
            spec.server_extra,
            spec.log_extra,
        );
        let cfg = format!("{header}{}", spec.body);
        let cfg_path = dir.join("gateway.toml");
        std::fs::write(&cfg_path, &cfg).unwrap();
        let log = dir.join("gateway.log");
        let mut cmd = Command::new(gateway_bin());
        cmd.arg("run").arg("--config").arg(&cfg_path);
        let out = std::fs::File::create(&log).unwrap();
        cmd.stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null());
        if spec.deny_io_uring {
            // SAFETY: only async-signal-safe calls (prctl) between fork and exec.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(deny_io_uring_setup);
            }
        }
        let child = cmd.spawn().expect("spawn gateway");
        let mut g = Gateway {
            addr,
            admin,
            child: Some(child),
            dir,
            log,
            header,
        };
        g.wait_ready()?;
        Ok(g)
    }

    /// Ready, or the log of a gateway that exited during start.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!("({st}):\n{}", self.log_text()));
            }
            if let Ok((200, _)) = admin_get(self.admin, "/readyz") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("gateway not ready in 15 s:\n{}", self.log_text());
    }

    /// Replace the config file's body (same listeners), e.g. before a SIGHUP.
    pub fn rewrite_config(&self, body: &str) {
        std::fs::write(
            self.dir.join("gateway.toml"),
            format!("{}{body}", self.header),
        )
        .unwrap();
    }

    /// SIGHUP, and wait until the gateway reports one more successful reload.
    pub fn reload(&self) {
        let ok = ["gateway_config_reloads_total", "result=\"ok\""];
        let before = self.metric(&ok);
        self.signal(libc::SIGHUP);
        assert!(
            self.wait_metric(&ok, before + 1.0) > before,
            "the reload was not applied"
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the log shows `needle` within 5 s (the gateway's log writer
    /// is non-blocking: a line can land a moment after the event).
    pub fn log_shows(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.log_text().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Resident memory of the gateway process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn metrics(&self) -> String {
        admin_get(self.admin, "/metrics")
            .expect("scrape /metrics")
            .1
    }

    /// Sum of every sample whose name and labels contain all of `parts`
    /// (e.g. `["gateway_requests_total", "status=\"200\""]`).
    pub fn metric(&self, parts: &[&str]) -> f64 {
        sum_metric(&self.metrics(), parts)
    }

    /// Poll until a metric reaches at least `min` (shards are folded every 200 ms).
    pub fn wait_metric(&self, parts: &[&str], min: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.metric(parts);
            if v >= min || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Wait for the process to exit, up to `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- gateway log (last 40 lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn sum_metric(text: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or(("", ""));
            let name = series.split('{').next().unwrap_or("");
            name == parts[0] && parts[1..].iter().all(|p| series.contains(p))
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// GET on the admin listener: (status, body).
pub fn admin_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::Write;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Install a seccomp filter in the child making io_uring_setup(2) fail with
/// ENOSYS, as container runtimes that block io_uring do.
pub fn deny_io_uring_setup() -> std::io::Result<()> {
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const NR_IO_URING_SETUP: u32 = 425; // same number on x86_64 and aarch64
    let filter = [
        libc::sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        }, // seccomp_data.nr
        libc::sock_filter {
            code: BPF_JEQ_K,
            jt: 0,
            jf: 1,
            k: NR_IO_URING_SETUP,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut _,
    };
    // SAFETY: prctl with a valid, live filter program.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Run a test body on both runtime drivers.
#[macro_export]
macro_rules! both_drivers {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn io_uring() {
                if !$crate::gateway::io_uring_available() {
                    eprintln!(
                        "SKIPPED: io_uring is disabled on this kernel (kernel.io_uring_disabled)"
                    );
                    return;
                }
                let f: fn($crate::gateway::Driver) = $body;
                f($crate::gateway::Driver::IoUring);
            }
            #[test]
            fn epoll() {
                let f: fn($crate::gateway::Driver) = $body;
                f($crate::gateway::Driver::Epoll);
            }
        }
    };
}
