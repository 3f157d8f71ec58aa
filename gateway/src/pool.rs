//! Each worker's connections to its backends: the clusters it serves (their
//! backends, balance settings and shared load handles) and a pool of idle
//! keep-alive connections per backend, with a cap on open connections
//! (`max_connections`) that makes a request wait for a free slot.

use std::cell::Cell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::io::Conn;

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub backends: Vec<SocketAddr>,
    /// `backends` as metric labels.
    pub backend_names: Vec<String>,
    /// How a backend is picked, and its health rules.
    pub balance: crate::balance::BalanceSettings,
    /// Each backend's load and health (process-wide, by index).
    pub loads: Vec<std::sync::Arc<crate::balance::BackendLoad>>,
    /// Retries of idempotent requests left to spend (process-wide).
    pub retry_budget: std::sync::Arc<crate::balance::RetryBudget>,
    /// What was sent where (prefix-aware algorithms; process-wide).
    pub prefix: Option<std::sync::Arc<crate::balance::fleet::SharedPrefix>>,
    /// Open connections per backend per worker (in use + idle).
    pub max_connections: usize,
    pub pool_max_idle: usize,
    pub pool_idle_timeout: Duration,
    /// TLS to the backends (`[clusters.X.tls]`).
    pub tls: Option<crate::tls::Upstream>,
    /// HTTP routes speak HTTP/2 to the backends (`[clusters.X] http`).
    pub h2: bool,
    /// HTTP/2: requests multiplexed on one backend connection before another opens.
    pub h2_streams: usize,
    /// Its name's hash: a worker's HTTP/2 connections are per cluster and
    /// backend (clusters may reach one address with different TLS identities).
    pub key: u64,
    /// Flow control (`[clusters.X.queue]`): its queue (process-wide) and settings.
    pub queue: Option<(
        std::sync::Arc<crate::balance::queue::FlowQueue>,
        crate::config::QueueSettings,
    )>,
}

struct Idle {
    conn: Conn,
    since: Instant,
    slot: Slot,
}

/// One open connection to a backend, counted against its cluster's
/// `max_connections`; released (and a waiter woken) when dropped.
pub struct Slot {
    open: Rc<Cell<usize>>,
    released: Rc<event_listener::Event>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.set(self.open.get() - 1);
        self.released.notify(1);
    }
}

/// Idle keep-alive connections of one worker, `[cluster][backend]`, most
/// recently used last (reused first: its TCP state is warmest).
pub struct Pool {
    idle: Vec<Vec<VecDeque<Idle>>>,
    max_idle: Vec<usize>,
    idle_timeout: Vec<Duration>,
    /// Open connections (in use and idle) per `[cluster][backend]`.
    open: Vec<Vec<Rc<Cell<usize>>>>,
    max_open: Vec<usize>,
    /// Woken when a connection closes: a request waiting for a slot retries.
    pub(crate) released: Rc<event_listener::Event>,
}

impl Pool {
    pub fn new(clusters: &[Cluster]) -> Pool {
        Pool {
            idle: clusters
                .iter()
                .map(|c| c.backends.iter().map(|_| VecDeque::new()).collect())
                .collect(),
            max_idle: clusters.iter().map(|c| c.pool_max_idle).collect(),
            idle_timeout: clusters.iter().map(|c| c.pool_idle_timeout).collect(),
            open: clusters
                .iter()
                .map(|c| c.backends.iter().map(|_| Rc::new(Cell::new(0))).collect())
                .collect(),
            max_open: clusters.iter().map(|c| c.max_connections).collect(),
            released: Rc::new(event_listener::Event::new()),
        }
    }

    /// A slot for a new connection, unless the backend is at `max_connections`.
    pub(crate) fn try_slot(&self, cluster: usize, backend: usize) -> Option<Slot> {
        let open = &self.open[cluster][backend];
        if open.get() >= self.max_open[cluster] {
            return None;
        }
        open.set(open.get() + 1);
        Some(Slot {
            open: open.clone(),
            released: self.released.clone(),
        })
    }

    /// A live idle connection to this backend; `.1` is how many were discarded.
    pub(crate) fn take(&mut self, cluster: usize, backend: usize) -> (Option<(Conn, Slot)>, usize) {
        let timeout = self.idle_timeout[cluster];
        let q = &mut self.idle[cluster][backend];
        let mut dropped = 0;
        while let Some(i) = q.pop_back() {
            if i.since.elapsed() >= timeout {
                // Everything below is older still.
                dropped += 1 + q.len();
                q.clear();
                break;
            }
            // A close, or bytes the backend sent after its response (a buggy
            // backend answering HEAD with a body): either makes it unusable.
            if i.conn.is_stale() {
                dropped += 1;
                continue;
            }
            return (Some((i.conn, i.slot)), dropped);
        }
        (None, dropped)
    }

    pub(crate) fn put(&mut self, cluster: usize, backend: usize, conn: Conn, slot: Slot) -> bool {
        let q = &mut self.idle[cluster][backend];
        if q.len() >= self.max_idle[cluster] {
            return false;
        }
        q.push_back(Idle {
            conn,
            since: Instant::now(),
            slot,
        });
        // A request waiting for a slot can take this connection now.
        self.released.notify(1);
        true
    }

    /// Close connections idle for longer than their cluster allows; returns how many per cluster.
    pub fn sweep(&mut self) -> Vec<usize> {
        let mut closed = vec![0; self.idle.len()];
        for (c, backends) in self.idle.iter_mut().enumerate() {
            for q in backends.iter_mut() {
                while q
                    .front()
                    .is_some_and(|i| i.since.elapsed() >= self.idle_timeout[c])
                {
                    q.pop_front();
                    closed[c] += 1;
                }
            }
        }
        closed
    }

    /// Idle connections per cluster.
    pub fn idle_counts(&self) -> Vec<usize> {
        self.idle
            .iter()
            .map(|b| b.iter().map(VecDeque::len).sum())
            .collect()
    }

    pub fn clear(&mut self) {
        for b in self.idle.iter_mut() {
            for q in b.iter_mut() {
                q.clear();
            }
        }
    }
}

/// One HTTP/2 connection to a backend (a worker's: its requests to that
/// backend are streams of it) and how many are on it now.
pub struct H2Conn {
    pub send: h2::client::SendRequest<bytes::Bytes>,
    streams: Rc<Cell<usize>>,
    /// Cleared when the connection's task ends (closed, or the backend's
    /// GOAWAY served out): it takes no more requests.
    alive: Rc<Cell<bool>>,
}

/// A request's place on an [`H2Conn`], given back when dropped.
pub struct H2Lease(Rc<Cell<usize>>);

impl Drop for H2Lease {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

impl H2Conn {
    pub fn new(send: h2::client::SendRequest<bytes::Bytes>, alive: Rc<Cell<bool>>) -> H2Conn {
        H2Conn {
            send,
            streams: Rc::new(Cell::new(0)),
            alive,
        }
    }

    pub fn is_alive(&self) -> bool {
        self.alive.get()
    }

    pub fn lease(&self) -> (h2::client::SendRequest<bytes::Bytes>, H2Lease) {
        self.streams.set(self.streams.get() + 1);
        (self.send.clone(), H2Lease(self.streams.clone()))
    }

    pub fn streams(&self) -> usize {
        self.streams.get()
    }

    /// `lease` is a place on this connection.
    pub fn holds(&self, lease: &H2Lease) -> bool {
        Rc::ptr_eq(&self.streams, &lease.0)
    }
}

/// A stable key for a cluster's name (FNV-1a).
pub fn cluster_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}
