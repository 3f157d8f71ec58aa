//! Structured logs (tracing): JSON or pretty, to stdout through a
//! non-blocking writer so a slow log sink never stalls a worker (lossy
//! under overload: a line is dropped rather than a request delayed).
//!
//! Audit events (`target: "audit"`: authorization denials, key revocations,
//! blocks, escalations, certificate reloads) are the exception when
//! `log.audit_file` is set: they go to that file, JSON lines, through a
//! writer that never drops (it waits instead: audit events are rare), with
//! size-based rotation (`audit.log.1` … `audit.log.N`), and not to stdout.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat};

/// Keep the returned guards alive: dropping them flushes and stops the writers.
pub fn init(cfg: &LogConfig) -> Vec<tracing_appender::non_blocking::WorkerGuard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    // Every filter says how verbose it can get: without a hint the registry
    // must create every span of every crate (h2 opens several per frame) in
    // case some layer wants it — most of a request's CPU, measured.
    let hint = filter
        .max_level_hint()
        .unwrap_or(tracing_subscriber::filter::LevelFilter::TRACE);
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::stdout());
    let mut guards = vec![guard];
    let audit_to_file = !cfg.audit_file.is_empty();
    let stdout = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_thread_names(true);
    let stdout = match cfg.format {
        LogFormat::Json => stdout
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
        LogFormat::Pretty => stdout.boxed(),
    }
    .with_filter(filter)
    .with_filter(
        filter_fn(move |m| !(audit_to_file && m.target() == "audit")).with_max_level_hint(hint),
    );
    let audit = audit_to_file.then(|| {
        let file = Rotating::open(
            PathBuf::from(&cfg.audit_file),
            cfg.audit_max_bytes,
            cfg.audit_keep,
        );
        let (w, g) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(false)
            .finish(file);
        guards.push(g);
        tracing_subscriber::fmt::layer()
            .with_writer(w)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_filter(
                filter_fn(|m| m.target() == "audit")
                    .with_max_level_hint(tracing_subscriber::filter::LevelFilter::INFO),
            )
    });
    let _ = tracing_subscriber::registry()
        .with(stdout)
        .with(audit)
        .try_init();
    guards
}

/// An append-only file rotated at `max` bytes, keeping `keep` old ones.
/// A write error is reported on stderr and retried with a reopened file.
pub struct Rotating {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max: u64,
    keep: u32,
}

impl Rotating {
    pub fn open(path: PathBuf, max: u64, keep: u32) -> Rotating {
        let mut r = Rotating {
            path,
            file: None,
            size: 0,
            max: max.max(4096),
            keep,
        };
        r.reopen();
        r
    }

    fn reopen(&mut self) {
        match OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            Ok(f) => {
                self.size = f.metadata().map(|m| m.len()).unwrap_or(0);
                self.file = Some(f);
            }
            Err(e) => {
                eprintln!("audit log {}: {e}", self.path.display());
                self.file = None;
            }
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        let name = |i: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            for i in (1..self.keep).rev() {
                let _ = std::fs::rename(name(i), name(i + 1));
            }
            let _ = std::fs::rename(&self.path, name(1));
        }
        self.reopen();
    }
}

impl Write for Rotating {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.size > 0 && self.size + buf.len() as u64 > self.max {
            self.rotate();
        }
        if self.file.is_none() {
            self.reopen();
        }
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("audit log not open"))?;
        f.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_its_size_and_keeps_n() {
        let dir = std::env::temp_dir().join(format!("audit-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.log");
        let mut r = Rotating::open(path.clone(), 4096, 2);
        let line = vec![b'x'; 1000];
        for _ in 0..13 {
            r.write_all(&line).unwrap();
        }
        r.flush().unwrap();
        let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        // 13 lines of 1000 B, 4 per file: 4 + 4 + 4 rotated (one dropped) and 1 current.
        assert_eq!(size(&path), 1000);
        assert_eq!(size(&dir.join("audit.log.1")), 4000);
        assert_eq!(size(&dir.join("audit.log.2")), 4000);
        assert!(!dir.join("audit.log.3").exists(), "only `keep` old files");
        // Reopened where it left off.
        drop(r);
        let mut r = Rotating::open(path.clone(), 4096, 2);
        r.write_all(&line).unwrap();
        assert_eq!(size(&path), 2000);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
