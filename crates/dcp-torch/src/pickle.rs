//! A safe reader of Python pickles (protocols 2 to 5), for the pickles torch
//! writes: DCP's `.metadata` and each record's `data.pkl`.
//!
//! It is a pickle virtual machine that builds values and never calls
//! anything. A global (`GLOBAL`, `STACK_GLOBAL`) is looked up in a fixed
//! allow-list ([`ALLOWED`]) of the classes, functions and constants torch
//! DCP uses; any other global is refused with an error naming it
//! (`os.system`, `builtins.eval`, `torch.load`). "Calling" an allowed
//! callable (`REDUCE`) or class (`NEWOBJ`) only records the call as an
//! [`Object`] for the caller to interpret; `collections.OrderedDict()`
//! becomes an empty dict.
//!
//! Bounds, whatever the input:
//! * memory: a length read from the stream (a string's, a frame's) is
//!   checked against the bytes that remain before anything is allocated,
//!   and every value comes from at least one opcode byte, so a pickle of
//!   `n` bytes builds at most about `n` values;
//! * nesting: at most [`MAX_DEPTH`] open `MARK`s, and readers of the result
//!   ([`Pickle::to_json`]) refuse values nested deeper;
//! * memo abuse: a `GET` of an index never `PUT` is refused, and walking the
//!   result visits at most [`Pickle::budget`] container elements in total,
//!   so shared references cannot blow a small pickle up;
//! * truncation: a stream that ends early, or without `STOP`, is refused.
//!
//! Containers live in an arena ([`Node`]) and values refer to them by index,
//! so the mutation semantics of the memo are Python's (a list stored in the
//! memo and filled later is seen filled), cycles are harmless, and dropping
//! a result never recurses. Errors are [`ErrorKind::Corrupt`] (malformed
//! or hostile input) or [`ErrorKind::Unsupported`] (a valid pickle using
//! something outside the list); nothing panics.

use dcp_core::{Error, ErrorKind, Result};
use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

/// The most `MARK`s open at once, and the deepest nesting
/// [`Pickle::to_json`] follows.
pub const MAX_DEPTH: usize = 100;

/// What the pickle may do with an allowed global.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// A class instantiated by `NEWOBJ` (then `BUILD` sets its state): the
    /// dataclasses of `torch.distributed.checkpoint`.
    Class,
    /// A callable applied by `REDUCE` (`torch.Size`, `_rebuild_tensor_v2`).
    Call,
    /// A constant, only referred to (`torch.float32`, `torch.FloatStorage`).
    Constant,
}

/// An allowed global: its module, name, and what the pickle may do with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Global {
    /// The module (`torch`).
    pub module: &'static str,
    /// The name in the module (`Size`).
    pub name: &'static str,
    /// What the pickle may do with it.
    pub usage: Use,
}

impl Global {
    /// `module.name`, as Python spells it.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.module, self.name)
    }

    /// True when this is `module.name`.
    pub fn is(&self, module: &str, name: &str) -> bool {
        self.module == module && self.name == name
    }
}

const DCP_MD: &str = "torch.distributed.checkpoint.metadata";

macro_rules! globals {
    ($($module:expr => $usage:ident [$($name:literal),* $(,)?];)*) => {
        &[$($(Global { module: $module, name: $name, usage: Use::$usage },)*)*]
    };
}

/// Every global a pickle may name; anything else is refused. The
/// dataclasses of DCP's metadata, the callables its metadata and
/// `torch.save` records use, torch's dtypes and legacy storage classes, and
/// paths.
pub const ALLOWED: &[Global] = globals! {
    DCP_MD => Class [
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta",
    ];
    "torch.distributed.checkpoint.filesystem" => Class ["_StorageInfo"];
    DCP_MD => Call ["_MEM_FORMAT_ENCODING"];
    "torch" => Call ["Size"];
    "torch.serialization" => Call ["_get_layout"];
    "torch._utils" => Call ["_rebuild_tensor_v2"];
    "collections" => Call ["OrderedDict"];
    "pathlib" => Call ["PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"];
    "pathlib._local" => Call ["PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"];
    "torch" => Constant [
        "float32", "float", "float64", "double", "float16", "half", "bfloat16",
        "int64", "long", "int32", "int", "int16", "short", "int8", "uint8", "bool",
        "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
        "complex64", "complex128", "cfloat", "cdouble",
        "FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage",
        "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage",
        "UInt16Storage", "UInt32Storage", "UInt64Storage",
        "Float8_e4m3fnStorage", "Float8_e5m2Storage",
        "ComplexFloatStorage", "ComplexDoubleStorage", "UntypedStorage",
        "strided", "sparse_coo", "contiguous_format", "channels_last", "preserve_format",
    ];
};

/// The allowed global `module.name`, or an error naming it.
pub fn lookup(module: &str, name: &str) -> Result<Global> {
    ALLOWED
        .iter()
        .copied()
        .find(|g| g.is(module, name))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                format!(
                    "pickle refers to global {module}.{name}, which is not one torch.distributed.checkpoint uses; refused (nothing is executed)"
                ),
            )
        })
}

/// A value on the pickle machine's stack. Containers are indices into
/// [`Pickle`]'s arena.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer (Python's ints beyond 64 bits are refused).
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(Rc<str>),
    /// Bytes (`bytes`, `bytearray`, protocol-2 `str` of bytes).
    Bytes(Rc<[u8]>),
    /// A tuple: [`Node::Seq`].
    Tuple(usize),
    /// A list: [`Node::Seq`].
    List(usize),
    /// A set or frozenset: [`Node::Seq`].
    Set(usize),
    /// A dict (or `OrderedDict`): [`Node::Dict`].
    Dict(usize),
    /// An instance of an allowed class, or the record of an allowed call:
    /// [`Node::Object`].
    Object(usize),
    /// An allowed global itself.
    Global(Global),
    /// A persistent id (`BINPERSID`), as torch records storages: the id
    /// value, in [`Node::Persistent`].
    Persistent(usize),
}

impl Value {
    /// The value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Set(_) => "set",
            Value::Dict(_) => "dict",
            Value::Object(_) => "object",
            Value::Global(_) => "global",
            Value::Persistent(_) => "persistent id",
        }
    }
}

/// An instance of an allowed class (`NEWOBJ`, then `BUILD`), or an allowed
/// callable applied to its arguments (`REDUCE`), never run.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// The class or callable.
    pub class: Global,
    /// The arguments: a [`Value::Tuple`].
    pub args: Value,
    /// The state `BUILD` gave it, if any.
    pub state: Option<Value>,
}

/// A container of the arena.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// The elements of a tuple, list or set.
    Seq(Vec<Value>),
    /// The entries of a dict, in order.
    Dict(Vec<(Value, Value)>),
    /// An object.
    Object(Object),
    /// A persistent id's value.
    Persistent(Value),
}

/// A loaded pickle: its arena and root value, with accessors that check
/// types and count every element they hand out against [`Pickle::budget`].
#[derive(Debug)]
pub struct Pickle {
    nodes: Vec<Node>,
    root: Value,
    budget: Cell<u64>,
}

fn corrupt(pos: usize, why: impl std::fmt::Display) -> Error {
    Error::corrupt(format!("pickle: at byte {pos}: {why}"))
}

/// Load a pickle of protocol 2 to 5 from `data`. See the module docs for
/// what is refused.
pub fn load(data: &[u8]) -> Result<Pickle> {
    Machine::new(data).run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being run, for messages.
    op_pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    nodes: Vec<Node>,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Machine {
            data,
            pos: 0,
            op_pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            nodes: Vec::new(),
        }
    }

    fn err(&self, why: impl std::fmt::Display) -> Error {
        corrupt(self.op_pos, why)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(self.err(format!("truncated: needs {n} bytes but only {left} remain")));
        }
        let n = n as usize;
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64)?);
        Ok(a)
    }

    fn line(&mut self) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.pos += i + 1;
                Ok(&rest[..i])
            }
            None => Err(self.err("truncated: a text argument has no end of line")),
        }
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        Ok(self.stack.pop().expect("checked non-empty"))
    }

    fn top(&mut self) -> Result<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        Ok(self.stack.last_mut().expect("checked non-empty"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK to pop to"))?;
        Ok(self.stack.split_off(m))
    }

    fn node(&mut self, n: Node) -> usize {
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    fn string(&mut self, n: u64) -> Result<Value> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| self.err("string is not UTF-8"))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn bytes(&mut self, n: u64) -> Result<Value> {
        let b = self.take(n)?;
        Ok(Value::Bytes(Rc::from(b)))
    }

    fn memo_put(&mut self, idx: u32) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<()> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| self.err(format!("memo index {idx} was never stored")))?;
        self.push(v);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        let g = lookup(module, name)
            .map_err(|e| e.context(format!("pickle: at byte {}", self.op_pos)))?;
        self.push(Value::Global(g));
        Ok(())
    }

    fn seq_of(&self, v: &Value) -> Option<usize> {
        match v {
            Value::Tuple(i) | Value::List(i) | Value::Set(i) => Some(*i),
            _ => None,
        }
    }

    fn int(&self, bytes: &[u8]) -> Result<Value> {
        // Little-endian two's complement, as LONG1/LONG4 store it.
        if bytes.is_empty() {
            return Ok(Value::Int(0));
        }
        let neg = bytes[bytes.len() - 1] & 0x80 != 0;
        let fill = if neg { 0xff } else { 0 };
        if bytes.len() > 8 && bytes[8..].iter().any(|&b| b != fill) {
            return Err(self.err(format!(
                "integer of {} bytes does not fit in 64 bits",
                bytes.len()
            )));
        }
        let mut a = [fill; 8];
        let n = bytes.len().min(8);
        a[..n].copy_from_slice(&bytes[..n]);
        let v = i64::from_le_bytes(a);
        if bytes.len() > 8 && ((v < 0) != neg) {
            return Err(self.err("integer does not fit in 64 bits"));
        }
        Ok(Value::Int(v))
    }

    fn run(mut self) -> Result<Pickle> {
        if self.data.len() < 2 || self.data[0] != 0x80 {
            return Err(corrupt(
                0,
                "does not start with a PROTO opcode (protocol 2 to 5)",
            ));
        }
        loop {
            self.op_pos = self.pos;
            let op = self
                .u8()
                .map_err(|_| corrupt(self.pos, "truncated: the stream ends without STOP"))?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if !(2..=5).contains(&p) {
                        return Err(Error::unsupported(format!(
                            "pickle protocol {p} (this reader reads protocols 2 to 5)"
                        )));
                    }
                }
                0x95 => {
                    // FRAME: a hint; its length must fit in what remains.
                    let n = u64::from_le_bytes(self.le::<8>()?);
                    let left = (self.data.len() - self.pos) as u64;
                    if n > left {
                        return Err(self.err(format!(
                            "truncated: frame of {n} bytes but only {left} remain"
                        )));
                    }
                }
                b'.' => {
                    if !self.marks.is_empty() {
                        return Err(self.err("STOP with a MARK still open"));
                    }
                    let root = self.pop()?;
                    if !self.stack.is_empty() {
                        return Err(self.err(format!(
                            "STOP leaves {} values on the stack",
                            self.stack.len()
                        )));
                    }
                    let budget = (self.data.len() as u64).saturating_mul(8).saturating_add(4096);
                    return Ok(Pickle {
                        nodes: self.nodes,
                        root,
                        budget: Cell::new(budget),
                    });
                }
                b'(' => {
                    if self.marks.len() >= MAX_DEPTH {
                        return Err(self.err(format!("nesting deeper than {MAX_DEPTH} MARKs")));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.le::<4>()?);
                    self.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le::<2>()?);
                    self.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.u8()? as u64;
                    let b = self.take(n)?;
                    let v = self.int(b)?;
                    self.push(v);
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.le::<4>()?);
                    if n < 0 {
                        return Err(self.err("LONG4 with a negative length"));
                    }
                    let b = self.take(n as u64)?;
                    let v = self.int(b)?;
                    self.push(v);
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le::<8>()?);
                    self.push(Value::Float(v));
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.le::<4>()?) as u64;
                    let v = self.string(n)?;
                    self.push(v);
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    let v = self.string(n)?;
                    self.push(v);
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.le::<8>()?);
                    let v = self.string(n)?;
                    self.push(v);
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.le::<4>()?);
                    if n < 0 {
                        return Err(self.err("BINSTRING with a negative length"));
                    }
                    let v = self.bytes(n as u64)?;
                    self.push(v);
                }
                b'U' | b'C' => {
                    let n = self.u8()? as u64;
                    let v = self.bytes(n)?;
                    self.push(v);
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.le::<4>()?) as u64;
                    let v = self.bytes(n)?;
                    self.push(v);
                }
                0x8e | 0x96 => {
                    let n = u64::from_le_bytes(self.le::<8>()?);
                    let v = self.bytes(n)?;
                    self.push(v);
                }
                b']' => {
                    let i = self.node(Node::Seq(Vec::new()));
                    self.push(Value::List(i));
                }
                b')' => {
                    let i = self.node(Node::Seq(Vec::new()));
                    self.push(Value::Tuple(i));
                }
                b'}' => {
                    let i = self.node(Node::Dict(Vec::new()));
                    self.push(Value::Dict(i));
                }
                0x8f => {
                    let i = self.node(Node::Seq(Vec::new()));
                    self.push(Value::Set(i));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let i = self.node(Node::Seq(items));
                    self.push(Value::List(i));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let i = self.node(Node::Seq(items));
                    self.push(Value::Tuple(i));
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let i = self.node(Node::Seq(items));
                    self.push(Value::Set(i));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let i = self.node(Node::Seq(items));
                    self.push(Value::Tuple(i));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let entries = self.pairs(items)?;
                    let i = self.node(Node::Dict(entries));
                    self.push(Value::Dict(i));
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?.clone();
                    self.append(&target, vec![v], "APPEND")?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append(&target, items, "APPENDS")?;
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    match target {
                        Value::Set(i) => self.extend_seq(i, items),
                        other => {
                            return Err(self.err(format!("ADDITEMS to a {}", other.type_name())))
                        }
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let entries = self.pairs(items)?;
                    let target = self.top()?.clone();
                    self.set_items(&target, entries)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let (module, name) = match (std::str::from_utf8(module), std::str::from_utf8(name)) {
                        (Ok(m), Ok(n)) => (m, n),
                        _ => return Err(self.err("GLOBAL names are not UTF-8")),
                    };
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(&m, &n)?,
                        _ => return Err(self.err("STACK_GLOBAL of non-strings")),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.push(v);
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.new_obj(cls, args)?;
                    self.push(v);
                }
                0x92 => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let empty = matches!(&kwargs, Value::Dict(i) if matches!(&self.nodes[*i], Node::Dict(d) if d.is_empty()));
                    if !empty {
                        return Err(self.err("NEWOBJ_EX with keyword arguments"));
                    }
                    let v = self.new_obj(cls, args)?;
                    self.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?.clone();
                    match target {
                        Value::Object(i) => match &mut self.nodes[i] {
                            Node::Object(o) if o.state.is_none() => o.state = Some(state),
                            _ => return Err(self.err("BUILD of an object twice")),
                        },
                        other => {
                            return Err(self.err(format!("BUILD of a {}", other.type_name())))
                        }
                    }
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.le::<4>()?);
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len())
                        .map_err(|_| self.err("memo too large"))?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.le::<4>()?);
                    self.memo_get(i)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let i = self.node(Node::Persistent(pid));
                    self.push(Value::Persistent(i));
                }
                other => {
                    return Err(Error::unsupported(format!(
                        "pickle: at byte {}: opcode {} ({:#04x}) is not one torch's pickles use; refused",
                        self.op_pos,
                        opcode_name(other),
                        other
                    )))
                }
            }
        }
    }

    fn pairs(&self, items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
        if items.len() % 2 != 0 {
            return Err(self.err("odd number of values for dict entries"));
        }
        let mut out = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.push((k, v));
        }
        Ok(out)
    }

    fn extend_seq(&mut self, i: usize, items: Vec<Value>) {
        if let Node::Seq(v) = &mut self.nodes[i] {
            v.extend(items);
        }
    }

    fn append(&mut self, target: &Value, items: Vec<Value>, op: &str) -> Result<()> {
        match target {
            Value::List(i) => {
                self.extend_seq(*i, items);
                Ok(())
            }
            other => Err(self.err(format!("{op} to a {}", other.type_name()))),
        }
    }

    fn set_items(&mut self, target: &Value, entries: Vec<(Value, Value)>) -> Result<()> {
        match target {
            Value::Dict(i) => {
                if let Node::Dict(d) = &mut self.nodes[*i] {
                    d.extend(entries);
                }
                Ok(())
            }
            other => Err(self.err(format!("SETITEMS on a {}", other.type_name()))),
        }
    }

    fn reduce(&mut self, callable: Value, args: Value) -> Result<Value> {
        let Value::Global(g) = callable else {
            return Err(self.err(format!(
                "REDUCE of a {} (only allowed callables)",
                callable.type_name()
            )));
        };
        if g.usage != Use::Call {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "pickle: at byte {}: REDUCE calls {}, which may not be called; refused",
                    self.op_pos,
                    g.qualified()
                ),
            ));
        }
        let Value::Tuple(t) = args else {
            return Err(self.err(format!(
                "REDUCE arguments are a {}, not a tuple",
                args.type_name()
            )));
        };
        if g.is("collections", "OrderedDict") {
            let empty = matches!(&self.nodes[t], Node::Seq(v) if v.is_empty());
            if !empty {
                return Err(self.err("OrderedDict called with arguments"));
            }
            let i = self.node(Node::Dict(Vec::new()));
            return Ok(Value::Dict(i));
        }
        let i = self.node(Node::Object(Object {
            class: g,
            args: Value::Tuple(t),
            state: None,
        }));
        Ok(Value::Object(i))
    }

    fn new_obj(&mut self, cls: Value, args: Value) -> Result<Value> {
        let Value::Global(g) = cls else {
            return Err(self.err(format!("NEWOBJ of a {}", cls.type_name())));
        };
        if g.usage != Use::Class {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "pickle: at byte {}: NEWOBJ instantiates {}, which is not an allowed class; refused",
                    self.op_pos,
                    g.qualified()
                ),
            ));
        }
        if self.seq_of(&args).is_none() || !matches!(args, Value::Tuple(_)) {
            return Err(self.err("NEWOBJ arguments are not a tuple"));
        }
        let i = self.node(Node::Object(Object {
            class: g,
            args,
            state: None,
        }));
        Ok(Value::Object(i))
    }
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        b'i' => "INST",
        b'o' => "OBJ",
        b'P' => "PERSID",
        b'p' => "PUT",
        b'g' => "GET",
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'V' => "UNICODE",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

impl Pickle {
    /// The value `STOP` returned.
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// Container elements the accessors may still hand out; each element
    /// handed out costs one, and running out is an error (shared references
    /// blowing a small pickle up). Starts at eight per byte of the pickle.
    pub fn budget(&self) -> u64 {
        self.budget.get()
    }

    fn spend(&self, n: usize) -> Result<()> {
        let left = self.budget.get();
        if (n as u64) > left {
            return Err(Error::corrupt(
                "pickle: its references expand to far more values than its bytes hold (memo abuse); refused",
            ));
        }
        self.budget.set(left - n as u64);
        Ok(())
    }

    fn seq(&self, i: usize) -> Result<&[Value]> {
        match &self.nodes[i] {
            Node::Seq(v) => {
                self.spend(v.len())?;
                Ok(v)
            }
            _ => Err(Error::corrupt("pickle: internal: not a sequence")),
        }
    }

    /// The elements of a tuple.
    pub fn tuple<'p>(&'p self, v: &Value, what: &str) -> Result<&'p [Value]> {
        match v {
            Value::Tuple(i) => self.seq(*i),
            other => Err(expected(what, "a tuple", other)),
        }
    }

    /// The elements of a list.
    pub fn list<'p>(&'p self, v: &Value, what: &str) -> Result<&'p [Value]> {
        match v {
            Value::List(i) => self.seq(*i),
            other => Err(expected(what, "a list", other)),
        }
    }

    /// The elements of a tuple or a list.
    pub fn sequence<'p>(&'p self, v: &Value, what: &str) -> Result<&'p [Value]> {
        match v {
            Value::List(i) | Value::Tuple(i) => self.seq(*i),
            other => Err(expected(what, "a list or tuple", other)),
        }
    }

    /// The entries of a dict.
    pub fn dict<'p>(&'p self, v: &Value, what: &str) -> Result<&'p [(Value, Value)]> {
        match v {
            Value::Dict(i) => match &self.nodes[*i] {
                Node::Dict(d) => {
                    self.spend(d.len())?;
                    Ok(d)
                }
                _ => Err(Error::corrupt("pickle: internal: not a dict")),
            },
            other => Err(expected(what, "a dict", other)),
        }
    }

    /// The object a value is.
    pub fn object<'p>(&'p self, v: &Value, what: &str) -> Result<&'p Object> {
        match v {
            Value::Object(i) => match &self.nodes[*i] {
                Node::Object(o) => Ok(o),
                _ => Err(Error::corrupt("pickle: internal: not an object")),
            },
            other => Err(expected(what, "an object", other)),
        }
    }

    /// The value of a persistent id.
    pub fn persistent<'p>(&'p self, v: &Value, what: &str) -> Result<&'p Value> {
        match v {
            Value::Persistent(i) => match &self.nodes[*i] {
                Node::Persistent(p) => Ok(p),
                _ => Err(Error::corrupt("pickle: internal: not a persistent id")),
            },
            other => Err(expected(what, "a persistent id", other)),
        }
    }

    /// The value of `key` in a dict whose keys are strings, if present.
    pub fn get<'p>(&'p self, dict: &'p [(Value, Value)], key: &str) -> Option<&'p Value> {
        dict.iter()
            .rev()
            .find(|(k, _)| matches!(k, Value::Str(s) if &**s == key))
            .map(|(_, v)| v)
    }

    /// Plain data as JSON: `None`, bools, ints, finite floats, strings,
    /// and lists, tuples (as arrays) and dicts with string keys of those,
    /// nested at most [`MAX_DEPTH`] deep. Anything else (bytes, sets,
    /// objects, tensors, non-finite floats) is refused with an error naming
    /// it.
    pub fn to_json(&self, v: &Value) -> Result<serde_json::Value> {
        self.json_at(v, 0)
    }

    fn json_at(&self, v: &Value, depth: usize) -> Result<serde_json::Value> {
        use serde_json::Value as J;
        if depth > MAX_DEPTH {
            return Err(Error::corrupt(format!(
                "pickle: value nested deeper than {MAX_DEPTH} (or a cycle)"
            )));
        }
        Ok(match v {
            Value::None => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => J::from(
                serde_json::Number::from_f64(*f)
                    .ok_or_else(|| Error::unsupported(format!("the float {f} has no JSON form")))?,
            ),
            Value::Str(s) => J::String(s.to_string()),
            Value::List(_) | Value::Tuple(_) => J::Array(
                self.sequence(v, "value")?
                    .iter()
                    .map(|e| self.json_at(e, depth + 1))
                    .collect::<Result<_>>()?,
            ),
            Value::Dict(_) => {
                let mut m = serde_json::Map::new();
                for (k, e) in self.dict(v, "value")? {
                    let Value::Str(k) = k else {
                        return Err(Error::unsupported(format!(
                            "a dict key of type {} has no JSON form (only str keys)",
                            k.type_name()
                        )));
                    };
                    m.insert(k.to_string(), self.json_at(e, depth + 1)?);
                }
                J::Object(m)
            }
            Value::Object(_) => {
                let o = self.object(v, "value")?;
                return Err(Error::unsupported(format!(
                    "a {} object has no JSON form",
                    o.class.qualified()
                )));
            }
            other => {
                return Err(Error::unsupported(format!(
                    "a {} has no JSON form",
                    other.type_name()
                )))
            }
        })
    }
}

fn expected(what: &str, want: &str, got: &Value) -> Error {
    Error::corrupt(format!(
        "{what}: expected {want}, found a {}",
        got.type_name()
    ))
}

/// Integers of a tuple or list of ints (a `torch.Size`'s), each at least 0.
pub fn uints(p: &Pickle, v: &Value, what: &str) -> Result<Vec<u64>> {
    p.sequence(v, what)?
        .iter()
        .map(|e| match e {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            other => Err(Error::corrupt(format!(
                "{what}: expected non-negative integers, found {other:?}"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol-4 header.
    fn p4(body: &[u8]) -> Vec<u8> {
        let mut v = vec![0x80, 4];
        v.extend_from_slice(body);
        v
    }

    fn kind_and_msg(data: &[u8]) -> (ErrorKind, String) {
        let e = load(data).unwrap_err();
        (e.kind(), e.message().to_string())
    }

    #[test]
    fn plain_values_load() {
        // [1, -2, 3.5, "hi", None, True, {"k": (1,)}]
        let mut b = p4(b"](K\x01J\xfe\xff\xff\xffG\x40\x0c\x00\x00\x00\x00\x00\x00\x8c\x02hiN\x88}\x8c\x01kK\x01\x85se.");
        let p = load(&b).unwrap();
        let j = p.to_json(p.root()).unwrap();
        assert_eq!(
            j,
            serde_json::json!([1, -2, 3.5, "hi", null, true, {"k": [1]}])
        );
        // The memo shares the list: filled after the PUT, seen filled.
        b = p4(b"]\x94(K\x01K\x02eh\x00\x86.");
        let p = load(&b).unwrap();
        assert_eq!(
            p.to_json(p.root()).unwrap(),
            serde_json::json!([[1, 2], [1, 2]])
        );
    }

    #[test]
    fn long_ints() {
        let p = load(&p4(b"\x8a\x02\xff\x7f.")).unwrap();
        assert_eq!(p.root(), &Value::Int(0x7fff));
        let p = load(&p4(b"\x8a\x01\xff.")).unwrap();
        assert_eq!(p.root(), &Value::Int(-1));
        let p = load(&p4(b"\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\xff.")).unwrap();
        assert_eq!(p.root(), &Value::Int(-1));
        // 2^63: nine bytes whose low eight look negative.
        let (k, _) = kind_and_msg(&p4(b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00."));
        assert_eq!(k, ErrorKind::Corrupt);
        let (k, m) = kind_and_msg(&p4(b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01."));
        assert_eq!(k, ErrorKind::Corrupt);
        assert!(m.contains("64 bits"), "{m}");
    }

    #[test]
    fn unknown_globals_are_refused_by_name() {
        for (body, name) in [
            (&b"\x8c\x02os\x8c\x06system\x93."[..], "os.system"),
            (&b"\x8c\x08builtins\x8c\x04eval\x93."[..], "builtins.eval"),
            (&b"\x8c\x05torch\x8c\x04load\x93."[..], "torch.load"),
            (&b"cposix\nsystem\n."[..], "posix.system"),
            (&b"c__builtin__\nexec\n."[..], "__builtin__.exec"),
        ] {
            let (k, m) = kind_and_msg(&p4(body));
            assert_eq!(k, ErrorKind::Unsupported, "{m}");
            assert!(m.contains(name) && m.contains("not one torch"), "{m}");
        }
    }

    #[test]
    fn reduce_only_of_allowed_callables() {
        // A dtype is a constant: calling it is refused.
        let (k, m) = kind_and_msg(&p4(b"\x8c\x05torch\x8c\x07float32\x93)R."));
        assert_eq!(k, ErrorKind::Unsupported);
        assert!(m.contains("REDUCE calls torch.float32"), "{m}");
        // A class is built with NEWOBJ, not called.
        let (k, m) = kind_and_msg(&p4(
            b"\x8c%torch.distributed.checkpoint.metadata\x8c\x08Metadata\x93)R.",
        ));
        assert_eq!(k, ErrorKind::Unsupported);
        assert!(m.contains("Metadata"), "{m}");
        // REDUCE of a non-global (a string) is refused.
        let (k, m) = kind_and_msg(&p4(b"\x8c\x01x)R."));
        assert_eq!(k, ErrorKind::Corrupt);
        assert!(m.contains("REDUCE of a str"), "{m}");
        // NEWOBJ of a callable is refused.
        let (k, m) = kind_and_msg(&p4(b"\x8c\x05torch\x8c\x04Size\x93)\x81."));
        assert_eq!(k, ErrorKind::Unsupported);
        assert!(m.contains("NEWOBJ instantiates torch.Size"), "{m}");
        // An allowed call is recorded, not run.
        let p = load(&p4(b"\x8c\x05torch\x8c\x04Size\x93K\x02K\x03\x86\x85R.")).unwrap();
        let o = p.object(p.root(), "x").unwrap();
        assert!(o.class.is("torch", "Size"));
        let args = p.tuple(&o.args, "args").unwrap();
        assert_eq!(uints(&p, &args[0], "size").unwrap(), vec![2, 3]);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut body = vec![b'('; MAX_DEPTH + 1];
        body.push(b'.');
        let (k, m) = kind_and_msg(&p4(&body));
        assert_eq!(k, ErrorKind::Corrupt);
        assert!(m.contains("nesting deeper"), "{m}");
        // Nesting without MARKs ((((x,),),),...) loads, but is refused when read.
        let mut body = b"K\x01".to_vec();
        body.extend(std::iter::repeat_n(0x85u8, 10_000));
        body.push(b'.');
        let p = load(&p4(&body)).unwrap();
        let e = p.to_json(p.root()).unwrap_err();
        assert!(e.message().contains("nested deeper"), "{e}");
        // A list containing itself: refused when read, no hang.
        let p = load(&p4(b"]\x94h\x00a.")).unwrap();
        assert!(p.to_json(p.root()).is_err());
    }

    #[test]
    fn huge_claimed_lengths_allocate_nothing() {
        for body in [
            &b"\x8d\xff\xff\xff\xff\xff\xff\xff\x7fabc"[..],
            &b"X\xff\xff\xff\xffabc"[..],
            &b"\x8e\xff\xff\xff\xff\xff\xff\xff\xff"[..],
            &b"\x95\xff\xff\xff\xff\xff\xff\xff\x7fN."[..],
            &b"\x8b\xff\xff\xff\x7f\x00"[..],
            &b"T\xff\xff\xff\x7f"[..],
        ] {
            let (k, m) = kind_and_msg(&p4(body));
            assert_eq!(k, ErrorKind::Corrupt, "{m}");
            assert!(m.contains("truncated") && m.contains("remain"), "{m}");
        }
    }

    #[test]
    fn truncated_streams_are_refused() {
        let full = p4(b"](K\x01K\x02e.");
        load(&full).unwrap();
        for n in 0..full.len() {
            let e = load(&full[..n]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{n}: {e}");
        }
        let (_, m) = kind_and_msg(&p4(b"K\x01"));
        assert!(m.contains("without STOP"), "{m}");
    }

    #[test]
    fn memo_abuse_is_refused() {
        // GET of an index never stored.
        let (k, m) = kind_and_msg(&p4(b"j\xff\xff\xff\xff."));
        assert_eq!(k, ErrorKind::Corrupt);
        assert!(m.contains("never stored"), "{m}");
        // A "billion laughs": each list holds the previous one ten times;
        // 40 levels of a few bytes each would expand to 10^40 values.
        let mut body = b"]\x940".to_vec(); // memo 0: [], popped
        for i in 0..40u8 {
            body.extend_from_slice(b"](");
            for _ in 0..10 {
                body.extend_from_slice(&[b'h', i]);
            }
            body.extend_from_slice(b"e\x940"); // memo i + 1, popped
        }
        body.extend_from_slice(b"h\x28.");
        let p = load(&p4(&body)).unwrap();
        let e = p.to_json(p.root()).unwrap_err();
        assert!(e.message().contains("memo abuse"), "{e}");
    }

    #[test]
    fn stack_misuse_is_an_error() {
        for body in [
            &b"."[..],
            b"a.",
            b"1.",
            b"K\x01K\x02.",
            b"(K\x01.",
            b"K\x01b.",
            b"K\x01}s.",
        ] {
            let e = load(&p4(body)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{body:?}: {e}");
        }
        // Unknown and protocol-0 opcodes.
        let (k, m) = kind_and_msg(&p4(b"I1\n."));
        assert_eq!(k, ErrorKind::Unsupported);
        assert!(m.contains("INT"), "{m}");
        let (k, _) = kind_and_msg(b"\x80\x06N.");
        assert_eq!(k, ErrorKind::Unsupported);
        let (k, _) = kind_and_msg(b"N.");
        assert_eq!(k, ErrorKind::Corrupt);
    }
}
