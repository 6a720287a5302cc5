//! Attention of one new token per sequence over its KV cache, on the CPU in f32, reading the
//! cache where it lies.
//!
//! Why not candle ops: the cache is a view into a larger buffer, so `matmul` wanted both k
//! and v copied contiguous (the whole history, per layer, per token); the two tiny matmuls
//! and the softmax went to rayon's pool, whose threads then fought the matmul worker for the
//! cores; and a dozen tensors were allocated. On SmolLM2 that was about 12% of a decode step's
//! serial time, for some 80K multiply-adds per layer.

use crate::error::Result;
use candle_core::{CpuStorage, DType, Storage, Tensor};

/// Work (query heads x cached tokens x head size) below which one thread does it all: the
/// hand-off to the worker costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// `softmax(q k^T / sqrt(hd)) v` for one query token per sequence, or `None` when the tensors
/// are not f32 CPU tensors in the layouts below (the caller then runs the general path).
///
/// `q` is `[b, heads, 1, hd]`; `k`, `v` are `[b, kv_heads, t, hd]` views (any strides with
/// unit stride along `hd`), the query sitting at the last cached position. With `window`,
/// only the last `window` positions are attended to, as [`super::attention::attention_mask`]
/// does. Returns `[b, 1, heads * hd]`.
pub(crate) fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    let b = q.dim(0)?;
    if k.dim(0)? != b {
        return Ok(None);
    }
    let rows: Vec<(Tensor, Tensor)> = (0..b)
        .map(|i| Ok((k.narrow(0, i, 1)?, v.narrow(0, i, 1)?)))
        .collect::<Result<_>>()?;
    decode_attention_rows(q, &rows, window)
}

/// As [`decode_attention`] with each sequence's keys and values in its own tensors
/// (`rows[i]` is `[1, kv_heads, t_i, hd]`, histories of any lengths): continuous batching's
/// rows, each with its own cache. Every (sequence, head) pair goes to one pool dispatch.
pub(crate) fn decode_attention_rows(
    q: &Tensor,
    rows: &[(Tensor, Tensor)],
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !f32_cpu(q) || rows.iter().any(|(k, v)| !f32_cpu(k) || !f32_cpu(v)) {
        return Ok(None);
    }
    let (b, heads, s, hd) = q.dims4()?;
    if s != 1 || rows.len() != b {
        return Ok(None);
    }
    let Some((_, kv_heads, _, _)) = rows.first().map(|(k, _)| k.dims4()).transpose()? else {
        return Ok(None);
    };
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Ok(None);
    }
    for (k, v) in rows {
        let (kb, kvh, t, khd) = k.dims4()?;
        if kb != 1 || kvh != kv_heads || t == 0 || khd != hd || v.dims() != k.dims() {
            return Ok(None);
        }
    }
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(qd)), Some((q_start, _))) = (&*qs, ql.contiguous_offsets())
    else {
        return Ok(None);
    };
    let qd = &qd[q_start..q_start + b * heads * hd];
    // The guards keep each cache's storage readable while the pool works on it.
    let guards: Vec<_> = rows
        .iter()
        .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
        .collect();
    let mut seqs = Vec::with_capacity(b);
    for ((ks, kl), (vs, vl)) in &guards {
        let (Storage::Cpu(CpuStorage::F32(kd)), Storage::Cpu(CpuStorage::F32(vd))) = (&**ks, &**vs)
        else {
            return Ok(None);
        };
        let (Some(k), Some(v)) = (
            Strided::of(kl.stride(), kl.start_offset()),
            Strided::of(vl.stride(), vl.start_offset()),
        ) else {
            return Ok(None);
        };
        let t = kl.dims()[2];
        let first = window.map_or(0, |w| t.saturating_sub(w));
        seqs.push(Seq {
            k: (kd, k),
            v: (vd, v),
            first,
            t,
        });
    }
    let shape = Shape {
        heads,
        rep: heads / kv_heads,
        hd,
    };
    let mut out = vec![0f32; b * heads * hd];
    let n = b * heads;
    let longest = seqs.iter().map(|s| s.t - s.first).max().unwrap_or(0);
    let run = |range: std::ops::Range<usize>, out: &mut [f32]| {
        let mut scores = vec![0f32; longest];
        for (i, o) in range.zip(out.chunks_exact_mut(hd)) {
            shape.head(i, qd, &seqs[i / heads], &mut scores, o);
        }
    };
    let work: usize = seqs.iter().map(|s| heads * (s.t - s.first) * hd).sum();
    if work < PARALLEL_MIN_WORK || n == 1 {
        run(0..n, &mut out);
    } else {
        let ptr = out.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(n, |range| {
            // SAFETY: tasks get disjoint ranges of (sequence, head) pairs, so the `hd`-wide
            // output slices never overlap, and `out` outlives the call, which returns only
            // when every task is done.
            let o = unsafe {
                std::slice::from_raw_parts_mut(
                    (ptr as *mut f32).add(range.start * hd),
                    range.len() * hd,
                )
            };
            run(range, o);
        });
    }
    Ok(Some(Tensor::from_vec(out, (b, 1, heads * hd), q.device())?))
}

/// Element offsets of a `[1, kv_heads, t, hd]` view with unit stride along `hd`.
struct Strided {
    start: usize,
    head: usize,
    pos: usize,
}

impl Strided {
    fn of(stride: &[usize], start: usize) -> Option<Self> {
        (stride.len() == 4 && stride[3] == 1).then(|| Self {
            start,
            head: stride[1],
            pos: stride[2],
        })
    }

    fn row(&self, g: usize, j: usize) -> usize {
        self.start + g * self.head + j * self.pos
    }
}

/// One sequence's cached keys and values, and the positions its query attends to.
struct Seq<'a> {
    k: (&'a [f32], Strided),
    v: (&'a [f32], Strided),
    first: usize,
    t: usize,
}

/// What every (sequence, head) pair shares: head counts and head size.
struct Shape {
    heads: usize,
    rep: usize,
    hd: usize,
}

impl Shape {
    /// Query head `i` (sequence `i / heads`, whose cache is `seq`) into `out` (`hd` values).
    fn head(&self, i: usize, q: &[f32], seq: &Seq, scores: &mut [f32], out: &mut [f32]) {
        let hd = self.hd;
        // Heads of one kv group are adjacent, as in the general path.
        let g = (i % self.heads) / self.rep;
        let qh = &q[i * hd..(i + 1) * hd];
        let scale = 1.0 / (hd as f32).sqrt();
        let scores = &mut scores[..seq.t - seq.first];
        let ((kd, kl), (vd, vl)) = (&seq.k, &seq.v);
        scaled_dots(qh, &kd[kl.row(g, seq.first)..], kl.pos, scale, scores);
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv = 1.0 / crate::quant::vexp::softmax_exp(scores, max);
        scores.iter_mut().for_each(|p| *p *= inv);
        weighted_sum(scores, &vd[vl.row(g, seq.first)..], vl.pos, out);
    }
}

/// `scores[j] = scale * q · keys[j * stride..][..q.len()]`.
fn scaled_dots(q: &[f32], keys: &[f32], stride: usize, scale: f32, scores: &mut [f32]) {
    let n = q.len();
    assert!(scores.is_empty() || keys.len() >= (scores.len() - 1) * stride + n);
    #[cfg(target_arch = "x86_64")]
    if crate::quant::use_avx2() && n.is_multiple_of(8) {
        // SAFETY: the CPU reports avx2 and fma; the assert above keeps every row in `keys`.
        return unsafe { scaled_dots_avx2(q, keys, stride, scale, scores) };
    }
    for (j, s) in scores.iter_mut().enumerate() {
        let k = &keys[j * stride..j * stride + n];
        *s = scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>();
    }
}

/// `out = Σ_j p[j] * x[j * stride..][..out.len()]`.
fn weighted_sum(p: &[f32], x: &[f32], stride: usize, out: &mut [f32]) {
    let n = out.len();
    assert!(p.is_empty() || x.len() >= (p.len() - 1) * stride + n);
    #[cfg(target_arch = "x86_64")]
    if crate::quant::use_avx2() && n.is_multiple_of(8) {
        // SAFETY: the CPU reports avx2 and fma; the assert above keeps every row in `x`.
        return unsafe { weighted_sum_avx2(p, x, stride, out) };
    }
    out.fill(0.0);
    for (j, &w) in p.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(&x[j * stride..j * stride + n]) {
            *o += w * v;
        }
    }
}

// The crate is built for baseline x86-64, so without these the loops above compile to
// scalar SSE code (measured: the dot product ran one lane at a time).
/// [`scaled_dots`] four keys at a time: four independent chains of multiply-adds (one
/// chain per key waited on each add's latency).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scaled_dots_avx2(q: &[f32], keys: &[f32], stride: usize, scale: f32, scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = q.len();
    let kp = keys.as_ptr();
    let mut j = 0;
    while j + 4 <= scores.len() {
        let mut acc = [_mm256_setzero_ps(); 4];
        for i in (0..n).step_by(8) {
            let qv = _mm256_loadu_ps(q.as_ptr().add(i));
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp.add((j + k) * stride + i)), *a);
            }
        }
        // Pairwise adds leave lane k of each 128-bit half holding part of key k's sum.
        let h = _mm256_hadd_ps(
            _mm256_hadd_ps(acc[0], acc[1]),
            _mm256_hadd_ps(acc[2], acc[3]),
        );
        let sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(
            scores.as_mut_ptr().add(j),
            _mm_mul_ps(sums, _mm_set1_ps(scale)),
        );
        j += 4;
    }
    for (jj, s) in scores.iter_mut().enumerate().skip(j) {
        let mut acc = _mm256_setzero_ps();
        for i in (0..n).step_by(8) {
            let qv = _mm256_loadu_ps(q.as_ptr().add(i));
            acc = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp.add(jj * stride + i)), acc);
        }
        *s = scale * crate::quant::hsum(acc);
    }
}

/// [`weighted_sum`] with the output held in registers, 64 values at a time (a running sum
/// kept in memory made every step a load and a store).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_sum_avx2(p: &[f32], x: &[f32], stride: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    const LANES: usize = 8;
    for c in (0..out.len()).step_by(8 * LANES) {
        let n = (out.len() - c).min(8 * LANES) / 8;
        let mut acc = [_mm256_setzero_ps(); LANES];
        for (j, &w) in p.iter().enumerate() {
            let wv = _mm256_set1_ps(w);
            let src = x.as_ptr().add(j * stride + c);
            for (l, a) in acc.iter_mut().enumerate().take(n) {
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(src.add(8 * l)), *a);
            }
        }
        for (l, a) in acc.iter().enumerate().take(n) {
            _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * l), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The general path's formula through candle ops, with the window as an additive mask.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>) -> Tensor {
        let (b, heads, _, hd) = q.dims4().unwrap();
        let (_, kvh, t, _) = k.dims4().unwrap();
        let rep = heads / kvh;
        let q = q.reshape((b, kvh, rep, hd)).unwrap();
        let (k, v) = (k.contiguous().unwrap(), v.contiguous().unwrap());
        let mut att = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let mask = crate::model::attention::attention_mask(1, t, t - 1, window, &Device::Cpu);
        if let Some(m) = mask.unwrap() {
            att = att.broadcast_add(&m).unwrap();
        }
        let att = candle_nn::ops::softmax(&att, D::Minus1).unwrap();
        att.matmul(&v).unwrap().reshape((b, 1, heads * hd)).unwrap()
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    }

    /// GQA and MHA, one and two sequences, short and long histories (the long ones take the
    /// worker pool), with and without a window, over a cache that is a view into a larger
    /// buffer (as the KV cache is): equal to the general path within f32 rounding.
    #[test]
    fn equals_the_general_path() {
        let dev = Device::Cpu;
        for (b, heads, kvh, hd, t, window) in [
            (1, 9, 3, 64, 1, None),
            (2, 2, 1, 20, 9, None),
            (1, 9, 3, 64, 37, None),
            (2, 4, 4, 32, 50, Some(16)),
            (1, 8, 2, 64, 300, None),
            (2, 8, 1, 48, 260, Some(100)),
        ] {
            let cap = t + 7;
            let q = Tensor::from_vec(values(b * heads * hd, 1), (b, heads, 1, hd), &dev).unwrap();
            let buf = |seed| {
                Tensor::from_vec(values(b * kvh * cap * hd, seed), (b, kvh, cap, hd), &dev)
                    .unwrap()
                    .narrow(2, 0, t)
                    .unwrap()
            };
            let (k, v) = (buf(2), buf(3));
            assert!(!k.is_contiguous());
            let ours = decode_attention(&q, &k, &v, window)
                .unwrap()
                .expect("fast path taken");
            let theirs = reference(&q, &k, &v, window);
            let d = crate::test_util::max_abs_diff(&ours, &theirs);
            assert!(
                d < 1e-5,
                "b={b} heads={heads} kvh={kvh} t={t} window={window:?}: {d}"
            );
        }
    }

    /// Rows with caches of their own and different lengths (continuous batching), long
    /// enough together to take the pool: each row gets the bits it gets alone.
    #[test]
    fn rows_with_their_own_caches_equal_each_row_alone() {
        let dev = Device::Cpu;
        let (heads, kvh, hd) = (9, 3, 64);
        let lens = [1, 5, 40, 130, 7];
        let b = lens.len();
        let q = Tensor::from_vec(values(b * heads * hd, 4), (b, heads, 1, hd), &dev).unwrap();
        let cache = |t: usize, seed| {
            Tensor::from_vec(values(kvh * (t + 3) * hd, seed), (1, kvh, t + 3, hd), &dev)
                .unwrap()
                .narrow(2, 0, t)
                .unwrap()
        };
        let rows: Vec<(Tensor, Tensor)> = lens
            .iter()
            .enumerate()
            .map(|(i, &t)| (cache(t, 10 + i as u32), cache(t, 20 + i as u32)))
            .collect();
        for window in [None, Some(16)] {
            let all = decode_attention_rows(&q, &rows, window).unwrap().unwrap();
            for (i, (k, v)) in rows.iter().enumerate() {
                let qi = q.narrow(0, i, 1).unwrap();
                let alone = decode_attention(&qi, k, v, window).unwrap().unwrap();
                let got = all.narrow(0, i, 1).unwrap().flatten_all().unwrap();
                let want = alone.flatten_all().unwrap();
                assert_eq!(
                    got.to_vec1::<f32>().unwrap(),
                    want.to_vec1::<f32>().unwrap(),
                    "row {i}"
                );
                let d = crate::test_util::max_abs_diff(&alone, &reference(&qi, k, v, window));
                assert!(d < 1e-5, "row {i} window {window:?}: {d}");
            }
        }
    }

    #[test]
    fn other_dtypes_and_shapes_are_left_to_the_general_path() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 1, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 5, 8), DType::F32, &dev).unwrap();
        let half = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        assert!(decode_attention(&half(&q), &half(&k), &half(&k), None)
            .unwrap()
            .is_none());
        let two = Tensor::zeros((1, 4, 2, 8), DType::F32, &dev).unwrap();
        assert!(decode_attention(&two, &k, &k, None).unwrap().is_none());
    }
}
