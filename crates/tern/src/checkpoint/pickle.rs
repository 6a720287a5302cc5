//! A pickle reader for PyTorch state dicts that executes nothing.
//!
//! `torch.save` writes a pickle program; running it with Python's `pickle` can call any
//! function the file names, which is how malicious checkpoints run code. This reader is a
//! small interpreter of its own over the opcodes a state dict needs (containers, numbers,
//! strings, memo, persistent ids for storages) and only these callables: `OrderedDict`,
//! torch's tensor and parameter rebuilders, and storage types. Any other `GLOBAL`, or a
//! `REDUCE` on anything but those, ends the read with an error naming it: nothing is called.

use crate::error::{Result, TernError};
use candle_core::DType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A callable or class the reader accepts.
#[derive(Debug, Clone, PartialEq)]
pub enum Global {
    /// `collections.OrderedDict`.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2` (and the older `_rebuild_tensor`).
    RebuildTensor,
    /// `torch._utils._rebuild_parameter`.
    RebuildParameter,
    /// `torch.FloatStorage` and friends; `None` for element types candle lacks.
    Storage(Option<DType>, String),
}

/// A tensor as the pickle describes it: where its data is and how it is laid out.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// Storage key: the zip entry `data/{key}` holds its bytes.
    pub key: String,
    /// Element type.
    pub dtype: DType,
    /// Offset into the storage, in elements.
    pub offset: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// Strides, in elements.
    pub stride: Vec<usize>,
}

/// A value on the pickle machine's stack.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// Python `None`.
    None,
    /// A bool.
    Bool(bool),
    /// An int.
    Int(i64),
    /// A float.
    Float(f64),
    /// A str.
    Str(String),
    /// bytes.
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Object>),
    /// A list.
    List(Vec<Object>),
    /// A dict or OrderedDict, in insertion order.
    Dict(Vec<(Object, Object)>),
    /// An allowed global.
    Global(Global),
    /// A storage named by a persistent id: `(key, dtype, elements)`.
    Storage(String, Option<DType>, usize),
    /// A rebuilt tensor.
    Tensor(TensorRef),
}

fn storage_dtype(name: &str) -> Option<Option<DType>> {
    Some(match name {
        "FloatStorage" => Some(DType::F32),
        "HalfStorage" => Some(DType::F16),
        "BFloat16Storage" => Some(DType::BF16),
        "DoubleStorage" => Some(DType::F64),
        "LongStorage" => Some(DType::I64),
        "IntStorage" => Some(DType::I32),
        "ByteStorage" => Some(DType::U8),
        "ShortStorage" | "CharStorage" | "BoolStorage" => None,
        _ => return None,
    })
}

fn allowed_global(module: &str, name: &str) -> Option<Global> {
    match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            Some(Global::RebuildTensor)
        }
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch", s) => storage_dtype(s).map(|d| Global::Storage(d, s.to_string())),
        _ => None,
    }
}

/// Stack entries: values, or the MARK separator.
#[derive(Debug)]
enum Slot {
    Mark,
    Val(Object),
}

struct Machine<'a> {
    file: PathBuf,
    buf: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u32, Object>,
}

/// Reads a state-dict pickle (`data.pkl`) into its top-level object.
pub fn read(file: &Path, buf: &[u8]) -> Result<Object> {
    Machine {
        file: file.to_path_buf(),
        buf,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

impl<'a> Machine<'a> {
    fn err(&self, detail: String) -> TernError {
        TernError::Pickle {
            file: self.file.clone(),
            detail,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "pickle ends early: {n} bytes wanted at offset {} of {}",
                self.pos,
                self.buf.len()
            ))),
        }
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le(&mut self, n: usize) -> Result<u64> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.buf[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("GLOBAL without a newline-terminated name".into()))?;
        let s = String::from_utf8_lossy(&rest[..n]).to_string();
        self.pos += n + 1;
        Ok(s)
    }

    fn push(&mut self, o: Object) {
        self.stack.push(Slot::Val(o));
    }

    fn pop(&mut self) -> Result<Object> {
        match self.stack.pop() {
            Some(Slot::Val(o)) => Ok(o),
            Some(Slot::Mark) => Err(self.err("a value was expected but a MARK was found".into())),
            None => Err(self.err("pop from an empty stack".into())),
        }
    }

    fn top_mut(&mut self) -> Result<&mut Object> {
        match self.stack.last_mut() {
            Some(Slot::Val(o)) => Ok(o),
            _ => Err(TernError::Pickle {
                file: self.file.clone(),
                detail: "a container was expected on the stack".into(),
            }),
        }
    }

    /// Everything above the topmost MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Object>> {
        let at = self
            .stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .ok_or_else(|| self.err("no MARK to pop to".into()))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|s| match s {
                Slot::Val(o) => o,
                Slot::Mark => unreachable!("only the topmost mark is split off"),
            })
            .collect())
    }

    fn string(&mut self, n: usize) -> Result<Object> {
        let b = self.take(n)?;
        Ok(Object::Str(String::from_utf8_lossy(b).to_string()))
    }

    fn memo_put(&mut self, k: u32) -> Result<()> {
        let v = match self.stack.last() {
            Some(Slot::Val(o)) => o.clone(),
            _ => return Err(self.err("memo put with nothing on the stack".into())),
        };
        self.memo.insert(k, v);
        Ok(())
    }

    fn memo_get(&mut self, k: u32) -> Result<()> {
        let v = self
            .memo
            .get(&k)
            .cloned()
            .ok_or_else(|| self.err(format!("memo key {k} used before it was set")))?;
        self.push(v);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        match allowed_global(module, name) {
            Some(g) => {
                self.push(Object::Global(g));
                Ok(())
            }
            None => Err(self.err(format!(
                "refusing GLOBAL `{module}.{name}`: a state dict needs only torch's tensor rebuilding, so this file would run other code if unpickled (it may be malicious); nothing was executed"
            ))),
        }
    }

    fn run(mut self) -> Result<Object> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(self.err(format!("pickle protocol {v} is not supported")));
                    }
                }
                0x95 => {
                    self.le(8)?; // FRAME: a size hint
                }
                b'}' => self.push(Object::Dict(vec![])),
                b']' => self.push(Object::List(vec![])),
                b')' => self.push(Object::Tuple(vec![])),
                b'(' => self.stack.push(Slot::Mark),
                b'X' => {
                    let n = self.le(4)? as usize;
                    let s = self.string(n)?;
                    self.push(s)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(s)
                }
                0x8d => {
                    let n = self.le(8)? as usize;
                    let s = self.string(n)?;
                    self.push(s)
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => self.le(4)?,
                        b'C' => self.u8()? as u64,
                        _ => self.le(8)?,
                    } as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Object::Bytes(b))
                }
                b'J' => {
                    let v = self.le(4)? as u32 as i32;
                    self.push(Object::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Object::Int(v as i64))
                }
                b'M' => {
                    let v = self.le(2)?;
                    self.push(Object::Int(v as i64))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(self.err(format!("{n}-byte integer is too large")));
                    }
                    let b = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Object::Int(v))
                }
                b'G' => {
                    let b: [u8; 8] = self.take(8)?.try_into().expect("8 bytes");
                    self.push(Object::Float(f64::from_be_bytes(b)))
                }
                b'N' => self.push(Object::None),
                0x88 => self.push(Object::Bool(true)),
                0x89 => self.push(Object::Bool(false)),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Object::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>>>()?;
                    items.reverse();
                    self.push(Object::Tuple(items))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Object::List(items))
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(&self, items)?;
                    self.push(Object::Dict(pairs))
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.le(4)? as u32;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.le(4)? as u32;
                    self.memo_get(k)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(&module, &name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Object::Str(m), Object::Str(n)) => self.global(&m, &n)?,
                        _ => return Err(self.err("STACK_GLOBAL needs two strings".into())),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.reduce(f, args)?;
                    self.push(v)
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.push(v)
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top_mut()? {
                        Object::Dict(d) => d.push((k, v)),
                        _ => return Err(self.err("SETITEM on something that is not a dict".into())),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let kv = pairs(&self, items)?;
                    match self.top_mut()? {
                        Object::Dict(d) => d.extend(kv),
                        _ => {
                            return Err(self.err("SETITEMS on something that is not a dict".into()))
                        }
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top_mut()? {
                        Object::List(l) => l.push(v),
                        _ => return Err(self.err("APPEND on something that is not a list".into())),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top_mut()? {
                        Object::List(l) => l.extend(items),
                        _ => return Err(self.err("APPENDS on something that is not a list".into())),
                    }
                }
                b'b' => {
                    // BUILD sets attributes (an OrderedDict's `_metadata`); tensors need none.
                    self.pop()?;
                    match self.top_mut()? {
                        Object::Dict(_) | Object::Tensor(_) => {}
                        _ => {
                            return Err(
                                self.err("BUILD on something that is not a dict or tensor".into())
                            )
                        }
                    }
                }
                b'.' => return self.pop(),
                other => {
                    return Err(self.err(format!(
                    "opcode 0x{other:02x} at offset {} is not one a state dict uses; refusing it",
                    self.pos - 1
                )))
                }
            }
        }
    }

    fn persistent(&self, pid: Object) -> Result<Object> {
        let Object::Tuple(t) = &pid else {
            return Err(self.err(format!("persistent id {pid:?} is not a storage tuple")));
        };
        match t.as_slice() {
            [Object::Str(kind), Object::Global(Global::Storage(dtype, _)), Object::Str(key), _location, Object::Int(n)]
                if kind == "storage" && *n >= 0 =>
            {
                Ok(Object::Storage(key.clone(), *dtype, *n as usize))
            }
            _ => Err(self.err(format!("persistent id {pid:?} is not a storage tuple"))),
        }
    }

    fn reduce(&self, f: Object, args: Object) -> Result<Object> {
        let Object::Tuple(args) = args else {
            return Err(self.err("REDUCE arguments are not a tuple".into()));
        };
        match f {
            Object::Global(Global::OrderedDict) => Ok(Object::Dict(vec![])),
            Object::Global(Global::RebuildParameter) => args
                .into_iter()
                .next()
                .ok_or_else(|| self.err("_rebuild_parameter without data".into())),
            Object::Global(Global::RebuildTensor) => {
                let (storage, offset, size, stride) = match args.as_slice() {
                    [s, o, sz, st, ..] => (s, o, sz, st),
                    _ => return Err(self.err("_rebuild_tensor with too few arguments".into())),
                };
                let Object::Storage(key, dtype, _) = storage else {
                    return Err(self.err("_rebuild_tensor without a storage".into()));
                };
                let dtype = dtype.ok_or_else(|| self.err(format!("storage {key} has an element type tern does not read (bool, int8 or int16)")))?;
                let ints = |o: &Object, what: &str| -> Result<Vec<usize>> {
                    match o {
                        Object::Tuple(v) => v
                            .iter()
                            .map(|x| match x {
                                Object::Int(i) if *i >= 0 => Ok(*i as usize),
                                _ => Err(self.err(format!("tensor {what} holds {x:?}"))),
                            })
                            .collect(),
                        _ => Err(self.err(format!("tensor {what} is not a tuple"))),
                    }
                };
                let offset = match offset {
                    Object::Int(i) if *i >= 0 => *i as usize,
                    _ => return Err(self.err("tensor storage offset is not an integer".into())),
                };
                Ok(Object::Tensor(TensorRef {
                    key: key.clone(),
                    dtype,
                    offset,
                    shape: ints(size, "size")?,
                    stride: ints(stride, "stride")?,
                }))
            }
            other => Err(self.err(format!(
                "refusing REDUCE on {other:?}: only OrderedDict and torch's tensor rebuilders may be called; nothing was executed"
            ))),
        }
    }
}

fn pairs(m: &Machine, items: Vec<Object>) -> Result<Vec<(Object, Object)>> {
    if !items.len().is_multiple_of(2) {
        return Err(m.err("odd number of items for a dict".into()));
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// The `name -> tensor` entries of a state dict (nested dicts are flattened with `.`;
/// non-tensor values such as version numbers are skipped).
pub fn state_dict(file: &Path, top: Object) -> Result<Vec<(String, TensorRef)>> {
    fn walk(prefix: &str, o: Object, out: &mut Vec<(String, TensorRef)>) {
        match o {
            Object::Tensor(t) => out.push((prefix.to_string(), t)),
            Object::Dict(d) => {
                for (k, v) in d {
                    if let Object::Str(k) = k {
                        let name = if prefix.is_empty() {
                            k
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&name, v, out);
                    }
                }
            }
            _ => {}
        }
    }
    if !matches!(top, Object::Dict(_)) {
        return Err(TernError::Pickle {
            file: file.to_path_buf(),
            detail: "the pickle is not a state dict (a dict of tensors)".into(),
        });
    }
    let mut out = Vec::new();
    walk("", top, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(b: &[u8]) -> Result<Object> {
        read(Path::new("t.pkl"), b)
    }

    #[test]
    fn containers_numbers_and_memo() {
        // {'a': (1, -2, 300), 'b': [None, True]} with a memo round trip, protocol 2.
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend([b'X', 1, 0, 0, 0, b'a', b'K', 1, b'J']);
        p.extend((-2i32).to_le_bytes());
        p.extend([
            b'M', 0x2c, 0x01, 0x87, b'X', 1, 0, 0, 0, b'b', b']', b'(', b'N', 0x88, b'e', b'u',
            b'.',
        ]);
        let o = run(&p).unwrap();
        assert_eq!(
            o,
            Object::Dict(vec![
                (
                    Object::Str("a".into()),
                    Object::Tuple(vec![Object::Int(1), Object::Int(-2), Object::Int(300)])
                ),
                (
                    Object::Str("b".into()),
                    Object::List(vec![Object::None, Object::Bool(true)])
                ),
            ])
        );
    }

    #[test]
    fn ordered_dict_with_metadata_as_state_dict_pickles_it() {
        // torch.save(model.state_dict()): OrderedDict() via REDUCE, items, then BUILD with
        // {'_metadata': ...}; long memo opcodes and LONG1 as in large checkpoints.
        let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rr\x01\x00\x00\x00(".to_vec();
        p.extend(
            b"X\x01\x00\x00\x00a\x8a\x02\x00\x01u}X\x09\x00\x00\x00_metadataj\x01\x00\x00\x00sb.",
        );
        let o = run(&p).unwrap();
        assert_eq!(
            o,
            Object::Dict(vec![(Object::Str("a".into()), Object::Int(256))])
        );
    }

    #[test]
    fn dangerous_globals_and_opcodes_are_refused() {
        let e = run(b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85R.").unwrap_err();
        assert!(
            e.to_string().contains("refusing GLOBAL `posix.system`"),
            "{e}"
        );
        let e = run(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.").unwrap_err();
        assert!(e.to_string().contains("builtins.eval"), "{e}");
        // INST (`i`) and OBJ (`o`) call classes directly: not in the allowed set.
        let e = run(b"(iposix\nsystem\n.").unwrap_err();
        assert!(e.to_string().contains("opcode 0x69"), "{e}");
        // An allowed global may still not be REDUCEd with anything but its own meaning.
        let e = run(b"\x80\x02ctorch\nFloatStorage\n)R.").unwrap_err();
        assert!(e.to_string().contains("refusing REDUCE"), "{e}");
        let e = run(b"\x80\x02X\xff\x00\x00\x00ab").unwrap_err();
        assert!(e.to_string().contains("ends early"), "{e}");
    }
}
