//! The fused CPU LoRA kernel for few rows (decode): for every row, `t = scale * A x` then
//! `y += t B`, with each row using its own adapter's pair, all in one pass over the output.
//!
//! At decode a LoRA pair is a couple of matrix-vector products of rank 16 or so; through
//! candle's generic ops each costs ~5 tensor ops of launch and allocation overhead, per layer,
//! per adapter in the batch, which at 7 layers x 30 blocks was several times the arithmetic.
//! One call per layer for the whole batch keeps the overhead to a single output copy, and
//! what remains is reading the adapter: the pairs may be stored in f16 to halve that.

use candle_core::{CpuStorage, Layout, Storage, StorageRef, Tensor};
use half::f16;

/// A contiguous f32 or f16 CPU tensor's data, held for reading.
pub(crate) struct View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

/// Borrowed values of a [`View`].
#[derive(Clone, Copy)]
pub(crate) enum Values<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// f16 values.
    F16(&'a [f16]),
}

impl Values<'_> {
    fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Values::F32(v) => v.len() * 4,
            Values::F16(v) => v.len() * 2,
        }
    }
}

impl<'a> View<'a> {
    /// `None` unless `t` is a contiguous f32 or f16 tensor on the CPU.
    pub fn of(t: &'a Tensor) -> Option<Self> {
        let (guard, layout): (StorageRef<'a>, &Layout) = t.storage_and_layout();
        let (start, end) = layout.contiguous_offsets()?;
        matches!(
            &*guard,
            Storage::Cpu(CpuStorage::F32(_)) | Storage::Cpu(CpuStorage::F16(_))
        )
        .then_some(Self { guard, start, end })
    }

    /// The values.
    pub fn values(&self) -> Values<'_> {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => Values::F32(&v[self.start..self.end]),
            Storage::Cpu(CpuStorage::F16(v)) => Values::F16(&v[self.start..self.end]),
            _ => unreachable!("checked in View::of"),
        }
    }

    /// The values, which must be f32.
    pub fn f32(&self) -> Option<&[f32]> {
        match self.values() {
            Values::F32(v) => Some(v),
            Values::F16(_) => None,
        }
    }
}

/// One run of consecutive rows sharing a pair.
pub(crate) struct RowRun<'a> {
    /// First row.
    pub start: usize,
    /// Number of rows.
    pub len: usize,
    /// `A`, `[r, in]`.
    pub a: Values<'a>,
    /// `B^T`, `[r, out]`.
    pub bt: Values<'a>,
    /// Scale.
    pub scale: f32,
}

/// Below this many adapter bytes per call the work stays on the calling thread: waking the
/// pool costs more than it saves.
const PAR_MIN_BYTES: usize = 48 * 1024;

/// `y[row] += scale * (A x[row]) B^T` for every row in `runs`; `x` is `[rows, in_dim]`,
/// `y` is `[rows, out_dim]`.
///
/// Decode is bound by reading the adapter, so the work is split over candle's CPU pool by
/// rank: each thread reads its share of `A`'s rows and `B^T`'s rows (disjoint, contiguous
/// bytes) and accumulates a partial output; the partials are summed at the end. No barrier
/// between shrink and expand is needed, and no byte is read twice.
pub(crate) fn apply_runs(x: &[f32], y: &mut [f32], in_dim: usize, out_dim: usize, runs: &[RowRun]) {
    let pool = candle_core::utils::barrier_pool();
    let parts = pool.n_workers() + 1;
    let bytes: usize = runs.iter().map(|r| r.a.bytes() + r.bt.bytes()).sum();
    if parts == 1 || bytes < PAR_MIN_BYTES {
        apply_part(x, y, in_dim, out_dim, runs, 0, 1);
        return;
    }
    let mut partial = vec![0f32; (parts - 1) * y.len()];
    let (y_ptr, y_len) = (y.as_mut_ptr() as usize, y.len());
    let p_ptr = partial.as_mut_ptr() as usize;
    pool.execute(|tid| {
        // SAFETY: participant 0 alone writes `y`, participant t > 0 alone writes the t-th
        // slice of `partial`; both outlive `execute`, which returns when every part is done.
        let out = unsafe {
            if tid == 0 {
                std::slice::from_raw_parts_mut(y_ptr as *mut f32, y_len)
            } else {
                std::slice::from_raw_parts_mut((p_ptr as *mut f32).add((tid - 1) * y_len), y_len)
            }
        };
        apply_part(x, out, in_dim, out_dim, runs, tid, parts);
    });
    for p in partial.chunks_exact(y.len()) {
        for (yi, pi) in y.iter_mut().zip(p) {
            *yi += pi;
        }
    }
}

/// Adds the contribution of rank rows `[r * part / parts, r * (part + 1) / parts)` of every
/// run to `y`.
fn apply_part(
    x: &[f32],
    y: &mut [f32],
    in_dim: usize,
    out_dim: usize,
    runs: &[RowRun],
    part: usize,
    parts: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { apply_part_avx2(x, y, in_dim, out_dim, runs, part, parts) };
        }
    }
    apply_part_with(x, y, in_dim, out_dim, runs, part, parts, &Portable)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn apply_part_avx2(
    x: &[f32],
    y: &mut [f32],
    in_dim: usize,
    out_dim: usize,
    runs: &[RowRun],
    part: usize,
    parts: usize,
) {
    apply_part_with(x, y, in_dim, out_dim, runs, part, parts, &avx2::Avx2)
}

/// The two inner loops, per element type.
trait Ops {
    fn dot(&self, a: Values, lo: usize, hi: usize, x: &[f32]) -> f32;
    fn axpy(&self, y: &mut [f32], alpha: f32, b: Values, lo: usize, hi: usize);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn apply_part_with(
    x: &[f32],
    y: &mut [f32],
    in_dim: usize,
    out_dim: usize,
    runs: &[RowRun],
    part: usize,
    parts: usize,
    ops: &impl Ops,
) {
    let mut t = Vec::new();
    for run in runs {
        let r = run.a.len() / in_dim;
        let ks = r * part / parts..r * (part + 1) / parts;
        t.resize(ks.len(), 0.0);
        for row in run.start..run.start + run.len {
            let xr = &x[row * in_dim..(row + 1) * in_dim];
            for (tk, k) in t.iter_mut().zip(ks.clone()) {
                *tk = run.scale * ops.dot(run.a, k * in_dim, (k + 1) * in_dim, xr);
            }
            let yr = &mut y[row * out_dim..(row + 1) * out_dim];
            for (&tk, k) in t.iter().zip(ks.clone()) {
                ops.axpy(yr, tk, run.bt, k * out_dim, (k + 1) * out_dim);
            }
        }
    }
}

/// Plain Rust, 8 independent accumulators so the compiler can vectorise the f32 case.
struct Portable;

impl Ops for Portable {
    #[inline(always)]
    fn dot(&self, a: Values, lo: usize, hi: usize, x: &[f32]) -> f32 {
        match a {
            Values::F32(a) => dot_f32(&a[lo..hi], x),
            Values::F16(a) => a[lo..hi].iter().zip(x).map(|(p, q)| p.to_f32() * q).sum(),
        }
    }

    #[inline(always)]
    fn axpy(&self, y: &mut [f32], alpha: f32, b: Values, lo: usize, hi: usize) {
        match b {
            Values::F32(b) => {
                for (yi, bi) in y.iter_mut().zip(&b[lo..hi]) {
                    *yi = alpha.mul_add(*bi, *yi);
                }
            }
            Values::F16(b) => {
                for (yi, bi) in y.iter_mut().zip(&b[lo..hi]) {
                    *yi = alpha.mul_add(bi.to_f32(), *yi);
                }
            }
        }
    }
}

#[inline(always)]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(p, q)| p * q)
        .sum();
    for (pa, pb) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = pa[i].mul_add(pb[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! f16 loads converted with F16C; f32 through the portable code compiled for AVX2.
    use super::{Ops, Portable, Values};
    use half::f16;
    use std::arch::x86_64::*;

    pub(super) struct Avx2;

    impl Ops for Avx2 {
        #[inline(always)]
        fn dot(&self, a: Values, lo: usize, hi: usize, x: &[f32]) -> f32 {
            match a {
                // SAFETY: only reached from `apply_part_avx2`, compiled with avx2+fma+f16c.
                Values::F16(a) => unsafe { dot_f16(&a[lo..hi], x) },
                _ => Portable.dot(a, lo, hi, x),
            }
        }

        #[inline(always)]
        fn axpy(&self, y: &mut [f32], alpha: f32, b: Values, lo: usize, hi: usize) {
            match b {
                // SAFETY: as above.
                Values::F16(b) => unsafe { axpy_f16(y, alpha, &b[lo..hi]) },
                _ => Portable.axpy(y, alpha, b, lo, hi),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: &[f16], i: usize) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.as_ptr().add(i) as *const __m128i))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_f16(a: &[f16], x: &[f32]) -> f32 {
        let n = a.len().min(x.len());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(load8(a, i), _mm256_loadu_ps(x.as_ptr().add(i)), s0);
            s1 = _mm256_fmadd_ps(load8(a, i + 8), _mm256_loadu_ps(x.as_ptr().add(i + 8)), s1);
            i += 16;
        }
        let mut tail = 0f32;
        while i < n {
            tail += a[i].to_f32() * x[i];
            i += 1;
        }
        let s = _mm256_add_ps(s0, s1);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1))) + tail
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn axpy_f16(y: &mut [f32], alpha: f32, b: &[f16]) {
        let n = y.len().min(b.len());
        let va = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            let p = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(p, _mm256_fmadd_ps(va, load8(b, i), _mm256_loadu_ps(p)));
            i += 8;
        }
        while i < n {
            y[i] = alpha.mul_add(b[i].to_f32(), y[i]);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(a: Values, bt: Values, af: &[f32], btf: &[f32], tol: f64) {
        let (in_dim, out_dim, r) = (37, 29, 3);
        let val = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 50.0;
        let x: Vec<f32> = (0..3 * in_dim).map(val).collect();
        let mut y = vec![1.0f32; 3 * out_dim];
        // Rows 0 and 2 use the pair, row 1 none.
        let runs = [
            RowRun {
                start: 0,
                len: 1,
                a,
                bt,
                scale: 0.5,
            },
            RowRun {
                start: 2,
                len: 1,
                a,
                bt,
                scale: 0.5,
            },
        ];
        apply_runs(&x, &mut y, in_dim, out_dim, &runs);
        for row in 0..3 {
            for o in 0..out_dim {
                let mut want = 1.0f64;
                if row != 1 {
                    for k in 0..r {
                        let t: f64 = (0..in_dim)
                            .map(|i| (af[k * in_dim + i] * x[row * in_dim + i]) as f64)
                            .sum();
                        want += 0.5 * t * btf[k * out_dim + o] as f64;
                    }
                }
                let got = y[row * out_dim + o] as f64;
                assert!(
                    (got - want).abs() < tol,
                    "row {row} col {o}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn runs_match_the_dense_formula_f32_and_f16() {
        let (in_dim, out_dim, r) = (37, 29, 3);
        let val = |i: usize| ((i * 53 % 97) as f32 - 48.0) / 64.0;
        // Values exactly representable in f16, so both storages compute the same function.
        let a: Vec<f32> = (0..r * in_dim).map(|i| val(i + 7)).collect();
        let bt: Vec<f32> = (0..r * out_dim).map(|i| val(i + 11)).collect();
        check(Values::F32(&a), Values::F32(&bt), &a, &bt, 1e-5);
        let a16: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
        let bt16: Vec<f16> = bt.iter().map(|&v| f16::from_f32(v)).collect();
        check(Values::F16(&a16), Values::F16(&bt16), &a, &bt, 1e-5);
    }
}
