//! Stage 8 hot path: route lookup over a 50-route table.
//!
//! `cargo bench -p gateway-benches --bench route` (add `-- --quick` for a short run).

use std::fmt::Write;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use gateway::config::Config;
use gateway::route::Router;

/// 50 routes the way a multi-tenant deployment grows them: 10 exact hosts,
/// 10 wildcard hosts, then 30 host-less routes mixing exact and prefix paths
/// and method lists. No catch-all, so a lookup can miss.
fn config_toml() -> String {
    let mut t = String::new();
    for c in ["chat", "embed", "rerank", "vision", "admin"] {
        writeln!(t, "[clusters.{c}]\nbackends = [\"127.0.0.1:9000\"]\n").unwrap();
    }
    let clusters = ["chat", "embed", "rerank", "vision", "admin"];
    for i in 0..10 {
        writeln!(
            t,
            "[[routes]]\nname = \"tenant{i}-chat\"\nhost = \"tenant{i}.api.example.com\"\n\
             path_prefix = \"/v1/chat/\"\nmethods = [\"POST\"]\ncluster = \"{}\"\n",
            clusters[i % 5]
        )
        .unwrap();
    }
    for i in 0..10 {
        writeln!(
            t,
            "[[routes]]\nname = \"region{i}\"\nhost = \"*.region{i}.example.net\"\n\
             path_prefix = \"/v1/\"\ncluster = \"{}\"\n",
            clusters[(i + 1) % 5]
        )
        .unwrap();
    }
    for i in 0..30 {
        let path = if i % 3 == 0 {
            format!("path_exact = \"/v1/models/model-{i}\"")
        } else {
            format!("path_prefix = \"/v1/svc{i}/\"")
        };
        let methods = match i % 4 {
            0 => "methods = [\"GET\"]\n",
            1 => "methods = [\"POST\", \"PUT\"]\n",
            _ => "",
        };
        writeln!(
            t,
            "[[routes]]\nname = \"svc{i}\"\n{path}\n{methods}cluster = \"{}\"\n",
            clusters[i % 5]
        )
        .unwrap();
    }
    t
}

fn bench_route(c: &mut Criterion) {
    let toml = config_toml();
    let config = Config::parse(&toml, "bench").expect("bench config parses");
    assert_eq!(config.routes.len(), 50);
    let names: Vec<String> = config.clusters.keys().cloned().collect();
    let router = Router::new(&config, &names);

    // (bench name, Host, request target, method, expected route)
    type Case = (
        &'static str,
        &'static [u8],
        &'static [u8],
        &'static [u8],
        Option<&'static str>,
    );
    let cases: [Case; 4] = [
        // First route of the exact-host group.
        (
            "early_exact_host",
            b"tenant0.api.example.com",
            b"/v1/chat/completions",
            b"POST",
            Some("tenant0-chat"),
        ),
        // Wildcard host, longest-suffix scan.
        (
            "wildcard_host",
            b"gpu7.region9.example.net:443",
            b"/v1/embeddings?x=1",
            b"POST",
            Some("region9"),
        ),
        // Last host-less route: every earlier host-less route is tried first.
        (
            "late_any_host",
            b"unknown.example.org",
            b"/v1/svc29/infer",
            b"PUT",
            Some("svc29"),
        ),
        (
            "miss",
            b"unknown.example.org",
            b"/v2/nothing/here",
            b"GET",
            None,
        ),
    ];

    let mut g = c.benchmark_group("route_50");
    for (name, host, target, method, want) in cases {
        let got = router.route(host, target, method).map(|r| r.name.as_str());
        assert_eq!(got, want, "{name}: wrong route");
        g.bench_function(name, |b| {
            b.iter(|| {
                black_box(router.route(black_box(host), black_box(target), black_box(method)))
                    .is_some()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_route);
criterion_main!(benches);
