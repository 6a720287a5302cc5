//! Legacy PyTorch checkpoints (`torch.save` zip files: `pytorch_model.bin`,
//! `adapter_model.bin`): the pickle is read by tern's own non-executing reader, and each
//! tensor becomes a byte range of the mapped file (torch stores entries uncompressed, so
//! nothing is copied until a tensor is built).

use super::pickle;
use super::tensor_file::TensorEntry;
use crate::error::{Result, TernError};
use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;

fn bad(path: &Path, detail: String) -> TernError {
    TernError::Pickle {
        file: path.to_path_buf(),
        detail,
    }
}

/// The tensors of a torch zip, as byte ranges of `buf` (the whole file).
pub(crate) fn index(path: &Path, buf: &[u8]) -> Result<HashMap<String, TensorEntry>> {
    let zip_err = |e: zip::result::ZipError| TernError::Truncated {
        file: path.to_path_buf(),
        detail: format!("not a readable zip archive ({e}); the file is truncated or corrupt"),
    };
    let mut zip = zip::ZipArchive::new(Cursor::new(buf)).map_err(zip_err)?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.to_string()))
        .collect::<std::result::Result<_, _>>()
        .map_err(zip_err)?;
    let pkl: Vec<&String> = names.iter().filter(|n| n.ends_with("data.pkl")).collect();
    let [pkl] = pkl.as_slice() else {
        return Err(bad(
            path,
            format!(
                "expected one data.pkl in the zip, found {}: not a torch.save file",
                pkl.len()
            ),
        ));
    };
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        if s.trim() != "little" {
            return Err(bad(
                path,
                format!("byte order `{}` is not supported", s.trim()),
            ));
        }
    }
    let mut program = Vec::new();
    zip.by_name(pkl)
        .map_err(zip_err)?
        .read_to_end(&mut program)
        .map_err(|e| TernError::io(path, e))?;
    let top = pickle::read(path, &program)?;
    let mut out = HashMap::new();
    for (name, t) in pickle::state_dict(path, top)? {
        let entry = zip
            .by_name(&format!("{prefix}data/{}", t.key))
            .map_err(|_| {
                bad(
                    path,
                    format!("tensor `{name}`: storage {} is missing from the zip", t.key),
                )
            })?;
        if entry.compression() != zip::CompressionMethod::Stored {
            return Err(bad(path, format!("tensor `{name}`: storage {} is compressed; torch.save never compresses, so the file was repacked (re-save it with torch.save)", t.key)));
        }
        let start = entry
            .data_start()
            .ok_or_else(|| bad(path, format!("tensor `{name}`: no data offset")))?
            as usize;
        let size = entry.size() as usize;
        let el = t.dtype.size_in_bytes();
        let numel: usize = t.shape.iter().product();
        // Row-major contiguity: the only layout a state dict written by save_pretrained has.
        let mut want = 1usize;
        for (d, s) in t.shape.iter().zip(&t.stride).rev() {
            if *d > 1 && *s != want {
                return Err(bad(path, format!("tensor `{name}` is not contiguous (shape {:?}, stride {:?}); save it with .contiguous()", t.shape, t.stride)));
            }
            want *= d;
        }
        let lo = t.offset * el;
        let hi = lo + numel * el;
        if hi > size || start + size > buf.len() {
            return Err(TernError::BadOffsets {
                file: path.to_path_buf(),
                tensor: name,
                detail: format!("needs bytes {lo}..{hi} of a {size}-byte storage"),
            });
        }
        out.insert(
            name,
            TensorEntry {
                dtype: t.dtype,
                shape: t.shape,
                start: start + lo,
                end: start + hi,
            },
        );
    }
    Ok(out)
}
