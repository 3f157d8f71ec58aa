//! OpenAI-compatible requests, as OpenAI and vLLM serve them: chat,
//! completions, embeddings and responses (checked in full); rerank, score,
//! classify, pooling, tokenize and detokenize (model, size); audio
//! transcriptions and translations (multipart: the `model` form field, read
//! as the upload streams through); `GET /v1/models` (answered by the gateway).

use super::json::{Json, JsonArr, JsonObj, Node};
use super::{pointer, Rejection, Seg};
use crate::catalog::{Catalog, Model, ModelLimits, Unresolved, Version};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    /// `/v1/responses`: `input` (+ `instructions`), `max_output_tokens`.
    Responses,
    /// Rerank, score, classify, pooling: every string in the body is input.
    Scoring,
    /// Tokenize and detokenize: no GPU work, no token cost.
    Tokenize,
    /// Audio transcriptions and translations: a multipart upload.
    Audio,
    Models,
    /// Anything else under the route: forwarded with the generic checks only.
    Other,
}

pub fn endpoint(method: &[u8], path: &[u8]) -> Endpoint {
    let path = path.strip_suffix(b"/").unwrap_or(path);
    match (method, path) {
        (b"POST", b"/v1/chat/completions") => Endpoint::Chat,
        (b"POST", b"/v1/completions") => Endpoint::Completions,
        (b"POST", b"/v1/embeddings") => Endpoint::Embeddings,
        (b"POST", b"/v1/responses") => Endpoint::Responses,
        (
            b"POST",
            b"/v1/rerank" | b"/v2/rerank" | b"/rerank" | b"/v1/score" | b"/score" | b"/classify"
            | b"/v1/classify" | b"/pooling" | b"/v1/pooling",
        ) => Endpoint::Scoring,
        (b"POST", b"/tokenize" | b"/detokenize" | b"/v1/tokenize" | b"/v1/detokenize") => {
            Endpoint::Tokenize
        }
        (b"POST", b"/v1/audio/transcriptions" | b"/v1/audio/translations") => Endpoint::Audio,
        (b"GET", b"/v1/models") => Endpoint::Models,
        _ => Endpoint::Other,
    }
}

/// Roles a chat message may have.
const ROLES: [&str; 6] = [
    "system",
    "user",
    "assistant",
    "tool",
    "developer",
    "function",
];

/// Check a request body for `ep` and resolve its model.
pub fn check<'a, 'c, J: Json<'a>>(
    ep: Endpoint,
    body: J,
    catalog: &'c Catalog,
    version_header: Option<&str>,
) -> Result<(&'c std::sync::Arc<Model>, &'c Version, Facts), Rejection> {
    let Some(obj) = body.as_obj() else {
        return Err(Rejection::at(
            "",
            "not_an_object",
            "the body must be a JSON object",
        ));
    };
    let f = Fields::<J>::pick(obj);
    let model = model_name(f.model)?;
    let (m, v) = resolve(catalog, model, version_header)?;
    let lim = &m.limits;

    // What the prompt costs, estimated without a tokenizer: ~4 bytes a
    // token; and where a prompt over the context is pointed at (`None`: no
    // GPU work to fit in a context).
    let (prompt_at, prompt_tokens) = match ep {
        Endpoint::Chat => (Some("/messages"), chat_messages(f.messages)?),
        Endpoint::Completions => (Some("/prompt"), prompt_like(f.prompt, "prompt", true)?),
        Endpoint::Embeddings => (Some("/input"), prompt_like(f.input, "input", true)?),
        Endpoint::Responses => (Some("/input"), responses_input(&f)?),
        Endpoint::Scoring => (
            Some(""),
            tokens_of(text_bytes(body).saturating_sub(model.len())),
        ),
        Endpoint::Tokenize | Endpoint::Audio | Endpoint::Models | Endpoint::Other => (None, 0),
    };
    let max_out = max_output(&f, lim)?;
    range(f.temperature, "temperature", lim.temperature)?;
    range(f.top_p, "top_p", lim.top_p)?;
    check_n_and_stream(&f, lim)?;
    if let Some(ctx) = lim.context_tokens {
        let over = prompt_tokens.saturating_add(max_out.unwrap_or(0)) > ctx;
        if let (Some(at), true) = (prompt_at, over) {
            return Err(Rejection::at(
                at,
                "context_length_exceeded",
                format!(
                    "the prompt and requested output exceed this model's context of {ctx} tokens"
                ),
            ));
        }
    }
    let stream = f.stream.and_then(|x| x.as_bool()).unwrap_or(false);
    let stream_usage = stream_usage(ep, stream, f.stream_options)?;
    Ok((
        m,
        v,
        Facts {
            max_tokens: max_out,
            prompt_tokens,
            stream,
            pinned: version_header.is_some() || model.contains('@'),
            stream_usage,
        },
    ))
}

/// `stream_options`: an object whose `include_usage` is a boolean; for a
/// chat or completions stream, whether it asked for usage.
fn stream_usage<'a, J: Json<'a>>(
    ep: Endpoint,
    stream: bool,
    options: Option<J>,
) -> Result<StreamUsage, Rejection> {
    let include = match options {
        None => None,
        Some(o) => {
            let Some(obj) = o.as_obj() else {
                return Err(Rejection::at(
                    "/stream_options",
                    "invalid_stream_options",
                    "`stream_options` must be an object",
                ));
            };
            match obj.get("include_usage") {
                None => Some(false),
                Some(v) => Some(v.as_bool().ok_or_else(|| {
                    Rejection::at(
                        "/stream_options/include_usage",
                        "invalid_stream_options",
                        "`include_usage` must be true or false",
                    )
                })?),
            }
        }
    };
    if !stream || !matches!(ep, Endpoint::Chat | Endpoint::Completions) {
        return Ok(StreamUsage::NotApplicable);
    }
    Ok(match include {
        None => StreamUsage::NoOptions,
        Some(true) => StreamUsage::Asked,
        Some(false) => StreamUsage::NotAsked,
    })
}

/// Make a stream's body (`StreamUsage::NoOptions` or `NotAsked`) ask for
/// usage: `"stream_options":{"include_usage":true}` added before the
/// object's closing brace, or set in the client's own `stream_options`
/// (the body re-serialised: rare). `false` when the body is not the object
/// it was checked to be.
pub fn ask_stream_usage(body: &mut Vec<u8>, how: StreamUsage) -> bool {
    match how {
        StreamUsage::NoOptions => {
            let Some(end) = body.iter().rposition(|b| !b.is_ascii_whitespace()) else {
                return false;
            };
            if body[end] != b'}' {
                return false;
            }
            body.truncate(end);
            body.extend_from_slice(b",\"stream_options\":{\"include_usage\":true}}");
            true
        }
        StreamUsage::NotAsked => {
            let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(body) else {
                return false;
            };
            let Some(o) = v.get_mut("stream_options").and_then(|o| o.as_object_mut()) else {
                return false;
            };
            o.insert("include_usage".into(), serde_json::Value::Bool(true));
            match serde_json::to_vec(&v) {
                Ok(b) => {
                    *body = b;
                    true
                }
                Err(_) => false,
            }
        }
        StreamUsage::NotApplicable | StreamUsage::Asked => false,
    }
}

/// `model`: a non-empty string, required.
fn model_name<'a, J: Json<'a>>(v: Option<J>) -> Result<&'a str, Rejection> {
    match v {
        Some(v) if v.as_str().is_some_and(|s| !s.is_empty()) => Ok(v.as_str().unwrap_or_default()),
        Some(_) => Err(Rejection::at(
            "/model",
            "invalid_model",
            "`model` must be a non-empty string",
        )),
        None => Err(Rejection::at(
            "/model",
            "missing_model",
            "`model` is required",
        )),
    }
}

/// The catalogue's model and version for a request (404 unknown or
/// disabled, 422 a version that can't be read).
pub(super) fn resolve<'c>(
    catalog: &'c Catalog,
    model: &str,
    version_header: Option<&str>,
) -> Result<(&'c std::sync::Arc<Model>, &'c Version), Rejection> {
    catalog.resolve_ref(model, version_header).map_err(|u| {
        let (status, msg) = match u {
            Unresolved::UnknownModel | Unresolved::Disabled => {
                (404, "the model does not exist or is not available")
            }
            Unresolved::NoSuchVersion => {
                (404, "no deployed version of the model matches the request")
            }
            Unresolved::BadVersion => (
                422,
                "the model version must be `latest`, a version such as `1.2`, or `>=1.2`",
            ),
        };
        Rejection {
            status,
            reason: u.reason(),
            message: msg.into(),
            pointer: Some("/model".into()),
        }
    })
}

/// The output budget asked for: the larger of `max_tokens` and
/// `max_completion_tokens`, each a positive integer within the model's limit.
fn max_output<'a, J: Json<'a>>(f: &Fields<J>, lim: &ModelLimits) -> Result<Option<u64>, Rejection> {
    let mut max_out = None;
    for (key, field) in [
        ("max_tokens", f.max_tokens),
        ("max_completion_tokens", f.max_completion_tokens),
        ("max_output_tokens", f.max_output_tokens),
    ] {
        if let Some(x) = field {
            let n = x.as_u64().filter(|&n| n >= 1).ok_or_else(|| {
                Rejection::at(
                    format!("/{key}"),
                    "invalid_max_tokens",
                    format!("`{key}` must be a positive integer"),
                )
            })?;
            if lim.max_output_tokens.is_some_and(|m| n > m) {
                return Err(Rejection::at(
                    format!("/{key}"),
                    "max_tokens_out_of_range",
                    format!(
                        "`{key}` is above this model's limit of {}",
                        lim.max_output_tokens.unwrap_or(0)
                    ),
                ));
            }
            max_out = Some(max_out.map_or(n, |m: u64| m.max(n)));
        }
    }
    Ok(max_out)
}

/// `n` a positive integer within the model's limit; `stream` a boolean.
fn check_n_and_stream<'a, J: Json<'a>>(f: &Fields<J>, lim: &ModelLimits) -> Result<(), Rejection> {
    if let Some(x) = f.n {
        let n = x
            .as_u64()
            .filter(|&n| n >= 1)
            .ok_or_else(|| Rejection::at("/n", "invalid_n", "`n` must be a positive integer"))?;
        if n > lim.max_n {
            return Err(Rejection::at(
                "/n",
                "n_out_of_range",
                format!("`n` is above this model's limit of {}", lim.max_n),
            ));
        }
    }
    if f.stream.is_some_and(|x| x.as_bool().is_none()) {
        return Err(Rejection::at(
            "/stream",
            "invalid_stream",
            "`stream` must be true or false",
        ));
    }
    Ok(())
}

impl<'a, J: Json<'a>> Fields<J> {
    /// One pass over the members picks out every field the checks read.
    fn pick(obj: J::Obj) -> Fields<J> {
        let mut f = Fields {
            model: None,
            messages: None,
            prompt: None,
            input: None,
            instructions: None,
            max_tokens: None,
            max_completion_tokens: None,
            max_output_tokens: None,
            temperature: None,
            top_p: None,
            n: None,
            stream: None,
            stream_options: None,
        };
        for (k, v) in obj.iter() {
            let slot = match k {
                "model" => &mut f.model,
                "messages" => &mut f.messages,
                "prompt" => &mut f.prompt,
                "input" => &mut f.input,
                "instructions" => &mut f.instructions,
                "max_tokens" => &mut f.max_tokens,
                "max_completion_tokens" => &mut f.max_completion_tokens,
                "max_output_tokens" => &mut f.max_output_tokens,
                "temperature" => &mut f.temperature,
                "top_p" => &mut f.top_p,
                "n" => &mut f.n,
                "stream" => &mut f.stream,
                "stream_options" => &mut f.stream_options,
                _ => continue,
            };
            slot.get_or_insert(v);
        }
        f
    }
}

/// The top-level fields the checks read.
struct Fields<J> {
    model: Option<J>,
    messages: Option<J>,
    prompt: Option<J>,
    input: Option<J>,
    instructions: Option<J>,
    max_tokens: Option<J>,
    max_completion_tokens: Option<J>,
    max_output_tokens: Option<J>,
    temperature: Option<J>,
    top_p: Option<J>,
    n: Option<J>,
    stream: Option<J>,
    stream_options: Option<J>,
}

/// Whether a streamed chat or completions request asked for its token
/// usage (`stream_options.include_usage`): vLLM reports usage in a stream
/// only then, in a final event with no choices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StreamUsage {
    /// Not a stream, or an endpoint whose stream always reports usage.
    #[default]
    NotApplicable,
    /// The client asked: its usage event is its own.
    Asked,
    /// A stream without `stream_options`.
    NoOptions,
    /// `stream_options` present, `include_usage` not true.
    NotAsked,
}

/// What later stages (quotas, cost accounting) need from a request body,
/// extracted during the one parse so nobody parses it again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// The requested output budget (`max_tokens` / `max_completion_tokens`).
    pub max_tokens: Option<u64>,
    /// Prompt size, estimated at 4 bytes a token (token ids count one each).
    pub prompt_tokens: u64,
    pub stream: bool,
    /// The request names its version (`x-model-version`, `model@1.2`, a
    /// KServe `/versions/` path): no traffic split applies to it.
    pub pinned: bool,
    /// Did a streamed chat/completions request ask for its usage.
    pub stream_usage: StreamUsage,
}

fn range<'a, J: Json<'a>>(v: Option<J>, key: &str, (lo, hi): (f64, f64)) -> Result<(), Rejection> {
    let Some(v) = v else { return Ok(()) };
    match v.as_number() {
        Some(x) if x >= lo && x <= hi => Ok(()),
        Some(_) => Err(Rejection::at(
            format!("/{key}"),
            "out_of_range",
            format!("`{key}` must be between {lo} and {hi} for this model"),
        )),
        None => Err(Rejection::at(
            format!("/{key}"),
            "not_a_number",
            format!("`{key}` must be a number"),
        )),
    }
}

/// Tokens estimated from text bytes (4 bytes a token, rounded up).
fn tokens_of(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4)
}

fn chat_messages<'a, J: Json<'a>>(v: Option<J>) -> Result<u64, Rejection> {
    let Some(v) = v else {
        return Err(Rejection::at(
            "/messages",
            "missing_messages",
            "`messages` is required",
        ));
    };
    let Some(msgs) = v.as_arr() else {
        return Err(Rejection::at(
            "/messages",
            "invalid_messages",
            "`messages` must be an array",
        ));
    };
    if msgs.is_empty() {
        return Err(Rejection::at(
            "/messages",
            "invalid_messages",
            "`messages` must not be empty",
        ));
    }
    let mut bytes = 0usize;
    for (i, m) in msgs.iter().enumerate() {
        let at = |k: &str| pointer([Seg::Key("messages"), Seg::Index(i), Seg::Key(k)]);
        let Some(m) = m.as_obj() else {
            return Err(Rejection::at(
                pointer([Seg::Key("messages"), Seg::Index(i)]),
                "invalid_message",
                "each message must be an object",
            ));
        };
        let role = match m.get("role").and_then(|r| r.as_str()) {
            Some(r) if ROLES.contains(&r) => r,
            _ => {
                return Err(Rejection::at(
                    at("role"),
                    "invalid_role",
                    format!("`role` must be one of {}", ROLES.join(", ")),
                ))
            }
        };
        match m.get("content").map(|c| c.node()) {
            Some(Node::Str(s)) => bytes += s.len(),
            Some(Node::Arr(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    let part_at = |k: Option<&str>| {
                        let mut segs = vec![
                            Seg::Key("messages"),
                            Seg::Index(i),
                            Seg::Key("content"),
                            Seg::Index(j),
                        ];
                        segs.extend(k.map(Seg::Key));
                        pointer(segs)
                    };
                    let Some(p) = p.as_obj() else {
                        return Err(Rejection::at(
                            part_at(None),
                            "invalid_content",
                            "each content part must be an object",
                        ));
                    };
                    match p.get("type").and_then(|t| t.as_str()) {
                        Some("text") => match p.get("text").and_then(|t| t.as_str()) {
                            Some(s) => bytes += s.len(),
                            _ => {
                                return Err(Rejection::at(
                                    part_at(Some("text")),
                                    "invalid_content",
                                    "a text part needs a string `text`",
                                ))
                            }
                        },
                        Some(_) => {}
                        None => {
                            return Err(Rejection::at(
                                part_at(Some("type")),
                                "invalid_content",
                                "each content part needs a string `type`",
                            ))
                        }
                    }
                }
            }
            // Assistant turns that only call tools carry no content.
            Some(Node::Null) | None if role == "assistant" => {}
            _ => {
                return Err(Rejection::at(
                    at("content"),
                    "invalid_content",
                    "`content` must be a string or an array of parts",
                ))
            }
        }
    }
    Ok(tokens_of(bytes))
}

/// Bytes of every string in `v` (keys not counted), for estimating what a
/// body costs where its text can sit anywhere. Iterative: the depth limit
/// was enforced on the parse, and this adds no recursion.
fn text_bytes<'a, J: Json<'a>>(v: J) -> usize {
    let mut total = 0usize;
    let mut todo = vec![v];
    while let Some(v) = todo.pop() {
        match v.node() {
            Node::Str(s) => total = total.saturating_add(s.len()),
            Node::Arr(a) => todo.extend(a.iter()),
            Node::Obj(o) => todo.extend(o.iter().map(|(_, x)| x)),
            _ => {}
        }
    }
    total
}

/// The prompt as the engine will see it, cut into chained block hashes
/// for prefix-aware balancing (at most `max_blocks`): tool definitions,
/// then each chat message's role and text in order (completions: `prompt`,
/// token ids as their bytes; responses: `instructions` then `input`),
/// seeded with the model and `cache_salt`. Other endpoints: none.
pub fn prompt_blocks<'a, J: Json<'a>>(
    ep: Endpoint,
    body: J,
    model: &str,
    max_blocks: usize,
) -> Vec<u64> {
    use crate::balance::prefix::BlockHasher;
    let Some(obj) = body.as_obj() else {
        return Vec::new();
    };
    let salt = obj.get("cache_salt").and_then(|s| s.as_str());
    let mut h = BlockHasher::new(model, salt, max_blocks);
    match ep {
        Endpoint::Chat => {
            if let Some(t) = obj.get("tools") {
                h.separate(b"tools");
                feed_text(&mut h, t);
            }
            for m in obj
                .get("messages")
                .and_then(|m| m.as_arr())
                .into_iter()
                .flat_map(|a| a.iter())
            {
                let Some(m) = m.as_obj() else { continue };
                h.separate(
                    m.get("role")
                        .and_then(|r| r.as_str())
                        .unwrap_or("")
                        .as_bytes(),
                );
                if let Some(c) = m.get("content") {
                    feed_text(&mut h, c);
                }
            }
        }
        Endpoint::Completions => {
            if let Some(p) = obj.get("prompt") {
                feed_text(&mut h, p);
            }
        }
        Endpoint::Responses => {
            for key in ["instructions", "input"] {
                if let Some(x) = obj.get(key) {
                    h.separate(key.as_bytes());
                    feed_text(&mut h, x);
                }
            }
        }
        _ => return Vec::new(),
    }
    h.finish()
}

/// Every string (and token id) under `v`, in document order. Recursion is
/// bounded by the depth limit the parse enforced.
fn feed_text<'a, J: Json<'a>>(h: &mut crate::balance::prefix::BlockHasher, v: J) {
    match v.node() {
        Node::Str(s) => h.write(s.as_bytes()),
        Node::Int(_) | Node::Uint(_) => {
            if let Some(id) = v.as_u64() {
                h.write(&id.to_le_bytes()[..4]);
            }
        }
        Node::Arr(a) => a.iter().for_each(|x| feed_text(h, x)),
        Node::Obj(o) => o.iter().for_each(|(_, x)| feed_text(h, x)),
        _ => {}
    }
}

/// `/v1/responses`: `input` (required) a string or an array of input
/// items (objects); `instructions` a string. The prompt is estimated from
/// every string in both.
fn responses_input<'a, J: Json<'a>>(f: &Fields<J>) -> Result<u64, Rejection> {
    let input = f
        .input
        .ok_or_else(|| Rejection::at("/input", "missing_input", "`input` is required"))?;
    match input.node() {
        Node::Str(_) => {}
        Node::Arr(items) => {
            if let Some(i) = items.iter().position(|x| x.as_obj().is_none()) {
                return Err(Rejection::at(
                    pointer([Seg::Key("input"), Seg::Index(i)]),
                    "invalid_input",
                    "each input item must be an object",
                ));
            }
        }
        _ => {
            return Err(Rejection::at(
                "/input",
                "invalid_input",
                "`input` must be a string or an array of input items",
            ))
        }
    }
    if f.instructions
        .is_some_and(|x| !matches!(x.node(), Node::Str(_) | Node::Null))
    {
        return Err(Rejection::at(
            "/instructions",
            "invalid_instructions",
            "`instructions` must be a string",
        ));
    }
    let bytes = text_bytes(input) + f.instructions.map_or(0, |x| text_bytes(x));
    Ok(tokens_of(bytes))
}

/// `prompt`/`input`: a string, an array of strings, an array of token ids, or
/// an array of arrays of token ids.
fn prompt_like<'a, J: Json<'a>>(
    v: Option<J>,
    key: &'static str,
    required: bool,
) -> Result<u64, Rejection> {
    let bad = || {
        Rejection::at(
            format!("/{key}"),
            "invalid_prompt",
            format!("`{key}` must be a string, an array of strings or an array of token ids"),
        )
    };
    match v {
        None if required => Err(Rejection::at(
            format!("/{key}"),
            "missing_prompt",
            format!("`{key}` is required"),
        )),
        None => Ok(0),
        Some(v) => {
            match v.node() {
                Node::Str(s) => Ok(tokens_of(s.len())),
                Node::Arr(items) => {
                    let mut tokens = 0u64;
                    for (i, it) in items.iter().enumerate() {
                        match it.node() {
                            Node::Str(s) => tokens = tokens.saturating_add(tokens_of(s.len())),
                            Node::Int(_) | Node::Uint(_) if it.as_u64().is_some() => {
                                tokens = tokens.saturating_add(1)
                            }
                            Node::Arr(ids) => {
                                if let Some(j) = ids.iter().position(|x| x.as_u64().is_none()) {
                                    return Err(Rejection::at(
                                        pointer([Seg::Key(key), Seg::Index(i), Seg::Index(j)]),
                                        "invalid_prompt",
                                        "token ids must be non-negative integers",
                                    ));
                                }
                                tokens += ids.len() as u64;
                            }
                            _ => return Err(Rejection::at(
                                pointer([Seg::Key(key), Seg::Index(i)]),
                                "invalid_prompt",
                                "each item must be a string, a token id or an array of token ids",
                            )),
                        }
                    }
                    Ok(tokens)
                }
                _ => Err(bad()),
            }
        }
    }
}

/// The `GET /v1/models` answer: every enabled model (the authorization stage
/// will filter this by what the caller may use).
/// `GET /v1/models`: the enabled models `visible` lets through.
pub fn models_list(catalog: &Catalog, visible: impl Fn(&str) -> bool) -> Vec<u8> {
    let data: Vec<serde_json::Value> = catalog
        .enabled()
        .filter(|m| visible(&m.name))
        .map(|m| {
            serde_json::json!({
                "id": m.name,
                "object": "model",
                "owned_by": "gateway",
                "versions": m.versions.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({"object": "list", "data": data})
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Model, ModelLimits, Version};

    fn catalog() -> Catalog {
        let limits = ModelLimits {
            context_tokens: Some(100),
            max_output_tokens: Some(50),
            max_n: 2,
            ..ModelLimits::default()
        };
        Catalog::new(vec![
            Model {
                name: "llama".into(),
                versions: vec![Version::parse("1").unwrap(), Version::parse("2").unwrap()],
                enabled: true,
                limits,
                schema: None,
            },
            Model {
                name: "off".into(),
                versions: vec![Version::parse("1").unwrap()],
                enabled: false,
                limits: ModelLimits::default(),
                schema: None,
            },
            Model {
                name: "wide".into(),
                versions: vec![Version::parse("1").unwrap()],
                enabled: true,
                limits: ModelLimits {
                    context_tokens: Some(100),
                    ..ModelLimits::default()
                },
                schema: None,
            },
        ])
    }

    fn run(ep: Endpoint, body: &str) -> Result<String, (u16, &'static str, Option<String>)> {
        let c = catalog();
        let mut b = body.as_bytes().to_vec();
        let v = simd_json::to_borrowed_value(&mut b).unwrap();
        let dom = check(ep, &v, &c, None)
            .map(|(m, v, f)| (format!("{}@{}", m.name, v), f))
            .map_err(|r| (r.status, r.reason, r.pointer));
        // The gateway checks simd-json's tape: it must answer the same.
        let mut b = body.as_bytes().to_vec();
        let tape = simd_json::to_tape(&mut b).unwrap();
        let on_tape = check(ep, super::super::json::Tape::root(&tape.0), &c, None)
            .map(|(m, v, f)| (format!("{}@{}", m.name, v), f))
            .map_err(|r| (r.status, r.reason, r.pointer));
        assert_eq!(dom, on_tape, "{body}");
        dom.map(|(m, _)| m)
    }

    /// Facts of an admitted body (checked on DOM and tape alike).
    fn facts(ep: Endpoint, body: &str) -> Facts {
        run(ep, body).expect("admitted");
        let mut b = body.as_bytes().to_vec();
        let v = simd_json::to_borrowed_value(&mut b).unwrap();
        check(ep, &v, &catalog(), None).unwrap().2
    }

    #[test]
    fn streams_say_whether_they_asked_for_usage_and_are_made_to_ask() {
        let ask = |ep, body: &str| facts(ep, body).stream_usage;
        let base = r#"{"model":"wide","messages":[{"role":"user","content":"hi"}]"#;
        let b = |extra: &str| format!("{base}{extra}}}");
        assert_eq!(ask(Endpoint::Chat, &b("")), StreamUsage::NotApplicable);
        assert_eq!(
            ask(Endpoint::Chat, &b(r#","stream":true"#)),
            StreamUsage::NoOptions
        );
        assert_eq!(
            ask(Endpoint::Chat, &b(r#","stream":true,"stream_options":{}"#)),
            StreamUsage::NotAsked
        );
        assert_eq!(
            ask(
                Endpoint::Chat,
                &b(r#","stream":true,"stream_options":{"include_usage":true}"#)
            ),
            StreamUsage::Asked
        );
        assert_eq!(
            run(Endpoint::Chat, &b(r#","stream":true,"stream_options":5"#))
                .unwrap_err()
                .1,
            "invalid_stream_options"
        );
        assert_eq!(
            run(
                Endpoint::Chat,
                &b(r#","stream_options":{"include_usage":"yes"}"#)
            )
            .unwrap_err()
            .2
            .as_deref(),
            Some("/stream_options/include_usage")
        );
        // Made to ask: appended, or set in the client's own options (kept).
        let mut body = b(r#","stream":true"#).into_bytes();
        body.extend_from_slice(b" \n");
        assert!(ask_stream_usage(&mut body, StreamUsage::NoOptions));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["messages"][0]["content"], "hi");
        let mut body =
            b(r#","stream":true,"stream_options":{"continuous_usage_stats":true}"#).into_bytes();
        assert!(ask_stream_usage(&mut body, StreamUsage::NotAsked));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["continuous_usage_stats"], true);
        assert_eq!(
            facts(Endpoint::Chat, std::str::from_utf8(&body).unwrap()).stream_usage,
            StreamUsage::Asked
        );
        let mut garbage = b"[1,2]".to_vec();
        assert!(!ask_stream_usage(&mut garbage, StreamUsage::NoOptions));
    }

    #[test]
    fn vllm_endpoints_are_recognised() {
        for (path, ep) in [
            ("/v1/responses", Endpoint::Responses),
            ("/v1/rerank", Endpoint::Scoring),
            ("/rerank", Endpoint::Scoring),
            ("/v1/score", Endpoint::Scoring),
            ("/classify", Endpoint::Scoring),
            ("/pooling", Endpoint::Scoring),
            ("/tokenize", Endpoint::Tokenize),
            ("/detokenize", Endpoint::Tokenize),
            ("/v1/audio/transcriptions", Endpoint::Audio),
            ("/v1/audio/translations/", Endpoint::Audio),
            ("/v1/responses/resp_1", Endpoint::Other),
        ] {
            assert_eq!(endpoint(b"POST", path.as_bytes()), ep, "{path}");
        }
        assert_eq!(endpoint(b"GET", b"/v1/responses"), Endpoint::Other);
    }

    #[test]
    fn responses_table() {
        use Endpoint::Responses;
        let ok = r#"{"model":"llama","input":"abcdefgh","instructions":"abcd","max_output_tokens":20,"stream":true}"#;
        let f = facts(Responses, ok);
        assert_eq!(
            (f.prompt_tokens, f.max_tokens, f.stream),
            (3, Some(20), true)
        );
        let items = r#"{"model":"llama","input":[{"role":"user","content":[{"type":"input_text","text":"abcdefgh"}]}]}"#;
        // Every string counts: the role, the part type and the text.
        assert_eq!(
            facts(Responses, items).prompt_tokens,
            (4 + 10 + 8_u64).div_ceil(4)
        );
        let cases: &[(&str, u16, &str, &str)] = &[
            (r#"{"model":"llama"}"#, 422, "missing_input", "/input"),
            (
                r#"{"model":"llama","input":5}"#,
                422,
                "invalid_input",
                "/input",
            ),
            (
                r#"{"model":"llama","input":["x"]}"#,
                422,
                "invalid_input",
                "/input/0",
            ),
            (
                r#"{"model":"llama","input":"x","instructions":3}"#,
                422,
                "invalid_instructions",
                "/instructions",
            ),
            (
                r#"{"model":"llama","input":"x","max_output_tokens":51}"#,
                422,
                "max_tokens_out_of_range",
                "/max_output_tokens",
            ),
            (
                r#"{"model":"llama","input":"x","max_output_tokens":0}"#,
                422,
                "invalid_max_tokens",
                "/max_output_tokens",
            ),
            (
                r#"{"model":"llama","input":"x","temperature":9}"#,
                422,
                "out_of_range",
                "/temperature",
            ),
            (
                r#"{"model":"nope","input":"x"}"#,
                404,
                "model_not_found",
                "/model",
            ),
            (r#"{"input":"x"}"#, 422, "missing_model", "/model"),
        ];
        for (body, status, reason, ptr) in cases {
            assert_eq!(
                run(Responses, body),
                Err((*status, *reason, Some(ptr.to_string()))),
                "{body}"
            );
        }
        // Context: 4 bytes a token; 100 tokens of context, 50 asked for.
        let long = format!(
            r#"{{"model":"llama","input":"{}","max_output_tokens":50}}"#,
            "x".repeat(204)
        );
        assert_eq!(
            run(Responses, &long).unwrap_err().1,
            "context_length_exceeded"
        );
    }

    #[test]
    fn scoring_and_tokenize_need_a_model() {
        let rerank = r#"{"model":"llama","query":"abcd","documents":["abcd","abcdabcd"]}"#;
        assert_eq!(facts(Endpoint::Scoring, rerank).prompt_tokens, 4);
        assert_eq!(
            run(Endpoint::Scoring, r#"{"query":"q"}"#).unwrap_err().1,
            "missing_model"
        );
        assert_eq!(
            run(Endpoint::Scoring, r#"{"model":"off","query":"q"}"#)
                .unwrap_err()
                .1,
            "model_disabled"
        );
        let tok = r#"{"model":"llama","prompt":"a long prompt"}"#;
        assert_eq!(facts(Endpoint::Tokenize, tok).prompt_tokens, 0);
        assert_eq!(
            run(Endpoint::Tokenize, r#"{"prompt":"x"}"#).unwrap_err().1,
            "missing_model"
        );
        // The scoring estimate counts the context too.
        let long = format!(
            r#"{{"model":"wide","text_1":"{}","text_2":"x"}}"#,
            "y".repeat(420)
        );
        assert_eq!(
            run(Endpoint::Scoring, &long).unwrap_err().1,
            "context_length_exceeded"
        );
    }

    #[test]
    fn chat_table() {
        use Endpoint::Chat;
        let ok = r#"{"model":"llama","messages":[{"role":"user","content":"hi"}],"max_tokens":10,"temperature":0.5,"n":2,"stream":true}"#;
        assert_eq!(run(Chat, ok), Ok("llama@2".into()));
        assert_eq!(
            run(
                Chat,
                r#"{"model":"llama@1","messages":[{"role":"user","content":[{"type":"text","text":"x"},{"type":"image_url","image_url":{"url":"u"}}]}]}"#
            ),
            Ok("llama@1".into())
        );
        assert_eq!(
            run(
                Chat,
                r#"{"model":"llama","messages":[{"role":"assistant","content":null}]}"#
            ),
            Ok("llama@2".into())
        );
        let cases: &[(&str, u16, &str, &str)] = &[
            (r#"[]"#, 422, "not_an_object", ""),
            (r#"{"messages":[]}"#, 422, "missing_model", "/model"),
            (r#"{"model":3}"#, 422, "invalid_model", "/model"),
            (
                r#"{"model":"nope","messages":[]}"#,
                404,
                "model_not_found",
                "/model",
            ),
            (
                r#"{"model":"off","messages":[]}"#,
                404,
                "model_disabled",
                "/model",
            ),
            (
                r#"{"model":"llama@9","messages":[]}"#,
                404,
                "version_not_found",
                "/model",
            ),
            (r#"{"model":"llama"}"#, 422, "missing_messages", "/messages"),
            (
                r#"{"model":"llama","messages":[]}"#,
                422,
                "invalid_messages",
                "/messages",
            ),
            (
                r#"{"model":"llama","messages":[{"role":"root","content":"x"}]}"#,
                422,
                "invalid_role",
                "/messages/0/role",
            ),
            (
                r#"{"model":"llama","messages":[{"role":"user","content":"x"},{"role":"user","content":5}]}"#,
                422,
                "invalid_content",
                "/messages/1/content",
            ),
            (
                r#"{"model":"llama","messages":[{"role":"user","content":[{"type":"text"}]}]}"#,
                422,
                "invalid_content",
                "/messages/0/content/0/text",
            ),
            (
                r#"{"model":"llama","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                422,
                "invalid_max_tokens",
                "/max_tokens",
            ),
            (
                r#"{"model":"llama","messages":[{"role":"user","content":"x"}],"max_tokens":51}"#,
                422,
                "max_tokens_out_of_range",
                "/max_tokens",
            ),
            (
                r#"{"model":"llama","messages":[{"role":"user","content":"x"}],"temperature":2.5}"#,
                422,
                "out_of_range",
                "/temperature",
            ),
            (
                r#"{"model":"llama","messages":[{"role":"user","content":"x"}],"top_p":"high"}"#,
                422,
                "not_a_number",
                "/top_p",
            ),
            (
                r#"{"model":"llama","messages":[{"role":"user","content":"x"}],"n":3}"#,
                422,
                "n_out_of_range",
                "/n",
            ),
            (
                r#"{"model":"llama","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
                422,
                "invalid_stream",
                "/stream",
            ),
        ];
        for (body, status, reason, ptr) in cases {
            assert_eq!(
                run(Chat, body),
                Err((*status, *reason, Some(ptr.to_string()))),
                "{body}"
            );
        }
        // No overflow past the context check with an absurd output budget.
        let huge = format!(
            r#"{{"model":"wide","messages":[{{"role":"user","content":"x"}}],"max_tokens":{}}}"#,
            u64::MAX
        );
        assert_eq!(
            run(Chat, &huge),
            Err((422, "context_length_exceeded", Some("/messages".into())))
        );
        // 360 bytes ≈ 90 tokens + 20 output > 100.
        let long = format!(
            r#"{{"model":"llama","messages":[{{"role":"user","content":"{}"}}],"max_tokens":20}}"#,
            "a".repeat(360)
        );
        assert_eq!(
            run(Chat, &long),
            Err((422, "context_length_exceeded", Some("/messages".into())))
        );
    }

    #[test]
    fn facts_for_later_stages() {
        let c = catalog();
        let mut b = br#"{"model":"llama","messages":[{"role":"user","content":"12345678"}],"max_tokens":7,"stream":true}"#.to_vec();
        let v = simd_json::to_borrowed_value(&mut b).unwrap();
        let (_, _, f) = check(Endpoint::Chat, &v, &c, None).unwrap();
        assert_eq!(
            f,
            Facts {
                max_tokens: Some(7),
                prompt_tokens: 2,
                stream: true,
                pinned: false,
                stream_usage: StreamUsage::NoOptions,
            }
        );
        // Naming a version (suffix or header) pins it: no traffic split.
        let mut b = br#"{"model":"llama@1","messages":[{"role":"user","content":"hi"}]}"#.to_vec();
        let v = simd_json::to_borrowed_value(&mut b).unwrap();
        assert!(check(Endpoint::Chat, &v, &c, None).unwrap().2.pinned);
        let mut b = br#"{"model":"llama","messages":[{"role":"user","content":"hi"}]}"#.to_vec();
        let v = simd_json::to_borrowed_value(&mut b).unwrap();
        assert!(check(Endpoint::Chat, &v, &c, Some("1")).unwrap().2.pinned);
    }

    #[test]
    fn completions_and_embeddings() {
        assert_eq!(
            run(
                Endpoint::Completions,
                r#"{"model":"llama","prompt":["a","b"]}"#
            ),
            Ok("llama@2".into())
        );
        assert_eq!(
            run(
                Endpoint::Completions,
                r#"{"model":"llama","prompt":[[1,2],[3]]}"#
            ),
            Ok("llama@2".into())
        );
        assert_eq!(
            run(
                Endpoint::Completions,
                r#"{"model":"llama","prompt":[[1,-2]]}"#
            ),
            Err((422, "invalid_prompt", Some("/prompt/0/1".into())))
        );
        assert_eq!(
            run(Endpoint::Embeddings, r#"{"model":"llama","input":"text"}"#),
            Ok("llama@2".into())
        );
        assert_eq!(
            run(Endpoint::Embeddings, r#"{"model":"llama","input":{"a":1}}"#),
            Err((422, "invalid_prompt", Some("/input".into())))
        );
        assert_eq!(
            run(Endpoint::Embeddings, r#"{"model":"llama"}"#),
            Err((422, "missing_prompt", Some("/input".into())))
        );
    }

    #[test]
    fn models_list_has_only_enabled() {
        let v: serde_json::Value =
            serde_json::from_slice(&models_list(&catalog(), |_| true)).unwrap();
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["llama", "wide"]);
    }
}
