//! Prefix-aware balancing's hot path: a prompt cut into chained block
//! hashes, matched against the cluster's index of what was sent where, and
//! the routing decision for a 100k-token prompt.
//!
//! `cargo bench -p gateway-benches --bench prefix` (add `-- --quick` for a short run).

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gateway::balance::prefix::{BlockHasher, Holder, PrefixIndex};
use gateway::balance::{pick, Algorithm, BackendLoad, BalanceSettings, PrefixView, Rng};

/// ~100k tokens of prompt text (4 bytes a token), written the way the
/// validation stage feeds it: one message after another.
fn prompt() -> Vec<Vec<u8>> {
    let para =
        "The quick brown fox jumps over the lazy dog while the model server caches every block. ";
    (0..50)
        .map(|i| format!("message {i}: {}", para.repeat(92)).into_bytes())
        .collect()
}

fn hash(parts: &[Vec<u8>]) -> Vec<u64> {
    let mut h = BlockHasher::new("llama-3-70b", None, 8192);
    for p in parts {
        h.separate(b"user");
        h.write(p);
    }
    h.finish()
}

/// Eight backends with 65,536-block caches.
fn loads() -> Vec<Arc<BackendLoad>> {
    (0..8)
        .map(|i| {
            let b = BackendLoad::new(format!("10.0.0.{i}:8000").parse().unwrap());
            b.service_ns.store(
                10_000_000 + i * 1_000_000,
                std::sync::atomic::Ordering::Relaxed,
            );
            b.cache_blocks
                .store(65_536, std::sync::atomic::Ordering::Relaxed);
            Arc::new(b)
        })
        .collect()
}

fn holders(loads: &[Arc<BackendLoad>]) -> Vec<Holder> {
    loads.iter().map(|b| b.holder(65_536)).collect()
}

fn index_for(blocks: &[u64], loads: &[Arc<BackendLoad>]) -> PrefixIndex {
    // One backend was sent all of it, others shorter runs, and the index
    // holds 200k other blocks besides (sized as the gateway sizes it: 4
    // entries a cache block).
    let ix = PrefixIndex::new(4 * 8 * 65_536);
    let mut other = BlockHasher::new("llama-3-70b", None, usize::MAX);
    other.write(&vec![b'z'; 64 * 200_000]);
    for (i, c) in other.finish().chunks(25_000).enumerate() {
        let at = i % 8;
        ix.insert(c, &holders(loads), at, loads[at].allocate(c.len() as u64));
    }
    for (at, n) in [(3, blocks.len()), (5, blocks.len() / 2), (1, 100)] {
        ix.insert(
            &blocks[..n],
            &holders(loads),
            at,
            loads[at].allocate(n as u64),
        );
    }
    ix
}

fn bench(c: &mut Criterion) {
    let parts = prompt();
    let bytes: usize = parts.iter().map(Vec::len).sum();
    let blocks = hash(&parts);
    let loads = loads();
    let ix = index_for(&blocks, &loads);
    let mut g = c.benchmark_group("prefix");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("hash_100k_tokens", |b| {
        b.iter(|| black_box(hash(black_box(&parts))))
    });
    g.bench_function("hash_and_match_100k_tokens", |b| {
        b.iter(|| {
            let blocks = hash(black_box(&parts));
            black_box(ix.matches(&blocks, &holders(&loads)))
        })
    });
    g.finish();

    // The whole routing decision once the prompt is hashed: match, score
    // eight backends with prefix_aware, and index the blocks at the pick.
    let s = BalanceSettings {
        algorithm: Algorithm::PrefixAware,
        warmup: std::time::Duration::ZERO,
        ..Default::default()
    };
    let (rr, rng) = (Cell::new(0), Rng::new(1));
    let mut g = c.benchmark_group("prefix_route");
    g.bench_function("decide_and_index_100k_tokens", |b| {
        b.iter(|| {
            let hs = holders(&loads);
            let m = ix.matches(&blocks, &hs);
            let view = PrefixView {
                blocks: &blocks,
                matches: &m,
                prompt_tokens: (bytes / 4) as u64,
            };
            let to = pick(&s, &loads, 0, "llama-3-70b", 256, Some(&view), &rr, &rng).unwrap();
            ix.insert(&blocks, &hs, to, loads[to].allocate(4));
            black_box(to)
        })
    });
    g.finish();
    eprintln!(
        "prefix: {} blocks per prompt, index {} entries, {} KiB",
        blocks.len(),
        ix.len(),
        ix.bytes() / 1024
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
