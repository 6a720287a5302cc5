//! Vectorised single-precision `exp` (Cephes' polynomial, about 2 ulp) over slices: the
//! sampler's vocabulary-wide sum for a token's log-probability, and a training step's
//! softmax, cross-entropy and SiLU. libm's scalar `expf` cost ~5 ns a value; a step of
//! SmolLM2 training takes ~10^8 of them.

/// `exp(x)` of eight lanes: `2^n * p(r)` for `x = n ln2 + r`; inputs are clamped to
/// `[-87.3, 88.3]` (below, the result is under f32's normal range; above, it overflows).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.3),
    );
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    // ln 2 split in two so n * hi is exact.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        _mm256_mul_ps(p, r),
        r,
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let pow2 = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
}

/// `Σ exp(x - max)` over a row whose largest value is `max`, summed blockwise into f64.
pub(crate) fn sum_exp(xs: &[f32], max: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if super::use_avx2() {
        // SAFETY: the CPU reports avx2 and fma.
        return unsafe { sum_exp_avx2(xs, max) };
    }
    xs.iter().map(|&l| ((l - max) as f64).exp()).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_avx2(xs: &[f32], max: f32) -> f64 {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(max);
    let mut total = 0f64;
    // f32 lanes over 1024 values at most (each term <= 1), then into f64.
    for block in xs.chunks(1024) {
        let mut acc = _mm256_setzero_ps();
        let chunks = block.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m)));
        }
        total += super::hsum(acc) as f64;
        total += tail.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>();
    }
    total
}

/// `out[i] = scale * exp(a * xs[i] + b)` (softmax rows: `a = 1, b = -max`; a sigmoid's
/// `exp(-x)`: `a = -1, b = 0`).
pub(crate) fn exp_affine(out: &mut [f32], xs: &[f32], a: f32, b: f32, scale: f32) {
    assert_eq!(out.len(), xs.len());
    #[cfg(target_arch = "x86_64")]
    if super::use_avx2() {
        // SAFETY: the CPU reports avx2 and fma; the lengths match.
        return unsafe { exp_affine_avx2(out, xs, a, b, scale) };
    }
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = scale * (a * x + b).exp();
    }
}

/// `out = 1 / (1 + exp(-x))`, vectorised.
pub(crate) fn sigmoid(out: &mut [f32], x: &[f32]) {
    exp_affine(out, x, -1.0, 0.0, 1.0);
    out.iter_mut().for_each(|e| *e = 1.0 / (1.0 + *e));
}

/// `out = silu(g) * u`, the gated MLP's activation. Every caller (the training op, the fused
/// decode product) goes through this one, so they give the same bits.
pub(crate) fn swiglu(out: &mut [f32], g: &[f32], u: &[f32]) {
    sigmoid(out, g);
    for ((o, &a), &b) in out.iter_mut().zip(g).zip(u) {
        *o *= a * b;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_affine_avx2(out: &mut [f32], xs: &[f32], a: f32, b: f32, scale: f32) {
    use std::arch::x86_64::*;
    let (va, vb, vs) = (_mm256_set1_ps(a), _mm256_set1_ps(b), _mm256_set1_ps(scale));
    let n = xs.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        let x = _mm256_fmadd_ps(_mm256_loadu_ps(xs.as_ptr().add(i)), va, vb);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(exp8(x), vs));
    }
    for i in n..xs.len() {
        out[i] = scale * (a * xs[i] + b).exp();
    }
}

/// `xs[i] = exp(xs[i] - max)` in place; returns their sum.
pub(crate) fn softmax_exp(xs: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::use_avx2() {
        // SAFETY: the CPU reports avx2 and fma.
        return unsafe { softmax_exp_avx2(xs, max) };
    }
    let mut sum = 0f32;
    for x in xs {
        *x = (*x - max).exp();
        sum += *x;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_exp_avx2(xs: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    let n = xs.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        let p = xs.as_mut_ptr().add(i);
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), m));
        _mm256_storeu_ps(p, e);
        acc = _mm256_add_ps(acc, e);
    }
    let mut sum = super::hsum(acc);
    for x in &mut xs[n..] {
        *x = (*x - max).exp();
        sum += *x;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised sum of exponentials against f64 libm, over a vocabulary-sized row with
    /// a tail that is not a multiple of the lane count and values far below the maximum.
    #[test]
    fn sum_exp_matches_f64() {
        let row: Vec<f32> = (0..49_157)
            .map(|i| ((i as u64 * 2_654_435_761) % 20_000) as f32 / 100.0 - 180.0)
            .collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exact: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let ours = sum_exp(&row, max);
        assert!(((ours - exact) / exact).abs() < 1e-6, "{ours} vs {exact}");
        // Each term on its own, across the range the polynomial covers.
        for x in [-87.0f32, -30.5, -10.25, -1.0, -0.3, 0.0] {
            let one = [x; 9];
            let e = 9.0 * (x as f64).exp();
            let got = sum_exp(&one, 0.0);
            assert!(((got - e) / e).abs() < 1e-6, "exp({x}): {got} vs {e}");
        }
    }

    /// Every value within 3e-7 relative of f64 libm across [-87, 87], tails included; far
    /// outside, 0 and infinity.
    #[test]
    fn slices_match_f64_and_saturate() {
        let xs: Vec<f32> = (0..1_203).map(|i| -86.0 + i as f32 * 0.1438).collect();
        let mut out = vec![0f32; xs.len()];
        exp_affine(&mut out, &xs, 1.0, 0.0, 2.0);
        let mut inplace = xs.clone();
        let sum = softmax_exp(&mut inplace, 1.0);
        let mut want_sum = 0f64;
        for (i, &x) in xs.iter().enumerate() {
            let e = (x as f64).exp();
            assert!((out[i] as f64 / (2.0 * e) - 1.0).abs() < 3e-7, "exp({x})");
            let e1 = ((x - 1.0) as f64).exp(); // the shift is an f32 subtraction
            let rel = (inplace[i] as f64 / e1 - 1.0).abs();
            assert!(rel < 3e-7, "exp({x} - 1): {} vs {e1}, {rel}", inplace[i]);
            want_sum += e1;
        }
        assert!((sum as f64 / want_sum - 1.0).abs() < 1e-5);
        let mut far = [0f32; 9];
        exp_affine(&mut far, &[-200.0; 9], 1.0, 0.0, 1.0);
        assert!(far.iter().all(|&v| v == 0.0 || v < 1e-37));
        exp_affine(&mut far, &[200.0; 9], 1.0, 0.0, 1.0);
        assert!(far.iter().all(|&v| v.is_infinite() || v > 1e38));
    }
}
