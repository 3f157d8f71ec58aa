//! KServe v2 / Open Inference Protocol: the REST inference request check.
//!
//! Runs on the simd-json borrowed DOM that [`super::parse`] produced, before
//! the request reaches a model server. Tensor requests are 1–16 MiB, so the
//! data walk allocates nothing per value: it dispatches once per input on the
//! datatype to a monomorphised leaf predicate, iterates with explicit indices,
//! and only builds a JSON pointer when it is about to report a failure.
//!
//! Every failure is a 422 [`Rejection`] with a stable `reason` (the metric
//! label), a pointer to the offending field, and a message that names the
//! rule; messages are built from this module's constants only and never echo
//! payload values or names.
//!
//! Reasons: `not_an_object`, `invalid_id`, `invalid_parameters`,
//! `invalid_outputs`, `invalid_output`, `invalid_output_name`,
//! `missing_inputs`, `invalid_inputs`, `empty_inputs`, `invalid_input`,
//! `invalid_input_name`, `duplicate_input_name`, `invalid_shape`,
//! `invalid_datatype`, `missing_data`, `shape_mismatch`, `datatype_mismatch`.

use std::collections::HashSet;

use simd_json::{BorrowedValue as Value, StaticNode};

use super::{pointer, Rejection, Seg};

/// What an admitted inference request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InferSummary {
    /// Number of input tensors.
    pub inputs: usize,
    /// Total tensor elements over all inputs (the sum of the shape products).
    pub elements: u64,
}

/// Largest accepted dimension in a `shape`.
const MAX_DIM: u64 = 1 << 32;

/// Largest finite IEEE 754 binary16 value.
const FP16_MAX: f64 = 65504.0;
/// The binary32 bound, as the protocol documents it.
const FP32_MAX: f64 = 3.402_823_5e38;

/// Inputs up to this many are checked for duplicate names by a linear scan;
/// above it a hash set is used.
const LINEAR_NAME_SCAN: usize = 16;

/// Tensor datatypes of the protocol's tensor data table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dt {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    Bytes,
}

impl Dt {
    fn parse(s: &str) -> Option<Dt> {
        Some(match s {
            "BOOL" => Dt::Bool,
            "UINT8" => Dt::U8,
            "UINT16" => Dt::U16,
            "UINT32" => Dt::U32,
            "UINT64" => Dt::U64,
            "INT8" => Dt::I8,
            "INT16" => Dt::I16,
            "INT32" => Dt::I32,
            "INT64" => Dt::I64,
            "FP16" => Dt::F16,
            "FP32" => Dt::F32,
            "FP64" => Dt::F64,
            "BYTES" => Dt::Bytes,
            _ => return None,
        })
    }

    /// The rule a value of this datatype must follow (a constant, safe to show).
    fn rule(self) -> &'static str {
        match self {
            Dt::Bool => "a BOOL tensor value must be a JSON boolean",
            Dt::U8 => "a UINT8 tensor value must be an integer in 0..=255",
            Dt::U16 => "a UINT16 tensor value must be an integer in 0..=65535",
            Dt::U32 => "a UINT32 tensor value must be an integer in 0..=4294967295",
            Dt::U64 => "a UINT64 tensor value must be an integer in 0..=18446744073709551615",
            Dt::I8 => "an INT8 tensor value must be an integer in -128..=127",
            Dt::I16 => "an INT16 tensor value must be an integer in -32768..=32767",
            Dt::I32 => "an INT32 tensor value must be an integer in -2147483648..=2147483647",
            Dt::I64 => "an INT64 tensor value must be an integer in the signed 64-bit range",
            Dt::F16 => "an FP16 tensor value must be a finite number with magnitude at most 65504",
            Dt::F32 => {
                "an FP32 tensor value must be a finite number with magnitude at most 3.4028235e38"
            }
            Dt::F64 => "an FP64 tensor value must be a finite number",
            Dt::Bytes => "a BYTES tensor value must be a JSON string",
        }
    }
}

/// Whether `s` is one of the protocol's tensor datatypes (case-sensitive):
/// BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16,
/// FP32, FP64, BYTES.
pub fn is_valid_datatype(s: &str) -> bool {
    Dt::parse(s).is_some()
}

/// Check a KServe v2 inference request body (`POST /v2/models/{m}/infer`).
///
/// Unknown top-level keys and unknown keys inside inputs are allowed, for
/// forward compatibility.
pub fn check_infer(body: &Value<'_>) -> Result<InferSummary, Rejection> {
    let Value::Object(top) = body else {
        return Err(Rejection::at(
            "",
            "not_an_object",
            "the inference request must be a JSON object",
        ));
    };

    if let Some(id) = top.get("id") {
        if !matches!(id, Value::String(_)) {
            return Err(Rejection::at(
                pointer([Seg::Key("id")]),
                "invalid_id",
                "`id` must be a string",
            ));
        }
    }
    if let Some(p) = top.get("parameters") {
        if !matches!(p, Value::Object(_)) {
            return Err(Rejection::at(
                pointer([Seg::Key("parameters")]),
                "invalid_parameters",
                "`parameters` must be an object",
            ));
        }
    }
    if let Some(outputs) = top.get("outputs") {
        check_outputs(outputs)?;
    }

    let inputs = match top.get("inputs") {
        None => {
            return Err(Rejection::at(
                pointer([Seg::Key("inputs")]),
                "missing_inputs",
                "`inputs` is required",
            ))
        }
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(Rejection::at(
                pointer([Seg::Key("inputs")]),
                "invalid_inputs",
                "`inputs` must be an array of input tensors",
            ))
        }
    };
    if inputs.is_empty() {
        return Err(Rejection::at(
            pointer([Seg::Key("inputs")]),
            "empty_inputs",
            "`inputs` must hold at least one input tensor",
        ));
    }

    let mut names = Names::new(inputs.len());
    let mut elements: u64 = 0;
    for (i, input) in inputs.iter().enumerate() {
        let n = check_input(i, input, &mut names)?;
        elements = elements.saturating_add(n);
    }
    Ok(InferSummary {
        inputs: inputs.len(),
        elements,
    })
}

fn check_outputs(outputs: &Value<'_>) -> Result<(), Rejection> {
    let Value::Array(outputs) = outputs else {
        return Err(Rejection::at(
            pointer([Seg::Key("outputs")]),
            "invalid_outputs",
            "`outputs` must be an array of requested outputs",
        ));
    };
    for (k, out) in outputs.iter().enumerate() {
        let Value::Object(o) = out else {
            return Err(Rejection::at(
                pointer([Seg::Key("outputs"), Seg::Index(k)]),
                "invalid_output",
                "each requested output must be an object",
            ));
        };
        match o.get("name") {
            Some(Value::String(s)) if !s.is_empty() => {}
            _ => {
                return Err(Rejection::at(
                    pointer([Seg::Key("outputs"), Seg::Index(k), Seg::Key("name")]),
                    "invalid_output_name",
                    "each requested output needs a non-empty string `name`",
                ))
            }
        }
        if let Some(p) = o.get("parameters") {
            if !matches!(p, Value::Object(_)) {
                return Err(Rejection::at(
                    pointer([Seg::Key("outputs"), Seg::Index(k), Seg::Key("parameters")]),
                    "invalid_parameters",
                    "`parameters` must be an object",
                ));
            }
        }
    }
    Ok(())
}

/// Input names seen so far (for `duplicate_input_name`).
enum Names<'a> {
    Few(Vec<&'a str>),
    Many(HashSet<&'a str>),
}

impl<'a> Names<'a> {
    fn new(n: usize) -> Self {
        if n <= LINEAR_NAME_SCAN {
            Names::Few(Vec::with_capacity(n))
        } else {
            Names::Many(HashSet::with_capacity(n))
        }
    }

    /// Record `name`; false when it was already there.
    fn insert(&mut self, name: &'a str) -> bool {
        match self {
            Names::Few(v) => {
                if v.contains(&name) {
                    false
                } else {
                    v.push(name);
                    true
                }
            }
            Names::Many(s) => s.insert(name),
        }
    }
}

fn at_input(
    i: usize,
    field: &'static str,
    reason: &'static str,
    message: &'static str,
) -> Rejection {
    Rejection::at(
        pointer([Seg::Key("inputs"), Seg::Index(i), Seg::Key(field)]),
        reason,
        message,
    )
}

/// Check one input tensor; returns its element count.
fn check_input<'a>(
    i: usize,
    input: &'a Value<'_>,
    names: &mut Names<'a>,
) -> Result<u64, Rejection> {
    let Value::Object(o) = input else {
        return Err(Rejection::at(
            pointer([Seg::Key("inputs"), Seg::Index(i)]),
            "invalid_input",
            "each input tensor must be an object",
        ));
    };

    let name: &'a str = match o.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => {
            return Err(at_input(
                i,
                "name",
                "invalid_input_name",
                "each input tensor needs a non-empty string `name`",
            ))
        }
    };
    if !names.insert(name) {
        return Err(at_input(
            i,
            "name",
            "duplicate_input_name",
            "input tensor names must be unique",
        ));
    }

    let (dims, total) = check_shape(i, o.get("shape"))?;

    let dt = match o.get("datatype") {
        Some(Value::String(s)) => Dt::parse(s),
        _ => None,
    };
    let Some(dt) = dt else {
        return Err(at_input(
            i,
            "datatype",
            "invalid_datatype",
            "`datatype` must be one of BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64, BYTES",
        ));
    };

    if let Some(p) = o.get("parameters") {
        if !matches!(p, Value::Object(_)) {
            return Err(at_input(
                i,
                "parameters",
                "invalid_parameters",
                "`parameters` must be an object",
            ));
        }
    }

    let data: &[Value<'_>] = match o.get("data") {
        Some(Value::Array(a)) => a,
        _ => {
            return Err(at_input(
                i,
                "data",
                "missing_data",
                "each input tensor needs a `data` array",
            ))
        }
    };

    // One dispatch per input: each arm monomorphises the walk with a leaf
    // predicate whose bounds are constants.
    let walk = Walk {
        input: i,
        dims: &dims,
        total,
        dt,
    };
    match dt {
        Dt::Bool => walk.run(data, |v| matches!(v, Value::Static(StaticNode::Bool(_)))),
        Dt::U8 => walk.run(data, |v| fits_unsigned(v, u64::from(u8::MAX))),
        Dt::U16 => walk.run(data, |v| fits_unsigned(v, u64::from(u16::MAX))),
        Dt::U32 => walk.run(data, |v| fits_unsigned(v, u64::from(u32::MAX))),
        Dt::U64 => walk.run(data, |v| fits_unsigned(v, u64::MAX)),
        Dt::I8 => walk.run(data, |v| {
            fits_signed(v, i64::from(i8::MIN), i64::from(i8::MAX))
        }),
        Dt::I16 => walk.run(data, |v| {
            fits_signed(v, i64::from(i16::MIN), i64::from(i16::MAX))
        }),
        Dt::I32 => walk.run(data, |v| {
            fits_signed(v, i64::from(i32::MIN), i64::from(i32::MAX))
        }),
        Dt::I64 => walk.run(data, |v| fits_signed(v, i64::MIN, i64::MAX)),
        Dt::F16 => walk.run(data, |v| fits_float(v, FP16_MAX)),
        Dt::F32 => walk.run(data, |v| fits_float(v, FP32_MAX)),
        Dt::F64 => walk.run(data, |v| fits_float(v, f64::MAX)),
        Dt::Bytes => walk.run(data, |v| matches!(v, Value::String(_))),
    }?;
    Ok(total)
}

/// Parse `shape`: non-negative integer dims, each ≤ 2^32, with a product that
/// fits in u64. Returns the dims and the product.
fn check_shape(i: usize, shape: Option<&Value<'_>>) -> Result<(Vec<u64>, u64), Rejection> {
    let Some(Value::Array(shape)) = shape else {
        return Err(at_input(
            i,
            "shape",
            "invalid_shape",
            "each input tensor needs a `shape` array of non-negative integers",
        ));
    };
    let mut dims = Vec::with_capacity(shape.len());
    let mut total: u64 = 1;
    for (j, d) in shape.iter().enumerate() {
        let d = match d {
            Value::Static(StaticNode::I64(n)) if *n >= 0 && n.unsigned_abs() <= MAX_DIM => {
                n.unsigned_abs()
            }
            Value::Static(StaticNode::U64(n)) if *n <= MAX_DIM => *n,
            _ => {
                return Err(Rejection::at(
                    pointer([
                        Seg::Key("inputs"),
                        Seg::Index(i),
                        Seg::Key("shape"),
                        Seg::Index(j),
                    ]),
                    "invalid_shape",
                    "each `shape` dimension must be an integer in 0..=4294967296",
                ))
            }
        };
        dims.push(d);
        // Keep multiplying after a zero so that every dim is still range-checked;
        // a zero product never overflows.
        total = total.checked_mul(d).ok_or_else(|| {
            at_input(
                i,
                "shape",
                "invalid_shape",
                "the product of the `shape` dimensions overflows the element count",
            )
        })?;
    }
    Ok((dims, total))
}

#[inline(always)]
fn fits_unsigned(v: &Value<'_>, max: u64) -> bool {
    match v {
        Value::Static(StaticNode::I64(n)) => *n >= 0 && n.unsigned_abs() <= max,
        Value::Static(StaticNode::U64(n)) => *n <= max,
        _ => false,
    }
}

#[inline(always)]
fn fits_signed(v: &Value<'_>, min: i64, max: i64) -> bool {
    match v {
        Value::Static(StaticNode::I64(n)) => *n >= min && *n <= max,
        // U64 only carries values above i64::MAX, but do not rely on it.
        Value::Static(StaticNode::U64(n)) => max >= 0 && *n <= max.unsigned_abs(),
        _ => false,
    }
}

#[inline(always)]
fn fits_float(v: &Value<'_>, max: f64) -> bool {
    match v {
        Value::Static(StaticNode::F64(x)) => x.is_finite() && x.abs() <= max,
        // Integers are numbers too; every u64 is below the FP32 bound.
        Value::Static(StaticNode::I64(n)) => n.unsigned_abs() as f64 <= max,
        Value::Static(StaticNode::U64(n)) => *n as f64 <= max,
        _ => false,
    }
}

/// The data walk of one input tensor.
struct Walk<'s> {
    input: usize,
    dims: &'s [u64],
    total: u64,
    dt: Dt,
}

impl Walk<'_> {
    /// Check `data` against the shape and every leaf against `ok`.
    ///
    /// Flat form: `data` holds exactly `total` leaves. Nested form (rank ≥ 2
    /// and the first element is an array): row-major nesting whose length at
    /// every level equals that level's dim, with leaves exactly at depth rank.
    fn run<F>(&self, data: &[Value<'_>], ok: F) -> Result<(), Rejection>
    where
        F: Fn(&Value<'_>) -> bool,
    {
        let nested = self.dims.len() >= 2 && matches!(data.first(), Some(Value::Array(_)));
        if !nested {
            if data.len() as u64 != self.total {
                return Err(self.mismatch(&[]));
            }
            return match data.iter().position(|v| !ok(v)) {
                None => Ok(()),
                Some(j) => Err(self.bad_leaf(&[], j, &data[j])),
            };
        }

        if data.len() as u64 != self.dims[0] {
            return Err(self.mismatch(&[]));
        }
        let rank = self.dims.len();
        // (array, index of the next child to visit); entry k is at depth k+1
        // and its length has been checked against dims[k].
        let mut stack: Vec<(&[Value<'_>], usize)> = Vec::with_capacity(rank.min(32));
        stack.push((data, 0));
        while let Some(&(arr, next)) = stack.last() {
            let depth = stack.len();
            if depth == rank {
                // Innermost level: every child is a leaf.
                if let Some(j) = arr.iter().position(|v| !ok(v)) {
                    return Err(self.bad_leaf(&stack, j, &arr[j]));
                }
                stack.pop();
                continue;
            }
            if next == arr.len() {
                stack.pop();
                continue;
            }
            match &arr[next] {
                Value::Array(child) if child.len() as u64 == self.dims[depth] => {
                    if let Some(top) = stack.last_mut() {
                        top.1 = next + 1;
                    }
                    stack.push((child, 0));
                }
                _ => return Err(self.mismatch_at(&stack, next)),
            }
        }
        Ok(())
    }

    /// Pointer `/inputs/i/data/<ancestors…>/<tail>` for the top of `stack`.
    /// Each ancestor's index is its parent's `next - 1` (the child visited).
    fn data_pointer(&self, stack: &[(&[Value<'_>], usize)], tail: Option<usize>) -> String {
        let ancestors = stack
            .iter()
            .take(stack.len().saturating_sub(1))
            .map(|&(_, next)| Seg::Index(next - 1));
        pointer(
            [Seg::Key("inputs"), Seg::Index(self.input), Seg::Key("data")]
                .into_iter()
                .chain(ancestors)
                .chain(tail.map(Seg::Index)),
        )
    }

    #[cold]
    fn mismatch(&self, stack: &[(&[Value<'_>], usize)]) -> Rejection {
        Rejection::at(
            self.data_pointer(stack, None),
            "shape_mismatch",
            "`data` must hold exactly the number of values the `shape` gives, flat or nested to match the shape",
        )
    }

    #[cold]
    fn mismatch_at(&self, stack: &[(&[Value<'_>], usize)], j: usize) -> Rejection {
        Rejection::at(
            self.data_pointer(stack, Some(j)),
            "shape_mismatch",
            "nested `data` must match the `shape`: each level's length must equal its dimension",
        )
    }

    #[cold]
    fn bad_leaf(&self, stack: &[(&[Value<'_>], usize)], j: usize, v: &Value<'_>) -> Rejection {
        if matches!(v, Value::Array(_)) {
            return Rejection::at(
                self.data_pointer(stack, Some(j)),
                "shape_mismatch",
                "`data` nests deeper than the `shape` allows",
            );
        }
        Rejection::at(
            self.data_pointer(stack, Some(j)),
            "datatype_mismatch",
            self.dt.rule(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parse `json` with simd-json (in place, on a copy) and run the check.
    fn check(json: &str) -> Result<InferSummary, Rejection> {
        let mut b = json.as_bytes().to_vec();
        let v = simd_json::to_borrowed_value(&mut b).expect("test body must be valid JSON");
        check_infer(&v)
    }

    /// One input tensor request.
    fn one(name: &str, shape: &str, datatype: &str, data: &str) -> String {
        format!(
            r#"{{"inputs":[{{"name":"{name}","shape":{shape},"datatype":"{datatype}","data":{data}}}]}}"#
        )
    }

    fn assert_ok(case: &str, json: &str, inputs: usize, elements: u64) {
        match check(json) {
            Ok(s) => assert_eq!(s, InferSummary { inputs, elements }, "case {case}"),
            Err(r) => panic!("case {case}: expected Ok, got {r:?}"),
        }
    }

    fn assert_rej(case: &str, json: &str, reason: &str, ptr: &str) {
        match check(json) {
            Ok(s) => panic!("case {case}: expected {reason} at {ptr:?}, got Ok({s:?})"),
            Err(r) => {
                assert_eq!(r.status, 422, "case {case}: status");
                assert_eq!(r.reason, reason, "case {case}: reason ({r:?})");
                assert_eq!(
                    r.pointer.as_deref(),
                    Some(ptr),
                    "case {case}: pointer ({r:?})"
                );
                assert!(!r.message.is_empty(), "case {case}: message");
            }
        }
    }

    #[test]
    fn valid_requests() {
        let cases: &[(&str, String, usize, u64)] = &[
            ("fp32 flat", one("x", "[2,3]", "FP32", "[1,2,3,4.5,5,6]"), 1, 6),
            ("fp32 nested", one("x", "[2,3]", "FP32", "[[1,2,3],[4,5.5,6]]"), 1, 6),
            ("int64 rank 1", one("x", "[4]", "INT64", "[-1,0,1,9223372036854775807]"), 1, 4),
            ("int32 rank 3 nested", one("x", "[2,2,2]", "INT32", "[[[1,2],[3,4]],[[5,6],[7,8]]]"), 1, 8),
            ("int32 rank 3 flat", one("x", "[2,2,2]", "INT32", "[1,2,3,4,5,6,7,8]"), 1, 8),
            ("uint8 nested", one("x", "[1,3]", "UINT8", "[[0,128,255]]"), 1, 3),
            ("bool", one("x", "[3]", "BOOL", "[true,false,true]"), 1, 3),
            ("bool nested", one("x", "[2,1]", "BOOL", "[[true],[false]]"), 1, 2),
            ("bytes", one("x", "[2]", "BYTES", r#"["hello","w\u00f6rld"]"#), 1, 2),
            ("bytes nested", one("x", "[1,2]", "BYTES", r#"[["",""]]"#), 1, 2),
            ("fp64 anything", one("x", "[3]", "FP64", "[1e300,-1e-300,18446744073709551615]"), 1, 3),
            ("fp16 ints", one("x", "[2]", "FP16", "[-65504,65504]"), 1, 2),
            ("scalar shape []", one("x", "[]", "INT8", "[7]"), 1, 1),
            ("shape [0] empty", one("x", "[0]", "FP32", "[]"), 1, 0),
            ("shape [2,0] empty flat", one("x", "[2,0]", "FP32", "[]"), 1, 0),
            ("shape [2,0] nested empties", one("x", "[2,0]", "FP32", "[[],[]]"), 1, 0),
            ("shape [0,5] empty", one("x", "[0,5]", "FP32", "[]"), 1, 0),
            ("shape max dim with 0", one("x", "[0,4294967296,4294967296]", "FP32", "[]"), 1, 0),
            (
                "all optional fields",
                r#"{"id":"req-1","parameters":{"binary_data_output":false},
                    "inputs":[{"name":"a","shape":[1],"datatype":"FP32","data":[1],"parameters":{"k":1},"extra":3},
                              {"name":"b","shape":[2],"datatype":"BYTES","data":["p","q"]}],
                    "outputs":[{"name":"out"},{"name":"o2","parameters":{"binary_data":true}}],
                    "future_key":[1,2,3]}"#
                    .to_string(),
                2,
                3,
            ),
            ("empty outputs array", r#"{"inputs":[{"name":"a","shape":[1],"datatype":"BOOL","data":[true]}],"outputs":[]}"#.to_string(), 1, 1),
        ];
        for (name, json, inputs, elements) in cases {
            assert_ok(name, json, *inputs, *elements);
        }
    }

    #[test]
    fn datatype_boundaries() {
        // (case, datatype, data for shape [1], accepted)
        let cases: &[(&str, &str, &str, bool)] = &[
            ("uint8 0", "UINT8", "[0]", true),
            ("uint8 255", "UINT8", "[255]", true),
            ("uint8 256", "UINT8", "[256]", false),
            ("uint8 -1", "UINT8", "[-1]", false),
            ("uint16 65535", "UINT16", "[65535]", true),
            ("uint16 65536", "UINT16", "[65536]", false),
            ("uint32 max", "UINT32", "[4294967295]", true),
            ("uint32 max+1", "UINT32", "[4294967296]", false),
            ("uint64 max", "UINT64", "[18446744073709551615]", true),
            ("uint64 i64 max+1", "UINT64", "[9223372036854775808]", true),
            ("uint64 -1", "UINT64", "[-1]", false),
            ("uint64 float", "UINT64", "[1.5]", false),
            ("int8 -128", "INT8", "[-128]", true),
            ("int8 127", "INT8", "[127]", true),
            ("int8 -129", "INT8", "[-129]", false),
            ("int8 128", "INT8", "[128]", false),
            ("int16 -32768", "INT16", "[-32768]", true),
            ("int16 32768", "INT16", "[32768]", false),
            ("int32 min", "INT32", "[-2147483648]", true),
            ("int32 min-1", "INT32", "[-2147483649]", false),
            ("int32 max+1", "INT32", "[2147483648]", false),
            ("int64 min", "INT64", "[-9223372036854775808]", true),
            ("int64 max", "INT64", "[9223372036854775807]", true),
            ("int64 max+1", "INT64", "[9223372036854775808]", false),
            ("int 3.0 is a float", "INT32", "[3.0]", false),
            ("int 1e2 is a float", "INT32", "[1e2]", false),
            ("uint -0.0", "UINT8", "[-0.0]", false),
            ("int string", "INT32", r#"["1"]"#, false),
            ("int bool", "INT32", "[true]", false),
            ("int null", "INT32", "[null]", false),
            ("int object", "INT32", "[{}]", false),
            ("fp16 65504", "FP16", "[65504]", true),
            ("fp16 -65504.0", "FP16", "[-65504.0]", true),
            ("fp16 70000", "FP16", "[70000]", false),
            ("fp16 -70000.5", "FP16", "[-70000.5]", false),
            ("fp16 small", "FP16", "[1e-8]", true),
            ("fp32 bound", "FP32", "[3.4028235e38]", true),
            ("fp32 -bound", "FP32", "[-3.4028235e38]", true),
            ("fp32 3.5e38", "FP32", "[3.5e38]", false),
            ("fp32 1e39", "FP32", "[1e39]", false),
            ("fp32 u64 max", "FP32", "[18446744073709551615]", true),
            ("fp64 1e308", "FP64", "[1.7976931348623157e308]", true),
            ("fp64 string", "FP64", r#"["1.0"]"#, false),
            ("fp32 null", "FP32", "[null]", false),
            ("bool true", "BOOL", "[true]", true),
            ("bool 1", "BOOL", "[1]", false),
            ("bool string", "BOOL", r#"["true"]"#, false),
            ("bytes empty string", "BYTES", r#"[""]"#, true),
            ("bytes number", "BYTES", "[1]", false),
            ("bytes null", "BYTES", "[null]", false),
        ];
        for (case, dt, data, accepted) in cases {
            let json = one("t", "[1]", dt, data);
            if *accepted {
                assert_ok(case, &json, 1, 1);
            } else {
                assert_rej(case, &json, "datatype_mismatch", "/inputs/0/data/0");
            }
        }
    }

    #[test]
    fn rejections_with_pointers() {
        let big_flat: String = {
            let mut s = String::from("[");
            for k in 0..20 {
                if k > 0 {
                    s.push(',');
                }
                s.push_str(if k == 17 { "256" } else { "1" });
            }
            s.push(']');
            s
        };
        let cases: &[(&str, String, &str, &str)] = &[
            // body
            ("array body", "[1,2]".into(), "not_an_object", ""),
            ("string body", r#""x""#.into(), "not_an_object", ""),
            ("null body", "null".into(), "not_an_object", ""),
            // top-level optional fields
            ("id number", r#"{"id":1,"inputs":[]}"#.into(), "invalid_id", "/id"),
            ("id null", r#"{"id":null,"inputs":[]}"#.into(), "invalid_id", "/id"),
            ("parameters array", r#"{"parameters":[],"inputs":[]}"#.into(), "invalid_parameters", "/parameters"),
            ("outputs object", r#"{"outputs":{},"inputs":[]}"#.into(), "invalid_outputs", "/outputs"),
            ("output not object", r#"{"outputs":[{"name":"a"},"b"],"inputs":[]}"#.into(), "invalid_output", "/outputs/1"),
            ("output no name", r#"{"outputs":[{}],"inputs":[]}"#.into(), "invalid_output_name", "/outputs/0/name"),
            ("output empty name", r#"{"outputs":[{"name":""}],"inputs":[]}"#.into(), "invalid_output_name", "/outputs/0/name"),
            ("output numeric name", r#"{"outputs":[{"name":3}],"inputs":[]}"#.into(), "invalid_output_name", "/outputs/0/name"),
            (
                "output parameters",
                r#"{"outputs":[{"name":"o","parameters":1}],"inputs":[]}"#.into(),
                "invalid_parameters",
                "/outputs/0/parameters",
            ),
            // inputs
            ("no inputs", r#"{"id":"x"}"#.into(), "missing_inputs", "/inputs"),
            ("inputs object", r#"{"inputs":{}}"#.into(), "invalid_inputs", "/inputs"),
            ("inputs null", r#"{"inputs":null}"#.into(), "invalid_inputs", "/inputs"),
            ("empty inputs", r#"{"inputs":[]}"#.into(), "empty_inputs", "/inputs"),
            ("input not object", r#"{"inputs":[1]}"#.into(), "invalid_input", "/inputs/0"),
            (
                "second input not object",
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"BOOL","data":[true]},[]]}"#.into(),
                "invalid_input",
                "/inputs/1",
            ),
            ("input no name", r#"{"inputs":[{"shape":[1],"datatype":"BOOL","data":[true]}]}"#.into(), "invalid_input_name", "/inputs/0/name"),
            ("input empty name", one("", "[1]", "BOOL", "[true]"), "invalid_input_name", "/inputs/0/name"),
            (
                "input name number",
                r#"{"inputs":[{"name":1,"shape":[1],"datatype":"BOOL","data":[true]}]}"#.into(),
                "invalid_input_name",
                "/inputs/0/name",
            ),
            (
                "duplicate name",
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"BOOL","data":[true]},
                              {"name":"b","shape":[1],"datatype":"BOOL","data":[true]},
                              {"name":"a","shape":[1],"datatype":"BOOL","data":[true]}]}"#
                    .into(),
                "duplicate_input_name",
                "/inputs/2/name",
            ),
            // shape
            ("shape missing", r#"{"inputs":[{"name":"a","datatype":"BOOL","data":[true]}]}"#.into(), "invalid_shape", "/inputs/0/shape"),
            ("shape not array", one("a", "3", "BOOL", "[true]"), "invalid_shape", "/inputs/0/shape"),
            ("shape negative", one("a", "[2,-1]", "BOOL", "[true]"), "invalid_shape", "/inputs/0/shape/1"),
            ("shape float", one("a", "[1.0]", "BOOL", "[true]"), "invalid_shape", "/inputs/0/shape/0"),
            ("shape string", one("a", r#"[1,"2"]"#, "BOOL", "[true]"), "invalid_shape", "/inputs/0/shape/1"),
            ("shape dim 2^32+1", one("a", "[1,1,4294967297]", "BOOL", "[true]"), "invalid_shape", "/inputs/0/shape/2"),
            ("shape dim u64", one("a", "[18446744073709551615]", "BOOL", "[true]"), "invalid_shape", "/inputs/0/shape/0"),
            (
                "shape product overflow",
                one("a", "[4294967296,4294967296]", "BOOL", "[true]"),
                "invalid_shape",
                "/inputs/0/shape",
            ),
            (
                "shape product overflow 3 dims",
                one("a", "[65536,65536,65536,65536,2]", "BOOL", "[true]"),
                "invalid_shape",
                "/inputs/0/shape",
            ),
            // datatype
            ("datatype missing", r#"{"inputs":[{"name":"a","shape":[1],"data":[true]}]}"#.into(), "invalid_datatype", "/inputs/0/datatype"),
            ("datatype lower case", one("a", "[1]", "fp32", "[1]"), "invalid_datatype", "/inputs/0/datatype"),
            ("datatype unknown", one("a", "[1]", "BF16", "[1]"), "invalid_datatype", "/inputs/0/datatype"),
            (
                "datatype number",
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":32,"data":[1]}]}"#.into(),
                "invalid_datatype",
                "/inputs/0/datatype",
            ),
            // input parameters
            (
                "input parameters",
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"BOOL","data":[true],"parameters":"x"}]}"#.into(),
                "invalid_parameters",
                "/inputs/0/parameters",
            ),
            // data
            ("data missing", r#"{"inputs":[{"name":"a","shape":[1],"datatype":"BOOL"}]}"#.into(), "missing_data", "/inputs/0/data"),
            ("data not array", one("a", "[1]", "BOOL", "true"), "missing_data", "/inputs/0/data"),
            ("data object", one("a", "[1]", "BOOL", "{}"), "missing_data", "/inputs/0/data"),
            // counts and nesting
            ("flat too few", one("a", "[2,3]", "FP32", "[1,2,3,4,5]"), "shape_mismatch", "/inputs/0/data"),
            ("flat too many", one("a", "[3]", "FP32", "[1,2,3,4]"), "shape_mismatch", "/inputs/0/data"),
            ("zero dim with data", one("a", "[0]", "FP32", "[1]"), "shape_mismatch", "/inputs/0/data"),
            ("zero in shape with data", one("a", "[3,0]", "FP32", "[1,2,3]"), "shape_mismatch", "/inputs/0/data"),
            ("scalar shape empty data", one("a", "[]", "FP32", "[]"), "shape_mismatch", "/inputs/0/data"),
            ("scalar shape nested data", one("a", "[]", "FP32", "[[1]]"), "shape_mismatch", "/inputs/0/data/0"),
            ("nonzero shape empty data", one("a", "[2,2]", "FP32", "[]"), "shape_mismatch", "/inputs/0/data"),
            ("nested outer length", one("a", "[3,2]", "FP32", "[[1,2],[3,4]]"), "shape_mismatch", "/inputs/0/data"),
            ("nested inner length", one("a", "[2,3]", "FP32", "[[1,2,3],[4,5]]"), "shape_mismatch", "/inputs/0/data/1"),
            ("nested first inner length", one("a", "[2,3]", "FP32", "[[1,2],[3,4,5,6]]"), "shape_mismatch", "/inputs/0/data/0"),
            ("nested scalar in place of row", one("a", "[2,2]", "FP32", "[[1,2],3]"), "shape_mismatch", "/inputs/0/data/1"),
            ("nested too deep", one("a", "[1,2]", "FP32", "[[1,[2]]]"), "shape_mismatch", "/inputs/0/data/0/1"),
            (
                "partially nested rank 3",
                one("a", "[2,2,2]", "FP32", "[[1,2,3,4],[5,6,7,8]]"),
                "shape_mismatch",
                "/inputs/0/data/0",
            ),
            (
                "deep nested inner length",
                one("a", "[2,2,2]", "FP32", "[[[1,2],[3,4]],[[5,6],[7]]]"),
                "shape_mismatch",
                "/inputs/0/data/1/1",
            ),
            ("rank 1 nested data", one("a", "[3]", "FP32", "[[1,2,3]]"), "shape_mismatch", "/inputs/0/data"),
            ("rank 1 array leaf", one("a", "[2]", "FP32", "[1,[2]]"), "shape_mismatch", "/inputs/0/data/1"),
            ("flat array leaf later", one("a", "[2,2]", "FP32", "[1,2,3,[4]]"), "shape_mismatch", "/inputs/0/data/3"),
            ("nested with zero dim but data", one("a", "[2,0]", "FP32", "[[],[1]]"), "shape_mismatch", "/inputs/0/data/1"),
            // leaf datatype pointers
            ("flat leaf 17", one("a", "[20]", "UINT8", &big_flat), "datatype_mismatch", "/inputs/0/data/17"),
            ("flat leaf 17 as 4x5", one("a", "[4,5]", "UINT8", &big_flat), "datatype_mismatch", "/inputs/0/data/17"),
            ("nested leaf", one("a", "[2,4]", "INT8", "[[1,2,3,4],[5,6,7,-129]]"), "datatype_mismatch", "/inputs/0/data/1/3"),
            (
                "deep nested leaf",
                one("a", "[2,2,2]", "BOOL", "[[[true,true],[true,true]],[[true,true],[true,1]]]"),
                "datatype_mismatch",
                "/inputs/0/data/1/1/1",
            ),
            ("nested bytes leaf", one("a", "[1,2]", "BYTES", r#"[["a",2]]"#), "datatype_mismatch", "/inputs/0/data/0/1"),
            (
                "error in second input",
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"BOOL","data":[true]},
                              {"name":"b","shape":[2],"datatype":"UINT16","data":[1,-2]}]}"#
                    .into(),
                "datatype_mismatch",
                "/inputs/1/data/1",
            ),
        ];
        for (case, json, reason, ptr) in cases {
            assert_rej(case, json, reason, ptr);
        }
    }

    #[test]
    fn duplicate_names_many_inputs() {
        // Above the linear-scan threshold the hash set is used.
        let mut inputs: Vec<String> = (0..40)
            .map(|k| format!(r#"{{"name":"in{k}","shape":[1],"datatype":"INT32","data":[{k}]}}"#))
            .collect();
        let json = format!(r#"{{"inputs":[{}]}}"#, inputs.join(","));
        assert_ok("40 unique", &json, 40, 40);

        inputs[33] = r#"{"name":"in5","shape":[1],"datatype":"INT32","data":[1]}"#.to_string();
        let json = format!(r#"{{"inputs":[{}]}}"#, inputs.join(","));
        assert_rej(
            "40 with duplicate",
            &json,
            "duplicate_input_name",
            "/inputs/33/name",
        );
    }

    #[test]
    fn elements_sum_over_inputs() {
        let json = r#"{"inputs":[
            {"name":"a","shape":[2,3],"datatype":"FP32","data":[[1,2,3],[4,5,6]]},
            {"name":"b","shape":[4],"datatype":"BYTES","data":["a","b","c","d"]},
            {"name":"c","shape":[0,7],"datatype":"INT8","data":[]}]}"#;
        assert_ok("sum", json, 3, 10);
    }

    #[test]
    fn large_tensor_flat_and_nested() {
        let rows = 256;
        let cols = 1024;
        let flat: Vec<String> = (0..rows * cols).map(|k| (k % 251).to_string()).collect();
        let json = one(
            "big",
            &format!("[{rows},{cols}]"),
            "UINT8",
            &format!("[{}]", flat.join(",")),
        );
        assert_ok("big flat", &json, 1, (rows * cols) as u64);

        let nested: Vec<String> = flat
            .chunks(cols)
            .map(|r| format!("[{}]", r.join(",")))
            .collect();
        let json = one(
            "big",
            &format!("[{rows},{cols}]"),
            "UINT8",
            &format!("[{}]", nested.join(",")),
        );
        assert_ok("big nested", &json, 1, (rows * cols) as u64);

        let mut bad = nested.clone();
        bad[200] = format!(
            "[{}]",
            flat[..cols]
                .iter()
                .enumerate()
                .map(|(k, s)| if k == 1000 { "300" } else { s.as_str() })
                .collect::<Vec<_>>()
                .join(",")
        );
        let json = one(
            "big",
            &format!("[{rows},{cols}]"),
            "UINT8",
            &format!("[{}]", bad.join(",")),
        );
        assert_rej(
            "big nested bad leaf",
            &json,
            "datatype_mismatch",
            "/inputs/0/data/200/1000",
        );
    }

    #[test]
    fn messages_never_echo_payload() {
        let secret = "S3CRET_tok";
        let cases = [
            format!(
                r#"{{"id":"{secret}","inputs":[{{"name":"{secret}","shape":[1],"datatype":"BYTES","data":[7]}}]}}"#
            ),
            format!(
                r#"{{"inputs":[{{"name":"{secret}","shape":[1],"datatype":"{secret}","data":["x"]}}]}}"#
            ),
            format!(
                r#"{{"inputs":[{{"name":"a","shape":[1],"datatype":"BOOL","data":[true]}},{{"name":"a","shape":[1],"datatype":"BOOL","data":[true]}}],"{secret}":1}}"#
            ),
            format!(
                r#"{{"inputs":[{{"name":"{secret}","shape":[2],"datatype":"BYTES","data":["{secret}"]}}]}}"#
            ),
            format!(r#"{{"outputs":[{{"name":"{secret}","parameters":"{secret}"}}],"inputs":[]}}"#),
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[987654]}]}"#
                .to_string(),
        ];
        for json in &cases {
            let r = check(json).expect_err("each case is rejected");
            assert!(!r.message.contains(secret), "message echoes payload: {r:?}");
            assert!(
                !r.message.contains("987654"),
                "message echoes payload: {r:?}"
            );
            assert!(
                !r.pointer.as_deref().unwrap_or("").contains(secret),
                "pointer echoes payload: {r:?}"
            );
        }
    }

    #[test]
    fn datatype_names() {
        for dt in [
            "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
            "FP16", "FP32", "FP64", "BYTES",
        ] {
            assert!(is_valid_datatype(dt), "{dt}");
        }
        for dt in [
            "", "bool", "Fp32", "BF16", "FP8", "STRING", "UINT128", "INT4", " FP32", "FP32 ",
        ] {
            assert!(!is_valid_datatype(dt), "{dt:?}");
        }
    }
}
