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

use super::{Incoming, Refusal, Scratch};

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
    let tls = d.tls_session();
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
pub(super) fn authorize(
    identity: &Option<Arc<Identity>>,
    verdict: &Verdict,
    route: &Route,
    rq: &Incoming,
    w: &Worker,
    cur: &Current,
) -> Result<Option<Vec<u8>>, Refusal> {
    let Some(authz) = cur.shared.authz.as_ref() else {
        return Ok(None);
    };
    if route.anonymous {
        return Ok(None);
    }
    let anon = Identity::anonymous();
    let id = identity.as_deref().unwrap_or(&anon);
    if matches!(verdict.admitted, Admitted::Answer(_)) {
        let catalog = &cur.shared.rules.catalog;
        let list = crate::validate::openai::models_list(catalog, |m| {
            authz.decide(id, m, "infer").is_some()
        });
        return Ok(Some(list));
    }
    let model = verdict.model.as_ref().map_or("", |(m, _)| m.as_str());
    let m = &w.metrics;
    if let Some(rule) = authz.decide(id, model, "infer") {
        m.inc(&m.authz, &[&route.name, "allow", rule], 1);
        return Ok(None);
    }
    m.inc(&m.authz, &[&route.name, "deny", ""], 1);
    tracing::warn!(target: "audit", request_id = rq.id.as_str(), client = %rq.peer.ip(), route = route.name.as_str(),
        principal = id.principal.as_str(), tenant = id.tenant.as_str(), method = id.method, model,
        decision = "deny", "no authorization rule allows this request");
    Err(Refusal::decision(ClientError::Forbidden.into()).after_validation(&verdict.admitted))
}

/// Who is asking, as the rate limits key it.
fn subject<'a>(
    identity: &'a Option<Arc<Identity>>,
    route: &'a Route,
    rq: &Incoming,
    model: &'a str,
    tokens: u64,
) -> Subject<'a> {
    let (principal, tenant) = identity
        .as_deref()
        .map(|i| (i.principal.as_str(), i.tenant.as_str()))
        .unwrap_or(("", ""));
    Subject {
        ip: rq.peer.ip(),
        principal,
        tenant,
        route: &route.name,
        model,
        tokens,
    }
}

/// Stage 4c, early, before the body is read: a request-rate refusal at a
/// level that depends only on the caller and the route (charges nothing;
/// the full stage runs after validation). `headers` gets the refusal's
/// rate-limit headers.
pub(super) fn rate_limit_early(
    identity: &Option<Arc<Identity>>,
    route: &Route,
    rq: &Incoming,
    w: &Worker,
    cur: &Current,
    headers: &mut String,
) -> Result<(), Refusal> {
    let Some(p) = cur.shared.ratelimit.as_ref() else {
        return Ok(());
    };
    let subject = subject(identity, route, rq, "", 0);
    match cur.shared.limiter.refuse_early(p, &subject, rq.started) {
        None => Ok(()),
        Some(r) => Err(refused(&r, p, &subject, rq, w, headers)),
    }
}

/// Stage 4c, ratelimit: `None` when nothing is limited, the admission (held
/// to the end of the response: concurrency slots, cost correction), or 429.
/// The rate-limit response headers go to `s.limit_headers`.
pub(super) fn rate_limit(
    identity: &Option<Arc<Identity>>,
    verdict: &Verdict,
    route: &Route,
    rq: &Incoming,
    w: &Worker,
    cur: &Current,
    s: &mut Scratch,
) -> Result<Option<Admission>, Refusal> {
    let Some(p) = cur.shared.ratelimit.as_ref() else {
        return Ok(None);
    };
    s.limit_headers.clear();
    let model = verdict.model.as_ref().map_or("", |m| m.0.as_str());
    let f = &verdict.facts;
    let tokens = if p.counts_tokens && (f.prompt_tokens > 0 || f.max_tokens.is_some()) {
        p.cost(model, f.prompt_tokens, f.max_tokens)
    } else {
        0
    };
    let subject = subject(identity, route, rq, model, tokens);
    match cur.shared.limiter.admit_at(p, &subject, rq.started) {
        Ok(a) => {
            let c = &cur.route_counters[route.index];
            c.admitted.inc();
            c.tokens_estimated.inc_by(tokens);
            if let (Some(shown), true) = (a.shown, p.headers_on_success) {
                shown.write_headers(p.headers, &mut s.limit_headers);
            }
            Ok(Some(a))
        }
        Err(r) => {
            let refusal = refused(&r, p, &subject, rq, w, &mut s.limit_headers);
            Err(refusal.after_validation(&verdict.admitted))
        }
    }
}

/// Count, log and write the headers of a rate-limit refusal.
fn refused(
    r: &crate::ratelimit::Refusal,
    p: &crate::ratelimit::Policies,
    s: &Subject<'_>,
    rq: &Incoming,
    w: &Worker,
    headers: &mut String,
) -> Refusal {
    let (level, limit) = (r.level.as_str(), r.limit.as_str());
    w.metrics
        .inc(&w.metrics.ratelimit, &[s.route, "refused", level, limit], 1);
    if let Some(shown) = r.shown {
        shown.write_headers(p.headers, headers);
    }
    tracing::info!(target: "ratelimit", request_id = rq.id.as_str(), client = %s.ip, principal = s.principal, tenant = s.tenant, route = s.route,
        model = s.model, level, limit, cost_tokens = s.tokens, retry_after_s = r.retry_after_s, "request refused by a rate limit");
    Refusal::from_rate_limit(r)
}
