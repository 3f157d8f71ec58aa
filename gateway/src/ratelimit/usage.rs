//! Finds the token usage a backend reports (`usage.prompt_tokens` and
//! `usage.completion_tokens`, in a JSON body or in the final SSE event) in
//! the response bytes as they stream by, so a request's up-front cost can
//! be corrected. Nothing is buffered beyond a short tail for matches split
//! across reads.

const TAIL: usize = 64;

/// Tenant × model pairs the book keeps apart; beyond, they count together
/// under `other` (a JWT's tenant claim can take any value).
const MAX_PAIRS: usize = 10_000;

/// Tokens and requests served, per tenant and model, since the start
/// (`GET /usage` on the admin API). Process-wide.
#[derive(Debug, Default)]
pub struct Book {
    totals: std::sync::Mutex<std::collections::HashMap<(String, String), Totals>>,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Totals {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Of `completion_tokens`, counted from a stream's events because the
    /// backend reported no usage.
    pub completion_tokens_counted: u64,
}

impl Book {
    pub fn add(&self, tenant: &str, model: &str, prompt: u64, completion: u64, counted: bool) {
        let mut m = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tenant.to_string(), model.to_string());
        let key = if m.len() >= MAX_PAIRS && !m.contains_key(&key) {
            ("other".to_string(), "other".to_string())
        } else {
            key
        };
        let t = m.entry(key).or_default();
        t.requests += 1;
        t.prompt_tokens += prompt;
        t.completion_tokens += completion;
        if counted {
            t.completion_tokens_counted += completion;
        }
    }

    /// Every pair, sorted by tenant then model.
    pub fn totals(&self) -> Vec<(String, String, Totals)> {
        let m = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = m
            .iter()
            .map(|((t, mo), x)| (t.clone(), mo.clone(), *x))
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }
}

#[derive(Debug, Default)]
pub struct UsageScan {
    tail: Vec<u8>,
    prompt: Option<u64>,
    completion: Option<u64>,
}

impl UsageScan {
    pub fn feed(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if !self.tail.is_empty() {
            let mut w = self.tail.clone();
            w.extend_from_slice(&data[..data.len().min(TAIL)]);
            self.scan(&w);
        }
        self.scan(data);
        // The last TAIL bytes of everything so far (small pieces add up).
        if data.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - TAIL..]);
        } else {
            self.tail.extend_from_slice(data);
            let extra = self.tail.len().saturating_sub(TAIL);
            self.tail.drain(..extra);
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        for end in memchr::memmem::find_iter(buf, b"_tokens\"") {
            let before = &buf[..end];
            let slot = if before.ends_with(b"\"prompt") {
                &mut self.prompt
            } else if before.ends_with(b"\"completion") {
                &mut self.completion
            } else {
                continue;
            };
            let mut i = end + 8;
            while i < buf.len() && matches!(buf[i], b' ' | b'\t' | b'\r' | b'\n') {
                i += 1;
            }
            if buf.get(i) != Some(&b':') {
                continue;
            }
            i += 1;
            while i < buf.len() && matches!(buf[i], b' ' | b'\t' | b'\r' | b'\n') {
                i += 1;
            }
            let start = i;
            while i < buf.len() && buf[i].is_ascii_digit() {
                i += 1;
            }
            // Digits up to the end may go on in the next read: the tail window decides.
            if i == start || i == buf.len() || i - start > 15 {
                continue;
            }
            if let Ok(n) = std::str::from_utf8(&buf[start..i]).unwrap_or("").parse() {
                *slot = Some(n);
            }
        }
    }

    /// Prompt + completion tokens, when the backend reported either
    /// (embeddings report only the prompt).
    /// Prompt and completion tokens, as the backend reported them.
    pub fn counts(&self) -> (Option<u64>, Option<u64>) {
        (self.prompt, self.completion)
    }

    pub fn total(&self) -> Option<u64> {
        match (self.prompt, self.completion) {
            (None, None) => None,
            (p, c) => Some(p.unwrap_or(0).saturating_add(c.unwrap_or(0))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_body_in_pieces() {
        let body = br#"{"id":"x","choices":[{"text":"say \"prompt_tokens\": 9"}],"usage":{"prompt_tokens": 12,"completion_tokens":345,"total_tokens":357}}"#;
        for split in 1..body.len() {
            let mut u = UsageScan::default();
            u.feed(&body[..split]);
            u.feed(&body[split..]);
            assert_eq!(u.total(), Some(357), "split at {split}");
        }
    }

    #[test]
    fn byte_by_byte() {
        let body = br#"data: {"usage":{"prompt_tokens":12,"completion_tokens":345}}"#;
        let mut u = UsageScan::default();
        for b in body.iter() {
            u.feed(std::slice::from_ref(b));
        }
        u.feed(b"\n\n");
        assert_eq!(u.total(), Some(357));
    }

    #[test]
    fn sse_final_event() {
        let mut u = UsageScan::default();
        u.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n");
        assert_eq!(u.total(), None);
        u.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n");
        assert_eq!(u.total(), Some(12));
    }
}
