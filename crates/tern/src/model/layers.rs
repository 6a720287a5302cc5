//! The small building blocks: a linear layer over float or quantized weights, RMSNorm, and
//! the gated MLP.

use super::config::ModelConfig;
use crate::checkpoint::Weights;
use crate::error::Result;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};

/// Rows at or above which a quantized matmul dequantizes its weight and runs an f32 GEMM.
///
/// Quantized matmul rounds activations to 8 bits; over many layers the rounding turns
/// float-order noise into logit noise of ~0.5 on small models, enough to flip near-tied first
/// tokens. Prefill is compute-bound, so dequantizing one weight at a time there costs little
/// and gives logits exact to the stored weights; decode (one row) keeps the int8 dot products
/// that make it bandwidth-efficient.
pub const DEQUANT_MIN_ROWS: usize = 8;

/// `y = x W^T (+ b)`, with `W` float or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    w: QMatMul,
    b: Option<Tensor>,
    quantized: bool,
}

impl Linear {
    /// Loads `{prefix}.weight` `[out, in]` and, when `bias`, `{prefix}.bias` `[out]`.
    pub fn load(
        w: &Weights,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.matmul(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let b = if bias {
            Some(w.float(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Self::new(weight, b))
    }

    /// Wraps an existing weight.
    pub fn new(w: QMatMul, b: Option<Tensor>) -> Self {
        let quantized = matches!(w, QMatMul::QTensor(_));
        Self { w, b, quantized }
    }

    /// Applies the layer to `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Quantized matmul takes f32 activations; convert around it for other dtypes.
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
        let y = match &self.w {
            QMatMul::QTensor(q) if rows >= DEQUANT_MIN_ROWS => {
                let w = q.dequantize(x.device())?.to_dtype(x.dtype())?;
                x.broadcast_matmul(&w.t()?)?
            }
            _ if self.quantized && x.dtype() != DType::F32 => self
                .w
                .forward(&x.to_dtype(DType::F32)?)?
                .to_dtype(x.dtype())?,
            _ => self.w.forward(x)?,
        };
        match &self.b {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }
}

/// Root-mean-square layer norm.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    w: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Loads `{name}` of shape `[dim]`.
    pub fn load(w: &Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            w: w.float(name, &[dim])?,
            eps: eps as f32,
        })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.w,
            self.eps,
        )?)
    }
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    /// Loads `{prefix}.gate_proj`, `up_proj`, `down_proj`.
    pub fn load(w: &Weights, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate: Linear::load(w, &format!("{prefix}.gate_proj"), i, h, b)?,
            up: Linear::load(w, &format!("{prefix}.up_proj"), i, h, b)?,
            down: Linear::load(w, &format!("{prefix}.down_proj"), h, i, b)?,
        })
    }

    /// Applies the MLP.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate.forward(x)?.silu()?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}
