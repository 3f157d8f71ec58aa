//! The authentication stage's costs: an ES256 JWT verified from scratch
//! (every request a new token: what a token cache can't help), the same with
//! a hot token served from the per-worker cache, and an API-key check.
//!
//! `cargo bench -p gateway-benches --bench authn` (add `-- --quick` for a short run).

use std::cell::RefCell;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use gateway::authn::{Authn, TokenCache};
use gateway::config::{ApiKeyClient, AuthnSettings, JwtIssuerSettings};
use gateway_tests::jwt::{claims, jwks, key_digest, SigningKey};

const ISS: &str = "https://idp.bench";
const AUD: &str = "inference";

fn authn() -> (Authn, SigningKey) {
    let key = SigningKey::es256("k1");
    let dir = std::env::temp_dir().join(format!("authn-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    std::fs::write(&path, jwks(&[&key])).unwrap();
    let issuer: JwtIssuerSettings = toml::from_str(&format!(
        "issuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\nalgorithms = [\"ES256\"]\njwks_file = \"{}\"\n",
        path.display()
    ))
    .unwrap();
    let settings = AuthnSettings {
        jwt: vec![issuer],
        api_keys: vec![ApiKeyClient {
            client: "bench".into(),
            tenant: "t".into(),
            roles: vec![],
            sha256: vec![key_digest("sk-bench-0123456789")],
        }],
        ..Default::default()
    };
    (Authn::new(&settings, Vec::new()).unwrap(), key)
}

fn bench(c: &mut Criterion) {
    let (a, key) = authn();
    let tokens: Vec<String> = (0..512)
        .map(|i| key.sign(&claims(ISS, AUD, &format!("u{i}"), "t")))
        .collect();

    // A one-entry cache: every distinct token is a full verification.
    let cold = RefCell::new(TokenCache::new(1));
    let mut i = 0;
    c.bench_function("authn/jwt_es256_distinct_tokens", |b| {
        b.iter(|| {
            i = (i + 1) % tokens.len();
            black_box(a.verify_jwt(&tokens[i], &cold).unwrap());
        })
    });

    let hot = RefCell::new(TokenCache::new(10_000));
    a.verify_jwt(&tokens[0], &hot).unwrap();
    c.bench_function("authn/jwt_es256_hot_token_cached", |b| {
        b.iter(|| black_box(a.verify_jwt(black_box(&tokens[0]), &hot).unwrap()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
