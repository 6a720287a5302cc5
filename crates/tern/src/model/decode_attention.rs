//! Attention of query tokens over their KV caches, on the CPU in f32, reading the cache where
//! it lies: one new token per sequence (decode), or causal prompt segments (prefill), every
//! query getting the same bits either way.
//!
//! Why not candle ops: the cache is a view into a larger buffer, so `matmul` wanted both k
//! and v copied contiguous (the whole history, per layer, per token); the two tiny matmuls
//! and the softmax went to rayon's pool, whose threads then fought the matmul worker for the
//! cores; and a dozen tensors were allocated. On SmolLM2 that was about 12% of a decode step's
//! serial time, for some 80K multiply-adds per layer.

use super::attention_kernels::{prefetch, scaled_dots_group, weighted_sum_group, GROUP};
use crate::error::Result;
use candle_core::{CpuStorage, DType, Storage, Tensor};

/// Work (query heads x cached tokens x head size) below which one thread does it all: the
/// hand-off to the worker costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// Cached positions of the next kv group fetched ahead of its turn (see [`Shape::prefetch`]).
const PREFETCH_ROWS: usize = 64;

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
    let (b, heads, s, hd) = q.dims4()?;
    if s != 1 || rows.len() != b {
        return Ok(None);
    }
    let queries = rows
        .iter()
        .enumerate()
        .map(|(i, (k, _))| {
            Ok(Query {
                q: 0,
                off: i * heads * hd,
                head_stride: hd,
                seq: i,
                t: k.dims().get(2).copied().unwrap_or(0),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let y = attend_queries(&[q], rows, &queries, window)?;
    y.map(|y| Ok(y.reshape((b, 1, heads * hd))?)).transpose()
}

/// Causal attention of prompt segments over their caches, every segment in one pool
/// dispatch: `segs[i]` is `(q, k, v)` with `q` `[1, heads, len, hd]` (contiguous) the
/// segment's queries and `k`, `v` `[1, kv_heads, t, hd]` its cache after appending them, so
/// query `j` sits at position `t - len + j` and sees the positions up to it (the last `window`
/// of them with a window). Returns `[Σ len, heads * hd]`, or `None` as [`decode_attention`].
///
/// Why not candle's matmuls: per segment they were a dozen tensors, a mask and two GEMMs on
/// rayon's pool (which then fought the matmul worker for the cores), ~11% of a batched
/// prefill of eight short prompts. Each query here gets exactly what decoding it alone gets.
pub(crate) fn prompt_attention(
    segs: &[(Tensor, Tensor, Tensor)],
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    let mut queries = Vec::new();
    for (i, (q, k, _)) in segs.iter().enumerate() {
        let (qb, heads, len, hd) = q.dims4()?;
        let t = k.dims().get(2).copied().unwrap_or(0);
        if qb != 1 || len > t || heads == 0 {
            return Ok(None);
        }
        queries.extend((0..len).map(|j| Query {
            q: i,
            off: j * hd,
            head_stride: len * hd,
            seq: i,
            t: t - len + j + 1,
        }));
    }
    let qs: Vec<&Tensor> = segs.iter().map(|(q, _, _)| q).collect();
    let kvs: Vec<(Tensor, Tensor)> = segs
        .iter()
        .map(|(_, k, v)| (k.clone(), v.clone()))
        .collect();
    attend_queries(&qs, &kvs, &queries, window)
}

/// One query token: head `h` of it is `qs[q][off + h * head_stride..][..hd]`; it reads the
/// cache `kvs[seq]` and sees that cache's first `t` positions.
struct Query {
    q: usize,
    off: usize,
    head_stride: usize,
    seq: usize,
    t: usize,
}

/// The kernel behind [`decode_attention_rows`] and [`prompt_attention`]: every (query, head)
/// pair, in one pool dispatch when the work is large enough. `qs` are `[.., heads, .., hd]`
/// f32 tensors (the head count is read from dimension 1), `kvs[i]` `[1, kv_heads, t_i, hd]`
/// views with unit stride along `hd`. Returns `[queries, heads * hd]`, or `None` when the
/// tensors are not f32 CPU tensors in those layouts.
fn attend_queries(
    qs: &[&Tensor],
    kvs: &[(Tensor, Tensor)],
    queries: &[Query],
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let Some(first_q) = qs.first() else {
        return Ok(None);
    };
    if qs.iter().any(|q| !f32_cpu(q) || q.rank() != 4)
        || kvs.iter().any(|(k, v)| !f32_cpu(k) || !f32_cpu(v))
    {
        return Ok(None);
    }
    let (heads, hd) = (first_q.dim(1)?, first_q.dim(3)?);
    let Some((_, kv_heads, _, _)) = kvs.first().map(|(k, _)| k.dims4()).transpose()? else {
        return Ok(None);
    };
    if kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || qs
            .iter()
            .any(|q| q.dim(1).ok() != Some(heads) || q.dim(3).ok() != Some(hd))
    {
        return Ok(None);
    }
    for (k, v) in kvs {
        let (kb, kvh, _, khd) = k.dims4()?;
        if kb != 1 || kvh != kv_heads || khd != hd || v.dims() != k.dims() {
            return Ok(None);
        }
    }
    let qs: Vec<Tensor> = qs
        .iter()
        .map(|q| q.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let q_guards: Vec<_> = qs.iter().map(|q| q.storage_and_layout()).collect();
    let mut q_data: Vec<&[f32]> = Vec::with_capacity(qs.len());
    for (s, l) in &q_guards {
        let (Storage::Cpu(CpuStorage::F32(d)), Some((a, b))) = (&**s, l.contiguous_offsets())
        else {
            return Ok(None);
        };
        q_data.push(&d[a..b]);
    }
    // The guards keep each cache's storage readable while the pool works on it.
    let guards: Vec<_> = kvs
        .iter()
        .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
        .collect();
    let mut seqs = Vec::with_capacity(kvs.len());
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
        seqs.push(Seq {
            k: (kd, k),
            v: (vd, v),
            t: kl.dims()[2],
        });
    }
    for qr in queries {
        let ok = qr.q < q_data.len()
            && qr.seq < seqs.len()
            && qr.t >= 1
            && qr.t <= seqs[qr.seq].t
            && qr.off + (heads - 1) * qr.head_stride + hd <= q_data[qr.q].len();
        if !ok {
            return Ok(None);
        }
    }
    let shape = Shape {
        rep: heads / kv_heads,
        hd,
    };
    // Positions each query attends to.
    let span = |qr: &Query| qr.t - window.map_or(0, |w| qr.t.saturating_sub(w));
    // One unit of work is one query's kv group: its `rep` heads read the same keys and
    // values, and their outputs are adjacent (`rep * hd` values).
    let n = queries.len() * kv_heads;
    let unit = shape.rep * hd;
    let mut out = vec![0f32; n * unit];
    let longest = queries.iter().map(span).max().unwrap_or(0);
    let run = |range: std::ops::Range<usize>, out: &mut [f32]| {
        let mut scores = vec![0f32; GROUP.min(shape.rep) * longest];
        let end = range.end;
        for (i, o) in range.zip(out.chunks_exact_mut(unit)) {
            let (qr, g) = (&queries[i / kv_heads], i % kv_heads);
            // Fetch the next group's keys and values while this one's heads run. A batched
            // step's caches come from memory (the weights streamed through the caches since
            // the last step), and each group's history is too short for the hardware
            // prefetcher to get ahead: eight rows' attention took ~10% of the step for ~1%
            // of its multiply-adds.
            if i + 1 < end {
                let next = &queries[(i + 1) / kv_heads];
                shape.prefetch((i + 1) % kv_heads, &seqs[next.seq], next.t, window);
            }
            let qh = |h: usize| &q_data[qr.q][qr.off + h * qr.head_stride..][..hd];
            shape.group(g, qh, &seqs[qr.seq], qr.t, window, &mut scores, o);
        }
    };
    let work: usize = queries.iter().map(|qr| heads * span(qr) * hd).sum();
    if work < PARALLEL_MIN_WORK || n == 1 {
        run(0..n, &mut out);
    } else {
        let ptr = out.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(n, |range| {
            // SAFETY: tasks get disjoint ranges of (query, kv group) units, so the
            // `unit`-wide output slices never overlap, and `out` outlives the call, which
            // returns only when every task is done.
            let o = unsafe {
                std::slice::from_raw_parts_mut(
                    (ptr as *mut f32).add(range.start * unit),
                    range.len() * unit,
                )
            };
            run(range, o);
        });
    }
    Ok(Some(Tensor::from_vec(
        out,
        (queries.len(), heads * hd),
        first_q.device(),
    )?))
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

/// One sequence's cached keys and values (`t` positions).
struct Seq<'a> {
    k: (&'a [f32], Strided),
    v: (&'a [f32], Strided),
    t: usize,
}

/// What every (query, head) pair shares: head counts and head size.
struct Shape {
    rep: usize,
    hd: usize,
}

impl Shape {
    /// Prefetches the first [`PREFETCH_ROWS`] keys and values of kv group `g` in `seq` (as
    /// [`Shape::group`] reads them): past those, the hardware prefetcher has caught up with
    /// the stream (prefetching a 1,000-token history row by row was a tenth of its prefill).
    fn prefetch(&self, g: usize, seq: &Seq, t: usize, window: Option<usize>) {
        let first = window.map_or(0, |w| t.saturating_sub(w));
        for (d, l) in [&seq.k, &seq.v] {
            for j in first..t.min(first + PREFETCH_ROWS) {
                let row = &d[l.row(g, j)..][..self.hd];
                for at in (0..self.hd).step_by(16) {
                    prefetch(row[at..].as_ptr());
                }
            }
        }
    }

    /// The `rep` query heads of kv group `g` (head `h`'s values `qh(h)`) over the first `t`
    /// positions of `seq` (the last `window` of them with a window) into `out` (`rep * hd`
    /// values, head by head), up to [`GROUP`] heads per pass over the keys and values.
    #[allow(clippy::too_many_arguments)]
    fn group<'q>(
        &self,
        g: usize,
        qh: impl Fn(usize) -> &'q [f32],
        seq: &Seq,
        t: usize,
        window: Option<usize>,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let first = window.map_or(0, |w| t.saturating_sub(w));
        let len = t - first;
        let scale = 1.0 / (self.hd as f32).sqrt();
        let ((kd, kl), (vd, vl)) = (&seq.k, &seq.v);
        let (keys, vals) = (&kd[kl.row(g, first)..], &vd[vl.row(g, first)..]);
        let mut r0 = 0;
        while r0 < self.rep {
            // Four heads go as two pairs (the group kernels run a lone head through the
            // one-head ones).
            let left = self.rep - r0;
            let r = if left == 4 { 2 } else { left.min(GROUP) };
            let h0 = g * self.rep + r0;
            let sc = &mut scores[..r * len];
            let qs: [&[f32]; GROUP] = std::array::from_fn(|i| qh(h0 + i.min(r - 1)));
            scaled_dots_group(&qs[..r], keys, kl.pos, scale, sc);
            if len > 0 {
                sc.chunks_exact_mut(len).for_each(softmax_in_place);
            }
            let outs = &mut out[r0 * self.hd..(r0 + r) * self.hd];
            weighted_sum_group(sc, r, vals, vl.pos, outs);
            r0 += r;
        }
    }
}

/// Scores to probabilities (the general path's softmax, with the crate's vector exp).
fn softmax_in_place(scores: &mut [f32]) {
    // Eight running maxima, so the loop vectorises (one scalar chain was a tenth of a long
    // prompt's attention); the maximum is the same whatever the order.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = scores.chunks_exact(8);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let inv = 1.0 / crate::quant::vexp::softmax_exp(scores, max);
    scores.iter_mut().for_each(|p| *p *= inv);
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

    /// Prompt segments of several lengths after histories of several lengths, in one call:
    /// each query gets the bits of decoding it alone over the cache up to its position, and
    /// the causal formula (candle ops with the mask) within f32 rounding.
    #[test]
    fn prompt_segments_equal_decoding_each_position_alone() {
        let dev = Device::Cpu;
        let (heads, kvh, hd) = (8, 2, 32);
        // (cached before, prompt length)
        let shapes = [(0, 1), (0, 7), (5, 3), (40, 12), (90, 30)];
        let segs: Vec<(Tensor, Tensor, Tensor)> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(before, len))| {
                let t = before + len;
                let s = 10 * i as u32;
                let q = Tensor::from_vec(values(heads * len * hd, s), (1, heads, len, hd), &dev);
                let kv = |seed| {
                    Tensor::from_vec(values(kvh * (t + 5) * hd, seed), (1, kvh, t + 5, hd), &dev)
                        .unwrap()
                        .narrow(2, 0, t)
                        .unwrap()
                };
                (q.unwrap(), kv(s + 1), kv(s + 2))
            })
            .collect();
        for window in [None, Some(6)] {
            let all = prompt_attention(&segs, window)
                .unwrap()
                .expect("fast path taken");
            assert_eq!(all.dims(), &[53, heads * hd]);
            let mut row = 0;
            for ((q, k, v), &(before, len)) in segs.iter().zip(&shapes) {
                for j in 0..len {
                    let t = before + j + 1;
                    let qj = q.narrow(2, j, 1).unwrap().contiguous().unwrap();
                    let (kj, vj) = (k.narrow(2, 0, t).unwrap(), v.narrow(2, 0, t).unwrap());
                    let alone = decode_attention(&qj, &kj, &vj, window).unwrap().unwrap();
                    let got = all.narrow(0, row, 1).unwrap().flatten_all().unwrap();
                    assert_eq!(
                        got.to_vec1::<f32>().unwrap(),
                        alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        "before {before} position {j} window {window:?}"
                    );
                    let d =
                        crate::test_util::max_abs_diff(&alone, &reference(&qj, &kj, &vj, window));
                    assert!(
                        d < 1e-5,
                        "before {before} position {j} window {window:?}: {d}"
                    );
                    row += 1;
                }
            }
        }
        // A segment longer than its cache is refused, not read out of bounds.
        let (q, k, v) = &segs[3];
        let short = (
            q.clone(),
            k.narrow(2, 0, 5).unwrap(),
            v.narrow(2, 0, 5).unwrap(),
        );
        assert!(prompt_attention(&[short], None).unwrap().is_none());
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
