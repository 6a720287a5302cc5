//! Writing safetensors files atomically: a temp file in the same directory, renamed over the
//! final name only once every byte is on disk, so a failed or interrupted write never leaves
//! a half file behind. Tensors can be handed over whole or streamed one at a time (a merge
//! never holds a second copy of the model).

use super::pending::Pending;
use crate::error::{Result, TernError};
use candle_core::{DType, Device, Tensor};
use std::io::Write;
use std::path::{Path, PathBuf};

/// An output directory built in a temp directory beside its destination and renamed into
/// place by [`StagedDir::commit`]: the destination only ever holds a complete result, and a
/// failure (or an early drop) removes the temp directory.
#[derive(Debug)]
pub struct StagedDir {
    tmp: tempfile::TempDir,
    out: PathBuf,
    parent: PathBuf,
    name: String,
    /// Registers the temp directory for an interrupt to remove (dropped after `tmp`).
    _pending: Pending,
}

impl StagedDir {
    /// Prepares to write `out` from what is read at `inputs`; refuses an `out` whose
    /// replacement would destroy an input (see [`refuse_replacing_inputs`]) and an existing
    /// `out` unless `force`.
    pub fn new(out: &Path, inputs: &[&Path], force: bool) -> Result<Self> {
        refuse_replacing_inputs(out, inputs)?;
        if out.exists() && !force {
            return Err(TernError::InvalidArgument(format!(
                "{} already exists; pass --force to replace it, or choose another --out",
                out.display()
            )));
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| TernError::io(&parent, e))?;
        let name = out
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("out")
            .to_string();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.tmp-"))
            .tempdir_in(&parent)
            .map_err(|e| TernError::io(&parent, e))?;
        Ok(Self {
            _pending: Pending::new(tmp.path()),
            tmp,
            out: out.to_path_buf(),
            parent,
            name,
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Moves the finished directory to its destination (replacing an old one only now).
    pub fn commit(self) -> Result<()> {
        let staged = self.tmp.keep();
        let out = &self.out;
        let replace = || -> Result<()> {
            if out.exists() {
                let old = self
                    .parent
                    .join(format!(".{}.old-{}", self.name, std::process::id()));
                std::fs::rename(out, &old).map_err(|e| TernError::io(out, e))?;
                std::fs::rename(&staged, out).map_err(|e| TernError::io(out, e))?;
                let _ = std::fs::remove_dir_all(&old);
            } else {
                std::fs::rename(&staged, out).map_err(|e| TernError::io(out, e))?;
            }
            Ok(())
        };
        replace().inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&staged);
        })
    }
}

/// Refuses an `out` that is one of `inputs` or a directory holding one: replacing it (with
/// `--force`) would delete what the command reads.
pub fn refuse_replacing_inputs(out: &Path, inputs: &[&Path]) -> Result<()> {
    // A path that does not exist yet holds nothing.
    let Ok(target) = out.canonicalize() else {
        return Ok(());
    };
    for input in inputs {
        let Ok(read) = input.canonicalize() else {
            continue;
        };
        if read.starts_with(&target) {
            let how = if read == target { "is" } else { "contains" };
            return Err(TernError::InvalidArgument(format!(
                "--out {} {how} the input {}: writing there would destroy it; choose another --out",
                out.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// Files of a model or adapter directory that hold weights in some format.
pub fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".safetensors.index.json")
        || name.ends_with(".bin")
        || name.ends_with(".bin.index.json")
        || name.ends_with(".pt")
        || name.ends_with(".pth")
        || name.ends_with(".gguf")
        || name.ends_with(".h5")
        || name.ends_with(".msgpack")
}

/// Copies every non-weight file (config, tokenizer, chat template, README...) of `from` to
/// `to`; with `dtype`, records it in config.json as the weights' dtype.
pub fn copy_side_files(from: &Path, to: &Path, dtype: Option<DType>) -> Result<()> {
    for e in std::fs::read_dir(from).map_err(|e| TernError::io(from, e))? {
        let e = e.map_err(|e| TernError::io(from, e))?;
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if !p.is_file() || is_weight_file(&name) || name.starts_with('.') {
            continue;
        }
        let dest = to.join(&name);
        if let (Some(d), "config.json") = (dtype, name.as_str()) {
            let text = std::fs::read_to_string(&p).map_err(|e| TernError::io(&p, e))?;
            let mut v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| TernError::Config {
                    file: p.clone(),
                    key: "(file)".into(),
                    detail: format!("not valid JSON: {e}"),
                })?;
            let s = match d {
                DType::F16 => "float16",
                DType::BF16 => "bfloat16",
                _ => "float32",
            };
            if let Some(o) = v.as_object_mut() {
                let key = if o.contains_key("dtype") {
                    "dtype"
                } else {
                    "torch_dtype"
                };
                o.insert(key.into(), serde_json::json!(s));
            }
            let text = serde_json::to_string_pretty(&v).expect("json") + "\n";
            std::fs::write(&dest, text).map_err(|e| TernError::io(&dest, e))?;
        } else {
            std::fs::copy(&p, &dest).map_err(|e| TernError::io(&dest, e))?;
        }
    }
    Ok(())
}

/// Writes `groups` of tensors as `model.safetensors`, or as numbered shards plus
/// `model.safetensors.index.json` when there is more than one group; `fill(i)` gives the
/// bytes of `specs[i]`.
pub fn write_shards(
    dir: &Path,
    specs: &[TensorSpec],
    groups: &[Vec<usize>],
    mut fill: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let n = groups.len();
    let mut weight_map = serde_json::Map::new();
    for (si, idx) in groups.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n)
        };
        let shard: Vec<TensorSpec> = idx.iter().map(|&i| specs[i].clone()).collect();
        for s in &shard {
            weight_map.insert(s.name.clone(), serde_json::json!(file));
        }
        write_streaming(&dir.join(&file), &shard, |k| fill(idx[k]))?;
    }
    if n > 1 {
        let total: usize = specs.iter().map(TensorSpec::nbytes).sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_bytes_atomic(
            &dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)
                .expect("json")
                .as_bytes(),
        )?;
    }
    Ok(())
}

/// What one tensor of a file to be written will be.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Stored dtype.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Bytes of its data.
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

fn dtype_name(name: &str, d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::U32 => "U32",
        DType::U8 => "U8",
        other => {
            return Err(TernError::InvalidArgument(format!(
                "cannot write tensor `{name}` of dtype {other:?} to safetensors"
            )))
        }
    })
}

/// The header bytes (length prefix included) for tensors laid out in order.
fn header(specs: &[TensorSpec]) -> Result<Vec<u8>> {
    let mut h = serde_json::Map::new();
    // transformers refuses weight files whose metadata does not say which framework wrote
    // them; PEFT and vLLM load through it.
    h.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for s in specs {
        let n = s.nbytes();
        h.insert(
            s.name.clone(),
            serde_json::json!({"dtype": dtype_name(&s.name, s.dtype)?, "shape": s.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut head = serde_json::to_vec(&h).expect("json map serialises");
    // Pad so the data section starts 8-byte aligned, as the reference writer does.
    while !(8 + head.len()).is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    Ok(out)
}

/// A temp path beside `path` that the final rename can replace it from.
pub fn temp_beside(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ))
}

/// Writes `path` atomically: `body` fills a buffered writer on a temp file beside it, which is
/// synced and renamed over `path` only when `body` succeeds, and removed otherwise.
pub fn write_file_atomic<T>(
    path: &Path,
    body: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<T>,
) -> Result<T> {
    let tmp = temp_beside(path);
    let _pending = Pending::new(&tmp);
    let result = (|| -> Result<T> {
        let io = |e| TernError::io(path, e);
        // As the directory writers do: a missing parent is made, not an error.
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| TernError::io(parent, e))?;
        }
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut f = std::io::BufWriter::with_capacity(1 << 20, file);
        let out = body(&mut f)?;
        let f = f.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(out)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_atomic(path, |f| {
        f.write_all(bytes).map_err(|e| TernError::io(path, e))
    })
}

/// Streams the tensors `(name, nbytes)` into `f`, asking `fill(i)` for tensor `i`'s bytes in
/// order (each must be exactly `nbytes` long) and padding each to a multiple of `align`.
/// Returns the bytes written.
pub(crate) fn stream_tensors<'a>(
    f: &mut impl Write,
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, usize)>,
    align: u64,
    mut fill: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<u64> {
    let io = |e| TernError::io(path, e);
    let mut written = 0u64;
    for (i, (name, nbytes)) in tensors.into_iter().enumerate() {
        let b = fill(i)?;
        if b.len() != nbytes {
            return Err(TernError::InvalidArgument(format!(
                "tensor `{name}`: {} bytes given for {nbytes} expected",
                b.len()
            )));
        }
        f.write_all(&b).map_err(io)?;
        let pad = (b.len() as u64).next_multiple_of(align) - b.len() as u64;
        f.write_all(&vec![0u8; pad as usize]).map_err(io)?;
        written += b.len() as u64 + pad;
    }
    Ok(written)
}

/// Writes a safetensors file atomically, asking `fill(i)` for the bytes of tensor `i` in
/// order; each answer must be exactly `specs[i].nbytes()` long.
pub fn write_streaming(
    path: &Path,
    specs: &[TensorSpec],
    fill: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let head = header(specs)?;
    write_file_atomic(path, |f| {
        f.write_all(&head).map_err(|e| TernError::io(path, e))?;
        let sizes = specs.iter().map(|s| (s.name.as_str(), s.nbytes()));
        stream_tensors(f, path, sizes, 1, fill).map(|_| ())
    })
}

/// Writes tensors to a safetensors file atomically.
pub fn write_atomic(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let tensors = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, t)| TensorSpec {
            name: n.clone(),
            dtype: t.dtype(),
            shape: t.dims().to_vec(),
        })
        .collect();
    write_streaming(path, &specs, |i| tensor_bytes(&tensors[i].1))
}

/// A tensor's data as little-endian bytes.
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    fn to_bytes<T: candle_core::WithDType + Copy>(t: &Tensor) -> Result<Vec<u8>> {
        let v = t.flatten_all()?.to_vec1::<T>()?;
        let n = std::mem::size_of_val(v.as_slice());
        // SAFETY: plain-old-data numeric slice reinterpreted as bytes of the same length.
        let bytes = unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, n) };
        Ok(bytes.to_vec())
    }
    match t.dtype() {
        DType::F32 => to_bytes::<f32>(t),
        DType::F16 => to_bytes::<half::f16>(t),
        DType::BF16 => to_bytes::<half::bf16>(t),
        DType::F64 => to_bytes::<f64>(t),
        DType::I64 => to_bytes::<i64>(t),
        DType::U32 => to_bytes::<u32>(t),
        DType::U8 => to_bytes::<u8>(t),
        other => Err(TernError::InvalidArgument(format!(
            "cannot serialise dtype {other:?}"
        ))),
    }
}
