//! Device and dtype selection. Nothing here touches a GPU until `resolve` is called.

use crate::error::{Result, TernError};
use candle_core::{DType, Device};

/// Where to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// CUDA when built with the `cuda` feature and a GPU is present, else CPU.
    #[default]
    Auto,
    /// Always the CPU.
    Cpu,
    /// CUDA device by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl DeviceKind {
    /// Opens the device; this is the first point at which a GPU context may be created.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceKind::Cpu => Ok(Device::Cpu),
            DeviceKind::Auto => {
                #[cfg(feature = "cuda")]
                if candle_core::utils::cuda_is_available() {
                    return Ok(Device::new_cuda(0)?);
                }
                Ok(Device::Cpu)
            }
            DeviceKind::Cuda(i) => {
                if cfg!(feature = "cuda") {
                    Ok(Device::new_cuda(i)?)
                } else {
                    Err(TernError::InvalidArgument(
                        "CUDA requested but tern was built without the `cuda` feature (rebuild with --features cuda)".into(),
                    ))
                }
            }
        }
    }
}

/// Parses a user-facing dtype name (`f32`, `bf16`, `f16`).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" | "half" => Ok(DType::F16),
        other => Err(TernError::InvalidArgument(format!(
            "unknown dtype `{other}` (choose f32, bf16 or f16)"
        ))),
    }
}

/// The dtype to compute in when the user did not ask: f32 on CPU (fast and exact there),
/// bf16 on GPUs.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// Fixes the CPU thread count for the rest of the process at candle's own choice.
///
/// candle 0.11 re-derives its thread count on every CPU matmul, and without
/// `RAYON_NUM_THREADS` that means parsing `/proc/cpuinfo` each time: ~9% of f32 decode time
/// in perf. Setting the variable once, to the value candle would pick, makes it a lookup.
/// Call it at program start, before other threads exist (it sets an environment variable);
/// an explicit `RAYON_NUM_THREADS` is left alone.
pub fn pin_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
