//! From per-round samples to what a person reads: medians per target, the
//! stdout table, `results.json` (every raw round) and a hand-written SVG chart.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::wrk::WrkResult;

/// One measured run of one target in one round.
#[derive(Debug, Clone)]
pub struct Measured {
    pub wrk: WrkResult,
    /// CPU time of the proxy process(es) per request; `None` for the backend
    /// measured directly, or when /proc could not be read.
    pub proxy_cpu_us_per_req: Option<f64>,
    /// CPU time of the backend nginx (master + worker) per request.
    pub backend_cpu_us_per_req: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub round: usize,
    pub target: &'static str,
    /// `Err`: why this run produced no numbers.
    pub outcome: Result<Measured, String>,
}

/// Medians over the rounds that produced numbers.
#[derive(Debug, Clone)]
pub struct Summary {
    pub target: &'static str,
    pub runs: usize,
    pub failed_runs: usize,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub cpu_us_per_req: Option<f64>,
    /// Socket errors plus responses ≥ 400, summed over the rounds.
    pub errors: u64,
    /// req/s of this target divided by the gateway's.
    pub vs_gateway: Option<f64>,
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

pub fn summarize(targets: &[&'static str], samples: &[Sample]) -> Vec<Summary> {
    let mut out: Vec<Summary> = targets
        .iter()
        .filter_map(|&t| {
            let runs: Vec<&Measured> = samples
                .iter()
                .filter(|s| s.target == t)
                .filter_map(|s| s.outcome.as_ref().ok())
                .collect();
            let failed_runs = samples
                .iter()
                .filter(|s| s.target == t && s.outcome.is_err())
                .count();
            if runs.is_empty() && failed_runs == 0 {
                return None;
            }
            let med = |f: &dyn Fn(&Measured) -> Option<f64>| {
                median(runs.iter().filter_map(|m| f(m)).collect())
            };
            Some(Summary {
                target: t,
                runs: runs.len(),
                failed_runs,
                rps: med(&|m| Some(m.wrk.rps())).unwrap_or(0.0),
                p50_ms: med(&|m| Some(m.wrk.p50_us / 1e3)).unwrap_or(0.0),
                p99_ms: med(&|m| Some(m.wrk.p99_us / 1e3)).unwrap_or(0.0),
                cpu_us_per_req: med(&|m| m.proxy_cpu_us_per_req),
                errors: runs
                    .iter()
                    .map(|m| m.wrk.socket_errors() + m.wrk.non_2xx)
                    .sum(),
                vs_gateway: None,
            })
        })
        .collect();
    let gw = out
        .iter()
        .find(|s| s.target == "gateway" && s.runs > 0)
        .map(|s| s.rps);
    for s in &mut out {
        s.vs_gateway = gw.filter(|&g| g > 0.0).map(|g| s.rps / g);
    }
    out
}

pub fn table(summaries: &[Summary]) -> String {
    let mut t = String::new();
    // As wide as the longest target name (`gateway-baseline`, ...).
    let w = summaries
        .iter()
        .map(|s| s.target.len())
        .max()
        .unwrap_or(0)
        .max(10);
    let _ = writeln!(
        t,
        "{:<w$} {:>10} {:>8} {:>8} {:>11} {:>10} {:>7} {:>5}",
        "target", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "x/gateway", "errors", "runs"
    );
    for s in summaries {
        let cpu = s.cpu_us_per_req.map_or("-".into(), |c| format!("{c:.1}"));
        let ratio = s.vs_gateway.map_or("-".into(), |r| format!("{r:.2}"));
        let runs = if s.failed_runs > 0 {
            format!("{}/{}", s.runs, s.runs + s.failed_runs)
        } else {
            s.runs.to_string()
        };
        let _ = writeln!(
            t,
            "{:<w$} {:>10.0} {:>8.2} {:>8.2} {:>11} {:>10} {:>7} {:>5}",
            s.target, s.rps, s.p50_ms, s.p99_ms, cpu, ratio, s.errors, runs
        );
    }
    t
}

/// What turning validation on costs: the validated gateway against the passthrough one.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationCost {
    /// Throughput lost, in % of the passthrough gateway's req/s (negative: it got faster).
    pub throughput_pct: f64,
    /// Extra proxy CPU per request, µs, and that in % of the passthrough's.
    pub cpu_us_per_req: Option<f64>,
    pub cpu_pct: Option<f64>,
    /// Latency added at the median and the 99th percentile, ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// `None` unless both sides produced numbers.
pub fn validation_cost(passthrough: &Summary, validated: &Summary) -> Option<ValidationCost> {
    if passthrough.runs == 0 || validated.runs == 0 || passthrough.rps <= 0.0 {
        return None;
    }
    let cpu = passthrough.cpu_us_per_req.zip(validated.cpu_us_per_req);
    Some(ValidationCost {
        throughput_pct: (1.0 - validated.rps / passthrough.rps) * 100.0,
        cpu_us_per_req: cpu.map(|(p, v)| v - p),
        cpu_pct: cpu
            .filter(|&(p, _)| p > 0.0)
            .map(|(p, v)| (v / p - 1.0) * 100.0),
        p50_ms: validated.p50_ms - passthrough.p50_ms,
        p99_ms: validated.p99_ms - passthrough.p99_ms,
    })
}

/// The `--validation` table: both gateways, then what validation costs.
/// `label` names the cost ("validation cost", "rate-limit cost").
pub fn validation_table(
    summaries: &[Summary],
    cost: Option<&ValidationCost>,
    label: &str,
) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<20} {:>10} {:>8} {:>8} {:>11} {:>7} {:>5}",
        "target", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "errors", "runs"
    );
    for s in summaries {
        let cpu = s.cpu_us_per_req.map_or("-".into(), |c| format!("{c:.1}"));
        let runs = if s.failed_runs > 0 {
            format!("{}/{}", s.runs, s.runs + s.failed_runs)
        } else {
            s.runs.to_string()
        };
        let _ = writeln!(
            t,
            "{:<20} {:>10.0} {:>8.2} {:>8.2} {:>11} {:>7} {:>5}",
            s.target, s.rps, s.p50_ms, s.p99_ms, cpu, s.errors, runs
        );
    }
    match cost {
        Some(c) => {
            let _ = write!(t, "{label}: {:.1} % of throughput", c.throughput_pct);
            if let (Some(us), Some(pct)) = (c.cpu_us_per_req, c.cpu_pct) {
                let _ = write!(t, ", {us:+.1} µs CPU/request ({pct:+.1} %)");
            }
            let _ = writeln!(t, ", p50 {:+.3} ms, p99 {:+.3} ms", c.p50_ms, c.p99_ms);
        }
        None => {
            let _ = writeln!(t, "{label}: - (a side produced no numbers)");
        }
    }
    t
}

/// One worker count of a `loadbench --workers` run.
#[derive(Debug, Clone)]
pub struct ScalingRow {
    pub workers: usize,
    /// The CPUs the gateway was allowed (empty: not pinned).
    pub cpus: Vec<usize>,
    /// It shared CPUs with the backend and wrk: not a clean scaling figure.
    pub shared: bool,
    /// More workers than CPUs allowed.
    pub oversubscribed: bool,
    /// `None` when the gateway never ran (failed to start) — no numbers.
    pub summary: Option<Summary>,
    /// req/s divided by that of the first count listed.
    pub ratio: Option<f64>,
}

impl ScalingRow {
    /// CPUs the gateway kept busy on average: CPU per request × requests per second.
    pub fn cores_busy(&self) -> Option<f64> {
        let s = self.summary.as_ref()?;
        s.cpu_us_per_req.map(|c| c * s.rps / 1e6)
    }
}

/// Each row's req/s over the first row's: the base is the first count listed
/// (not the smallest, not the first with numbers); none when it has no numbers.
pub fn scaling_ratios(rows: &mut [ScalingRow]) {
    let base = rows
        .first()
        .and_then(|r| r.summary.as_ref())
        .filter(|s| s.runs > 0 && s.rps > 0.0)
        .map(|s| s.rps);
    for r in rows.iter_mut() {
        r.ratio = base
            .zip(r.summary.as_ref().filter(|s| s.runs > 0))
            .map(|(b, s)| s.rps / b);
    }
}

/// The `--workers` table: one line per worker count; `*` marks the shared ones.
pub fn scaling_table(rows: &[ScalingRow]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:>7}  {:<14} {:>10} {:>8} {:>8} {:>11} {:>6} {:>8} {:>7} {:>5}",
        "workers",
        "gateway CPUs",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU µs/req",
        "cores",
        "scaling",
        "errors",
        "runs"
    );
    for r in rows {
        let cpus = if r.cpus.is_empty() {
            "any".to_string()
        } else {
            crate::procs::cpu_list(&r.cpus)
        };
        let cpus = if r.shared { format!("{cpus} *") } else { cpus };
        let Some(s) = &r.summary else {
            let _ = writeln!(t, "{:>7}  {:<14} did not start", r.workers, cpus);
            continue;
        };
        let cpu = s.cpu_us_per_req.map_or("-".into(), |c| format!("{c:.1}"));
        let cores = r.cores_busy().map_or("-".into(), |c| format!("{c:.2}"));
        let ratio = r.ratio.map_or("-".into(), |x| format!("{x:.2}"));
        let runs = if s.failed_runs > 0 {
            format!("{}/{}", s.runs, s.runs + s.failed_runs)
        } else {
            s.runs.to_string()
        };
        let _ = writeln!(
            t,
            "{:>7}  {:<14} {:>10.0} {:>8.2} {:>8.2} {:>11} {:>6} {:>8} {:>7} {:>5}",
            r.workers, cpus, s.rps, s.p50_ms, s.p99_ms, cpu, cores, ratio, s.errors, runs
        );
    }
    t
}

/// [`ScalingRow`]s as JSON, for `scaling.json`.
pub fn scaling_json(rows: &[ScalingRow]) -> Value {
    rows.iter()
        .map(|r| {
            let s = r.summary.as_ref();
            json!({
                "workers": r.workers,
                "gateway_cpus": r.cpus,
                "shares_cpus_with_client": r.shared,
                "oversubscribed": r.oversubscribed,
                "rps_median": s.map(|s| s.rps),
                "scaling_ratio": r.ratio,
                "cpu_us_per_req_median": s.and_then(|s| s.cpu_us_per_req),
                "cores_busy": r.cores_busy(),
                "p50_ms_median": s.map(|s| s.p50_ms),
                "p99_ms_median": s.map(|s| s.p99_ms),
                "errors": s.map(|s| s.errors),
                "runs": s.map(|s| s.runs),
                "failed_runs": s.map(|s| s.failed_runs),
            })
        })
        .collect()
}

/// [`ValidationCost`] as JSON (`null` when there is none).
pub fn validation_cost_json(cost: Option<&ValidationCost>) -> Value {
    cost.map_or(Value::Null, |c| {
        json!({
            "throughput_pct": c.throughput_pct,
            "cpu_us_per_req": c.cpu_us_per_req,
            "cpu_pct": c.cpu_pct,
            "p50_ms": c.p50_ms,
            "p99_ms": c.p99_ms,
        })
    })
}

fn sample_json(s: &Sample) -> Value {
    match &s.outcome {
        Ok(m) => {
            let w = &m.wrk;
            json!({
                "round": s.round,
                "target": s.target,
                "requests": w.requests,
                "duration_us": w.duration_us,
                "bytes": w.bytes,
                "rps": w.rps(),
                "latency_us": { "p50": w.p50_us, "p90": w.p90_us, "p99": w.p99_us, "mean": w.mean_us, "max": w.max_us },
                "errors": {
                    "connect": w.errors_connect, "read": w.errors_read, "write": w.errors_write,
                    "timeout": w.errors_timeout, "status": w.non_2xx,
                },
                "non_2xx": w.non_2xx,
                "proxy_cpu_us_per_req": m.proxy_cpu_us_per_req,
                "backend_cpu_us_per_req": m.backend_cpu_us_per_req,
            })
        }
        Err(e) => json!({ "round": s.round, "target": s.target, "error": e }),
    }
}

fn summary_json(s: &Summary) -> Value {
    json!({
        "target": s.target,
        "runs": s.runs,
        "failed_runs": s.failed_runs,
        "rps_median": s.rps,
        "p50_ms_median": s.p50_ms,
        "p99_ms_median": s.p99_ms,
        "cpu_us_per_req_median": s.cpu_us_per_req,
        "errors": s.errors,
        "rps_vs_gateway": s.vs_gateway,
    })
}

/// The whole run: `meta` (settings, machine, versions, skipped targets) + raw rounds + medians.
pub fn results_json(meta: Value, samples: &[Sample], summaries: &[Summary]) -> Value {
    let mut v = meta;
    v["rounds"] = samples.iter().map(sample_json).collect();
    v["summary"] = summaries.iter().map(summary_json).collect();
    v
}

/// A bar chart of median req/s per target, p99 under each bar.
pub fn svg(summaries: &[Summary], subtitle: &str) -> String {
    let bars: Vec<&Summary> = summaries.iter().filter(|s| s.runs > 0).collect();
    let (w, h) = (760.0, 420.0);
    let (left, right, top, bottom) = (70.0, 20.0, 70.0, 70.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let max = bars.iter().map(|s| s.rps).fold(0.0_f64, f64::max).max(1.0);
    let scale = nice_ceiling(max);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r##"<rect width="{w}" height="{h}" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="26" text-anchor="middle" font-size="17" font-weight="bold">HTTP/1.1 reverse proxy throughput (median req/s)</text>"#,
        w / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="48" text-anchor="middle" fill="#555555">{}</text>"##,
        w / 2.0,
        xml_escape(subtitle)
    );
    // Grid lines and y labels at quarters of the scale.
    for i in 0..=4 {
        let v = scale * i as f64 / 4.0;
        let y = top + plot_h - plot_h * i as f64 / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#dddddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555555">{}</text>"##,
            w - right,
            left - 6.0,
            y + 4.0,
            thousands(v)
        );
    }
    let slot = plot_w / bars.len().max(1) as f64;
    let bar_w = (slot * 0.6).min(110.0);
    for (i, b) in bars.iter().enumerate() {
        let bh = plot_h * b.rps / scale;
        let x = left + slot * i as f64 + (slot - bar_w) / 2.0;
        let y = top + plot_h - bh;
        let cx = x + bar_w / 2.0;
        let fill = match b.target {
            "gateway" => "#2b6cb0",
            "direct" => "#a0aec0",
            _ => "#ed8936",
        };
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{bar_w:.1}" height="{bh:.1}" fill="{fill}"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text>"#,
            y - 6.0,
            thousands(b.rps)
        );
        let base = top + plot_h;
        let _ = writeln!(
            s,
            r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text>"#,
            base + 20.0,
            b.target
        );
        let _ = writeln!(
            s,
            r##"<text x="{cx:.1}" y="{:.1}" text-anchor="middle" fill="#555555">p99 {:.2} ms</text>"##,
            base + 38.0,
            b.p99_ms
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333333"/>"##,
        top + plot_h,
        w - right,
        top + plot_h
    );
    s.push_str("</svg>\n");
    s
}

/// The smallest 1, 2 or 5 × 10^k at or above `v`, for a round axis.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `now` as RFC 3339 UTC (`2025-01-31T12:34:56Z`), without a date crate.
pub fn rfc3339_utc(now: SystemTime) -> String {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (the proleptic Gregorian algorithm
    // that counts in 400-year eras starting on March 1st).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(1_735_689_599)),
            "2024-12-31T23:59:59Z"
        );
    }

    #[test]
    fn medians_and_axis() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        assert_eq!(nice_ceiling(43_000.0), 50_000.0);
        assert_eq!(nice_ceiling(100.0), 100.0);
        assert_eq!(thousands(1_234_567.4), "1,234,567");
    }

    #[test]
    fn validation_cost_is_relative_to_passthrough() {
        let summary = |target, rps, cpu| Summary {
            target,
            runs: 1,
            failed_runs: 0,
            rps,
            p50_ms: 1.0,
            p99_ms: 2.0,
            cpu_us_per_req: Some(cpu),
            errors: 0,
            vs_gateway: None,
        };
        let (p, v) = (
            summary("gateway-passthrough", 40_000.0, 20.0),
            summary("gateway-validated", 36_000.0, 22.0),
        );
        let c = validation_cost(&p, &v).unwrap();
        assert!((c.throughput_pct - 10.0).abs() < 1e-9);
        assert!((c.cpu_us_per_req.unwrap() - 2.0).abs() < 1e-9);
        assert!((c.cpu_pct.unwrap() - 10.0).abs() < 1e-9);
        let table = validation_table(&[p, v], Some(&c), "validation cost");
        assert!(
            table.contains("validation cost: 10.0 % of throughput, +2.0 µs CPU/request (+10.0 %)"),
            "{table}"
        );
    }

    #[test]
    fn scaling_ratios_are_to_the_first_count() {
        let summary = |rps| Summary {
            target: "gateway-wN",
            runs: 1,
            failed_runs: 0,
            rps,
            p50_ms: 1.0,
            p99_ms: 2.0,
            cpu_us_per_req: Some(20.0),
            errors: 0,
            vs_gateway: None,
        };
        let row = |workers, s: Option<Summary>| ScalingRow {
            workers,
            cpus: vec![workers],
            shared: workers > 1,
            oversubscribed: false,
            summary: s,
            ratio: None,
        };
        let mut rows = vec![
            row(1, Some(summary(40_000.0))),
            row(2, Some(summary(70_000.0))),
            row(4, None),
        ];
        scaling_ratios(&mut rows);
        assert_eq!(rows[0].ratio, Some(1.0));
        assert!((rows[1].ratio.unwrap() - 1.75).abs() < 1e-9);
        assert_eq!(rows[2].ratio, None);
        assert!((rows[1].cores_busy().unwrap() - 1.4).abs() < 1e-9);
        let t = scaling_table(&rows);
        assert!(t.contains("2 *"), "{t}");
        assert!(t.contains("1.75"), "{t}");
        assert!(t.contains("did not start"), "{t}");
        // No numbers for the first count: no ratios at all.
        rows.swap(0, 2);
        scaling_ratios(&mut rows);
        assert!(rows.iter().all(|r| r.ratio.is_none()));
    }
}
