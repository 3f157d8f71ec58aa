//! KServe v2 / Open Inference Protocol over gRPC
//! (`inference.GRPCInferenceService`, `grpc_predict_v2.proto`): the calls
//! that name a model (`ModelInfer`, `ModelReady`, `ModelMetadata`) have
//! their message decoded once (prost's derived decoder, the
//! message types below transcribed field by field from the proto), its
//! model resolved against the catalogue (it then feeds model routing, authz
//! and rate limits like a REST request's) and its tensors checked as the
//! REST ones are: a known datatype, a shape of non-negative dims, and
//! contents — typed (`contents`) or raw (`raw_input_contents`) — that hold
//! exactly the shape's element count. Failures are INVALID_ARGUMENT with
//! the field's path (NOT_FOUND for an unknown model).

use std::collections::HashMap;

use super::kserve::Dt;
use super::{pointer, Rejection, Seg};
use crate::catalog::{Catalog, Model, Version, VersionReq};

/// The calls that name a model, by gRPC path: their message is read whole
/// and checked, and its model feeds routing, authz and rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Infer,
    Ready,
    Metadata,
}

impl Call {
    pub fn of(path: &str) -> Option<Call> {
        Some(
            match path.strip_prefix("/inference.GRPCInferenceService/")? {
                "ModelInfer" => Call::Infer,
                "ModelReady" => Call::Ready,
                "ModelMetadata" => Call::Metadata,
                _ => return None,
            },
        )
    }
}

/// `ModelReadyRequest` and `ModelMetadataRequest` (the same two fields).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelRef {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InferParameter {
    #[prost(oneof = "ParameterChoice", tags = "1, 2, 3, 4, 5")]
    pub parameter_choice: Option<ParameterChoice>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ParameterChoice {
    #[prost(bool, tag = "1")]
    BoolParam(bool),
    #[prost(int64, tag = "2")]
    Int64Param(i64),
    #[prost(string, tag = "3")]
    StringParam(String),
    #[prost(double, tag = "4")]
    DoubleParam(f64),
    #[prost(uint64, tag = "5")]
    Uint64Param(u64),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InferTensorContents {
    #[prost(bool, repeated, tag = "1")]
    pub bool_contents: Vec<bool>,
    #[prost(int32, repeated, tag = "2")]
    pub int_contents: Vec<i32>,
    #[prost(int64, repeated, tag = "3")]
    pub int64_contents: Vec<i64>,
    #[prost(uint32, repeated, tag = "4")]
    pub uint_contents: Vec<u32>,
    #[prost(uint64, repeated, tag = "5")]
    pub uint64_contents: Vec<u64>,
    #[prost(float, repeated, tag = "6")]
    pub fp32_contents: Vec<f32>,
    #[prost(double, repeated, tag = "7")]
    pub fp64_contents: Vec<f64>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub bytes_contents: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InferInputTensor {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub datatype: String,
    #[prost(int64, repeated, tag = "3")]
    pub shape: Vec<i64>,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: HashMap<String, InferParameter>,
    #[prost(message, optional, tag = "5")]
    pub contents: Option<InferTensorContents>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InferRequestedOutputTensor {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(map = "string, message", tag = "2")]
    pub parameters: HashMap<String, InferParameter>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelInferRequest {
    #[prost(string, tag = "1")]
    pub model_name: String,
    #[prost(string, tag = "2")]
    pub model_version: String,
    #[prost(string, tag = "3")]
    pub id: String,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: HashMap<String, InferParameter>,
    #[prost(message, repeated, tag = "5")]
    pub inputs: Vec<InferInputTensor>,
    #[prost(message, repeated, tag = "6")]
    pub outputs: Vec<InferRequestedOutputTensor>,
    #[prost(bytes = "vec", repeated, tag = "7")]
    pub raw_input_contents: Vec<Vec<u8>>,
}

/// Largest dim accepted (as the REST check).
const MAX_DIM: i64 = 1 << 32;

fn bad(at: String, reason: &'static str, message: &'static str) -> Rejection {
    Rejection::at(at, reason, message)
}

fn at_input(i: usize, field: &'static str) -> String {
    pointer([Seg::Key("inputs"), Seg::Index(i), Seg::Key(field)])
}

/// Check the body of a call that names a model: exactly one uncompressed
/// gRPC message of the call's type, its model in the catalogue and, for
/// `ModelInfer`, its tensors. The resolved model and version.
pub fn check<'c>(
    call: Call,
    body: &[u8],
    catalog: &'c Catalog,
) -> Result<(&'c std::sync::Arc<Model>, &'c Version), Rejection> {
    let msg = match body {
        [0, a, b, c, d, rest @ ..]
            if u32::from_be_bytes([*a, *b, *c, *d]) as usize == rest.len() =>
        {
            rest
        }
        [1, ..] => {
            return Err(Rejection::new(
                400,
                "compressed_message",
                "calls that name a model are checked: send them uncompressed",
            ))
        }
        _ => {
            return Err(Rejection::new(
                400,
                "invalid_grpc_framing",
                "the body must be exactly one length-prefixed gRPC message",
            ))
        }
    };
    let invalid = || {
        Rejection::new(
            400,
            "invalid_message",
            "the message is not the call's request type",
        )
    };
    let (name, version, infer) = match call {
        Call::Infer => {
            let r = <ModelInferRequest as prost::Message>::decode(msg).map_err(|_| invalid())?;
            (r.model_name.clone(), r.model_version.clone(), Some(r))
        }
        Call::Ready | Call::Metadata => {
            let r = <ModelRef as prost::Message>::decode(msg).map_err(|_| invalid())?;
            (r.name, r.version, None)
        }
    };
    if name.is_empty() {
        return Err(bad(
            "/model_name".into(),
            "missing_model",
            "the model's name is required",
        ));
    }
    let req = if version.is_empty() {
        Some(VersionReq::Latest)
    } else {
        VersionReq::parse(&version)
    };
    let resolved = req
        .ok_or(crate::catalog::Unresolved::BadVersion)
        .and_then(|v| catalog.resolve(&name, &v))
        .map_err(|u| {
            Rejection::new(
                404,
                u.reason(),
                "the model or version does not exist or is not available",
            )
        })?;
    if let Some(r) = infer {
        check_inputs(&r)?;
    }
    Ok(resolved)
}

/// The model a call's message names, if it decodes (to label a refusal).
pub fn model_name(call: Call, body: &[u8]) -> Option<String> {
    let msg = body.get(5..)?;
    match call {
        Call::Infer => <ModelInferRequest as prost::Message>::decode(msg)
            .ok()
            .map(|r| r.model_name),
        Call::Ready | Call::Metadata => <ModelRef as prost::Message>::decode(msg)
            .ok()
            .map(|r| r.name),
    }
    .filter(|n| !n.is_empty())
}

fn check_inputs(req: &ModelInferRequest) -> Result<(), Rejection> {
    if req.inputs.is_empty() {
        return Err(bad(
            "/inputs".into(),
            "missing_inputs",
            "a ModelInferRequest needs `inputs`",
        ));
    }
    let raw = !req.raw_input_contents.is_empty();
    if raw && req.raw_input_contents.len() != req.inputs.len() {
        return Err(bad(
            "/raw_input_contents".into(),
            "raw_contents_mismatch",
            "`raw_input_contents` must hold one entry per input, in input order",
        ));
    }
    let mut names = std::collections::HashSet::new();
    for (i, t) in req.inputs.iter().enumerate() {
        if t.name.is_empty() {
            return Err(bad(
                at_input(i, "name"),
                "invalid_input_name",
                "each input needs a `name`",
            ));
        }
        if !names.insert(t.name.as_str()) {
            return Err(bad(
                at_input(i, "name"),
                "duplicate_input_name",
                "input names must be unique",
            ));
        }
        let Some(dt) = Dt::parse(&t.datatype) else {
            return Err(bad(
                at_input(i, "datatype"),
                "invalid_datatype",
                "`datatype` must be one of BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64, BYTES, BF16",
            ));
        };
        let mut total: u64 = 1;
        for d in &t.shape {
            if !(0..=MAX_DIM).contains(d) {
                return Err(bad(
                    at_input(i, "shape"),
                    "invalid_shape",
                    "each dim of `shape` must be a non-negative integer at most 2^32",
                ));
            }
            total = total.checked_mul(*d as u64).ok_or_else(|| {
                bad(
                    at_input(i, "shape"),
                    "invalid_shape",
                    "the `shape`'s element count overflows",
                )
            })?;
        }
        if raw {
            if t.contents.is_some() {
                return Err(bad(
                    at_input(i, "contents"),
                    "contents_and_raw",
                    "an input's data is either `contents` or `raw_input_contents`, not both",
                ));
            }
            check_raw(i, dt, total, &req.raw_input_contents[i])?;
        } else {
            check_typed(i, dt, total, t.contents.as_ref())?;
        }
    }
    Ok(())
}

/// `raw_input_contents[i]`: the shape's element count × the datatype's
/// size bytes, or for BYTES that many 4-byte little-endian lengths each
/// followed by its bytes.
fn check_raw(i: usize, dt: Dt, total: u64, data: &[u8]) -> Result<(), Rejection> {
    let fits = match dt.size() {
        Some(each) => total.checked_mul(each) == Some(data.len() as u64),
        None => super::kserve::bytes_elements(data) == Some(total),
    };
    if fits {
        return Ok(());
    }
    Err(bad(
        pointer([Seg::Key("raw_input_contents"), Seg::Index(i)]),
        "shape_mismatch",
        "`raw_input_contents` must be exactly the `shape`'s element count times the datatype's size",
    ))
}

/// `contents`: the field of the datatype (FP16 and BF16 have none: raw
/// only) holding exactly the shape's element count, each value in range.
fn check_typed(
    i: usize,
    dt: Dt,
    total: u64,
    c: Option<&InferTensorContents>,
) -> Result<(), Rejection> {
    let at = || at_input(i, "contents");
    let Some(c) = c else {
        return Err(bad(
            at(),
            "missing_data",
            "each input needs `contents` or `raw_input_contents`",
        ));
    };
    let in_range = |lo: i64, hi: i64| {
        c.int_contents
            .iter()
            .all(|&v| (lo..=hi).contains(&i64::from(v)))
    };
    let (n, ok) = match dt {
        Dt::Bool => (c.bool_contents.len(), true),
        Dt::I8 => (c.int_contents.len(), in_range(-128, 127)),
        Dt::I16 => (c.int_contents.len(), in_range(-32768, 32767)),
        Dt::I32 => (c.int_contents.len(), true),
        Dt::I64 => (c.int64_contents.len(), true),
        Dt::U8 => (
            c.uint_contents.len(),
            c.uint_contents.iter().all(|&v| v <= 255),
        ),
        Dt::U16 => (
            c.uint_contents.len(),
            c.uint_contents.iter().all(|&v| v <= 65535),
        ),
        Dt::U32 => (c.uint_contents.len(), true),
        Dt::U64 => (c.uint64_contents.len(), true),
        Dt::F32 => (
            c.fp32_contents.len(),
            c.fp32_contents.iter().all(|v| v.is_finite()),
        ),
        Dt::F64 => (
            c.fp64_contents.len(),
            c.fp64_contents.iter().all(|v| v.is_finite()),
        ),
        Dt::Bytes => (c.bytes_contents.len(), true),
        Dt::F16 | Dt::Bf16 => {
            return Err(bad(
                at(),
                "datatype_mismatch",
                "FP16 and BF16 tensors are sent in `raw_input_contents`",
            ))
        }
    };
    if !ok {
        return Err(bad(at(), "datatype_mismatch", dt.rule()));
    }
    if n as u64 != total {
        return Err(bad(
            at(),
            "shape_mismatch",
            "`contents` must hold exactly the `shape`'s element count in the datatype's field",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn catalog() -> Catalog {
        Catalog::new(vec![crate::catalog::Model {
            name: "simple".into(),
            versions: vec![Version::parse("1").unwrap()],
            enabled: true,
            limits: Default::default(),
            schema: None,
        }])
    }

    fn framed(r: &ModelInferRequest) -> Vec<u8> {
        let m = r.encode_to_vec();
        let mut b = vec![0];
        b.extend_from_slice(&(m.len() as u32).to_be_bytes());
        b.extend_from_slice(&m);
        b
    }

    fn input(
        name: &str,
        dt: &str,
        shape: &[i64],
        contents: Option<InferTensorContents>,
    ) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: dt.into(),
            shape: shape.to_vec(),
            parameters: HashMap::new(),
            contents,
        }
    }

    fn req(inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "simple".into(),
            inputs,
            raw_input_contents: raw,
            ..Default::default()
        }
    }

    fn reason(r: &ModelInferRequest) -> Result<(), (&'static str, Option<String>)> {
        check(Call::Infer, &framed(r), &catalog())
            .map(|_| ())
            .map_err(|e| (e.reason, e.pointer))
    }

    #[test]
    fn typed_and_raw_tensors_are_checked_against_shape_and_datatype() {
        let ints = |v: Vec<i32>| {
            Some(InferTensorContents {
                int_contents: v,
                ..Default::default()
            })
        };
        assert_eq!(
            reason(&req(
                vec![input("a", "INT32", &[1, 4], ints(vec![1, 2, 3, 4]))],
                vec![]
            )),
            Ok(())
        );
        assert_eq!(
            reason(&req(
                vec![input("a", "INT32", &[1, 5], ints(vec![1, 2, 3, 4]))],
                vec![]
            )),
            Err(("shape_mismatch", Some("/inputs/0/contents".into())))
        );
        assert_eq!(
            reason(&req(
                vec![input("a", "INT8", &[2], ints(vec![1, 300]))],
                vec![]
            ))
            .unwrap_err()
            .0,
            "datatype_mismatch"
        );
        assert_eq!(
            reason(&req(vec![input("a", "FLOAT", &[1], None)], vec![])).unwrap_err(),
            ("invalid_datatype", Some("/inputs/0/datatype".into()))
        );
        assert_eq!(
            reason(&req(vec![input("a", "INT32", &[-1], None)], vec![]))
                .unwrap_err()
                .0,
            "invalid_shape"
        );
        // Raw: 2 × 3 FP32 = 24 bytes.
        assert_eq!(
            reason(&req(
                vec![input("a", "FP32", &[2, 3], None)],
                vec![vec![0; 24]]
            )),
            Ok(())
        );
        assert_eq!(
            reason(&req(
                vec![input("a", "FP32", &[2, 3], None)],
                vec![vec![0; 20]]
            )),
            Err(("shape_mismatch", Some("/raw_input_contents/0".into())))
        );
        // BYTES raw: length-prefixed elements.
        let mut two = 3u32.to_le_bytes().to_vec();
        two.extend_from_slice(b"abc");
        two.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            reason(&req(
                vec![input("s", "BYTES", &[2], None)],
                vec![two.clone()]
            )),
            Ok(())
        );
        assert_eq!(
            reason(&req(vec![input("s", "BYTES", &[3], None)], vec![two]))
                .unwrap_err()
                .0,
            "shape_mismatch"
        );
        // One raw entry per input.
        assert_eq!(
            reason(&req(
                vec![
                    input("a", "UINT8", &[1], None),
                    input("b", "UINT8", &[1], None)
                ],
                vec![vec![1]]
            ))
            .unwrap_err()
            .0,
            "raw_contents_mismatch"
        );
    }

    #[test]
    fn framing_model_and_message_are_checked() {
        let ok = req(
            vec![input(
                "a",
                "BOOL",
                &[1],
                Some(InferTensorContents {
                    bool_contents: vec![true],
                    ..Default::default()
                }),
            )],
            vec![],
        );
        let cat = catalog();
        let (m, _) = check(Call::Infer, &framed(&ok), &cat).unwrap();
        assert_eq!(m.name, "simple");
        let mut unknown = ok.clone();
        unknown.model_name = "nope".into();
        assert_eq!(
            check(Call::Infer, &framed(&unknown), &catalog())
                .unwrap_err()
                .status,
            404
        );
        let mut body = framed(&ok);
        body[0] = 1;
        assert_eq!(
            check(Call::Infer, &body, &catalog()).unwrap_err().reason,
            "compressed_message"
        );
        let body = framed(&ok);
        assert_eq!(
            check(Call::Infer, &body[..body.len() - 1], &catalog())
                .unwrap_err()
                .reason,
            "invalid_grpc_framing"
        );
        assert_eq!(
            check(Call::Infer, &[0, 0, 0, 0, 2, 0xff, 0xff], &catalog())
                .unwrap_err()
                .reason,
            "invalid_message"
        );
        // ModelReady / ModelMetadata: the model named in the message.
        let r = ModelRef {
            name: "simple".into(),
            version: String::new(),
        }
        .encode_to_vec();
        let mut b = vec![0];
        b.extend_from_slice(&(r.len() as u32).to_be_bytes());
        b.extend_from_slice(&r);
        assert_eq!(check(Call::Ready, &b, &cat).unwrap().0.name, "simple");
        let r = ModelRef {
            name: "other".into(),
            version: String::new(),
        }
        .encode_to_vec();
        let mut b = vec![0];
        b.extend_from_slice(&(r.len() as u32).to_be_bytes());
        b.extend_from_slice(&r);
        assert_eq!(check(Call::Metadata, &b, &cat).unwrap_err().status, 404);
    }
}
