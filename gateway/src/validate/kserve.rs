//! KServe v2 / Open Inference Protocol: the REST inference request check.
//!
//! Runs on the parsed body (simd-json's tape in the gateway, through the
//! [`super::json::Json`] view), before the request reaches a model server.
//! Tensor `data` arrays made only of numbers usually arrive already checked
//! by the pre-scan as a [`DataSummary`] (see `prescan.rs`); this module
//! accepts an input from its summary only when that proves it valid, and
//! asks for a full re-check ([`Outcome::Recheck`]) otherwise. When it walks
//! the data itself, the walk allocates nothing per value: it dispatches once
//! per input on the datatype to a monomorphised leaf predicate, iterates
//! without indexing, and only builds a JSON pointer when it is about to
//! report a failure.
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

use super::json::{Json, JsonArr, JsonObj, Node};
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
pub(super) enum Dt {
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
    /// Sent as binary data only (Triton's binary tensor extension).
    Bf16,
}

impl Dt {
    pub(super) fn parse(s: &str) -> Option<Dt> {
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
            "BF16" => Dt::Bf16,
            _ => return None,
        })
    }

    /// The rule a value of this datatype must follow (a constant, safe to show).
    pub(super) fn rule(self) -> &'static str {
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
            Dt::Bf16 => "a BF16 tensor must be sent as binary data (`parameters.binary_data_size`)",
        }
    }

    /// Bytes per element in the binary form (`None`: BYTES, length-prefixed).
    pub(super) fn size(self) -> Option<u64> {
        Some(match self {
            Dt::Bool | Dt::U8 | Dt::I8 => 1,
            Dt::U16 | Dt::I16 | Dt::F16 | Dt::Bf16 => 2,
            Dt::U32 | Dt::I32 | Dt::F32 => 4,
            Dt::U64 | Dt::I64 | Dt::F64 => 8,
            Dt::Bytes => return None,
        })
    }
}

/// The binary part of a request in Triton's binary tensor extension: the
/// bytes after the JSON header (`Inference-Header-Content-Length`), which
/// the inputs with `parameters.binary_data_size` take in input order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Binary<'b> {
    /// `None`: the request has no binary part (plain JSON).
    rest: Option<&'b [u8]>,
}

impl<'b> Binary<'b> {
    /// The binary part after a JSON header (`None`: no header).
    pub fn new(part: Option<&'b [u8]>) -> Binary<'b> {
        Binary { rest: part }
    }

    /// Every byte of the binary part was taken by some input.
    fn check_used_up(&self) -> Result<(), Rejection> {
        match self.rest {
            Some(r) if !r.is_empty() => Err(Rejection::at(
                "",
                "binary_size_mismatch",
                "the binary tensor data is longer than the inputs' `binary_data_size` add up to",
            )),
            _ => Ok(()),
        }
    }
}

/// Whether `s` is one of the protocol's tensor datatypes (case-sensitive):
/// BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16,
/// FP32, FP64, BYTES.
/// (and BF16, in binary form only).
pub fn is_valid_datatype(s: &str) -> bool {
    Dt::parse(s).is_some()
}

/// Check a KServe v2 inference request body (`POST /v2/models/{m}/infer`).
///
/// `elided` describes the tensor `data` arrays that the pre-scan already
/// validated and left out of the parse (their place in `body` holds `[]`).
/// Unknown top-level keys and unknown keys inside inputs are allowed, for
/// forward compatibility.
///
/// `binary`: the request's binary part, when it came in Triton's binary
/// tensor extension; the inputs that declare `parameters.binary_data_size`
/// must take all of it, in order, each exactly its shape's size.
pub fn check_infer<'a, J: Json<'a>>(
    body: J,
    elided: &[DataSummary],
    mut binary: Binary<'_>,
) -> Result<InferSummary, Outcome> {
    let Some(top) = body.as_obj() else {
        return Err(Rejection::at(
            "",
            "not_an_object",
            "the inference request must be a JSON object",
        )
        .into());
    };

    if let Some(id) = top.get("id") {
        if id.as_str().is_none() {
            return Err(Rejection::at(
                pointer([Seg::Key("id")]),
                "invalid_id",
                "`id` must be a string",
            )
            .into());
        }
    }
    if let Some(p) = top.get("parameters") {
        if p.as_obj().is_none() {
            return Err(Rejection::at(
                pointer([Seg::Key("parameters")]),
                "invalid_parameters",
                "`parameters` must be an object",
            )
            .into());
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
            )
            .into())
        }
        Some(v) => match v.as_arr() {
            Some(a) => a,
            None => {
                return Err(Rejection::at(
                    pointer([Seg::Key("inputs")]),
                    "invalid_inputs",
                    "`inputs` must be an array of input tensors",
                )
                .into())
            }
        },
    };
    if inputs.is_empty() {
        return Err(Rejection::at(
            pointer([Seg::Key("inputs")]),
            "empty_inputs",
            "`inputs` must hold at least one input tensor",
        )
        .into());
    }

    let mut names = Names::new(inputs.len());
    let mut elements: u64 = 0;
    // Summaries come in input order: one cursor, no search per input.
    let mut next = elided.iter().peekable();
    for (i, input) in inputs.iter().enumerate() {
        while next.next_if(|d| d.input < i).is_some() {}
        let summary = next.next_if(|d| d.input == i);
        let n = check_input(i, input, &mut names, summary, &mut binary)?;
        elements = elements.saturating_add(n);
    }
    binary.check_used_up()?;
    Ok(InferSummary {
        inputs: inputs.len(),
        elements,
    })
}

/// Why [`check_infer`] did not admit a body.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Rejected(Rejection),
    /// An elided `data` array is not plainly valid for its input: check the
    /// body again with everything parsed (which finds the exact failure).
    Recheck,
}

impl From<Rejection> for Outcome {
    fn from(r: Rejection) -> Outcome {
        Outcome::Rejected(r)
    }
}

/// What the pre-scan learned about a tensor `data` array made only of
/// numbers (flat, or nested with the same length at every level), which it
/// checked for JSON syntax and left out of the parse.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSummary {
    /// Index of the input in `inputs`.
    pub input: usize,
    /// Array length at each nesting level (one entry for a flat array).
    pub lens: Vec<u64>,
    /// Numbers seen (all at the innermost level).
    pub leaves: u64,
    /// Values inside the array (numbers and nested arrays), for the
    /// element limit.
    pub values: u64,
    /// Smallest and largest integer (`i64::MAX`/`i64::MIN` when none).
    pub min_int: i64,
    pub max_int: i64,
    /// Some number had a fraction or an exponent.
    pub has_float: bool,
    /// An upper bound on the magnitude of the numbers with a fraction or
    /// exponent (0 when none).
    pub max_float: f64,
}

impl DataSummary {
    /// Whether every number is valid for `dt`; false also when unsure.
    fn values_fit(&self, dt: Dt) -> bool {
        let ints_within = |lo: i64, hi: i64| {
            self.leaves == 0 || (!self.has_float && self.min_int >= lo && self.max_int <= hi)
        };
        let floats_within = |max: f64| {
            let ints = self.min_int > self.max_int
                || (self.min_int.unsigned_abs() as f64 <= max
                    && self.max_int.unsigned_abs() as f64 <= max);
            ints && self.max_float <= max
        };
        match dt {
            // Numbers are never BOOL or BYTES values.
            Dt::Bool | Dt::Bytes => self.leaves == 0,
            Dt::U8 => ints_within(0, i64::from(u8::MAX)),
            Dt::U16 => ints_within(0, i64::from(u16::MAX)),
            Dt::U32 => ints_within(0, i64::from(u32::MAX)),
            Dt::U64 => ints_within(0, i64::MAX),
            Dt::I8 => ints_within(i64::from(i8::MIN), i64::from(i8::MAX)),
            Dt::I16 => ints_within(i64::from(i16::MIN), i64::from(i16::MAX)),
            Dt::I32 => ints_within(i64::from(i32::MIN), i64::from(i32::MAX)),
            Dt::I64 => ints_within(i64::MIN, i64::MAX),
            Dt::F16 => floats_within(FP16_MAX),
            Dt::F32 => floats_within(FP32_MAX),
            Dt::F64 => floats_within(f64::MAX),
            // Never JSON numbers.
            Dt::Bf16 => false,
        }
    }

    /// Whether the nesting matches `dims` as the data walk requires.
    fn shape_fits(&self, dims: &[u64], total: u64) -> bool {
        if self.lens.len() == 1 {
            // Flat (the walk also takes a flat array for any rank).
            self.lens[0] == total
        } else {
            dims.len() >= 2 && self.lens == dims
        }
    }
}

fn check_outputs<'a, J: Json<'a>>(outputs: J) -> Result<(), Rejection> {
    let Some(outputs) = outputs.as_arr() else {
        return Err(Rejection::at(
            pointer([Seg::Key("outputs")]),
            "invalid_outputs",
            "`outputs` must be an array of requested outputs",
        ));
    };
    for (k, out) in outputs.iter().enumerate() {
        let Some(o) = out.as_obj() else {
            return Err(Rejection::at(
                pointer([Seg::Key("outputs"), Seg::Index(k)]),
                "invalid_output",
                "each requested output must be an object",
            ));
        };
        if o.get("name")
            .and_then(|n| n.as_str())
            .is_none_or(|s| s.is_empty())
        {
            return Err(Rejection::at(
                pointer([Seg::Key("outputs"), Seg::Index(k), Seg::Key("name")]),
                "invalid_output_name",
                "each requested output needs a non-empty string `name`",
            ));
        }
        if let Some(p) = o.get("parameters") {
            let Some(p) = p.as_obj() else {
                return Err(Rejection::at(
                    pointer([Seg::Key("outputs"), Seg::Index(k), Seg::Key("parameters")]),
                    "invalid_parameters",
                    "`parameters` must be an object",
                ));
            };
            if p.get("binary_data").is_some_and(|b| b.as_bool().is_none()) {
                return Err(Rejection::at(
                    pointer([
                        Seg::Key("outputs"),
                        Seg::Index(k),
                        Seg::Key("parameters"),
                        Seg::Key("binary_data"),
                    ]),
                    "invalid_binary_data",
                    "`binary_data` must be a boolean",
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
fn check_input<'a, J: Json<'a>>(
    i: usize,
    input: J,
    names: &mut Names<'a>,
    elided: Option<&DataSummary>,
    binary: &mut Binary<'_>,
) -> Result<u64, Outcome> {
    let Some(o) = input.as_obj() else {
        return Err(Rejection::at(
            pointer([Seg::Key("inputs"), Seg::Index(i)]),
            "invalid_input",
            "each input tensor must be an object",
        )
        .into());
    };

    let name: &'a str = match o.get("name").and_then(|n| n.as_str()) {
        Some(s) if !s.is_empty() => s,
        _ => {
            return Err(at_input(
                i,
                "name",
                "invalid_input_name",
                "each input tensor needs a non-empty string `name`",
            )
            .into())
        }
    };
    if !names.insert(name) {
        return Err(at_input(
            i,
            "name",
            "duplicate_input_name",
            "input tensor names must be unique",
        )
        .into());
    }

    let (dims, total) = check_shape(i, o.get("shape"))?;

    let Some(dt) = o
        .get("datatype")
        .and_then(|d| d.as_str())
        .and_then(Dt::parse)
    else {
        return Err(at_input(
            i,
            "datatype",
            "invalid_datatype",
            "`datatype` must be one of BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64, BYTES",
        )
        .into());
    };

    let params = match o.get("parameters") {
        None => None,
        Some(p) => Some(p.as_obj().ok_or_else(|| {
            at_input(
                i,
                "parameters",
                "invalid_parameters",
                "`parameters` must be an object",
            )
        })?),
    };
    if let Some(size) = params.and_then(|p| p.get("binary_data_size")) {
        if o.get("data").is_some() {
            return Err(at_input(
                i,
                "data",
                "binary_and_data",
                "an input with `binary_data_size` carries its values in the binary part, not in `data`",
            )
            .into());
        }
        check_binary(i, size.as_u64(), dt, total, binary)?;
        return Ok(total);
    }
    if dt == Dt::Bf16 {
        return Err(at_input(i, "datatype", "binary_required", dt.rule()).into());
    }
    if params.is_some_and(|p| p.get("shared_memory_region").is_some()) {
        // The backend is on another host: a client's shared memory region
        // means nothing there.
        return Err(at_input(
            i,
            "parameters",
            "shared_memory_unsupported",
            "tensors in shared memory can't pass through a gateway: send the data in the request",
        )
        .into());
    }

    let Some(data) = o.get("data").and_then(|d| d.as_arr()) else {
        return Err(at_input(
            i,
            "data",
            "missing_data",
            "each input tensor needs a `data` array",
        )
        .into());
    };

    if let Some(summary) = elided {
        // Checked by the pre-scan; `data` here is its `[]` placeholder.
        if summary.shape_fits(&dims, total) && summary.values_fit(dt) {
            return Ok(total);
        }
        return Err(Outcome::Recheck);
    }

    // One dispatch per input: each arm monomorphises the walk with a leaf
    // predicate whose bounds are constants.
    let walk = Walk {
        input: i,
        dims: &dims,
        total,
        dt,
    };
    match dt {
        Dt::Bool => walk.run(data, |v: J| matches!(v.node(), Node::Bool(_))),
        Dt::U8 => walk.run(data, |v: J| fits_unsigned(v, u64::from(u8::MAX))),
        Dt::U16 => walk.run(data, |v: J| fits_unsigned(v, u64::from(u16::MAX))),
        Dt::U32 => walk.run(data, |v: J| fits_unsigned(v, u64::from(u32::MAX))),
        Dt::U64 => walk.run(data, |v: J| fits_unsigned(v, u64::MAX)),
        Dt::I8 => walk.run(data, |v: J| {
            fits_signed(v, i64::from(i8::MIN), i64::from(i8::MAX))
        }),
        Dt::I16 => walk.run(data, |v: J| {
            fits_signed(v, i64::from(i16::MIN), i64::from(i16::MAX))
        }),
        Dt::I32 => walk.run(data, |v: J| {
            fits_signed(v, i64::from(i32::MIN), i64::from(i32::MAX))
        }),
        Dt::I64 => walk.run(data, |v: J| fits_signed(v, i64::MIN, i64::MAX)),
        Dt::F16 => walk.run(data, |v: J| fits_float(v, FP16_MAX)),
        Dt::F32 => walk.run(data, |v: J| fits_float(v, FP32_MAX)),
        Dt::F64 => walk.run(data, |v: J| fits_float(v, f64::MAX)),
        Dt::Bytes => walk.run(data, |v: J| matches!(v.node(), Node::Str(_))),
        Dt::Bf16 => unreachable!("BF16 is refused above unless binary"),
    }?;
    Ok(total)
}

/// One input's binary data: `binary_data_size` a non-negative integer that
/// the binary part still holds, and exactly the shape's size — elements ×
/// the datatype's size, or for BYTES `total` elements each a 4-byte
/// little-endian length and that many bytes.
fn check_binary(
    i: usize,
    size: Option<u64>,
    dt: Dt,
    total: u64,
    binary: &mut Binary<'_>,
) -> Result<(), Rejection> {
    let at = || {
        pointer([
            Seg::Key("inputs"),
            Seg::Index(i),
            Seg::Key("parameters"),
            Seg::Key("binary_data_size"),
        ])
    };
    let Some(size) = size else {
        return Err(Rejection::at(
            at(),
            "invalid_binary_size",
            "`binary_data_size` must be a non-negative integer",
        ));
    };
    let Some(rest) = binary.rest else {
        return Err(Rejection::at(
            at(),
            "binary_without_header",
            "`binary_data_size` needs the binary tensor extension: an `Inference-Header-Content-Length` header and the data after the JSON",
        ));
    };
    if size > rest.len() as u64 {
        return Err(Rejection::at(
            at(),
            "binary_size_mismatch",
            "`binary_data_size` is more than the binary data left in the body",
        ));
    }
    let (data, after) = rest.split_at(size as usize);
    binary.rest = Some(after);
    let fits = match dt.size() {
        Some(each) => total.checked_mul(each) == Some(size),
        None => bytes_elements(data) == Some(total),
    };
    if !fits {
        let message = match dt {
            Dt::Bytes => "BYTES binary data must be exactly `shape`'s element count of 4-byte little-endian lengths each followed by that many bytes",
            _ => "`binary_data_size` must equal the `shape`'s element count times the datatype's size",
        };
        return Err(Rejection::at(at(), "binary_size_mismatch", message));
    }
    Ok(())
}

/// How many length-prefixed elements (4-byte little-endian length, then the
/// bytes) make up `data` exactly (`None`: the last one does not fit).
pub(super) fn bytes_elements(mut data: &[u8]) -> Option<u64> {
    let mut n = 0u64;
    while !data.is_empty() {
        let len = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
        data = data[4..].get(len..)?;
        n += 1;
    }
    Some(n)
}

/// Parse `shape`: non-negative integer dims, each ≤ 2^32, with a product that
/// fits in u64. Returns the dims and the product.
fn check_shape<'a, J: Json<'a>>(i: usize, shape: Option<J>) -> Result<(Vec<u64>, u64), Rejection> {
    let Some(shape) = shape.and_then(|s| s.as_arr()) else {
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
        let Some(d) = d.as_u64().filter(|&n| n <= MAX_DIM) else {
            return Err(Rejection::at(
                pointer([
                    Seg::Key("inputs"),
                    Seg::Index(i),
                    Seg::Key("shape"),
                    Seg::Index(j),
                ]),
                "invalid_shape",
                "each `shape` dimension must be an integer in 0..=4294967296",
            ));
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
fn fits_unsigned<'a, J: Json<'a>>(v: J, max: u64) -> bool {
    match v.node() {
        Node::Int(n) => n >= 0 && n.unsigned_abs() <= max,
        Node::Uint(n) => n <= max,
        _ => false,
    }
}

#[inline(always)]
fn fits_signed<'a, J: Json<'a>>(v: J, min: i64, max: i64) -> bool {
    match v.node() {
        Node::Int(n) => n >= min && n <= max,
        // Uint only carries values above i64::MAX, but do not rely on it.
        Node::Uint(n) => max >= 0 && n <= max.unsigned_abs(),
        _ => false,
    }
}

#[inline(always)]
fn fits_float<'a, J: Json<'a>>(v: J, max: f64) -> bool {
    match v.node() {
        Node::Float(x) => x.is_finite() && x.abs() <= max,
        // Integers are numbers too; every u64 is below the FP32 bound.
        Node::Int(n) => n.unsigned_abs() as f64 <= max,
        Node::Uint(n) => n as f64 <= max,
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
    fn run<'a, J: Json<'a>, F>(&self, data: J::Arr, ok: F) -> Result<(), Rejection>
    where
        F: Fn(J) -> bool,
    {
        let nested = self.dims.len() >= 2 && data.first().is_some_and(|v| v.as_arr().is_some());
        if !nested {
            if data.len() as u64 != self.total {
                return Err(self.mismatch(&[]));
            }
            return match data.iter().enumerate().find(|(_, v)| !ok(*v)) {
                None => Ok(()),
                Some((j, v)) => Err(self.bad_leaf(&[], j, v.as_arr().is_some())),
            };
        }

        if data.len() as u64 != self.dims[0] {
            return Err(self.mismatch(&[]));
        }
        let rank = self.dims.len();
        // (children still to visit, index of the next child); entry k is at
        // depth k+1 and its length has been checked against dims[k].
        type Level<'a, J> = (<<J as Json<'a>>::Arr as JsonArr<'a, J>>::Iter, usize);
        let mut stack: Vec<Level<'a, J>> = Vec::with_capacity(rank.min(32));
        stack.push((data.iter(), 0));
        loop {
            let depth = stack.len();
            let Some((children, next)) = stack.last_mut() else {
                return Ok(());
            };
            if depth == rank {
                // Innermost level: every child is a leaf.
                if let Some((j, v)) = children.enumerate().find(|(_, v)| !ok(*v)) {
                    let at = self.ancestors(&stack);
                    return Err(self.bad_leaf(&at, j, v.as_arr().is_some()));
                }
                stack.pop();
                continue;
            }
            let Some(child) = children.next() else {
                stack.pop();
                continue;
            };
            *next += 1;
            match child.as_arr() {
                Some(a) if a.len() as u64 == self.dims[depth] => stack.push((a.iter(), 0)),
                _ => {
                    let j = *next - 1;
                    let at = self.ancestors(&stack);
                    return Err(self.mismatch_at(&at, j));
                }
            }
        }
    }

    /// Position of each array on the stack but the top one within its
    /// parent's children (its parent's last visited child).
    #[cold]
    fn ancestors<I>(&self, stack: &[(I, usize)]) -> Vec<usize> {
        stack[..stack.len().saturating_sub(1)]
            .iter()
            .map(|&(_, next)| next - 1)
            .collect()
    }

    /// Pointer `/inputs/i/data/<ancestors…>/<tail>`.
    fn data_pointer(&self, ancestors: &[usize], tail: Option<usize>) -> String {
        pointer(
            [Seg::Key("inputs"), Seg::Index(self.input), Seg::Key("data")]
                .into_iter()
                .chain(ancestors.iter().map(|&k| Seg::Index(k)))
                .chain(tail.map(Seg::Index)),
        )
    }

    #[cold]
    fn mismatch(&self, ancestors: &[usize]) -> Rejection {
        Rejection::at(
            self.data_pointer(ancestors, None),
            "shape_mismatch",
            "`data` must hold exactly the number of values the `shape` gives, flat or nested to match the shape",
        )
    }

    #[cold]
    fn mismatch_at(&self, ancestors: &[usize], j: usize) -> Rejection {
        Rejection::at(
            self.data_pointer(ancestors, Some(j)),
            "shape_mismatch",
            "nested `data` must match the `shape`: each level's length must equal its dimension",
        )
    }

    #[cold]
    fn bad_leaf(&self, ancestors: &[usize], j: usize, is_array: bool) -> Rejection {
        if is_array {
            return Rejection::at(
                self.data_pointer(ancestors, Some(j)),
                "shape_mismatch",
                "`data` nests deeper than the `shape` allows",
            );
        }
        Rejection::at(
            self.data_pointer(ancestors, Some(j)),
            "datatype_mismatch",
            self.dt.rule(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> crate::validate::Rules {
        let text = "[clusters.a]\nbackends = [\"127.0.0.1:1\"]\n[[routes]]\ncluster = \"a\"\nprotocol = \"kserve\"\n[[models]]\nname = \"m\"\n";
        crate::validate::Rules::new(&crate::config::Checked::from_str(text, "t").unwrap())
    }

    /// Run the check on simd-json's DOM of `json` (every value parsed), and
    /// the gateway's own way (pre-scan eliding tensor data, tape, re-check
    /// on doubt); both must agree. Returns the DOM's answer.
    fn check(json: &str) -> Result<InferSummary, Rejection> {
        let mut b = json.as_bytes().to_vec();
        let v = simd_json::to_borrowed_value(&mut b).expect("test body must be valid JSON");
        let dom = match check_infer(&v, &[], Binary::default()) {
            Ok(s) => Ok(s),
            Err(Outcome::Rejected(r)) => Err(r),
            Err(Outcome::Recheck) => panic!("nothing was elided"),
        };
        let rules = rules();
        let gateway = crate::validate::check_json(
            crate::validate::JsonKind::KserveInfer("m", None, None),
            json.as_bytes(),
            &rules,
            None,
        );
        match (&dom, &gateway) {
            (Ok(_), Ok(_)) => {}
            (Err(a), Err(b)) => assert_eq!(a, b, "the two paths disagree on {json:.200}"),
            _ => panic!("the two paths disagree on {json:.200}: {dom:?} vs {gateway:?}"),
        }
        dom
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
            ("datatype unknown", one("a", "[1]", "FP8", "[1]"), "invalid_datatype", "/inputs/0/datatype"),
            ("BF16 only in binary", one("a", "[1]", "BF16", "[1]"), "binary_required", "/inputs/0/datatype"),
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

    /// Any tensor body, valid or not: the gateway's way (tensor data checked
    /// by the pre-scan when it can, re-checked when unsure) must answer
    /// exactly what checking every parsed value answers.
    #[test]
    fn elided_and_parsed_data_agree() {
        use proptest::prelude::*;
        const NUMBERS: &[&str] = &[
            "0",
            "-0",
            "1",
            "-1",
            "7",
            "127",
            "128",
            "-128",
            "-129",
            "255",
            "256",
            "-32769",
            "65504",
            "65505",
            "65504.0",
            "65503.9",
            "-65504.5",
            "1e5",
            "1.5e-3",
            "2E+2",
            "4294967295",
            "4294967296",
            "3.4028235e38",
            "3.5e38",
            "1e309",
            "-1e400",
            "0.5",
            "-0.0",
            "12.345678",
            "9223372036854775807",
            "-9223372036854775808",
            "18446744073709551615",
            "18446744073709551616",
            "123456789012345678",
            "4e-4294967258",
            "1e-4294967291",
            "2e-4294966988",
            "0e99999999999",
            "1e-400",
            "1e-05",
            "2.5e+07",
            "9.9e99",
            "1e100",
            "0.1e-99",
            "1.2345678901234567e3",
            "true",
            "null",
            "\"x\"",
            "[]",
            "[1]",
            "{}",
        ];
        const TYPES: &[&str] = &[
            "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
            "FP16", "FP32", "FP64", "BYTES",
        ];
        let rules = rules();
        // Two numbers per case, each leaf one of them, as many leaves as the
        // shape asks (sometimes one fewer): most cases reach the value checks.
        let strategy = (
            0..TYPES.len(),
            proptest::collection::vec(0u64..4, 1..3),
            (0..NUMBERS.len(), 0..NUMBERS.len()),
            proptest::collection::vec(any::<bool>(), 16),
            (any::<bool>(), 0..6u8),
        );
        proptest!(ProptestConfig::with_cases(4000), |((t, dims, (a, b), which, (nest, short)) in strategy)| {
            let total = dims.iter().product::<u64>() as usize;
            let n = if short == 0 { total.saturating_sub(1) } else { total };
            let leaves: Vec<&str> = which
                .iter()
                .take(n)
                .map(|&w| NUMBERS[if w { a } else { b }])
                .collect();
            let data = if nest && dims.len() == 2 && dims[1] > 0 {
                let rows: Vec<String> = leaves
                    .chunks(dims[1] as usize)
                    .map(|r| format!("[{}]", r.join(",")))
                    .collect();
                format!("[{}]", rows.join(","))
            } else {
                format!("[{}]", leaves.join(","))
            };
            let shape = format!("[{}]", dims.iter().map(u64::to_string).collect::<Vec<_>>().join(","));
            let json = one("x", &shape, TYPES[t], &data);
            let mut b = json.clone().into_bytes();
            let dom = match simd_json::to_borrowed_value(&mut b) {
                Err(_) => Err("invalid_json"),
                Ok(v) => match check_infer(&v, &[], Binary::default()) {
                    Ok(_) => Ok(()),
                    Err(Outcome::Rejected(r)) => Err(r.reason),
                    Err(Outcome::Recheck) => Err("recheck"),
                },
            };
            let gateway = crate::validate::check_json(
                crate::validate::JsonKind::KserveInfer("m", None, None),
                json.as_bytes(),
                &rules,
                None,
            );
            let gateway = gateway.map(|_| ()).map_err(|r| r.reason);
            prop_assert_eq!(dom, gateway, "{}", json);
        });
    }

    /// A body in Triton's binary tensor extension: the JSON header's length
    /// and the whole body.
    fn binary_body(json: &str, data: &[u8]) -> (usize, Vec<u8>) {
        let mut b = json.as_bytes().to_vec();
        b.extend_from_slice(data);
        (json.len(), b)
    }

    fn check_binary_body(json: &str, data: &[u8]) -> Result<(), Rejection> {
        let (n, body) = binary_body(json, data);
        let rules = rules();
        crate::validate::check_json(
            crate::validate::JsonKind::KserveInfer("m", None, Some(n)),
            &body,
            &rules,
            None,
        )
        .map(|_| ())
    }

    fn bytes_elements_of(items: &[&[u8]]) -> Vec<u8> {
        let mut b = Vec::new();
        for it in items {
            b.extend_from_slice(&(it.len() as u32).to_le_bytes());
            b.extend_from_slice(it);
        }
        b
    }

    #[test]
    fn binary_tensors_sized_by_shape_and_datatype() {
        let input = |name: &str, shape: &str, dt: &str, size: usize| {
            format!(
                r#"{{"name":"{name}","shape":{shape},"datatype":"{dt}","parameters":{{"binary_data_size":{size}}}}}"#
            )
        };
        let req = |inputs: &[String]| {
            format!(
                r#"{{"inputs":[{}],"outputs":[{{"name":"y","parameters":{{"binary_data":true}}}}]}}"#,
                inputs.join(",")
            )
        };
        // FP32 [2,3] = 24 bytes, INT64 [1] = 8, BF16 [4] = 8, a JSON input beside them.
        let json_input = r#"{"name":"j","shape":[2],"datatype":"INT8","data":[1,2]}"#.to_string();
        let ok = req(&[
            input("a", "[2,3]", "FP32", 24),
            json_input.clone(),
            input("b", "[1]", "INT64", 8),
            input("c", "[4]", "BF16", 8),
        ]);
        assert_eq!(check_binary_body(&ok, &[7u8; 40]), Ok(()));
        let strings = bytes_elements_of(&[b"hello", b"", b"w"]);
        let ok_bytes = req(&[input("s", "[3]", "BYTES", strings.len())]);
        assert_eq!(check_binary_body(&ok_bytes, &strings), Ok(()));

        let reason = |json: &str, data: &[u8]| {
            check_binary_body(json, data).map_err(|r| (r.reason, r.pointer.unwrap_or_default()))
        };
        let size_at = |i: usize| format!("/inputs/{i}/parameters/binary_data_size");
        // Declared size not the shape's: FP32 [2,3] is 24 bytes, not 20.
        let short = req(&[input("a", "[2,3]", "FP32", 20)]);
        assert_eq!(
            reason(&short, &[0; 20]),
            Err(("binary_size_mismatch", size_at(0)))
        );
        // Sizes right but the body holds less than they add up to.
        let two = req(&[input("a", "[2]", "FP32", 8), input("b", "[2]", "FP32", 8)]);
        assert_eq!(
            reason(&two, &[0; 12]),
            Err(("binary_size_mismatch", size_at(1)))
        );
        // More bytes than the inputs take.
        assert_eq!(
            reason(&two, &[0; 17]),
            Err(("binary_size_mismatch", String::new()))
        );
        // BYTES: a length prefix that runs past its input's data, or one element too few.
        let bad = bytes_elements_of(&[b"hello", b"xy"]);
        let over = req(&[input("s", "[2]", "BYTES", bad.len() - 1)]);
        assert_eq!(
            reason(&over, &bad[..bad.len() - 1]),
            Err(("binary_size_mismatch", size_at(0)))
        );
        let few = req(&[input("s", "[3]", "BYTES", bad.len())]);
        assert_eq!(
            reason(&few, &bad),
            Err(("binary_size_mismatch", size_at(0)))
        );
        // Shared memory means nothing to a backend on another host.
        let shm = r#"{"inputs":[{"name":"a","shape":[1],"datatype":"UINT8","parameters":{"shared_memory_region":"r","shared_memory_byte_size":1}}]}"#;
        assert_eq!(
            reason(shm, &[]),
            Err(("shared_memory_unsupported", "/inputs/0/parameters".into()))
        );
        // Both `data` and a binary size; a size that isn't a count.
        let both = r#"{"inputs":[{"name":"a","shape":[1],"datatype":"UINT8","data":[1],"parameters":{"binary_data_size":1}}]}"#;
        assert_eq!(
            reason(both, &[1]),
            Err(("binary_and_data", "/inputs/0/data".into()))
        );
        let neg = req(&[input("a", "[1]", "UINT8", 0).replace(":0", ":-1")]);
        assert_eq!(reason(&neg, &[1]), Err(("invalid_binary_size", size_at(0))));
        // An output's `binary_data` flag must be a boolean.
        let flag = r#"{"inputs":[{"name":"a","shape":[1],"datatype":"UINT8","data":[1]}],"outputs":[{"name":"y","parameters":{"binary_data":"yes"}}]}"#;
        assert_eq!(
            reason(flag, &[]),
            Err((
                "invalid_binary_data",
                "/outputs/0/parameters/binary_data".into()
            ))
        );
    }

    #[test]
    fn binary_sizes_need_the_header() {
        let json = r#"{"inputs":[{"name":"a","shape":[1],"datatype":"UINT8","parameters":{"binary_data_size":1}}]}"#;
        let r = check(json).unwrap_err();
        assert_eq!(r.reason, "binary_without_header");
        // A header longer than the body.
        let rules = rules();
        let r = crate::validate::check_json(
            crate::validate::JsonKind::KserveInfer("m", None, Some(json.len() + 1)),
            json.as_bytes(),
            &rules,
            None,
        )
        .unwrap_err();
        assert_eq!((r.status, r.reason), (400, "invalid_header_length"));
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
            "", "bool", "Fp32", "bf16", "FP8", "STRING", "UINT128", "INT4", " FP32", "FP32 ",
        ] {
            assert!(!is_valid_datatype(dt), "{dt:?}");
        }
    }
}
