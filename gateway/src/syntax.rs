//! Pure syntax the configuration checks and the stages share: media types
//! (RFC 9110, `routes.content_types`, the validation stage's `Content-Type`),
//! JSON pointers (RFC 6901, `routes.response_drop_fields`, the response
//! field filter) and client addresses in canonical form (`[xdp]` lists, the
//! front door, rate-limit keys). Data in, data out; a leaf module: it
//! imports nothing from the crate, so config and stages can both use it.

use std::net::IpAddr;

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a dual-stack socket reports for
/// an IPv4 client) as the IPv4 address it is, so one block covers both.
pub fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        v4 => v4,
    }
}

/// Lower-cased media type without parameters:
/// `"Application/JSON; charset=utf-8"` → `"application/json"`.
///
/// Leading and trailing whitespace (spaces, tabs) around the media type is
/// ignored. Both `type` and `subtype` must be non-empty RFC 9110 tokens;
/// anything else (no `/`, an empty part, a second `/`, a non-token byte such
/// as a space inside the type) → `None`. Parameters after `;` are not
/// validated: they are dropped.
pub fn media_type(content_type: &[u8]) -> Option<String> {
    let end = content_type
        .iter()
        .position(|&b| b == b';')
        .unwrap_or(content_type.len());
    let mt = trim_ows(&content_type[..end]);
    let slash = mt.iter().position(|&b| b == b'/')?;
    let (ty, sub) = (&mt[..slash], &mt[slash + 1..]);
    if ty.is_empty()
        || sub.is_empty()
        || !ty.iter().all(|&b| is_tchar(b))
        || !sub.iter().all(|&b| is_tchar(b))
    {
        return None;
    }
    // All bytes are ASCII token characters, so this is valid UTF-8.
    Some(
        mt.iter()
            .map(|b| char::from(b.to_ascii_lowercase()))
            .collect(),
    )
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// RFC 6901 §3/§4: split a pointer into unescaped reference tokens.
pub fn parse_pointer(p: &str) -> Result<Vec<String>, String> {
    let Some(rest) = p.strip_prefix('/') else {
        return Err(format!("JSON pointer {p:?} must start with '/'"));
    };
    rest.split('/')
        .map(|tok| {
            let mut out = String::with_capacity(tok.len());
            let mut chars = tok.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => out.push('~'),
                        Some('1') => out.push('/'),
                        _ => {
                            return Err(format!(
                                "JSON pointer {p:?}: '~' must be followed by '0' or '1'"
                            ))
                        }
                    }
                } else {
                    out.push(c);
                }
            }
            Ok(out)
        })
        .collect()
}

/// 64 hex digits (a SHA-256), surrounding whitespace allowed.
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Replace `path` with `data` atomically and durably: a temporary file of
/// this process (so two gateways overlapping in a restart don't share one)
/// is written and synced, renamed over `path`, and the directory synced, so
/// a crash or power loss leaves the old contents or the new, never a torn
/// or empty file.
pub fn write_durably(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}
