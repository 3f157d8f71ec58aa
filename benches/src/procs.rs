//! Child processes for the harness: started with their output in a log file,
//! probed until they answer, measured through /proc, and always stopped, on
//! success, error, panic or Ctrl-C alike ([`Server`]'s `Drop`).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::Result;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    // An atomic store is async-signal-safe; everything else happens in the main loop.
    STOP.store(true, Ordering::SeqCst);
}

/// Turn SIGINT and SIGTERM into [`stop_requested`], so the harness unwinds
/// through its guards instead of dying with servers still running.
pub fn install_stop_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t);
        }
    }
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Sleep up to `d`, returning early (with an error) on Ctrl-C.
pub fn sleep(d: Duration) -> Result {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop_requested() {
            return Err("interrupted".into());
        }
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

/// Find a program on PATH or in the sbin directories (Debian puts haproxy and nginx in /usr/sbin).
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// First line of what `program args` prints on stdout or stderr (`nginx -v` uses stderr).
pub fn version_line(program: &Path, args: &[&str]) -> String {
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => {
            let text = [out.stdout, out.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        }
        Err(e) => format!("unknown ({e})"),
    }
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills a zeroed cpu_set_t of the size we pass;
    // CPU_ISSET reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Build a command, run under `taskset -c CPU` when a CPU is given.
pub fn pinned(cpu: Option<usize>, taskset: Option<&Path>, program: &Path) -> Command {
    pinned_set(cpu.as_slice(), taskset, program)
}

/// Build a command, run under `taskset -c A,B,…` when CPUs are given: the
/// process and its threads (or workers) may run on any of them. Empty: not pinned.
pub fn pinned_set(cpus: &[usize], taskset: Option<&Path>, program: &Path) -> Command {
    match taskset {
        Some(taskset) if !cpus.is_empty() => {
            let mut c = Command::new(taskset);
            c.arg("-c").arg(cpu_list(cpus)).arg(program);
            c
        }
        _ => Command::new(program),
    }
}

/// CPUs as taskset and people write them: `0,2,3`.
pub fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Fail when something already answers on `addr`: a leftover server would be
/// measured instead of ours.
pub fn ensure_port_free(addr: SocketAddr) -> Result {
    match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        Ok(_) => Err(format!(
            "{addr} is already in use; stop whatever listens there (a previous loadbench?)"
        )),
        Err(_) => Ok(()),
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of one process (all its threads), in clock ticks: fields 14
/// and 15 of /proc/PID/stat, counted after the `)` that ends the command name.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // `after` starts at field 3 (state): utime is the 12th field from here.
    let mut f = after.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Live children of `pid` (nginx's workers), found by scanning /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| parent_pid(p) == Some(pid))
        .collect()
}

/// A server started by the harness. Dropping it stops it: SIGTERM, a grace
/// period, then SIGKILL, for it and (if it had to be killed) its children.
pub struct Server {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Start `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Server> {
        let out = File::create(log)
            .map_err(|e| format!("{name}: cannot create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| format!("{name}: {e}"))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .map_err(|e| format!("{name}: cannot start {:?}: {e}", cmd.get_program()))?;
        Ok(Server {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of the server's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n    ");
        format!("{} (log {}):\n    {tail}", self.name, self.log.display())
    }

    /// CPU seconds used so far by the process, plus its live children when asked
    /// (nginx: master + workers). `None` if /proc cannot be read.
    pub fn cpu_seconds(&self, with_children: bool) -> Option<f64> {
        let pid = self.pid();
        let mut ticks = cpu_ticks(pid)?;
        if with_children {
            ticks += children_of(pid)
                .into_iter()
                .filter_map(cpu_ticks)
                .sum::<u64>();
        }
        Some(ticks as f64 / clock_ticks_per_second())
    }

    /// Poll `GET path` on `addr` until it answers 200, the process exits, or `limit` passes.
    pub fn wait_ready(&mut self, addr: SocketAddr, path: &str, limit: Duration) -> Result {
        let start = Instant::now();
        let mut last = String::from("no attempt yet");
        while start.elapsed() < limit {
            if stop_requested() {
                return Err("interrupted".into());
            }
            if let Some(status) = self.exited() {
                return Err(format!(
                    "exited during startup ({status}); {}",
                    self.log_tail(15)
                ));
            }
            match http_status(addr, path) {
                Ok(200) => return Ok(()),
                Ok(code) => last = format!("answered {code}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "not ready on {addr} after {limit:?} (last: {last}); {}",
            self.log_tail(15)
        ))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let pid = self.pid();
        let children = children_of(pid);
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for c in children {
            if parent_pid(c).is_some() {
                // SAFETY: kill(2); the pid was our child's child a moment ago.
                unsafe {
                    libc::kill(c as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }
}

/// One `GET path` with `Connection: close`: the status code, or why not.
pub fn http_status(addr: SocketAddr, path: &str) -> Result<u16> {
    request_status(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
}

/// One `POST path` of a JSON body with `Connection: close`: the status code, or why not.
pub fn post_json_status(addr: SocketAddr, path: &str, body: &str) -> Result<u16> {
    request_status(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn request_status(addr: SocketAddr, request: &str) -> Result<u16> {
    let timeout = Duration::from_millis(500);
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|_| s.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    s.write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let head = std::str::from_utf8(&buf[..n]).unwrap_or("");
    head.strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {head:?}"))
}
