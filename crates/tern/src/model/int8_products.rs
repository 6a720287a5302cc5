//! Decode-time products through tern's eight-row int8 kernels, straight into tensors: the
//! input is read in place, outputs are written without being zeroed first, and kernels that
//! read the same input (q/k/v; gate and up, with the gated activation) share one pass of the
//! worker pool. Everything here is serial time between the pool's passes in a batched decode
//! step, which is why it avoids copies and allocations.

use crate::error::Result;
use crate::quant::{x8, RowKernel};
use candle_core::Tensor;
use std::mem::MaybeUninit;

/// Runs `f(xs, m, outs)` over `x` (f32 on the CPU, read in place) flattened to `m` rows, with
/// `outs[i]` room for `[m, widths[i]]` values, uninitialised. If `f` returns `true` it has
/// written every value, and the outputs come back shaped as `x` with `widths[i]` last; `None`
/// when `x` is not an f32 CPU tensor or `f` declines.
fn with_outputs(
    x: &Tensor,
    widths: &[usize],
    f: impl FnOnce(&[f32], usize, &mut [&mut [MaybeUninit<f32>]]) -> bool,
) -> Result<Option<Vec<Tensor>>> {
    let cols = x.dims().last().copied().unwrap_or(0).max(1);
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Ok(xs) = super::train_ops::storage_f32(&storage, layout) else {
        return Ok(None);
    };
    let m = xs.len() / cols;
    let mut outs: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(m * w)).collect();
    let mut views: Vec<_> = outs
        .iter_mut()
        .zip(widths)
        .map(|(o, w)| &mut o.spare_capacity_mut()[..m * w])
        .collect();
    if !f(xs, m, &mut views) {
        return Ok(None);
    }
    outs.into_iter()
        .zip(widths)
        .map(|(mut out, &w)| {
            // SAFETY: `f` returned true, so it wrote all `m * w` values.
            unsafe { out.set_len(m * w) };
            let mut dims = x.dims().to_vec();
            *dims.last_mut().expect("rank >= 1") = w;
            Ok(Tensor::from_vec(out, dims, x.device())?)
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// `x K_i^T` for each kernel in one pass ([`x8::matmul_rows_shared`]); `None` if it declines.
pub(crate) fn shared(ks: &[&dyn RowKernel], x: &Tensor) -> Result<Option<Vec<Tensor>>> {
    let widths: Vec<usize> = ks.iter().map(|k| k.dims().0).collect();
    with_outputs(x, &widths, |xs, m, outs| {
        x8::matmul_rows_shared(ks, xs, m, outs)
    })
}

/// `x K^T` (f32) through the kernel's int8 product: in place through [`shared`] for an
/// eight-row kernel, else the kernel's own `forward`.
pub(crate) fn single(k: &dyn RowKernel, x: &Tensor) -> Result<Tensor> {
    if k.shared_groups() > 0 {
        if let Some(mut ys) = shared(&[k], x)? {
            return Ok(ys.pop().expect("one output per kernel"));
        }
    }
    k.forward(x)
}

/// `silu(x G^T) * (x U^T)` in one pass ([`x8::matmul_swiglu`]); `None` if it declines.
pub(crate) fn swiglu(
    gate: &dyn RowKernel,
    up: &dyn RowKernel,
    x: &Tensor,
) -> Result<Option<Tensor>> {
    let ys = with_outputs(x, &[gate.dims().0], |xs, m, outs| {
        x8::matmul_swiglu(gate, up, xs, m, &mut *outs[0])
    })?;
    Ok(ys.and_then(|mut ys| ys.pop()))
}
