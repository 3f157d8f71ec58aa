//! Signing keys, JWKS documents and tokens for the authentication tests and
//! benches: ES256 and EdDSA keys from rcgen, RSA from the openssl CLI.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// A signing key and its public JWK.
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: serde_json::Value,
    /// The public key as PEM (for the alg-confusion attack: HMAC with it).
    pub public_pem: String,
}

impl SigningKey {
    pub fn es256(kid: &str) -> SigningKey {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw(); // 0x04 || X || Y
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": B64.encode(&raw[1..33]), "y": B64.encode(&raw[33..65]),
        });
        SigningKey {
            kid: kid.into(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwk,
            public_pem: kp.public_key_pem(),
        }
    }

    pub fn eddsa(kid: &str) -> SigningKey {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let jwk = serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig", "alg": "EdDSA",
            "x": B64.encode(kp.public_key_raw()),
        });
        SigningKey {
            kid: kid.into(),
            alg: Algorithm::EdDSA,
            encoding: EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwk,
            public_pem: kp.public_key_pem(),
        }
    }

    /// RS256 with a 2048-bit key made by `openssl genpkey` in `dir`.
    pub fn rs256(kid: &str, dir: &Path) -> SigningKey {
        let key = dir.join(format!("{kid}.rsa.pem"));
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let k = key.to_str().unwrap();
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            k,
        ]);
        let modulus = run(&["rsa", "-in", k, "-noout", "-modulus"]);
        let hex = modulus.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let public_pem = run(&["rsa", "-in", k, "-pubout"]);
        let jwk = serde_json::json!({
            "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
            "n": B64.encode(&n), "e": "AQAB",
        });
        SigningKey {
            kid: kid.into(),
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_pem(std::fs::read(&key).unwrap().as_slice()).unwrap(),
            jwk,
            public_pem,
        }
    }

    /// A signed token with `claims`.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.encoding).unwrap()
    }
}

/// A JWKS document with these keys' public halves.
pub fn jwks(keys: &[&SigningKey]) -> String {
    serde_json::json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
        .to_string()
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Standard claims for `sub` at `iss`/`aud`, valid for an hour.
pub fn claims(iss: &str, aud: &str, sub: &str, tenant: &str) -> serde_json::Value {
    let t = now();
    serde_json::json!({ "iss": iss, "aud": aud, "sub": sub, "tenant": tenant, "roles": ["user"],
        "iat": t, "nbf": t - 5, "exp": t + 3600 })
}

/// Hex SHA-256 of an API key (what the config stores).
pub fn key_digest(key: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, key.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Base64url without padding (for hand-made tokens).
pub fn b64(data: &[u8]) -> String {
    B64.encode(data)
}
