//! Process lifecycle: one pinned worker thread per core, each with its own
//! monoio runtime (io_uring, or epoll when io_uring can't be set up), its own
//! listeners and upstream pool; the admin listener; signals and the
//! graceful drain.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use monoio::{IoUringDriver, LegacyDriver, Runtime};

use crate::admin;
use crate::config::DriverChoice;
use crate::generation::Resolved;
use crate::listener;
use crate::metrics::{Metrics, FLUSH_EVERY};
use crate::shutdown::Shutdown;
use crate::worker::{Shared, Worker};
use crate::xdp::FrontDoor;

/// io_uring submission queue entries per worker.
const URING_ENTRIES: u32 = 2048;

/// State the admin listener reports (`/readyz`).
pub struct Health {
    pub workers: usize,
    pub started: AtomicUsize,
    pub draining: AtomicBool,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.started.load(Ordering::SeqCst) == self.workers && !self.draining.load(Ordering::SeqCst)
    }
}

enum Msg {
    Started { worker: usize, driver: &'static str },
    Failed { worker: usize, error: String },
    Done { worker: usize },
    Signal(i32),
}

/// Re-reads the configuration (the file, with the command line's overrides).
pub type Reloader = Box<dyn Fn() -> Result<Resolved, crate::config::ConfigErrors> + Send>;

/// The configuration in force, published to the workers on reload.
pub struct Control {
    current: Mutex<(u64, Arc<Resolved>)>,
    event: event_listener::Event,
    workers: usize,
    metrics: Arc<Metrics>,
    shutdown: Arc<Shutdown>,
    process: crate::worker::Process,
}

impl Control {
    fn snapshot(&self) -> (u64, Arc<Resolved>) {
        let g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        (g.0, g.1.clone())
    }

    fn publish(&self, r: Resolved) -> u64 {
        let mut g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        g.1 = Arc::new(r);
        let generation = g.0;
        // A revocation that landed while this generation's key table was
        // being built reached only the old one: apply them all (quietly
        // for the ones it never had).
        if let Some(a) = &g.1.authn {
            for d in crate::revocations::all() {
                a.revoked_elsewhere(d, "fleet");
            }
        }
        drop(g);
        self.event.notify(usize::MAX);
        generation
    }

    /// A worker's own copy of the configuration-derived state.
    fn build(&self, r: &Resolved, generation: u64) -> Shared {
        Shared::new(
            r,
            self.workers,
            self.metrics.clone(),
            self.shutdown.clone(),
            generation,
            &self.process,
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Startup(String),
}

/// Run the gateway until SIGTERM/SIGINT and the drain that follows. SIGHUP
/// reloads the configuration with `reload` (when given).
pub fn run(r: Resolved, reload: Option<Reloader>) -> Result<(), RunError> {
    let n = r.config.server.workers.resolve();
    raise_fd_limit(r.config.server.max_connections);
    let metrics = Metrics::new();
    let shutdown = Shutdown::new();
    // Stage 0 first: blocks hold before the first connection is accepted.
    let front_door = start_front_door(&r, &metrics)?;
    // Detach at the NIC on every way out of here (bpf links also go when the process dies).
    let _detach = DetachOnExit(front_door.clone());
    // Rate limits: state that outlives reloads; quotas reloaded from disk.
    let limiter =
        crate::ratelimit::Limiter::start(&r, front_door.clone(), metrics.clone(), shutdown.clone())
            .map_err(RunError::Startup)?;
    let _save = SaveOnExit(limiter.clone());
    start_authn(&r)?;
    start_revocations(&r)?;
    let control = Arc::new(Control {
        current: Mutex::new((0, Arc::new(r.clone()))),
        event: event_listener::Event::new(),
        workers: n,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        process: crate::worker::Process {
            front_door: front_door.clone(),
            limiter: limiter.clone(),
            loads: Arc::new(crate::balance::Registry::default()),
            tracer: crate::otel::Tracer::start(&r.config.tracing, metrics.clone())
                .map_err(|e| RunError::Startup(format!("cannot start the OTLP exporter: {e}")))?,
        },
    });
    {
        // Revocations the fleet makes reach the key table in force.
        let hooked = control.clone();
        crate::revocations::set_hook(Box::new(move |d| {
            if let Some(a) = hooked.snapshot().1.authn.as_ref() {
                a.revoked_elsewhere(d, "fleet");
            }
        }));
        // What the Redis thread learned before the hook was there.
        if let Some(a) = control.snapshot().1.authn.as_ref() {
            for d in crate::revocations::all() {
                a.revoked_elsewhere(d, "fleet");
            }
        }
    }
    spawn_balance_scraper(&control, metrics.clone())?;
    if !r.config.ratelimit.redis.address.is_empty() {
        // Prefix-aware clusters share their placements with the fleet.
        crate::balance::fleet::spawn(
            control.process.loads.clone(),
            r.config.ratelimit.redis.clone(),
            metrics.clone(),
            shutdown.clone(),
            crate::worker::random_u64(),
        )
        .map_err(|e| RunError::Startup(format!("cannot start the prefix fleet sync: {e}")))?;
    }
    spawn_tls_watch(&control, metrics.clone())?;
    let health = Arc::new(Health {
        workers: n,
        started: AtomicUsize::new(0),
        draining: AtomicBool::new(false),
    });
    spawn_admin(&r, &control, &health)?;

    let (tx, rx) = mpsc::channel::<Msg>();
    spawn_workers(&r, n, &control, &tx)?;
    spawn_signal_thread(&tx)?;
    if reload.is_some() {
        spawn_dns_refresh(&control, &r, tx.clone())?;
    }
    drop(tx);

    Supervisor {
        r: &r,
        health: &health,
        control: &control,
        reloader: reload.as_ref(),
    }
    .supervise(&rx)
}

/// Raise the open-files soft limit to the hard limit, and say so when even
/// that is too low for `max_connections` (one descriptor per client
/// connection, plus room for backend connections and the process's own).
fn raise_fd_limit(max_connections: usize) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return;
        }
        if l.rlim_cur < l.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                l = raised;
            }
        }
    }
    let need = (max_connections as u64).saturating_add(1024);
    if l.rlim_cur < need {
        tracing::warn!(
            open_files = l.rlim_cur,
            needed = need,
            max_connections,
            "the open-files limit is below what server.max_connections needs (raise LimitNOFILE / ulimit -n): accepts will fail with EMFILE before the limit is reached"
        );
    }
}

/// Detaches the XDP program at the NIC when dropped.
struct DetachOnExit(Arc<FrontDoor>);

impl Drop for DetachOnExit {
    fn drop(&mut self) {
        self.0.detach();
    }
}

/// Saves the quota counts to the state file when dropped.
struct SaveOnExit(Arc<crate::ratelimit::Limiter>);

impl Drop for SaveOnExit {
    fn drop(&mut self) {
        self.0.persist();
    }
}

/// The front door (XDP, or accept-time checks only) with its maintenance
/// thread running, or why it could not start.
fn start_front_door(r: &Resolved, metrics: &Arc<Metrics>) -> Result<Arc<FrontDoor>, RunError> {
    let front_door = FrontDoor::start(r, metrics.clone());
    front_door
        .spawn_maintenance()
        .map_err(|e| RunError::Startup(format!("cannot start the XDP maintenance thread: {e}")))?;
    Ok(front_door)
}

/// Starts the JWKS refresher when authentication is configured (warns that
/// every route is open when it is not).
fn start_authn(r: &Resolved) -> Result<(), RunError> {
    if let Some(a) = &r.authn {
        a.spawn_refresher()
            .map_err(|e| RunError::Startup(format!("cannot start the JWKS refresher: {e}")))?;
    } else {
        tracing::warn!("no authentication configured ([authn]): every route is open to anyone who can reach it");
    }
    Ok(())
}

/// Reads the API keys revoked before a restart (`[authn] revocations_file`)
/// and takes them out of the key table before the first request.
fn start_revocations(r: &Resolved) -> Result<(), RunError> {
    let path = &r.config.authn.revocations_file;
    if path.as_os_str().is_empty() {
        return Ok(());
    }
    let n = crate::revocations::load(path).map_err(|e| {
        RunError::Startup(format!(
            "cannot read the revoked API keys from {}: {e} (fix or move it away; moving it away un-revokes them)",
            path.display()
        ))
    })?;
    if let Some(a) = &r.authn {
        for d in crate::revocations::all() {
            a.revoked_elsewhere(d, "file");
        }
    }
    tracing::info!(file = %path.display(), revoked = n, "revoked API keys restored");
    Ok(())
}

/// Binds the admin listener and serves it on its own thread, or says why
/// the address could not be listened on.
fn spawn_admin(r: &Resolved, control: &Arc<Control>, health: &Arc<Health>) -> Result<(), RunError> {
    let limiter = control.process.limiter.clone();
    let current: admin::Current = {
        let control = control.clone();
        Arc::new(move || control.snapshot().1)
    };
    let state = admin::State {
        metrics: control.metrics.clone(),
        health: health.clone(),
        front_door: control.process.front_door.clone(),
        limiter,
        loads: control.process.loads.clone(),
        current,
    };
    admin::spawn(r.admin, state)
        .map_err(|e| RunError::Startup(format!("cannot listen on admin address {}: {e}", r.admin)))
}

/// Starts the `n` worker threads (pinned round-robin to the allowed CPUs
/// when `pin_workers` is set), each reporting to `tx`.
fn spawn_workers(
    r: &Resolved,
    n: usize,
    control: &Arc<Control>,
    tx: &mpsc::Sender<Msg>,
) -> Result<(), RunError> {
    let cpus = if r.config.server.pin_workers {
        allowed_cpus()
    } else {
        Vec::new()
    };
    for id in 0..n {
        let tx = tx.clone();
        let control = control.clone();
        let cpu = (!cpus.is_empty()).then(|| cpus[id % cpus.len()]);
        let listen: Vec<(SocketAddr, bool)> = r
            .listen
            .iter()
            .map(|a| (*a, false))
            .chain(r.tls_listen.iter().map(|a| (*a, true)))
            .collect();
        let backlog = r.config.server.backlog;
        let driver = r.config.server.driver;
        std::thread::Builder::new()
            .name(format!("gateway-w{id}"))
            .spawn(move || worker_thread(id, control, cpu, driver, listen, backlog, tx))
            .map_err(|e| RunError::Startup(format!("cannot start worker thread: {e}")))?;
    }
    Ok(())
}

/// Forwards SIGTERM, SIGINT and SIGHUP to `tx` from a thread of their own.
fn spawn_signal_thread(tx: &mpsc::Sender<Msg>) -> Result<(), RunError> {
    let tx = tx.clone();
    let mut signals =
        signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
            .map_err(|e| RunError::Startup(format!("cannot install signal handlers: {e}")))?;
    std::thread::Builder::new()
        .name("gateway-signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if tx.send(Msg::Signal(s)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| RunError::Startup(format!("cannot start signal thread: {e}")))?;
    Ok(())
}

/// What the main thread watches once everything is started: worker
/// reports and signals, until the drain is over.
struct Supervisor<'a> {
    r: &'a Resolved,
    health: &'a Health,
    /// Workers, metrics, shutdown flag and process-wide state.
    control: &'a Control,
    reloader: Option<&'a Reloader>,
}

impl Supervisor<'_> {
    /// Handles worker reports and signals until the gateway exits: `Ok` after
    /// a drain (or a second signal), the error of a worker that failed to start.
    fn supervise(&self, rx: &mpsc::Receiver<Msg>) -> Result<(), RunError> {
        let mut started = 0;
        let mut done = 0;
        let mut deadline: Option<Instant> = None;
        loop {
            let Some(msg) = self.next(rx, deadline)? else {
                return Ok(());
            };
            match msg {
                Msg::Started { worker, driver } => {
                    started += 1;
                    tracing::debug!(worker, driver, "worker started");
                    if started == self.control.workers {
                        self.health
                            .started
                            .store(self.control.workers, Ordering::SeqCst);
                        tracing::info!(
                            workers = self.control.workers,
                            listen = ?self.r.listen,
                            admin = %self.r.admin,
                            "gateway ready"
                        );
                    }
                }
                Msg::Failed { worker, error } => {
                    self.control.shutdown.trigger();
                    return Err(RunError::Startup(format!("worker {worker}: {error}")));
                }
                Msg::Signal(libc::SIGHUP) => self.on_sighup(),
                Msg::Signal(s) => {
                    if deadline.is_none() {
                        deadline = Some(self.start_drain(s));
                    } else {
                        tracing::warn!(signal = s, "second signal: exiting now");
                        return Ok(());
                    }
                }
                Msg::Done { worker } => {
                    done += 1;
                    tracing::debug!(worker, "worker drained");
                    if done == self.control.workers {
                        tracing::info!("all workers drained; bye");
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The next report or signal; `None` once the drain's `deadline` has
    /// passed (what is left gets closed), an error when every worker is gone.
    fn next(
        &self,
        rx: &mpsc::Receiver<Msg>,
        deadline: Option<Instant>,
    ) -> Result<Option<Msg>, RunError> {
        match deadline {
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(m) => Ok(Some(m)),
                Err(_) => {
                    let open: i64 = (0..self.control.workers)
                        .map(|w| {
                            self.control
                                .metrics
                                .active_connections
                                .with_label_values(&[&w.to_string()])
                                .get()
                        })
                        .sum();
                    tracing::warn!(
                        open_connections = open,
                        grace_s = self.r.config.server.shutdown_grace.as_secs_f64(),
                        "shutdown grace period over; closing what is left"
                    );
                    Ok(None)
                }
            },
            None => match rx.recv() {
                Ok(m) => Ok(Some(m)),
                Err(_) => Err(RunError::Startup("all worker threads exited".into())),
            },
        }
    }

    /// SIGHUP: the re-read configuration published to the workers, or the
    /// running one kept (with the reasons logged) when the new one is refused.
    fn on_sighup(&self) {
        match self.reloader {
            None => {
                tracing::warn!("SIGHUP: no config file to reload (started without --config)")
            }
            Some(reload) => match reload().and_then(|new| {
                let (_, old) = self.control.snapshot();
                keep_restart_only(&old, new)
            }) {
                Ok(new) => {
                    self.control.process.front_door.apply(&new);
                    if let Some(a) = &new.authn {
                        if let Err(e) = a.spawn_refresher() {
                            tracing::error!(error = %e, "cannot start the JWKS refresher for the reloaded config");
                        }
                    }
                    let generation = self.control.publish(new);
                    self.control
                        .metrics
                        .config_reloads
                        .with_label_values(&["ok"])
                        .inc();
                    self.control
                        .metrics
                        .config_generation
                        .set(generation as i64);
                    tracing::info!(generation, "configuration reloaded");
                }
                Err(errors) => {
                    self.control
                        .metrics
                        .config_reloads
                        .with_label_values(&["error"])
                        .inc();
                    for e in &errors.0 {
                        tracing::error!(error = %e, "reload refused; the running configuration stays in force");
                    }
                }
            },
        }
    }

    /// The first SIGTERM/SIGINT (`signal`): stop accepting, report draining,
    /// and return the deadline after which what is left gets closed.
    fn start_drain(&self, signal: i32) -> Instant {
        let grace = self.r.config.server.shutdown_grace;
        tracing::info!(
            signal,
            grace_s = grace.as_secs_f64(),
            "shutting down: no new connections, draining in-flight requests"
        );
        self.health.draining.store(true, Ordering::SeqCst);
        self.control.metrics.draining.set(1);
        let delay = self.r.config.server.drain_delay;
        if delay.is_zero() {
            self.control.shutdown.trigger();
        } else {
            // Not ready now; still accepting until the delay is over.
            tracing::info!(
                drain_delay_s = delay.as_secs_f64(),
                "readiness withdrawn; listeners stop after the drain delay"
            );
            let shutdown = self.control.shutdown.clone();
            let spawned = std::thread::Builder::new()
                .name("drain-delay".into())
                .spawn(move || {
                    std::thread::sleep(delay);
                    shutdown.trigger();
                });
            if spawned.is_err() {
                self.control.shutdown.trigger();
            }
        }
        Instant::now() + delay + grace
    }
}

static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

fn worker_thread(
    id: usize,
    control: Arc<Control>,
    cpu: Option<usize>,
    driver: DriverChoice,
    listen: Vec<(SocketAddr, bool)>,
    backlog: i32,
    tx: mpsc::Sender<Msg>,
) {
    if let Some(cpu) = cpu {
        pin_to_cpu(cpu);
    }
    let uring = || {
        // COOP_TASKRUN: completions are run when the worker next enters the kernel
        // instead of by interrupting it (no IPI per completion); SINGLE_ISSUER:
        // only this thread submits. Both since Linux 6.0; fall back without them.
        let mut ub = io_uring::IoUring::builder();
        ub.setup_coop_taskrun().setup_single_issuer();
        monoio::RuntimeBuilder::<IoUringDriver>::new()
            .with_entries(URING_ENTRIES)
            .uring_builder(ub)
            .enable_timer()
            .build()
            .or_else(|_| {
                monoio::RuntimeBuilder::<IoUringDriver>::new()
                    .with_entries(URING_ENTRIES)
                    .enable_timer()
                    .build()
            })
    };
    let legacy = || {
        monoio::RuntimeBuilder::<LegacyDriver>::new()
            .enable_timer()
            .build()
    };
    let start = |tx| WorkerStart {
        id,
        control: control.clone(),
        listen: listen.clone(),
        backlog,
        tx,
    };
    let epoll = |tx: mpsc::Sender<Msg>| match legacy() {
        Ok(rt) => run_on(rt, "epoll", start(tx)),
        Err(e) => {
            let _ = tx.send(Msg::Failed {
                worker: id,
                error: format!("cannot start the epoll runtime: {e}"),
            });
        }
    };
    match (driver, (driver != DriverChoice::Epoll).then(uring)) {
        (DriverChoice::Epoll, _) | (_, None) => epoll(tx),
        (_, Some(Ok(rt))) => run_on(rt, "io_uring", start(tx)),
        (DriverChoice::IoUring, Some(Err(e))) => {
            let _ = tx.send(Msg::Failed {
                worker: id,
                error: format!("io_uring is unavailable ({e}); use driver = \"auto\" or \"epoll\""),
            });
        }
        (DriverChoice::Auto, Some(Err(e))) => {
            if !FALLBACK_LOGGED.swap(true, Ordering::SeqCst) {
                tracing::warn!(error = %e, "io_uring unavailable (disabled by sysctl or seccomp?); falling back to epoll");
            }
            epoll(tx)
        }
    }
}

/// What a worker thread needs to start serving.
struct WorkerStart {
    id: usize,
    control: Arc<Control>,
    /// (address, speaks TLS)
    listen: Vec<(SocketAddr, bool)>,
    backlog: i32,
    tx: mpsc::Sender<Msg>,
}

fn run_on<D: monoio::Driver>(mut rt: Runtime<D>, driver: &'static str, start: WorkerStart) {
    rt.block_on(worker_main(driver, start));
}

async fn worker_main(driver: &'static str, start: WorkerStart) {
    let WorkerStart {
        id,
        control,
        listen,
        backlog,
        tx,
    } = start;
    let (generation, resolved) = control.snapshot();
    let w = Rc::new(Worker::new(id, control.build(&resolved, generation)));
    let metrics = control.metrics.clone();
    let mut listeners = Vec::new();
    for (a, tls) in &listen {
        match listener::bind(*a, backlog) {
            Ok(l) => listeners.push((l, tls.then_some(*a))),
            Err(e) => {
                let _ = tx.send(Msg::Failed {
                    worker: id,
                    error: format!("cannot listen on {a}: {e}"),
                });
                return;
            }
        }
    }
    metrics.runtime_driver.with_label_values(&[driver]).inc();
    metrics.workers.inc();
    let _ = tx.send(Msg::Started { worker: id, driver });

    {
        let w = w.clone();
        monoio::spawn(async move {
            w.shutdown.wait().await;
            w.begin_drain();
        });
    }
    {
        // Config reloads: build this worker's copy and switch to it.
        let w = w.clone();
        let control = control.clone();
        monoio::spawn(async move {
            let mut seen = generation;
            loop {
                let l = control.event.listen();
                let (generation, resolved) = control.snapshot();
                if generation > seen {
                    seen = generation;
                    w.install(control.build(&resolved, generation));
                    tracing::debug!(worker = w.id, generation, "worker switched configuration");
                    continue;
                }
                l.await;
            }
        });
    }
    {
        // Fold metric shards into the registry; close expired pooled connections.
        let w = w.clone();
        monoio::spawn(async move {
            let mut last_sweep = Instant::now();
            loop {
                monoio::time::sleep(FLUSH_EVERY).await;
                w.metrics.flush();
                w.current().flush();
                if last_sweep.elapsed() >= w.sweep_interval() {
                    last_sweep = Instant::now();
                    w.sweep_pool();
                }
            }
        });
    }

    let loops: Vec<_> = listeners
        .into_iter()
        .map(|(l, tls)| monoio::spawn(listener::accept_loop(l, w.clone(), tls)))
        .collect();
    for l in loops {
        l.await;
    }
    // Listeners are closed; wait for in-flight requests (the main thread enforces the grace period).
    while w.active.get() > 0 {
        let l = w.wake.listen();
        if w.active.get() == 0 {
            break;
        }
        l.await;
    }
    {
        let cur = w.current();
        cur.pool.borrow_mut().clear();
        for g in &cur.pool_idle {
            g.set(0);
        }
    }
    w.metrics.flush();
    w.current().flush();
    metrics.workers.dec();
    let _ = tx.send(Msg::Done { worker: id });
    // Give the flush a moment to be scraped before the process exits.
    monoio::time::sleep(Duration::from_millis(1)).await;
}

/// Keep the running values of what a reload can't change (sockets, threads,
/// buffers are set up once), saying so; refuse a reload whose limits no
/// longer fit the running buffers.
fn keep_restart_only(
    old: &Resolved,
    mut new: Resolved,
) -> Result<Resolved, crate::config::ConfigErrors> {
    for key in restart_only_changes(old, &new) {
        tracing::warn!(
            key,
            "reload: this setting only changes on a restart; keeping the running value"
        );
    }
    new.config.server.buffer_size = old.config.server.buffer_size;
    new.config.ratelimit.redis = old.config.ratelimit.redis.clone();
    new.config.ratelimit.state_file = old.config.ratelimit.state_file.clone();
    new.config.ratelimit.max_keys = old.config.ratelimit.max_keys;
    let l = &new.config.limits;
    if l.max_header_bytes > old.config.server.buffer_size
        || l.max_response_header_bytes > old.config.server.buffer_size
    {
        return Err(crate::config::ConfigErrors(vec![crate::config::ConfigError {
            file: "reload".into(),
            line: None,
            key: "limits.max_header_bytes".into(),
            message: format!("header limits must fit the running server.buffer_size ({}); restart to change it", old.config.server.buffer_size),
        }]));
    }
    Ok(new)
}

/// Settings a reload can't change (sockets, threads, drivers are set up once).
fn restart_only_changes(old: &Resolved, new: &Resolved) -> Vec<&'static str> {
    let (a, b) = (&old.config.server, &new.config.server);
    let changed = [
        ("server.listen", old.listen != new.listen),
        ("server.workers", a.workers != b.workers),
        ("server.driver", a.driver != b.driver),
        ("server.pin_workers", a.pin_workers != b.pin_workers),
        ("server.backlog", a.backlog != b.backlog),
        ("server.buffer_size", a.buffer_size != b.buffer_size),
        ("admin.listen", old.admin != new.admin),
        ("tls.listen", old.tls_listen != new.tls_listen),
        ("xdp.interfaces / xdp.attach / xdp.max_*", {
            let (x, y) = (&old.config.xdp, &new.config.xdp);
            x.interfaces != y.interfaces
                || x.attach != y.attach
                || x.max_blocked != y.max_blocked
                || x.max_tracked_sources != y.max_tracked_sources
                || x.max_allow != y.max_allow
        }),
        (
            "ratelimit.redis / ratelimit.state_file / ratelimit.max_keys",
            {
                let (x, y) = (&old.config.ratelimit, &new.config.ratelimit);
                x.redis != y.redis || x.state_file != y.state_file || x.max_keys != y.max_keys
            },
        ),
        (
            "log.format / log.level",
            old.config.log.format != new.config.log.format
                || old.config.log.level != new.config.log.level,
        ),
    ];
    changed
        .into_iter()
        .filter(|(_, c)| *c)
        .map(|(k, _)| k)
        .collect()
}

/// Poll the certificate files every `tls.reload_check` and reload them in
/// place when they change (a bad file is logged; the certificates in force stay).
fn spawn_tls_watch(control: &Arc<Control>, metrics: Arc<Metrics>) -> Result<(), RunError> {
    let control = Arc::downgrade(control);
    std::thread::Builder::new()
        .name("gateway-tls-watch".into())
        .spawn(move || loop {
            // The configuration in force each time: a SIGHUP builds a new
            // resolver, and that is the one handshakes use.
            let Some(c) = control.upgrade() else { return };
            let (_, r) = c.snapshot();
            drop(c);
            let every = r.config.tls.reload_check;
            let Some(tls) = r.tls.as_ref().filter(|_| !every.is_zero()) else {
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            };
            std::thread::sleep(every);
            if let Some(r) = tls.resolver.reload_if_changed() {
                crate::tls::note_reload(&metrics, &r, "file_watch");
            }
        })
        .map(|_| ())
        .map_err(|e| RunError::Startup(format!("cannot start the TLS watch thread: {e}")))
}

/// CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills a zeroed cpu_set_t of the size we pass.
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

fn pin_to_cpu(cpu: usize) {
    // SAFETY: sched_setaffinity on the calling thread with a set we built.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, error = %std::io::Error::last_os_error(), "cannot pin worker to its CPU");
        }
    }
}

/// The balance stage's scraper (model-server metrics, health checks) and
/// the per-backend gauges, on the configuration in force.
fn spawn_balance_scraper(control: &Arc<Control>, metrics: Arc<Metrics>) -> Result<(), RunError> {
    let c = control.clone();
    let m = metrics.clone();
    let targets: crate::balance::scrape::Targets = Box::new(move || {
        let (_, r) = c.snapshot();
        let now = crate::balance::now_ms();
        let mut keep = Vec::new();
        let out: Vec<_> = r
            .clusters
            .iter()
            .map(|(name, addrs)| {
                let s = r.config.clusters[name].balance.clone();
                let loads: Vec<_> = addrs
                    .iter()
                    .map(|a| c.process.loads.get(name, *a))
                    .collect();
                for l in &loads {
                    keep.push((name.clone(), l.addr));
                    let labels = [name.as_str(), &l.addr.to_string()];
                    m.backend_inflight
                        .with_label_values(&labels)
                        .set(i64::from(l.inflight.load(Ordering::Relaxed)));
                    let fresh = l.reported(now, s.metrics_max_age);
                    m.backend_queue
                        .with_label_values(&labels)
                        .set(fresh.map_or(-1, |f| i64::from(f.0)));
                    let secs = |cell: &std::sync::atomic::AtomicU64, per: f64| {
                        cell.load(Ordering::Relaxed) as f64 / per
                    };
                    for (g, v) in [
                        (&m.backend_kv, fresh.map_or(-1.0, |f| f.2)),
                        (&m.backend_latency, secs(&l.latency_ns, 1e9)),
                        (&m.backend_ttft, secs(&l.ttft_ns, 1e9)),
                        // Per 1,000 tokens: ns per token ÷ 1e6.
                        (&m.backend_prefill, secs(&l.prefill_ns, 1e6)),
                        (&m.backend_itl, secs(&l.itl_ns, 1e9)),
                    ] {
                        g.with_label_values(&labels).set(v);
                    }
                    m.backend_streams
                        .with_label_values(&labels)
                        .set(i64::from(l.streams.load(Ordering::Relaxed)));
                    // Tokens over streaming time since the last update.
                    let (tokens, ns) = (
                        l.stream_tokens.swap(0, Ordering::Relaxed),
                        l.stream_ns.swap(0, Ordering::Relaxed),
                    );
                    if ns > 0 {
                        m.backend_tokens
                            .with_label_values(&labels)
                            .set(tokens as f64 / (ns as f64 / 1e9));
                    }
                    m.backend_available
                        .with_label_values(&labels)
                        .set(i64::from(l.available(now)));
                }
                (name.clone(), s, loads)
            })
            .collect();
        c.process.loads.retain(&keep);
        // Reports, health and ejections change room with no event of their
        // own: every queue looks again on each pass (every 10 ms).
        for q in c.process.loads.queues() {
            q.pump();
        }
        out
    });
    crate::balance::scrape::spawn(targets, metrics)
        .map_err(|e| RunError::Startup(format!("cannot start the balance scraper: {e}")))
}

/// Re-resolve backend host names every `server.dns_refresh`; when the
/// addresses differ from the configuration in force, reload it (the same
/// path as SIGHUP: re-read, re-checked, in-flight requests unaffected).
fn spawn_dns_refresh(
    control: &Arc<Control>,
    r: &Resolved,
    tx: mpsc::Sender<Msg>,
) -> Result<(), RunError> {
    let every = r.config.server.dns_refresh;
    let names = r
        .config
        .clusters
        .values()
        .flat_map(|c| c.backends.iter())
        .any(|b| b.parse::<SocketAddr>().is_err());
    if every.is_zero() || !names {
        return Ok(());
    }
    let c = control.clone();
    std::thread::Builder::new()
        .name("dns-refresh".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let (_, cur) = c.snapshot();
            // Resolved the way the config does; a name that fails to
            // resolve now keeps its old addresses (no reload on a DNS blip).
            let changed = cur.config.clusters.iter().any(|(name, cc)| {
                let mut now: Vec<SocketAddr> = Vec::new();
                for b in &cc.backends {
                    match crate::config::resolve_all(b) {
                        Ok(v) => {
                            for a in v {
                                if !now.contains(&a) {
                                    now.push(a);
                                }
                            }
                        }
                        Err(_) => return false,
                    }
                }
                cur.clusters.get(name) != Some(&now)
            });
            if changed {
                tracing::info!("backend addresses changed in DNS: reloading the configuration");
                if tx.send(Msg::Signal(libc::SIGHUP)).is_err() {
                    return;
                }
            }
        })
        .map(|_| ())
        .map_err(|e| RunError::Startup(format!("cannot start the DNS refresh thread: {e}")))
}
