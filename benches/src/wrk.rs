//! One run of `wrk`, with a Lua script whose `done` hook prints the summary as
//! one JSON line: wrk's own text output rounds and changes units, this does not.

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::procs::{pinned_set, stop_requested};
use crate::Result;

/// Marks the summary line among wrk's other output.
const MARKER: &str = "LOADBENCH_JSON ";

/// The body of every request: a minimal OpenAI-style chat completion.
pub const REQUEST_BODY: &str =
    r#"{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":1}"#;

/// Every request is a small chat-completion POST ([`REQUEST_BODY`] goes in for `__BODY__`); `done` prints the summary.
/// `%.0f` rather than `%d`: the numbers are Lua floats, and `%d` rejects
/// non-integral floats on Lua 5.3+ (wrk embeds LuaJIT, but be safe).
const SCRIPT: &str = r#"-- Written by loadbench: a chat-completion POST, and one JSON line when done.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '__BODY__'
"#;

/// wrk's `done` hook: the summary as one JSON line after [`MARKER`].
const DONE: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'LOADBENCH_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
    '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},' ..
    '"latency_us":{"p50":%.0f,"p90":%.0f,"p99":%.0f,"mean":%.1f,"max":%.0f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"#;

pub fn write_script(run_dir: &Path) -> Result<PathBuf> {
    write_custom_script(
        run_dir,
        "report.lua",
        &SCRIPT.replace("__BODY__", REQUEST_BODY),
    )
}

/// A wrk script of `requests` (Lua that sets up the requests) plus the
/// summary hook every run parses.
pub fn write_custom_script(run_dir: &Path, name: &str, requests: &str) -> Result<PathBuf> {
    let p = run_dir.join(name);
    fs::write(&p, format!("{requests}\n{DONE}")).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(p)
}

/// What one wrk run measured.
#[derive(Debug, Clone, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub duration_us: u64,
    pub bytes: u64,
    pub errors_connect: u64,
    pub errors_read: u64,
    pub errors_write: u64,
    pub errors_timeout: u64,
    /// Responses with a status of 400 or more (wrk's `errors.status`).
    pub non_2xx: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub max_us: f64,
}

impl WrkResult {
    pub fn rps(&self) -> f64 {
        if self.duration_us == 0 {
            0.0
        } else {
            self.requests as f64 * 1e6 / self.duration_us as f64
        }
    }

    /// Socket-level errors (connect, read, write, timeout), not counting bad statuses.
    pub fn socket_errors(&self) -> u64 {
        self.errors_connect + self.errors_read + self.errors_write + self.errors_timeout
    }

    fn parse(line: &str) -> Result<WrkResult> {
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("bad summary line {line:?}: {e}"))?;
        let n =
            |path: &[&str]| -> f64 { path.iter().fold(&v, |v, k| &v[*k]).as_f64().unwrap_or(0.0) };
        Ok(WrkResult {
            requests: n(&["requests"]) as u64,
            duration_us: n(&["duration_us"]) as u64,
            bytes: n(&["bytes"]) as u64,
            errors_connect: n(&["errors", "connect"]) as u64,
            errors_read: n(&["errors", "read"]) as u64,
            errors_write: n(&["errors", "write"]) as u64,
            errors_timeout: n(&["errors", "timeout"]) as u64,
            non_2xx: n(&["errors", "status"]) as u64,
            p50_us: n(&["latency_us", "p50"]),
            p90_us: n(&["latency_us", "p90"]),
            p99_us: n(&["latency_us", "p99"]),
            mean_us: n(&["latency_us", "mean"]),
            max_us: n(&["latency_us", "max"]),
        })
    }
}

/// How to drive the load.
pub struct Load<'a> {
    pub wrk: &'a Path,
    pub taskset: Option<&'a Path>,
    /// Where wrk runs (its threads float over these); empty: not pinned.
    pub cpus: &'a [usize],
    /// wrk threads (`-t`); at most `connections`.
    pub threads: u32,
    pub script: &'a Path,
    pub connections: u32,
    /// "http", or "https" (wrk's OpenSSL client; keep-alive, one handshake per connection).
    pub scheme: &'a str,
    /// The request target.
    pub path: &'a str,
}

impl Load<'_> {
    /// `wrk -tT -cC -dSs --latency -s script http://addr/v1/chat/completions`, bounded in time.
    pub fn run(&self, addr: SocketAddr, seconds: u64) -> Result<WrkResult> {
        let mut cmd = pinned_set(self.cpus, self.taskset, self.wrk);
        cmd.args([
            format!("-t{}", self.threads.max(1)).as_str(),
            &format!("-c{}", self.connections),
            &format!("-d{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(self.script)
        .arg(format!("{}://{addr}{}", self.scheme, self.path))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("cannot start wrk: {e}"))?;
        // wrk stops itself after `seconds`; past this something is wrong.
        let deadline = Instant::now() + Duration::from_secs(seconds + 15);
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                break status;
            }
            if stop_requested() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(if stop_requested() {
                    "interrupted".into()
                } else {
                    "wrk did not finish in time".into()
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The output is small (a few KiB): reading after exit cannot deadlock on a full pipe.
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut s) = child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        if let Some(mut s) = child.stderr.take() {
            let _ = s.read_to_string(&mut err);
        }
        let line = out.lines().find_map(|l| l.strip_prefix(MARKER));
        match (status.success(), line) {
            (true, Some(line)) => WrkResult::parse(line),
            _ => Err(format!(
                "wrk failed ({status}): {}{}",
                out.trim(),
                err.trim()
            )),
        }
    }
}
