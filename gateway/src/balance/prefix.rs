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
//! - [`PrefixIndex`]: per worker and cluster (no lock, no sharing on the
//!   request path), block hash → the backends it was sent to (a bitmask),
//!   bounded: two generations of a hash map, the older dropped when the
//!   newer fills half the capacity (an approximate LRU: a block touched in
//!   the last generation survives). Matching walks the prompt's blocks while
//!   some backend still has every one so far.
//! - [`home`]: rendezvous hashing of the prompt's first blocks over the
//!   candidates: the backend every worker of every gateway would pick for
//!   that prefix with no load and no history. Workers and gateways that
//!   never talk agree on it, so a shared prefix isn't split N ways.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

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

/// Keys are hashes already: use them as they are.
#[derive(Default)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map = HashMap<u64, u64, BuildHasherDefault<PassThrough>>;

/// What one worker sent where, for one cluster: block hash → a bitmask of
/// the backends (by index, the first 64) it was sent to. Bounded by
/// `capacity` blocks in all.
#[derive(Default)]
pub struct PrefixIndex {
    cur: Map,
    prev: Map,
    capacity: usize,
    /// [`PrefixIndex::bytes`] as last added to the cluster's gauge.
    pub reported: usize,
}

/// How far each backend holds a prompt: matched leading blocks per backend
/// index, and the most any backend holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Matches {
    pub per_backend: Vec<u32>,
    pub longest: u32,
    /// The prompt's anchor (its first blocks) was seen before: its prefix
    /// is shared, and its home is worth going to.
    pub anchor_seen: bool,
}

impl PrefixIndex {
    pub fn new(capacity: usize) -> PrefixIndex {
        PrefixIndex {
            cur: Map::default(),
            prev: Map::default(),
            capacity: capacity.max(2),
            reported: 0,
        }
    }

    /// Resize (a reload, or an engine that reported its cache size).
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(2);
    }

    fn get(&self, k: u64) -> u64 {
        self.cur
            .get(&k)
            .or_else(|| self.prev.get(&k))
            .copied()
            .unwrap_or(0)
    }

    /// Leading blocks of `blocks` each backend of `backends` was sent.
    pub fn matches(&self, blocks: &[u64], backends: usize) -> Matches {
        let mut per_backend = vec![0u32; backends];
        let mut all = u64::MAX;
        let mut longest = 0u32;
        for (i, &b) in blocks.iter().enumerate() {
            let m = self.get(b);
            let left = all & m;
            // Backends that just dropped out matched `i` blocks.
            let mut gone = all & !left;
            while gone != 0 {
                let j = gone.trailing_zeros() as usize;
                if j < backends {
                    per_backend[j] = i as u32;
                }
                gone &= gone - 1;
            }
            all = left;
            if all == 0 {
                break;
            }
            longest = i as u32 + 1;
        }
        // Still holding every block.
        let mut full = all;
        while full != 0 && !blocks.is_empty() {
            let j = full.trailing_zeros() as usize;
            if j < backends {
                per_backend[j] = blocks.len() as u32;
            }
            full &= full - 1;
        }
        let anchor = blocks.len().min(ANCHOR_BLOCKS);
        let anchor_seen = anchor > 0 && self.get(blocks[anchor - 1]) != 0;
        Matches {
            per_backend,
            longest,
            anchor_seen,
        }
    }

    /// `blocks` were sent to `backend` (index < 64; others aren't indexed).
    pub fn insert(&mut self, blocks: &[u64], backend: usize) {
        if backend >= 64 {
            return;
        }
        let bit = 1u64 << backend;
        for &b in blocks {
            if self.cur.len() * 2 >= self.capacity {
                // The older generation goes; what it alone held is forgotten.
                self.prev = std::mem::take(&mut self.cur);
            }
            let old = self.prev.get(&b).copied().unwrap_or(0);
            *self.cur.entry(b).or_insert(old) |= bit;
        }
    }

    /// Blocks indexed (both generations).
    pub fn len(&self) -> usize {
        self.cur.len() + self.prev.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cur.is_empty() && self.prev.is_empty()
    }

    /// Memory held, bytes (hash map slots: key, mask, control byte).
    pub fn bytes(&self) -> usize {
        (self.cur.capacity() + self.prev.capacity()) * 17
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

    #[test]
    fn matching_finds_each_backends_leading_run() {
        let a = blocks_of("m", &[b'a'; 640]); // 10 blocks
        let mut ix = PrefixIndex::new(1 << 16);
        ix.insert(&a[..6], 0);
        ix.insert(&a, 2);
        ix.insert(&a[..3], 1);
        let m = ix.matches(&a, 3);
        assert_eq!(m.per_backend, vec![6, 3, 10]);
        assert_eq!(m.longest, 10);
        assert!(m.anchor_seen);
        // A block missing in the middle ends a backend's run there.
        let b = blocks_of("m", &[b'b'; 640]);
        let mut ix = PrefixIndex::new(1 << 16);
        ix.insert(&b[..2], 0);
        ix.insert(&b[3..], 0);
        assert_eq!(ix.matches(&b, 1).per_backend, vec![2]);
        let fresh = PrefixIndex::new(16);
        let m = fresh.matches(&b, 2);
        assert_eq!(
            (m.per_backend, m.longest, m.anchor_seen),
            (vec![0, 0], 0, false)
        );
    }

    #[test]
    fn the_index_stays_within_its_capacity() {
        let mut ix = PrefixIndex::new(1000);
        for g in 0..50u8 {
            let b = blocks_of("m", &[g; 64 * 40]);
            ix.insert(&b, usize::from(g % 4));
            assert!(ix.len() <= 1000, "{} blocks", ix.len());
        }
        // The newest prompts are still there; the oldest are gone.
        let newest = blocks_of("m", &[49; 64 * 40]);
        assert_eq!(ix.matches(&newest, 4).per_backend[1], 40);
        let oldest = blocks_of("m", &[0; 64 * 40]);
        assert_eq!(ix.matches(&oldest, 4).longest, 0);
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
