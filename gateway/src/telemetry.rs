//! Structured logs (tracing): JSON or pretty, to stdout through a
//! non-blocking writer so a slow log sink never stalls a worker.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Keep the returned guard alive: dropping it flushes and stops the writer.
pub fn init(cfg: &LogConfig) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_thread_names(true);
    let _ = match cfg.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    guard
}
