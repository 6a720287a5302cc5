//! Writing GGUF files (version 3) tensor by tensor: the header and tensor table are written
//! first from the planned shapes and types, then each tensor's bytes as the caller produces
//! them, so a writer never holds more than one tensor. The file appears under its name only
//! when complete (temp file + rename).
//!
//! candle has a GGUF writer, but it takes every tensor at once, which for a 7B model means
//! holding the whole quantized model in memory before the first byte is written.

use super::writer::{stream_tensors, write_file_atomic};
use crate::error::{Result, TernError};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use std::io::Write;
use std::path::Path;

/// Alignment of tensor data (GGUF's default `general.alignment`).
const ALIGN: u64 = 32;

/// One tensor of the file: GGUF name, row-major shape (`[rows, cols]`), and block type.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    /// Name in the file (`blk.0.attn_q.weight`).
    pub name: String,
    /// Shape, outermost first as in safetensors (GGUF stores it innermost first).
    pub dims: Vec<usize>,
    /// Storage type.
    pub dtype: GgmlDType,
}

impl TensorPlan {
    /// Bytes of the tensor's data.
    pub fn nbytes(&self) -> usize {
        let elems: usize = self.dims.iter().product();
        elems / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// ggml's numeric id of a block type.
fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(b: &mut Vec<u8>, key: &str, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.extend(x.to_le_bytes()),
        Value::U16(x) => b.extend(x.to_le_bytes()),
        Value::I16(x) => b.extend(x.to_le_bytes()),
        Value::U32(x) => b.extend(x.to_le_bytes()),
        Value::I32(x) => b.extend(x.to_le_bytes()),
        Value::U64(x) => b.extend(x.to_le_bytes()),
        Value::I64(x) => b.extend(x.to_le_bytes()),
        Value::F32(x) => b.extend(x.to_le_bytes()),
        Value::F64(x) => b.extend(x.to_le_bytes()),
        Value::Bool(x) => b.push(*x as u8),
        Value::String(s) => put_str(b, s),
        Value::Array(items) => {
            let t = items.first().map(value_type).unwrap_or(4);
            if items
                .iter()
                .any(|i| value_type(i) != t || matches!(i, Value::Array(_)))
            {
                return Err(TernError::InvalidArgument(format!(
                    "GGUF metadata `{key}`: arrays must hold one scalar type"
                )));
            }
            b.extend(t.to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(b, key, i)?;
            }
        }
    }
    Ok(())
}

/// The header, metadata and tensor table, padded to the data's alignment.
fn header(meta: &[(String, Value)], tensors: &[TensorPlan]) -> Result<Vec<u8>> {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut b, k);
        b.extend(value_type(v).to_le_bytes());
        put_value(&mut b, k, v)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        let last = *t.dims.last().unwrap_or(&1);
        if !last.is_multiple_of(t.dtype.block_size()) {
            return Err(TernError::InvalidArgument(format!(
                "tensor `{}` {:?}: rows of {last} do not hold whole {:?} blocks of {}",
                t.name,
                t.dims,
                t.dtype,
                t.dtype.block_size()
            )));
        }
        put_str(&mut b, &t.name);
        b.extend((t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            b.extend((*d as u64).to_le_bytes());
        }
        b.extend(ggml_type_id(t.dtype).to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += (t.nbytes() as u64).next_multiple_of(ALIGN);
    }
    b.resize((b.len() as u64).next_multiple_of(ALIGN) as usize, 0);
    Ok(b)
}

/// Writes a GGUF file at `path` atomically: `fill(i)` gives tensor `i`'s bytes, in the order
/// of `tensors`, each exactly [`TensorPlan::nbytes`] long. Returns the file size.
pub fn write_gguf(
    path: &Path,
    meta: &[(String, Value)],
    tensors: &[TensorPlan],
    fill: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<u64> {
    let head = header(meta, tensors)?;
    write_file_atomic(path, |f| {
        f.write_all(&head).map_err(|e| TernError::io(path, e))?;
        let sizes = tensors.iter().map(|t| (t.name.as_str(), t.nbytes()));
        Ok(head.len() as u64 + stream_tensors(f, path, sizes, ALIGN, fill)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Content;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    #[test]
    fn candle_reads_back_what_we_write() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.gguf");
        let w = Tensor::arange(0f32, 64.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 64))
            .unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let n = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let plans = vec![
            TensorPlan {
                name: "a".into(),
                dims: vec![3, 64],
                dtype: GgmlDType::Q8_0,
            },
            TensorPlan {
                name: "n".into(),
                dims: vec![3],
                dtype: GgmlDType::F32,
            },
        ];
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            (
                "xs".to_string(),
                Value::Array(vec![Value::I32(-1), Value::I32(7)]),
            ),
        ];
        let bytes = [
            q.data().unwrap().to_vec(),
            n.to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ];
        write_gguf(&p, &meta, &plans, |i| Ok(bytes[i].clone())).unwrap();
        let mut f = std::fs::File::open(&p).unwrap();
        let c = Content::read(&mut f).unwrap();
        assert_eq!(
            c.metadata["general.architecture"].to_string().unwrap(),
            "llama"
        );
        assert_eq!(c.metadata["xs"].to_vec().unwrap()[1].to_i32().unwrap(), 7);
        let a = c.tensor(&mut f, "a", &Device::Cpu).unwrap();
        assert_eq!(a.shape().dims(), &[3, 64]);
        let back = a.dequantize(&Device::Cpu).unwrap();
        let want = q.dequantize(&Device::Cpu).unwrap();
        let diff: f32 = (back - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(diff, 0.0);
        let nn = c.tensor(&mut f, "n", &Device::Cpu).unwrap();
        assert_eq!(
            nn.dequantize(&Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [1.0, 2.0, 3.0]
        );
    }

    #[test]
    fn a_failed_fill_leaves_no_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.gguf");
        let plans = vec![TensorPlan {
            name: "a".into(),
            dims: vec![4],
            dtype: GgmlDType::F32,
        }];
        let e = write_gguf(&p, &[], &plans, |_| Ok(vec![0u8; 3])).unwrap_err();
        assert!(e.to_string().contains("3 bytes given for 16"), "{e}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
