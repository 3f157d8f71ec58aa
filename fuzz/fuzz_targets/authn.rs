//! The authentication path: a bearer value (JWT or API key) and an API-key
//! header, as a request carries them, through the real `Authn` with an HS256
//! issuer and two API keys. Never a panic; a caller is accepted only with a
//! configured key, byte for byte, or a token that an independent check
//! (jsonwebtoken with the issuer's secret, HS256 only, its issuer and
//! audience, not expired) also accepts — so `alg: none`, another algorithm,
//! a bad signature, a wrong issuer or audience and an expired token all fail.
#![no_main]
use std::cell::RefCell;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

use gateway::authn::{Authn, TokenCache};
use gateway::config::AuthMethod;

const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef0123";
const KEYS: [&[u8]; 2] = [b"sk-fuzz-key-one", b"sk-fuzz-key-two"];
const ISS: &str = "https://idp.fuzz";
const AUD: &str = "inference";

fn authn() -> &'static Authn {
    static A: OnceLock<Authn> = OnceLock::new();
    A.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("gw-fuzz-authn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secret"), SECRET).unwrap();
        let sha = |k: &[u8]| gateway::authn::hex(&ring_sha256(k));
        let text = format!(
            "[clusters.a]\nbackends = [\"127.0.0.1:1\"]\n[[routes]]\ncluster = \"a\"\n\
             [[authn.jwt]]\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\nalgorithms = [\"HS256\"]\n\
             hs256_secret_file = \"{}\"\nleeway = \"0s\"\n\
             [[authn.api_keys]]\nclient = \"one\"\ntenant = \"acme\"\nsha256 = [\"{}\"]\n\
             [[authn.api_keys]]\nclient = \"two\"\ntenant = \"beta\"\nsha256 = [\"{}\"]\n",
            dir.join("secret").display(),
            sha(KEYS[0]),
            sha(KEYS[1])
        );
        let c = gateway::config::Checked::from_str(&text, "fuzz").unwrap();
        Authn::new(&c.config.authn, Vec::new()).unwrap()
    })
}

fn ring_sha256(b: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .try_into()
        .unwrap()
}

fn independently_valid(token: &str) -> bool {
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_issuer(&[ISS]);
    v.set_audience(&[AUD]);
    v.leeway = 0;
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    jsonwebtoken::decode::<serde_json::Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(SECRET),
        &v,
    )
    .is_ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&how, rest)) = data.split_first() else {
        return;
    };
    let (a, b) = match rest.iter().position(|&c| c == 0xff) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (bearer, key) = match how % 3 {
        0 => (Some(a), b),
        1 => (b, Some(a)),
        _ => (Some(a), b.or(Some(a))),
    };
    let accepted = [AuthMethod::Jwt, AuthMethod::ApiKey];
    let cache = RefCell::new(TokenCache::new(16));
    let Ok(id) = authn().authenticate_credentials(bearer, key, &accepted, None, &cache) else {
        return;
    };
    match id.method {
        "api_key" => {
            // The header's key is taken, else a bearer that isn't a JWT.
            let used = key.or(bearer).unwrap();
            assert!(
                KEYS.contains(&used),
                "accepted an API key that is not configured"
            );
        }
        "jwt" => {
            let token = std::str::from_utf8(bearer.unwrap()).unwrap();
            assert!(
                independently_valid(token),
                "accepted a token jsonwebtoken refuses: {token}"
            );
            assert_eq!(id.tenant, "acme");
        }
        m => panic!("identity by {m}"),
    }
});
