//! The vector kernels of [`super::decode_attention`]: a query head's scores over its keys
//! and the probability-weighted sum of its values, alone or for a group of heads that share
//! one kv head (GQA).
//!
//! Why groups: each (query, head) pair read its kv head's whole history from L2 (a 1,000-token
//! prompt's attention waited on those reads, ~40% of its prefill). The heads of one group read
//! the same keys and values, so the group kernels load each key and value row once for up to
//! [`GROUP`] heads. Every head's arithmetic is the same sequence of operations as alone (the
//! same keys per pass, the same order of multiply-adds, the same reductions), so a head's
//! output has the same bits whichever way it runs; the tests check that.

/// Heads of one kv group computed together: each keeps 4 keys' sums (or 4 vectors of
/// values) in registers, so three take 12 of the 16 AVX2 registers.
pub(super) const GROUP: usize = 3;

/// A hint to bring the cache line at `p` in (no effect off x86-64).
#[inline(always)]
pub(super) fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing architecturally; `p` points into a live slice.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
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
    // Eight keys per pass: eight independent chains keep both FMA pipes busy (four waited on
    // the FMA latency). Each key's reduction is the four-key path's, so its bits are too.
    while j + 8 <= scores.len() {
        let mut acc = [_mm256_setzero_ps(); 8];
        for i in (0..n).step_by(8) {
            let qv = _mm256_loadu_ps(q.as_ptr().add(i));
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp.add((j + k) * stride + i)), *a);
            }
        }
        for (h, a) in acc.chunks_exact(4).enumerate() {
            store_four_sums(a, scale, scores.as_mut_ptr().add(j + 4 * h));
        }
        j += 8;
    }
    while j + 4 <= scores.len() {
        let mut acc = [_mm256_setzero_ps(); 4];
        for i in (0..n).step_by(8) {
            let qv = _mm256_loadu_ps(q.as_ptr().add(i));
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp.add((j + k) * stride + i)), *a);
            }
        }
        store_four_sums(&acc, scale, scores.as_mut_ptr().add(j));
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

/// Stores `scale` times the sum of each of four keys' lanes at `out`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_four_sums(acc: &[std::arch::x86_64::__m256], scale: f32, out: *mut f32) {
    use std::arch::x86_64::*;
    // Pairwise adds leave lane k of each 128-bit half holding part of key k's sum.
    let h = _mm256_hadd_ps(
        _mm256_hadd_ps(acc[0], acc[1]),
        _mm256_hadd_ps(acc[2], acc[3]),
    );
    let sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(out, _mm_mul_ps(sums, _mm_set1_ps(scale)));
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

/// [`scaled_dots`] for heads that share `keys`: head `r`'s scores are
/// `scores[r * count..][..count]` (`count = scores.len() / qs.len()`), each with the bits
/// [`scaled_dots`] gives that head alone.
pub(super) fn scaled_dots_group(
    qs: &[&[f32]],
    keys: &[f32],
    stride: usize,
    scale: f32,
    scores: &mut [f32],
) {
    let r = qs.len();
    assert!((1..=GROUP).contains(&r) && scores.len().is_multiple_of(r));
    let (n, count) = (qs[0].len(), scores.len() / r);
    assert!(qs.iter().all(|q| q.len() == n));
    assert!(count == 0 || keys.len() >= (count - 1) * stride + n);
    #[cfg(target_arch = "x86_64")]
    if r > 1 && crate::quant::use_avx2() && n.is_multiple_of(8) {
        let q: [*const f32; GROUP] = std::array::from_fn(|h| qs[h.min(r - 1)].as_ptr());
        let s: [*mut f32; GROUP] =
            std::array::from_fn(|h| scores.as_mut_ptr().wrapping_add(h.min(r - 1) * count));
        // SAFETY: the CPU has avx2 and fma; the asserts keep every key row in `keys`, each
        // query holds `n` values and each head's scores `count`.
        unsafe {
            match r {
                2 => dots_group::<2>(q, keys.as_ptr(), stride, n, scale, s, count),
                _ => dots_group::<3>(q, keys.as_ptr(), stride, n, scale, s, count),
            }
        }
        return;
    }
    for (q, s) in qs.iter().zip(scores.chunks_exact_mut(count.max(1))) {
        scaled_dots(q, keys, stride, scale, s);
    }
}

/// [`weighted_sum`] for heads that share `x`: head `r`'s weights are `ps[r * count..][..count]`
/// and its sum `outs[r * n..][..n]`, for `r < heads`, each with the bits [`weighted_sum`] gives
/// that head alone.
pub(super) fn weighted_sum_group(
    ps: &[f32],
    heads: usize,
    x: &[f32],
    stride: usize,
    outs: &mut [f32],
) {
    assert!((1..=GROUP).contains(&heads));
    assert!(ps.len().is_multiple_of(heads) && outs.len().is_multiple_of(heads));
    let (count, n) = (ps.len() / heads, outs.len() / heads);
    assert!(count == 0 || x.len() >= (count - 1) * stride + n);
    #[cfg(target_arch = "x86_64")]
    if heads > 1 && crate::quant::use_avx2() && n.is_multiple_of(8) {
        let p: [*const f32; GROUP] =
            std::array::from_fn(|h| ps.as_ptr().wrapping_add(h.min(heads - 1) * count));
        let o: [*mut f32; GROUP] =
            std::array::from_fn(|h| outs.as_mut_ptr().wrapping_add(h.min(heads - 1) * n));
        // SAFETY: as in `scaled_dots_group`: every row lies in `x`, each head's weights hold
        // `count` values and its output `n`.
        unsafe {
            match heads {
                2 => sums_group::<2>(p, x.as_ptr(), stride, n, o, count),
                _ => sums_group::<3>(p, x.as_ptr(), stride, n, o, count),
            }
        }
        return;
    }
    if n == 0 {
        return;
    }
    for (h, o) in outs.chunks_exact_mut(n).enumerate() {
        weighted_sum(&ps[h * count..][..count], x, stride, o);
    }
}

/// Defines `$name` (the build for this CPU) and its AVX2 and AVX-512 builds `$avx2`,
/// `$avx512` of the kernel `$body`: the same operations, so the same bits; the EVEX forms give
/// the AVX-512 build 32 vector registers instead of 16.
macro_rules! two_builds {
    ($name:ident, $avx2:ident, $avx512:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        unsafe fn $name<const R: usize>($($arg: $ty),*) {
            if crate::quant::use_vnni() {
                $avx512::<R>($($arg),*)
            } else {
                $avx2::<R>($($arg),*)
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2<const R: usize>($($arg: $ty),*) {
            $body::<R>($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
        unsafe fn $avx512<const R: usize>($($arg: $ty),*) {
            $body::<R>($($arg),*)
        }
    };
}

two_builds!(dots_group, dots_group_avx2, dots_group_avx512, dots_group_body, (
    q: [*const f32; GROUP],
    kp: *const f32,
    stride: usize,
    n: usize,
    scale: f32,
    s: [*mut f32; GROUP],
    count: usize
));

/// [`scaled_dots_group`]'s kernel for `R` heads: where [`scaled_dots_avx2`] keeps 8 (or 4)
/// keys' sums of one head, this keeps 4 keys' sums of each of `R` heads, and the keys left
/// over after whole passes of 4 go one by one, as there.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dots_group_body<const R: usize>(
    q: [*const f32; GROUP],
    kp: *const f32,
    stride: usize,
    n: usize,
    scale: f32,
    s: [*mut f32; GROUP],
    count: usize,
) {
    use std::arch::x86_64::*;
    let mut j = 0;
    while j + 4 <= count {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for i in (0..n).step_by(8) {
            let kv: [__m256; 4] =
                std::array::from_fn(|k| _mm256_loadu_ps(kp.add((j + k) * stride + i)));
            for (r, a) in acc.iter_mut().enumerate() {
                let qv = _mm256_loadu_ps(q[r].add(i));
                for (k, ak) in a.iter_mut().enumerate() {
                    *ak = _mm256_fmadd_ps(qv, kv[k], *ak);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            store_four_sums(a, scale, s[r].add(j));
        }
        j += 4;
    }
    for jj in j..count {
        let mut acc = [_mm256_setzero_ps(); R];
        for i in (0..n).step_by(8) {
            let kv = _mm256_loadu_ps(kp.add(jj * stride + i));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(q[r].add(i)), kv, *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            *s[r].add(jj) = scale * crate::quant::hsum(*a);
        }
    }
}

two_builds!(sums_group, sums_group_avx2, sums_group_avx512, sums_group_body, (
    p: [*const f32; GROUP],
    x: *const f32,
    stride: usize,
    n: usize,
    o: [*mut f32; GROUP],
    count: usize
));

/// [`weighted_sum_group`]'s kernel for `R` heads: 32 output values of each head at a time in
/// registers (each value's multiply-adds in the order [`weighted_sum_avx2`] does them).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sums_group_body<const R: usize>(
    p: [*const f32; GROUP],
    x: *const f32,
    stride: usize,
    n: usize,
    o: [*mut f32; GROUP],
    count: usize,
) {
    use std::arch::x86_64::*;
    const LANES: usize = 4;
    for c in (0..n).step_by(8 * LANES) {
        let lanes = (n - c).min(8 * LANES) / 8;
        let mut acc = [[_mm256_setzero_ps(); LANES]; R];
        for j in 0..count {
            let src = x.add(j * stride + c);
            let xv: [__m256; LANES] = std::array::from_fn(|l| {
                if l < lanes {
                    _mm256_loadu_ps(src.add(8 * l))
                } else {
                    _mm256_setzero_ps()
                }
            });
            for (r, a) in acc.iter_mut().enumerate() {
                let wv = _mm256_set1_ps(*p[r].add(j));
                for (l, al) in a.iter_mut().enumerate().take(lanes) {
                    *al = _mm256_fmadd_ps(wv, xv[l], *al);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (l, al) in a.iter().enumerate().take(lanes) {
                _mm256_storeu_ps(o[r].add(c + 8 * l), *al);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    }

    /// One to three heads, key counts around the passes of 4 and 8, head sizes on and off the
    /// vector width, rows strided as in a cache: each head's scores and sums have the bits of
    /// running that head alone.
    #[test]
    fn groups_give_each_head_its_bits_alone() {
        for hd in [64, 48, 32, 20] {
            for count in [0, 1, 3, 4, 7, 8, 13, 37] {
                let stride = hd + 8;
                let keys = values(count.max(1) * stride, 7);
                let vals = values(count.max(1) * stride, 9);
                for r in 1..=GROUP {
                    let qs: Vec<Vec<f32>> = (0..r).map(|h| values(hd, 100 + h as u32)).collect();
                    let qr: Vec<&[f32]> = qs.iter().map(|q| q.as_slice()).collect();
                    let mut got = vec![0f32; r * count];
                    scaled_dots_group(&qr, &keys, stride, 0.125, &mut got);
                    let ps = values(r * count, 200);
                    let mut sums = vec![0f32; r * hd];
                    weighted_sum_group(&ps, r, &vals, stride, &mut sums);
                    #[cfg(target_arch = "x86_64")]
                    if r == 3 && hd % 8 == 0 && crate::quant::use_avx2() {
                        // The AVX2-only build of the kernels (this CPU may run the AVX-512 one).
                        let mut s2 = vec![0f32; 3 * count];
                        let mut o2 = vec![0f32; 3 * hd];
                        let q: [*const f32; GROUP] = std::array::from_fn(|h| qs[h].as_ptr());
                        let sp: [*mut f32; GROUP] =
                            std::array::from_fn(|h| s2.as_mut_ptr().wrapping_add(h * count));
                        let pp: [*const f32; GROUP] =
                            std::array::from_fn(|h| ps.as_ptr().wrapping_add(h * count));
                        let op: [*mut f32; GROUP] =
                            std::array::from_fn(|h| o2.as_mut_ptr().wrapping_add(h * hd));
                        // SAFETY: AVX2 is there; the buffers are sized as the kernels read them.
                        unsafe {
                            dots_group_avx2::<3>(q, keys.as_ptr(), stride, hd, 0.125, sp, count);
                            sums_group_avx2::<3>(pp, vals.as_ptr(), stride, hd, op, count);
                        }
                        assert_eq!(s2, got, "avx2 scores hd {hd} count {count}");
                        assert_eq!(o2, sums, "avx2 sums hd {hd} count {count}");
                    }
                    for h in 0..r {
                        let mut want = vec![0f32; count];
                        scaled_dots(&qs[h], &keys, stride, 0.125, &mut want);
                        assert_eq!(
                            got[h * count..][..count],
                            want,
                            "scores hd {hd} count {count} heads {r} head {h}"
                        );
                        let mut want = vec![0f32; hd];
                        weighted_sum(&ps[h * count..][..count], &vals, stride, &mut want);
                        assert_eq!(
                            sums[h * hd..][..hd],
                            want,
                            "sums hd {hd} count {count} heads {r} head {h}"
                        );
                    }
                }
            }
        }
    }
}
