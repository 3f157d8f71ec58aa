//! One read-only view of a parsed JSON document for every check of stage 7.
//!
//! The gateway parses bodies with simd-json into its *tape* (a flat
//! `Vec<Node>`, no allocation per value, buffers kept per worker) and checks
//! them there; no DOM is built. The checks are written once against [`Json`],
//! which the tape implements, and which simd-json's borrowed DOM implements
//! too, so the benchmark can run the very same checks on what serde_json
//! builds (and tests can compare both).

use simd_json::{BorrowedValue, Node as TapeNode, StaticNode};

/// One JSON value, as the checks see it.
pub enum Node<'a, J: Json<'a>> {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(&'a str),
    Arr(J::Arr),
    Obj(J::Obj),
}

/// A parsed JSON value (a cheap copyable handle).
pub trait Json<'a>: Copy + Sized + 'a {
    type Arr: JsonArr<'a, Self>;
    type Obj: JsonObj<'a, Self>;

    fn node(self) -> Node<'a, Self>;

    fn as_str(self) -> Option<&'a str> {
        match self.node() {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }
    fn as_arr(self) -> Option<Self::Arr> {
        match self.node() {
            Node::Arr(a) => Some(a),
            _ => None,
        }
    }
    fn as_obj(self) -> Option<Self::Obj> {
        match self.node() {
            Node::Obj(o) => Some(o),
            _ => None,
        }
    }
    fn as_u64(self) -> Option<u64> {
        match self.node() {
            Node::Int(n) if n >= 0 => Some(n.unsigned_abs()),
            Node::Uint(n) => Some(n),
            _ => None,
        }
    }
    fn as_bool(self) -> Option<bool> {
        match self.node() {
            Node::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// Any number, as f64.
    fn as_number(self) -> Option<f64> {
        match self.node() {
            Node::Int(n) => Some(n as f64),
            Node::Uint(n) => Some(n as f64),
            Node::Float(x) => Some(x),
            _ => None,
        }
    }
    fn is_null(self) -> bool {
        matches!(self.node(), Node::Null)
    }
}

/// An array's elements, in order.
pub trait JsonArr<'a, J>: Copy {
    type Iter: Iterator<Item = J>;
    fn len(self) -> usize;
    fn iter(self) -> Self::Iter;
    fn is_empty(self) -> bool {
        self.len() == 0
    }
    fn first(self) -> Option<J> {
        self.iter().next()
    }
}

/// An object's members, in document order (duplicates kept: the limits check
/// refuses them).
pub trait JsonObj<'a, J>: Copy {
    type Iter: Iterator<Item = (&'a str, J)>;
    fn len(self) -> usize;
    fn iter(self) -> Self::Iter;
    fn is_empty(self) -> bool {
        self.len() == 0
    }
    /// The first member named `key`.
    fn get(self, key: &str) -> Option<J> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

fn static_node<'a, J: Json<'a>>(s: &StaticNode) -> Node<'a, J> {
    match *s {
        StaticNode::Null => Node::Null,
        StaticNode::Bool(b) => Node::Bool(b),
        StaticNode::I64(n) => Node::Int(n),
        StaticNode::U64(n) => Node::Uint(n),
        StaticNode::F64(x) => Node::Float(x),
    }
}

// --- The tape: what the gateway checks. -------------------------------------

/// A value on simd-json's tape: the slice starting at its node and holding
/// all of its descendants.
#[derive(Clone, Copy)]
pub struct Tape<'a>(&'a [TapeNode<'a>]);

impl<'a> Tape<'a> {
    /// The document's root value. `nodes` is a complete tape (non-empty).
    pub fn root(nodes: &'a [TapeNode<'a>]) -> Tape<'a> {
        Tape(nodes)
    }
}

/// Nodes a value spans on the tape: itself and every descendant (object
/// keys included); a container's `count` leaves out its own node.
fn span(n: &TapeNode<'_>) -> usize {
    match n {
        TapeNode::Array { count, .. } | TapeNode::Object { count, .. } => *count + 1,
        _ => 1,
    }
}

impl<'a> Json<'a> for Tape<'a> {
    type Arr = TapeArr<'a>;
    type Obj = TapeObj<'a>;

    #[inline]
    fn node(self) -> Node<'a, Self> {
        match &self.0[0] {
            TapeNode::String(s) => Node::Str(s),
            TapeNode::Static(s) => static_node(s),
            TapeNode::Array { len, count } => Node::Arr(TapeArr {
                len: *len,
                nodes: &self.0[1..=*count],
            }),
            TapeNode::Object { len, count } => Node::Obj(TapeObj {
                len: *len,
                nodes: &self.0[1..=*count],
            }),
        }
    }
}

#[derive(Clone, Copy)]
pub struct TapeArr<'a> {
    len: usize,
    nodes: &'a [TapeNode<'a>],
}

/// Walks sibling values on the tape.
pub struct TapeIter<'a>(&'a [TapeNode<'a>]);

impl<'a> Iterator for TapeIter<'a> {
    type Item = Tape<'a>;
    #[inline]
    fn next(&mut self) -> Option<Tape<'a>> {
        let first = self.0.first()?;
        let (head, tail) = self.0.split_at(span(first));
        self.0 = tail;
        Some(Tape(head))
    }
}

impl<'a> JsonArr<'a, Tape<'a>> for TapeArr<'a> {
    type Iter = TapeIter<'a>;
    fn len(self) -> usize {
        self.len
    }
    fn iter(self) -> TapeIter<'a> {
        TapeIter(self.nodes)
    }
}

#[derive(Clone, Copy)]
pub struct TapeObj<'a> {
    len: usize,
    nodes: &'a [TapeNode<'a>],
}

pub struct TapeMembers<'a>(&'a [TapeNode<'a>]);

impl<'a> Iterator for TapeMembers<'a> {
    type Item = (&'a str, Tape<'a>);
    #[inline]
    fn next(&mut self) -> Option<(&'a str, Tape<'a>)> {
        let (TapeNode::String(k), rest) = self.0.split_first()? else {
            return None; // a key is always a string on a well-formed tape
        };
        let (value, tail) = rest.split_at(span(rest.first()?));
        self.0 = tail;
        Some((k, Tape(value)))
    }
}

impl<'a> JsonObj<'a, Tape<'a>> for TapeObj<'a> {
    type Iter = TapeMembers<'a>;
    fn len(self) -> usize {
        self.len
    }
    fn iter(self) -> TapeMembers<'a> {
        TapeMembers(self.nodes)
    }
}

// --- simd-json's borrowed DOM: what serde_json builds in the benchmark. -----

impl<'a, 'v: 'a> Json<'a> for &'a BorrowedValue<'v> {
    type Arr = &'a [BorrowedValue<'v>];
    type Obj = &'a DomObject<'v>;

    #[inline]
    fn node(self) -> Node<'a, Self> {
        match self {
            BorrowedValue::Static(s) => static_node(s),
            BorrowedValue::String(s) => Node::Str(s),
            BorrowedValue::Array(a) => Node::Arr(a.as_slice()),
            BorrowedValue::Object(o) => Node::Obj(o.as_ref()),
        }
    }
}

impl<'a, 'v: 'a> JsonArr<'a, &'a BorrowedValue<'v>> for &'a [BorrowedValue<'v>] {
    type Iter = std::slice::Iter<'a, BorrowedValue<'v>>;
    fn len(self) -> usize {
        <[_]>::len(self)
    }
    fn iter(self) -> Self::Iter {
        <[_]>::iter(self)
    }
}

type DomObject<'v> = simd_json::value::borrowed::Object<'v>;

/// An object's members on the DOM.
pub struct DomMembers<'a, 'v>(<&'a DomObject<'v> as IntoIterator>::IntoIter);

impl<'a, 'v: 'a> Iterator for DomMembers<'a, 'v> {
    type Item = (&'a str, &'a BorrowedValue<'v>);
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(k, v)| (k.as_ref(), v))
    }
}

impl<'a, 'v: 'a> JsonObj<'a, &'a BorrowedValue<'v>> for &'a DomObject<'v> {
    type Iter = DomMembers<'a, 'v>;
    fn len(self) -> usize {
        DomObject::len(self)
    }
    fn iter(self) -> DomMembers<'a, 'v> {
        DomMembers(self.into_iter())
    }
    fn get(self, key: &str) -> Option<&'a BorrowedValue<'v>> {
        DomObject::get(self, key)
    }
}

/// The value as serde_json's type, for the jsonschema crate (built only when
/// a schema applies).
pub fn to_serde<'a, J: Json<'a>>(v: J) -> serde_json::Value {
    match v.node() {
        Node::Null => serde_json::Value::Null,
        Node::Bool(b) => serde_json::Value::Bool(b),
        Node::Int(n) => n.into(),
        Node::Uint(n) => n.into(),
        Node::Float(x) => serde_json::Number::from_f64(x)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Node::Str(s) => serde_json::Value::String(s.to_owned()),
        Node::Arr(a) => serde_json::Value::Array(a.iter().map(to_serde).collect()),
        Node::Obj(o) => {
            serde_json::Value::Object(o.iter().map(|(k, v)| (k.to_owned(), to_serde(v))).collect())
        }
    }
}
