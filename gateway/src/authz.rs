//! Stage 4b — authorization: may this identity use this model with this
//! scope? Declarative rules from `[[authz.rules]]`; default deny; the first
//! rule that matches allows. It runs right after the validate stage because
//! the model is known only once the body has been read and checked.
//!
//! Outcome: `Ok(rule id)` (continue), or 403 with the decision (principal,
//! tenant, model, why) in the audit log and `gateway_authz_decisions_total`.

use crate::authn::Identity;
use crate::config::AuthzRule;

/// A model-name pattern: `*` matches any run of characters.
fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first)
        || !name[first.len()..].ends_with(last)
        || name.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[derive(Debug, Clone)]
pub struct Authz {
    rules: Vec<AuthzRule>,
}

impl Authz {
    pub fn new(rules: &[AuthzRule]) -> Authz {
        Authz {
            rules: rules.to_vec(),
        }
    }

    /// The id of the first rule allowing `id` to use `model` ("" when the
    /// request names none) with `scope`, or `None`: denied.
    pub fn decide(&self, id: &Identity, model: &str, scope: &str) -> Option<&str> {
        let authenticated = id.method != "anonymous";
        self.rules
            .iter()
            .find(|r| {
                let any = |list: &[String], value: &str| {
                    list.is_empty()
                        || list
                            .iter()
                            .any(|x| (x == "*" && authenticated) || x == value)
                };
                any(&r.tenants, &id.tenant)
                    && (r.roles.is_empty() || r.roles.iter().any(|x| id.roles.contains(x)))
                    && any(&r.principals, &id.principal)
                    && r.scopes.iter().any(|s| s == scope)
                    && r.models.iter().any(|m| glob(m, model))
                    && r.claims
                        .iter()
                        .all(|(k, v)| id.claims.iter().any(|(ck, cv)| ck == k && cv == v))
                    && (r.methods.is_empty() || r.methods.iter().any(|m| m == id.method))
            })
            .map(|r| r.id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn rule(
        id: &str,
        tenants: &[&str],
        roles: &[&str],
        models: &[&str],
        scopes: &[&str],
    ) -> AuthzRule {
        AuthzRule {
            id: id.into(),
            tenants: tenants.iter().map(|s| s.to_string()).collect(),
            roles: roles.iter().map(|s| s.to_string()).collect(),
            principals: Vec::new(),
            models: models.iter().map(|s| s.to_string()).collect(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            claims: BTreeMap::new(),
            methods: Vec::new(),
        }
    }

    fn who(tenant: &str, roles: &[&str]) -> Identity {
        Identity {
            principal: "alice".into(),
            tenant: tenant.into(),
            roles: roles.iter().map(|s| s.to_string()).collect(),
            method: "jwt",
            claims: vec![("tier".into(), "pro".into())],
        }
    }

    #[test]
    fn globs() {
        assert!(glob("llama-3-*", "llama-3-8b"));
        assert!(glob("*-8b", "llama-3-8b"));
        assert!(glob("l*3*b", "llama-3-8b"));
        assert!(!glob("llama-3-*", "llama-2-7b"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exact2"));
        assert!(!glob("ab*ba", "aba"), "prefix and suffix must not overlap");
    }

    #[test]
    fn policy_table() {
        let mut pro = rule("pro-claims", &["beta"], &[], &["*"], &["infer"]);
        pro.claims.insert("tier".into(), "pro".into());
        let z = Authz::new(&[
            rule("acme-llama", &["acme"], &[], &["llama-3-*"], &["infer"]),
            rule("admins", &["*"], &["admin"], &["*"], &["infer", "admin"]),
            pro,
        ]);
        let table: &[(Identity, &str, &str, Option<&str>)] = &[
            (who("acme", &[]), "llama-3-8b", "infer", Some("acme-llama")),
            (who("acme", &[]), "mistral-7b", "infer", None),
            (who("acme", &[]), "llama-3-8b", "admin", None),
            (who("other", &[]), "llama-3-8b", "infer", None),
            (
                who("other", &["admin"]),
                "mistral-7b",
                "admin",
                Some("admins"),
            ),
            (who("beta", &[]), "anything", "infer", Some("pro-claims")),
            (Identity::anonymous(), "llama-3-8b", "infer", None),
            (who("acme", &[]), "", "infer", None),
        ];
        for (id, model, scope, want) in table {
            assert_eq!(
                z.decide(id, model, scope),
                *want,
                "{} {:?} {model} {scope}",
                id.tenant,
                id.roles
            );
        }
        // "*" needs an authenticated caller.
        let open = Authz::new(&[rule("any", &["*"], &[], &["*"], &["infer"])]);
        assert_eq!(open.decide(&Identity::anonymous(), "m", "infer"), None);
        assert_eq!(open.decide(&who("", &[]), "", "infer"), Some("any"));
        assert_eq!(
            Authz::new(&[]).decide(&who("acme", &["admin"]), "m", "infer"),
            None,
            "default deny"
        );
        // A rule for certificates doesn't match the same name from a JWT.
        let mut certs = rule("svc", &[], &[], &["*"], &["infer"]);
        certs.principals = vec!["alice".into()];
        certs.methods = vec!["mtls".into()];
        assert_eq!(
            Authz::new(&[certs]).decide(&who("acme", &[]), "m", "infer"),
            None
        );
    }
}
