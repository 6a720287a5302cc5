//! Gradient checkpointing: a decoder layer runs forward without keeping its activations
//! (only its input survives), and recomputes itself when backward reaches it.
//!
//! candle has no hook for this, so the layer's output is re-attached to its input by a custom
//! op whose backward re-runs the layer with a graph, backpropagates the incoming gradient
//! through it, returns the gradient for the input, and leaves the adapter variables'
//! gradients in the step's `GradSink`.

use super::decoder::Block;
use super::rope::Rope;
use crate::error::Result;
use crate::lora::{BatchAdapters, GradSink};
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, Var};
use candle_nn::kv_cache::KvCache;
use std::sync::Arc;

/// One layer, ready to run again in backward.
pub(crate) struct Recompute {
    pub block: Block,
    pub rope: Rope,
    /// The step's adapters, without checkpointing (the recomputation keeps its graph).
    pub adapters: BatchAdapters,
    /// Where the adapter variables' gradients go.
    pub sink: Arc<GradSink>,
}

impl Recompute {
    fn run(&self, x: &Tensor) -> Result<Tensor> {
        // Training mode never touches the cache; the layer's signature wants one.
        self.block
            .forward(x, &self.rope, &mut KvCache::new(2, 1), 0, &self.adapters)
    }

    /// The layer on `x` with only `x` kept for backward.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        let y = self.run(&x.detach())?.detach();
        // The first layer's input (the embedding) is not on any gradient path, and an op on
        // untracked inputs is never visited by backward: make it a leaf that is.
        let x = if x.track_op() {
            x.clone()
        } else {
            Var::from_tensor(x)?.as_tensor().clone()
        };
        Ok(x.apply_op2(&y, self)?)
    }
}

impl CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        super::layers::pass_through(y, l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let xv = Var::from_tensor(&x.detach())?;
        let y = self
            .run(xv.as_tensor())
            .map_err(crate::TernError::into_candle)?;
        let gs = (y * grad.detach())?.sum_all()?.backward()?;
        for t in self.adapters.tensors() {
            if let Some(g) = gs.get(&t) {
                self.sink
                    .add(&t, g)
                    .map_err(crate::TernError::into_candle)?;
            }
        }
        Ok((gs.get(xv.as_tensor()).map(Tensor::detach), None))
    }
}
