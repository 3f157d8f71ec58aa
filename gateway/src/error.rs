//! Every way a request can fail, typed by where it came from, mapped to one
//! JSON error shape in one place ([`ProxyError::to_response`]).
//!
//! - [`ClientError`]: the client sent something we refuse (4xx). Whether the
//!   connection survives depends on whether its framing is still trustworthy.
//! - [`UpstreamError`]: the backend failed (502/504). Connect failures may be
//!   retried on another backend; anything after bytes were sent may not.
//! - `Internal`: a bug or resource exhaustion on our side (500).

use std::fmt::Write as _;

/// The client's fault. Each variant is a metric label (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("request head larger than the limit")]
    HeaderTooLarge,
    #[error("too many request headers")]
    TooManyHeaders,
    #[error("request target longer than the limit")]
    UriTooLong,
    #[error("request body larger than the limit")]
    BodyTooLarge,
    #[error("transfer coding not implemented")]
    UnsupportedTransferCoding,
    #[error("method not implemented")]
    UnsupportedMethod,
    #[error("unsupported expectation")]
    ExpectationFailed,
    #[error("timed out reading the request head")]
    HeaderTimeout,
    #[error("timed out reading the request body")]
    BodyTimeout,
    #[error("no route for the request")]
    NoRoute,
    #[error("client closed the connection mid-request")]
    ClientClosed,
    #[error("client stopped reading the response")]
    SendTimeout,
    /// 401: no or bad credentials (the reason goes to metrics and logs, not the client).
    #[error("authentication required")]
    Unauthenticated { challenge: &'static str },
    /// 403: authenticated, not allowed (the decision goes to the audit log).
    #[error("not allowed")]
    Forbidden,
}

impl ClientError {
    pub fn reason(self) -> &'static str {
        match self {
            ClientError::Malformed(_) => "malformed",
            ClientError::HeaderTooLarge => "header_too_large",
            ClientError::TooManyHeaders => "too_many_headers",
            ClientError::UriTooLong => "uri_too_long",
            ClientError::BodyTooLarge => "body_too_large",
            ClientError::UnsupportedTransferCoding => "unsupported_transfer_coding",
            ClientError::UnsupportedMethod => "unsupported_method",
            ClientError::ExpectationFailed => "expectation_failed",
            ClientError::HeaderTimeout => "header_timeout",
            ClientError::BodyTimeout => "body_timeout",
            ClientError::NoRoute => "no_route",
            ClientError::ClientClosed => "client_closed",
            ClientError::SendTimeout => "send_timeout",
            ClientError::Unauthenticated { .. } => "unauthenticated",
            ClientError::Forbidden => "forbidden",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            ClientError::Malformed(_) => 400,
            ClientError::HeaderTooLarge | ClientError::TooManyHeaders => 431,
            ClientError::UriTooLong => 414,
            ClientError::BodyTooLarge => 413,
            ClientError::UnsupportedTransferCoding | ClientError::UnsupportedMethod => 501,
            ClientError::ExpectationFailed => 417,
            ClientError::HeaderTimeout | ClientError::BodyTimeout => 408,
            ClientError::NoRoute => 404,
            // Nobody is listening; logged as 499 like nginx does.
            ClientError::ClientClosed | ClientError::SendTimeout => 499,
            ClientError::Unauthenticated { .. } => 401,
            ClientError::Forbidden => 403,
        }
    }

    /// Whether the request framing can no longer be trusted, so the
    /// connection must close after the error response (RFC 9112 §6.3).
    pub fn must_close(self) -> bool {
        !matches!(
            self,
            ClientError::NoRoute | ClientError::Unauthenticated { .. } | ClientError::Forbidden
        )
    }
}

/// The backend's fault. Each variant is a metric label (`kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection refused")]
    ConnectRefused,
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("connect failed")]
    ConnectError,
    #[error("connection reset")]
    Reset,
    #[error("connection closed before a complete response")]
    Closed,
    #[error("invalid response")]
    BadResponse,
    #[error("response timed out")]
    ResponseTimeout,
    #[error("request exceeded its total time limit")]
    TotalTimeout,
    #[error("backend stopped reading the request")]
    SendTimeout,
    #[error("every backend is at its connection limit")]
    Saturated,
}

impl UpstreamError {
    pub fn kind(self) -> &'static str {
        match self {
            UpstreamError::ConnectRefused => "connect_refused",
            UpstreamError::ConnectTimeout => "connect_timeout",
            UpstreamError::ConnectError => "connect_error",
            UpstreamError::Reset => "reset",
            UpstreamError::Closed => "closed",
            UpstreamError::BadResponse => "bad_response",
            UpstreamError::ResponseTimeout => "response_timeout",
            UpstreamError::TotalTimeout => "total_timeout",
            UpstreamError::SendTimeout => "send_timeout",
            UpstreamError::Saturated => "saturated",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            UpstreamError::ResponseTimeout
            | UpstreamError::TotalTimeout
            | UpstreamError::SendTimeout => 504,
            UpstreamError::Saturated => 503,
            _ => 502,
        }
    }

    /// Safe to try another backend: nothing of the request reached this one.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            UpstreamError::ConnectRefused
                | UpstreamError::ConnectTimeout
                | UpstreamError::ConnectError
        )
    }

    pub fn from_io(e: &std::io::Error) -> UpstreamError {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionReset | BrokenPipe | ConnectionAborted => UpstreamError::Reset,
            ConnectionRefused => UpstreamError::ConnectRefused,
            UnexpectedEof => UpstreamError::Closed,
            TimedOut => UpstreamError::ResponseTimeout,
            _ => UpstreamError::Reset,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("internal error")]
    Internal,
}

impl ProxyError {
    pub fn status(self) -> u16 {
        match self {
            ProxyError::Client(c) => c.status(),
            ProxyError::Upstream(u) => u.status(),
            ProxyError::Internal => 500,
        }
    }

    /// The `type` field of the JSON error: stable, documented, safe to show.
    pub fn error_type(self) -> &'static str {
        match self {
            ProxyError::Client(c) => match c {
                ClientError::Malformed(_) => "invalid_request",
                ClientError::HeaderTooLarge | ClientError::TooManyHeaders => {
                    "request_header_too_large"
                }
                ClientError::UriTooLong => "uri_too_long",
                ClientError::BodyTooLarge => "payload_too_large",
                ClientError::UnsupportedTransferCoding | ClientError::UnsupportedMethod => {
                    "not_implemented"
                }
                ClientError::ExpectationFailed => "expectation_failed",
                ClientError::HeaderTimeout | ClientError::BodyTimeout => "request_timeout",
                ClientError::NoRoute => "not_found",
                ClientError::ClientClosed | ClientError::SendTimeout => "client_closed",
                ClientError::Unauthenticated { .. } => "authentication_error",
                ClientError::Forbidden => "permission_denied",
            },
            ProxyError::Upstream(u) if u.status() == 504 => "gateway_timeout",
            ProxyError::Upstream(UpstreamError::Saturated) => "service_unavailable",
            ProxyError::Upstream(_) => "bad_gateway",
            ProxyError::Internal => "internal_error",
        }
    }

    /// A message for the client that names the problem, never our internals
    /// (no backend addresses, no OS error strings).
    pub fn public_message(self) -> &'static str {
        match self {
            ProxyError::Client(c) => match c {
                ClientError::Malformed(m) => m,
                ClientError::HeaderTooLarge => {
                    "the request head is larger than this gateway accepts"
                }
                ClientError::TooManyHeaders => {
                    "the request has more headers than this gateway accepts"
                }
                ClientError::UriTooLong => "the request target is longer than this gateway accepts",
                ClientError::BodyTooLarge => "the request body is larger than this route accepts",
                ClientError::UnsupportedTransferCoding => {
                    "only the chunked transfer coding is supported"
                }
                ClientError::UnsupportedMethod => "this method is not supported",
                ClientError::ExpectationFailed => "only `Expect: 100-continue` is supported",
                ClientError::HeaderTimeout => "the request head was not received in time",
                ClientError::BodyTimeout => "the request body was not received in time",
                ClientError::NoRoute => "no route matches this request",
                ClientError::ClientClosed => "the client closed the connection",
                ClientError::SendTimeout => "the client stopped reading",
                ClientError::Unauthenticated { .. } => {
                    "valid credentials are required (a bearer token or an API key)"
                }
                ClientError::Forbidden => "these credentials do not allow this request",
            },
            ProxyError::Upstream(u) => match u {
                UpstreamError::ResponseTimeout => "the upstream service did not respond in time",
                UpstreamError::TotalTimeout => "the request took longer than this route allows",
                UpstreamError::ConnectRefused
                | UpstreamError::ConnectTimeout
                | UpstreamError::ConnectError => "the upstream service is unavailable",
                UpstreamError::Saturated => "the upstream service is at capacity; retry shortly",
                _ => "the upstream service failed to answer",
            },
            ProxyError::Internal => "internal error",
        }
    }

    pub fn must_close(self) -> bool {
        match self {
            ProxyError::Client(c) => c.must_close(),
            ProxyError::Upstream(_) => false,
            ProxyError::Internal => true,
        }
    }

    /// Label used in `gateway_request_errors_total{source,kind}`.
    pub fn source_and_kind(self) -> (&'static str, &'static str) {
        match self {
            ProxyError::Client(c) => ("client", c.reason()),
            ProxyError::Upstream(u) => ("upstream", u.kind()),
            ProxyError::Internal => ("internal", "internal"),
        }
    }

    /// The error's answer: status, type, message, `Retry-After` (503) and,
    /// for a 401, its challenge.
    pub fn body(self) -> ErrorBody<'static> {
        let challenge = match self {
            ProxyError::Client(ClientError::Unauthenticated { challenge }) => Some(challenge),
            _ => None,
        };
        ErrorBody {
            status: self.status(),
            error_type: self.error_type(),
            message: self.public_message(),
            code: None,
            param: None,
            retry_after: (self.status() == 503).then_some(1),
            challenge,
            headers: "",
            dialect: Dialect::Gateway,
        }
    }

    /// Append a complete HTTP/1.1 error response to `out`.
    pub fn to_response(self, request_id: &str, close: bool, out: &mut Vec<u8>) {
        self.body().write(request_id, close, out);
    }
}

/// Which clients read a gateway-made error, so which shape they expect.
/// A route's protocol decides it; requests no route matched get `Gateway`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// `{"error":{"type","message","request_id"[,"code"][,"param"]}}`,
    /// `param` a JSON pointer.
    #[default]
    Gateway,
    /// OpenAI's API (what the OpenAI SDKs parse): 400 for invalid
    /// parameters, `{"error":{"message","type","param","code"}}` with all
    /// four keys (null when empty), OpenAI's type names, `param` as OpenAI
    /// names a parameter (`messages[0].role`); `pointer` and `request_id`
    /// beside them.
    OpenAi,
    /// The Open Inference Protocol (KServe v2, Triton; what `tritonclient`
    /// parses): `{"error":"<message>"}`, 400 for invalid requests.
    Kserve,
    /// gRPC: a Trailers-Only response, `grpc-status` and `grpc-message`
    /// ([`grpc_status`]); `RESOURCE_EXHAUSTED` with `grpc-retry-pushback-ms`.
    Grpc,
}

impl Dialect {
    /// The status these clients expect for one the gateway would answer:
    /// a request that breaks a rule (422) or has a body of the wrong type
    /// (415) is a plain 400 to OpenAI, vLLM and Triton.
    pub fn status(self, status: u16) -> u16 {
        match (self, status) {
            (Dialect::OpenAi | Dialect::Kserve, 415 | 422) => 400,
            _ => status,
        }
    }

    /// OpenAI's `type` for a status, `code` disambiguating within 429.
    fn openai_type(status: u16, code: Option<&str>) -> &'static str {
        match status {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            408 | 504 => "timeout_error",
            429 if quota_used_up(code) => "insufficient_quota",
            429 => "rate_limit_error",
            503 => "service_unavailable_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }
}

/// A 429's code names a day or month quota (`requests_per_day`, ...).
fn quota_used_up(code: Option<&str>) -> bool {
    code.is_some_and(|c| c.ends_with("_per_day") || c.ends_with("_per_month"))
}

/// A JSON pointer (`/messages/0/role`) the way OpenAI names a parameter
/// (`messages[0].role`); `None` for the whole body.
pub fn openai_param(pointer: &str) -> Option<String> {
    let mut out = String::with_capacity(pointer.len());
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) && !out.is_empty() {
            out.push('[');
            out.push_str(&seg);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The one place a gateway-made error is written, in its route's
/// [`Dialect`]. The status is already the dialect's ([`Dialect::status`]).
pub struct ErrorBody<'a> {
    pub status: u16,
    pub error_type: &'a str,
    pub message: &'a str,
    /// Machine-readable reason (validation errors).
    pub code: Option<&'a str>,
    /// A JSON pointer to the offending field.
    pub param: Option<&'a str>,
    /// Seconds for `Retry-After` (429s, 503s).
    pub retry_after: Option<u64>,
    /// 401: the `WWW-Authenticate` challenge (RFC 9110 §11.6.1).
    pub challenge: Option<&'a str>,
    /// More header lines, each ending in CRLF (the rate-limit headers).
    pub headers: &'a str,
    pub dialect: Dialect,
}

/// The gRPC status code for a refusal's HTTP status (gRPC's own mapping,
/// `doc/http-grpc-status-mapping.md`, plus the gateway's policy answers).
pub fn grpc_status(status: u16) -> u32 {
    match status {
        400 | 413 | 415 | 422 | 431 => 3, // INVALID_ARGUMENT
        401 => 16,                        // UNAUTHENTICATED
        403 => 7,                         // PERMISSION_DENIED
        404 => 5,                         // NOT_FOUND
        429 => 8,                         // RESOURCE_EXHAUSTED
        499 => 1,                         // CANCELLED
        501 => 12,                        // UNIMPLEMENTED
        502..=503 => 14,                  // UNAVAILABLE
        408 | 504 => 4,                   // DEADLINE_EXCEEDED
        _ => 13,                          // INTERNAL
    }
}

impl ErrorBody<'_> {
    /// The JSON body in this error's dialect.
    pub fn json(&self, request_id: &str) -> String {
        let v = match self.dialect {
            // gRPC clients read the status from trailers (`grpc_status`);
            // an HTTP/1.1 client on a gRPC route gets the gateway's shape.
            Dialect::Gateway | Dialect::Grpc => {
                let mut err = serde_json::json!({
                    "type": self.error_type,
                    "message": self.message,
                    "request_id": request_id,
                });
                if let Some(c) = self.code {
                    err["code"] = c.into();
                }
                if let Some(p) = self.param {
                    err["param"] = p.into();
                }
                serde_json::json!({ "error": err })
            }
            Dialect::OpenAi => serde_json::json!({ "error": {
                "message": self.message,
                "type": Dialect::openai_type(self.status, self.code),
                "param": self.param.and_then(openai_param),
                "code": self.code,
                "pointer": self.param,
                "request_id": request_id,
            }}),
            Dialect::Kserve => {
                let message = match self.param {
                    Some(p) if !p.is_empty() => format!("{} (at {p})", self.message),
                    _ => self.message.to_string(),
                };
                serde_json::json!({ "error": message })
            }
        };
        v.to_string()
    }

    /// Append a complete HTTP/1.1 response to `out`.
    pub fn write(&self, request_id: &str, close: bool, out: &mut Vec<u8>) {
        let body = self.json(request_id);
        let mut head = String::with_capacity(256);
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {}\r\ncache-control: no-store\r\n",
            self.status,
            reason_phrase(self.status),
            body.len(),
            request_id
        );
        if let Some(s) = self.retry_after {
            let _ = write!(head, "retry-after: {s}\r\n");
        }
        if self.dialect == Dialect::OpenAi && self.status == 429 && quota_used_up(self.code) {
            // A used-up quota comes back at the window's end, not in the
            // seconds the OpenAI SDKs would wait: tell them not to retry.
            head.push_str("x-should-retry: false\r\n");
        }
        if let Some(c) = self.challenge {
            let _ = write!(head, "www-authenticate: {c}\r\n");
        }
        head.push_str(self.headers);
        if close {
            head.push_str("connection: close\r\n");
        }
        head.push_str("\r\n");
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(body.as_bytes());
    }
}

/// The `type` of a validation error, by status.
pub fn validation_type(status: u16) -> &'static str {
    match status {
        404 => "not_found",
        408 => "request_timeout",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "validation_failed",
        _ => "invalid_request",
    }
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        499 => "Client Closed Request",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_the_shape_and_no_internals() {
        let mut out = Vec::new();
        ProxyError::Upstream(UpstreamError::ConnectRefused).to_response("abc", false, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["type"], "bad_gateway");
        assert_eq!(v["error"]["request_id"], "abc");
        assert!(!body.contains("refused"), "OS-level detail leaked: {body}");
    }

    fn body_of(b: &ErrorBody<'_>) -> (String, serde_json::Value) {
        let mut out = Vec::new();
        b.write("rid", false, &mut out);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_string(), serde_json::from_str(body).unwrap())
    }

    fn sample(
        dialect: Dialect,
        status: u16,
        code: Option<&'static str>,
        param: Option<&'static str>,
    ) -> ErrorBody<'static> {
        ErrorBody {
            status: dialect.status(status),
            error_type: "validation_failed",
            message: "`temperature` must be between 0 and 2",
            code,
            param,
            retry_after: None,
            challenge: None,
            headers: "",
            dialect,
        }
    }

    #[test]
    fn openai_errors_as_the_sdk_reads_them() {
        let b = sample(
            Dialect::OpenAi,
            422,
            Some("out_of_range"),
            Some("/messages/0/role"),
        );
        let (head, v) = body_of(&b);
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
        let e = &v["error"];
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["param"], "messages[0].role");
        assert_eq!(e["code"], "out_of_range");
        assert_eq!(e["pointer"], "/messages/0/role");
        // All four keys, null when empty.
        let (_, v) = body_of(&sample(Dialect::OpenAi, 404, None, None));
        for k in ["message", "type", "param", "code"] {
            assert!(v["error"].get(k).is_some(), "{k} missing: {v}");
        }
        assert!(v["error"]["param"].is_null() && v["error"]["code"].is_null());
        assert_eq!(v["error"]["type"], "not_found_error");
        for (status, code, ty) in [
            (401, None, "authentication_error"),
            (403, None, "permission_error"),
            (429, Some("requests"), "rate_limit_error"),
            (429, Some("tokens_per_day"), "insufficient_quota"),
            (503, None, "service_unavailable_error"),
            (502, None, "server_error"),
            (413, None, "invalid_request_error"),
        ] {
            let (head, v) = body_of(&sample(Dialect::OpenAi, status, code, None));
            assert_eq!(v["error"]["type"], ty, "{status}");
            assert_eq!(
                head.contains("x-should-retry: false"),
                ty == "insufficient_quota",
                "{head}"
            );
        }
    }

    #[test]
    fn openai_param_names() {
        for (pointer, param) in [
            ("/temperature", Some("temperature")),
            (
                "/messages/0/content/2/text",
                Some("messages[0].content[2].text"),
            ),
            ("/input/3", Some("input[3]")),
            ("/a~1b/c~0d", Some("a/b.c~d")),
            ("", None),
        ] {
            assert_eq!(openai_param(pointer).as_deref(), param, "{pointer}");
        }
    }

    #[test]
    fn kserve_errors_are_one_string() {
        let (head, v) = body_of(&sample(
            Dialect::Kserve,
            422,
            Some("shape_mismatch"),
            Some("/inputs/0/data"),
        ));
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
        let msg = v["error"]
            .as_str()
            .expect("a string, as tritonclient reads it");
        assert!(
            msg.contains("temperature") && msg.ends_with("(at /inputs/0/data)"),
            "{msg}"
        );
        assert_eq!(v.as_object().unwrap().len(), 1);
        // The gateway's own shape keeps 422 and the pointer.
        let (head, v) = body_of(&sample(Dialect::Gateway, 422, None, Some("/x")));
        assert!(head.starts_with("HTTP/1.1 422 "));
        assert_eq!(v["error"]["param"], "/x");
    }

    #[test]
    fn statuses() {
        assert_eq!(ProxyError::from(ClientError::UriTooLong).status(), 414);
        assert_eq!(ProxyError::from(ClientError::TooManyHeaders).status(), 431);
        assert_eq!(ProxyError::from(UpstreamError::TotalTimeout).status(), 504);
        assert!(!ProxyError::from(ClientError::NoRoute).must_close());
        assert!(ProxyError::from(ClientError::Malformed("x")).must_close());
    }
}
