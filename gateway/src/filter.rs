//! Response field filter: drop operator-listed fields from JSON responses,
//! also inside server-sent event streams.
//!
//! Operators list JSON pointers (RFC 6901), e.g. `/usage/internal`,
//! `/choices/0/logprobs`, `/debug`. [`FieldFilter::apply_json`] removes them
//! from a whole JSON document; [`SseFilter`] does the same to the JSON
//! `data:` payload of every event of a `text/event-stream`, incrementally,
//! with a bound on how much of one event it will hold.
//!
//! Rewritten documents are re-serialised compactly by `serde_json`: the
//! original whitespace is not kept, and — because the crate builds
//! `serde_json` without its `preserve_order` feature — object keys come out
//! sorted rather than in their original order. Numbers go through `f64`/
//! `i64`/`u64`, so a number that does not fit those exactly may be
//! re-spelled. Documents in which nothing matched are never re-serialised:
//! they are forwarded byte-for-byte.

use std::cmp::Ordering;
use std::sync::Arc;

use serde_json::Value;

use crate::syntax::parse_pointer;

/// A parsed set of JSON pointers to remove from responses.
#[derive(Debug, Clone, Default)]
pub struct FieldFilter {
    /// Unescaped reference tokens of each pointer, in removal order (see
    /// [`removal_order`]), without duplicates.
    pointers: Vec<Vec<String>>,
}

impl FieldFilter {
    /// Parse the pointers. Each must start with `/` (so the whole document,
    /// `""`, cannot be removed); `~0` and `~1` are unescaped to `~` and `/`,
    /// and any other `~` escape is an error. The message names the pointer.
    ///
    /// All pointers refer to the original document: listing `/choices/0`
    /// and `/choices/1` removes both of the first two elements, whatever the
    /// order they are listed in.
    pub fn new(pointers: &[String]) -> Result<FieldFilter, String> {
        let mut parsed = Vec::with_capacity(pointers.len());
        for p in pointers {
            parsed.push(parse_pointer(p)?);
        }
        parsed.sort_by(|a, b| removal_order(a, b));
        parsed.dedup();
        Ok(FieldFilter { pointers: parsed })
    }

    /// No pointers: nothing would ever be removed.
    pub fn is_empty(&self) -> bool {
        self.pointers.is_empty()
    }

    /// Filter a whole JSON document. `Some(rewritten bytes)` if `body`
    /// parsed as JSON and at least one pointer matched; `None` if it is not
    /// JSON or nothing matched — then forward the original bytes unchanged.
    pub fn apply_json(&self, body: &[u8]) -> Option<Vec<u8>> {
        if self.pointers.is_empty() {
            return None;
        }
        let mut doc: Value = serde_json::from_slice(body).ok()?;
        if !self.apply_value(&mut doc) {
            return None;
        }
        serde_json::to_vec(&doc).ok()
    }

    /// Remove every pointer from `doc`; whether anything was removed.
    pub fn apply_value(&self, doc: &mut Value) -> bool {
        let mut removed = false;
        for tokens in &self.pointers {
            removed |= remove(doc, tokens);
        }
        removed
    }
}

/// The order pointers are applied in, so that every pointer still means
/// what it meant in the original document: token by token, greater first,
/// where array-index-like tokens (all digits) compare numerically and a
/// longer pointer is greater than its own prefix. Removing `/a/2` before
/// `/a/1`, and `/a/1/x` before `/a/0` or `/a/1`, keeps later indices valid.
///
/// A total order: digit-only tokens sort among themselves by (length,
/// bytes), which is numeric order for canonical indices, and above all
/// other tokens, which sort by bytes.
fn removal_order(a: &[String], b: &[String]) -> Ordering {
    fn token(a: &str, b: &str) -> Ordering {
        let is_num = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
        match (is_num(a), is_num(b)) {
            (true, true) => a.len().cmp(&b.len()).then_with(|| a.cmp(b)),
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => a.cmp(b),
        }
    }
    for (x, y) in a.iter().zip(b) {
        match token(x, y) {
            Ordering::Equal => {}
            o => return o.reverse(),
        }
    }
    b.len().cmp(&a.len())
}

/// RFC 6901 §4 array index: "0", or digits without a leading zero.
fn array_index(tok: &str) -> Option<usize> {
    if tok.is_empty()
        || !tok.bytes().all(|c| c.is_ascii_digit())
        || (tok.len() > 1 && tok.starts_with('0'))
    {
        return None;
    }
    tok.parse().ok()
}

/// Remove the value at `tokens` (non-empty) from `doc`; whether it existed.
fn remove(doc: &mut Value, tokens: &[String]) -> bool {
    let Some((last, parents)) = tokens.split_last() else {
        return false;
    };
    let mut cur = doc;
    for tok in parents {
        cur = match cur {
            Value::Object(map) => match map.get_mut(tok.as_str()) {
                Some(v) => v,
                None => return false,
            },
            Value::Array(arr) => match array_index(tok).and_then(|i| arr.get_mut(i)) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match cur {
        Value::Object(map) => {
            if !map.contains_key(last.as_str()) {
                return false;
            }
            // `retain` keeps the order of the other keys whichever map
            // serde_json is built with (`remove` would swap entries under
            // `preserve_order`).
            map.retain(|k, _| k != last);
            true
        }
        Value::Array(arr) => match array_index(last) {
            Some(i) if i < arr.len() => {
                arr.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// Incremental SSE (`text/event-stream`) rewriter: feed bytes as they arrive
/// from upstream, get bytes to send downstream.
///
/// Events are split at blank lines, with lines ended by CRLF, LF or CR as
/// the SSE spec allows. In each complete event, the `data:` payload (the
/// values of its `data` fields, each with one leading space removed, joined
/// with `"\n"`) that is a JSON object or array goes through
/// [`FieldFilter::apply_json`]; if that changed it, the event's `data`
/// lines are replaced by one `data: <json>` line where the first was, with
/// that line's ending. Every other line and every event with nothing to
/// change is passed through byte-for-byte. The output does not depend on how
/// the input is split into `feed` calls.
///
/// An event longer than `max_event` bytes (counting its closing blank line,
/// except the LF of a closing CRLF) is passed through unmodified: as soon as the buffered part exceeds the
/// bound it is flushed, and bytes are forwarded as they come until the
/// event ends. So at most `max_event` bytes are ever held.
#[derive(Debug)]
pub struct SseFilter {
    filter: Arc<FieldFilter>,
    max_event: usize,
    /// The incomplete event so far (empty while passing through).
    buf: Vec<u8>,
    /// Forwarding an oversized event as it comes until its end.
    passthrough: bool,
    /// Boundary scan: the next byte starts a line (at stream or event
    /// start, or after a line ending).
    line_start: bool,
    /// Boundary scan: the previous byte was a CR inside an event, so an LF
    /// now completes that CRLF.
    after_cr: bool,
    /// The last event ended with a CR blank line; an LF right after it is
    /// the rest of that CRLF and is forwarded as-is.
    skip_lf: bool,
    /// No event has been completed yet (a UTF-8 BOM may open the stream).
    first_event: bool,
    /// What the stream's events say about its tokens.
    pub tap: Tap,
}

/// What an OpenAI stream's events say, as they go by.
#[derive(Debug, Default)]
pub struct Tap {
    /// Remove usage-only events (`"choices":[]` with a `usage` object):
    /// the gateway asked for them, the client didn't.
    pub strip_usage: bool,
    /// Events removed that way, not yet taken by the relay (it reads the
    /// backend's usage from them).
    pub removed: Vec<u8>,
    /// Events that carried generated content: a token (or a few) each.
    pub content_events: u64,
}

impl Tap {
    /// Count a content event; `true`: remove it (usage-only, stripped).
    fn sees(&mut self, event: &[u8]) -> bool {
        // A quote inside a JSON string is escaped, so these only match structure.
        let has = |needle: &[u8]| {
            memchr::memmem::find_iter(event, needle).any(|i| i == 0 || event[i - 1] != b'\\')
        };
        if has(b"\"choices\":[{") {
            if has(b"\"content\":\"") || has(b"\"text\":\"") {
                self.content_events += 1;
            }
            return false;
        }
        if self.strip_usage && has(b"\"choices\":[]") && has(b"\"usage\":{") {
            self.removed.extend_from_slice(event);
            return true;
        }
        false
    }
}

impl SseFilter {
    pub fn new(filter: Arc<FieldFilter>, max_event: usize) -> SseFilter {
        SseFilter {
            filter,
            max_event,
            buf: Vec::new(),
            passthrough: false,
            line_start: true,
            after_cr: false,
            skip_lf: false,
            first_event: true,
            tap: Tap::default(),
        }
    }

    /// Append to `out` every event completed so far, rewritten where
    /// something was removed, and keep the incomplete tail buffered.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            if self.skip_lf {
                self.skip_lf = false;
                if input[0] == b'\n' {
                    out.push(b'\n');
                    input = &input[1..];
                    continue;
                }
            }
            match self.scan(input) {
                Some(end) => {
                    let (event, rest) = input.split_at(end);
                    input = rest;
                    if self.passthrough {
                        out.extend_from_slice(event);
                        self.passthrough = false;
                    } else if self.buf.len() + event.len() > self.max_event {
                        out.extend_from_slice(&self.buf);
                        out.extend_from_slice(event);
                        self.buf.clear();
                    } else if self.buf.is_empty() {
                        self.emit(event, out);
                    } else {
                        self.buf.extend_from_slice(event);
                        let buf = std::mem::take(&mut self.buf);
                        self.emit(&buf, out);
                        self.buf = buf;
                        self.buf.clear();
                    }
                    self.first_event = false;
                }
                None => {
                    if self.passthrough {
                        out.extend_from_slice(input);
                    } else if self.buf.len() + input.len() > self.max_event {
                        out.extend_from_slice(&self.buf);
                        out.extend_from_slice(input);
                        self.buf.clear();
                        self.passthrough = true;
                    } else {
                        self.buf.extend_from_slice(input);
                    }
                    return;
                }
            }
        }
    }

    /// At end of stream: whatever is buffered, unmodified. The filter is
    /// then ready for a new stream.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.buf);
        self.buf.clear();
        self.passthrough = false;
        self.line_start = true;
        self.after_cr = false;
        self.skip_lf = false;
        self.first_event = true;
    }

    /// Advance the boundary scan over `input`: `Some(end)` if an event ends
    /// at `input[..end]` (its blank line included, except the LF of a CRLF
    /// blank line when the CR is the last byte — see `skip_lf`).
    fn scan(&mut self, input: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            match input[i] {
                b'\n' if self.after_cr => self.after_cr = false,
                c @ (b'\n' | b'\r') => {
                    if self.line_start {
                        // A blank line: the event ends here.
                        self.after_cr = false;
                        self.skip_lf = c == b'\r';
                        return Some(i + 1);
                    }
                    self.line_start = true;
                    self.after_cr = c == b'\r';
                }
                _ => {
                    self.line_start = false;
                    self.after_cr = false;
                    match memchr::memchr2(b'\n', b'\r', &input[i + 1..]) {
                        Some(k) => i += k,
                        None => return None,
                    }
                }
            }
            i += 1;
        }
        None
    }

    /// Write one complete event, rewritten if its JSON data changed (or
    /// not at all: a usage-only event the tap strips).
    fn emit(&mut self, event: &[u8], out: &mut Vec<u8>) {
        if self.tap.sees(event) {
            return;
        }
        if self.filter.is_empty() {
            out.extend_from_slice(event);
            return;
        }
        match self.rewrite(event) {
            Some(new) => out.extend_from_slice(&new),
            None => out.extend_from_slice(event),
        }
    }

    fn rewrite(&self, event: &[u8]) -> Option<Vec<u8>> {
        let bom = if self.first_event && event.starts_with(b"\xEF\xBB\xBF") {
            3
        } else {
            0
        };
        let lines = split_lines(&event[bom..]);
        let mut data: Vec<u8> = Vec::new();
        let mut first_data: Option<usize> = None;
        for (n, &(content, _)) in lines.iter().enumerate() {
            if let Some(value) = data_value(content) {
                if first_data.is_some() {
                    data.push(b'\n');
                } else {
                    first_data = Some(n);
                }
                data.extend_from_slice(value);
            }
        }
        let first_data = first_data?;
        let start = data.iter().position(|c| !c.is_ascii_whitespace())?;
        if !matches!(data[start], b'{' | b'[') {
            return None;
        }
        let json = self.filter.apply_json(&data)?;

        let mut out = Vec::with_capacity(event.len());
        out.extend_from_slice(&event[..bom]);
        for (n, &(content, ending)) in lines.iter().enumerate() {
            if n == first_data {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&json);
                out.extend_from_slice(ending);
            } else if data_value(content).is_none() {
                out.extend_from_slice(content);
                out.extend_from_slice(ending);
            }
        }
        Some(out)
    }
}

/// Split into (content, line ending) pairs; CRLF, LF and CR end lines.
fn split_lines(mut s: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut lines = Vec::new();
    while !s.is_empty() {
        match memchr::memchr2(b'\n', b'\r', s) {
            Some(i) => {
                let len = if s[i] == b'\r' && s.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                lines.push((&s[..i], &s[i..i + len]));
                s = &s[i + len..];
            }
            None => {
                lines.push((s, &s[s.len()..]));
                break;
            }
        }
    }
    lines
}

/// The value of a `data` field line (one leading space removed), or `None`
/// for any other line. A bare `data` line is a data field with an empty value.
fn data_value(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"data")?;
    match rest {
        [] => Some(rest),
        [b':', b' ', v @ ..] | [b':', v @ ..] => Some(v),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(ptrs: &[&str]) -> FieldFilter {
        FieldFilter::new(&ptrs.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn apply(ptrs: &[&str], body: &str) -> Option<String> {
        filter(ptrs)
            .apply_json(body.as_bytes())
            .map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn new_parses_and_rejects() {
        let f = filter(&["/a~1b/c~0d", "/", "/x//y"]);
        assert!(f
            .pointers
            .contains(&vec!["a/b".to_string(), "c~d".to_string()]));
        assert!(f.pointers.contains(&vec![String::new()]));
        assert!(f
            .pointers
            .contains(&vec!["x".to_string(), String::new(), "y".to_string()]));
        assert!(!f.is_empty());
        assert!(filter(&[]).is_empty());
        for bad in ["", "usage", "#/usage", "/a~", "/a~2", "/~x"] {
            let err = FieldFilter::new(&[bad.to_string()]).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
        // "~01" is "~1" unescaped once, not "/".
        assert_eq!(filter(&["/~01"]).pointers, vec![vec!["~1".to_string()]]);
    }

    #[test]
    fn apply_json_cases() {
        let cases: &[(&[&str], &str, Option<&str>)] = &[
            // nested pointer
            (
                &["/usage/internal"],
                r#"{"usage":{"total":3,"internal":{"x":1}},"id":"a"}"#,
                Some(r#"{"id":"a","usage":{"total":3}}"#),
            ),
            // top level
            (&["/debug"], r#"{"debug":true,"ok":1}"#, Some(r#"{"ok":1}"#)),
            // inside an array element
            (
                &["/choices/0/logprobs"],
                r#"{"choices":[{"i":0,"logprobs":[1]},{"i":1,"logprobs":[2]}]}"#,
                Some(r#"{"choices":[{"i":0},{"i":1,"logprobs":[2]}]}"#),
            ),
            // array index removes the element and shifts the rest
            (
                &["/choices/0"],
                r#"{"choices":[1,2,3]}"#,
                Some(r#"{"choices":[2,3]}"#),
            ),
            (&["/1"], r#"[1,2,3]"#, Some(r#"[1,3]"#)),
            // indices refer to the original document, whatever the order
            (
                &["/a/0", "/a/2"],
                r#"{"a":[0,1,2,3]}"#,
                Some(r#"{"a":[1,3]}"#),
            ),
            (
                &["/a/2", "/a/0"],
                r#"{"a":[0,1,2,3]}"#,
                Some(r#"{"a":[1,3]}"#),
            ),
            (
                &["/a/0", "/a/1/x"],
                r#"{"a":[{"x":0},{"x":1},{"x":2}]}"#,
                Some(r#"{"a":[{},{"x":2}]}"#),
            ),
            (
                &["/a/0", "/a/10"],
                r#"{"a":[0,1,2,3,4,5,6,7,8,9,10,11]}"#,
                Some(r#"{"a":[1,2,3,4,5,6,7,8,9,11]}"#),
            ),
            // escaped keys
            (
                &["/a~1b"],
                r#"{"a/b":1,"a":{"b":2}}"#,
                Some(r#"{"a":{"b":2}}"#),
            ),
            (&["/m~0n"], r#"{"m~n":1,"m":2}"#, Some(r#"{"m":2}"#)),
            (&["/"], r#"{"":1,"a":2}"#, Some(r#"{"a":2}"#)),
            // a digit key in an object is a key
            (&["/0"], r#"{"0":1,"1":2}"#, Some(r#"{"1":2}"#)),
            // some match, some don't
            (&["/nope", "/debug"], r#"{"debug":1}"#, Some(r#"{}"#)),
            // duplicates are harmless
            (&["/a/0", "/a/0"], r#"{"a":[0,1]}"#, Some(r#"{"a":[1]}"#)),
            // nothing matched → None
            (&["/debug"], r#"{"ok":1}"#, None),
            (&["/usage/internal"], r#"{"usage":5}"#, None),
            (&["/a/5"], r#"{"a":[1]}"#, None),
            (&["/a/-"], r#"{"a":[1]}"#, None),
            (&["/a/01"], r#"{"a":[1,2]}"#, None),
            (&["/a/x"], r#"{"a":[1,2]}"#, None),
            (&["/a"], r#""a""#, None),
            (&["/a"], r#"[{"a":1}]"#, None),
            // not JSON → None
            (&["/a"], "not json", None),
            (&["/a"], r#"{"a":1"#, None),
            (&["/a"], r#"{"a":1} trailing"#, None),
            (&["/a"], "", None),
            (&["/a"], "[DONE]", None),
            // no pointers → None
            (&[], r#"{"a":1}"#, None),
        ];
        for (ptrs, body, want) in cases {
            assert_eq!(apply(ptrs, body).as_deref(), *want, "{ptrs:?} on {body}");
        }
    }

    #[test]
    fn removal_order_is_total_and_puts_descendants_and_higher_indices_first() {
        let mut ps: Vec<Vec<String>> = [
            "/a/10", "/a/9", "/a/1a", "/a/1/x", "/a/1", "/a", "/b", "/a/01", "/a/-", "/", "/a/9/z",
        ]
        .iter()
        .map(|p| parse_pointer(p).unwrap())
        .collect();
        ps.sort_by(|a, b| removal_order(a, b));
        let pos = |p: &str| {
            ps.iter()
                .position(|x| *x == parse_pointer(p).unwrap())
                .unwrap()
        };
        assert!(pos("/a/10") < pos("/a/9"));
        assert!(pos("/a/9/z") < pos("/a/9"));
        assert!(pos("/a/9") < pos("/a/1/x"));
        assert!(pos("/a/1/x") < pos("/a/1"));
        assert!(pos("/a/1") < pos("/a"));
        for a in &ps {
            for b in &ps {
                assert_eq!(removal_order(a, b), removal_order(b, a).reverse());
            }
        }
    }

    const MAX: usize = 1 << 16;

    fn sse(ptrs: &[&str], max_event: usize) -> SseFilter {
        SseFilter::new(Arc::new(filter(ptrs)), max_event)
    }

    fn run_all(ptrs: &[&str], max_event: usize, input: &[u8]) -> Vec<u8> {
        let mut f = sse(ptrs, max_event);
        let mut out = Vec::new();
        f.feed(input, &mut out);
        f.finish(&mut out);
        out
    }

    fn run_bytes(ptrs: &[&str], max_event: usize, input: &[u8]) -> Vec<u8> {
        let mut f = sse(ptrs, max_event);
        let mut out = Vec::new();
        for b in input {
            f.feed(std::slice::from_ref(b), &mut out);
        }
        f.finish(&mut out);
        out
    }

    /// Run whole, byte by byte and in chunks of several sizes; all must agree.
    fn run(ptrs: &[&str], max_event: usize, input: &str) -> String {
        let whole = run_all(ptrs, max_event, input.as_bytes());
        assert_eq!(
            String::from_utf8_lossy(&run_bytes(ptrs, max_event, input.as_bytes())),
            String::from_utf8_lossy(&whole),
            "byte by byte"
        );
        for size in [2, 3, 5, 7, 13] {
            let mut f = sse(ptrs, max_event);
            let mut out = Vec::new();
            for c in input.as_bytes().chunks(size) {
                f.feed(c, &mut out);
            }
            f.finish(&mut out);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&whole),
                "chunks of {size}"
            );
        }
        String::from_utf8(whole).unwrap()
    }

    const P: &[&str] = &["/usage/internal", "/choices/0/logprobs", "/debug"];

    #[test]
    fn sse_rewrites_json_data() {
        let input = "data: {\"id\":1,\"debug\":\"x\"}\n\ndata: {\"id\":2}\n\n";
        assert_eq!(
            run(P, MAX, input),
            "data: {\"id\":1}\n\ndata: {\"id\":2}\n\n"
        );
    }

    #[test]
    fn sse_byte_at_a_time_equals_all_at_once() {
        let input = concat!(
            ": keep-alive\n\n",
            "event: message\nid: 7\ndata: {\"choices\":[{\"logprobs\":[1],\"t\":\"a\"}],\"usage\":{\"internal\":1}}\n\n",
            "data:{\"debug\":1}\r\n\r\n",
            "data: {\"debug\":2}\r\r",
            "data: {\"debug\":3}\r\n\r",
            "\ndata: {\"debug\":4}\n\r",
            "\n\n\n",
            "data: {\"a\":\n",
            "data: 1, \"debug\": 5}\n\n",
            "retry: 1000\n\n",
            "data: [DONE]\n\n",
            "data: {\"debug\":",
        );
        let want = concat!(
            ": keep-alive\n\n",
            "event: message\nid: 7\ndata: {\"choices\":[{\"t\":\"a\"}],\"usage\":{}}\n\n",
            "data: {}\r\n\r\n",
            "data: {}\r\r",
            "data: {}\r\n\r",
            "\ndata: {}\n\r",
            "\n\n\n",
            "data: {\"a\":1}\n\n",
            "retry: 1000\n\n",
            "data: [DONE]\n\n",
            "data: {\"debug\":",
        );
        assert_eq!(run(P, MAX, input), want);
        assert_eq!(
            run_bytes(P, MAX, input.as_bytes()),
            run_all(P, MAX, input.as_bytes())
        );
    }

    #[test]
    fn sse_crlf_events() {
        let input = "event: delta\r\ndata: {\"debug\":1,\"x\":2}\r\nid: 3\r\n\r\n: ping\r\n\r\n";
        assert_eq!(
            run(P, MAX, input),
            "event: delta\r\ndata: {\"x\":2}\r\nid: 3\r\n\r\n: ping\r\n\r\n"
        );
        // CR-only line endings.
        let input = "event: delta\rdata: {\"debug\":1,\"x\":2}\r\r";
        assert_eq!(run(P, MAX, input), "event: delta\rdata: {\"x\":2}\r\r");
    }

    #[test]
    fn sse_done_untouched() {
        for input in [
            "data: [DONE]\n\n",
            "data:[DONE]\r\n\r\n",
            "data: [DONE]\n\ndata: [DONE]\n\n",
        ] {
            assert_eq!(run(P, MAX, input), input);
        }
        // A JSON array payload is filtered, but [DONE] is not JSON.
        assert_eq!(
            run(&["/0"], MAX, "data: [1,2]\n\ndata: [DONE]\n\n"),
            "data: [2]\n\ndata: [DONE]\n\n"
        );
    }

    #[test]
    fn sse_comments_and_fields_preserved() {
        let input = ": comment one\nevent: chunk\n:another\nid: abc\nretry: 10\ndata: {\"debug\":1,\"k\":\"v\"}\nfoo: bar\n\n";
        assert_eq!(
            run(P, MAX, input),
            ": comment one\nevent: chunk\n:another\nid: abc\nretry: 10\ndata: {\"k\":\"v\"}\nfoo: bar\n\n"
        );
        // Unchanged events are byte-identical, odd spacing included.
        let input = ":x\nevent:e\nid:1\ndata:  {\"k\" :  1}\n\n";
        assert_eq!(run(P, MAX, input), input);
        // Lines that only look like data fields are not data.
        let input = "data2: {\"debug\":1}\ndatum: {\"debug\":1}\n data: {\"debug\":1}\n\n";
        assert_eq!(run(P, MAX, input), input);
    }

    #[test]
    fn sse_multi_line_data() {
        let input = "id: 1\ndata: {\ndata: \"debug\": true,\ndata:  \"keep\": [1,\ndata\ndata: 2]}\nevent: x\n\n";
        // Joined: "{\n\"debug\": true,\n \"keep\": [1,\n\n2]}" — valid JSON.
        assert_eq!(
            run(P, MAX, input),
            "id: 1\ndata: {\"keep\":[1,2]}\nevent: x\n\n"
        );
        // Multi-line data that is not JSON stays as it was.
        let input = "data: hello\ndata: world\n\n";
        assert_eq!(run(P, MAX, input), input);
        // Multi-line JSON with nothing to remove stays as it was.
        let input = "data: {\"a\":\ndata: 1}\n\n";
        assert_eq!(run(P, MAX, input), input);
    }

    #[test]
    fn sse_oversized_event_passed_through() {
        let big = format!("data: {{\"debug\":1,\"pad\":\"{}\"}}\n\n", "x".repeat(200));
        let small = "data: {\"debug\":2}\n\n";
        let input = format!("{small}{big}{small}");
        let out = run(P, 100, &input);
        assert_eq!(out, format!("data: {{}}\n\n{big}data: {{}}\n\n"));

        // Exactly at the bound is still rewritten; one byte more is not.
        let ev = "data: {\"debug\":1}\n\n";
        assert_eq!(run(P, ev.len(), ev), "data: {}\n\n");
        assert_eq!(run(P, ev.len() - 1, ev), ev);
        // The LF of a CRLF blank line is not counted (it is forwarded as
        // soon as it arrives, the event having ended at its CR).
        let ev = "data: {\"debug\":1}\r\n\r\n";
        assert_eq!(run(P, ev.len() - 1, ev), "data: {}\r\n\r\n");
        assert_eq!(run(P, ev.len() - 2, ev), ev);

        // Never holds more than the bound while passing through.
        let mut f = sse(P, 100);
        let mut out = Vec::new();
        f.feed(b"data: {\"debug\":1,\"pad\":\"", &mut out);
        for _ in 0..100 {
            f.feed(b"xxxxxxxxxx", &mut out);
            assert!(f.buf.len() <= 100);
        }
        f.feed(b"\"}\n\ndata: {\"debug\":2}\n\n", &mut out);
        let tail = b"\"}\n\ndata: {}\n\n";
        assert!(out.ends_with(tail));
        assert_eq!(out.len(), 24 + 1000 + tail.len());
        f.finish(&mut out);
        assert_eq!(out.len(), 24 + 1000 + tail.len());
    }

    #[test]
    fn tap_counts_content_and_strips_only_the_usage_event_in_any_split() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"a \\\"choices\\\":[] \\\"usage\\\":{\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n"
        );
        for strip in [false, true] {
            for split in 0..stream.len() {
                let mut f = SseFilter::new(Arc::new(FieldFilter::default()), 1 << 16);
                f.tap.strip_usage = strip;
                let mut out = Vec::new();
                f.feed(&stream.as_bytes()[..split], &mut out);
                f.feed(&stream.as_bytes()[split..], &mut out);
                f.finish(&mut out);
                let out = String::from_utf8(out).unwrap();
                assert_eq!(f.tap.content_events, 2, "split {split}");
                assert_eq!(
                    out.contains("prompt_tokens"),
                    !strip,
                    "split {split}: {out}"
                );
                assert!(out.ends_with("data: [DONE]\n\n"));
                // A content string that spells the markers is not an event to strip.
                assert!(out.contains("\"content\":\"a "));
            }
        }
    }

    #[test]
    fn sse_finish_flushes_partial_event() {
        let mut f = sse(P, MAX);
        let mut out = Vec::new();
        f.feed(b"data: {\"debug\":1}\n\nid: 9\ndata: {\"debug\":", &mut out);
        assert_eq!(out, b"data: {}\n\n");
        f.feed(b"2}\n", &mut out);
        assert_eq!(out, b"data: {}\n\n");
        f.finish(&mut out);
        assert_eq!(out, b"data: {}\n\nid: 9\ndata: {\"debug\":2}\n");
        // Nothing left after finish.
        let mut more = Vec::new();
        f.finish(&mut more);
        assert!(more.is_empty());
        // A stream ending in a CR blank line: nothing buffered.
        assert_eq!(run(P, MAX, "data: {\"debug\":1}\r\r"), "data: {}\r\r");
    }

    #[test]
    fn sse_bom_and_odd_streams() {
        let input = "\u{FEFF}data: {\"debug\":1}\n\ndata: {\"debug\":1}\n\n";
        assert_eq!(run(P, MAX, input), "\u{FEFF}data: {}\n\ndata: {}\n\n");
        // A BOM later in the stream is part of the field name: not data.
        let input = "data: 1\n\n\u{FEFF}data: {\"debug\":1}\n\n";
        assert_eq!(run(P, MAX, input), input);
        assert_eq!(run(P, MAX, ""), "");
        assert_eq!(run(P, MAX, "\n\n\r\n\r\r"), "\n\n\r\n\r\r");
        // Empty filter: everything passes through.
        let input = "data: {\"debug\":1}\n\n";
        assert_eq!(run(&[], MAX, input), input);
        // Non-UTF-8 bytes in a data line: not JSON, passed through.
        let mut f = sse(P, MAX);
        let mut out = Vec::new();
        f.feed(b"data: {\"debug\":\"\xFF\"}\n\n", &mut out);
        assert_eq!(out, b"data: {\"debug\":\"\xFF\"}\n\n");
    }
}
