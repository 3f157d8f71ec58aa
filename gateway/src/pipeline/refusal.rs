//! The one refusal type every stage's "no" becomes, and the one place that
//! counts and logs it ([`Refusal::record`]). A protocol driver turns it into
//! its protocol's answer (HTTP/1.1: `http1/`): the fields say what
//! to answer and whether the connection can carry another request.

use std::borrow::Cow;
use std::net::SocketAddr;

use crate::error::{validation_type, Dialect, ErrorBody, ProxyError};
use crate::metrics::status_label;
use crate::worker::{Current, Worker};

use super::Incoming;

/// A request the gateway answers itself with an error.
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    /// The `type` of the JSON error: stable, documented, safe to show.
    pub error_type: &'static str,
    /// Safe to show: names the rule, never the payload or our internals.
    pub message: Cow<'static, str>,
    /// Machine-readable reason (a validation rule, a rate limit's name).
    pub code: Option<&'static str>,
    /// JSON pointer to the offending field.
    pub param: Option<String>,
    /// Seconds for `Retry-After` (429, 503).
    pub retry_after: Option<u64>,
    /// 401: the `WWW-Authenticate` challenge (RFC 9110 §11.6.1).
    pub challenge: Option<&'static str>,
    /// Answer with the rate-limit headers the ratelimit stage wrote.
    pub limit_headers: bool,
    /// The request head is off the client buffer already.
    pub head_consumed: bool,
    /// The request body was read to its end (or there is none to read).
    pub body_read: bool,
    /// The request's framing can't be trusted any more (RFC 9112 §6.3):
    /// close after answering.
    pub must_close: bool,
    /// The client is gone: nobody to answer.
    pub client_gone: bool,
    /// What [`Refusal::record`] counts and logs.
    pub record: Record,
    /// Whose clients read the answer (the route's protocol).
    pub dialect: Dialect,
}

/// How a refusal is counted, beside `gateway_requests_total{route, status}`.
#[derive(Debug)]
pub enum Record {
    /// A failure of the request or its transport:
    /// `gateway_request_errors_total{source, kind}`.
    Error {
        source: &'static str,
        kind: &'static str,
    },
    /// A policy decision its stage counted and logged (authz audit, rate limit).
    Decision,
    /// A validation rejection: `gateway_validation_rejections_total{route, model, reason}`.
    Validation { model: Option<String> },
    /// Counted and logged with the exchange already (upstream failures).
    Counted,
}

impl Refusal {
    /// A refusal for a typed proxy error (codec, route, authn, authz, upstream).
    pub fn from_error(e: ProxyError) -> Refusal {
        let (source, kind) = e.source_and_kind();
        let b = e.body();
        Refusal {
            status: b.status,
            error_type: b.error_type,
            message: Cow::Borrowed(b.message),
            code: None,
            param: None,
            retry_after: b.retry_after,
            challenge: b.challenge,
            limit_headers: false,
            head_consumed: false,
            body_read: false,
            must_close: e.must_close(),
            client_gone: b.status == 499,
            record: Record::Error { source, kind },
            dialect: Dialect::Gateway,
        }
    }

    /// The validation stage's refusal.
    pub fn from_validation(r: crate::validate::Refused) -> Refusal {
        let j = r.rejection;
        Refusal {
            status: j.status,
            error_type: validation_type(j.status),
            message: Cow::Owned(j.message),
            code: Some(j.reason),
            param: j.pointer,
            retry_after: None,
            challenge: None,
            limit_headers: false,
            head_consumed: r.consumed,
            body_read: r.body_read,
            must_close: false,
            client_gone: j.status == 499,
            record: Record::Validation { model: r.model },
            dialect: Dialect::Gateway,
        }
    }

    /// The ratelimit stage's refusal: 429, or 503 for a fail-closed level
    /// whose Redis is down, with `Retry-After` and the rate-limit headers.
    pub fn from_rate_limit(r: &crate::ratelimit::Refusal) -> Refusal {
        let status = r.status();
        Refusal {
            status,
            error_type: if status == 429 {
                "rate_limit_exceeded"
            } else {
                "service_unavailable"
            },
            message: Cow::Borrowed(r.message()),
            code: Some(r.limit.as_str()),
            param: None,
            retry_after: Some(r.retry_after_s),
            challenge: None,
            limit_headers: true,
            head_consumed: false,
            body_read: false,
            must_close: false,
            client_gone: false,
            record: Record::Decision,
            dialect: Dialect::Gateway,
        }
    }

    /// A policy's own answer (counted and logged by its stage): a status,
    /// its type and reason, and when to come back.
    pub fn policy(
        status: u16,
        error_type: &'static str,
        code: &'static str,
        message: &'static str,
        retry_after: u64,
    ) -> Refusal {
        Refusal {
            status,
            error_type,
            message: Cow::Borrowed(message),
            code: Some(code),
            param: None,
            retry_after: Some(retry_after),
            challenge: None,
            limit_headers: false,
            head_consumed: false,
            body_read: false,
            must_close: false,
            client_gone: false,
            record: Record::Decision,
            dialect: Dialect::Gateway,
        }
    }

    /// A policy decision (counted and logged by its stage).
    pub fn decision(e: ProxyError) -> Refusal {
        Refusal {
            record: Record::Decision,
            ..Refusal::from_error(e)
        }
    }

    /// Refused after the validation stage ran: the body was read (and the
    /// head consumed) only when validation buffered the request.
    pub fn after_validation(self, admitted: &crate::validate::Admitted) -> Refusal {
        let buffered = matches!(admitted, crate::validate::Admitted::Buffered(_));
        Refusal {
            head_consumed: buffered,
            body_read: buffered,
            ..self
        }
    }

    /// The refusal as `dialect`'s clients expect it: its status (a broken
    /// rule is a 400 to OpenAI and KServe clients) and, for OpenAI's, a
    /// `code` on every error (the gateway's reason when no stage gave one).
    pub fn speak(self, dialect: Dialect) -> Refusal {
        let code = match (&self.record, self.code) {
            (Record::Error { kind, .. }, None) if dialect == Dialect::OpenAi => Some(*kind),
            (_, code) => code,
        };
        Refusal {
            status: dialect.status(self.status),
            code,
            dialect,
            ..self
        }
    }

    /// What to answer, in the refusal's dialect; `headers`: the rate-limit
    /// header lines, sent only with a rate-limit refusal.
    pub fn body<'a>(&'a self, headers: &'a str) -> ErrorBody<'a> {
        ErrorBody {
            status: self.status,
            error_type: self.error_type,
            message: &self.message,
            code: self.code,
            param: self.param.as_deref(),
            retry_after: self.retry_after,
            challenge: self.challenge,
            headers: if self.limit_headers { headers } else { "" },
            dialect: self.dialect,
        }
    }

    /// Count and log this refusal: the one place every refused request goes
    /// through, whichever stage refused it and whichever protocol answers.
    pub fn record(&self, rq: &Incoming, w: &Worker, cur: &Current) {
        let m = &w.metrics;
        let route = rq
            .route
            .map_or("", |i| cur.shared.router.routes()[i].name.as_str());
        match &self.record {
            Record::Counted => return,
            Record::Error { source, kind } => m.inc(&m.request_errors, &[source, kind], 1),
            Record::Validation { model } => {
                // A name from the request path becomes a label only when the
                // catalogue has it: clients can't create series at will.
                let model = match model.as_deref() {
                    None => "",
                    Some(m) if cur.shared.rules.catalog.contains(m) => m,
                    Some(_) => "other",
                };
                let labels = [route, model, self.code.unwrap_or("")];
                m.inc(&m.validation_rejections, &labels, 1);
            }
            Record::Decision => {}
        }
        m.inc(
            &m.requests,
            &[route, status_label(self.status), rq.protocol],
            1,
        );
        if cur.shared.access_log {
            self.log(rq, route, rq.peer);
        }
    }

    fn log(&self, rq: &Incoming, route: &str, peer: SocketAddr) {
        let error = match &self.record {
            Record::Error { kind, .. } => kind,
            _ => self.code.unwrap_or(""),
        };
        let message = match self.record {
            Record::Validation { .. } => "request refused by validation",
            _ if route.is_empty() => "request rejected",
            _ => "request refused",
        };
        tracing::info!(target: "access", request_id = rq.id.as_str(), client = %peer.ip(), method = rq.method.as_str(),
            path = rq.path.as_str(), route, status = self.status, error, pointer = self.param.as_deref().unwrap_or(""), "{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ClientError, UpstreamError};
    use crate::validate::{Admitted, Buffered, Refused, Rejection};

    #[test]
    fn only_a_buffered_request_counts_as_read_after_validation() {
        let r = || Refusal::decision(ClientError::Forbidden.into());
        let buffered = Admitted::Buffered(Buffered {
            head: b"POST / HTTP/1.1\r\n\r\n".to_vec(),
            body: b"{}".to_vec(),
        });
        let b = r().after_validation(&buffered);
        assert!(b.body_read && b.head_consumed);
        // A streamed request's body, and a model-list request's, were never
        // read: answering must not leave them to be parsed as the next request.
        for a in [Admitted::Stream, Admitted::Answer(b"[]".to_vec())] {
            let x = r().after_validation(&a);
            assert!(!x.body_read && !x.head_consumed);
        }
    }

    #[test]
    fn proxy_errors_keep_their_status_challenge_and_framing_rules() {
        let no_route = Refusal::from_error(ClientError::NoRoute.into());
        assert_eq!(no_route.status, 404);
        assert!(!no_route.must_close && !no_route.client_gone);
        assert!(matches!(
            no_route.record,
            Record::Error {
                source: "client",
                kind: "no_route"
            }
        ));
        let e = ClientError::Unauthenticated {
            challenge: "Bearer",
        };
        let unauth = Refusal::from_error(e.into());
        assert_eq!((unauth.status, unauth.challenge), (401, Some("Bearer")));
        let bad = Refusal::from_error(ClientError::Malformed("bad chunk").into());
        assert!(bad.must_close, "a request whose framing broke closes");
        let full = Refusal::from_error(UpstreamError::Saturated.into());
        assert_eq!((full.status, full.retry_after), (503, Some(1)));
        let gone = Refusal::from_error(ClientError::ClientClosed.into());
        assert!(gone.client_gone);
    }

    #[test]
    fn validation_refusals_carry_their_rule_and_pointer() {
        let r = Refusal::from_validation(Refused {
            rejection: Rejection::at("/temperature", "out_of_range", "too hot"),
            body_read: true,
            consumed: true,
            model: Some("m".into()),
        });
        assert_eq!(r.status, 422);
        assert_eq!(r.code, Some("out_of_range"));
        assert_eq!(r.param.as_deref(), Some("/temperature"));
        assert!(r.body_read && r.head_consumed && !r.client_gone);
        let gone = Refusal::from_validation(Rejection::new(499, "client_closed", "gone").into());
        assert!(gone.client_gone);
    }
}
