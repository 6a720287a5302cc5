//! Tests of the eight-row layout and its kernels (`x8.rs`).

use super::*;
use crate::quant::int8::quantize_row;
use crate::quant::q4_1::tests::det_values;
use candle_core::quantized::{GgmlDType, QTensor};
use std::mem::MaybeUninit;

/// `F`'s eight-row matrix of `rows x cols` pseudo-normal weights quantized by candle as
/// `dtype`, with the ggml bytes and candle's tensor.
pub(crate) fn pair<F: X8Format>(
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
) -> (X8Matrix<F>, Vec<u8>, QTensor) {
    let w = Tensor::from_vec(det_values(rows * cols, 3), (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let bytes = q.data().unwrap().to_vec();
    (X8Matrix::new(rows, cols, &bytes).unwrap(), bytes, q)
}

/// Everything an eight-row format must give: candle's dequantized values exactly; int8
/// dots equal to `row_scalar` (the row-layout reference on the ggml bytes of row `r`) and
/// to candle within rounding; an exact product equal to the dequantized matmul up to
/// summation order, and the same bits for a row at any row count; refused bad shapes.
pub(crate) fn x8_format_holds<F: X8Format>(
    dtype: GgmlDType,
    row_scalar: impl Fn(&[u8], &Q8Row) -> f32,
) {
    let (x8, bytes, q) = pair::<F>(dtype, 64, 576);
    let deq = x8.dequantize(&Device::Cpu).unwrap();
    let diff = crate::test_util::max_abs_diff;
    assert_eq!(diff(&deq, &q.dequantize(&Device::Cpu).unwrap()), 0.0);
    let row_bytes = 576 / BLOCK * F::BLOCK_BYTES;
    let xq = quantize_row(&det_values(576, 4));
    for r in 0..64 {
        let theirs = row_scalar(&bytes[r * row_bytes..(r + 1) * row_bytes], &xq);
        let ours = x8.dot_scalar(r, &xq);
        assert!(
            (ours - theirs).abs() < 1e-4 * theirs.abs().max(1.0),
            "row {r}"
        );
    }
    crate::quant::tests::int8_kernel_agrees(&x8, q, |r, x| x8.dot_scalar(r, x));
    #[cfg(target_arch = "x86_64")]
    if crate::quant::use_vnni() {
        // The VNNI body's integer sums equal the AVX2 body's: the same bits, for the four-
        // and the eight-row kernels.
        let xs: Vec<Q8Row> = (0..ROWS as u64)
            .map(|k| quantize_row(&det_values(576, 30 + k)))
            .collect();
        for g in 0..64 / ROWS {
            let (mut a, mut v) = ([[0f32; ROWS]; ROWS], [[0f32; ROWS]; ROWS]);
            let (mut a4, mut v4) = ([[0f32; ROWS]; 4], [[0f32; ROWS]; 4]);
            let ptrs =
                |o: &mut [[f32; ROWS]]| o.iter_mut().map(|r| r.as_mut_ptr()).collect::<Vec<_>>();
            let (pa, pv, pa4, pv4) = (ptrs(&mut a), ptrs(&mut v), ptrs(&mut a4), ptrs(&mut v4));
            // SAFETY: the CPU has the features; each output has room for eight values.
            unsafe {
                let xk = std::array::from_fn(|k| &xs[k]);
                dots8_avx2::<F, ROWS>(x8.group(g), xk, std::array::from_fn(|k| pa[k]));
                dots8_vnni::<F, ROWS>(x8.group(g), xk, std::array::from_fn(|k| pv[k]));
                let x4 = std::array::from_fn(|k| &xs[k]);
                dots8_avx2::<F, 4>(x8.group(g), x4, std::array::from_fn(|k| pa4[k]));
                dots8_vnni::<F, 4>(x8.group(g), x4, std::array::from_fn(|k| pv4[k]));
            }
            assert_eq!(a, v, "group {g}");
            assert_eq!(a4, v4, "group {g}");
            assert_eq!(a4[..], a[..4], "group {g}");
        }
        // Two groups in one 512-bit pass: each group's bits as in its own pass, at every
        // row count.
        for g in (0..64 / ROWS).step_by(2) {
            let mut one = [[0f32; 2 * ROWS]; ROWS];
            for (h, group) in [x8.group(g), x8.group(g + 1)].into_iter().enumerate() {
                // SAFETY: as above.
                unsafe {
                    dots8_vnni::<F, ROWS>(
                        group,
                        std::array::from_fn(|k| &xs[k]),
                        std::array::from_fn(|k| one[k].as_mut_ptr().add(h * ROWS)),
                    )
                };
            }
            for n in 1..=ROWS {
                let mut two = vec![[f32::NAN; 2 * ROWS]; n];
                let at = row_at(&mut two, 0);
                // SAFETY: as above; each output has room for sixteen values.
                unsafe { dots16_on::<F>(n, x8.group(g), x8.group(g + 1), &xs, 0, &at) };
                assert_eq!(two[..], one[..n], "groups {g}, {n} rows");
            }
        }
        // The exact product's panel holds the stored weights, bit for bit.
        super::super::x8_panel::tests::panel_holds_the_weights(&x8, &deq);
    }

    let (rows, cols) = (64, 576);
    let xs = det_values(17 * cols, 8);
    let mut alone = vec![0f32; 17 * rows];
    for j in 0..17 {
        let out = &mut alone[j * rows..(j + 1) * rows];
        assert!(x8.matmul_exact_rows(&xs[j * cols..(j + 1) * cols], 1, out));
    }
    // Passes of every width (full ones and the rest) give each row the bits it gets
    // alone.
    for m in 2..=17 {
        let mut out = vec![0f32; m * rows];
        assert!(x8.matmul_exact_rows(&xs[..m * cols], m, &mut out));
        assert_eq!(out, alone[..m * rows], "m = {m}");
    }
    let x = Tensor::from_vec(xs, (17, cols), &Device::Cpu).unwrap();
    let exact = x.matmul(&deq.t().unwrap()).unwrap();
    // Only f32 summation order separates them: ~1e-5 on sums of 576 products of ~3.
    assert!(diff(&x8.forward_exact(&x).unwrap().unwrap(), &exact) < 1e-3);
    let xr = x.get(3).unwrap().to_vec1::<f32>().unwrap();
    for r in 0..rows {
        assert!((x8.dot_exact_scalar(r, &xr) - alone[3 * rows + r]).abs() < 1e-3);
    }

    assert!(X8Matrix::<F>::new(1, 64, &bytes[..2 * F::BLOCK_BYTES]).is_err());
    assert!(X8Matrix::<F>::new(8, 60, &bytes[..8 * 2 * F::BLOCK_BYTES]).is_err());
    assert!(X8Matrix::<F>::new(8, 64, &bytes[..8 * 2 * F::BLOCK_BYTES - 1]).is_err());
}

/// Where row `j`'s sixteen outputs start in `buf`, from value `off` of the row on: the
/// output-pointer function the pair passes take (a plain address, so it is `Sync`).
fn row_at(buf: &mut [[f32; 2 * ROWS]], off: usize) -> impl Fn(usize) -> *mut f32 + Sync {
    let base = buf.as_mut_ptr() as usize;
    move |j| ((base as *mut [f32; 2 * ROWS]).wrapping_add(j) as *mut f32).wrapping_add(off)
}

/// `v` as the uninitialised output [`matmul_rows_shared`] takes (sound: the same layout,
/// and only initialised values are written).
fn as_uninit(v: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and the slice stays initialised.
    unsafe { &mut *(v as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

#[test]
fn the_fused_gate_up_gives_the_bits_of_the_separate_products() {
    use crate::quant::q4_1x8::Q4_1x8;
    let cols = 576;
    let (g, _, _) = pair::<Q4_1x8>(GgmlDType::Q4_1, 64, cols);
    let (u, _, _) = pair::<Q4_1x8>(GgmlDType::Q4_1, 64, cols);
    for m in [1, 3, 8, 9] {
        let xs = det_values(m * cols, 70 + m as u64);
        let (mut gs, mut us) = (vec![0f32; m * 64], vec![0f32; m * 64]);
        g.matmul_rows(&xs, m, &mut gs);
        u.matmul_rows(&xs, m, &mut us);
        let mut want = vec![0f32; m * 64];
        crate::quant::vexp::swiglu(&mut want, &gs, &us);
        let mut got = vec![f32::NAN; m * 64];
        assert!(matmul_swiglu(&g, &u, &xs, m, as_uninit(&mut got)));
        assert_eq!(got, want, "m = {m}");
    }
    // Shapes that differ, or an output of the wrong size: declined, nothing written.
    let (other, _, _) = pair::<Q4_1x8>(GgmlDType::Q4_1, 8, cols);
    let xs = det_values(cols, 1);
    let mut o = vec![0f32; 64];
    assert!(!matmul_swiglu(&g, &other, &xs, 1, as_uninit(&mut o)));
    assert!(!matmul_swiglu(&g, &u, &xs, 1, as_uninit(&mut o[..8])));
    assert!(o.iter().all(|&v| v == 0.0));
}

#[test]
fn a_shared_pass_gives_each_matrix_its_own_bits() {
    use crate::quant::{q4_1x8::Q4_1x8, q8_0x8::Q8_0x8};
    let cols = 576;
    let (a, _, _) = pair::<Q4_1x8>(GgmlDType::Q4_1, 64, cols);
    let (b, _, _) = pair::<Q8_0x8>(GgmlDType::Q8_0, 24, cols);
    let (c, _, _) = pair::<Q4_1x8>(GgmlDType::Q4_1, 8, cols);
    let mats: [&dyn RowKernel; 3] = [&a, &b, &c];
    for m in [1, 3, 4, 8, 9] {
        let xs = det_values(m * cols, 40 + m as u64);
        let alone: Vec<Vec<f32>> = mats
            .iter()
            .map(|k| {
                let mut out = vec![0f32; m * k.dims().0];
                k.matmul_rows(&xs, m, &mut out);
                out
            })
            .collect();
        let mut outs: Vec<Vec<f32>> = mats
            .iter()
            .map(|k| vec![f32::NAN; m * k.dims().0])
            .collect();
        let mut views: Vec<_> = outs.iter_mut().map(|o| as_uninit(o)).collect();
        assert!(matmul_rows_shared(&mats, &xs, m, &mut views));
        assert_eq!(outs, alone, "m = {m}");
    }
    // Different widths, or an output of the wrong size: declined, nothing written.
    let (narrow, _, _) = pair::<Q4_1x8>(GgmlDType::Q4_1, 8, 64);
    let xs = det_values(cols, 1);
    let mut o1 = vec![0f32; 64];
    let mut o2 = vec![0f32; 8];
    assert!(!matmul_rows_shared(
        &[&a, &narrow],
        &xs,
        1,
        &mut [as_uninit(&mut o1), as_uninit(&mut o2)]
    ));
    assert!(!matmul_rows_shared(
        &[&a],
        &xs,
        1,
        &mut [as_uninit(&mut o2)]
    ));
    assert!(o1.iter().chain(&o2).all(|&v| v == 0.0));
}
