//! The small building blocks: a linear layer over float or quantized weights, the embedding,
//! and the gated MLP (RMSNorm lives in `norm.rs`).

use super::config::ModelConfig;
use super::train_ops::linear::{HalfPacks, WeightFn};
use crate::checkpoint::Weights;
use crate::error::{Result, TernError};
use crate::lora::{BatchAdapters, HalfProducts, LoraPair};
use crate::quant::{half_float::HalfMatrix, q8_0::Q8_0Matrix, q8_0_head::Q8_0Head, RowKernel};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};
use std::sync::Arc;

pub use super::norm::RmsNorm;

/// Rows at or above which a quantized matmul multiplies exactly: with f32 activations, through
/// the kernel's own exact product where it has one (Q4_1, Q5_0 and Q8_0 in eight-row groups),
/// else by dequantizing the weight for an f32 GEMM.
///
/// Quantized matmul rounds activations to 8 bits; over many layers the rounding turns
/// float-order noise into logit noise of ~0.5 on small models, enough to flip near-tied first
/// tokens. Prefill is compute-bound, so the exact product there costs little and gives logits
/// exact to the stored weights; decode (one row) keeps the int8 dot products that make it
/// bandwidth-efficient. (Dequantizing every matrix for a short prompt cost more than the
/// products: a 15-token prompt took ~300 ms on SmolLM2 Q4_1, ~50 ms with the exact kernel.)
///
/// Counted in positions per sequence (`x`'s second-to-last dimension when it has three), so a
/// batch of decode rows `[b, 1, hidden]` from many sequences stays on the int8 kernels, which
/// read each weight once for the whole batch, and gives each row exactly what it would get
/// alone.
pub const DEQUANT_MIN_ROWS: usize = 8;

/// Decode rows at or above which the dequantized GEMM wins anyway (the int8 kernels' work
/// grows with the rows; the GEMM's fixed cost of dequantizing is then amortised).
pub const DEQUANT_MIN_DECODE_ROWS: usize = 64;

/// Whether `x` is a prompt's worth of positions (or a batch of decode rows large enough) for
/// the prefill products: see [`DEQUANT_MIN_ROWS`] and [`DEQUANT_MIN_DECODE_ROWS`].
fn is_prompt(x: &Tensor) -> bool {
    let cols = x.dims().last().copied().unwrap_or(1).max(1);
    let rows = x.elem_count() / cols;
    let positions = match x.dims() {
        [.., s, _] if x.rank() >= 3 => *s,
        _ => 1,
    };
    positions >= DEQUANT_MIN_ROWS || rows >= DEQUANT_MIN_DECODE_ROWS
}

/// Where a linear layer's weight lives and which kernel multiplies by it.
#[derive(Debug, Clone)]
enum LinearWeight {
    /// candle's float or quantized matmul.
    Candle(QMatMul),
    /// One of tern's own kernels: Q4_1 (candle's is scalar) or the exact Q8_0 head.
    Kernel(Arc<dyn RowKernel>),
}

impl LinearWeight {
    /// The weight as a float `[out, in]` tensor in `dtype` (dequantized when stored
    /// quantized; a float weight is shared, not copied, when already in `dtype`).
    fn float(&self, dtype: DType, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        match self {
            LinearWeight::Candle(QMatMul::Tensor(t))
            | LinearWeight::Candle(QMatMul::TensorF16(t)) => t.to_dtype(dtype),
            LinearWeight::Candle(QMatMul::QTensor(q)) => q.dequantize(device)?.to_dtype(dtype),
            LinearWeight::Kernel(m) => m
                .dequantize(device)
                .map_err(crate::TernError::into_candle)?
                .to_dtype(dtype),
        }
    }
}

/// `y = x W^T (+ b)`, with `W` float or quantized, plus the LoRA delta of whatever adapter
/// each batch row uses (found by the layer's slot number).
#[derive(Debug, Clone)]
pub struct Linear {
    w: LinearWeight,
    b: Option<Tensor>,
    /// Hugging Face module name (`model.layers.0.self_attn.q_proj`).
    name: String,
    /// Index in the model's slot table, once the model has numbered its layers.
    slot: Option<usize>,
    /// The weight packed for half-width training products, made on first use (shared by
    /// clones), one slot per kind.
    half: Arc<[std::sync::OnceLock<Arc<HalfPacks>>; 2]>,
    /// Prompts go through the int8 kernels too (see [`Linear::set_int8_prompts`]).
    int8_prompts: bool,
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
        let mut l = Self::new(weight, b);
        l.name = prefix.to_string();
        Ok(l)
    }

    /// An output head over the Q8_0 blocks `data` of a `[rows, cols]` matrix whose logits are
    /// exact to the stored weights (in the head's column layout when the rows allow it).
    pub fn exact_q8_0(rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        let m: Arc<dyn RowKernel> = match Q8_0Head::new(rows, cols, &data) {
            Ok(h) => Arc::new(h),
            Err(_) => Arc::new(Q8_0Matrix::new(rows, cols, data)?),
        };
        Ok(Self {
            w: LinearWeight::Kernel(m),
            b: None,
            name: "lm_head".into(),
            slot: None,
            half: Default::default(),
            int8_prompts: false,
        })
    }

    /// Wraps an existing weight.
    pub fn new(w: QMatMul, b: Option<Tensor>) -> Self {
        let w = match &w {
            QMatMul::QTensor(q) => match crate::quant::layer_kernel(q) {
                Some(k) => LinearWeight::Kernel(k),
                None => LinearWeight::Candle(w),
            },
            _ => LinearWeight::Candle(w),
        };
        Self {
            w,
            b,
            name: String::new(),
            slot: None,
            half: Default::default(),
            int8_prompts: false,
        }
    }

    /// Names the layer (for layers not built by [`Linear::load`]).
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// The Hugging Face module name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match &self.w {
            LinearWeight::Candle(QMatMul::Tensor(t))
            | LinearWeight::Candle(QMatMul::TensorF16(t)) => t.dims2()?,
            LinearWeight::Candle(QMatMul::QTensor(q)) => q.shape().dims2()?,
            LinearWeight::Kernel(m) => m.dims(),
        })
    }

    /// The layer's slot number in the model's table.
    pub fn slot(&self) -> Option<usize> {
        self.slot
    }

    /// Runs prompts (many positions) through the kernel's int8 product as well, rounding
    /// activations to 8 bits as decode and llama.cpp do, instead of the exact product: about
    /// half the prompt time on tern's own kernels (Q4_1, Q5_0, Q8_0). Other weights are
    /// unaffected.
    pub fn set_int8_prompts(&mut self, on: bool) {
        self.int8_prompts = on;
    }

    /// Gives the layer its slot number in the model's table.
    pub(crate) fn set_slot(&mut self, slot: usize) {
        self.slot = Some(slot);
    }

    /// The frozen base layer for a training step: `x W^T` computed outside the graph and
    /// re-attached by [`FrozenMatmul`], whose backward gives only `dL/dx`.
    fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        let in_dim = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / in_dim.max(1);
        let w = self.w.float(x.dtype(), x.device())?;
        let x2 = x.reshape((rows, in_dim))?;
        let y = x2.detach().matmul(&w.t()?)?;
        drop(w);
        let y = x2.apply_op2(&y, FrozenMatmul { w: self.w.clone() })?;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = y.dim(1)?;
        self.add_bias(y.reshape(dims)?)
    }

    /// The weight packed for `kind`'s products (forward and backward), packed on first use.
    fn half_packs(&self, kind: HalfProducts) -> Result<Arc<HalfPacks>> {
        let slot = &self.half[kind as usize];
        if let Some(p) = slot.get() {
            return Ok(p.clone());
        }
        let w = self.w.float(DType::F32, &candle_core::Device::Cpu)?;
        let (out, inp) = w.dims2()?;
        let v: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let packs = Arc::new(HalfPacks::new(kind, &v, out, inp));
        Ok(slot.get_or_init(|| packs).clone())
    }

    /// A training step's layer as one op with its own backward (f32 on the CPU, one adapter
    /// for the whole batch); `None` where the candle-op path must run.
    fn forward_train(&self, x: &Tensor, adapters: &BatchAdapters) -> Result<Option<Tensor>> {
        use super::train_ops::linear::{Frozen, Lora};
        let in_dim = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / in_dim.max(1);
        let Some(proj) = self.train_proj(rows, adapters)? else {
            return Ok(None);
        };
        // The ops take `x` at any rank: no reshapes (graph nodes) around them.
        let x2 = x.contiguous()?;
        let (w, half) = (proj.w, proj.half);
        let y = match proj.pair {
            None => x2.apply_op1(Frozen { w, half })?,
            Some(p) => {
                let (a, bt) = (p.a.contiguous()?, p.bt.contiguous()?);
                x2.apply_op3(&a, &bt, Lora::new(w, half, p.scale, p.mask))?
            }
        };
        Ok(Some(self.add_bias(y)?))
    }

    /// This layer as a training op takes it, over `rows` input rows: the frozen weight and
    /// the adapter's pair (f32 variables) with its dropout mask. `None` where rows
    /// have different adapters or the pair is not f32 (the candle-op path runs instead).
    /// The bias is the caller's.
    pub(crate) fn train_proj(
        &self,
        rows: usize,
        adapters: &BatchAdapters,
    ) -> Result<Option<super::train_ops::layer::Proj>> {
        use super::train_ops::layer::{Proj, ProjPair};
        let Some(pair) = adapters.whole_batch_pair(self.slot) else {
            return Ok(None);
        };
        if pair.is_some_and(|(p, _)| p.a.dtype() != DType::F32 || p.bt.dtype() != DType::F32) {
            return Ok(None);
        }
        let (w, half) = self.train_weight(adapters)?;
        let pair = match pair {
            None => None,
            Some((p, dropout)) => {
                let in_dim = p.a.dim(1)?;
                let mask = dropout.map(|(rate, seed)| {
                    crate::lora::apply::dropout_keep(
                        rows * in_dim,
                        rate,
                        seed,
                        self.slot.unwrap_or(0),
                    )
                });
                // The variables themselves: the fused layer's gradients are keyed by their ids.
                Some(ProjPair {
                    a: p.a.clone(),
                    bt: p.bt.clone(),
                    scale: p.scale as f32,
                    mask,
                })
            }
        };
        Ok(Some(Proj { w, half, pair }))
    }

    /// Whether the layer adds a bias.
    pub(crate) fn has_bias(&self) -> bool {
        self.b.is_some()
    }

    /// The frozen weight as a training op takes it: its f32 source (dequantizing when stored
    /// quantized) and, with half-width products on, its packs.
    fn train_weight(&self, adapters: &BatchAdapters) -> Result<(WeightFn, Option<Arc<HalfPacks>>)> {
        let w = self.w.clone();
        let w: WeightFn = Arc::new(move || w.float(DType::F32, &candle_core::Device::Cpu));
        let half = adapters
            .half_base()
            .filter(|&k| super::train_ops::linear::available(k))
            .map(|k| self.half_packs(k))
            .transpose()?;
        Ok((w, half))
    }

    /// A training step's loss per row of `h` `[n, hidden]` through this layer as the output
    /// head, as one op (see `train_ops::head_loss`): the layer frozen, without bias or
    /// adapter, `h` f32 on the CPU. `None` otherwise.
    pub(crate) fn head_nll(
        &self,
        h: &Tensor,
        targets: &[u32],
        adapters: &BatchAdapters,
        grad: bool,
    ) -> Result<Option<Tensor>> {
        if self.b.is_some()
            || !super::train_ops::fits(h)
            || !matches!(adapters.whole_batch_pair(self.slot), Some(None))
        {
            return Ok(None);
        }
        let (w, half) = self.train_weight(adapters)?;
        Ok(Some(super::train_ops::head_loss::head_nll(
            h, targets, w, half, grad,
        )?))
    }

    /// The base layer plus each row's LoRA delta.
    pub fn forward_with(&self, x: &Tensor, adapters: &BatchAdapters) -> Result<Tensor> {
        if adapters.is_training() && super::train_ops::fits(x) {
            if let Some(y) = self.forward_train(x, adapters)? {
                return Ok(y);
            }
        }
        let y = if adapters.is_training() && x.device().is_cpu() {
            self.forward_frozen(x)?
        } else {
            self.forward_dense_if(x, adapters.is_training())?
        };
        self.with_adapter(x, y, adapters)
    }

    /// Whether `adapters` put a LoRA delta on this layer's output.
    fn adapted(&self, adapters: &BatchAdapters) -> bool {
        self.slot.is_some() && !adapters.is_empty()
    }

    /// `y` (the base layer's output for `x`) plus each row's LoRA delta.
    fn with_adapter(&self, x: &Tensor, y: Tensor, adapters: &BatchAdapters) -> Result<Tensor> {
        match self.slot {
            Some(slot) if self.adapted(adapters) => adapters.apply(slot, x, y),
            _ => Ok(y),
        }
    }

    /// [`Linear::forward_with`] for several layers that read the same `x` (q/k/v, gate/up).
    /// At inference on the CPU, when every layer runs `x` through an eight-row int8 kernel,
    /// `x` is rounded once and all their weights go through one pass of the worker pool:
    /// fewer serial steps between the pool's passes at the same values. Otherwise, one
    /// `forward_with` per layer.
    pub fn forward_many(
        layers: &[&Linear],
        x: &Tensor,
        adapters: &BatchAdapters,
    ) -> Result<Vec<Tensor>> {
        let kernels: Option<Vec<&dyn RowKernel>> = layers
            .iter()
            .map(|l| l.eight_row_kernel(x, adapters))
            .collect();
        let shared = match kernels {
            Some(ks) => super::int8_products::shared(&ks, x)?,
            None => None,
        };
        let Some(ys) = shared else {
            return layers.iter().map(|l| l.forward_with(x, adapters)).collect();
        };
        layers
            .iter()
            .zip(ys)
            .map(|(l, y)| l.with_adapter(x, l.add_bias(y)?, adapters))
            .collect()
    }

    /// The eight-row int8 kernel [`Linear::forward_dense_if`] would run f32 `x` through at
    /// inference, if any.
    fn eight_row_kernel(&self, x: &Tensor, ad: &BatchAdapters) -> Option<&dyn RowKernel> {
        match &self.w {
            LinearWeight::Kernel(k)
                if !ad.is_training()
                    && x.dtype() == DType::F32
                    && self.int8_for(x)
                    && k.shared_groups() > 0 =>
            {
                Some(k.as_ref())
            }
            _ => None,
        }
    }

    /// As [`Linear::eight_row_kernel`], when the layer's output is that product alone: no
    /// bias, and no adapter on it in `ad`.
    fn bare_eight_row_kernel(&self, x: &Tensor, ad: &BatchAdapters) -> Option<&dyn RowKernel> {
        let bare = self.b.is_none() && !self.adapted(ad);
        self.eight_row_kernel(x, ad).filter(|_| bare)
    }

    /// Whether [`Linear::forward_dense_if`] would run `x` through the kernel's int8 product.
    fn int8_for(&self, x: &Tensor) -> bool {
        x.device().is_cpu() && (self.int8_prompts || !is_prompt(x))
    }

    /// `W += sign * scale * B A` (sign 1 merges, -1 unmerges), in f32, stored back in
    /// `dtype`. A quantized weight becomes a float one: the sum is not on the quantization
    /// grid.
    pub fn merge(&mut self, pair: &LoraPair, sign: f64, dtype: DType) -> Result<()> {
        let w = match &self.w {
            LinearWeight::Candle(QMatMul::Tensor(t))
            | LinearWeight::Candle(QMatMul::TensorF16(t)) => t.clone(),
            LinearWeight::Candle(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
            LinearWeight::Kernel(m) => m.dequantize(pair.a.device())?,
        };
        let delta = (pair.delta_weight()?.to_device(w.device())? * sign)?;
        let merged = (w.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?;
        self.w = LinearWeight::Candle(QMatMul::Tensor(merged));
        self.half = Default::default(); // packed from the old weight
        Ok(())
    }

    /// Whether the weight is stored quantized.
    pub fn is_quantized(&self) -> bool {
        !matches!(
            self.w,
            LinearWeight::Candle(QMatMul::Tensor(_)) | LinearWeight::Candle(QMatMul::TensorF16(_))
        )
    }

    /// Applies the layer to `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_dense_if(x, false)
    }

    /// As [`Linear::forward`]; `dense` forces the dequantized GEMM for quantized weights
    /// (training needs it: the int8 kernels pass no gradient to `x`).
    fn forward_dense_if(&self, x: &Tensor, force_dense: bool) -> Result<Tensor> {
        let prefill = force_dense || is_prompt(x);
        // Dequantized weight times x in x's dtype (the exact, compute-bound prefill path).
        let dense =
            |w: Tensor| -> Result<Tensor> { Ok(x.broadcast_matmul(&w.to_dtype(x.dtype())?.t()?)?) };
        // Quantized kernels take f32 activations; convert around them for other dtypes.
        let in_f32 = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<Tensor> {
            Ok(f(&x.to_dtype(DType::F32)?.contiguous()?)?.to_dtype(x.dtype())?)
        };
        let y = match &self.w {
            // Prompts through the int8 product when asked (as decode and llama.cpp).
            LinearWeight::Kernel(m) if prefill && !force_dense && self.int8_prompts => {
                in_f32(&|x| super::int8_products::single(m.as_ref(), x))?
            }
            // The kernel's own exact product where it has one: no dequantized copy of the
            // matrix (for a short prompt, writing that copy cost more than the product).
            LinearWeight::Kernel(m) if prefill && !force_dense && x.device().is_cpu() => {
                match m.forward_exact(&x.to_dtype(DType::F32)?)? {
                    Some(y) => y.to_dtype(x.dtype())?,
                    None => dense(m.dequantize(x.device())?)?,
                }
            }
            LinearWeight::Kernel(m) if prefill => dense(m.dequantize(x.device())?)?,
            LinearWeight::Kernel(m) => in_f32(&|x| super::int8_products::single(m.as_ref(), x))?,
            LinearWeight::Candle(QMatMul::QTensor(q)) if prefill => {
                dense(q.dequantize(x.device())?)?
            }
            LinearWeight::Candle(w @ QMatMul::QTensor(_)) if x.dtype() != DType::F32 => {
                in_f32(&|x| Ok(w.forward(x)?))?
            }
            // Decode rows and short prompts over a float weight (f32; bf16 and f16 with
            // AVX-512): one pass over the weight for all of them (candle's GEMM packs the whole
            // weight on every call, which cost a 13-token f32 prompt 150 ms where this takes 36;
            // its single-row path was also slower).
            LinearWeight::Candle(QMatMul::Tensor(w))
                if !force_dense
                    && x.elem_count() <= crate::quant::dense::MAX_ROWS * w.dim(1)? =>
            {
                match crate::quant::dense::forward(w, x)? {
                    Some(y) => y,
                    None => x.broadcast_matmul(&w.t()?)?,
                }
            }
            LinearWeight::Candle(w) => w.forward(x)?,
        };
        self.add_bias(y)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.b {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }
}

/// Re-attaches a product `y = x W^T` computed outside the graph, with the backward a frozen
/// weight needs: `dL/dx = dL/dy W` only. candle's matmul backward also forms `x^T dL/dy` for
/// the weight whether or not anything wants it, and keeps it until the end of the backward
/// pass: one weight-sized tensor per layer (x the batch, for 3-d inputs), gigabytes even for
/// a 135M model, and half the backward's arithmetic.
///
/// It holds the layer's stored weight, not a float copy, and dequantizes it again in backward:
/// over a quantized base (QLoRA) a copy kept per layer from forward to backward would bring
/// back the float model's memory.
struct FrozenMatmul {
    w: LinearWeight,
}

impl candle_core::CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        y: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        pass_through(y, l)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let w = self.w.float(grad.dtype(), grad.device())?;
        Ok((Some(grad.matmul(&w)?), None))
    }
}

/// The forward of an op that re-attaches a value computed outside the graph: a contiguous
/// copy of it (float dtypes).
pub(crate) fn pass_through(
    y: &candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    use candle_core::CpuStorage as S;
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("re-attached value is not contiguous".into()))?;
    let out = match y {
        S::F32(v) => S::F32(v[a..b].to_vec()),
        S::F16(v) => S::F16(v[a..b].to_vec()),
        S::BF16(v) => S::BF16(v[a..b].to_vec()),
        S::F64(v) => S::F64(v[a..b].to_vec()),
        _ => candle_core::bail!("re-attached value must be a float tensor"),
    };
    Ok((out, l.shape().clone()))
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

    /// Applies the MLP with each row's adapter.
    pub fn forward(&self, x: &Tensor, ad: &BatchAdapters) -> Result<Tensor> {
        // Decode rows with no adapter on gate or up: both products and the activation in one
        // pass of the pool.
        if let (Some(g), Some(u)) = (
            self.gate.bare_eight_row_kernel(x, ad),
            self.up.bare_eight_row_kernel(x, ad),
        ) {
            if let Some(h) = super::int8_products::swiglu(g, u, x)? {
                return self.down.forward_with(&h, ad);
            }
        }
        let [g, u]: [Tensor; 2] = Linear::forward_many(&[&self.gate, &self.up], x, ad)?
            .try_into()
            .expect("one output per layer");
        // The fused op in inference too: candle's `silu` then `*` were two passes, two
        // tensors and libm's exp, ~4% of a batched decode step.
        let h = if super::train_ops::fits(&g) {
            g.contiguous()?
                .apply_op2(&u.contiguous()?, super::train_ops::pointwise::SwiGlu)?
        } else {
            (g.silu()? * u)?
        };
        self.down.forward_with(&h, ad)
    }

    /// Whether any of its layers keeps quantized weights.
    pub fn is_quantized(&self) -> bool {
        [&self.gate, &self.up, &self.down]
            .iter()
            .any(|l| l.is_quantized())
    }

    /// Its three linear layers.
    pub fn linears_mut(&mut self) -> [&mut Linear; 3] {
        [&mut self.gate, &mut self.up, &mut self.down]
    }

    /// Gate, up, down.
    pub(crate) fn linears(&self) -> [&Linear; 3] {
        [&self.gate, &self.up, &self.down]
    }
}

/// Token embedding: a float table, or quantized rows dequantized only when looked up (an f32
/// copy of a large vocabulary costs gigabytes: 2 GB for Llama 3 8B).
#[derive(Debug, Clone)]
pub enum Embedding {
    /// A float `[vocab, hidden]` table.
    Float(Tensor),
    /// GGML blocks, one row per token.
    Quant(Arc<candle_core::quantized::QTensor>),
    /// bf16 or f16 rows widened as they are looked up (the tied head multiplies by the same
    /// tensor, so the table is stored once at half width).
    Half(Arc<HalfMatrix>),
}

impl Embedding {
    /// Rows for `ids` (flat), as `[n, hidden]` in `dtype`.
    pub fn lookup(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        match self {
            Embedding::Float(t) => Ok(t.index_select(ids, 0)?),
            Embedding::Half(m) => {
                let rows = m.rows(&ids.to_vec1::<u32>()?)?;
                let n = rows.len() / m.dims().1;
                Ok(Tensor::from_vec(rows, (n, m.dims().1), ids.device())?.to_dtype(dtype)?)
            }
            Embedding::Quant(q) => {
                let (vocab, hidden) = q.shape().dims2()?;
                let row_bytes = hidden / q.dtype().block_size() * q.dtype().type_size();
                let data = q.data()?;
                let rows = ids
                    .to_vec1::<u32>()?
                    .into_iter()
                    .map(|id| {
                        let id = id as usize;
                        if id >= vocab {
                            return Err(TernError::InvalidArgument(format!(
                                "token id {id} is outside the embedding of {vocab} rows"
                            )));
                        }
                        let raw = &data[id * row_bytes..(id + 1) * row_bytes];
                        let row = candle_core::quantized::ggml_file::qtensor_from_ggml(
                            q.dtype(),
                            raw,
                            vec![1, hidden],
                            &q.device(),
                        )?;
                        Ok(row.dequantize(&q.device())?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&rows, 0)?.to_dtype(dtype)?)
            }
        }
    }
}
