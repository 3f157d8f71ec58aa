//! Stage 7 — validate: understand what is admitted before it reaches a GPU.
//!
//! Outcome of the stage: `Ok(Admitted)` → continue to the upstream stage
//! (with the model and version resolved, and the body either already read
//! and checked, or to be streamed with its checks applied on the way);
//! `Err(Rejection)` → answer with its status (400, 404, 413, 415, 422) and
//! the JSON error shape, which points at the offending field with a JSON
//! pointer and never echoes payload content.

pub mod json;
pub mod kserve;
pub mod kserve_grpc;
pub mod magic;
pub mod multipart;
pub mod openai;
mod prescan;

use std::sync::Arc;

use json::{Json, JsonArr, JsonObj};
use kserve::Outcome;

use crate::catalog::Catalog;
use crate::codec::{BodyKind, ChunkedDecoder, RequestHead};
use crate::config::{Protocol, Timeouts};
use crate::downstream::Downstream;
use crate::filter::FieldFilter;
use crate::io::ReadError;
use crate::route::Route;

/// Why a request was refused by validation. `reason` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub reason: &'static str,
    /// Safe to show: names the rule, never the payload.
    pub message: String,
    /// JSON pointer (RFC 6901) to the offending field, when there is one.
    pub pointer: Option<String>,
}

impl Rejection {
    pub fn new(status: u16, reason: &'static str, message: impl Into<String>) -> Rejection {
        Rejection {
            status,
            reason,
            message: message.into(),
            pointer: None,
        }
    }

    /// 422: well-formed JSON that breaks a rule, at `pointer`.
    pub fn at(
        pointer: impl Into<String>,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Rejection {
        Rejection {
            status: 422,
            reason,
            message: message.into(),
            pointer: Some(pointer.into()),
        }
    }
}

/// Build a JSON pointer from path segments, escaping `~` and `/` (RFC 6901 §3).
pub fn pointer<'a>(segments: impl IntoIterator<Item = Seg<'a>>) -> String {
    let mut p = String::new();
    for s in segments {
        p.push('/');
        match s {
            Seg::Key(k) => {
                for c in k.chars() {
                    match c {
                        '~' => p.push_str("~0"),
                        '/' => p.push_str("~1"),
                        c => p.push(c),
                    }
                }
            }
            Seg::Index(i) => p.push_str(&i.to_string()),
        }
    }
    p
}

/// One step of a JSON pointer.
#[derive(Debug, Clone, Copy)]
pub enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// Limits on the shape of any JSON body (nesting depth, total values).
#[derive(Debug, Clone, Copy)]
pub struct JsonLimits {
    pub max_depth: usize,
    pub max_elements: usize,
}

/// The answer to a body that is not JSON.
fn invalid_json() -> Rejection {
    Rejection::new(
        400,
        "invalid_json",
        "the body is not valid JSON (RFC 8259, UTF-8)",
    )
}

/// Parse once with simd-json (in place: `body` is rewritten) onto `tape`
/// (cleared first) and enforce the shape limits. Malformed JSON or invalid
/// UTF-8 → 400. `extra` values were elided by the pre-scan.
pub fn parse_onto<'b>(
    body: &'b mut [u8],
    limits: JsonLimits,
    buffers: &mut simd_json::Buffers,
    tape: &mut simd_json::Tape<'b>,
    extra: u64,
) -> Result<(), Rejection> {
    // A raw NUL is never valid JSON (not whitespace, and escaped inside a
    // string), but simd-json 0.15 takes NULs after a number or a literal
    // as its end (`[1\0]` parses as `[1]`, found by the json_differential
    // fuzz target): a body the backend's parser refuses would pass here.
    if memchr::memchr(0, body).is_some() {
        return Err(invalid_json());
    }
    simd_json::fill_tape(body, buffers, tape).map_err(|_| invalid_json())?;
    tape_limits(&tape.0, limits, extra)
}

/// The shape limits on a tape, in one pass over its nodes (no recursion, so
/// no depth can exhaust the stack): depth, values (elided ones included),
/// and no object repeating a key.
fn tape_limits(
    nodes: &[simd_json::Node<'_>],
    limits: JsonLimits,
    extra: u64,
) -> Result<(), Rejection> {
    use simd_json::Node as N;
    // Where each open container ends (exclusive), innermost last.
    let mut ends: Vec<usize> = Vec::new();
    let mut keys = 0usize;
    for (i, n) in nodes.iter().enumerate() {
        while ends.last().is_some_and(|&e| e <= i) {
            ends.pop();
        }
        if let N::Object { len, count } | N::Array { len, count } = *n {
            if ends.len() + 1 > limits.max_depth {
                return Err(scan_rejection(ScanError::TooDeep, limits));
            }
            ends.push(i + count + 1);
            if let N::Object { .. } = n {
                keys += len;
                let obj = json::Tape::root(&nodes[i..]).as_obj();
                if obj.is_some_and(repeats_a_key::<json::Tape<'_>>) {
                    return Err(Rejection::new(
                        400,
                        "duplicate_key",
                        "a JSON object in the body repeats a key",
                    ));
                }
            }
        }
    }
    let values = (nodes.len() - keys) as u64 + extra;
    if values > limits.max_elements as u64 {
        return Err(scan_rejection(ScanError::TooManyElements, limits));
    }
    Ok(())
}

/// Parse and check the shape limits only (tests).
pub fn parse(body: &[u8], limits: JsonLimits) -> Result<(), Rejection> {
    let mut copy = body.to_vec();
    let mut tape = simd_json::Tape(Vec::new());
    parse_onto(
        &mut copy,
        limits,
        &mut simd_json::Buffers::default(),
        &mut tape,
        0,
    )
}

/// Depth and element-count limits on a parsed document, and no repeated keys.
pub fn check_limits<'a, J: Json<'a>>(v: J, limits: JsonLimits) -> Result<(), Rejection> {
    let mut elements = 0usize;
    check_shape(v, 1, limits, &mut elements)
}

/// Objects with up to this many members are checked for repeated keys by
/// comparing pairs; larger ones with a hash set.
const PAIRWISE_KEYS: usize = 16;

fn check_shape<'a, J: Json<'a>>(
    v: J,
    depth: usize,
    limits: JsonLimits,
    elements: &mut usize,
) -> Result<(), Rejection> {
    *elements = elements.saturating_add(1);
    if *elements > limits.max_elements {
        return Err(Rejection::new(
            413,
            "json_too_many_elements",
            format!("the JSON body has more than {} values", limits.max_elements),
        ));
    }
    if depth > limits.max_depth {
        return Err(Rejection::new(
            400,
            "json_too_deep",
            format!(
                "the JSON body nests deeper than {} levels",
                limits.max_depth
            ),
        ));
    }
    match v.node() {
        json::Node::Arr(a) => a
            .iter()
            .try_for_each(|x| check_shape(x, depth + 1, limits, elements)),
        json::Node::Obj(o) => {
            // Duplicate keys are read differently by different parsers (first
            // wins here, last wins in Python): what we validated would not be
            // what the backend acts on. Refuse them (RFC 8259 §4 "SHOULD be unique").
            if repeats_a_key::<J>(o) {
                return Err(Rejection::new(
                    400,
                    "duplicate_key",
                    "a JSON object in the body repeats a key",
                ));
            }
            o.iter()
                .try_for_each(|(_, x)| check_shape(x, depth + 1, limits, elements))
        }
        _ => Ok(()),
    }
}

fn repeats_a_key<'a, J: Json<'a>>(o: J::Obj) -> bool {
    let n = o.len();
    if n < 2 {
        return false;
    }
    if n <= PAIRWISE_KEYS {
        let mut seen: [&str; PAIRWISE_KEYS] = [""; PAIRWISE_KEYS];
        for (k, (key, _)) in o.iter().enumerate() {
            if seen[..k].contains(&key) {
                return true;
            }
            seen[k] = key;
        }
        return false;
    }
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::with_capacity(n);
    o.iter().any(|(key, _)| !seen.insert(key))
}

pub use prescan::{depth_within, scan, ScanError};

fn scan_rejection(e: ScanError, limits: JsonLimits) -> Rejection {
    match e {
        ScanError::TooDeep => Rejection::new(
            400,
            "json_too_deep",
            format!(
                "the JSON body nests deeper than {} levels",
                limits.max_depth
            ),
        ),
        ScanError::TooManyElements => Rejection::new(
            413,
            "json_too_many_elements",
            format!("the JSON body has more than {} values", limits.max_elements),
        ),
    }
}

/// Bodies above this size are pre-scanned (depth, value count) before
/// simd-json builds anything: a tape takes up to 24 bytes per value, so a
/// large body of tiny values would otherwise cost a worker many times its
/// size in memory before the limits refuse it.
const PRESCAN_ABOVE: usize = 64 << 10;

/// The whole check of a JSON body for one kind of request, with fresh
/// working memory.
pub fn check_json<'c>(
    kind: JsonKind<'_>,
    body: &[u8],
    rules: &'c Rules,
    route_schema: Option<&jsonschema::Validator>,
) -> Result<Checked<'c>, Rejection> {
    check_json_in(kind, body, rules, route_schema, &mut Scratch::default())
}

/// `check_json` with the worker's working memory: the pre-scan copies `body`
/// into `scratch` (eliding KServe tensor data it has checked itself),
/// simd-json parses that copy onto the reused tape, and the checks run on
/// the tape. The original `body` is what gets forwarded.
pub fn check_json_in<'c>(
    kind: JsonKind<'_>,
    body: &[u8],
    rules: &'c Rules,
    route_schema: Option<&jsonschema::Validator>,
    scratch: &mut Scratch,
) -> Result<Checked<'c>, Rejection> {
    // Tensor data can be left out only where no JSON Schema will look at it.
    let elide = match kind {
        JsonKind::KserveInfer(name, version, _) => {
            route_schema.is_none() && kserve_model(rules, name, version)?.0.schema.is_none()
        }
        _ => false,
    };
    check_json_with(kind, body, rules, route_schema, scratch, elide)
}

/// `check_json_in` with every value parsed by simd-json (no tensor data
/// left out), as for a KServe body a JSON Schema applies to. For the
/// benchmark, to show what leaving tensor data out is worth.
pub fn check_json_parsing_all<'c>(
    kind: JsonKind<'_>,
    body: &[u8],
    rules: &'c Rules,
    scratch: &mut Scratch,
) -> Result<Checked<'c>, Rejection> {
    check_json_with(kind, body, rules, None, scratch, false)
}

fn check_json_with<'c>(
    kind: JsonKind<'_>,
    body: &[u8],
    rules: &'c Rules,
    route_schema: Option<&jsonschema::Validator>,
    scratch: &mut Scratch,
    elide: bool,
) -> Result<Checked<'c>, Rejection> {
    // Triton's binary tensor extension: a JSON header, then raw tensor bytes.
    let (body, binary) = match kind {
        JsonKind::KserveInfer(_, _, Some(n)) if n <= body.len() => {
            let (json, rest) = body.split_at(n);
            (json, kserve::Binary::new(Some(rest)))
        }
        JsonKind::KserveInfer(_, _, Some(_)) => {
            return Err(Rejection::new(
                400,
                "invalid_header_length",
                "`Inference-Header-Content-Length` is longer than the body",
            ))
        }
        _ => (body, kserve::Binary::default()),
    };
    let once = |scratch: &mut Scratch, elide| {
        check_once(kind, body, binary, rules, route_schema, scratch, elide)
    };
    match once(scratch, elide) {
        // Unsure about elided data: check again with every value parsed.
        Err(Outcome::Recheck) => once(scratch, false).map_err(settled),
        r => r.map_err(settled),
    }
}

/// The rejection of a check that elided nothing (so never asks for a
/// re-check; should it, the body is refused rather than admitted unchecked).
fn settled(o: Outcome) -> Rejection {
    match o {
        Outcome::Rejected(r) => r,
        Outcome::Recheck => invalid_json(),
    }
}

fn check_once<'c>(
    kind: JsonKind<'_>,
    body: &[u8],
    binary: kserve::Binary<'_>,
    rules: &'c Rules,
    route_schema: Option<&jsonschema::Validator>,
    scratch: &mut Scratch,
    elide: bool,
) -> Result<Checked<'c>, Outcome> {
    let Scratch {
        bytes,
        buffers,
        tape,
        elided,
    } = scratch;
    elided.clear();
    if elide || body.len() > PRESCAN_ABOVE {
        prescan::copy_checked(
            body,
            rules.json.max_depth,
            rules.json.max_elements,
            bytes,
            elide.then_some(&mut *elided),
        )
        .map_err(|e| scan_rejection(e, rules.json))?;
    } else {
        // Small: its tape is small whatever it holds; the limits are
        // checked on the tape.
        bytes.clear();
        bytes.extend_from_slice(body);
    }
    let extra = elided.iter().map(|d| d.values).sum();
    let mut t = std::mem::replace(tape, simd_json::Tape(Vec::new())).reset();
    let r = parse_onto(bytes, rules.json, buffers, &mut t, extra)
        .map_err(Outcome::from)
        .and_then(|()| {
            let root = json::Tape::root(&t.0);
            check_tree(kind, root, rules, route_schema, elided, binary)
        });
    *tape = t.reset();
    r
}

/// The model a KServe path names, resolved in the catalogue.
fn kserve_model<'c>(
    rules: &'c Rules,
    name: &str,
    version: Option<&str>,
) -> Result<(&'c Arc<crate::catalog::Model>, &'c crate::catalog::Version), Rejection> {
    let req = match version {
        Some(v) => crate::catalog::VersionReq::parse(v).ok_or_else(|| {
            Rejection::new(
                404,
                "version_not_found",
                "no deployed version of the model matches the request",
            )
        })?,
        None => crate::catalog::VersionReq::Latest,
    };
    rules.catalog.resolve(name, &req).map_err(|u| {
        Rejection::new(
            404,
            u.reason(),
            "the model or version does not exist or is not available",
        )
    })
}

/// The checks after parsing, on any parsed form (the benchmark runs them on
/// what serde_json builds, to compare parsers on identical validation).
pub fn check_parsed<'a, 'c, J: Json<'a>>(
    kind: JsonKind<'_>,
    v: J,
    rules: &'c Rules,
    route_schema: Option<&jsonschema::Validator>,
) -> Result<Checked<'c>, Rejection> {
    check_tree(kind, v, rules, route_schema, &[], kserve::Binary::default()).map_err(settled)
}

fn check_tree<'a, 'c, J: Json<'a>>(
    kind: JsonKind<'_>,
    v: J,
    rules: &'c Rules,
    route_schema: Option<&jsonschema::Validator>,
    elided: &[kserve::DataSummary],
    binary: kserve::Binary<'_>,
) -> Result<Checked<'c>, Outcome> {
    let mut facts = openai::Facts::default();
    let mut prefix = Vec::new();
    let resolved = match kind {
        JsonKind::OpenAi(ep, version_header) => {
            let (m, ver, f) = openai::check(ep, v, &rules.catalog, version_header)?;
            facts = f;
            if rules.prefix_blocks > 0 {
                prefix = openai::prompt_blocks(ep, v, &m.name, rules.prefix_blocks);
            }
            Some((m, ver))
        }
        JsonKind::KserveInfer(name, version, _) => {
            let r = kserve_model(rules, name, version)?;
            kserve::check_infer(v, elided, binary)?;
            facts.pinned = version.is_some();
            Some(r)
        }
        JsonKind::Schema => None,
    };
    let model_schema = resolved.and_then(|(m, _)| m.schema.as_deref());
    if model_schema.is_some() || route_schema.is_some() {
        // jsonschema works on serde_json values: convert the parsed form (no re-parse).
        let value = json::to_serde(v);
        for s in [route_schema, model_schema].into_iter().flatten() {
            if let Some(e) = s.iter_errors(&value).next() {
                return Err(Rejection::at(
                    e.instance_path.to_string(),
                    "schema_violation",
                    "the request does not match the schema for this model or route",
                )
                .into());
            }
        }
    }
    Ok(Checked {
        model: resolved,
        facts,
        prefix,
    })
}

/// A body that passed: its model (when the protocol names one) and the facts
/// later stages need.
#[derive(Debug)]
pub struct Checked<'c> {
    pub model: Option<(&'c Arc<crate::catalog::Model>, &'c crate::catalog::Version)>,
    pub facts: openai::Facts,
    /// The prompt's block hashes (see [`Verdict::prefix`]).
    pub prefix: Vec<u64>,
}

/// What kind of JSON request a body is.
#[derive(Debug, Clone, Copy)]
pub enum JsonKind<'a> {
    /// OpenAI endpoint, and the `x-model-version` header if any.
    OpenAi(openai::Endpoint, Option<&'a str>),
    /// KServe infer: model name and version from the path, and the length
    /// of the JSON header when the body is in Triton's binary tensor
    /// extension (`Inference-Header-Content-Length`).
    KserveInfer(&'a str, Option<&'a str>, Option<usize>),
    /// Passthrough route with a schema.
    Schema,
}

/// A route's validation rules, built once from the config.
pub struct RouteRules {
    pub protocol: Protocol,
    pub content_types: Option<Vec<String>>,
    pub schema: Option<Arc<jsonschema::Validator>>,
    pub drop_fields: Option<Arc<FieldFilter>>,
}

/// Everything the validation stage needs, shared read-only by the workers.
pub struct Rules {
    pub routes: Vec<RouteRules>,
    pub catalog: Catalog,
    pub json: JsonLimits,
    pub max_json_body: u64,
    /// Prompt blocks hashed per request for prefix-aware balancing (0: no
    /// cluster routes on prefixes, nothing is hashed).
    pub prefix_blocks: usize,
    /// Streams are sent asking for their usage (`[ratelimit.cost] stream_usage`).
    pub stream_usage: bool,
}

impl Rules {
    pub fn new(r: &crate::config::Checked) -> Rules {
        let routes = r
            .config
            .routes
            .iter()
            .zip(&r.route_schemas)
            .map(|(rc, schema)| RouteRules {
                protocol: rc.protocol,
                content_types: rc.content_types.as_ref().map(|l| {
                    l.iter()
                        .filter_map(|c| magic::media_type(c.as_bytes()))
                        .collect()
                }),
                schema: schema.clone(),
                drop_fields: FieldFilter::new(&rc.response_drop_fields)
                    .ok()
                    .filter(|f| !f.is_empty())
                    .map(Arc::new),
            })
            .collect();
        let l = &r.config.limits;
        Rules {
            routes,
            catalog: r.catalog.clone(),
            json: JsonLimits {
                max_depth: l.json_max_depth,
                max_elements: l.json_max_elements,
            },
            max_json_body: l.max_json_body_bytes,
            prefix_blocks: if r
                .config
                .clusters
                .values()
                .any(|c| c.balance.algorithm.uses_prefix())
            {
                PREFIX_REACH_BLOCKS
            } else {
                0
            },
            stream_usage: r.config.ratelimit.cost.stream_usage,
        }
    }
}

/// What the stage decided.
pub enum Admitted {
    /// Forward the body as it arrives (its checks, if any, are done).
    Stream,
    /// The body was read whole and checked: forward `head` and `body` as they are.
    Buffered(Buffered),
    /// Answered by the gateway itself (`GET /v1/models`): a JSON body.
    Answer(Vec<u8>),
}

/// A request read whole: its head bytes (the `RequestHead` ranges index
/// them) and its body.
pub struct Buffered {
    pub head: Vec<u8>,
    pub body: Vec<u8>,
}

pub struct Verdict {
    pub admitted: Admitted,
    /// `100 Continue` was already sent (to read or check the body).
    pub continue_sent: bool,
    /// The resolved model and version, for later stages, the upstream and the log.
    pub model: Option<(String, String)>,
    /// Output budget and prompt size (OpenAI requests), for quota and cost stages.
    pub facts: openai::Facts,
    /// The prompt's block hashes, for prefix-aware balancing (empty unless
    /// a cluster routes on prefixes and the request has a prompt).
    pub prefix: Vec<u64>,
}

/// The stage refused: answer with `rejection` unless its status is 499
/// (client gone); close unless `body_read`.
pub struct Refused {
    pub rejection: Rejection,
    /// The whole body was read (the connection can carry another request).
    pub body_read: bool,
    /// The head (and what was read of the body) is off the client buffer.
    pub consumed: bool,
    pub model: Option<String>,
}

impl From<Rejection> for Refused {
    fn from(rejection: Rejection) -> Refused {
        Refused {
            rejection,
            body_read: false,
            consumed: false,
            model: None,
        }
    }
}

const JSON_ONLY: [&str; 1] = ["application/json"];

/// The most prompt blocks hashed (64 bytes each: 512 KiB, ~130k tokens):
/// beyond that a prefix decides nothing more.
const PREFIX_REACH_BLOCKS: usize = 8192;

fn header<'b>(head: &RequestHead, buf: &'b [u8], name: &[u8]) -> Option<&'b [u8]> {
    head.headers
        .iter()
        .find(|h| buf[h.name.clone()].eq_ignore_ascii_case(name))
        .map(|h| &buf[h.value.clone()])
}

/// No percent-encoding, empty segments or dot segments: the bytes we check
/// are the path the backend will route on.
fn canonical_path(path: &str) -> bool {
    !path.contains('%')
        && !path.contains("//")
        && !path.split('/').any(|seg| seg == "." || seg == "..")
}

/// `/v2/models/{name}[/versions/{v}][/infer|/ready]` (a trailing `/` allowed).
fn kserve_path(path: &str) -> Option<(&str, Option<&str>, &str)> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let rest = path.strip_prefix("/v2/models/")?;
    let mut parts = rest.split('/');
    let name = parts.next().filter(|n| !n.is_empty())?;
    let mut version = None;
    let mut action = "";
    match parts.next() {
        Some("versions") => {
            version = Some(parts.next().filter(|v| !v.is_empty())?);
            action = parts.next().unwrap_or("");
        }
        Some(a) => action = a,
        None => {}
    }
    if parts.next().is_some() {
        return None;
    }
    Some((name, version, action))
}

/// Run the stage for one request. On `Buffered`, the head and body have been
/// consumed from `client`; on `Stream` and `Answer`, nothing has.
/// Per-worker reusable memory for parsing: the scratch copy of the body and simd-json's buffers.
pub struct Scratch {
    pub bytes: Vec<u8>,
    pub buffers: simd_json::Buffers,
    /// simd-json's tape, emptied between bodies (`Tape::reset`).
    pub tape: simd_json::Tape<'static>,
    /// What the pre-scan left out of the copy.
    pub elided: Vec<kserve::DataSummary>,
}

impl Default for Scratch {
    fn default() -> Scratch {
        Scratch {
            bytes: Vec::new(),
            buffers: simd_json::Buffers::default(),
            tape: simd_json::Tape(Vec::new()),
            elided: Vec::new(),
        }
    }
}

impl Scratch {
    /// Kept between requests (reusing it is what saves the page faults on
    /// big tensors), but not beyond 64 MiB of body.
    fn trim(&mut self) {
        let tape_bytes = self.tape.0.capacity() * std::mem::size_of::<simd_json::Node<'_>>();
        let elided_bytes = self.elided.capacity() * std::mem::size_of::<kserve::DataSummary>();
        if self.bytes.capacity() > 64 << 20 || tape_bytes > 64 << 20 || elided_bytes > 16 << 20 {
            *self = Scratch::default();
        }
    }
}

/// The validation stage for one request: what the route's protocol says
/// about its head, then its body — streamed (checked from its first bytes
/// where a signature applies) or read whole and checked as JSON.
pub async fn admit<D: Downstream>(
    client: &mut D,
    head: &RequestHead,
    route: &Route,
    rules: &Rules,
    t: &Timeouts,
    scratch: &std::cell::RefCell<Scratch>,
) -> Result<Verdict, Refused> {
    let rr = &rules.routes[route.index];
    let buf = client.pending();
    let path = utf8_path(head, buf)?;
    let media = header(head, buf, b"content-type").and_then(magic::media_type);
    check_media(head, buf, path, rr, media.as_deref())?;
    check_path(path, rr)?;
    check_schema_media(head, rr, media.as_deref())?;
    let kind = match json_kind(head, buf, path, rr, rules, media.as_deref())? {
        Found::Json(kind) => kind,
        Found::Verdict(v) => return Ok(v),
        Found::Stream => return streamed(client, head, media.as_deref(), t).await,
        Found::Multipart(boundary, version) => {
            return multipart_model(client, head, &boundary, version.as_deref(), rules, t).await
        }
        Found::GrpcKserve(call) => {
            let limit = route.max_request_body_bytes.min(rules.max_json_body);
            return grpc_kserve(client, head, call, limit, rules, t).await;
        }
    };
    // Owned copies: the kind borrows the client buffer, which reading the body reuses.
    let kind = OwnedKind::from(kind);
    let limit = route.max_request_body_bytes.min(rules.max_json_body);
    let buffered = read_whole(client, head, limit, t)
        .await
        .map_err(|r| Refused {
            consumed: true,
            ..r
        })?;
    // simd-json parses in place: check a copy, forward the original bytes.
    let checked = {
        let mut sc = scratch.borrow_mut();
        let r = check_json_in(
            kind.as_kind(),
            &buffered.body,
            rules,
            rr.schema.as_deref(),
            &mut sc,
        )
        .map(|c| {
            (
                c.model.map(|(m, v)| (m.name.clone(), v.to_string())),
                c.facts,
                c.prefix,
            )
        });
        sc.trim();
        r
    };
    match checked {
        Ok((model, facts, prefix)) => Ok(Verdict {
            admitted: Admitted::Buffered(buffered),
            continue_sent: head.expect_continue,
            model,
            facts,
            prefix,
        }),
        Err(rejection) => Err(Refused {
            rejection,
            body_read: true,
            consumed: true,
            model: kind.model_name(),
        }),
    }
}

/// A KServe v2 gRPC call naming a model: its message read whole (within
/// `limit`) and checked; its model feeds the later stages.
async fn grpc_kserve<D: Downstream>(
    client: &mut D,
    head: &RequestHead,
    call: kserve_grpc::Call,
    limit: u64,
    rules: &Rules,
    t: &Timeouts,
) -> Result<Verdict, Refused> {
    let buffered = read_whole(client, head, limit, t)
        .await
        .map_err(|r| Refused {
            consumed: true,
            ..r
        })?;
    match kserve_grpc::check(call, &buffered.body, &rules.catalog) {
        Ok((m, v)) => Ok(Verdict {
            model: Some((m.name.clone(), v.to_string())),
            admitted: Admitted::Buffered(buffered),
            continue_sent: false,
            facts: Default::default(),
            prefix: Vec::new(),
        }),
        Err(rejection) => Err(Refused {
            rejection,
            body_read: true,
            consumed: true,
            model: kserve_grpc::model_name(call, &buffered.body),
        }),
    }
}

/// The request path (without query), or 400 when it isn't UTF-8.
fn utf8_path<'b>(head: &RequestHead, buf: &'b [u8]) -> Result<&'b str, Refused> {
    let target = &buf[head.target.clone()];
    std::str::from_utf8(&target[..memchr::memchr(b'?', target).unwrap_or(target.len())])
        .map_err(|_| Rejection::new(400, "invalid_path", "the request path is not UTF-8").into())
}

/// On JSON protocols, a path that isn't canonical is refused: the backend
/// would decode or normalise it and serve an endpoint the checks below
/// would not recognise. Refuse, don't guess.
fn check_path(path: &str, rr: &RouteRules) -> Result<(), Refused> {
    if matches!(rr.protocol, Protocol::Openai | Protocol::Kserve) && !canonical_path(path) {
        return Err(Rejection::new(
            400,
            "invalid_path",
            "the request path must not contain percent-encoding, `//` or dot segments",
        )
        .into());
    }
    Ok(())
}

fn is_json_media(media: Option<&str>) -> bool {
    media.is_some_and(|m| m == "application/json" || m.ends_with("+json"))
}

/// A body's media type against what the route accepts (its list, else
/// JSON on JSON protocols, else anything), or 415. KServe clients may send
/// no `Content-Type` (Triton and KServe servers read such a body as JSON;
/// `tritonclient` sends none) and, with Triton's binary tensor extension,
/// `application/octet-stream`. Bodies the gateway checks must not be
/// compressed.
fn check_media(
    head: &RequestHead,
    buf: &[u8],
    path: &str,
    rr: &RouteRules,
    media: Option<&str>,
) -> Result<(), Refused> {
    if head.body_kind() == BodyKind::Empty {
        return Ok(());
    }
    let json_protocol = matches!(rr.protocol, Protocol::Openai | Protocol::Kserve);
    let kserve = rr.protocol == Protocol::Kserve;
    let binary = || header(head, buf, b"inference-header-content-length").is_some();
    let ok = match (rr.content_types.as_deref(), media) {
        (Some(list), Some(m)) => list.iter().any(|a| a == m),
        (Some(_), None) => false,
        (None, Some("application/octet-stream")) if kserve => binary(),
        (None, Some("multipart/form-data")) if rr.protocol == Protocol::Openai => {
            openai::endpoint(&buf[head.method.clone()], path.as_bytes()) == openai::Endpoint::Audio
        }
        (None, Some(m)) if json_protocol => JSON_ONLY.contains(&m),
        (None, None) if json_protocol => kserve,
        (None, m) if rr.protocol == Protocol::Grpc => {
            m.is_some_and(|m| m == "application/grpc" || m.starts_with("application/grpc+"))
        }
        (None, _) => true,
    };
    if !ok {
        return Err(Rejection::new(
            415,
            "unsupported_media_type",
            "this route does not accept the request's Content-Type",
        )
        .into());
    }
    let encoded = header(head, buf, b"content-encoding")
        .is_some_and(|e| !e.trim_ascii().eq_ignore_ascii_case(b"identity"));
    if encoded && (json_protocol || rr.schema.is_some()) {
        return Err(Rejection::new(
            415,
            "unsupported_content_encoding",
            "this route checks request bodies and takes them uncompressed (no Content-Encoding)",
        )
        .into());
    }
    Ok(())
}

/// A body on a passthrough route with a JSON Schema must be JSON, or 415.
fn check_schema_media(
    head: &RequestHead,
    rr: &RouteRules,
    media: Option<&str>,
) -> Result<(), Refused> {
    let has_body = head.body_kind() != BodyKind::Empty;
    if rr.protocol == Protocol::Passthrough
        && rr.schema.is_some()
        && has_body
        && !is_json_media(media)
    {
        return Err(Rejection::new(
            415,
            "unsupported_media_type",
            "this route takes JSON bodies (Content-Type: application/json)",
        )
        .into());
    }
    Ok(())
}

/// What the route's protocol makes of a request, before its body.
enum Found<'a> {
    /// A JSON body to read whole and check.
    Json(JsonKind<'a>),
    /// Decided from the head alone (the model list, a model's metadata).
    Verdict(Verdict),
    /// Nothing to check in the body as JSON: stream it.
    Stream,
    /// A multipart upload whose `model` field is read from its first bytes
    /// (the boundary, and the `x-model-version` header).
    Multipart(Vec<u8>, Option<String>),
    /// A KServe v2 gRPC call naming a model: its message read whole and checked.
    GrpcKserve(kserve_grpc::Call),
}

fn json_kind<'a>(
    head: &RequestHead,
    buf: &'a [u8],
    path: &'a str,
    rr: &RouteRules,
    rules: &Rules,
    media: Option<&str>,
) -> Result<Found<'a>, Refused> {
    let method = &buf[head.method.clone()];
    let version = header(head, buf, b"x-model-version").and_then(|v| std::str::from_utf8(v).ok());
    Ok(match rr.protocol {
        Protocol::Openai => match openai::endpoint(method, path.as_bytes()) {
            openai::Endpoint::Models => Found::Verdict(Verdict {
                admitted: Admitted::Answer(openai::models_list(&rules.catalog, |_| true)),
                continue_sent: false,
                model: None,
                facts: Default::default(),
                prefix: Vec::new(),
            }),
            openai::Endpoint::Other => Found::Stream,
            openai::Endpoint::Audio => {
                let ct = header(head, buf, b"content-type").unwrap_or_default();
                match multipart::boundary(ct) {
                    Some(b) if media == Some("multipart/form-data") => {
                        Found::Multipart(b.to_vec(), version.map(str::to_string))
                    }
                    _ => {
                        return Err(Rejection::new(
                            415,
                            "unsupported_media_type",
                            "audio uploads are multipart/form-data with a boundary",
                        )
                        .into())
                    }
                }
            }
            ep => Found::Json(JsonKind::OpenAi(ep, version)),
        },
        Protocol::Kserve => match kserve_path(path) {
            Some((name, version, "infer")) if method == b"POST" => {
                let header = binary_header(head, buf)?;
                Found::Json(JsonKind::KserveInfer(name, version, header))
            }
            Some((name, version, "" | "ready")) => {
                Found::Verdict(kserve_metadata(name, version, rules)?)
            }
            _ => Found::Stream,
        },
        Protocol::Grpc => match kserve_grpc::Call::of(path) {
            Some(call) => Found::GrpcKserve(call),
            None => Found::Stream,
        },
        Protocol::Passthrough => {
            let has_body = head.body_kind() != BodyKind::Empty;
            if rr.schema.is_some() && has_body && is_json_media(media) {
                Found::Json(JsonKind::Schema)
            } else {
                Found::Stream
            }
        }
    })
}

/// `Inference-Header-Content-Length`: the JSON header's length in a body in
/// Triton's binary tensor extension (`None`: a plain JSON body), or 400.
fn binary_header(head: &RequestHead, buf: &[u8]) -> Result<Option<usize>, Refused> {
    let Some(v) = header(head, buf, b"inference-header-content-length") else {
        return Ok(None);
    };
    let n = std::str::from_utf8(v)
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<usize>().ok());
    match n {
        Some(n) => Ok(Some(n)),
        None => Err(Rejection::new(
            400,
            "invalid_header_length",
            "`Inference-Header-Content-Length` must be a decimal byte count",
        )
        .into()),
    }
}

/// KServe metadata and readiness: only for models the catalogue has (404 otherwise).
fn kserve_metadata(name: &str, version: Option<&str>, rules: &Rules) -> Result<Verdict, Refused> {
    let req = version.map_or(
        Some(crate::catalog::VersionReq::Latest),
        crate::catalog::VersionReq::parse,
    );
    let r = req
        .ok_or(crate::catalog::Unresolved::BadVersion)
        .and_then(|req| rules.catalog.resolve(name, &req))
        .map_err(|u| {
            Rejection::new(
                404,
                u.reason(),
                "the model or version does not exist or is not available",
            )
        })?;
    Ok(Verdict {
        admitted: Admitted::Stream,
        continue_sent: false,
        model: Some((r.0.name.clone(), r.1.to_string())),
        facts: openai::Facts {
            pinned: version.is_some(),
            ..Default::default()
        },
        prefix: Vec::new(),
    })
}

/// A streamed body: check what can be checked from its first bytes.
async fn streamed<D: Downstream>(
    client: &mut D,
    head: &RequestHead,
    media: Option<&str>,
    t: &Timeouts,
) -> Result<Verdict, Refused> {
    let mut continue_sent = false;
    if let (true, Some(m)) = (head.body_kind() != BodyKind::Empty, media) {
        if magic::check(m, b"") != magic::Magic::NotChecked {
            check_magic(client, head, m, t).await?;
            continue_sent = head.expect_continue;
        }
    }
    Ok(Verdict {
        admitted: Admitted::Stream,
        continue_sent,
        model: None,
        facts: Default::default(),
        prefix: Vec::new(),
    })
}

/// `JsonKind` without borrows, kept across reading the body.
enum OwnedKind {
    OpenAi(openai::Endpoint, Option<String>),
    KserveInfer(String, Option<String>, Option<usize>),
    Schema,
}

impl OwnedKind {
    fn from(k: JsonKind<'_>) -> OwnedKind {
        match k {
            JsonKind::OpenAi(ep, v) => OwnedKind::OpenAi(ep, v.map(str::to_string)),
            JsonKind::KserveInfer(n, v, h) => {
                OwnedKind::KserveInfer(n.to_string(), v.map(str::to_string), h)
            }
            JsonKind::Schema => OwnedKind::Schema,
        }
    }

    fn as_kind(&self) -> JsonKind<'_> {
        match self {
            OwnedKind::OpenAi(ep, v) => JsonKind::OpenAi(*ep, v.as_deref()),
            OwnedKind::KserveInfer(n, v, h) => JsonKind::KserveInfer(n, v.as_deref(), *h),
            OwnedKind::Schema => JsonKind::Schema,
        }
    }

    fn model_name(&self) -> Option<String> {
        match self {
            OwnedKind::KserveInfer(n, _, _) => Some(n.clone()),
            _ => None,
        }
    }
}

async fn continue_if_expected<D: Downstream>(
    client: &mut D,
    head: &RequestHead,
    t: &Timeouts,
) -> Result<(), Refused> {
    if head.expect_continue {
        let (r, _) = client
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(), t.send)
            .await;
        r.map_err(|_| Rejection::new(499, "client_closed", "the client went away"))?;
    }
    Ok(())
}

fn read_failed(e: ReadError) -> Refused {
    match e {
        ReadError::Timeout => Rejection::new(
            408,
            "body_timeout",
            "the request body was not received in time",
        )
        .into(),
        _ => Rejection::new(499, "client_closed", "the client went away").into(),
    }
}

/// Read a whole body (bounded by `limit`) and take the request off the client buffer.
async fn read_whole<D: Downstream>(
    client: &mut D,
    head: &RequestHead,
    limit: u64,
    t: &Timeouts,
) -> Result<Buffered, Refused> {
    let too_large = || {
        Refused::from(Rejection::new(
            413,
            "body_too_large",
            "the request body is larger than this route accepts",
        ))
    };
    if let BodyKind::Length(n) = head.body_kind() {
        if n > limit {
            return Err(too_large());
        }
    }
    continue_if_expected(client, head, t).await?;
    let head_bytes = client.pending()[..head.head_len].to_vec();
    client.consume(head.head_len);
    let mut body = Vec::new();
    match head.body_kind() {
        BodyKind::Length(n) => {
            body.reserve_exact(n as usize);
            while (body.len() as u64) < n {
                if client.pending().is_empty() {
                    match client.fill_timeout(t.client_body).await {
                        Ok(0) => {
                            return Err(Rejection::new(
                                499,
                                "client_closed",
                                "the client went away",
                            )
                            .into())
                        }
                        Ok(_) => {}
                        Err(e) => return Err(read_failed(e)),
                    }
                }
                let k = ((n - body.len() as u64) as usize).min(client.pending().len());
                body.extend_from_slice(&client.pending()[..k]);
                client.consume(k);
            }
        }
        BodyKind::Chunked => {
            let mut dec = ChunkedDecoder::new();
            loop {
                let p = client.pending();
                let used = dec
                    .feed(p, |r| body.extend_from_slice(&p[r]))
                    .map_err(|_| {
                        Refused::from(Rejection::new(
                            400,
                            "invalid_chunked_body",
                            "invalid chunked encoding",
                        ))
                    })?;
                client.consume(used);
                if body.len() as u64 > limit {
                    return Err(too_large());
                }
                if dec.is_done() {
                    break;
                }
                match client.fill_timeout(t.client_body).await {
                    Ok(0) => {
                        return Err(
                            Rejection::new(499, "client_closed", "the client went away").into()
                        )
                    }
                    Ok(_) => {}
                    Err(e) => return Err(read_failed(e)),
                }
            }
        }
        _ => {}
    }
    Ok(Buffered {
        head: head_bytes,
        body,
    })
}

/// The body's first bytes among those already read (`after`: what follows
/// the head; chunked bodies decoded), at most `max`, and whether that is
/// all the body there is or `max` was reached.
fn body_prefix(after: &[u8], kind: BodyKind, max: usize) -> (Vec<u8>, bool) {
    match kind {
        BodyKind::Length(n) => {
            let k = (n.min(max as u64) as usize).min(after.len());
            (after[..k].to_vec(), k as u64 == n.min(max as u64))
        }
        _ => {
            let mut dec = ChunkedDecoder::new();
            let mut first = Vec::new();
            let _ = dec.feed(after, |r| {
                let room = max.saturating_sub(first.len());
                first.extend_from_slice(&after[r.start..r.end.min(r.start + room)]);
            });
            let complete = dec.is_done() || first.len() >= max;
            (first, complete)
        }
    }
}

/// An audio upload (`multipart/form-data`): its `model` form field, read
/// from the body's first bytes without consuming anything, and resolved in
/// the catalogue. The field must come before the file part and within the
/// connection's buffer, or 400; the upload itself streams on.
async fn multipart_model<D: Downstream>(
    client: &mut D,
    head: &RequestHead,
    boundary: &[u8],
    version: Option<&str>,
    rules: &Rules,
    t: &Timeouts,
) -> Result<Verdict, Refused> {
    let bad = |reason, message: &'static str| -> Refused {
        Rejection {
            status: 400,
            reason,
            message: message.into(),
            pointer: Some("/model".into()),
        }
        .into()
    };
    continue_if_expected(client, head, t).await?;
    let model = loop {
        let after = &client.pending()[head.head_len..];
        let (first, complete) = body_prefix(after, head.body_kind(), usize::MAX);
        match multipart::find(&first, boundary, "model", complete) {
            multipart::Field::Found(v) => {
                break std::str::from_utf8(v)
                    .ok()
                    .filter(|m| !m.is_empty())
                    .ok_or_else(|| {
                        bad("invalid_model", "`model` must be a non-empty UTF-8 string")
                    })?
                    .to_string()
            }
            multipart::Field::Missing => {
                return Err(bad(
                    "missing_model",
                    "the `model` form field is required, before the file",
                ))
            }
            multipart::Field::Malformed => {
                return Err(Rejection::new(
                    400,
                    "invalid_multipart",
                    "the body is not multipart/form-data with the declared boundary",
                )
                .into())
            }
            multipart::Field::NeedMore => {}
        }
        if client.is_full() {
            return Err(bad(
                "model_field_too_late",
                "the `model` form field must come before the file, near the start of the upload",
            ));
        }
        match client.fill_timeout(t.client_body).await {
            Ok(0) => {
                return Err(Rejection::new(499, "client_closed", "the client went away").into())
            }
            Ok(_) => {}
            Err(e) => return Err(read_failed(e)),
        }
    };
    let (m, v) = openai::resolve(&rules.catalog, &model, version).map_err(Refused::from)?;
    Ok(Verdict {
        admitted: Admitted::Stream,
        continue_sent: head.expect_continue,
        model: Some((m.name.clone(), v.to_string())),
        facts: openai::Facts {
            pinned: version.is_some() || model.contains('@'),
            ..Default::default()
        },
        prefix: Vec::new(),
    })
}

/// Wait (bounded) for the first bytes of a streamed body and check them
/// against the declared media type's signature. Nothing is consumed.
async fn check_magic<D: Downstream>(
    client: &mut D,
    head: &RequestHead,
    media: &str,
    t: &Timeouts,
) -> Result<(), Refused> {
    continue_if_expected(client, head, t).await?;
    loop {
        let after = &client.pending()[head.head_len..];
        let (first, complete) = body_prefix(after, head.body_kind(), magic::MAX_MAGIC);
        match magic::check(media, &first) {
            magic::Magic::Match | magic::Magic::NotChecked => return Ok(()),
            magic::Magic::Mismatch => {
                return Err(Rejection::new(
                    415,
                    "content_mismatch",
                    "the body does not match its declared Content-Type",
                )
                .into())
            }
            magic::Magic::NeedMore if complete => {
                return Err(Rejection::new(
                    415,
                    "content_mismatch",
                    "the body does not match its declared Content-Type",
                )
                .into())
            }
            magic::Magic::NeedMore => {}
        }
        if client.is_full() {
            // The signature could not be decided within a full buffer (chunk
            // framing padding, say): refuse rather than let it through unchecked.
            return Err(Rejection::new(
                415,
                "content_mismatch",
                "the body does not match its declared Content-Type",
            )
            .into());
        }
        match client.fill_timeout(t.client_body).await {
            Ok(0) => {
                return Err(Rejection::new(499, "client_closed", "the client went away").into())
            }
            Ok(_) => {}
            Err(e) => return Err(read_failed(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_with_route_schema(schema: &str) -> (Rules, Arc<jsonschema::Validator>) {
        let text = "[clusters.a]\nbackends = [\"127.0.0.1:1\"]\n[[routes]]\ncluster = \"a\"\n";
        let r = crate::config::Checked::from_str(text, "t").unwrap();
        let v: serde_json::Value = serde_json::from_str(schema).unwrap();
        (
            Rules::new(&r),
            Arc::new(jsonschema::validator_for(&v).unwrap()),
        )
    }

    #[test]
    fn schema_table() {
        let (rules, schema) = rules_with_route_schema(
            r#"{"type":"object","required":["task","inputs"],"properties":{
                "task":{"enum":["classify","embed"]},
                "priority":{"type":"integer","minimum":0,"maximum":9},
                "inputs":{"type":"array","minItems":1,"items":{"type":"array","items":{"type":"number"}}},
                "tag":{"type":"string","maxLength":8}}}"#,
        );
        let cases: &[(&str, Option<&str>)] = &[
            (r#"{"task":"embed","inputs":[[1,2],[3.5]]}"#, None),
            (
                r#"{"task":"embed","inputs":[[1,2]],"priority":9,"tag":"abc"}"#,
                None,
            ),
            (r#"{"inputs":[[1]]}"#, Some("")),
            (r#"{"task":"train","inputs":[[1]]}"#, Some("/task")),
            (r#"{"task":"embed","inputs":[]}"#, Some("/inputs")),
            (
                r#"{"task":"embed","inputs":[[1,"x"]]}"#,
                Some("/inputs/0/1"),
            ),
            (
                r#"{"task":"embed","inputs":[[1]],"priority":10}"#,
                Some("/priority"),
            ),
            (
                r#"{"task":"embed","inputs":[[1]],"priority":1.5}"#,
                Some("/priority"),
            ),
            (
                r#"{"task":"embed","inputs":[[1]],"tag":"far too long"}"#,
                Some("/tag"),
            ),
            (r#"[1,2]"#, Some("")),
        ];
        for (body, want) in cases {
            let b = body.as_bytes().to_vec();
            let got = check_json(JsonKind::Schema, &b, &rules, Some(&schema));
            match (got, want) {
                (Ok(_), None) => {}
                (Err(r), Some(p)) => {
                    assert_eq!(r.status, 422, "{body}");
                    assert_eq!(r.reason, "schema_violation");
                    assert_eq!(r.pointer.as_deref(), Some(*p), "{body}");
                    assert!(
                        !r.message.contains("train") && !r.message.contains("far"),
                        "payload echoed"
                    );
                }
                (got, want) => panic!("{body}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn depth_scan_ignores_brackets_in_strings() {
        assert!(depth_within(br#"{"a":"[[[[[[[[[[","b":[1]}"#, 2));
        assert!(!depth_within(b"[[[1]]]", 2));
        assert!(depth_within(br#"["\"[[[[[[[["]"#, 1));
        let deep = "[".repeat(100_000);
        assert!(!depth_within(deep.as_bytes(), 64));
        let b = deep.into_bytes();
        let (rules, _) = rules_with_route_schema("{}");
        assert_eq!(
            check_json(JsonKind::Schema, &b, &rules, None)
                .unwrap_err()
                .reason,
            "json_too_deep"
        );
    }

    /// Small bodies skip the pre-scan: simd-json builds their tape without
    /// recursion and the limits are checked on it in one loop, so no depth
    /// exhausts a stack either way.
    #[test]
    fn deep_small_bodies_are_refused_on_the_tape() {
        let (rules, _) = rules_with_route_schema("{}");
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let n = (PRESCAN_ABOVE / (open.len() + close.len())) - 1;
            let body = format!("{}1{}", open.repeat(n), close.repeat(n));
            assert!(body.len() <= PRESCAN_ABOVE);
            assert_eq!(
                check_json(JsonKind::Schema, body.as_bytes(), &rules, None)
                    .unwrap_err()
                    .reason,
                "json_too_deep"
            );
        }
        let ok = format!("{}1{}", "[".repeat(64), "]".repeat(64));
        assert!(check_json(JsonKind::Schema, ok.as_bytes(), &rules, None).is_ok());
        let deep = format!("{}1{}", "[".repeat(65), "]".repeat(65));
        assert!(check_json(JsonKind::Schema, deep.as_bytes(), &rules, None).is_err());
    }

    /// simd-json reads `[1\0]` as `[1]`; no JSON has a raw NUL anywhere,
    /// including the KServe tensor data the pre-scan summarises.
    #[test]
    fn a_raw_nul_is_never_json() {
        let limits = JsonLimits {
            max_depth: 8,
            max_elements: 100,
        };
        for body in [
            &b"[1,-2\0]"[..],
            b"{\"a\":1\0}",
            b"[true\0,1]",
            b"{\"max_tokens\":5\0\0}",
        ] {
            assert_eq!(parse(body, limits).unwrap_err().reason, "invalid_json");
        }
        let rules = Rules::new(&crate::config::Checked::from_str("[clusters.a]\nbackends = [\"127.0.0.1:1\"]\n[[routes]]\ncluster = \"a\"\nprotocol = \"kserve\"\n[[models]]\nname = \"m\"\n", "t").unwrap());
        let body = b"{\"inputs\":[{\"name\":\"x\",\"shape\":[2],\"datatype\":\"INT8\",\"data\":[1,-2\0]}]}";
        let r = check_json(JsonKind::KserveInfer("m", None, None), body, &rules, None);
        assert_eq!(r.map(|_| ()).unwrap_err().reason, "invalid_json");
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let limits = JsonLimits {
            max_depth: 8,
            max_elements: 100,
        };
        for body in [
            &br#"{"a":1,"a":2}"#[..],
            br#"{"x":{"model":"a","model":"b"}}"#,
            br#"[{"k":1,"j":2,"k":3}]"#,
        ] {
            let b = body.to_vec();
            assert_eq!(
                parse(&b, limits).unwrap_err().reason,
                "duplicate_key",
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let b = br#"{"a":{"a":1},"b":[{"a":2}]}"#.to_vec();
        assert!(parse(&b, limits).is_ok());
    }

    #[test]
    fn huge_documents_are_refused_before_parsing() {
        assert_eq!(scan(b"[1,2,3,4,5]", 8, 3), Err(ScanError::TooManyElements));
        assert_eq!(scan(br#"["a,b,c,d,e,f"]"#, 8, 3), Ok(()));
        let (rules, _) = rules_with_route_schema("{}");
        let b = format!("[{}0]", "0,".repeat(rules.json.max_elements)).into_bytes();
        assert_eq!(
            check_json(JsonKind::Schema, &b, &rules, None)
                .unwrap_err()
                .reason,
            "json_too_many_elements"
        );
    }

    #[test]
    fn canonical_paths() {
        assert!(canonical_path("/v1/chat/completions"));
        for p in [
            "/v1/%63hat/completions",
            "/v1//chat/completions",
            "/v1/./chat/completions",
            "/v2/models/m/../x/infer",
        ] {
            assert!(!canonical_path(p), "{p}");
        }
        assert_eq!(
            kserve_path("/v2/models/m/infer/"),
            Some(("m", None, "infer"))
        );
        assert_eq!(
            kserve_path("/v2/models/m/versions/2/ready"),
            Some(("m", Some("2"), "ready"))
        );
    }

    #[test]
    fn element_limit() {
        let limits = JsonLimits {
            max_depth: 8,
            max_elements: 10,
        };
        let b = b"[1,2,3,4,5,6,7,8,9,10,11]".to_vec();
        assert_eq!(
            parse(&b, limits).unwrap_err().reason,
            "json_too_many_elements"
        );
        let b = b"[1,2,3]".to_vec();
        assert!(parse(&b, limits).is_ok());
    }
}
