//! The pass over a JSON body's raw bytes before simd-json sees it.
//!
//! It copies the body into the worker's scratch buffer (simd-json parses in
//! place, the original bytes are what gets forwarded), bounds the nesting
//! depth and the number of values so that no huge or deep document is ever
//! built, and, for KServe inference requests, checks the tensor `data`
//! arrays itself: an array at `/inputs/N/data` made only of numbers (flat,
//! or nested with one length per level) is checked for JSON number syntax
//! and summarised (count, nesting, integer range, float magnitude) and
//! written to the copy as `[]`. Tensor data is 99 % of such a body and
//! nothing after this stage needs its values, so simd-json then parses a
//! few hundred bytes of envelope instead of megabytes of numbers. Anything
//! unusual in an array (a string, a `-0`, an integer of 19+ digits, ragged
//! nesting) leaves that array to the parser; the summary is used only when
//! it proves the data valid for the input's shape and datatype (see
//! `kserve::DataSummary`), and any doubt means a full re-check.

use super::kserve::DataSummary;

/// Why the pre-scan refused a body.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanError {
    TooDeep,
    TooManyElements,
}

/// Nesting depth of a JSON text, scanned without building anything, so a
/// deeply nested body is refused before anything is built from it.
/// Returns false as soon as `max` is exceeded.
pub fn depth_within(bytes: &[u8], max: usize) -> bool {
    scan(bytes, max, usize::MAX).is_ok()
}

/// Depth and a lower bound on the number of values (every comma outside
/// strings starts one), without copying or eliding anything.
pub fn scan(bytes: &[u8], max_depth: usize, max_elements: usize) -> Result<(), ScanError> {
    Prescan {
        bytes,
        max_depth,
        max_elements,
        kserve: false,
        copy: false,
    }
    .run(&mut Vec::new(), None)
}

/// Copy `bytes` into `out` (cleared first) under the depth and value-count
/// limits; with `elided`, also check and leave out KServe tensor data
/// arrays, recording what was left out there. The values the elided arrays
/// held (beyond the `[]` left in their place) are in `DataSummary::values`.
pub fn copy_checked(
    bytes: &[u8],
    max_depth: usize,
    max_elements: usize,
    out: &mut Vec<u8>,
    elided: Option<&mut Vec<DataSummary>>,
) -> Result<(), ScanError> {
    out.clear();
    out.reserve(bytes.len());
    Prescan {
        bytes,
        max_depth,
        max_elements,
        kserve: elided.is_some(),
        copy: true,
    }
    .run(out, elided)
}

/// Where in a KServe request body the scanner is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Nowhere of interest.
    Other,
    /// Directly inside the root object.
    Root,
    /// Directly inside `/inputs` (an array of input objects).
    Inputs,
    /// Directly inside `/inputs/N` (an input object).
    Input,
}

struct Prescan<'b> {
    bytes: &'b [u8],
    max_depth: usize,
    max_elements: usize,
    /// Track the KServe places and elide tensor data.
    kserve: bool,
    /// Copy the bytes to `out`.
    copy: bool,
}

impl Prescan<'_> {
    fn run(
        &self,
        out: &mut Vec<u8>,
        mut elided: Option<&mut Vec<DataSummary>>,
    ) -> Result<(), ScanError> {
        let bytes = self.bytes;
        let copy = self.copy;
        let mut commas = 0usize;
        let mut depth = 0usize;
        // What each open container is, for the KServe path (depth ≤ 3 only).
        let mut places = [Place::Other; 4];
        let mut input = 0usize; // index of the current element of /inputs
        let mut key_is = (false, false); // last key was "inputs" (root) / "data" (input)
        let mut copied = 0usize; // bytes[..copied] are in `out` (or elided)
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'"' => {
                    let start = i + 1;
                    i += 1;
                    loop {
                        match memchr::memchr2(b'"', b'\\', &bytes[i.min(bytes.len())..]) {
                            // Unterminated: the parser will refuse it.
                            None => {
                                if copy {
                                    out.extend_from_slice(&bytes[copied..]);
                                }
                                return Ok(());
                            }
                            Some(p) if bytes[i + p] == b'\\' => i += p + 2,
                            Some(p) => {
                                i += p;
                                break;
                            }
                        }
                    }
                    if self.kserve && (depth == 1 || depth == 3) {
                        let place = places[depth];
                        if place == Place::Root || place == Place::Input {
                            let s = &bytes[start..i];
                            let colon = bytes[i + 1..]
                                .iter()
                                .find(|b| !b.is_ascii_whitespace())
                                .is_some_and(|&b| b == b':');
                            if colon {
                                if place == Place::Root {
                                    key_is.0 = s == b"inputs";
                                } else {
                                    key_is.1 = s == b"data";
                                }
                            }
                        }
                    }
                }
                c @ (b'[' | b'{') => {
                    if self.kserve
                        && depth == 3
                        && c == b'['
                        && key_is.1
                        && places[3] == Place::Input
                    {
                        if let Some(list) = elided.as_deref_mut() {
                            let room = self.max_depth.saturating_sub(depth);
                            if let Some((end, mut summary, n)) = numbers(bytes, i, room) {
                                commas += n;
                                if commas >= self.max_elements {
                                    return Err(ScanError::TooManyElements);
                                }
                                out.extend_from_slice(&bytes[copied..i]);
                                out.extend_from_slice(b"[]");
                                copied = end;
                                summary.input = input;
                                list.push(summary);
                                key_is.1 = false;
                                i = end;
                                continue;
                            }
                        }
                    }
                    depth += 1;
                    if depth > self.max_depth {
                        return Err(ScanError::TooDeep);
                    }
                    if self.kserve && depth <= 3 {
                        places[depth] = match (depth, c, places[depth - 1]) {
                            (1, b'{', _) => Place::Root,
                            (2, b'[', Place::Root) if key_is.0 => {
                                input = 0;
                                Place::Inputs
                            }
                            (3, b'{', Place::Inputs) => Place::Input,
                            _ => Place::Other,
                        };
                        if depth == 2 {
                            key_is.0 = false;
                        }
                        if depth == 3 {
                            key_is.1 = false;
                        }
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                b',' => {
                    commas += 1;
                    if commas >= self.max_elements {
                        return Err(ScanError::TooManyElements);
                    }
                    if self.kserve && depth == 2 && places[2] == Place::Inputs {
                        input += 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        if copy {
            out.extend_from_slice(&bytes[copied..]);
        }
        Ok(())
    }
}

/// What one nesting level of a numeric array holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holds {
    Unknown,
    Numbers,
    Arrays,
}

/// Check the array starting at `bytes[start] == b'['` as numbers only (flat
/// or uniformly nested, at most `room` levels). Returns the index just past
/// it, its summary and the commas in it; `None` when it is anything else
/// (the parser then sees it).
fn numbers(bytes: &[u8], start: usize, room: usize) -> Option<(usize, DataSummary, usize)> {
    if room == 0 {
        return None;
    }
    let mut s = DataSummary {
        input: 0,
        lens: Vec::new(),
        leaves: 0,
        values: 0,
        min_int: i64::MAX,
        max_int: i64::MIN,
        has_float: false,
        max_float: 0.0,
    };
    // Per level: what it holds, its length (equal for every array at that
    // level), and the count in the array now open there.
    let mut holds: Vec<Holds> = Vec::with_capacity(4);
    let mut open: Vec<u64> = Vec::with_capacity(4);
    let mut commas = 0usize;
    let mut i = start + 1;
    holds.push(Holds::Unknown);
    s.lens.push(u64::MAX);
    open.push(0);
    // After `[` or `,`: a value must come (or `]` right after `[`).
    let mut want_value = true;
    let mut just_opened = true;
    loop {
        let c = *bytes.get(i)?;
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b']' if just_opened || !want_value => {
                let level = open.len() - 1;
                let n = open.pop()?;
                if s.lens[level] == u64::MAX {
                    s.lens[level] = n;
                } else if s.lens[level] != n {
                    return None; // ragged
                }
                i += 1;
                if open.is_empty() {
                    return Some((i, s, commas));
                }
                want_value = false;
                just_opened = false;
            }
            b',' if !want_value => {
                commas += 1;
                want_value = true;
                just_opened = false;
                i += 1;
            }
            b'[' if want_value => {
                let level = open.len() - 1;
                match holds[level] {
                    Holds::Numbers => return None,
                    _ => holds[level] = Holds::Arrays,
                }
                if open.len() + 1 > room {
                    return None;
                }
                *open.last_mut()? += 1;
                s.values += 1;
                open.push(0);
                if holds.len() < open.len() {
                    holds.push(Holds::Unknown);
                    s.lens.push(u64::MAX);
                }
                want_value = true;
                just_opened = true;
                i += 1;
            }
            b'-' | b'0'..=b'9' if want_value => {
                let level = open.len() - 1;
                match holds[level] {
                    Holds::Arrays => return None,
                    _ => holds[level] = Holds::Numbers,
                }
                i = number(bytes, i, &mut s)?;
                *open.last_mut()? += 1;
                s.leaves += 1;
                s.values += 1;
                want_value = false;
                just_opened = false;
            }
            // Anything else (strings, literals, objects, bad syntax): the
            // parser's business. Every level holds only numbers or only
            // arrays, so all numbers sit at the innermost level.
            _ => return None,
        }
    }
}

/// Exponent digits the fast path reads (|e| ≤ 99: with ≤ 19 mantissa
/// digits every value is a normal f64, rounded the same by any correct
/// parser).
const MAX_EXP_DIGITS: usize = 2;

/// One JSON number at `bytes[i]`, folded into `s`. Returns the index past it,
/// or `None` for invalid syntax or a number this fast path leaves to the
/// parser.
#[inline(always)]
fn number(bytes: &[u8], start: usize, s: &mut DataSummary) -> Option<usize> {
    let mut i = start;
    let negative = bytes[i] == b'-';
    if negative {
        i += 1;
    }
    let int_start = i;
    let mut int: u64 = 0;
    match bytes.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while let Some(&d @ b'0'..=b'9') = bytes.get(i) {
                int = int.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
                i += 1;
            }
        }
        _ => return None,
    }
    let int_digits = i - int_start;
    if int_digits > 18 {
        return None;
    }
    let mut float = false;
    let mut frac_digits = 0;
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        let frac_start = i;
        while let Some(b'0'..=b'9') = bytes.get(i) {
            i += 1;
        }
        if i == frac_start {
            return None;
        }
        frac_digits = i - frac_start;
        float = true;
    }
    let mut exponent = false;
    if let Some(b'e' | b'E') = bytes.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = bytes.get(i) {
            i += 1;
        }
        let exp_start = i;
        while let Some(b'0'..=b'9') = bytes.get(i) {
            i += 1;
        }
        // Only what both parsers read identically: at most 19 digits (the
        // parser's exact path) and a 1–2 digit exponent (no overflow, no
        // underflow, no wrapping of a huge exponent). Anything else is the
        // parser's to read.
        if i == exp_start || i - exp_start > MAX_EXP_DIGITS || int_digits + frac_digits > 19 {
            return None;
        }
        exponent = true;
    }
    // What may follow a number inside an array.
    match bytes.get(i) {
        Some(b',' | b']' | b' ' | b'\t' | b'\n' | b'\r') => {}
        _ => return None,
    }
    if exponent {
        // Exact magnitude, as the parser would compute it.
        let text = std::str::from_utf8(&bytes[start..i]).ok()?;
        let x: f64 = text.parse().ok()?;
        s.has_float = true;
        s.max_float = s.max_float.max(x.abs());
    } else if float {
        // |x| < int + 1 (int has at most 18 digits; above 2^53 the f64 may
        // round below |x|, but every bound checked against is 65504 or
        // beyond 3e38).
        s.has_float = true;
        s.max_float = s.max_float.max(int as f64 + 1.0);
    } else {
        if negative && int == 0 {
            return None; // `-0`: leave its reading to the parser
        }
        let v = if negative { -(int as i64) } else { int as i64 };
        s.min_int = s.min_int.min(v);
        s.max_int = s.max_int.max(v);
    }
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elide(body: &str) -> (String, Vec<DataSummary>) {
        let mut out = Vec::new();
        let mut list = Vec::new();
        copy_checked(body.as_bytes(), 64, 1 << 20, &mut out, Some(&mut list)).unwrap();
        (String::from_utf8(out).unwrap(), list)
    }

    #[test]
    fn elides_tensor_data_and_keeps_the_envelope() {
        let body = r#"{"id":"r1","inputs":[{"name":"a","shape":[2,2],"datatype":"FP32","data":[[1.5, -2],[3e2,4]]},{"name":"b","data" : [ 7 , -8 , 9 ],"shape":[3]}],"outputs":[{"name":"o"}]}"#;
        let (env, list) = elide(body);
        assert_eq!(
            env,
            r#"{"id":"r1","inputs":[{"name":"a","shape":[2,2],"datatype":"FP32","data":[]},{"name":"b","data" : [],"shape":[3]}],"outputs":[{"name":"o"}]}"#
        );
        assert_eq!(list.len(), 2);
        let a = &list[0];
        assert_eq!(
            (a.input, a.lens.as_slice(), a.leaves, a.values),
            (0, &[2, 2][..], 4, 6)
        );
        assert_eq!((a.min_int, a.max_int, a.has_float), (-2, 4, true));
        assert!(
            a.max_float >= 300.0 && a.max_float < 301.0,
            "{}",
            a.max_float
        );
        let b = &list[1];
        assert_eq!((b.input, b.lens.as_slice(), b.leaves), (1, &[3][..], 3));
        assert_eq!((b.min_int, b.max_int, b.has_float), (-8, 9, false));
        // Without elision the copy is the body itself.
        let mut out = Vec::new();
        copy_checked(body.as_bytes(), 64, 1 << 20, &mut out, None).unwrap();
        assert_eq!(out, body.as_bytes());
    }

    #[test]
    fn leaves_anything_unusual_to_the_parser() {
        let same = [
            // Not numbers, or numbers this path does not read.
            r#"{"inputs":[{"data":["a",1]}]}"#,
            r#"{"inputs":[{"data":[true,false]}]}"#,
            r#"{"inputs":[{"data":[1,null]}]}"#,
            r#"{"inputs":[{"data":[{"x":1}]}]}"#,
            r#"{"inputs":[{"data":[-0]}]}"#,
            r#"{"inputs":[{"data":[1234567890123456789]}]}"#,
            // Ragged, or numbers beside arrays.
            r#"{"inputs":[{"data":[[1,2],[3]]}]}"#,
            r#"{"inputs":[{"data":[1,[2]]}]}"#,
            r#"{"inputs":[{"data":[[1],2]}]}"#,
            // Invalid number syntax: the parser must refuse it.
            r#"{"inputs":[{"data":[01]}]}"#,
            r#"{"inputs":[{"data":[1.]}]}"#,
            r#"{"inputs":[{"data":[.5]}]}"#,
            r#"{"inputs":[{"data":[1e]}]}"#,
            r#"{"inputs":[{"data":[-]}]}"#,
            r#"{"inputs":[{"data":[+1]}]}"#,
            r#"{"inputs":[{"data":[1,]}]}"#,
            // Exponents the parser reads its own way (huge, wrapping, long).
            r#"{"inputs":[{"data":[4e-4294967258]}]}"#,
            r#"{"inputs":[{"data":[0e99999999999]}]}"#,
            r#"{"inputs":[{"data":[1e-400]}]}"#,
            r#"{"inputs":[{"data":[1e100]}]}"#,
            r#"{"inputs":[{"data":[1.2345678901234567890e5]}]}"#,
            r#"{"inputs":[{"data":[,1]}]}"#,
            r#"{"inputs":[{"data":[1 2]}]}"#,
            r#"{"inputs":[{"data":[1"#,
            // Not at /inputs/N/data.
            r#"{"data":[1,2]}"#,
            r#"{"inputs":{"data":[1,2]}}"#,
            r#"[{"inputs":[{"data":[1]}]}]"#,
            r#"{"inputs":[{"parameters":{"data":[1]}}]}"#,
            r#"{"x":{"inputs":[{"data":[1]}]}}"#,
            r#"{"inputs":[[{"data":[1]}]]}"#,
            // A key spelled with an escape is left to the parser.
            r#"{"inputs":[{"d\u0061ta":[1]}]}"#,
            // "data" as a value, then an array at the same depth elsewhere.
            r#"{"inputs":[{"name":"data","shape":[1]}]}"#,
            r#"{"inputs":[{"data":5}],"x":[[[1]]]}"#,
            r#"{"inputs":[{"data":5,"shape":[1]}]}"#,
        ];
        for body in same {
            let (env, list) = elide(body);
            assert_eq!(env, body, "{body}");
            assert!(list.is_empty(), "{body}");
        }
    }

    #[test]
    fn elided_values_count_against_the_limits() {
        let body = r#"{"inputs":[{"data":[1,2,3,4,5,6,7,8,9,10,11,12]}]}"#;
        let mut out = Vec::new();
        let mut list = Vec::new();
        assert_eq!(
            copy_checked(body.as_bytes(), 64, 10, &mut out, Some(&mut list)),
            Err(ScanError::TooManyElements)
        );
        // Depth: root, inputs, input, then data's own levels.
        let body = r#"{"inputs":[{"data":[[[1]]]}]}"#;
        list.clear();
        assert_eq!(
            copy_checked(body.as_bytes(), 5, 100, &mut out, Some(&mut list)),
            Err(ScanError::TooDeep)
        );
        list.clear();
        assert_eq!(
            copy_checked(body.as_bytes(), 6, 100, &mut out, Some(&mut list)),
            Ok(())
        );
        assert_eq!(list[0].lens, vec![1, 1, 1]);
    }

    #[test]
    fn strings_with_brackets_and_escapes() {
        let body = r#"{"id":"[\"data\":[1]","inputs":[{"name":"x\"],","data":[1,2]}]}"#;
        let (env, list) = elide(body);
        assert_eq!(
            env,
            r#"{"id":"[\"data\":[1]","inputs":[{"name":"x\"],","data":[]}]}"#
        );
        assert_eq!(list.len(), 1);
        assert_eq!(scan(br#"["a,b,c,d,e,f"]"#, 8, 3), Ok(()));
        assert!(!depth_within(b"[[[1]]]", 2));
    }
}
