//! The rate-limit stage's decision cost: one bucket (a principal's request
//! rate), uncontended on one core; the same key hammered from 2 and from
//! every core at once (the worst case: one hot tenant, one cache line); and
//! a full decision across every level with cost and concurrency.
//!
//! `cargo bench -p gateway-benches --bench ratelimit` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use gateway::ratelimit::{Limiter, Policies, RateLimitSettings, Subject};

fn setup(text: &str) -> (Arc<Policies>, Arc<Limiter>) {
    let s: RateLimitSettings = toml::from_str(text).unwrap();
    (
        Arc::new(Policies::new(&s)),
        Arc::new(Limiter::new(&s, None, None)),
    )
}

fn subject<'a>(principal: &'a str) -> Subject<'a> {
    Subject {
        ip: "10.1.2.3".parse().unwrap(),
        principal,
        tenant: "acme",
        route: "chat",
        model: "llama-3-8b",
        tokens: 300,
    }
}

/// Every admission admitted: rates far above what a bench can reach.
const ONE: &str = "[principal]\nrequests_per_second = 1e12\nburst = 1000000\n";
const ALL: &str = "[principal]\nrequests_per_second = 1e12\nburst = 1000000\ntokens_per_minute = 1e15\ntoken_burst = 1000000000000\nconcurrency = 100000\n\
[tenant]\nrequests_per_second = 1e12\nburst = 1000000\nrequests_per_day = 1000000000000\n\
[route]\nrequests_per_second = 1e12\nburst = 1000000\n[model]\nrequests_per_second = 1e12\nburst = 1000000\n\
[ip]\nrequests_per_second = 1e12\nburst = 1000000\n";

/// `iters` decisions, each at a request arrival time 1 µs after the last
/// (the pipeline passes the time the request arrived: no clock read in the
/// decision); every one must be admitted.
fn run(l: &Limiter, p: &Policies, s: &Subject<'_>, iters: u64) -> Duration {
    // Arrival times only move forward, across criterion's calls too.
    thread_local!(static LAST: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) });
    let base = LAST
        .with(|c| c.get())
        .map_or_else(Instant::now, |t| t.max(Instant::now()));
    LAST.with(|c| c.set(Some(base + Duration::from_nanos(iters * 1000))));
    let t = Instant::now();
    let mut ok = 0u64;
    for i in 0..iters {
        let at = base + Duration::from_nanos(i * 1000);
        ok += u64::from(black_box(l.admit_at(p, black_box(s), at)).is_ok());
    }
    let d = t.elapsed();
    assert_eq!(ok, iters, "the bench measures admissions");
    d
}

fn single(c: &mut Criterion) {
    let (p, l) = setup(ONE);
    let s = subject("alice");
    c.bench_function("ratelimit/one_level_1_core", |b| {
        b.iter_custom(|iters| run(&l, &p, &s, iters))
    });
    c.bench_function("ratelimit/one_level_1_core_with_clock_read", |b| {
        b.iter(|| black_box(l.admit(&p, black_box(&s)).is_ok()))
    });
    let (p, l) = setup(ALL);
    c.bench_function(
        "ratelimit/all_levels_tokens_quota_concurrency_1_core",
        |b| b.iter_custom(|iters| run(&l, &p, &s, iters)),
    );
}

/// ns per decision on the measuring thread while `others` threads hammer the same key.
fn contended(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    for others in [1, cores - 1] {
        let (p, l) = setup(ONE);
        let stop = Arc::new(AtomicBool::new(false));
        let hs: Vec<_> = (0..others)
            .map(|_| {
                let (p, l, stop) = (p.clone(), l.clone(), stop.clone());
                std::thread::spawn(move || {
                    let s = subject("alice");
                    while !stop.load(Ordering::Relaxed) {
                        black_box(l.admit(&p, &s).is_ok());
                    }
                })
            })
            .collect();
        let s = subject("alice");
        c.bench_function(
            &format!("ratelimit/one_level_same_key_{}_cores", others + 1),
            |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    for _ in 0..iters {
                        black_box(l.admit(&p, black_box(&s)).is_ok());
                    }
                    t.elapsed()
                })
            },
        );
        stop.store(true, Ordering::Relaxed);
        for h in hs {
            h.join().unwrap();
        }
        if others == cores - 1 {
            break;
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = single, contended
}
criterion_main!(benches);
