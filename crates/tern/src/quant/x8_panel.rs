//! The exact (f32) product of an eight-row matrix with many activation rows, as prefill needs
//! it, on AVX-512: each pool task turns its 32 weight rows into an f32 panel once, then runs
//! every activation row over the panel with a register-blocked kernel.
//!
//! The kernels that rebuild the weights inside the product (`X8Format::exact8`) spend four
//! vector operations decoding each column for at most eight activation rows' FMAs, and
//! decode it again for every further eight rows: a third of the issue slots or more, on a
//! core where FMAs could take them all. Here decoding happens once per panel and is spread
//! over all the rows; the kernel spends one load of two weight vectors per column on up to
//! 16 FMAs. The panel is the task's rows over all columns (74 KB at 576 columns, 197 KB at
//! 1,536), so it stays in L2 while every pass reads it. This is how BLAS kernels pack a
//! matrix; the difference is that the packing here also dequantizes.
//!
//! Every output is one chain of FMAs over the columns in order, from zero, so a row gets the
//! same bits at any row count and in any pass.

use super::x8::{X8Format, X8Matrix, GROUPS_PER_TASK, ROWS};
use super::{par_ranges, RowKernel, BLOCK};
use std::cell::RefCell;

/// Weight rows per panel: a pool task's groups, two 512-bit vectors per column.
const PANEL_ROWS: usize = GROUPS_PER_TASK * ROWS;
/// Most activation rows per kernel pass: 2 x 8 sums, 16 FMAs per column for two loads of
/// weights. (At twelve rows the release profile's opt-level 2 left the loop over the rows
/// rolled, the sums on the stack, and prefill at half the speed.)
const MAX_PASS: usize = 8;

/// One column of a panel (64-byte aligned, so no load of it splits a cache line).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

thread_local! {
    /// Each pool thread's panel, reused from call to call.
    static PANEL: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// `out[j * rows + r] = W[r] · xs[j]` for every weight row `r` and activation row `j < m`,
/// exact to the stored weights.
///
/// The caller has checked that the CPU has AVX-512 (`use_vnni`) and the sizes.
pub(super) fn matmul_exact<F: X8Format>(w: &X8Matrix<F>, xs: &[f32], m: usize, out: &mut [f32]) {
    let (rows, cols) = w.dims();
    if m == 0 {
        return;
    }
    let out_ptr = out.as_mut_ptr() as usize;
    par_ranges(rows / ROWS, GROUPS_PER_TASK, |range| {
        PANEL.with_borrow_mut(|panel| {
            // Two lines per column: a panel's groups 0-1, then 2-3.
            panel.resize(2 * cols, Line([0.0; 16]));
            let p = panel.as_mut_ptr() as *mut f32;
            // A call may get several tasks' groups: one panel at a time.
            for g in range.clone().step_by(GROUPS_PER_TASK) {
                let gs = g..(g + GROUPS_PER_TASK).min(range.end);
                // SAFETY: the caller checked AVX-512; the panel has 32 values per column and
                // the groups are in bounds.
                unsafe { fill::<F>(w, gs.clone(), p) };
                let lanes = gs.len() * ROWS;
                for (j, n) in even_passes(m) {
                    let x = |k: usize| xs[(j + k) * cols..].as_ptr();
                    // Calls cover disjoint groups, so each run of `lanes` values has one
                    // writer; `out` outlives the call, which returns when every task is done.
                    let o = |k: usize| {
                        (out_ptr as *mut f32).wrapping_add((j + k) * rows + gs.start * ROWS)
                    };
                    // SAFETY: AVX-512 is present; each x row has `cols` values, each output
                    // row room for `lanes` values past `o(k)`.
                    unsafe { pass_on(n, p, cols, &x, &o, lanes) };
                }
            }
        })
    });
}

/// `(first row, rows)` of passes of near-equal width over `m` rows: 9 rows as 5 + 4 keep 8-10
/// chains of FMAs in each pass, where 8 + 1 would leave the last pass two, waiting on their
/// latency.
fn even_passes(m: usize) -> impl Iterator<Item = (usize, usize)> {
    let passes = m.div_ceil(MAX_PASS);
    let (base, wider) = (m / passes, m % passes);
    (0..passes).scan(0, move |j, i| {
        let n = base + usize::from(i < wider);
        *j += n;
        Some((*j - n, n))
    })
}

/// Writes groups `gs` (at most [`GROUPS_PER_TASK`]) of `w` into the panel at `p`: column `c`
/// at `p + 32 c`, group `i` of the task in lanes `8i..8i + 8`. Lanes of missing groups keep
/// what they held; their sums are never stored.
///
/// # Safety
/// The CPU must support AVX-512F and F16C; `p` has room for `32 * cols` values.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw")]
unsafe fn fill<F: X8Format>(w: &X8Matrix<F>, gs: std::ops::Range<usize>, p: *mut f32) {
    let gbb = ROWS * F::BLOCK_BYTES;
    let nb = w.dims().1 / BLOCK;
    for (half, g) in gs.clone().step_by(2).enumerate() {
        // A lone last group goes in both halves of its vector; the copy is never stored.
        let (a, b) = (w.group(g), w.group(if g + 1 < gs.end { g + 1 } else { g }));
        for blk in 0..nb {
            // The weights come from DRAM once per call: ask for them ahead of the decoding
            // (four lines: a group block of the 4- and 5-bit formats, most of Q8_0's).
            super::x8::prefetch_ahead::<256>(a.as_ptr().add(blk * gbb));
            super::x8::prefetch_ahead::<256>(b.as_ptr().add(blk * gbb));
            let out = p.add(blk * BLOCK * PANEL_ROWS + 16 * half);
            F::dequant16(
                &a[blk * gbb..][..gbb],
                &b[blk * gbb..][..gbb],
                out,
                PANEL_ROWS,
            );
        }
    }
}

/// `n` activation rows over the panel through [`pass`] (`n` from 1 to [`MAX_PASS`]).
///
/// # Safety
/// As [`pass`].
#[inline(always)]
unsafe fn pass_on(
    n: usize,
    p: *const f32,
    cols: usize,
    x: &dyn Fn(usize) -> *const f32,
    o: &dyn Fn(usize) -> *mut f32,
    lanes: usize,
) {
    macro_rules! widths {
        ($($w:literal)*) => {
            match n {
                $($w => pass::<$w>(
                    p,
                    cols,
                    std::array::from_fn(|k| x(k)),
                    std::array::from_fn(|k| o(k)),
                    lanes,
                ),)*
                n => unreachable!("{n} rows in one pass"),
            }
        };
    }
    widths!(1 2 3 4 5 6 7 8)
}

/// `N` activation rows times the panel's 32 weight rows; row `k`'s first `lanes` results go
/// to `out[k]`.
///
/// # Safety
/// The CPU must support AVX-512F; `p` holds `32 * cols` values, each `x[k]` `cols`, and each
/// `out[k]` has room for `lanes` (at most 32).
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn pass<const N: usize>(
    p: *const f32,
    cols: usize,
    x: [*const f32; N],
    out: [*mut f32; N],
    lanes: usize,
) {
    use std::arch::x86_64::*;
    let (mut lo, mut hi) = ([_mm512_setzero_ps(); N], [_mm512_setzero_ps(); N]);
    for c in 0..cols {
        let w0 = _mm512_load_ps(p.add(PANEL_ROWS * c));
        let w1 = _mm512_load_ps(p.add(PANEL_ROWS * c + 16));
        for k in 0..N {
            let xv = _mm512_set1_ps(*x[k].add(c));
            lo[k] = _mm512_fmadd_ps(w0, xv, lo[k]);
            hi[k] = _mm512_fmadd_ps(w1, xv, hi[k]);
        }
    }
    let mask = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
    let (m0, m1) = (mask(lanes), mask(lanes.saturating_sub(16)));
    for k in 0..N {
        _mm512_mask_storeu_ps(out[k], m0, lo[k]);
        // Masked-off lanes are not written (nor their addresses touched).
        _mm512_mask_storeu_ps(out[k].wrapping_add(16), m1, hi[k]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Tensor;

    /// The panel of every task (four groups, and a last task of three, so one group stands
    /// alone in its vector) holds `deq`'s values, lane for lane.
    pub(crate) fn panel_holds_the_weights<F: X8Format>(w: &X8Matrix<F>, deq: &Tensor) {
        let (rows, cols) = w.dims();
        let deq = deq.to_vec2::<f32>().unwrap();
        let groups = rows / ROWS;
        let tasks = (0..groups)
            .step_by(GROUPS_PER_TASK)
            .map(|g| g..(g + GROUPS_PER_TASK).min(groups))
            .chain(std::iter::once(groups - 3..groups));
        for gs in tasks {
            let mut panel = vec![Line([f32::NAN; 16]); 2 * cols];
            // SAFETY: the caller checked AVX-512; the panel has 32 values per column.
            unsafe { fill::<F>(w, gs.clone(), panel.as_mut_ptr() as *mut f32) };
            for c in 0..cols {
                for (i, g) in gs.clone().enumerate() {
                    for r in 0..ROWS {
                        let lane = panel[2 * c + i / 2].0[8 * (i % 2) + r];
                        let want = deq[g * ROWS + r][c];
                        assert_eq!(lane.to_bits(), want.to_bits(), "group {g} row {r} col {c}");
                    }
                }
            }
        }
    }
}
