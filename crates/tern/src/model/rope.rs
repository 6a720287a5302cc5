//! Rotary position embeddings (rotate-halves, as `transformers` does), with the frequency
//! scalings the supported checkpoints use.

use super::config::{ModelConfig, RopeScaling};
use crate::error::{Result, TernError};
use candle_core::{DType, Device, Tensor};

/// Precomputed cos/sin tables for every position up to the model's context length.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    max_len: usize,
}

/// Inverse frequencies after scaling, computed in f32 like `transformers` so tables match.
pub fn inv_freqs(cfg: &ModelConfig, freq_factors: Option<&[f32]>) -> Result<Vec<f32>> {
    let d = cfg.head_dim;
    let base = cfg.rope_theta as f32;
    let mut inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
        .collect();
    match &cfg.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= *factor as f32),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let (factor, low, high, old) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *old as f32,
            );
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - low) / (high - low);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        RopeScaling::FreqFactors => {
            let ff = freq_factors.ok_or_else(|| {
                TernError::InvalidArgument("rope_freqs.weight is required for this GGUF".into())
            })?;
            if ff.len() != inv.len() {
                return Err(TernError::InvalidArgument(format!(
                    "rope_freqs.weight has {} entries, expected head_dim/2 = {}",
                    ff.len(),
                    inv.len()
                )));
            }
            inv.iter_mut().zip(ff).for_each(|(f, k)| *f /= *k);
        }
    }
    Ok(inv)
}

impl Rope {
    /// Builds tables for `max_len` positions in `dtype` on `device`.
    pub fn new(
        cfg: &ModelConfig,
        freq_factors: Option<&[f32]>,
        max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv = inv_freqs(cfg, freq_factors)?;
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max_len, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_len, half), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin, max_len })
    }

    /// Longest sequence the tables cover.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Rotates `x` `[b, heads, 1, head_dim]`, row `i` at position `positions[i]`: one token
    /// from each of `b` sequences (continuous batching), in one op rather than one per row.
    pub fn apply_rows(&self, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
        if let Some(&p) = positions.iter().find(|&&p| p >= self.max_len) {
            self.check_end(p + 1)?;
        }
        if x.dim(0)? == positions.len() && x.dim(2)? == 1 {
            if let Some(y) = self.rotate_f32(x, |i, _| positions[i])? {
                return Ok(y);
            }
        }
        let (b, half) = (positions.len(), self.cos.dim(1)?);
        let at: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let at = Tensor::new(at.as_slice(), x.device())?;
        let table =
            |t: &Tensor| -> Result<Tensor> { Ok(t.index_select(&at, 0)?.reshape((b, 1, half))?) };
        // A `[b, 1, half]` table gives each row its own position (same arithmetic as `apply`).
        Ok(candle_nn::rotary_emb::rope(
            &x.contiguous()?,
            &table(&self.cos)?,
            &table(&self.sin)?,
        )?)
    }

    /// Rotation of f32 CPU tensors `x` `[b, heads, s, hd]`, batch row `i`'s position `j` at
    /// `pos(i, j)`, reading the tables in place on the calling thread. Candle's op wanted
    /// the rows' table entries gathered into two tensors first (~3% of an eight-row decode
    /// step), and for prompts it went to rayon's pool, whose threads then fought the matmul
    /// worker for the cores (~5% of a batched prefill). Same arithmetic as candle's kernel,
    /// so the same bits. `None` for other dtypes, devices or shapes.
    fn rotate_f32(
        &self,
        x: &Tensor,
        pos: impl Fn(usize, usize) -> usize,
    ) -> Result<Option<Tensor>> {
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if !f32_cpu(x) || !f32_cpu(&self.cos) || !f32_cpu(&self.sin) || x.rank() != 4 {
            return Ok(None);
        }
        let (_, heads, s, hd) = x.dims4()?;
        let half = self.cos.dim(1)?;
        if hd != 2 * half || heads == 0 || s == 0 {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let (xg, xl) = x.storage_and_layout();
        let (cg, cl) = self.cos.storage_and_layout();
        let (sg, sl) = self.sin.storage_and_layout();
        let slice = |g, l| super::train_ops::storage_f32(g, l).ok();
        let (Some(src), Some(cos), Some(sin)) = (slice(&xg, xl), slice(&cg, cl), slice(&sg, sl))
        else {
            return Ok(None);
        };
        let mut dst = vec![0f32; src.len()];
        let rows = src.chunks_exact(hd).zip(dst.chunks_exact_mut(hd));
        for (r, (src, dst)) in rows.enumerate() {
            let p = pos(r / (heads * s), r % s);
            let (c, sn) = (&cos[p * half..][..half], &sin[p * half..][..half]);
            let (a, b) = src.split_at(half);
            let (lo, hi) = dst.split_at_mut(half);
            for j in 0..half {
                lo[j] = a[j] * c[j] - b[j] * sn[j];
                hi[j] = a[j] * sn[j] + b[j] * c[j];
            }
        }
        Ok(Some(Tensor::from_vec(dst, x.dims(), x.device())?))
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]` for positions `offset..offset+seq`;
    /// `differentiable` uses plain ops (candle's fused kernel has no backward).
    pub fn apply(&self, x: &Tensor, offset: usize, differentiable: bool) -> Result<Tensor> {
        let seq = x.dim(2)?;
        self.check_end(offset + seq)?;
        if differentiable && super::train_ops::fits(x) && self.is_f32() {
            return self.train_op(x, offset, seq, x.dim(3)?, 1);
        }
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        if differentiable {
            return Ok(candle_nn::rotary_emb::rope_slow(x, &cos, &sin)?);
        }
        if let Some(y) = self.rotate_f32(x, |_, j| offset + j)? {
            return Ok(y);
        }
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }

    /// An error unless positions up to `end` (exclusive) lie inside the tables.
    fn check_end(&self, end: usize) -> Result<()> {
        if end > self.max_len {
            return Err(TernError::InvalidArgument(format!(
                "sequence of {end} tokens exceeds the model's context length {}",
                self.max_len
            )));
        }
        Ok(())
    }

    /// The training ops' rope (its own backward) on f32 rows of `hd` at positions `offset..
    /// offset + seq`, `per_pos` consecutive rows per position.
    fn train_op(
        &self,
        x: &Tensor,
        offset: usize,
        seq: usize,
        hd: usize,
        per_pos: usize,
    ) -> Result<Tensor> {
        let (cos, sin) = self.tables(offset, seq)?;
        let op = super::train_ops::pointwise::RopeOp {
            cos,
            sin,
            hd,
            per_pos,
        };
        Ok(x.contiguous()?.apply_op1(op)?)
    }

    /// The `(cos, sin)` rows `[seq, hd / 2]` of positions `offset..offset + seq`.
    fn tables(&self, offset: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.narrow(0, offset, seq)?.contiguous()?,
            self.sin.narrow(0, offset, seq)?.contiguous()?,
        ))
    }

    /// A training step's tables for positions `0..seq` (checked against the context).
    pub(crate) fn train_tables(&self, seq: usize) -> Result<(Tensor, Tensor)> {
        self.check_end(seq)?;
        self.tables(0, seq)
    }

    /// Whether the tables are f32 (the training ops' rope needs them so).
    pub(crate) fn is_f32(&self) -> bool {
        self.cos.dtype() == candle_core::DType::F32
    }

    /// A training step's rope on token-major f32 `[b, s, heads * hd]` (positions from 0), as
    /// one op with its own backward.
    pub(crate) fn apply_token_major(&self, x: &Tensor, hd: usize) -> Result<Tensor> {
        let (_, seq, width) = x.dims3()?;
        self.check_end(seq)?;
        self.train_op(x, 0, seq, hd, width / hd.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A position per row (decode rows of different sequences) rotates each row as `apply`
    /// does at that row's offset, to the bit, and positions past the tables are refused.
    #[test]
    fn rows_at_their_own_positions_equal_apply_per_row() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/llama3/config.json");
        let cfg = ModelConfig::from_hf_file(&dir).unwrap();
        let dev = Device::Cpu;
        let rope = Rope::new(&cfg, None, 64, DType::F32, &dev).unwrap();
        let (heads, hd) = (3, cfg.head_dim);
        let positions = [0, 7, 63, 20];
        let n = positions.len() * heads * hd;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let x = Tensor::from_vec(v, (positions.len(), heads, 1, hd), &dev).unwrap();
        let all = rope.apply_rows(&x, &positions).unwrap();
        for (i, &p) in positions.iter().enumerate() {
            let one = rope.apply(&x.narrow(0, i, 1).unwrap(), p, false).unwrap();
            let row = all.narrow(0, i, 1).unwrap();
            assert_eq!(
                row.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                one.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "row {i} at {p}"
            );
        }
        assert!(rope.apply_rows(&x, &[0, 1, 64, 2]).is_err());
    }

    /// The in-place rotation gives candle's kernel's bits, for a prompt (several positions
    /// after an offset, a batch of two) and for decode rows at their own positions.
    #[test]
    fn the_in_place_rotation_equals_candles_kernel() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/llama3/config.json");
        let cfg = ModelConfig::from_hf_file(&dir).unwrap();
        let dev = Device::Cpu;
        let rope = Rope::new(&cfg, None, 64, DType::F32, &dev).unwrap();
        let (heads, hd, s, offset) = (3, cfg.head_dim, 9, 17);
        let v: Vec<f32> = (0..2 * heads * s * hd)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 20.0)
            .collect();
        let x = Tensor::from_vec(v, (2, heads, s, hd), &dev).unwrap();
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let table = |t: &Tensor| t.narrow(0, offset, s).unwrap();
        let candle = candle_nn::rotary_emb::rope(&x, &table(&rope.cos), &table(&rope.sin)).unwrap();
        assert_eq!(bits(&rope.apply(&x, offset, false).unwrap()), bits(&candle));
        let rows = x.narrow(2, 0, 1).unwrap().contiguous().unwrap();
        // The rows' table entries, gathered as candle's op wants them.
        let at = |t: &Tensor| {
            Tensor::cat(
                &[t.narrow(0, 3, 1).unwrap(), t.narrow(0, 40, 1).unwrap()],
                0,
            )
            .unwrap()
            .reshape((2, 1, hd / 2))
            .unwrap()
        };
        let (cos, sin) = (at(&rope.cos), at(&rope.sin));
        let candle = candle_nn::rotary_emb::rope(&rows, &cos, &sin).unwrap();
        assert_eq!(
            bits(&rope.apply_rows(&rows, &[3, 40]).unwrap()),
            bits(&candle)
        );
    }
}
