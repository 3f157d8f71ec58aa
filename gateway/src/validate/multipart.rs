//! Just enough of `multipart/form-data` (RFC 7578) to read one small text
//! field — the `model` of an audio upload — from the first bytes of a body
//! that is then streamed on untouched. The parts before the field are read
//! (bounded by the connection's buffer); a file part before it ends the
//! search: the field must come first (the OpenAI SDKs and `curl -F` in
//! argument order send it first), so the upload itself is never buffered.

/// The `boundary` parameter of a `multipart/form-data` Content-Type
/// (RFC 2046 §5.1.1: 1 to 70 characters, optionally quoted).
pub fn boundary(content_type: &[u8]) -> Option<&[u8]> {
    let mut params = content_type.split(|&b| b == b';').skip(1);
    params.find_map(|p| {
        let p = p.trim_ascii();
        let eq = p.iter().position(|&b| b == b'=')?;
        if !p[..eq].trim_ascii().eq_ignore_ascii_case(b"boundary") {
            return None;
        }
        let v = p[eq + 1..].trim_ascii();
        let v = match v {
            [b'"', inner @ .., b'"'] => inner,
            v => v,
        };
        (1..=70).contains(&v.len()).then_some(v)
    })
}

/// What the first bytes of a body say about a form field.
#[derive(Debug, PartialEq, Eq)]
pub enum Field<'b> {
    /// The field's value (the bytes of its part's body).
    Found(&'b [u8]),
    /// Not decided yet: more of the body is needed.
    NeedMore,
    /// A file part (or the end of the form) came before the field.
    Missing,
    /// Not `multipart/form-data` framed with this boundary.
    Malformed,
}

/// Look for the form field `name` in `body`, the first bytes of a
/// multipart body (`complete`: all of it).
pub fn find<'b>(body: &'b [u8], boundary: &[u8], name: &str, complete: bool) -> Field<'b> {
    let need_more = if complete {
        Field::Malformed
    } else {
        Field::NeedMore
    };
    let mut delim = Vec::with_capacity(boundary.len() + 4);
    delim.extend_from_slice(b"--");
    delim.extend_from_slice(boundary);
    // A preamble may come before the first delimiter (RFC 2046 §5.1.1).
    let Some(first) = memchr::memmem::find(body, &delim) else {
        return need_more;
    };
    if first != 0 && (first < 2 || &body[first - 2..first] != b"\r\n") {
        return Field::Malformed;
    }
    let mut at = first + delim.len();
    delim.splice(0..0, *b"\r\n");
    loop {
        // After a delimiter: `--` ends the form, CRLF starts a part.
        let Some(after) = body.get(at..at + 2) else {
            return need_more;
        };
        if after == b"--" {
            return Field::Missing;
        }
        if after != b"\r\n" {
            return Field::Malformed;
        }
        let part = &body[at + 2..];
        let Some(head_end) = memchr::memmem::find(part, b"\r\n\r\n") else {
            return need_more;
        };
        let disposition = part_disposition(&part[..head_end]);
        let content = &part[head_end + 4..];
        let Some(end) = memchr::memmem::find(content, &delim) else {
            return match disposition {
                Some((n, false)) if n == name.as_bytes() => need_more,
                Some((_, true)) => Field::Missing,
                None => Field::Malformed,
                Some(_) => need_more,
            };
        };
        match disposition {
            None => return Field::Malformed,
            Some((n, false)) if n == name.as_bytes() => return Field::Found(&content[..end]),
            Some((_, true)) => return Field::Missing,
            Some(_) => {}
        }
        at = (content.as_ptr() as usize - body.as_ptr() as usize) + end + delim.len();
    }
}

/// A part's `Content-Disposition: form-data; name="…"` name, and whether it
/// is a file (has a `filename`); `None`: no form-data disposition.
fn part_disposition(head: &[u8]) -> Option<(&[u8], bool)> {
    let line = head.split(|&b| b == b'\n').find_map(|l| {
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        let colon = l.iter().position(|&b| b == b':')?;
        l[..colon]
            .eq_ignore_ascii_case(b"content-disposition")
            .then(|| &l[colon + 1..])
    })?;
    let mut params = line.split(|&b| b == b';');
    if !params
        .next()?
        .trim_ascii()
        .eq_ignore_ascii_case(b"form-data")
    {
        return None;
    }
    let (mut name, mut file) = (None, false);
    for p in params {
        let p = p.trim_ascii();
        let Some(eq) = p.iter().position(|&b| b == b'=') else {
            continue;
        };
        let key = p[..eq].trim_ascii();
        let v = p[eq + 1..].trim_ascii();
        let v = match v {
            [b'"', inner @ .., b'"'] => inner,
            v => v,
        };
        if key.eq_ignore_ascii_case(b"name") {
            name = Some(v);
        } else if key.eq_ignore_ascii_case(b"filename") || key.eq_ignore_ascii_case(b"filename*") {
            file = true;
        }
    }
    Some((name?, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(parts: &[(&str, Option<&str>, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, file, value) in parts {
            b.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"");
            b.extend_from_slice(name.as_bytes());
            b.push(b'"');
            if let Some(f) = file {
                b.extend_from_slice(
                    format!("; filename=\"{f}\"\r\nContent-Type: audio/wav").as_bytes(),
                );
            }
            b.extend_from_slice(b"\r\n\r\n");
            b.extend_from_slice(value.as_bytes());
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        b
    }

    #[test]
    fn boundary_parameter() {
        assert_eq!(
            boundary(b"multipart/form-data; boundary=abc"),
            Some(&b"abc"[..])
        );
        assert_eq!(
            boundary(b"multipart/form-data;charset=x; Boundary=\"a b\""),
            Some(&b"a b"[..])
        );
        assert_eq!(boundary(b"multipart/form-data"), None);
        assert_eq!(boundary(b"multipart/form-data; boundary="), None);
        assert_eq!(
            boundary(format!("multipart/form-data; boundary={}", "x".repeat(71)).as_bytes()),
            None
        );
    }

    #[test]
    fn the_field_before_the_file() {
        let b = form(&[
            ("temperature", None, "0"),
            ("model", None, "whisper"),
            ("file", Some("a.wav"), "RIFF...."),
        ]);
        assert_eq!(find(&b, b"XyZ", "model", true), Field::Found(b"whisper"));
        // Every prefix either needs more or finds it; never a wrong answer.
        for n in 0..b.len() {
            match find(&b[..n], b"XyZ", "model", false) {
                Field::NeedMore | Field::Found(b"whisper") => {}
                other => panic!("prefix {n}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_file_first_or_no_field_is_missing() {
        let file_first = form(&[("file", Some("a.wav"), "RIFF"), ("model", None, "whisper")]);
        assert_eq!(find(&file_first, b"XyZ", "model", false), Field::Missing);
        let none = form(&[("language", None, "en")]);
        assert_eq!(find(&none, b"XyZ", "model", true), Field::Missing);
        // A field named like a prefix of another is not it.
        let other = form(&[("model_x", None, "a"), ("model", None, "b")]);
        assert_eq!(find(&other, b"XyZ", "model", true), Field::Found(b"b"));
    }

    #[test]
    fn malformed_framing() {
        assert_eq!(
            find(b"not a form at all", b"XyZ", "model", true),
            Field::Malformed
        );
        assert_eq!(
            find(b"--XyZ garbage", b"XyZ", "model", true),
            Field::Malformed
        );
        let no_disp = b"--XyZ\r\nContent-Type: text/plain\r\n\r\nx\r\n--XyZ--\r\n";
        assert_eq!(find(no_disp, b"XyZ", "model", true), Field::Malformed);
        // A preamble is allowed before the first delimiter.
        let mut pre = b"preamble\r\n".to_vec();
        pre.extend(form(&[("model", None, "m")]));
        assert_eq!(find(&pre, b"XyZ", "model", true), Field::Found(b"m"));
    }
}
