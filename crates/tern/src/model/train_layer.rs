//! A training step's decoder layer as one op (`train_ops::layer`) where it applies: f32 on
//! the CPU, one adapter over the whole batch, no biases or per-head q/k norms, f32 norms and
//! rope tables, and a gradient sink to take the adapter's gradients. Elsewhere the layer runs
//! as its parts through candle's graph.

use super::attention::Attention;
use super::layers::{Mlp, RmsNorm};
use super::rope::Rope;
use super::train_ops::layer::DecoderLayer;
use crate::error::Result;
use crate::lora::BatchAdapters;
use candle_core::{Tensor, Var};

/// The layer (`norms` the attention's and the MLP's) on `x` `[b, s, hidden]` as one op, or
/// `None` where it does not apply.
pub(crate) fn forward(
    norms: [&RmsNorm; 2],
    attn: &Attention,
    mlp: &Mlp,
    x: &Tensor,
    rope: &Rope,
    ad: &BatchAdapters,
) -> Result<Option<Tensor>> {
    let Some(sink) = ad.grad_sink() else {
        return Ok(None);
    };
    if !super::train_ops::fits(x) || !rope.is_f32() {
        return Ok(None);
    }
    let Some((qkvo, heads, window)) = attn.train_parts() else {
        return Ok(None);
    };
    let (Some(n1), Some(n2)) = (norms[0].train_parts(), norms[1].train_parts()) else {
        return Ok(None);
    };
    let (_, s, _) = x.dims3()?;
    let rows = x.elem_count() / x.dim(2)?.max(1);
    let [q, k, v, o] = qkvo;
    let [gate, up, down] = mlp.linears();
    let linears = [q, k, v, o, gate, up, down];
    if linears.iter().any(|l| l.has_bias()) {
        return Ok(None);
    }
    let mut projs = Vec::with_capacity(7);
    for l in linears {
        match l.train_proj(rows, ad)? {
            Some(p) => projs.push(p),
            None => return Ok(None),
        }
    }
    let projs = projs.try_into().ok().expect("seven projections");
    // The first layer's input (the embedding's rows) is not on any gradient path, and an op
    // on untracked inputs is never visited by backward: make it a leaf that is, and skip its
    // gradient.
    let need_dx = x.track_op();
    let x = if need_dx {
        x.contiguous()?
    } else {
        Var::from_tensor(&x.contiguous()?)?.as_tensor().clone()
    };
    let op = DecoderLayer::new(
        [n1, n2],
        projs,
        rope.train_tables(s)?,
        heads,
        window,
        need_dx,
        sink.clone(),
    );
    Ok(Some(x.apply_op1(op)?))
}
