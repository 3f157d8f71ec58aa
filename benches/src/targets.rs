//! The servers under test: the nginx backend, and the three proxies in front
//! of it, each configured for one worker on one core, keep-alive on both
//! sides, no access logging. Config files, logs, pid files and nginx's temp
//! directories all live in the run directory, never in /etc or /var.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::procs::{pinned, Server};
use crate::Result;

/// Loopback ports, all derived from one base (default 18000): backend = base,
/// gateway = base+80, HAProxy = base+81, nginx = base+82, gateway admin = base+1901;
/// for `--validation`, the validating gateway = base+83, its admin = base+1902.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub base: u16,
}

impl Ports {
    fn at(self, offset: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base + offset))
    }
    pub fn backend(self) -> SocketAddr {
        self.at(0)
    }
    pub fn gateway(self) -> SocketAddr {
        self.at(80)
    }
    pub fn haproxy(self) -> SocketAddr {
        self.at(81)
    }
    pub fn nginx(self) -> SocketAddr {
        self.at(82)
    }
    pub fn gateway_admin(self) -> SocketAddr {
        self.at(1901)
    }
    pub fn gateway_validated(self) -> SocketAddr {
        self.at(83)
    }
    pub fn gateway_validated_admin(self) -> SocketAddr {
        self.at(1902)
    }
    pub fn all(self) -> [SocketAddr; 5] {
        [
            self.backend(),
            self.gateway(),
            self.haproxy(),
            self.nginx(),
            self.gateway_admin(),
        ]
    }
    /// The ports a `--validation` run uses.
    pub fn validation(self) -> [SocketAddr; 5] {
        [
            self.backend(),
            self.gateway(),
            self.gateway_admin(),
            self.gateway_validated(),
            self.gateway_validated_admin(),
        ]
    }
}

/// What the backend answers to every request: a minimal chat completion.
pub const BACKEND_BODY: &str = r#"{"id":"cmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}"#;

/// Programs the harness runs, when found.
pub struct Tools {
    pub nginx: Option<PathBuf>,
    pub haproxy: Option<PathBuf>,
    pub wrk: Option<PathBuf>,
    pub taskset: Option<PathBuf>,
    pub gateway: Option<PathBuf>,
}

impl Tools {
    /// Look the programs up; the gateway is `$GATEWAY_BIN` or `target/release/gateway`.
    pub fn find(target_dir: &Path) -> Tools {
        let gateway_bin = std::env::var_os("GATEWAY_BIN")
            .map_or_else(|| target_dir.join("release/gateway"), PathBuf::from);
        Tools {
            nginx: crate::procs::find_program("nginx"),
            haproxy: crate::procs::find_program("haproxy"),
            wrk: crate::procs::find_program("wrk"),
            taskset: crate::procs::find_program("taskset"),
            gateway: gateway_bin.is_file().then_some(gateway_bin),
        }
    }
}

/// Where each process runs: the backend and wrk share one CPU, the proxy
/// under test gets the other to itself. `None`: not pinned (one CPU only).
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    pub client_cpu: Option<usize>,
    pub proxy_cpu: Option<usize>,
    pub ports: Ports,
}

/// An nginx instance in its own prefix directory: conf, logs, pid and temp
/// paths under `dir`, in the foreground (`daemon off`), master + 1 worker.
fn nginx(
    tools: &Tools,
    cpu: Option<usize>,
    name: &str,
    dir: &Path,
    http_block: &str,
) -> Result<Server> {
    let nginx = tools.nginx.as_deref().ok_or("nginx not found")?;
    let tmp = dir.join("tmp");
    fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let d = dir.display();
    let t = tmp.display();
    let conf = format!(
        "# Written by loadbench; regenerated on every run.\n\
         daemon off;\n\
         master_process on;\n\
         worker_processes 1;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{\n    worker_connections 4096;\n}}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {t}/body;\n\
         \x20   proxy_temp_path {t}/proxy;\n\
         \x20   fastcgi_temp_path {t}/fastcgi;\n\
         \x20   uwsgi_temp_path {t}/uwsgi;\n\
         \x20   scgi_temp_path {t}/scgi;\n\
         \x20   keepalive_timeout 75s;\n\
         \x20   keepalive_requests 100000;\n\
         {http_block}\
         }}\n"
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf).map_err(|e| format!("{}: {e}", conf_path.display()))?;
    let mut cmd = pinned(cpu, tools.taskset.as_deref(), nginx);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.join("error.log"));
    Server::spawn(name, cmd, &dir.join("stdout.log"))
}

/// nginx answering every request itself with [`BACKEND_BODY`].
pub fn start_backend(tools: &Tools, place: Placement, run_dir: &Path) -> Result<Server> {
    let body = BACKEND_BODY;
    let listen = place.ports.backend();
    let http = format!(
        "    default_type application/json;\n\
         \x20   server {{\n\
         \x20       listen {listen};\n\
         \x20       location / {{\n\
         \x20           return 200 '{body}';\n\
         \x20       }}\n\
         \x20   }}\n"
    );
    nginx(
        tools,
        place.client_cpu,
        "backend (nginx)",
        &run_dir.join("nginx-backend"),
        &http,
    )
}

/// nginx as a reverse proxy: HTTP/1.1 upstream with a keep-alive pool.
pub fn start_nginx_proxy(tools: &Tools, place: Placement, run_dir: &Path) -> Result<Server> {
    let (backend, listen) = (place.ports.backend(), place.ports.nginx());
    let http = format!(
        "    upstream backend {{\n\
         \x20       server {backend};\n\
         \x20       keepalive 128;\n\
         \x20       keepalive_requests 100000;\n\
         \x20   }}\n\
         \x20   server {{\n\
         \x20       listen {listen};\n\
         \x20       location / {{\n\
         \x20           proxy_pass http://backend;\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection \"\";\n\
         \x20       }}\n\
         \x20   }}\n"
    );
    nginx(
        tools,
        place.proxy_cpu,
        "nginx",
        &run_dir.join("nginx-proxy"),
        &http,
    )
}

/// HAProxy, one thread, HTTP mode, keep-alive both sides, server connections shared.
pub fn start_haproxy(tools: &Tools, place: Placement, run_dir: &Path) -> Result<Server> {
    let haproxy = tools.haproxy.as_deref().ok_or("haproxy not found")?;
    let dir = run_dir.join("haproxy");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (backend, listen) = (place.ports.backend(), place.ports.haproxy());
    let conf = format!(
        "# Written by loadbench; regenerated on every run. No `log` lines: no logging.\n\
         global\n\
         \x20   nbthread 1\n\
         \x20   # About two descriptors per connection: 4096 stays under the usual 20000 fd limit.\n\
         \x20   maxconn 4096\n\
         \n\
         defaults\n\
         \x20   mode http\n\
         \x20   option http-keep-alive\n\
         \x20   http-reuse always\n\
         \x20   timeout connect 2s\n\
         \x20   timeout client 30s\n\
         \x20   timeout server 30s\n\
         \x20   timeout http-request 10s\n\
         \x20   timeout http-keep-alive 30s\n\
         \n\
         frontend fe\n\
         \x20   bind {listen}\n\
         \x20   default_backend be\n\
         \n\
         backend be\n\
         \x20   server backend {backend}\n"
    );
    let conf_path = dir.join("haproxy.cfg");
    fs::write(&conf_path, conf).map_err(|e| format!("{}: {e}", conf_path.display()))?;
    // -db: stay in the foreground, so the child we hold is HAProxy itself.
    let mut cmd = pinned(place.proxy_cpu, tools.taskset.as_deref(), haproxy);
    cmd.arg("-f").arg(&conf_path).arg("-db");
    Server::spawn("haproxy", cmd, &dir.join("haproxy.log"))
}

/// The gateway's quick-start mode: one worker (it pins itself to the first CPU taskset allows).
pub fn start_gateway(tools: &Tools, place: Placement, run_dir: &Path) -> Result<Server> {
    let gateway = tools.gateway.as_deref().ok_or("gateway binary not found")?;
    let dir = run_dir.join("gateway");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut cmd = pinned(place.proxy_cpu, tools.taskset.as_deref(), gateway);
    let p = place.ports;
    cmd.arg("run")
        .args([
            "--listen",
            &p.gateway().to_string(),
            "--upstream",
            &p.backend().to_string(),
        ])
        .args([
            "--workers",
            "1",
            "--admin",
            &p.gateway_admin().to_string(),
            "--no-access-log",
        ]);
    Server::spawn("gateway", cmd, &dir.join("gateway.log"))
}

/// The model the load's requests name (`"model"` of [`crate::wrk::REQUEST_BODY`]).
pub fn request_model() -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(crate::wrk::REQUEST_BODY)
        .map_err(|e| format!("the wrk request body is not JSON: {e}"))?;
    v["model"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "the wrk request body names no model".into())
}

/// The validating gateway's config: what quick start (`--upstream`) builds —
/// one cluster with the same pool settings, one catch-all route, one worker,
/// no access log — except that the route is `protocol = "openai"` and the
/// catalogue holds the model the load names. So every chat completion is
/// read whole, parsed and checked before it is forwarded; nothing else differs.
pub fn gateway_validated_config(ports: Ports, model: &str) -> String {
    let (listen, admin, backend) = (
        ports.gateway_validated(),
        ports.gateway_validated_admin(),
        ports.backend(),
    );
    format!(
        "# Written by loadbench --validation; regenerated on every run.\n\
         # The passthrough gateway runs `gateway run --upstream {backend} --workers 1 --no-access-log`;\n\
         # this differs from it only in the route's protocol and the model catalogue.\n\
         [server]\n\
         listen = [\"{listen}\"]\n\
         workers = 1\n\
         \n\
         [admin]\n\
         listen = \"{admin}\"\n\
         \n\
         [log]\n\
         access_log = false\n\
         \n\
         [clusters.default]\n\
         backends = [\"{backend}\"]\n\
         pool_max_idle = 64\n\
         pool_idle_timeout = \"4s\"\n\
         \n\
         [[routes]]\n\
         name = \"default\"\n\
         path_prefix = \"/\"\n\
         cluster = \"default\"\n\
         protocol = \"openai\"\n\
         \n\
         [[models]]\n\
         name = \"{model}\"\n"
    )
}

/// The gateway with validation on ([`gateway_validated_config`], written to
/// `run_dir/gateway-validated/gateway.toml`), one worker on the proxy CPU.
pub fn start_gateway_validated(tools: &Tools, place: Placement, run_dir: &Path) -> Result<Server> {
    let gateway = tools.gateway.as_deref().ok_or("gateway binary not found")?;
    let dir = run_dir.join("gateway-validated");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let conf_path = dir.join("gateway.toml");
    fs::write(
        &conf_path,
        gateway_validated_config(place.ports, &request_model()?),
    )
    .map_err(|e| format!("{}: {e}", conf_path.display()))?;
    let mut cmd = pinned(place.proxy_cpu, tools.taskset.as_deref(), gateway);
    cmd.arg("run").arg("--config").arg(&conf_path);
    Server::spawn("gateway-validated", cmd, &dir.join("gateway.log"))
}

/// `loadbench --ratelimit`'s second gateway: the validating one on the
/// plain gateway's ports, with limits at every level that applies without
/// authentication (address, route, model: request and token buckets, a
/// concurrency limit), escalation on, and the headers on every response.
/// The load stays far under every limit: this measures the stage's cost.
pub fn gateway_limited_config(ports: Ports, model: &str) -> String {
    let validated = gateway_validated_config(ports, model);
    let text = validated
        .replace(
            &format!("listen = [\"{}\"]", ports.gateway_validated()),
            &format!("listen = [\"{}\"]", ports.gateway()),
        )
        .replace(
            &format!("listen = \"{}\"", ports.gateway_validated_admin()),
            &format!("listen = \"{}\"", ports.gateway_admin()),
        )
        .replace(
            "# Written by loadbench --validation",
            "# Written by loadbench --ratelimit (the validating gateway + [ratelimit])",
        );
    text + "\n\
[ratelimit]\n\
headers_on_success = true\n\
\n\
[ratelimit.ip]\n\
requests_per_second = 10000000\n\
burst = 10000000\n\
\n\
[ratelimit.route]\n\
requests_per_second = 10000000\n\
burst = 10000000\n\
\n\
[ratelimit.model]\n\
requests_per_second = 10000000\n\
burst = 10000000\n\
tokens_per_minute = 1e12\n\
token_burst = 1000000000\n\
concurrency = 100000\n\
\n\
[ratelimit.escalation]\n\
enabled = true\n"
}

pub fn start_gateway_limited(tools: &Tools, place: Placement, run_dir: &Path) -> Result<Server> {
    let gateway = tools.gateway.as_deref().ok_or("gateway binary not found")?;
    let dir = run_dir.join("gateway-ratelimited");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let conf_path = dir.join("gateway.toml");
    fs::write(
        &conf_path,
        gateway_limited_config(place.ports, &request_model()?),
    )
    .map_err(|e| format!("{}: {e}", conf_path.display()))?;
    let mut cmd = pinned(place.proxy_cpu, tools.taskset.as_deref(), gateway);
    cmd.arg("run").arg("--config").arg(&conf_path);
    Server::spawn("gateway-ratelimited", cmd, &dir.join("gateway.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_names_a_model() {
        assert_eq!(request_model().unwrap(), "demo");
    }

    #[test]
    fn validated_config_ports_stay_apart() {
        let p = Ports { base: 18000 };
        let mut all: Vec<SocketAddr> = p.all().into_iter().chain(p.validation()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 7);
        let text = gateway_validated_config(p, "demo");
        // The gateway itself accepts it, with the route validating OpenAI requests.
        let r = gateway::generation::Resolved::from_str(&text, "gateway.toml")
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            r.config.routes[0].protocol,
            gateway::config::Protocol::Openai
        );
        assert_eq!(r.config.models[0].name, "demo");
        assert_eq!(r.listen, vec![p.gateway_validated()]);
        assert_eq!(r.admin, p.gateway_validated_admin());
    }

    #[test]
    fn limited_config_is_the_validated_one_plus_limits() {
        let p = Ports { base: 18000 };
        let text = gateway_limited_config(p, "demo");
        let r = gateway::generation::Resolved::from_str(&text, "gateway.toml")
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(r.listen, vec![p.gateway()]);
        assert_eq!(r.admin, p.gateway_admin());
        assert!(r.config.ratelimit.model.is_some() && r.config.ratelimit.escalation.enabled);
        assert_eq!(r.config.models[0].name, "demo");
    }
}
