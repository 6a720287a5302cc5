//! Quantized weight kernels tern provides itself, where candle's CPU backend has no SIMD path.

pub mod q4_1;
pub mod q8_0;
