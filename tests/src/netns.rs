//! Two network namespaces joined by a veth pair, for tests and benches that
//! need a real NIC path: a "gateway" side and a "client" side. Everything
//! stays inside namespaces this process made (and deletes on drop).

use std::process::{Command, Output, Stdio};

/// `gw` ⟷ `cl`: veth `gw_if` (in `gw`, address `gw_ip`) to `cl_if` (in
/// `cl`, addresses `cl_ips`).
pub struct NetPair {
    pub gw: String,
    pub cl: String,
    pub gw_if: String,
    pub cl_if: String,
    pub gw_ip: String,
    pub cl_ips: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetPair {
    /// `tag` keeps names unique per test (interface names are ≤ 15 bytes);
    /// `subnet` is the third octet of 10.201.X.0/24.
    pub fn new(tag: &str, subnet: u8, clients: usize) -> NetPair {
        let pid = std::process::id() % 10000;
        let p = NetPair {
            gw: format!("gwns-{tag}-{pid}"),
            cl: format!("clns-{tag}-{pid}"),
            gw_if: format!("vg{tag}{pid}"),
            cl_if: format!("vc{tag}{pid}"),
            gw_ip: format!("10.201.{subnet}.1"),
            cl_ips: (0..clients)
                .map(|i| format!("10.201.{subnet}.{}", i + 2))
                .collect(),
        };
        for ns in [&p.gw, &p.cl] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "link", "add", &p.gw_if, "netns", &p.gw, "type", "veth", "peer", "name", &p.cl_if,
            "netns", &p.cl,
        ]);
        ip(&[
            "-n",
            &p.gw,
            "addr",
            "add",
            &format!("{}/24", p.gw_ip),
            "dev",
            &p.gw_if,
        ]);
        for a in &p.cl_ips {
            ip(&[
                "-n",
                &p.cl,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                &p.cl_if,
            ]);
        }
        ip(&["-n", &p.gw, "link", "set", &p.gw_if, "up"]);
        ip(&["-n", &p.cl, "link", "set", &p.cl_if, "up"]);
        p
    }

    /// A command that runs inside namespace `ns`.
    pub fn cmd(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// `curl` from the client side with source address `from`; returns
    /// (curl exit code, HTTP status or 0, body).
    pub fn curl_from(&self, from: &str, url: &str, max_time_s: u32) -> (i32, u16, String) {
        let out: Output = Self::cmd(&self.cl, "curl")
            .args([
                "-s",
                "--interface",
                from,
                "--max-time",
                &max_time_s.to_string(),
            ])
            .args(["-o", "-", "-w", "\n%{http_code}", url])
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (
            out.status.code().unwrap_or(-1),
            code.trim().parse().unwrap_or(0),
            body.to_string(),
        )
    }

    /// `curl` on the gateway side (admin API on its loopback).
    pub fn curl_gw(&self, url: &str) -> String {
        let out = Self::cmd(&self.gw, "curl")
            .args(["-s", "--max-time", "5", url])
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// `ip -d link show` of the gateway-side interface.
    pub fn gw_link(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.gw, "-d", "link", "show", "dev", &self.gw_if])
            .output()
            .expect("ip link show");
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and its peer.
        for ns in [&self.gw, &self.cl] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The value of the Prometheus sample `name{labels}` (labels as written,
/// e.g. `verdict="drop",reason="blocked"`) in `text`; 0 when absent.
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    let want = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == want).then(|| v.parse().ok())?
        })
        .unwrap_or(0.0)
}
