//! The admission stages: who is calling (authn), may it use this model
//! (authz), may it send this now (ratelimit, early and full). Each returns
//! what it found or a [`Refusal`]; each counts and logs its own decision.

use std::sync::Arc;

use crate::authn::Identity;
use crate::downstream::Downstream;
use crate::error::{ClientError, ProxyError};
use crate::ratelimit::{Admission, Subject};
use crate::route::Route;
use crate::validate::{Admitted, Verdict};
use crate::worker::{Current, Worker};

use super::{Call, Incoming, Refusal};

/// Stage 3b, authn: `None` when the route is anonymous or nothing is
/// configured (identity headers the client sent are stripped either way),
/// the caller's identity, or 401.
pub(super) fn authenticate<D: Downstream>(
    d: &mut D,
    rq: &mut Incoming,
    route: &Route,
    w: &Worker,
    cur: &Current,
) -> Result<Option<Arc<Identity>>, Refusal> {
    let m = &w.metrics;
    let authn = match cur.shared.authn.as_ref() {
        Some(a) if !route.anonymous => a,
        configured => {
            let names = &cur.shared.authn_settings.identity_headers;
            crate::authn::strip_identity_headers(names, d.pending(), &mut rq.head);
            if configured.is_some() {
                m.inc(&m.authn, &[&route.name, "anonymous", "ok"], 1);
            }
            return Ok(None);
        }
    };
    let tls = d.client_certificate();
    let buf = d.pending();
    match authn.authenticate(buf, &mut rq.head, &route.auth, tls, &w.token_cache) {
        Ok(id) => {
            m.inc(&m.authn, &[&route.name, id.method, "ok"], 1);
            Ok(Some(id))
        }
        Err(e) => {
            m.inc(&m.authn, &[&route.name, "none", e.reason], 1);
            tracing::info!(target: "audit", request_id = rq.id.as_str(), route = route.name.as_str(), reason = e.reason, "authentication refused");
            let challenge = e.challenge();
            let e = ProxyError::Client(ClientError::Unauthenticated { challenge });
            Err(Refusal::from_error(e))
        }
    }
}

/// Stage 4b, authz: may this identity use the model validation found? A
/// model list is not refused but filtered (`Some(list)`): each caller sees
/// the models it may use. 403 otherwise (audit log).
pub(super) fn authorize(c: &Call<'_>, verdict: &Verdict) -> Result<Option<Vec<u8>>, Refusal> {
    let Some(authz) = c.cur.shared.authz.as_ref() else {
        return Ok(None);
    };
    if c.route.anonymous {
        return Ok(None);
    }
    let anon = Identity::anonymous();
    let id = c.identity.unwrap_or(&anon);
    if matches!(verdict.admitted, Admitted::Answer(_)) {
        let catalog = &c.cur.shared.rules.catalog;
        let list = crate::validate::openai::models_list(catalog, |m| {
            authz.decide(id, m, "infer").is_some()
        });
        return Ok(Some(list));
    }
    let (model, route, m) = (c.model(verdict), c.route.name.as_str(), &c.w.metrics);
    if let Some(rule) = authz.decide(id, model, "infer") {
        m.inc(&m.authz, &[route, "allow", rule], 1);
        return Ok(None);
    }
    m.inc(&m.authz, &[route, "deny", ""], 1);
    tracing::warn!(target: "audit", request_id = c.rq.id.as_str(), client = %c.rq.peer.ip(), route,
        principal = id.principal.as_str(), tenant = id.tenant.as_str(), method = id.method, model,
        decision = "deny", "no authorization rule allows this request");
    Err(Refusal::decision(ClientError::Forbidden.into()).after_validation(&verdict.admitted))
}

/// Who is asking, as the rate limits key it.
fn subject<'a>(c: &Call<'a>, model: &'a str, tokens: u64) -> Subject<'a> {
    let (principal, tenant) = c
        .identity
        .map(|i| (i.principal.as_str(), i.tenant.as_str()))
        .unwrap_or(("", ""));
    Subject {
        ip: c.rq.peer.ip(),
        principal,
        tenant,
        route: &c.route.name,
        model,
        tokens,
    }
}

/// Stage 4c, early, before the body is read: a request-rate refusal at a
/// level that depends only on the caller and the route (charges nothing;
/// the full stage runs after validation). `headers` gets the refusal's
/// rate-limit headers.
pub(super) fn rate_limit_early(c: &Call<'_>, headers: &mut String) -> Result<(), Refusal> {
    let Some(p) = c.cur.shared.ratelimit.as_ref() else {
        return Ok(());
    };
    let subject = subject(c, "", 0);
    match c.cur.shared.limiter.refuse_early(p, &subject, c.rq.started) {
        None => Ok(()),
        Some(r) => Err(refused(c, &r, p, &subject, headers)),
    }
}

/// Stage 4c, ratelimit: `None` when nothing is limited, the admission (held
/// to the end of the response: concurrency slots, cost correction), or 429.
/// The rate-limit response headers go to `headers`.
pub(super) fn rate_limit(
    c: &Call<'_>,
    verdict: &Verdict,
    headers: &mut String,
) -> Result<Option<Admission>, Refusal> {
    let Some(p) = c.cur.shared.ratelimit.as_ref() else {
        return Ok(None);
    };
    headers.clear();
    let model = c.model(verdict);
    let f = &verdict.facts;
    let tokens = if p.counts_tokens && (f.prompt_tokens > 0 || f.max_tokens.is_some()) {
        p.cost(model, f.prompt_tokens, f.max_tokens)
    } else {
        0
    };
    let subject = subject(c, model, tokens);
    match c.cur.shared.limiter.admit_at(p, &subject, c.rq.started) {
        Ok(a) => {
            let counters = &c.cur.route_counters[c.route.index];
            counters.admitted.inc();
            counters.tokens_estimated.inc_by(tokens);
            if let (Some(shown), true) = (a.shown, p.headers_on_success) {
                shown.write_headers(p.headers, headers);
            }
            Ok(Some(a))
        }
        Err(r) => Err(refused(c, &r, p, &subject, headers).after_validation(&verdict.admitted)),
    }
}

/// Count, log and write the headers of a rate-limit refusal.
fn refused(
    c: &Call<'_>,
    r: &crate::ratelimit::Refusal,
    p: &crate::ratelimit::Policies,
    s: &Subject<'_>,
    headers: &mut String,
) -> Refusal {
    let (level, limit, m) = (r.level.as_str(), r.limit.as_str(), &c.w.metrics);
    m.inc(&m.ratelimit, &[s.route, "refused", level, limit], 1);
    if let Some(shown) = r.shown {
        shown.write_headers(p.headers, headers);
    }
    tracing::info!(target: "ratelimit", request_id = c.rq.id.as_str(), client = %s.ip, principal = s.principal, tenant = s.tenant, route = s.route,
        model = s.model, level, limit, cost_tokens = s.tokens, retry_after_s = r.retry_after_s, "request refused by a rate limit");
    Refusal::from_rate_limit(r)
}
