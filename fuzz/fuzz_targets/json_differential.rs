//! Differential: the gateway's JSON path (pre-scan, tensor elision, simd-json
//! tape, checks on the tape) must reach the verdict the same checks reach on
//! a plain DOM of the same bytes, for OpenAI and KServe bodies; and a body
//! serde_json rejects is never accepted. Limits (depth, element count) have
//! no DOM counterpart: a body refused for one is not compared. A DOM keeps
//! the last of duplicate keys where the gateway refuses them: a body with a
//! duplicate key must be refused, and `duplicate_key` only for such a body.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

use gateway::validate::kserve::{check_infer, Binary, Outcome};
use gateway::validate::openai::{self, Endpoint};
use gateway::validate::{check_json, JsonKind, Rules};

fn rules() -> &'static Rules {
    static R: OnceLock<Rules> = OnceLock::new();
    R.get_or_init(|| {
        let text = "[clusters.a]\nbackends = [\"127.0.0.1:1\"]\n[[routes]]\ncluster = \"a\"\nprotocol = \"kserve\"\n[[models]]\nname = \"m\"\n[[models]]\nname = \"llama\"\n";
        Rules::new(&gateway::config::Checked::from_str(text, "fuzz").unwrap())
    })
}

const LIMITS: [&str; 2] = ["json_too_deep", "json_too_many_elements"];

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let rules = rules();
    let kind = match which % 4 {
        0 => JsonKind::OpenAi(Endpoint::Chat, None),
        1 => JsonKind::OpenAi(Endpoint::Completions, None),
        2 => JsonKind::OpenAi(Endpoint::Embeddings, None),
        _ => JsonKind::KserveInfer("m", None, None),
    };
    let gateway = check_json(kind, body, rules, None)
        .map(|_| ())
        .map_err(|r| r.reason);
    if let Err(reason) = &gateway {
        if LIMITS.contains(reason) {
            return;
        }
    }
    let serde_ok = serde_json::from_slice::<serde_json::Value>(body).is_ok();
    if !serde_ok {
        // serde_json's own recursion limit (128) is not a JSON error.
        if body.iter().filter(|&&b| b == b'[' || b == b'{').count() < 128 {
            assert!(
                gateway.is_err(),
                "accepted a body serde_json rejects: {:?}",
                String::from_utf8_lossy(body)
            );
        }
        return;
    }
    let dup = serde_json::from_slice::<NoDup>(body).is_err();
    if dup || gateway == Err("duplicate_key") {
        assert!(
            dup && gateway.is_err(),
            "duplicate keys: {dup}, gateway {gateway:?}: {:?}",
            String::from_utf8_lossy(body)
        );
        return;
    }
    let mut copy = body.to_vec();
    let dom = match simd_json::to_borrowed_value(&mut copy) {
        Err(_) => Err("invalid_json"),
        Ok(v) => match kind {
            JsonKind::OpenAi(ep, _) => openai::check(ep, &v, &rules.catalog, None)
                .map(|_| ())
                .map_err(|r| r.reason),
            _ => match check_infer(&v, &[], Binary::default()) {
                Ok(_) => Ok(()),
                Err(Outcome::Rejected(r)) => Err(r.reason),
                Err(Outcome::Recheck) => Err("recheck"),
            },
        },
    };
    assert_eq!(gateway, dom, "{:?}", String::from_utf8_lossy(body));
});

/// Any JSON value, refused when an object repeats a key.
struct NoDup;

impl<'de> serde::Deserialize<'de> for NoDup {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<NoDup, D::Error> {
        d.deserialize_any(NoDupVisitor)
    }
}

struct NoDupVisitor;

impl<'de> serde::de::Visitor<'de> for NoDupVisitor {
    type Value = NoDup;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<NoDup, E> {
        Ok(NoDup)
    }
    fn visit_i64<E>(self, _: i64) -> Result<NoDup, E> {
        Ok(NoDup)
    }
    fn visit_u64<E>(self, _: u64) -> Result<NoDup, E> {
        Ok(NoDup)
    }
    fn visit_f64<E>(self, _: f64) -> Result<NoDup, E> {
        Ok(NoDup)
    }
    fn visit_str<E>(self, _: &str) -> Result<NoDup, E> {
        Ok(NoDup)
    }
    fn visit_unit<E>(self) -> Result<NoDup, E> {
        Ok(NoDup)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<NoDup, A::Error> {
        while a.next_element::<NoDup>()?.is_some() {}
        Ok(NoDup)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<NoDup, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(k) = a.next_key::<String>()? {
            if !seen.insert(k) {
                return Err(serde::de::Error::custom("duplicate key"));
            }
            a.next_value::<NoDup>()?;
        }
        Ok(NoDup)
    }
}
