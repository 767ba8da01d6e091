//! A restricted unpickler for PyTorch checkpoints.
//!
//! # Why restricted
//!
//! A pickle is a program for a small stack machine. Two of its instructions make it dangerous:
//! `GLOBAL`/`STACK_GLOBAL` (`c`, `\x93`) import any attribute of any module, and `REDUCE`
//! (`R`), `NEWOBJ` (`\x81`), `INST`/`OBJ` (`i`/`o`) and `BUILD` (`b`) call what was imported.
//! `cos\nsystem\n(S'rm -rf ~'\ntR.` is a complete pickle that runs a shell command in Python.
//!
//! This unpickler never imports or calls anything. It interprets the whole opcode set of
//! protocols 0–5 as data operations and resolves globals against an allow-list of the few
//! callables `torch.save` uses to describe a state dict, which it *emulates*:
//!
//! | global | emulation |
//! |---|---|
//! | `collections.OrderedDict` | an empty dict |
//! | `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor` / `_rebuild_tensor_v3` | a tensor view `(storage, offset, size, stride)` |
//! | `torch._utils._rebuild_parameter` / `_rebuild_parameter_with_state` | its first argument |
//! | `torch._tensor._rebuild_from_type_v2` | calls the (allow-listed) function it wraps |
//! | `torch.{Double,Float,Half,BFloat16,Long,Int,Short,Char,Byte,Bool}Storage` | a storage type, used in persistent ids |
//! | `torch.Size` | a tuple |
//! | `builtins.set` / `frozenset` (and `__builtin__.*`) | a list |
//! | `_codecs.encode` | bytes (how protocol 2 pickles `bytes`) |
//!
//! Every other global becomes an inert [`Value::Opaque`] placeholder carrying its name;
//! calling a placeholder (`REDUCE`, `NEWOBJ`, `OBJ`, `INST`) gives another placeholder, and
//! `BUILD`, `SETITEM(S)`, `APPEND(S)` on a placeholder are ignored. Nothing is ever executed, so
//! a malicious file can at worst produce placeholders — and the torch loader refuses with
//! [`CheckpointError::Unsafe`](crate::CheckpointError::Unsafe) as soon as a placeholder stands
//! where a tensor (or the state dict) is required.
//!
//! Persistent ids (`BINPERSID`) are how torch refers to storages outside the pickle:
//! `('storage', torch.FloatStorage, '<key>', '<location>', numel)`; the bytes live in the zip
//! entry `<archive>/data/<key>` (see [`crate::torchzip`]).
//!
//! # Robustness
//!
//! The interpreter is a loop over the input with no recursion over data, so deeply nested or
//! cyclic structures cannot overflow the stack; every length is checked against the remaining
//! input before anything is allocated, memo indices use a map (no huge allocations from a large
//! `LONG_BINPUT`), and `DUP`/`BINGET` are O(1). All containers (tuples, lists, dicts) live in
//! arenas and values refer to them by index, so a value never owns another value: cyclic
//! containers are fine and dropping a million-deep nested tuple cannot overflow the stack.
//! The work emulated calls may do copying containers is bounded by the input size. Malformed
//! input yields an error message, never a panic.

use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

use crate::FileDType;

/// A callable (or type) the unpickler knows how to emulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    OrderedDict,
    RebuildTensor,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    Storage(FileDType),
    TorchSize,
    Set,
    CodecsEncode,
}

/// A torch storage referenced by a persistent id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRef {
    pub dtype: FileDType,
    /// Name of the zip entry under `<archive>/data/`.
    pub key: String,
    /// Device it was saved from (`"cpu"`, `"cuda:0"`); informational.
    pub location: String,
    /// Number of elements of `dtype`.
    pub numel: u64,
}

/// A tensor view on a storage, as `_rebuild_tensor_v2` describes it (all in elements).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    pub storage: Rc<StorageRef>,
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

/// A value on the unpickler's stack.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    /// Index into [`Unpickled::tuples`].
    Tuple(usize),
    /// Index into [`Unpickled::lists`] (also used for sets).
    List(usize),
    /// Index into [`Unpickled::dicts`].
    Dict(usize),
    /// An allow-listed global.
    Global(Builtin),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorDesc>),
    /// Anything this unpickler does not build: a non-allow-listed global, the result of calling
    /// one, an integer too large for i64, ... Carries a description for error messages.
    Opaque(Rc<str>),
}

impl Value {
    /// A short description of the value's kind, for error messages.
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) => "an int".into(),
            Value::Float(_) => "a float".into(),
            Value::Str(_) => "a string".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(b) => format!("the global {b:?}"),
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
            Value::Opaque(d) => format!("an opaque `{d}` object"),
        }
    }
}

/// The result of unpickling: the top object plus the container arenas it refers into.
#[derive(Debug, Default)]
pub struct Unpickled {
    pub top: Option<Value>,
    pub tuples: Vec<Rc<[Value]>>,
    pub lists: Vec<Vec<Value>>,
    pub dicts: Vec<Vec<(Value, Value)>>,
}

impl Unpickled {
    pub fn top(&self) -> &Value {
        self.top.as_ref().unwrap_or(&Value::None)
    }
    /// The items of tuple `v` (empty for non-tuples).
    pub fn tuple(&self, v: &Value) -> &[Value] {
        match v {
            Value::Tuple(i) => self.tuples.get(*i).map(|t| &t[..]).unwrap_or_default(),
            _ => &[],
        }
    }
    /// The entries of dict `v` (empty for non-dicts).
    pub fn dict(&self, v: &Value) -> &[(Value, Value)] {
        match v {
            Value::Dict(i) => self.dicts.get(*i).map(Vec::as_slice).unwrap_or_default(),
            _ => &[],
        }
    }
    /// Looks up a string key in dict `v` (the last occurrence wins, as in Python).
    pub fn get<'a>(&'a self, v: &Value, key: &str) -> Option<&'a Value> {
        self.dict(v).iter().rev().find(|(k, _)| matches!(k, Value::Str(s) if &**s == key)).map(|(_, v)| v)
    }
}

/// Why unpickling failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleError {
    /// Byte offset of the opcode that failed.
    pub pos: usize,
    pub msg: String,
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pickle error at byte {}: {}", self.pos, self.msg)
    }
}

impl std::error::Error for PickleError {}

type R<T> = std::result::Result<T, String>;

/// Resolves `module.name` against the allow-list.
fn resolve_global(module: &str, name: &str) -> Value {
    let b = match (module, name) {
        ("collections", "OrderedDict") => Some(Builtin::OrderedDict),
        ("torch._utils", "_rebuild_tensor") => Some(Builtin::RebuildTensor),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Builtin::RebuildTensorV2),
        ("torch._utils", "_rebuild_tensor_v3") => Some(Builtin::RebuildTensorV3),
        ("torch._utils", "_rebuild_parameter") => Some(Builtin::RebuildParameter),
        ("torch._utils", "_rebuild_parameter_with_state") => Some(Builtin::RebuildParameterWithState),
        ("torch._tensor", "_rebuild_from_type_v2") => Some(Builtin::RebuildFromTypeV2),
        ("torch", "Size") => Some(Builtin::TorchSize),
        ("builtins" | "__builtin__", "set" | "frozenset") => Some(Builtin::Set),
        ("_codecs", "encode") => Some(Builtin::CodecsEncode),
        ("torch" | "torch.cuda", storage) => storage_dtype(storage).map(Builtin::Storage),
        _ => None,
    };
    match b {
        Some(b) => Value::Global(b),
        None => Value::Opaque(format!("{module}.{name}").into()),
    }
}

fn storage_dtype(name: &str) -> Option<FileDType> {
    Some(match name {
        "DoubleStorage" => FileDType::F64,
        "FloatStorage" => FileDType::F32,
        "HalfStorage" => FileDType::F16,
        "BFloat16Storage" => FileDType::BF16,
        "LongStorage" => FileDType::I64,
        "IntStorage" => FileDType::I32,
        "ShortStorage" => FileDType::I16,
        "CharStorage" => FileDType::I8,
        "ByteStorage" => FileDType::U8,
        "BoolStorage" => FileDType::Bool,
        _ => return None,
    })
}

/// Largest number of opcodes executed (a bound on work; real state dicts use far fewer).
const MAX_OPS: usize = 1 << 30;
/// Values emulated calls may copy per input byte (plus 1M): real files copy almost nothing, and
/// the bound keeps a crafted pickle from making us do quadratic work.
const COPY_LIMIT_PER_BYTE: usize = 64;
/// Largest nesting of `_rebuild_from_type_v2` emulation.
const MAX_CALL_DEPTH: usize = 4;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    out: Unpickled,
    /// Values copied by emulated calls so far (see [`COPY_LIMIT_PER_BYTE`]).
    copied: usize,
}

/// Interprets `data` as a pickle and returns its top object. Never executes code.
pub fn unpickle(data: &[u8]) -> std::result::Result<Unpickled, PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        out: Unpickled::default(),
        copied: 0,
    };
    let mut ops = 0usize;
    loop {
        let at = m.pos;
        ops += 1;
        if ops > MAX_OPS {
            return Err(PickleError { pos: at, msg: "too many opcodes".into() });
        }
        match m.step() {
            Ok(true) => {
                let mut out = m.out;
                out.top = m.stack.pop();
                return Ok(out);
            }
            Ok(false) => {}
            Err(msg) => return Err(PickleError { pos: at, msg }),
        }
    }
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> R<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("truncated: needs {n} more bytes"))?;
        let s = self.data.get(self.pos..end).unwrap_or_default();
        self.pos = end;
        Ok(s)
    }
    fn take_arr<const N: usize>(&mut self) -> R<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.take_arr::<1>()?[0])
    }
    fn len_u32(&mut self) -> R<usize> {
        Ok(u32::from_le_bytes(self.take_arr()?) as usize)
    }
    fn len_u64(&mut self) -> R<usize> {
        usize::try_from(u64::from_le_bytes(self.take_arr()?)).map_err(|_| "length overflows".to_string())
    }
    /// A text argument up to (not including) the next `\n`.
    fn line(&mut self) -> R<&str> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let nl = rest.iter().position(|&b| b == b'\n').ok_or("truncated: unterminated text argument")?;
        self.pos += nl + 1;
        let line = rest.get(..nl).unwrap_or_default();
        std::str::from_utf8(line).map_err(|_| "text argument is not UTF-8".to_string())
    }
    fn pop(&mut self) -> R<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("stack underflow (pop across a MARK)".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".to_string())
    }
    fn top_mut(&mut self) -> R<&mut Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("stack underflow (no object above the MARK)".into());
        }
        self.stack.last_mut().ok_or_else(|| "stack underflow".to_string())
    }
    /// Pops everything down to the last MARK, and the MARK.
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let m = self.marks.pop().ok_or("MARK expected but none on the stack")?;
        if m > self.stack.len() {
            return Err("corrupt MARK".into());
        }
        Ok(self.stack.split_off(m))
    }
    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }
    fn new_tuple(&mut self, items: Vec<Value>) -> Value {
        self.out.tuples.push(items.into());
        Value::Tuple(self.out.tuples.len() - 1)
    }
    fn tuple_items(&self, i: usize) -> Rc<[Value]> {
        self.out.tuples.get(i).cloned().unwrap_or_else(|| Rc::from(Vec::new()))
    }
    /// Accounts for `n` values copied by an emulated call; bounds the total work.
    fn charge_copy(&mut self, n: usize) -> R<()> {
        self.copied = self.copied.saturating_add(n);
        let limit = COPY_LIMIT_PER_BYTE.saturating_mul(self.data.len()).saturating_add(1 << 20);
        if self.copied > limit {
            return Err("too much data copied by emulated calls".into());
        }
        Ok(())
    }
    fn new_list(&mut self, items: Vec<Value>) -> Value {
        self.out.lists.push(items);
        Value::List(self.out.lists.len() - 1)
    }
    fn new_dict(&mut self, items: Vec<(Value, Value)>) -> Value {
        self.out.dicts.push(items);
        Value::Dict(self.out.dicts.len() - 1)
    }
    fn memo_put(&mut self, idx: u64) -> R<()> {
        let v = self.top_mut()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }
    fn memo_get(&mut self, idx: u64) -> R<()> {
        let v = self.memo.get(&idx).cloned().ok_or_else(|| format!("memo key {idx} not found"))?;
        self.push(v);
        Ok(())
    }
    fn str_value(bytes: &[u8]) -> Value {
        Value::Str(String::from_utf8_lossy(bytes).into())
    }
    fn int_from_le(bytes: &[u8]) -> Value {
        if bytes.is_empty() {
            return Value::Int(0);
        }
        let neg = bytes.last().is_some_and(|&b| b & 0x80 != 0);
        let ext = if neg { 0xff } else { 0 };
        if bytes.len() > 8 && bytes.get(8..).is_some_and(|hi| hi.iter().any(|&b| b != ext)) {
            return Value::Opaque("int too large for 64 bits".into());
        }
        let mut a = [ext; 8];
        for (d, s) in a.iter_mut().zip(bytes) {
            *d = *s;
        }
        let v = i64::from_le_bytes(a);
        // A >8-byte encoding whose 9th byte is sign extension but whose i64 sign disagrees.
        if bytes.len() > 8 && (v < 0) != neg {
            return Value::Opaque("int too large for 64 bits".into());
        }
        Value::Int(v)
    }

    fn append(&mut self, items: Vec<Value>) -> R<()> {
        match self.top_mut()?.clone() {
            Value::List(i) => {
                if let Some(l) = self.out.lists.get_mut(i) {
                    l.extend(items);
                }
                Ok(())
            }
            Value::Opaque(_) => Ok(()),
            other => Err(format!("APPEND(S) to {}", other.kind())),
        }
    }
    fn set_items(&mut self, items: Vec<Value>) -> R<()> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of items".into());
        }
        match self.top_mut()?.clone() {
            Value::Dict(i) => {
                let mut it = items.into_iter();
                if let Some(d) = self.out.dicts.get_mut(i) {
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                Ok(())
            }
            Value::Opaque(_) => Ok(()),
            other => Err(format!("SETITEM(S) on {}", other.kind())),
        }
    }

    /// Emulates calling `func(*args)`.
    fn call(&mut self, func: Value, args: Value, depth: usize) -> R<Value> {
        let args: Rc<[Value]> = match args {
            Value::Tuple(i) => self.tuple_items(i),
            Value::Opaque(d) => return Ok(Value::Opaque(call_desc(&d))),
            other => return Err(format!("call arguments are {}, not a tuple", other.kind())),
        };
        let b = match func {
            Value::Global(b) => b,
            Value::Opaque(d) => return Ok(Value::Opaque(call_desc(&d))),
            other => return Err(format!("call of {}, which is not callable", other.kind())),
        };
        match b {
            Builtin::OrderedDict => {
                let mut items = Vec::new();
                if let Some(Value::List(i)) = args.first() {
                    let pairs = self.out.lists.get(*i).cloned().unwrap_or_default();
                    self.charge_copy(pairs.len())?;
                    for pair in pairs {
                        if let Value::Tuple(t) = pair {
                            if let [k, v] = &self.tuple_items(t)[..] {
                                items.push((k.clone(), v.clone()));
                            }
                        }
                    }
                }
                Ok(self.new_dict(items))
            }
            Builtin::RebuildTensor | Builtin::RebuildTensorV2 | Builtin::RebuildTensorV3 => {
                rebuild_tensor(&self.out, &args)
            }
            Builtin::RebuildParameter | Builtin::RebuildParameterWithState => {
                args.first().cloned().ok_or_else(|| "_rebuild_parameter without arguments".to_string())
            }
            Builtin::RebuildFromTypeV2 => {
                // (func, new_type, args, state): the tensor is func(*args); the subclass type
                // and python state are dropped.
                if depth >= MAX_CALL_DEPTH {
                    return Err("_rebuild_from_type_v2 nested too deeply".into());
                }
                match &args[..] {
                    [f, _ty, a, ..] => self.call(f.clone(), a.clone(), depth + 1),
                    _ => Err("_rebuild_from_type_v2 needs 4 arguments".into()),
                }
            }
            Builtin::TorchSize => match args.first() {
                Some(Value::Tuple(t)) => Ok(Value::Tuple(*t)),
                Some(Value::List(i)) => {
                    let items = self.out.lists.get(*i).cloned().unwrap_or_default();
                    self.charge_copy(items.len())?;
                    Ok(self.new_tuple(items))
                }
                None => Ok(self.new_tuple(Vec::new())),
                Some(other) => Err(format!("torch.Size of {}", other.kind())),
            },
            Builtin::Set => {
                let items = match args.first() {
                    Some(Value::List(i)) => self.out.lists.get(*i).cloned().unwrap_or_default(),
                    Some(Value::Tuple(t)) => self.tuple_items(*t).to_vec(),
                    _ => Vec::new(),
                };
                self.charge_copy(items.len())?;
                Ok(self.new_list(items))
            }
            Builtin::CodecsEncode => match &args[..] {
                [Value::Str(s), ..] => {
                    // protocol 2 writes bytes b as _codecs.encode(b.decode('latin1'), 'latin1').
                    let latin1 = args.get(1).is_some_and(|e| matches!(e, Value::Str(e) if e.eq_ignore_ascii_case("latin1") || e.eq_ignore_ascii_case("latin-1")));
                    let bytes: Vec<u8> = if latin1 && s.chars().all(|c| (c as u32) < 256) {
                        s.chars().map(|c| c as u32 as u8).collect()
                    } else {
                        s.as_bytes().to_vec()
                    };
                    Ok(Value::Bytes(bytes.into()))
                }
                _ => Ok(Value::Opaque("_codecs.encode(...)".into())),
            },
            Builtin::Storage(_) => Ok(Value::Opaque("storage constructor call".into())),
        }
    }

    /// Emulates `persistent_load(pid)` of `torch.load`.
    fn persistent_load(&mut self, pid: Value) -> R<Value> {
        let Value::Tuple(t) = pid else {
            return Ok(Value::Opaque(format!("persistent id {}", pid.kind()).into()));
        };
        let t = self.tuple_items(t);
        match &t[..] {
            [Value::Str(tag), ty, key, loc, numel] if &**tag == "storage" => {
                let dtype = match ty {
                    Value::Global(Builtin::Storage(d)) => *d,
                    Value::Opaque(d) => return Ok(Value::Opaque(format!("storage of unsupported type {d}").into())),
                    other => return Err(format!("storage type is {}", other.kind())),
                };
                let key = match key {
                    Value::Str(s) => s.to_string(),
                    Value::Int(i) => i.to_string(),
                    other => return Err(format!("storage key is {}", other.kind())),
                };
                let location = match loc {
                    Value::Str(s) => s.to_string(),
                    _ => String::new(),
                };
                let numel = match numel {
                    Value::Int(n) if *n >= 0 => *n as u64,
                    other => return Err(format!("storage size is {}", other.kind())),
                };
                Ok(Value::Storage(Rc::new(StorageRef { dtype, key, location, numel })))
            }
            _ => Ok(Value::Opaque("unsupported persistent id".into())),
        }
    }

    /// Executes one opcode; `Ok(true)` at STOP.
    fn step(&mut self) -> R<bool> {
        let op = self.u8()?;
        match op {
            // ---- framing and protocol
            0x80 => {
                let p = self.u8()?;
                if p > 5 {
                    return Err(format!("unsupported pickle protocol {p}"));
                }
            }
            0x95 => {
                self.take(8)?; // FRAME: a length hint, the opcodes follow inline
            }
            b'.' => return Ok(true),
            // ---- stack manipulation
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
                    self.pop_mark()?;
                } else {
                    self.pop()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top_mut()?.clone();
                self.push(v);
            }
            // ---- constants and numbers
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'I' => {
                let l = self.line()?.trim();
                let v = match l {
                    "01" => Value::Bool(true),
                    "00" => Value::Bool(false),
                    _ => l.parse::<i64>().map(Value::Int).unwrap_or_else(|_| Value::Opaque("unparsable INT".into())),
                };
                self.push(v);
            }
            b'J' => {
                let v = i32::from_le_bytes(self.take_arr()?);
                self.push(Value::Int(v.into()));
            }
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v.into()));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.take_arr()?);
                self.push(Value::Int(v.into()));
            }
            b'L' => {
                let l = self.line()?.trim().trim_end_matches('L');
                let v = l.parse::<i64>().map(Value::Int).unwrap_or_else(|_| Value::Opaque("unparsable LONG".into()));
                self.push(v);
            }
            0x8a => {
                let n = self.u8()? as usize;
                let v = Self::int_from_le(self.take(n)?);
                self.push(v);
            }
            0x8b => {
                let n = i32::from_le_bytes(self.take_arr()?);
                let n = usize::try_from(n).map_err(|_| "LONG4 with negative length".to_string())?;
                let v = Self::int_from_le(self.take(n)?);
                self.push(v);
            }
            b'F' => {
                let v = self.line()?.trim().parse::<f64>().unwrap_or(f64::NAN);
                self.push(Value::Float(v));
            }
            b'G' => {
                let v = f64::from_be_bytes(self.take_arr()?);
                self.push(Value::Float(v));
            }
            // ---- strings and bytes
            b'S' => {
                let l = self.line()?.trim();
                let inner = l
                    .strip_prefix('\'')
                    .and_then(|s| s.strip_suffix('\''))
                    .or_else(|| l.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                    .ok_or("STRING argument is not quoted")?;
                let v = Value::Str(inner.into());
                self.push(v);
            }
            b'V' => {
                let v = Value::Str(self.line()?.into());
                self.push(v);
            }
            b'T' | b'X' | b'B' => {
                let n = self.len_u32()?;
                let b = self.take(n)?;
                let v = if op == b'B' { Value::Bytes(b.into()) } else { Self::str_value(b) };
                self.push(v);
            }
            b'U' | 0x8c | b'C' => {
                let n = self.u8()? as usize;
                let b = self.take(n)?;
                let v = if op == b'C' { Value::Bytes(b.into()) } else { Self::str_value(b) };
                self.push(v);
            }
            0x8d | 0x8e | 0x96 => {
                let n = self.len_u64()?;
                let b = self.take(n)?;
                let v = if op == 0x8d { Self::str_value(b) } else { Value::Bytes(b.into()) };
                self.push(v);
            }
            0x97 | 0x98 => return Err("out-of-band buffers are not supported".into()),
            // ---- tuples
            b')' => {
                let v = self.new_tuple(Vec::new());
                self.push(v);
            }
            b't' => {
                let items = self.pop_mark()?;
                let v = self.new_tuple(items);
                self.push(v);
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                let v = self.new_tuple(items);
                self.push(v);
            }
            // ---- lists and sets
            b']' | 0x8f => {
                let v = self.new_list(Vec::new());
                self.push(v);
            }
            b'l' | 0x91 => {
                let items = self.pop_mark()?;
                let v = self.new_list(items);
                self.push(v);
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            // ---- dicts
            b'}' => {
                let v = self.new_dict(Vec::new());
                self.push(v);
            }
            b'd' => {
                let items = self.pop_mark()?;
                if !items.len().is_multiple_of(2) {
                    return Err("DICT with an odd number of items".into());
                }
                let mut pairs = Vec::with_capacity(items.len() / 2);
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    pairs.push((k, v));
                }
                let v = self.new_dict(pairs);
                self.push(v);
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            // ---- memo
            b'p' => {
                let i = self.line()?.trim().parse::<u64>().map_err(|_| "bad PUT index")?;
                self.memo_put(i)?;
            }
            b'q' => {
                let i = self.u8()?;
                self.memo_put(i.into())?;
            }
            b'r' => {
                let i = u32::from_le_bytes(self.take_arr()?);
                self.memo_put(i.into())?;
            }
            0x94 => {
                let i = self.memo.len() as u64;
                self.memo_put(i)?;
            }
            b'g' => {
                let i = self.line()?.trim().parse::<u64>().map_err(|_| "bad GET index")?;
                self.memo_get(i)?;
            }
            b'h' => {
                let i = self.u8()?;
                self.memo_get(i.into())?;
            }
            b'j' => {
                let i = u32::from_le_bytes(self.take_arr()?);
                self.memo_get(i.into())?;
            }
            // ---- globals and calls (emulated, never executed)
            b'c' => {
                let module = self.line()?.to_string();
                let name = self.line()?.to_string();
                self.push(resolve_global(&module, &name));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let v = match (&module, &name) {
                    (Value::Str(m), Value::Str(n)) => resolve_global(m, n),
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                };
                self.push(v);
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = self.call(func, args, 0)?;
                self.push(v);
            }
            0x81 => {
                // NEWOBJ: cls.__new__(cls, *args)
                let args = self.pop()?;
                let cls = self.pop()?;
                let v = self.new_obj(cls, args)?;
                self.push(v);
            }
            0x92 => {
                // NEWOBJ_EX: cls.__new__(cls, *args, **kwargs)
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let cls = self.pop()?;
                let v = self.new_obj(cls, args)?;
                self.push(v);
            }
            b'i' => {
                // INST module\nname\n: instantiate with the args above the MARK.
                let module = self.line()?.to_string();
                let name = self.line()?.to_string();
                self.pop_mark()?;
                let cls = resolve_global(&module, &name);
                let args = self.new_tuple(Vec::new());
                let v = self.new_obj(cls, args)?;
                self.push(v);
            }
            b'o' => {
                let mut items = self.pop_mark()?.into_iter();
                let cls = items.next().ok_or("OBJ without a class")?;
                let args = self.new_tuple(items.collect());
                let v = self.new_obj(cls, args)?;
                self.push(v);
            }
            b'b' => {
                // BUILD: obj.__setstate__(state) — ignored for every object we build.
                let _state = self.pop()?;
                self.top_mut()?;
            }
            // ---- persistent ids and extensions
            b'P' => {
                let id = self.line()?.to_string();
                self.push(Value::Opaque(format!("persistent id {id:?}").into()));
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = self.persistent_load(pid)?;
                self.push(v);
            }
            0x82..=0x84 => {
                let n = match op {
                    0x82 => 1,
                    0x83 => 2,
                    _ => 4,
                };
                self.take(n)?;
                self.push(Value::Opaque("copyreg extension".into()));
            }
            other => return Err(format!("unknown opcode 0x{other:02x}")),
        }
        Ok(false)
    }

    /// Emulates instantiating class `cls`: only `OrderedDict` (and sets) are built; anything
    /// else becomes a placeholder.
    fn new_obj(&mut self, cls: Value, args: Value) -> R<Value> {
        match cls {
            Value::Global(Builtin::OrderedDict) => Ok(self.new_dict(Vec::new())),
            Value::Global(Builtin::Set) => Ok(self.new_list(Vec::new())),
            Value::Global(b) => Ok(Value::Opaque(format!("instance of {b:?}").into())),
            Value::Opaque(d) => Ok(Value::Opaque(call_desc(&d))),
            other => {
                let _ = args;
                Err(format!("instantiating {}, which is not a class", other.kind()))
            }
        }
    }
}

/// The description of the result of calling placeholder `d` (kept short: `f(...)`).
fn call_desc(d: &str) -> Rc<str> {
    if d.ends_with("(...)") {
        d.into()
    } else {
        format!("{d}(...)").into()
    }
}

fn as_u64(v: &Value, what: &str) -> R<u64> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as u64),
        Value::Bool(b) => Ok(u64::from(*b)),
        other => Err(format!("tensor {what} is {}, not a non-negative int", other.kind())),
    }
}

fn as_dims(u: &Unpickled, v: &Value, what: &str) -> R<Vec<u64>> {
    match v {
        Value::Tuple(_) => u.tuple(v).iter().map(|d| as_u64(d, what)).collect(),
        other => Err(format!("tensor {what} is {}, not a tuple", other.kind())),
    }
}

/// `_rebuild_tensor[_v2|_v3](storage, storage_offset, size, stride, ...)`.
fn rebuild_tensor(u: &Unpickled, args: &[Value]) -> R<Value> {
    let [storage, offset, size, stride, ..] = args else {
        return Err(format!("_rebuild_tensor with {} arguments", args.len()));
    };
    let storage = match storage {
        Value::Storage(s) => s.clone(),
        Value::Opaque(d) => return Ok(Value::Opaque(format!("tensor on {d}").into())),
        other => return Err(format!("tensor storage is {}", other.kind())),
    };
    let offset = as_u64(offset, "storage offset")?;
    let size = as_dims(u, size, "size")?;
    let stride = as_dims(u, stride, "stride")?;
    if size.len() != stride.len() {
        return Err(format!("tensor size has {} dims but stride has {}", size.len(), stride.len()));
    }
    Ok(Value::Tensor(Rc::new(TensorDesc { storage, offset, size, stride })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malicious_reduce_is_inert() {
        let u = unpickle(b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.").unwrap();
        match u.top() {
            Value::Opaque(d) => assert_eq!(&**d, "os.system(...)"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn protocol2_dict() {
        // pickle.dumps({'a': 1, 'b': [1.5, True, None], 'c': (1, 2)}, protocol=2)
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(G?\xf8\x00\x00\x00\x00\x00\x00\x88NeX\x01\x00\x00\x00cq\x04K\x01K\x02\x86q\x05u.";
        let u = unpickle(p).unwrap();
        let top = u.top().clone();
        assert!(matches!(u.get(&top, "a"), Some(Value::Int(1))));
        let Some(Value::List(l)) = u.get(&top, "b") else { panic!() };
        assert_eq!(u.lists[*l].len(), 3);
        let c = u.get(&top, "c").unwrap();
        assert!(matches!(c, Value::Tuple(_)) && u.tuple(c).len() == 2);
    }

    #[test]
    fn large_ints() {
        assert!(matches!(Machine::int_from_le(&[0xff]), Value::Int(-1)));
        assert!(matches!(Machine::int_from_le(&[0x00, 0x80]), Value::Int(-32768)));
        assert!(matches!(Machine::int_from_le(&[0xff, 0x00]), Value::Int(255)));
        assert!(matches!(Machine::int_from_le(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]), Value::Opaque(_)));
        assert!(matches!(Machine::int_from_le(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]), Value::Int(1)));
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let seeds: [&[u8]; 3] = [
            b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(G?\xf8\x00\x00\x00\x00\x00\x00\x88NeX\x01\x00\x00\x00cq\x04K\x01K\x02\x86q\x05u.",
            b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.",
            b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00wq\x02ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x04tq\x08QK\x00K\x02K\x02\x86q\tK\x02K\x01\x86q\n\x89h\x00)Rq\x0btq\x0cRq\rs.",
        ];
        let mut s = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for seed in seeds {
            assert!(unpickle(seed).is_ok());
        }
        for i in 0..20000 {
            let seed = seeds[i % seeds.len()];
            let mut p = seed.to_vec();
            match next() % 4 {
                0 => p.truncate((next() as usize) % (seed.len() + 1)),
                1 | 2 => {
                    for _ in 0..1 + next() % 3 {
                        let j = (next() as usize) % p.len();
                        p[j] = next() as u8;
                    }
                }
                _ => p = (0..next() % 48).map(|_| next() as u8).collect(),
            }
            let _ = unpickle(&p);
        }
    }

    #[test]
    fn deeply_nested_tuples_do_not_overflow() {
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        p.push(b'.');
        let u = unpickle(&p).unwrap();
        drop(u);
    }

    #[test]
    fn emulated_copies_are_bounded() {
        // set(t) over a 100k-element tuple t, repeated 100k times: ~10^10 copies unbounded.
        let mut p = b"\x80\x02c__builtin__\nset\nq\x00(".to_vec();
        p.extend(std::iter::repeat_n([b'K', 0], 100_000).flatten());
        p.extend_from_slice(b"tq\x010");
        for _ in 0..100_000 {
            p.extend_from_slice(b"h\x00h\x01\x85R0");
        }
        p.extend_from_slice(b"N.");
        let e = unpickle(&p).unwrap_err();
        assert!(e.msg.contains("copied"), "{e}");
    }
}
