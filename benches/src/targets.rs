//! The servers under test: the nginx backend, and the three proxies in front
//! of it, each configured for one worker on one core (`--workers`: the
//! gateway with N, the backend with one per client CPU), keep-alive on both
//! sides, no access logging. Config files, logs, pid files and nginx's temp
//! directories all live in the run directory, never in /etc or /var.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::procs::{pinned, pinned_set, Server};
use crate::Result;

/// Loopback ports, all derived from one base (default 18000): backend = base,
/// gateway = base+80, HAProxy = base+81, nginx = base+82, gateway admin = base+1901;
/// for `--validation`, the validating gateway = base+83, its admin = base+1902;
/// for `--workers`, the i-th gateway of the list = base+100+i, its admin = base+1910+i.
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
    /// `--baseline`: the gateway built from another binary, for before/after.
    pub fn gateway_baseline(self) -> SocketAddr {
        self.at(84)
    }
    pub fn gateway_baseline_admin(self) -> SocketAddr {
        self.at(1903)
    }
    /// `--workers`: the gateway for the `i`-th worker count listed (at most
    /// [`MAX_SCALING_RUNS`] of them, so these stay clear of every other port).
    pub fn gateway_scaled(self, i: usize) -> SocketAddr {
        self.at(100 + i as u16)
    }
    pub fn gateway_scaled_admin(self, i: usize) -> SocketAddr {
        self.at(1910 + i as u16)
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

/// How many worker counts one `--workers` run may list.
pub const MAX_SCALING_RUNS: usize = 8;

/// What the backend answers to every request: a minimal chat completion.
pub const BACKEND_BODY: &str = r#"{"id":"cmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}"#;

/// Programs the harness runs, when found.
#[derive(Clone)]
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
/// paths under `dir`, in the foreground (`daemon off`), master + `workers`
/// workers, all allowed on `cpus` (empty: not pinned).
fn nginx(
    tools: &Tools,
    cpus: &[usize],
    workers: usize,
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
         worker_processes {workers};\n\
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
    let mut cmd = pinned_set(cpus, tools.taskset.as_deref(), nginx);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.join("error.log"));
    Server::spawn(name, cmd, &dir.join("stdout.log"))
}

/// nginx answering every request itself with [`BACKEND_BODY`]: one worker on the client CPU.
pub fn start_backend(tools: &Tools, place: Placement, run_dir: &Path) -> Result<Server> {
    start_backend_on(tools, place.ports, place.client_cpu.as_slice(), 1, run_dir)
}

/// The backend with `workers` nginx workers allowed on `cpus`: `--workers`
/// sizes it to the client CPUs so that it keeps up with several gateway
/// workers. With more than one worker it listens with `reuseport`, so the
/// kernel spreads wrk's connections evenly over the workers (without it, the
/// first worker awake takes most of them and the others idle).
pub fn start_backend_on(
    tools: &Tools,
    ports: Ports,
    cpus: &[usize],
    workers: usize,
    run_dir: &Path,
) -> Result<Server> {
    let body = BACKEND_BODY;
    let listen = ports.backend();
    let reuseport = if workers > 1 { " reuseport" } else { "" };
    let http = format!(
        "    default_type application/json;\n\
         \x20   server {{\n\
         \x20       listen {listen}{reuseport};\n\
         \x20       location / {{\n\
         \x20           return 200 '{body}';\n\
         \x20       }}\n\
         \x20   }}\n"
    );
    nginx(
        tools,
        cpus,
        workers,
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
        place.proxy_cpu.as_slice(),
        1,
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
    let p = place.ports;
    quick_start_gateway(
        tools,
        "gateway",
        p.gateway(),
        p.gateway_admin(),
        p.backend(),
        1,
        place.proxy_cpu.as_slice(),
        run_dir,
    )
}

/// `loadbench --baseline BIN`: the same quick-start gateway as
/// [`start_gateway`], from another binary (`$GATEWAY_BASELINE_BIN`) on its
/// own ports: a before/after comparison measured in the same rounds, so
/// the machine's drift between runs cancels out.
pub fn start_gateway_baseline(tools: &Tools, place: Placement, run_dir: &Path) -> Result<Server> {
    let bin = std::env::var_os("GATEWAY_BASELINE_BIN").ok_or("GATEWAY_BASELINE_BIN is not set")?;
    let tools = Tools {
        gateway: Some(PathBuf::from(bin)),
        ..tools.clone()
    };
    let p = place.ports;
    quick_start_gateway(
        &tools,
        "gateway-baseline",
        p.gateway_baseline(),
        p.gateway_baseline_admin(),
        p.backend(),
        1,
        place.proxy_cpu.as_slice(),
        run_dir,
    )
}

/// `loadbench --workers`: the same quick-start gateway as [`start_gateway`]
/// with `workers` workers, allowed on `cpus`, on the `i`-th scaling ports.
/// The gateway pins worker k to the k-th allowed CPU (wrapping around), so
/// with as many CPUs as workers each worker has a CPU of its own.
pub fn start_gateway_scaled(
    tools: &Tools,
    ports: Ports,
    i: usize,
    workers: usize,
    cpus: &[usize],
    run_dir: &Path,
) -> Result<Server> {
    quick_start_gateway(
        tools,
        &format!("gateway-w{workers}"),
        ports.gateway_scaled(i),
        ports.gateway_scaled_admin(i),
        ports.backend(),
        workers,
        cpus,
        run_dir,
    )
}

/// `gateway run --listen L --upstream B --workers N --admin A --no-access-log`
/// under taskset, logging to `run_dir/name/gateway.log`.
#[allow(clippy::too_many_arguments)]
fn quick_start_gateway(
    tools: &Tools,
    name: &str,
    listen: SocketAddr,
    admin: SocketAddr,
    backend: SocketAddr,
    workers: usize,
    cpus: &[usize],
    run_dir: &Path,
) -> Result<Server> {
    let gateway = tools.gateway.as_deref().ok_or("gateway binary not found")?;
    let dir = run_dir.join(name);
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut cmd = pinned_set(cpus, tools.taskset.as_deref(), gateway);
    cmd.arg("run")
        .args([
            "--listen",
            &listen.to_string(),
            "--upstream",
            &backend.to_string(),
        ])
        .args([
            "--workers",
            &workers.to_string(),
            "--admin",
            &admin.to_string(),
            "--no-access-log",
        ]);
    Server::spawn(name, cmd, &dir.join("gateway.log"))
}

/// Where `loadbench --workers` runs things, fixed for the whole run so that
/// every worker count meets the same client side.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingPlacement {
    /// The backend's nginx workers and wrk's threads float over these (empty: not pinned).
    pub client: Vec<usize>,
    /// Per worker count listed, in the same order.
    pub gateways: Vec<GatewayCpus>,
}

/// The CPUs one gateway of a `--workers` run may use.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayCpus {
    pub workers: usize,
    /// Empty: not pinned.
    pub cpus: Vec<usize>,
    /// Some of `cpus` are the client's too (or nothing is pinned): the backend
    /// and wrk compete with the gateway for them.
    pub shared: bool,
    /// More workers than `cpus`: some workers share a CPU.
    pub oversubscribed: bool,
}

/// Split the allowed CPUs between the client side (backend + wrk) and the
/// gateway. The client gets what the largest gateway leaves, at least one
/// CPU, and keeps it for every worker count (the same client for all, so the
/// ratios compare the gateway alone); the gateway with N workers gets N of
/// the other CPUs. When there are not N others (fewer than N + 1 CPUs) it
/// takes client CPUs too, and that figure is flagged `shared`: there the
/// gateway's extra workers take CPU from the load generator and the backend.
/// Without `pin` (no taskset) or with one CPU, nothing is pinned.
pub fn scaling_placement(allowed: &[usize], workers: &[usize], pin: bool) -> ScalingPlacement {
    let max = workers.iter().copied().max().unwrap_or(1);
    if !pin || allowed.len() < 2 {
        return ScalingPlacement {
            client: Vec::new(),
            gateways: workers
                .iter()
                .map(|&n| GatewayCpus {
                    workers: n,
                    cpus: Vec::new(),
                    shared: true,
                    oversubscribed: n > allowed.len().max(1),
                })
                .collect(),
        };
    }
    let k = allowed.len().saturating_sub(max).max(1);
    let (client, rest) = allowed.split_at(k);
    // Own CPUs first, then the client's, from the last one back (the first
    // client CPU, where the default mode puts wrk, is taken last).
    let order: Vec<usize> = rest
        .iter()
        .copied()
        .chain(client.iter().rev().copied())
        .collect();
    let gateways = workers
        .iter()
        .map(|&n| {
            let mut cpus: Vec<usize> = order.iter().copied().take(n).collect();
            cpus.sort_unstable();
            GatewayCpus {
                workers: n,
                shared: n > rest.len(),
                oversubscribed: n > allowed.len(),
                cpus,
            }
        })
        .collect();
    ScalingPlacement {
        client: client.to_vec(),
        gateways,
    }
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
        all.extend(
            (0..MAX_SCALING_RUNS).flat_map(|i| [p.gateway_scaled(i), p.gateway_scaled_admin(i)]),
        );
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 7 + 2 * MAX_SCALING_RUNS);
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

    #[test]
    fn scaling_placement_keeps_the_client_fixed() {
        // Enough CPUs: the client keeps what 4 workers leave, each gateway its own.
        let p = scaling_placement(&[0, 1, 2, 3, 4, 5, 6, 7], &[1, 2, 4], true);
        assert_eq!(p.client, vec![0, 1, 2, 3]);
        let g: Vec<(Vec<usize>, bool)> = p
            .gateways
            .iter()
            .map(|g| (g.cpus.clone(), g.shared))
            .collect();
        assert_eq!(
            g,
            vec![
                (vec![4], false),
                (vec![4, 5], false),
                (vec![4, 5, 6, 7], false)
            ]
        );
        // Two CPUs: N = 1 as in the default mode, N = 2 shares wrk's CPU.
        let p = scaling_placement(&[0, 1], &[1, 2], true);
        assert_eq!(p.client, vec![0]);
        assert_eq!(p.gateways[0].cpus, vec![1]);
        assert!(!p.gateways[0].shared);
        assert_eq!(p.gateways[1].cpus, vec![0, 1]);
        assert!(p.gateways[1].shared && !p.gateways[1].oversubscribed);
        // More workers than CPUs.
        let p = scaling_placement(&[2, 3], &[1, 4], true);
        assert_eq!(p.gateways[1].cpus, vec![2, 3]);
        assert!(p.gateways[1].oversubscribed);
        // No taskset: nothing pinned, every figure shared.
        let p = scaling_placement(&[0, 1, 2, 3], &[1, 2], false);
        assert!(p.client.is_empty() && p.gateways.iter().all(|g| g.cpus.is_empty() && g.shared));
    }
}
