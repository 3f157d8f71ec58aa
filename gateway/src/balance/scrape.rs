//! Load reports from the model servers: their Prometheus `/metrics` (the
//! real servers' metric names, per `engine`), scraped by one background
//! thread on each cluster's `metrics_interval`; active health checks on
//! `health_interval`; and ORCA `endpoint-load-metrics` response headers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{BackendLoad, BalanceSettings, Engine};

/// What a metrics page says: (queued, running, KV-cache use 0..1), each if present.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Sample {
    pub waiting: Option<u32>,
    pub running: Option<u32>,
    pub kv: Option<f64>,
    pub adapters: Option<Vec<String>>,
    /// KV blocks of 16 tokens the engine has (vLLM `cache_config_info`).
    pub cache_blocks: Option<u32>,
    /// Speed as the engine's own histograms tell it (means since it
    /// started): time to first token and per output token, seconds, and
    /// prompt tokens a request. Known before this gateway's first request.
    pub speed: Option<Speed>,
}

/// An engine's own means, from its histograms' `_sum` and `_count`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Speed {
    pub ttft_s: f64,
    pub tpot_s: Option<f64>,
    pub prompt_tokens: Option<f64>,
}

/// The mean of histogram `name` (`_sum` ÷ `_count`, summed over label sets).
fn mean(text: &str, name: &str) -> Option<f64> {
    let s = sum(text, &format!("{name}_sum"))?;
    let c = sum(text, &format!("{name}_count"))?;
    (c > 0.0).then(|| s / c)
}

fn speed(text: &str, ttft: &str, tpot: &str, prompt: &str) -> Option<Speed> {
    Some(Speed {
        ttft_s: mean(text, ttft)?,
        tpot_s: mean(text, tpot),
        prompt_tokens: mean(text, prompt),
    })
}

/// Sum a metric's samples over its label sets (one per model on a
/// multi-model server); `None` when the metric is absent.
fn sum(text: &str, name: &str) -> Option<f64> {
    values(text, name).reduce(|a, b| a + b)
}

/// The finite values of every sample of `name` (malformed lines skipped).
fn values<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = f64> + 'a {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(move |l| {
            let rest = l.strip_prefix(name)?;
            // The whole name: followed by labels or a space.
            let rest = match rest.as_bytes().first() {
                Some(b'{') => &rest[rest.find('}')? + 1..],
                Some(b' ') => rest,
                _ => return None,
            };
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .filter(|v| v.is_finite())
}

fn max(text: &str, name: &str) -> Option<f64> {
    values(text, name).reduce(f64::max)
}

/// Read the load from a metrics page with `engine`'s names. Unknown or
/// missing metrics stay `None` (the caller keeps local signals).
pub fn parse(engine: Engine, text: &str) -> Sample {
    let u = |v: Option<f64>| v.map(|x| x.max(0.0).min(u32::MAX as f64) as u32);
    match engine {
        Engine::Vllm => Sample {
            waiting: u(sum(text, "vllm:num_requests_waiting")),
            running: u(sum(text, "vllm:num_requests_running")),
            // Newer vLLM: kv_cache_usage_perc; older: gpu_cache_usage_perc (both 0..1).
            kv: max(text, "vllm:kv_cache_usage_perc")
                .or_else(|| max(text, "vllm:gpu_cache_usage_perc")),
            adapters: lora_adapters(text),
            cache_blocks: cache_blocks(text),
            speed: speed(
                text,
                "vllm:time_to_first_token_seconds",
                "vllm:time_per_output_token_seconds",
                "vllm:request_prompt_tokens",
            ),
        },
        Engine::Sglang => Sample {
            waiting: u(sum(text, "sglang:num_queue_reqs")),
            running: u(sum(text, "sglang:num_running_reqs")),
            kv: max(text, "sglang:token_usage"),
            adapters: None,
            cache_blocks: None,
            speed: speed(
                text,
                "sglang:time_to_first_token_seconds",
                "sglang:inter_token_latency_seconds",
                "sglang:prompt_tokens_histogram",
            ),
        },
        Engine::Tgi => Sample {
            waiting: u(sum(text, "tgi_queue_size")),
            running: u(sum(text, "tgi_batch_current_size")),
            kv: None,
            adapters: None,
            cache_blocks: None,
            speed: None,
        },
        Engine::Triton => Sample {
            waiting: u(sum(text, "nv_inference_pending_request_count")),
            running: None,
            // GPU memory pressure stands in for the KV cache: used / total when both are there.
            kv: sum(text, "nv_gpu_memory_used_bytes")
                .zip(sum(text, "nv_gpu_memory_total_bytes"))
                .filter(|(_, t)| *t > 0.0)
                .map(|(u, t)| u / t),
            adapters: None,
            cache_blocks: None,
            speed: None,
        },
        Engine::None => Sample::default(),
    }
}

/// vLLM's `vllm:cache_config_info{block_size="16",num_gpu_blocks="N",...}`:
/// the engine's KV cache in 16-token blocks (other block sizes converted).
fn cache_blocks(text: &str) -> Option<u32> {
    let line = text
        .lines()
        .find(|l| l.starts_with("vllm:cache_config_info{"))?;
    let label = |name: &str| -> Option<u64> {
        let key = format!("{name}=\"");
        let start = line.find(&key)? + key.len();
        let end = start + line[start..].find('"')?;
        line[start..end].parse().ok()
    };
    let blocks = label("num_gpu_blocks")?;
    let size = label("block_size").unwrap_or(16).max(1);
    u32::try_from(blocks.saturating_mul(size) / 16)
        .ok()
        .filter(|&n| n > 0)
}

/// vLLM's `vllm:lora_requests_info{running_lora_adapters="a,b",...}`: the
/// adapters in the batch now (the last sample wins).
fn lora_adapters(text: &str) -> Option<Vec<String>> {
    let line = text
        .lines()
        .rfind(|l| l.starts_with("vllm:lora_requests_info{"))?;
    let start = line.find("running_lora_adapters=\"")? + "running_lora_adapters=\"".len();
    let end = start + line[start..].find('"')?;
    Some(
        line[start..end]
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

/// An ORCA `endpoint-load-metrics` header (`TEXT k=v, k=v` form): queue,
/// running and KV-cache use, under vLLM's or ORCA's `named_metrics.` names.
pub fn parse_orca(value: &[u8]) -> Option<Sample> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let body = text.strip_prefix("TEXT")?.trim();
    let mut s = Sample::default();
    for kv in body.split(',') {
        let (k, v) = kv.trim().split_once('=')?;
        let k = k.trim().strip_prefix("named_metrics.").unwrap_or(k.trim());
        let v: f64 = v.trim().parse().ok()?;
        if !v.is_finite() || v < 0.0 {
            return None;
        }
        match k {
            "num_requests_waiting" | "queue_size" => {
                s.waiting = Some(v.min(u32::MAX as f64) as u32)
            }
            "num_requests_running" => s.running = Some(v.min(u32::MAX as f64) as u32),
            "kv_cache_usage_perc" | "kv_cache_utilization" => s.kv = Some(v.min(1.0)),
            _ => {}
        }
    }
    (s.waiting.is_some() || s.running.is_some() || s.kv.is_some()).then_some(s)
}

/// What the scraper works on: each cluster's settings and backend loads,
/// re-read every tick (a reload changes it).
pub type Targets = Box<dyn Fn() -> Vec<(String, BalanceSettings, Vec<Arc<BackendLoad>>)> + Send>;

/// The scraper thread: scrapes (gie_like / gpu_aware clusters) and health checks.
pub fn spawn(targets: Targets, metrics: Arc<crate::metrics::Metrics>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("balance-scrape".into())
        .spawn(move || {
            let mut next: std::collections::HashMap<(SocketAddr, bool), Instant> =
                Default::default();
            loop {
                let now = Instant::now();
                for (cluster, s, loads) in targets() {
                    for b in &loads {
                        if s.algorithm.scrapes()
                            && s.engine != Engine::None
                            && !s.metrics_interval.is_zero()
                            && next.get(&(b.addr, true)).is_none_or(|t| now >= *t)
                        {
                            next.insert((b.addr, true), now + s.metrics_interval);
                            let timeout = s.metrics_interval.clamp(Duration::from_millis(20), Duration::from_secs(1));
                            let result = match crate::fetch::get_addr(b.addr, &s.metrics_path, timeout) {
                                Ok((200, body)) => {
                                    let smp = parse(s.engine, &body);
                                    if smp.waiting.is_none() && smp.running.is_none() && smp.kv.is_none() {
                                        "no_load_metrics"
                                    } else {
                                        b.report(smp.waiting, smp.running, smp.kv);
                                        if let (Some(a), Ok(mut slot)) = (smp.adapters, b.adapters.lock()) {
                                            *slot = a;
                                        }
                                        if let Some(n) = smp.cache_blocks {
                                            b.cache_blocks.store(n, std::sync::atomic::Ordering::Relaxed);
                                        }
                                        if let Some(sp) = smp.speed {
                                            b.cold_start(sp);
                                        }
                                        "ok"
                                    }
                                }
                                Ok(_) => "http_error",
                                Err(_) => "unreachable",
                            };
                            metrics
                                .balance_scrapes
                                .with_label_values(&[&cluster, result])
                                .inc();
                        }
                        if !s.health_path.is_empty()
                            && next.get(&(b.addr, false)).is_none_or(|t| now >= *t)
                        {
                            next.insert((b.addr, false), now + s.health_interval);
                            let ok = matches!(
                                crate::fetch::get_addr(b.addr, &s.health_path, Duration::from_secs(1)),
                                Ok((200..=299, _))
                            );
                            let was = b.healthy.swap(ok, std::sync::atomic::Ordering::AcqRel);
                            if was != ok {
                                if ok {
                                    b.since_ms.store(super::now_ms(), std::sync::atomic::Ordering::Relaxed);
                                    tracing::info!(cluster = cluster.as_str(), backend = %b.addr, "health check passes again: backend back in rotation (warming up)");
                                } else {
                                    tracing::warn!(cluster = cluster.as_str(), backend = %b.addr, "health check failed: backend out of rotation");
                                }
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = "# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{model_name=\"a\"} 3.0\nvllm:num_requests_running{model_name=\"b\"} 1.0\n\
vllm:num_requests_waiting{model_name=\"a\"} 7.0\nvllm:num_requests_waiting_time_seconds 99\n\
vllm:gpu_cache_usage_perc{model_name=\"a\"} 0.42\n\
vllm:lora_requests_info{max_lora=\"4\",running_lora_adapters=\"sql,chat\",waiting_lora_adapters=\"\"} 1.7e9\n";

    #[test]
    fn vllm_names_summed_over_models_and_older_kv_name() {
        let s = parse(Engine::Vllm, VLLM);
        assert_eq!(s.running, Some(4));
        assert_eq!(s.waiting, Some(7), "a longer metric name is not this one");
        assert_eq!(s.kv, Some(0.42));
        assert_eq!(s.adapters, Some(vec!["sql".into(), "chat".into()]));
    }

    #[test]
    fn other_engines_and_garbage() {
        let s = parse(
            Engine::Sglang,
            "sglang:num_queue_reqs{m=\"x\"} 2\nsglang:num_running_reqs 5\nsglang:token_usage 0.5\n",
        );
        assert_eq!((s.waiting, s.running, s.kv), (Some(2), Some(5), Some(0.5)));
        let s = parse(Engine::Tgi, "tgi_queue_size 4\ntgi_batch_current_size 16\n");
        assert_eq!((s.waiting, s.running, s.kv), (Some(4), Some(16), None));
        let s = parse(Engine::Triton, "nv_inference_pending_request_count{model=\"m\"} 3\nnv_gpu_memory_used_bytes{gpu_uuid=\"g\"} 40\nnv_gpu_memory_total_bytes{gpu_uuid=\"g\"} 80\n");
        assert_eq!((s.waiting, s.kv), (Some(3), Some(0.5)));
        let s = parse(Engine::Vllm, "<html>not metrics</html>\nvllm:num_requests_waiting NaN\nvllm:num_requests_running{x=\"1\"} banana\n");
        assert_eq!(s, Sample::default());
    }

    #[test]
    fn engine_speed_from_its_histograms() {
        let t = "vllm:time_to_first_token_seconds_sum{model_name=\"m\"} 3.0\nvllm:time_to_first_token_seconds_count{model_name=\"m\"} 10\n\
                 vllm:time_per_output_token_seconds_sum{model_name=\"m\"} 0.5\nvllm:time_per_output_token_seconds_count{model_name=\"m\"} 25\n\
                 vllm:request_prompt_tokens_sum{model_name=\"m\"} 15000\nvllm:request_prompt_tokens_count{model_name=\"m\"} 10\n";
        let sp = parse(Engine::Vllm, t).speed.unwrap();
        assert!((sp.ttft_s - 0.3).abs() < 1e-9);
        assert!((sp.tpot_s.unwrap() - 0.02).abs() < 1e-9);
        assert_eq!(sp.prompt_tokens, Some(1500.0));
        // No requests yet (count 0): nothing to say.
        let t0 =
            "vllm:time_to_first_token_seconds_sum 0\nvllm:time_to_first_token_seconds_count 0\n";
        assert_eq!(parse(Engine::Vllm, t0).speed, None);
        let b = BackendLoad::new("127.0.0.1:1".parse().unwrap());
        b.cold_start(sp);
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(b.ttft_ns.load(Relaxed), 300_000_000);
        assert_eq!(b.itl_ns.load(Relaxed), 20_000_000);
        assert_eq!(
            b.prefill_ns.load(Relaxed),
            200_000,
            "0.3 s over 1,500 tokens"
        );
        // Learned values are not overwritten.
        b.cold_start(Speed {
            ttft_s: 9.0,
            tpot_s: None,
            prompt_tokens: Some(1.0),
        });
        assert_eq!(b.ttft_ns.load(Relaxed), 300_000_000);
    }

    #[test]
    fn vllm_cache_size() {
        let t = "vllm:cache_config_info{block_size=\"32\",cache_dtype=\"auto\",num_gpu_blocks=\"1000\"} 1.0\n";
        assert_eq!(parse(Engine::Vllm, t).cache_blocks, Some(2000));
        assert_eq!(
            parse(
                Engine::Vllm,
                "vllm:cache_config_info{num_gpu_blocks=\"x\"} 1\n"
            )
            .cache_blocks,
            None
        );
    }

    #[test]
    fn orca_header() {
        let s = parse_orca(b"TEXT named_metrics.num_requests_waiting=3, named_metrics.kv_cache_usage_perc=0.25, cpu_utilization=0.5").unwrap();
        assert_eq!((s.waiting, s.running, s.kv), (Some(3), None, Some(0.25)));
        assert!(parse_orca(b"JSON {}").is_none());
        assert!(parse_orca(b"TEXT queue_size=-1").is_none());
        assert!(
            parse_orca(b"TEXT cpu_utilization=0.5").is_none(),
            "nothing the balancer uses"
        );
    }
}
