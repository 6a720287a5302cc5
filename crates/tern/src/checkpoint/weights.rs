//! Loaded weights by Hugging Face tensor name, float or quantized, and the parallel loader
//! that fills them from safetensors files.

use super::safetensors::TensorFile;
use crate::error::{Result, TernError};
use crate::quant::scheme::{layer_count, plan, quantize_tensor, QuantType};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One stored weight: a float tensor, or quantized blocks kept for quantized matmul.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A float tensor in the compute dtype.
    Float(Tensor),
    /// GGML-quantized blocks.
    Quant(Arc<QTensor>),
}

impl Weight {
    /// Shape of the weight.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Weight::Float(t) => t.dims().to_vec(),
            Weight::Quant(q) => q.shape().dims().to_vec(),
        }
    }
}

/// How the weights were read, for the load report.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Checkpoint path.
    pub path: PathBuf,
    /// Wall time of reading and converting all tensors.
    pub elapsed: Duration,
    /// Bytes read from the files.
    pub bytes: u64,
    /// Number of tensors.
    pub tensors: usize,
    /// Which path was taken, e.g. `mmap, 2 threads, bf16->f32`.
    pub path_kind: String,
}

impl LoadReport {
    /// Read throughput in GB/s.
    pub fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e9 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "loaded {} tensors, {:.1} MB in {:.1} ms ({:.2} GB/s) from {} [{}]",
            self.tensors,
            self.bytes as f64 / 1e6,
            self.elapsed.as_secs_f64() * 1e3,
            self.gb_per_s(),
            self.path.display(),
            self.path_kind
        )
    }
}

/// The model's weights by Hugging Face name.
#[derive(Debug)]
pub struct Weights {
    source: PathBuf,
    map: HashMap<String, Weight>,
    dtype: DType,
    device: Device,
    quantized_to: Option<QuantType>,
}

impl Weights {
    /// Wraps an already-filled map.
    pub fn new(
        source: PathBuf,
        map: HashMap<String, Weight>,
        dtype: DType,
        device: Device,
    ) -> Self {
        Self {
            source,
            map,
            dtype,
            device,
            quantized_to: None,
        }
    }

    /// The type float weights were quantized to while loading, if they were.
    pub fn quantized_to(&self) -> Option<QuantType> {
        self.quantized_to
    }

    /// The compute dtype float weights were converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The stored weight of this name, if any.
    pub fn weight(&self, name: &str) -> Option<&Weight> {
        self.map.get(name)
    }

    /// All names, for inspection.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    /// Total parameter count.
    pub fn param_count(&self) -> usize {
        self.map
            .values()
            .map(|w| w.dims().iter().product::<usize>())
            .sum()
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<&Weight> {
        let w = self.map.get(name).ok_or_else(|| TernError::MissingTensor {
            file: self.source.clone(),
            tensor: name.to_string(),
        })?;
        let dims = w.dims();
        if dims != shape {
            return Err(TernError::WrongShape {
                file: self.source.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                actual: dims,
            });
        }
        Ok(w)
    }

    /// A float tensor of the given shape (quantized weights are dequantized).
    pub fn float(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self.get(name, shape)? {
            Weight::Float(t) => Ok(t.clone()),
            Weight::Quant(q) => Ok(q.dequantize(&self.device)?.to_dtype(self.dtype)?),
        }
    }

    /// A matmul weight `[out, in]`: quantized blocks stay quantized.
    pub fn matmul(&self, name: &str, shape: &[usize]) -> Result<QMatMul> {
        match self.get(name, shape)? {
            Weight::Float(t) => Ok(QMatMul::Tensor(t.clone())),
            Weight::Quant(q) => Ok(QMatMul::QTensor(q.clone())),
        }
    }
}

/// Reads every tensor of the given safetensors files into `dtype` on `device`, spreading the
/// work over threads (each file is mapped once; tensors are handed out largest first). With
/// `quantize`, the projection matrices are quantized as they are read (see
/// [`crate::quant::scheme::plan`]), so at most one float copy per thread exists at a time.
pub fn load_safetensors(
    source: &Path,
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    quantize: Option<QuantType>,
) -> Result<(Weights, LoadReport)> {
    let start = Instant::now();
    let mapped: Vec<TensorFile> = files
        .iter()
        .map(|f| TensorFile::open(f))
        .collect::<Result<_>>()?;
    let mut jobs: Vec<(usize, String, usize)> = Vec::new();
    let mut stored = Vec::new();
    for (i, f) in mapped.iter().enumerate() {
        for (name, e) in f.entries() {
            jobs.push((i, name.clone(), e.end - e.start));
            if !stored.contains(&e.dtype) {
                stored.push(e.dtype);
            }
        }
    }
    jobs.sort_by_key(|j| std::cmp::Reverse(j.2));
    let layers = layer_count(jobs.iter().map(|j| j.1.as_str()));
    let bytes: u64 = jobs.iter().map(|j| j.2 as u64).sum();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(jobs.len().max(1))
        .min(8);
    let next = AtomicUsize::new(0);
    let results: Vec<Result<Vec<(String, Weight)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((file, name, _)) = jobs.get(i) else {
                            break;
                        };
                        let t = mapped[*file].tensor(name, dtype, device)?;
                        mapped[*file].release(name);
                        let w = match quantize.and_then(|q| plan(q, name, t.dims(), layers)) {
                            Some(g) => Weight::Quant(Arc::new(quantize_tensor(name, &t, g)?)),
                            None => Weight::Float(t),
                        };
                        out.push((name.clone(), w));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("loader thread panicked"))
            .collect()
    });
    let mut map = HashMap::with_capacity(jobs.len());
    for r in results {
        map.extend(r?);
    }
    let conv: Vec<String> = stored
        .iter()
        .map(|d| {
            if *d == dtype {
                format!("{d:?}").to_lowercase()
            } else {
                format!("{:?}->{:?}", d, dtype).to_lowercase()
            }
        })
        .collect();
    let report = LoadReport {
        path: source.to_path_buf(),
        elapsed: start.elapsed(),
        bytes,
        tensors: map.len(),
        path_kind: format!(
            "mmap, {} file(s), {threads} thread(s), {}{}",
            files.len(),
            conv.join(","),
            match quantize {
                Some(q) => format!(", quantized to {q}"),
                None => String::new(),
            }
        ),
    };
    let mut weights = Weights::new(source.to_path_buf(), map, dtype, device.clone());
    weights.quantized_to = quantize;
    Ok((weights, report))
}
