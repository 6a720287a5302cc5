//! A frozen linear layer with its LoRA pair, as one op: `y = x W^T + s (x∘m) A^T B^T`.
//!
//! Backward gives `dx`, `dA` and `dB^T` only (the base weight is frozen, so `x^T dy`, a
//! weight-sized product, is never formed). The op holds the layer's stored weight and
//! dequantizes it again in backward when it is quantized (QLoRA): no float copy lives from
//! forward to backward. Besides the output only `scale (x∘m) A^T` (rank columns) is kept.

use super::{cpu_f32, f32_of, like, product, Mat, RankUpdate};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use std::sync::Arc;

/// Where the op finds the frozen weight as f32 `[out, in]` (dequantizing when stored
/// quantized).
pub(crate) type WeightFn = Arc<dyn Fn() -> candle_core::Result<Tensor> + Send + Sync>;

use crate::lora::HalfProducts;

/// Whether this CPU can run `kind`'s products.
pub(crate) fn available(kind: HalfProducts) -> bool {
    match kind {
        HalfProducts::Bf16 => super::bf16::available(),
        HalfProducts::F16 => super::f16::available(),
    }
}

/// A fixed right-hand operand packed for one kind of half-width product.
#[derive(Debug)]
pub(crate) enum Packed {
    /// For `train_ops::bf16`.
    Bf16(super::bf16::PackedB),
    /// For `train_ops::f16`.
    F16(super::f16::PackedB),
}

impl Packed {
    /// Packs `b(k, j)` `[depth, cols]` for `kind`.
    pub(crate) fn new(
        kind: HalfProducts,
        depth: usize,
        cols: usize,
        b: impl Fn(usize, usize) -> f32 + Sync,
    ) -> Self {
        match kind {
            HalfProducts::Bf16 => Self::Bf16(super::bf16::PackedB::new(depth, cols, b)),
            HalfProducts::F16 => Self::F16(super::f16::PackedB::new(depth, cols, b)),
        }
    }

    /// `(k, n)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        match self {
            Self::Bf16(p) => p.dims(),
            Self::F16(p) => p.dims(),
        }
    }

    /// `a b (+ up)` for a row-major `a` `[m, k]`, as a new row-major `[m, n]` buffer.
    pub(crate) fn product(&self, a: &[f32], m: usize, up: Option<RankUpdate>) -> Vec<f32> {
        self.product_within(a, m, up, None)
    }

    /// [`Packed::product`] for an `a` known to lie within `±bound` (see
    /// `f16::product`; bf16 products need no bound).
    pub(crate) fn product_within(
        &self,
        a: &[f32],
        m: usize,
        up: Option<RankUpdate>,
        bound: Option<f32>,
    ) -> Vec<f32> {
        match self {
            Self::Bf16(p) => {
                let mut c = super::bf16::product(a, m, p);
                if let Some(up) = up {
                    up.add_to(&mut c, m);
                }
                c
            }
            Self::F16(p) => super::f16::product(a, m, p, up, bound),
        }
    }
}

/// A frozen weight packed for half-width products: `W^T` for forward, `W` for backward.
#[derive(Debug)]
pub(crate) struct HalfPacks {
    /// `[in, out]`.
    pub(crate) fwd: Packed,
    /// `[out, in]`.
    pub(crate) bwd: Packed,
}

impl HalfPacks {
    /// Both packs of a row-major f32 weight `w` `[out, inp]`.
    pub(crate) fn new(kind: HalfProducts, w: &[f32], out: usize, inp: usize) -> Self {
        Self {
            fwd: Packed::new(kind, inp, out, |k, j| w[j * inp + k]),
            bwd: Packed::new(kind, out, inp, |k, j| w[k * inp + j]),
        }
    }
}

/// `x W^T` with a frozen `W`: backward gives `dx` only.
pub(crate) struct Frozen {
    /// The weight, `[out, in]`.
    pub(crate) w: WeightFn,
    /// Set: the products at half width from these packs instead.
    pub(crate) half: Option<Arc<HalfPacks>>,
}

/// `x W^T + scale (x∘mask) A^T B^T`, with arguments `(x, A, B^T)`.
pub(crate) struct Lora {
    /// The frozen weight, `[out, in]`.
    pub(crate) w: WeightFn,
    /// Set: the frozen weight's products at half width from these packs instead.
    pub(crate) half: Option<Arc<HalfPacks>>,
    /// LoRA scale.
    pub(crate) scale: f32,
    /// Dropout keep-mask on the adapter's input (scaled by 1/(1-p)), one value per element of
    /// `x`.
    pub(crate) mask: Option<Vec<f32>>,
    /// Forward's bottleneck `scale (x∘m) A^T` for backward (`rows x r`, 32 KB at 512 rows of
    /// rank 16): recomputing it was a skinny product per layer, ~1/7 of the adapter's work.
    t: std::sync::Mutex<Vec<f32>>,
}

impl Lora {
    /// The op for one forward (see the fields).
    pub(crate) fn new(
        w: WeightFn,
        half: Option<Arc<HalfPacks>>,
        scale: f32,
        mask: Option<Vec<f32>>,
    ) -> Self {
        let t = Default::default();
        Self {
            w,
            half,
            scale,
            mask,
            t,
        }
    }
}

/// `(rows, in)` of a 2-d layout.
fn dims2(l: &Layout) -> candle_core::Result<(usize, usize)> {
    l.shape().dims2()
}

/// `(rows, in)` of an input of any rank: every dimension but the last counts rows. The ops
/// take `[b, s, in]` as it comes, since each reshape around them would be one more node in
/// candle's graph, whose backward zero-fills and sums an activation-sized gradient.
fn flat(dims: &[usize]) -> candle_core::Result<(usize, usize)> {
    match dims.split_last() {
        Some((&inp, lead)) => Ok((lead.iter().product(), inp)),
        None => candle_core::bail!("linear op: a scalar input"),
    }
}

/// The output shape: the input's leading dimensions, then `out`.
fn out_shape(dims: &[usize], out: usize) -> Shape {
    let mut d = dims.to_vec();
    if let Some(last) = d.last_mut() {
        *last = out;
    }
    Shape::from(d)
}

/// `x∘mask`, or `x` itself.
fn masked<'a>(x: &'a [f32], mask: Option<&[f32]>, buf: &'a mut Vec<f32>) -> &'a [f32] {
    match mask {
        Some(m) => {
            *buf = x.iter().zip(m).map(|(a, b)| a * b).collect();
            buf
        }
        None => x,
    }
}

/// `scale (x∘m) A^T`, `[rows, r]`: the adapter's rank-r bottleneck.
fn bottleneck(xm: &[f32], a: &[f32], rows: usize, r: usize, scale: f32) -> Vec<f32> {
    let inp = a.len() / r.max(1);
    product(Mat::new(xm, rows, inp), Mat::new(a, r, inp).t(), scale)
}

/// Refuses a rank term whose `v` is not `[r, cols]` (an adapter that does not fit the
/// layer) or of rank 0, before a product asserts on it.
fn fits(up: &Option<RankUpdate>, cols: usize) -> candle_core::Result<()> {
    match up {
        Some(up) if up.r == 0 || up.v.len() != up.r * cols => candle_core::bail!(
            "lora-linear: the adapter's rank-{} term has {} values, the layer {cols} columns",
            up.r,
            up.v.len()
        ),
        _ => Ok(()),
    }
}

/// `x W^T (+ up)` as a new `[rows, out]` buffer (at half width when packs are given).
pub(super) fn base(
    x: &[f32],
    rows: usize,
    w: &WeightFn,
    half: &Option<Arc<HalfPacks>>,
    up: Option<RankUpdate>,
) -> candle_core::Result<(Vec<f32>, usize)> {
    if let Some(p) = half {
        fits(&up, p.fwd.dims().1)?;
        return Ok((p.fwd.product(x, rows, up), p.fwd.dims().1));
    }
    let w = w()?;
    let (out, inp) = w.dims2()?;
    fits(&up, out)?;
    f32_of!(wv = w);
    let mut y = product(Mat::new(x, rows, inp), Mat::new(wv, out, inp).t(), 1.0);
    if let Some(up) = up {
        up.add_to(&mut y, rows);
    }
    Ok((y, out))
}

/// `dy W (+ up)` as a new `[rows, in]` buffer (at half width when packs are given).
pub(super) fn base_grad(
    g: &[f32],
    rows: usize,
    w: &WeightFn,
    half: &Option<Arc<HalfPacks>>,
    up: Option<RankUpdate>,
) -> candle_core::Result<Vec<f32>> {
    if let Some(p) = half {
        fits(&up, p.bwd.dims().1)?;
        return Ok(p.bwd.product(g, rows, up));
    }
    let w = w()?;
    let (out, inp) = w.dims2()?;
    fits(&up, inp)?;
    f32_of!(wv = w);
    let mut dx = product(Mat::new(g, rows, out), Mat::new(wv, out, inp), 1.0);
    if let Some(up) = up {
        up.add_to(&mut dx, rows);
    }
    Ok(dx)
}

impl CustomOp1 for Frozen {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l)?;
        let (rows, _) = flat(l.dims())?;
        let (y, out) = base(x, rows, &self.w, &self.half, None)?;
        Ok((CpuStorage::F32(y), out_shape(l.dims(), out)))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None); // the first layer's input: nothing upstream wants it
        }
        let (rows, _) = flat(x.dims())?;
        f32_of!(g = grad);
        Ok(Some(like(
            x,
            base_grad(g, rows, &self.w, &self.half, None)?,
        )?))
    }
}

impl CustomOp3 for Lora {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, a, bt) = (cpu_f32(xs, xl)?, cpu_f32(a_s, al)?, cpu_f32(bs, bl)?);
        let (rows, inp) = flat(xl.dims())?;
        let (r, out) = dims2(bl)?;
        if dims2(al)? != (r, inp) {
            candle_core::bail!(
                "lora-linear: A {:?} / B^T {:?} do not fit the layer",
                al.dims(),
                bl.dims()
            )
        }
        let pair = PairRef {
            a,
            bt,
            r,
            scale: self.scale,
            mask: self.mask.as_deref(),
        };
        let (y, t) = lora_forward(x, rows, &self.w, &self.half, &pair)?;
        *self.t.lock().unwrap_or_else(|e| e.into_inner()) = t;
        Ok((CpuStorage::F32(y), out_shape(xl.dims(), out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bt: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, _) = flat(x.dims())?;
        let (r, _) = bt.dims2()?;
        f32_of!(g = grad);
        f32_of!(xv = x);
        f32_of!(av = a);
        f32_of!(bv = bt);
        let pair = PairRef {
            a: av,
            bt: bv,
            r,
            scale: self.scale,
            mask: self.mask.as_deref(),
        };
        let t = std::mem::take(&mut *self.t.lock().unwrap_or_else(|e| e.into_inner()));
        // The first layer's input (the frozen embedding's rows) needs no gradient: skip the
        // weight-sized product.
        let (dx, da, dbt) =
            lora_backward(xv, rows, &self.w, &self.half, &pair, t, g, x.track_op())?;
        let dx = dx.map(|dx| like(x, dx)).transpose()?;
        Ok((dx, Some(like(a, da)?), Some(like(bt, dbt)?)))
    }
}

/// A LoRA pair's values as one product takes them.
pub(super) struct PairRef<'a> {
    /// `A` `[r, in]`.
    pub(super) a: &'a [f32],
    /// `B^T` `[r, out]`.
    pub(super) bt: &'a [f32],
    /// The rank.
    pub(super) r: usize,
    /// LoRA scale.
    pub(super) scale: f32,
    /// Dropout keep-mask on the input, one value per element of `x`.
    pub(super) mask: Option<&'a [f32]>,
}

/// `x W^T + scale (x∘m) A^T B^T` for `x` `[rows, in]`, and the bottleneck `scale (x∘m) A^T`
/// (`[rows, r]`) that backward reuses.
pub(super) fn lora_forward(
    x: &[f32],
    rows: usize,
    w: &WeightFn,
    half: &Option<Arc<HalfPacks>>,
    p: &PairRef,
) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let mut buf = Vec::new();
    let xm = masked(x, p.mask, &mut buf);
    let t = bottleneck(xm, p.a, rows, p.r, p.scale);
    let up = RankUpdate {
        u: &t,
        v: p.bt,
        r: p.r,
    };
    // `base` refuses a B^T that does not fit the weight's outputs.
    let (y, _) = base(x, rows, w, half, Some(up))?;
    Ok((y, t))
}

/// `(dx, dA, dB^T)` of a LoRA linear.
pub(super) type LoraGrads = (Option<Vec<f32>>, Vec<f32>, Vec<f32>);

/// Backward of [`lora_forward`] from the output gradient `g`: `(dx, dA, dB^T)`, `dx` only
/// with `need_dx`. `t` is forward's bottleneck (recomputed when it does not fit).
#[allow(clippy::too_many_arguments)]
pub(super) fn lora_backward(
    x: &[f32],
    rows: usize,
    w: &WeightFn,
    half: &Option<Arc<HalfPacks>>,
    p: &PairRef,
    mut t: Vec<f32>,
    g: &[f32],
    need_dx: bool,
) -> candle_core::Result<LoraGrads> {
    let r = p.r;
    let (inp, out) = (p.a.len() / r.max(1), p.bt.len() / r.max(1));
    // u = scale dy B: the gradient at the rank-r bottleneck.
    let u = product(Mat::new(g, rows, out), Mat::new(p.bt, r, out).t(), p.scale);
    let dx = if need_dx {
        Some(match p.mask {
            Some(m) => {
                let mut dx = base_grad(g, rows, w, half, None)?;
                let ua = product(Mat::new(&u, rows, r), Mat::new(p.a, r, inp), 1.0);
                for ((d, q), k) in dx.iter_mut().zip(&ua).zip(m) {
                    *d += q * k;
                }
                dx
            }
            None => {
                let up = RankUpdate { u: &u, v: p.a, r };
                base_grad(g, rows, w, half, Some(up))?
            }
        })
    } else {
        None
    };
    let mut buf = Vec::new();
    let xm = masked(x, p.mask, &mut buf);
    let da = product(Mat::new(&u, rows, r).t(), Mat::new(xm, rows, inp), 1.0);
    if t.len() != rows * r {
        t = bottleneck(xm, p.a, rows, r, p.scale); // forward's was taken or never made
    }
    let dbt = product(Mat::new(&t, rows, r).t(), Mat::new(g, rows, out), 1.0);
    Ok((dx, da, dbt))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{grads, rand, rel};
    use super::*;
    use candle_core::Var;

    fn weight(w: &Tensor) -> WeightFn {
        let w = w.clone();
        Arc::new(move || Ok(w.clone()))
    }

    /// The composed candle ops the op replaces.
    fn reference(
        x: &Tensor,
        w: &Tensor,
        a: &Tensor,
        bt: &Tensor,
        s: f64,
        m: Option<&Tensor>,
    ) -> Tensor {
        let xm = match m {
            Some(m) => (x * m).unwrap(),
            None => x.clone(),
        };
        let base = x.matmul(&w.t().unwrap()).unwrap();
        let lora = (xm.matmul(&a.t().unwrap()).unwrap() * s)
            .unwrap()
            .matmul(bt)
            .unwrap();
        (base + lora).unwrap()
    }

    #[test]
    fn lora_linear_matches_candle_ops_forward_and_backward() {
        let (rows, inp, out, r) = (13, 24, 20, 4);
        let w = rand(&[out, inp], 1);
        let x = rand(&[rows, inp], 2);
        let a = rand(&[r, inp], 3);
        let bt = rand(&[r, out], 4);
        let keep = rand(&[rows, inp], 5);
        let mask_t = keep
            .ge(-0.6)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            * 1.25;
        let mask_t = mask_t.unwrap();
        for mask in [None, Some(&mask_t)] {
            let (want_y, want_g) = grads(
                |t| reference(&t[0], &w, &t[1], &t[2], 0.5, mask),
                &[x.clone(), a.clone(), bt.clone()],
                9,
            );
            let op = || {
                Lora::new(
                    weight(&w),
                    None,
                    0.5,
                    mask.map(|m| m.flatten_all().unwrap().to_vec1().unwrap()),
                )
            };
            let (y, g) = grads(
                |t| t[0].apply_op3(&t[1], &t[2], op()).unwrap(),
                &[x.clone(), a.clone(), bt.clone()],
                9,
            );
            assert!(rel(&y, &want_y) < 1e-6);
            for (i, (g, w)) in g.iter().zip(&want_g).enumerate() {
                assert!(rel(g, w) < 1e-5, "gradient {i}, mask {}", mask.is_some());
            }
        }
    }

    /// The first layer's input is not tracked: the op skips its gradient, and the pair's
    /// gradients are unchanged.
    #[test]
    fn an_untracked_input_gets_no_gradient_and_the_pair_the_same() {
        let (w, x) = (rand(&[6, 10], 1), rand(&[5, 10], 2));
        let (a, bt) = (rand(&[3, 10], 3), rand(&[3, 6], 4));
        let probe = rand(&[5, 6], 5);
        let run = |fused: bool| {
            let (av, bv) = (
                Var::from_tensor(&a).unwrap(),
                Var::from_tensor(&bt).unwrap(),
            );
            let y = if fused {
                let op = Lora::new(weight(&w), None, 2.0, None);
                x.apply_op3(av.as_tensor(), bv.as_tensor(), op).unwrap()
            } else {
                reference(&x, &w, av.as_tensor(), bv.as_tensor(), 2.0, None)
            };
            let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            // (candle's own matmul backward computes one anyway)
            assert!(!fused || g.get(&x).is_none());
            (
                g.get(av.as_tensor()).unwrap().clone(),
                g.get(bv.as_tensor()).unwrap().clone(),
            )
        };
        let ((da, db), (wa, wb)) = (run(true), run(false));
        assert!(rel(&da, &wa) < 1e-5 && rel(&db, &wb) < 1e-5);
    }

    /// Half-width packs (each kind this CPU has) give the f32 product and input gradient
    /// within their rounding.
    #[test]
    fn half_packs_track_the_f32_products() {
        for kind in [HalfProducts::Bf16, HalfProducts::F16] {
            if !available(kind) {
                eprintln!("{kind:?} products: not on this CPU; skipped");
                continue;
            }
            let (out, inp) = (70, 90);
            let w = rand(&[out, inp], 1);
            let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let packs = Arc::new(HalfPacks::new(kind, &v, out, inp));
            let x = rand(&[33, inp], 2);
            let (want_y, want_g) = grads(
                |t| t[0].matmul(&w.t().unwrap()).unwrap(),
                std::slice::from_ref(&x),
                3,
            );
            let op = || Frozen {
                w: weight(&w),
                half: Some(packs.clone()),
            };
            let (y, g) = grads(
                |t| t[0].apply_op1(op()).unwrap(),
                std::slice::from_ref(&x),
                3,
            );
            let (ey, eg) = (rel(&y, &want_y), rel(&g[0], &want_g[0]));
            assert!(
                ey < 1e-2 && eg < 1e-2,
                "{kind:?}: forward {ey}, backward {eg}"
            );
            assert!(ey > 0.0, "{kind:?}: the half-width products did not run");
            // With a LoRA pair as large as the base's part (its rank term is added where
            // the half-width product stores its output), and with a dropout mask (added
            // after).
            let (r, s) = (5, 0.7);
            let (a, bt) = (rand(&[r, inp], 4), rand(&[r, out], 5));
            let keep = rand(&[33, inp], 6).ge(-0.5).unwrap();
            let mask_t = (keep.to_dtype(candle_core::DType::F32).unwrap() * 1.5).unwrap();
            for mask in [None, Some(&mask_t)] {
                let args = [x.clone(), a.clone(), bt.clone()];
                let (want_y, want_g) =
                    grads(|t| reference(&t[0], &w, &t[1], &t[2], s, mask), &args, 7);
                let op = || {
                    let m = mask.map(|m| m.flatten_all().unwrap().to_vec1().unwrap());
                    Lora::new(weight(&w), Some(packs.clone()), s as f32, m)
                };
                let (y, g) = grads(|t| t[0].apply_op3(&t[1], &t[2], op()).unwrap(), &args, 7);
                let e = rel(&y, &want_y);
                assert!(
                    e < 1e-2,
                    "{kind:?} lora, mask {}: forward {e}",
                    mask.is_some()
                );
                for (i, (g, w)) in g.iter().zip(&want_g).enumerate() {
                    let e = rel(g, w);
                    assert!(e < 1e-2, "{kind:?} lora: gradient {i} {e}");
                }
            }
        }
    }

    /// A LoRA pair that does not fit the layer's weight is an error naming the pair, not a
    /// panic in the product.
    #[test]
    fn a_pair_that_does_not_fit_the_weight_is_refused() {
        let (w, x) = (rand(&[6, 10], 1), rand(&[5, 10], 2));
        let (a, bt) = (rand(&[3, 10], 3), rand(&[3, 7], 4));
        let op = Lora::new(weight(&w), None, 1.0, None);
        let err = x.apply_op3(&a, &bt, op).unwrap_err().to_string();
        assert!(
            err.contains("lora-linear") && err.contains("rank-3"),
            "{err}"
        );
    }

    #[test]
    fn frozen_linear_passes_only_the_input_gradient() {
        let w = rand(&[6, 10], 1);
        let x = rand(&[5, 10], 2);
        let (want_y, want_g) = grads(
            |t| t[0].matmul(&w.t().unwrap()).unwrap(),
            std::slice::from_ref(&x),
            3,
        );
        let (y, g) = grads(
            |t| {
                t[0].apply_op1(Frozen {
                    w: weight(&w),
                    half: None,
                })
                .unwrap()
            },
            std::slice::from_ref(&x),
            3,
        );
        assert!(rel(&y, &want_y) < 1e-6);
        assert!(rel(&g[0], &want_g[0]) < 1e-6);
    }
}
