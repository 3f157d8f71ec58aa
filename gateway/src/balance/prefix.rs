//! Prefix-cache awareness: which backend already holds a prompt's KV blocks.
//!
//! Model servers cache the KV blocks of prompts they have seen (vLLM's
//! automatic prefix caching, SGLang's radix cache); a request whose prefix
//! is cached skips that part of its prefill. The gateway can't see those
//! caches, so it keeps its own approximate index of what it *sent* where:
//!
//! - [`BlockHasher`]: the prompt as the engine will see it (chat messages in
//!   order with their roles, tool definitions, completions `prompt`,
//!   responses `instructions` + `input`) cut into 64-byte blocks (≈ 16
//!   tokens at 4 bytes a token: one engine block), each block's hash chained
//!   to the previous one's, seeded with the model name and `cache_salt`.
//!   A block's hash names the whole prefix up to it. The last partial block
//!   is not a block (engines don't cache it either).
//! - [`PrefixIndex`]: per cluster, shared by every worker through atomic
//!   words (no lock), (block, backend) → when it was sent there on the
//!   backend's *cache clock* ([`Holder`]): the blocks that backend has had
//!   to allocate for what it was sent (the prompt blocks it didn't hold,
//!   the output's). The engine's cache is an LRU of a known size, so a
//!   block is taken to be held while fewer than that many blocks were
//!   allocated there since it was last sent. Matching bisects each
//!   backend's run of held blocks.
//! - [`home`]: rendezvous hashing of the prompt's first blocks over the
//!   candidates: the backend every worker of every gateway would pick for
//!   that prefix with no load and no history. Workers and gateways that
//!   never talk agree on it, so a shared prefix isn't split N ways.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes a block: 16 tokens at the gateway's 4 bytes a token.
pub const BLOCK_BYTES: usize = 64;
/// Tokens a block stands for.
pub const BLOCK_TOKENS: u64 = 16;
/// The blocks whose hash anchors a prompt's home (256 bytes ≈ 64 tokens).
pub const ANCHOR_BLOCKS: usize = 4;

const K0: u64 = 0xa076_1d64_78bd_642f;
const K1: u64 = 0xe703_7ed1_a0b4_28db;
const K2: u64 = 0x8ebc_6af0_9c88_c6e3;
const K3: u64 = 0x5899_65cc_7537_4cc3;

/// 64×64 → 128-bit multiply, folded: the mixing step of wyhash-style hashes.
#[inline(always)]
fn fold(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

#[inline(always)]
fn word(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
}

/// One block chained to the hash of everything before it: four independent
/// folds over the 8 words, then one with the previous hash. Not
/// cryptographic: a client that engineers a collision only moves where its
/// own request is routed.
#[inline(always)]
fn block_hash(prev: u64, b: &[u8]) -> u64 {
    debug_assert_eq!(b.len(), BLOCK_BYTES);
    let a = fold(word(b, 0) ^ K0, word(b, 1) ^ prev);
    let c = fold(word(b, 2) ^ K1, word(b, 3) ^ K2);
    let d = fold(word(b, 4) ^ K3, word(b, 5) ^ K0);
    let e = fold(word(b, 6) ^ K1, word(b, 7) ^ K3);
    fold(a ^ c ^ K2, d ^ e ^ prev.rotate_left(29))
}

/// A short string (model, salt, separators) mixed into a seed.
fn mix_str(seed: u64, s: &[u8]) -> u64 {
    let mut h = seed ^ (s.len() as u64).wrapping_mul(K1);
    for c in s.chunks(8) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        h = fold(h ^ u64::from_le_bytes(w), K0);
    }
    h
}

/// Cuts a prompt, written in pieces, into chained block hashes.
pub struct BlockHasher {
    prev: u64,
    buf: [u8; BLOCK_BYTES],
    len: usize,
    blocks: Vec<u64>,
    max_blocks: usize,
}

impl BlockHasher {
    /// Seeded with the model name and the request's `cache_salt` (prompts
    /// with different salts never share blocks, as in vLLM). At most
    /// `max_blocks` blocks are kept (the index's reach).
    pub fn new(model: &str, salt: Option<&str>, max_blocks: usize) -> BlockHasher {
        let mut seed = mix_str(K3, model.as_bytes());
        if let Some(s) = salt {
            seed = mix_str(seed ^ K2, s.as_bytes());
        }
        BlockHasher {
            prev: seed,
            buf: [0; BLOCK_BYTES],
            len: 0,
            blocks: Vec::new(),
            max_blocks,
        }
    }

    /// Append prompt text.
    pub fn write(&mut self, mut bytes: &[u8]) {
        if self.blocks.len() >= self.max_blocks {
            return;
        }
        if self.len > 0 {
            let k = (BLOCK_BYTES - self.len).min(bytes.len());
            self.buf[self.len..self.len + k].copy_from_slice(&bytes[..k]);
            self.len += k;
            bytes = &bytes[k..];
            if self.len < BLOCK_BYTES {
                return;
            }
            let full = self.buf;
            self.push(&full);
            self.len = 0;
        }
        let mut chunks = bytes.chunks_exact(BLOCK_BYTES);
        for c in &mut chunks {
            if self.blocks.len() >= self.max_blocks {
                return;
            }
            self.push(c);
        }
        let rest = chunks.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.len = rest.len();
    }

    fn push(&mut self, block: &[u8]) {
        self.prev = block_hash(self.prev, block);
        self.blocks.push(self.prev);
    }

    /// A separator between parts (messages), so `["ab","c"]` and `["a","bc"]` differ.
    pub fn separate(&mut self, tag: &[u8]) {
        self.write(&[0x1e]);
        self.write(tag);
        self.write(&[0x1f]);
    }

    /// The full blocks' hashes, in prompt order.
    pub fn finish(self) -> Vec<u64> {
        self.blocks
    }
}

/// What the gateway sent where, for one cluster, shared by every worker
/// without a lock: (block hash, backend) → when it was last sent there, on
/// that backend's cache clock. A fixed table of 4-way buckets of atomic
/// words (a 24-bit tag of the key, the backend's position, the clock's low
/// 32 bits): memory is bounded and set when the cluster is configured; a
/// new key takes its bucket's empty slot, else the stalest. Two workers racing on a slot lose one entry: a routing hint, not
/// a correctness matter.
pub struct PrefixIndex {
    slots: Box<[AtomicU64]>,
    /// Buckets − 1 (a power of two).
    mask: usize,
}

const WAYS: usize = 4;

impl std::fmt::Debug for PrefixIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixIndex")
            .field("slots", &self.slots.len())
            .finish()
    }
}

/// One backend as the index sees it. Its cache is modelled as an LRU of
/// `blocks` blocks whose clock counts the blocks it has had to allocate
/// (the prompt blocks it didn't hold, and the output): a block sent at
/// clock `t` is held while fewer than `blocks` blocks were allocated since
/// — the engine evicts its least recently used blocks first, and a
/// prompt's earlier blocks are used whenever its later ones are.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// Mixed into block hashes: [`holder_key`] of its address.
    pub key: u64,
    /// Its cache clock now (blocks allocated there, all workers).
    pub clock: u64,
    /// Its cache size, blocks.
    pub blocks: u64,
}

impl Holder {
    /// Blocks allocated since a stamp (the clock's low 32 bits). A stamp
    /// newer than this view of the clock (another worker sent since it was
    /// read) is 0 old, not 2^32.
    fn age(&self, stamp: u32) -> u64 {
        ((self.clock as u32).wrapping_sub(stamp) as i32).max(0) as u64
    }
}

/// The key a backend's entries carry in the index (by address, so that a
/// reload reordering the backends doesn't move what they hold).
pub fn holder_key(a: &std::net::SocketAddr) -> u64 {
    fold(addr_key(a) ^ K2, K1) | 1
}

/// How far each backend holds a prompt: matched leading blocks per backend
/// index, and the most any backend holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Matches {
    pub per_backend: Vec<u32>,
    pub longest: u32,
    /// The prompt's anchor (its first blocks) was sent somewhere before
    /// (held there still or not): its prefix is shared.
    pub anchor_seen: bool,
    /// The backends as the match saw them, for indexing the prompt at the
    /// one chosen (left to the caller that owns them; empty here).
    pub holders: Vec<Holder>,
}

impl PrefixIndex {
    /// Room for about `entries` (block, backend) pairs (rounded up to a
    /// power of two, at least one bucket).
    pub fn new(entries: usize) -> PrefixIndex {
        let slots = entries.max(WAYS).next_power_of_two();
        PrefixIndex {
            slots: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            mask: slots / WAYS - 1,
        }
    }

    fn bucket(&self, k: u64) -> &[AtomicU64] {
        let b = (k as usize & self.mask) * WAYS;
        &self.slots[b..b + WAYS]
    }

    /// A key's tag: its top 24 bits, never 0 (an empty slot).
    fn tag(k: u64) -> u64 {
        (k >> 40) | 1
    }

    fn stamp(&self, block: u64, h: &Holder) -> Option<u32> {
        let k = block ^ h.key;
        let t = Self::tag(k);
        self.bucket(k).iter().find_map(|s| {
            let v = s.load(Ordering::Relaxed);
            (v >> 40 == t).then_some(v as u32)
        })
    }

    fn held(&self, block: u64, h: &Holder) -> bool {
        self.stamp(block, h).is_some_and(|t| h.age(t) < h.blocks)
    }

    /// Leading blocks of `blocks` each of `holders` holds. A block's stamp
    /// is never older than a later block's (the whole prompt is stamped at
    /// once, and its later blocks are never sent without its earlier
    /// ones), so each backend's run is found by bisection: a few lookups
    /// for a prompt of any length.
    pub fn matches(&self, blocks: &[u64], holders: &[Holder]) -> Matches {
        let per_backend: Vec<u32> = holders
            .iter()
            .map(|h| {
                if blocks.first().is_none_or(|&b| !self.held(b, h)) {
                    return 0;
                }
                // blocks[..lo] held; blocks[hi..] not.
                let (mut lo, mut hi) = (1usize, blocks.len());
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    if self.held(blocks[mid], h) {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                lo as u32
            })
            .collect();
        let anchor = blocks.len().min(ANCHOR_BLOCKS);
        let anchor_seen = anchor > 0
            && holders
                .iter()
                .any(|h| self.stamp(blocks[anchor - 1], h).is_some());
        Matches {
            longest: per_backend.iter().copied().max().unwrap_or(0),
            per_backend,
            anchor_seen,
            holders: Vec::new(),
        }
    }

    /// `blocks` were sent to `holders[at]`, at its cache clock `stamp`. A
    /// new entry takes an empty slot of its bucket, else the one its
    /// backend's cache is likeliest to have evicted (the oldest for the
    /// size of its cache).
    pub fn insert(&self, blocks: &[u64], holders: &[Holder], at: usize, stamp: u64) {
        let Some(h) = holders.get(at) else { return };
        let owner = (at.min(255) as u64) << 32;
        for &b in blocks {
            let k = b ^ h.key;
            let t = Self::tag(k);
            let bucket = self.bucket(k);
            let mut best = (0usize, -1.0f64);
            for (j, s) in bucket.iter().enumerate() {
                let v = s.load(Ordering::Relaxed);
                if v >> 40 == t {
                    best = (j, f64::INFINITY);
                    break;
                }
                let staleness = match holders.get((v >> 32) as u8 as usize) {
                    _ if v == 0 => f64::MAX,
                    Some(o) => o.age(v as u32) as f64 / o.blocks.max(1) as f64,
                    None => f64::MAX,
                };
                if staleness > best.1 {
                    best = (j, staleness);
                }
            }
            bucket[best.0].store(t << 40 | owner | u64::from(stamp as u32), Ordering::Relaxed);
        }
    }

    /// Entries in use (a scan: for tests and the admin API, not requests).
    pub fn len(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) != 0)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries it has room for.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Memory held, bytes.
    pub fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<AtomicU64>()
    }
}

/// The prompt's home among the candidates `cand`: weighted rendezvous
/// hashing of its anchor block over the backends' addresses (`weights`:
/// each backend's share of the pool's capacity, by index; equal weights:
/// plain rendezvous hashing). The same answer in every worker and every
/// gateway that sees the same pool and weights; a backend leaving moves
/// only its own prompts. `None` without a block.
pub fn home(
    blocks: &[u64],
    addrs: &[std::net::SocketAddr],
    weights: &[f64],
    cand: &[usize],
) -> Option<usize> {
    let anchor = *blocks.get(blocks.len().min(ANCHOR_BLOCKS).checked_sub(1)?)?;
    let score = |i: usize| {
        let h = fold(anchor ^ K1, addr_key(&addrs[i]) ^ K2);
        // A uniform draw in (0, 1); the largest w / −ln(u) wins, so each
        // backend is home to a share of prompts proportional to its weight.
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        weights.get(i).copied().unwrap_or(1.0).max(1e-9) / -u.ln()
    };
    cand.iter()
        .copied()
        .max_by(|&a, &b| score(a).total_cmp(&score(b)))
}

fn addr_key(a: &std::net::SocketAddr) -> u64 {
    let ip = match a.ip() {
        std::net::IpAddr::V4(v) => u64::from(u32::from(v)),
        std::net::IpAddr::V6(v) => {
            let x = u128::from(v);
            (x as u64) ^ ((x >> 64) as u64)
        }
    };
    fold(ip ^ K0, u64::from(a.port()) ^ K3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks_of(model: &str, text: &[u8]) -> Vec<u64> {
        let mut h = BlockHasher::new(model, None, usize::MAX);
        h.write(text);
        h.finish()
    }

    #[test]
    fn blocks_are_chained_and_pieces_dont_matter() {
        let text: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let whole = blocks_of("m", &text);
        assert_eq!(whole.len(), 1000 / BLOCK_BYTES);
        // Written in odd pieces: the same blocks.
        let mut h = BlockHasher::new("m", None, usize::MAX);
        for piece in text.chunks(37) {
            h.write(piece);
        }
        assert_eq!(h.finish(), whole);
        // A change in block 3 changes it and every later block, none before.
        let mut t2 = text.clone();
        t2[3 * BLOCK_BYTES + 5] ^= 1;
        let other = blocks_of("m", &t2);
        assert_eq!(other[..3], whole[..3]);
        assert!(other[3..].iter().zip(&whole[3..]).all(|(a, b)| a != b));
        // Another model or salt: nothing shared.
        assert_ne!(blocks_of("n", &text)[0], whole[0]);
        let mut s = BlockHasher::new("m", Some("tenant-a"), usize::MAX);
        s.write(&text);
        assert_ne!(s.finish()[0], whole[0]);
        // The reach is bounded.
        let mut c = BlockHasher::new("m", None, 4);
        c.write(&text);
        assert_eq!(c.finish(), whole[..4]);
    }

    /// `n` backends whose caches hold `blocks` blocks, clocks at `clock`.
    fn holders(n: usize, clock: u64, blocks: u64) -> Vec<Holder> {
        (0..n)
            .map(|i| Holder {
                key: holder_key(&format!("10.0.0.{i}:8000").parse().unwrap()),
                clock,
                blocks,
            })
            .collect()
    }

    #[test]
    fn matching_finds_each_backends_leading_run() {
        let a = blocks_of("m", &[b'a'; 640]); // 10 blocks
        let ix = PrefixIndex::new(1 << 16);
        let hs = holders(3, 0, 1000);
        ix.insert(&a[..6], &hs, 0, 0);
        ix.insert(&a, &hs, 2, 0);
        ix.insert(&a[..3], &hs, 1, 0);
        let m = ix.matches(&a, &hs);
        assert_eq!(m.per_backend, vec![6, 3, 10]);
        assert_eq!(m.longest, 10);
        // Nothing sent anywhere: nothing held.
        let b = blocks_of("m", &[b'b'; 640]);
        let m = ix.matches(&b, &hs);
        assert_eq!(
            (m.per_backend, m.longest, m.anchor_seen),
            (vec![0, 0, 0], 0, false)
        );
    }

    #[test]
    fn what_the_cache_has_evicted_since_is_not_held() {
        // A 20-block cache: a block sent at clock t is held while the
        // clock is below t + 20.
        let a = blocks_of("m", &[b'a'; 640]);
        let ix = PrefixIndex::new(1 << 12);
        let hs = holders(1, 10, 20);
        ix.insert(&a, &hs, 0, 10);
        let at = |clock: u64| ix.matches(&a, &holders(1, clock, 20));
        assert_eq!(at(10).per_backend, vec![10]);
        assert_eq!(at(29).per_backend, vec![10]);
        let gone = at(30);
        assert_eq!(gone.per_backend, vec![0]);
        assert!(gone.anchor_seen, "evicted, but seen before: shared");
        // Its first 4 blocks sent again later (another prompt sharing
        // them): those are held, the rest not.
        ix.insert(&a[..4], &holders(1, 40, 20), 0, 40);
        assert_eq!(at(45).per_backend, vec![4]);
        // A stamp newer than the clock as read (another worker sent since)
        // is fresh, not ancient.
        ix.insert(&a, &holders(1, 60, 20), 0, 60);
        assert_eq!(at(55).per_backend, vec![10]);
        // Lookups are by backend: another one's clock and key see nothing.
        let other = Holder {
            key: holder_key(&"10.9.9.9:1".parse().unwrap()),
            clock: 45,
            blocks: 20,
        };
        assert_eq!(ix.matches(&a, &[other]).per_backend, vec![0]);
    }

    #[test]
    fn the_index_stays_within_its_memory_and_keeps_the_newest() {
        let ix = PrefixIndex::new(1000);
        assert_eq!(ix.capacity(), 1024);
        assert_eq!(ix.bytes(), 1024 * 8);
        for g in 0..200u8 {
            let b = blocks_of("m", &[g; 64 * 40]);
            let clock = u64::from(g) * 40;
            ix.insert(&b, &holders(4, clock, 1 << 20), usize::from(g % 4), clock);
        }
        // 8,000 entries into 1,024 slots: the stalest went, the newest
        // prompt is whole.
        let hs = holders(4, 199 * 40, 1 << 20);
        let newest = blocks_of("m", &[199; 64 * 40]);
        assert_eq!(ix.matches(&newest, &hs).per_backend[3], 40);
        let oldest = blocks_of("m", &[0; 64 * 40]);
        assert!(ix.matches(&oldest, &hs).per_backend[0] < 40);
    }

    #[test]
    fn home_is_stable_and_spreads() {
        let addrs: Vec<std::net::SocketAddr> = (0..4)
            .map(|i| format!("10.0.0.{i}:8000").parse().unwrap())
            .collect();
        let cand = [0, 1, 2, 3];
        let mut seen = [0usize; 4];
        for g in 0..400u32 {
            let b = blocks_of("m", format!("{g:>6}").repeat(60).as_bytes());
            let h = home(&b, &addrs, &[1.0; 4], &cand).unwrap();
            assert_eq!(home(&b, &addrs, &[1.0; 4], &cand), Some(h), "stable");
            seen[h] += 1;
            // Without its home among the candidates, another one; the rest keep theirs.
            let others: Vec<usize> = cand.iter().copied().filter(|&i| i != h).collect();
            assert_ne!(home(&b, &addrs, &[1.0; 4], &others), Some(h));
        }
        assert!(seen.iter().all(|&n| n > 60), "{seen:?}");
        assert_eq!(home(&[], &addrs, &[1.0; 4], &cand), None);
        // Weighted: homes in proportion to capacity.
        let mut seen = [0usize; 4];
        for g in 0..2000u32 {
            let b = blocks_of("m", format!("{g:>6}").repeat(60).as_bytes());
            seen[home(&b, &addrs, &[8.0, 4.0, 2.0, 1.0], &cand).unwrap()] += 1;
        }
        let share = |i: usize| seen[i] as f64 / 2000.0;
        assert!(
            (share(0) - 8.0 / 15.0).abs() < 0.05 && (share(3) - 1.0 / 15.0).abs() < 0.03,
            "{seen:?}"
        );
    }
}
