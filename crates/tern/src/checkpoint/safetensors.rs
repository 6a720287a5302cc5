//! The safetensors header, validated.
//!
//! We parse the header ourselves rather than through the `safetensors` crate so each kind of
//! corruption (truncated file, header past the end, bad JSON, out-of-range or overlapping
//! offsets, unknown dtype) becomes its own typed error naming the file and tensor, and so
//! tensors are built straight from the mapped bytes (see `tensor_file.rs`).

use crate::error::{Result, TernError};
use candle_core::DType;

use std::collections::HashMap;
use std::path::Path;

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

/// Validates the header; returns the start of the data section and the entries.
pub(crate) fn parse_header(
    path: &Path,
    buf: &[u8],
) -> Result<(usize, HashMap<String, TensorEntry>)> {
    let file = || path.to_path_buf();
    if buf.len() < 8 {
        return Err(TernError::Truncated {
            file: file(),
            detail: format!(
                "{} bytes, too short for the 8-byte header length",
                buf.len()
            ),
        });
    }
    let header_len = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    let file_len = buf.len() as u64;
    if header_len > file_len.saturating_sub(8) {
        return Err(TernError::HeaderPastEnd {
            file: file(),
            header_len,
            file_len,
        });
    }
    let data_start = 8 + header_len as usize;
    let raw: HashMap<String, serde_json::Value> = serde_json::from_slice(&buf[8..data_start])
        .map_err(|e| TernError::HeaderNotJson {
            file: file(),
            detail: e.to_string(),
        })?;
    let data_len = buf.len() - data_start;
    let mut entries = HashMap::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let r: RawEntry = serde_json::from_value(value).map_err(|e| TernError::HeaderNotJson {
            file: file(),
            detail: format!("entry `{name}`: {e}"),
        })?;
        let dtype = parse_dtype(&r.dtype).ok_or_else(|| TernError::UnknownDtype {
            file: file(),
            tensor: name.clone(),
            dtype: r.dtype.clone(),
        })?;
        let [start, end] = r.data_offsets;
        let numel = r
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size_in_bytes()));
        let bad = |detail: String| TernError::BadOffsets {
            file: file(),
            tensor: name.clone(),
            detail,
        };
        if start > end {
            return Err(bad(format!("start {start} is after end {end}")));
        }
        if end > data_len {
            // A header whose offsets are fine but whose file is short is a truncated file;
            // offsets beyond any plausible size are corruption. Both name the tensor.
            return Err(TernError::Truncated {
                file: file(),
                detail: format!(
                    "tensor `{name}` needs bytes {start}..{end} of the data section, which has {data_len}"
                ),
            });
        }
        match numel {
            Some(n) if n == end - start => {}
            _ => {
                return Err(bad(format!(
                    "{} bytes for shape {:?} of {}",
                    end - start,
                    r.shape,
                    r.dtype
                )))
            }
        }
        entries.insert(
            name,
            TensorEntry {
                dtype,
                shape: r.shape,
                start,
                end,
            },
        );
    }
    let mut spans: Vec<(&String, &TensorEntry)> = entries.iter().collect();
    spans.sort_by_key(|(_, e)| (e.start, e.end));
    for w in spans.windows(2) {
        let (a, ea) = w[0];
        let (b, eb) = w[1];
        if eb.start < ea.end && eb.end > eb.start && ea.end > ea.start {
            return Err(TernError::OverlappingTensors {
                file: file(),
                first: a.clone(),
                second: b.clone(),
            });
        }
    }
    Ok((data_start, entries))
}

pub use super::tensor_file::{TensorEntry, TensorFile};
pub use super::writer::write_atomic;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use std::path::PathBuf;

    fn write_raw(dir: &Path, header: &str, data: &[u8]) -> PathBuf {
        let p = dir.join("m.safetensors");
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        std::fs::write(&p, b).unwrap();
        p
    }

    #[test]
    fn round_trip_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.safetensors");
        let t = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        write_atomic(&p, &[("w".into(), t.clone())]).unwrap();
        let f = TensorFile::open(&p).unwrap();
        let back = f.tensor("w", DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(back.dtype(), DType::BF16);
        let back = back.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(back, vec![vec![0., 1., 2.], vec![3., 4., 5.]]);
        // no temp file left behind
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn each_corruption_has_its_own_error() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        // truncated before the header length
        let p = dir.join("short.safetensors");
        std::fs::write(&p, [1u8, 2, 3]).unwrap();
        assert!(matches!(
            TensorFile::open(&p),
            Err(TernError::Truncated { .. })
        ));
        // header length past the end
        let p = dir.join("past.safetensors");
        let mut b = 1000u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        std::fs::write(&p, b).unwrap();
        assert!(matches!(
            TensorFile::open(&p),
            Err(TernError::HeaderPastEnd {
                header_len: 1000,
                ..
            })
        ));
        // header not json
        let p = write_raw(dir, "{not json", &[]);
        assert!(matches!(
            TensorFile::open(&p),
            Err(TernError::HeaderNotJson { .. })
        ));
        // unknown dtype
        let p = write_raw(
            dir,
            r#"{"w":{"dtype":"Q7","shape":[1],"data_offsets":[0,4]}}"#,
            &[0; 4],
        );
        match TensorFile::open(&p) {
            Err(TernError::UnknownDtype { tensor, dtype, .. }) => {
                assert_eq!((tensor.as_str(), dtype.as_str()), ("w", "Q7"))
            }
            other => panic!("{other:?}"),
        }
        // data section shorter than the offsets: truncated, naming the tensor
        let p = write_raw(
            dir,
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            &[0; 8],
        );
        let err = TensorFile::open(&p).unwrap_err();
        assert!(matches!(err, TernError::Truncated { .. }));
        assert!(err.to_string().contains("`w`"));
        // size inconsistent with shape
        let p = write_raw(
            dir,
            r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        assert!(matches!(
            TensorFile::open(&p),
            Err(TernError::BadOffsets { .. })
        ));
        // overlapping tensors
        let p = write_raw(
            dir,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            &[0; 12],
        );
        assert!(matches!(
            TensorFile::open(&p),
            Err(TernError::OverlappingTensors { .. })
        ));
        // missing tensor
        let p = write_raw(
            dir,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        let f = TensorFile::open(&p).unwrap();
        assert!(matches!(
            f.tensor("b", DType::F32, &Device::Cpu),
            Err(TernError::MissingTensor { .. })
        ));
        // missing file
        assert!(matches!(
            TensorFile::open(&dir.join("nope.safetensors")),
            Err(TernError::MissingFile { .. })
        ));
    }
}
