//! Products of several eight-row matrices from one rounding of the activations: q/k/v in
//! one pass of the worker pool, and a gated MLP's gate and up with the activation applied.

use super::int8::{with_quantized, Q8Row};
use super::x8::{pairs, GROUPS_PER_TASK, ROWS};
use super::{par_ranges, RowKernel};
use std::mem::MaybeUninit;

/// Groups `g..g + n` (`n` 1 or 2) of `k` times `xq`; `at(j)` points at row `j`'s `8 n`
/// results.
pub(crate) fn groups_dots(
    k: &dyn RowKernel,
    g: usize,
    n: usize,
    xq: &[Q8Row],
    at: &dyn Fn(usize) -> *mut f32,
) {
    if n == 2 {
        k.group_pair_dots(g, xq, at)
    } else {
        k.group_dots(g, xq, at)
    }
}

/// `outs[i] = xs W_i^T` (`[m, rows_i]`) for several matrices that read the same activation
/// rows (q/k/v, gate/up): the rows are rounded to int8 once and every matrix's groups go
/// through one pass of the worker pool, instead of one rounding and one pool dispatch per
/// matrix. Each output gets exactly what [`RowKernel::matmul_rows`] gives it, and every value
/// of it is written, so it may start uninitialised (zeroing the outputs was ~3% of a batched
/// decode step). `false` (and nothing written) unless every matrix has shared groups and
/// `cols` columns.
pub(crate) fn matmul_rows_shared(
    mats: &[&dyn RowKernel],
    xs: &[f32],
    m: usize,
    outs: &mut [&mut [MaybeUninit<f32>]],
) -> bool {
    let Some(cols) = mats.first().map(|k| k.dims().1) else {
        return false;
    };
    if mats.len() != outs.len()
        || xs.len() != m * cols
        || mats.iter().zip(outs.iter()).any(|(k, o)| {
            let (rows, c) = k.dims();
            c != cols || k.shared_groups() * ROWS != rows || o.len() != m * rows
        })
    {
        return false;
    }
    // Matrix `i`'s groups are units `first[i]..first[i + 1]` of one sequence; tasks take
    // GROUPS_PER_TASK consecutive units.
    let first: Vec<usize> = std::iter::once(0)
        .chain(mats.iter().scan(0, |n, k| {
            *n += k.shared_groups();
            Some(*n)
        }))
        .collect();
    let ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    with_quantized(xs, cols, |xq| {
        par_ranges(first[mats.len()], GROUPS_PER_TASK, |task| {
            // The task's units of each matrix it touches, paired within that matrix.
            let i0 = first.partition_point(|&f| f <= task.start) - 1;
            for i in (i0..mats.len()).take_while(|&i| first[i] < task.end) {
                let rows = mats[i].dims().0;
                let own =
                    task.start.max(first[i]) - first[i]..task.end.min(first[i + 1]) - first[i];
                for (g, n) in pairs(own) {
                    // Units are distinct (matrix, group) pairs, so each 8-value run has one
                    // writer; the outputs outlive the call, which returns when every task is
                    // done.
                    let at = |j: usize| (ptrs[i] as *mut f32).wrapping_add(j * rows + g * ROWS);
                    groups_dots(mats[i], g, n, xq, &at);
                }
            }
        })
    });
    true
}

/// `out = silu(xs G^T) * (xs U^T)` (`[m, rows]`) for a gated MLP's gate `G` and up `U`:
/// each pool task runs a group of both and applies the activation to its own eight columns.
/// The two products never become tensors, and the activation runs on every core instead of
/// on one after the pass (~3% of an eight-row SmolLM2 step). Each value is
/// [`super::vexp::swiglu`] of what [`RowKernel::matmul_rows`] gives the two matrices, and every
/// value is written. `false` (nothing written) unless both have shared groups and the same
/// shape with `cols` columns.
pub(crate) fn matmul_swiglu(
    gate: &dyn RowKernel,
    up: &dyn RowKernel,
    xs: &[f32],
    m: usize,
    out: &mut [MaybeUninit<f32>],
) -> bool {
    let (rows, cols) = gate.dims();
    if up.dims() != (rows, cols)
        || [gate, up].iter().any(|k| k.shared_groups() * ROWS != rows)
        || xs.len() != m * cols
        || out.len() != m * rows
    {
        return false;
    }
    let ptr = out.as_mut_ptr() as usize;
    with_quantized(xs, cols, |xq| {
        par_ranges(rows / ROWS, GROUPS_PER_TASK, |task| {
            // One or two groups' gate, up and activation: `m` rows of `n * 8` values each.
            let mut buf = vec![0f32; 3 * m * 2 * ROWS];
            for (g, n) in pairs(task) {
                let w = n * ROWS;
                let (gate8, rest) = buf.split_at_mut(m * w);
                let (up8, rest) = rest.split_at_mut(m * w);
                let y8 = &mut rest[..m * w];
                for (k, dst) in [(gate, &mut *gate8), (up, &mut *up8)] {
                    let p = dst.as_mut_ptr() as usize;
                    groups_dots(k, g, n, xq, &|j| (p as *mut f32).wrapping_add(j * w));
                }
                super::vexp::swiglu(y8, gate8, up8);
                for (j, y) in y8.chunks_exact(w).enumerate() {
                    // SAFETY: tasks cover disjoint groups, so each run of the output has one
                    // writer, and `out` outlives the call, which returns when every task is
                    // done.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            y.as_ptr(),
                            (ptr as *mut f32).add(j * rows + g * ROWS),
                            w,
                        )
                    };
                }
            }
        })
    });
    true
}
