//! `gateway` command line: run, print the default config, check a config.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, DriverChoice, LogFormat, Workers, DEFAULT_CONFIG};
use crate::generation::Resolved;

#[derive(Parser, Debug)]
#[command(
    name = "gateway",
    version = env!("GATEWAY_VERSION"),
    about = "Inference gateway: a thread-per-core io_uring reverse proxy in front of GPU model servers",
    long_about = "Inference gateway: a thread-per-core io_uring reverse proxy in front of GPU model servers \
(vLLM, Triton, TGI, KServe). It terminates client HTTP/1.1 connections (TLS 1.3/1.2 with rustls on [tls] listen \
addresses), rejects malformed or smuggling-prone requests, authenticates callers ([authn]: JWT, API keys, client \
certificates) and applies [authz] rules (default deny), routes by host, path and method to a cluster of backends, \
checks OpenAI-compatible and KServe v2 \
requests against a model catalogue (model, version, limits, tensor shapes, JSON Schemas), enforces [ratelimit] \
limits per client address, principal, tenant, route and model (requests, token cost corrected from the reported \
usage, concurrency, day/month quotas; fleet-wide with Redis; repeat offenders blocked at the NIC), sends each request \
to the GPU backend of its model's pool that will serve it soonest ([clusters.X.balance]: load scraped from \
vLLM/SGLang/TGI/Triton metrics, time to first token measured on streams, prefix-cache-aware routing with \
algorithm = \"prefix_aware\", health checks, ejection, canary splits, shadow traffic), and streams request \
and response bodies (SSE token streams included) in both directions with bounded memory. Errors are written \
the way each route's clients expect them (OpenAI's error object on openai routes, {\"error\": \"...\"} on \
kserve routes); OpenTelemetry traces go to [tracing] otlp_endpoint.\n\n\
Quick start, no config file:\n  gateway run --listen 0.0.0.0:8080 --upstream 10.0.0.5:8000,10.0.0.6:8000\n\n\
With a config file (see `gateway config default` for every key, commented):\n  gateway run --config /etc/gateway.toml\n\n\
Admin endpoints (default 127.0.0.1:9901): GET /dashboard (live, in a browser), GET /metrics (Prometheus), \
GET /healthz, GET /readyz, \
GET|POST /xdp/blocks, DELETE /xdp/blocks/ADDR, GET /xdp/stats, GET /xdp/watch, POST /tls/reload, GET /authn/keys, \
POST /authn/revoke, GET /ratelimit/quotas, DELETE /ratelimit/quotas/TENANT, GET /balance/backends, POST /balance/drain, \
POST /balance/undrain (the control plane needs the admin scope once [authn] is configured).\n\
XDP front door ([xdp] interfaces): blocked and over-quota client addresses are dropped at the NIC; \
`gateway xdp block ADDR --ttl 10m`, `gateway xdp unblock ADDR`, `gateway xdp list`, `gateway xdp stats`, \
`gateway xdp watch` (sampled verdicts as they happen).\n\
SIGHUP: reload the config file (refused, with the errors logged, if it doesn't validate).\n\
SIGTERM or SIGINT: stop accepting, drain in-flight requests for server.shutdown_grace, exit."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway (the embedded default config when no --config is given).
    Run(RunArgs),
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Check a config file: exit 0 if valid, 1 with one message per problem (file:line: `key`: what to do).
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Print the man page (roff), e.g. `gateway man > gateway.1`.
    Man,
    /// Print shell completions: bash, zsh, fish, elvish or powershell.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The XDP front door's blocklist and counters, through a running gateway's admin API.
    Xdp {
        /// The running gateway's admin address (admin.listen).
        #[arg(long, default_value = "127.0.0.1:9901", global = true)]
        admin: String,
        /// A JWT or API key with the admin scope, sent as `Authorization: Bearer`
        /// (needed once [authn] is configured).
        #[arg(
            long,
            env = "GATEWAY_ADMIN_BEARER",
            global = true,
            hide_env_values = true
        )]
        bearer: Option<String>,
        #[command(subcommand)]
        command: XdpCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum XdpCommand {
    /// Block a client address (IPv4 or IPv6) at the NIC, and at accept.
    Block {
        addr: String,
        /// How long, e.g. "90s", "10m", "12h" (default: xdp.default_block_ttl).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Remove a block added with `block` (or by the rate limiter).
    Unblock { addr: String },
    /// List blocked addresses with their reason and seconds left.
    List,
    /// Where XDP is attached (or why not) and its packet counters by verdict and reason.
    Stats,
    /// Watch the front door's verdicts as they happen: a random sample of the
    /// packets it drops (and, with --passes, passes) on the gateway's ports,
    /// rate-limited. Sampling is on only while a watch runs.
    Watch {
        /// Sample one verdict in N (1: every verdict, up to the rate).
        #[arg(long, default_value_t = 1)]
        one_in: u32,
        /// Also show packets passed on the gateway's ports, not only drops.
        #[arg(long)]
        passes: bool,
        /// Most verdicts per second (per CPU in the kernel, and for this
        /// watch); at most [xdp] watch_max_per_second.
        #[arg(long, default_value_t = 20)]
        rate: u32,
        /// Stop after this many seconds (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        seconds: u64,
        /// Print each line as the admin API sends it (JSON lines).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the embedded default config, every key commented.
    Default,
}

#[derive(clap::Args, Debug, Default)]
pub struct RunArgs {
    /// TOML config file.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Listen address(es), replacing server.listen (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Quick start: proxy every request to these backends (comma-separated host:port),
    /// replacing the config's clusters and routes.
    #[arg(long, value_delimiter = ',')]
    pub upstream: Vec<String>,
    /// Worker threads: "auto" or a number (server.workers).
    #[arg(long)]
    pub workers: Option<String>,
    /// I/O driver (server.driver).
    #[arg(long, value_enum)]
    pub driver: Option<DriverChoice>,
    /// Admin listener address (admin.listen).
    #[arg(long)]
    pub admin: Option<String>,
    /// Log format (log.format).
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. "info" or "gateway=debug" (log.level).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Turn the per-request access log off (log.access_log = false).
    #[arg(long)]
    pub no_access_log: bool,
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Config {
            command: ConfigCommand::Default,
        } => {
            print!("{DEFAULT_CONFIG}");
            0
        }
        Command::CheckConfig { file } => match Resolved::from_file(&file) {
            Ok(r) => {
                println!(
                    "{}: ok ({} listener(s), {} cluster(s), {} route(s))",
                    file.display(),
                    r.listen.len(),
                    r.clusters.len(),
                    r.config.routes.len()
                );
                0
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
        Command::Run(args) => run(args),
        Command::Man => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut out) {
                Ok(()) => {
                    use std::io::Write;
                    let _ = std::io::stdout().write_all(&out);
                    0
                }
                Err(e) => {
                    eprintln!("cannot render the man page: {e}");
                    1
                }
            }
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            use std::io::Write;
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "gateway", &mut out);
            let _ = std::io::stdout().write_all(&out);
            0
        }
        Command::Xdp {
            admin,
            bearer,
            command,
        } => xdp_command(&admin, bearer.as_deref(), command),
    }
}

/// `gateway xdp ...`: one request to the admin API; prints its JSON answer.
fn xdp_command(admin: &str, bearer: Option<&str>, command: XdpCommand) -> i32 {
    if let XdpCommand::Watch {
        one_in,
        passes,
        rate,
        seconds,
        json,
    } = command
    {
        let path = format!(
            "/xdp/watch?one_in={one_in}&passes={passes}&max_per_second={rate}&seconds={seconds}"
        );
        return match crate::xdp::watch::follow(admin, &path, bearer, json) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("gateway xdp watch: cannot reach the admin API at {admin} ({e}); is the gateway running, and is --admin its admin.listen?");
                1
            }
        };
    }
    let (method, path, body) = match &command {
        XdpCommand::Block { addr, ttl } => {
            let mut b = serde_json::json!({ "addr": addr });
            if let Some(t) = ttl {
                b["ttl"] = serde_json::json!(t);
            }
            ("POST", "/xdp/blocks".to_string(), b.to_string())
        }
        XdpCommand::Unblock { addr } => ("DELETE", format!("/xdp/blocks/{addr}"), String::new()),
        XdpCommand::List => ("GET", "/xdp/blocks".to_string(), String::new()),
        XdpCommand::Stats => ("GET", "/xdp/stats".to_string(), String::new()),
        XdpCommand::Watch { .. } => unreachable!("handled above"),
    };
    match admin_request(admin, method, &path, &body, bearer) {
        Ok((status, text)) => {
            let pretty = serde_json::from_str::<serde_json::Value>(&text)
                .map(|v| serde_json::to_string_pretty(&v).unwrap_or(text.clone()))
                .unwrap_or(text);
            if (200..300).contains(&status) {
                println!("{pretty}");
                0
            } else {
                eprintln!("gateway xdp: the gateway answered {status}: {pretty}");
                1
            }
        }
        Err(e) => {
            eprintln!("gateway xdp: cannot reach the admin API at {admin} ({e}); is the gateway running, and is --admin its admin.listen?");
            1
        }
    }
}

fn admin_request(
    admin: &str,
    method: &str,
    path: &str,
    body: &str,
    bearer: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let addr = admin
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut c = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let auth = bearer
        .map(|b| format!("authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nhost: {admin}\r\ncontent-type: application/json\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    c.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))?;
    Ok((status, body.to_string()))
}

/// Load the config, apply CLI overrides, validate, run.
fn run(args: RunArgs) -> i32 {
    let name = config::source_name(args.config.as_ref());
    let loaded = match &args.config {
        Some(p) => Config::load(p),
        None => Config::parse(DEFAULT_CONFIG, &name).map(|c| (c, DEFAULT_CONFIG.to_string())),
    };
    let (mut cfg, text) = match loaded {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    if let Err(msg) = apply_overrides(&mut cfg, &args) {
        eprintln!("command line: {msg}");
        return 1;
    }
    let resolved = match Resolved::from_config(cfg, &text, &name) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let _guard = crate::telemetry::init(&resolved.config.log);
    tracing::info!(config = %name, "starting");
    // SIGHUP re-reads the same file and re-applies the same command line.
    let reload: Option<crate::server::Reloader> = args.config.clone().map(|path| {
        let reload: crate::server::Reloader = Box::new(move || {
            let (mut cfg, text) = Config::load(&path)?;
            apply_overrides(&mut cfg, &args).map_err(|m| {
                crate::config::ConfigErrors(vec![crate::config::ConfigError {
                    file: "command line".into(),
                    line: None,
                    key: String::new(),
                    message: m,
                }])
            })?;
            Resolved::from_config(cfg, &text, &path.display().to_string())
        });
        reload
    });
    match crate::server::run(resolved, reload) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed to start");
            eprintln!("gateway: {e}");
            1
        }
    }
}

pub fn apply_overrides(cfg: &mut Config, a: &RunArgs) -> Result<(), String> {
    if !a.listen.is_empty() {
        cfg.server.listen = a.listen.clone();
    }
    if !a.upstream.is_empty() {
        cfg.clusters.clear();
        cfg.clusters.insert(
            "default".into(),
            config::ClusterConfig {
                backends: a.upstream.clone(),
                pool_max_idle: 64,
                pool_idle_timeout: std::time::Duration::from_secs(4),
                max_connections: 512,
                balance: Default::default(),
                queue: None,
                tls: None,
                http: config::UpstreamHttp::Http1,
                max_streams_per_connection: 100,
            },
        );
        cfg.routes = vec![config::RouteConfig {
            name: Some("default".into()),
            host: None,
            path_prefix: Some("/".into()),
            path_exact: None,
            methods: None,
            cluster: "default".into(),
            max_request_body_bytes: None,
            timeouts: Default::default(),
            protocol: Default::default(),
            content_types: None,
            schema: None,
            response_drop_fields: Vec::new(),
            auth: None,
            anonymous: false,
            priority: None,
        }];
    }
    if let Some(w) = &a.workers {
        cfg.server.workers = match w.as_str() {
            "auto" => Workers::Auto,
            n => match n.parse::<usize>() {
                Ok(n) if n >= 1 => Workers::Count(n),
                _ => {
                    return Err(format!(
                        "--workers {w}: use \"auto\" or a number of at least 1"
                    ))
                }
            },
        };
    }
    if let Some(d) = a.driver {
        cfg.server.driver = d;
    }
    if let Some(x) = &a.admin {
        cfg.admin.listen = x.clone();
    }
    if let Some(f) = a.log_format {
        cfg.log.format = f;
    }
    if let Some(l) = &a.log_level {
        cfg.log.level = l.clone();
    }
    if a.no_access_log {
        cfg.log.access_log = false;
    }
    Ok(())
}
