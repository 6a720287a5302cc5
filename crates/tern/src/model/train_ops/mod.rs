//! Training-step ops with hand-written backward passes (CPU, f32).
//!
//! Through candle's autograd a decoder layer is ~60 small ops forward and more backward, each
//! writing a fresh activation-sized tensor (and candle's gradient store adds a zeroed tensor
//! and a sum for every gradient it records). On a 2-core machine those passes and their
//! page faults cost as much as the matrix products. Each op here does one layer-level job
//! (a LoRA linear, RMSNorm, rope, causal attention, the gated MLP's activation) in one pass,
//! keeps only what its backward needs, and computes that backward directly.

pub(crate) mod attention;
pub(crate) mod bf16;
pub(crate) mod f16;
pub(crate) mod head_loss;
pub(crate) mod layer;
pub(crate) mod linear;
pub(crate) mod pointwise;

use candle_core::{CpuStorage, Layout, Tensor};

thread_local! {
    /// Off only in tests that compare these ops with candle's (graphs are built on the
    /// calling thread, so the switch reaches exactly that test's step).
    static ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Whether `x` can take these ops: f32 on the CPU.
pub(crate) fn fits(x: &Tensor) -> bool {
    ENABLED.with(|e| e.get()) && x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// Runs `f` with these ops off on this thread (candle's differentiable ops instead).
#[cfg(test)]
pub(crate) fn without<R>(f: impl FnOnce() -> R) -> R {
    ENABLED.with(|e| e.set(false));
    let r = f();
    ENABLED.with(|e| e.set(true));
    r
}

/// A strided f32 matrix: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `[rows, cols]` matrix.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// A `[rows, cols]` matrix whose rows lie `rs` values apart.
    pub(crate) fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub(crate) fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Columns `c0..c0 + w`.
    fn cols(self, c0: usize, w: usize) -> Self {
        assert!(c0 + w <= self.cols);
        Self {
            data: &self.data[(c0 * self.cs).min(self.data.len())..],
            cols: w,
            ..self
        }
    }

    /// Rows `r0..r0 + h`.
    fn rows(self, r0: usize, h: usize) -> Self {
        assert!(r0 + h <= self.rows);
        Self {
            data: &self.data[(r0 * self.rs).min(self.data.len())..],
            rows: h,
            ..self
        }
    }

    fn covers(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = (accumulate ? dst : 0) + scale * a b`, `dst` row-major `[a.rows, b.cols]`, split
/// over candle's worker pool.
///
/// The gemm crate's own threading runs on rayon's pool, and candle's element-wise ops on
/// candle's barrier pool, whose workers spin for a while after each op: a product started
/// right after one ran three busy threads on two cores. Here each pool task runs the
/// single-threaded GEMM on its own columns (or rows, for thin products) instead.
pub(crate) fn gemm(dst: &mut [f32], a: Mat, b: Mat, scale: f32, accumulate: bool) {
    check(dst.len(), a, b);
    // SAFETY: `check` sized `dst` for the product; it is exclusively borrowed.
    unsafe { par_gemm(SyncPtr::new(dst), a, b, scale, accumulate) }
}

/// [`gemm`] into `dst`, which must hold `a.rows * b.cols` values (initialised unless
/// `accumulate` is false: then every element is written before any is read).
///
/// # Safety
/// `dst` must be valid for writes of the whole product and not accessed elsewhere meanwhile.
unsafe fn par_gemm(p: SyncPtr, a: Mat, b: Mat, scale: f32, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let threads = candle_core::utils::get_num_threads();
    if threads <= 1 || m * n * k < 1 << 20 {
        return raw_gemm(p.at(0), n, a, b, scale, accumulate);
    }
    if n >= 64 * threads {
        let chunk = n.div_ceil(threads).next_multiple_of(16);
        par_for(n.div_ceil(chunk), |t| {
            let (c0, w) = (t * chunk, chunk.min(n - t * chunk));
            // SAFETY: columns c0..c0+w of every row are this task's.
            unsafe { raw_gemm(p.at(c0), n, a, b.cols(c0, w), scale, accumulate) }
        });
    } else if m >= 16 * threads {
        let chunk = m.div_ceil(threads);
        par_for(m.div_ceil(chunk), |t| {
            let (r0, h) = (t * chunk, chunk.min(m - t * chunk));
            // SAFETY: rows r0..r0+h are this task's.
            unsafe { raw_gemm(p.at(r0 * n), n, a.rows(r0, h), b, scale, accumulate) }
        });
    } else {
        raw_gemm(p.at(0), n, a, b, scale, accumulate)
    }
}

/// `scale * a b` as a new row-major buffer (see [`gemm`]).
///
/// Not zero-filled first: the gemm crate, told not to read the destination, writes each
/// element before the next depth block adds to it (zeroing every output was ~2% of a
/// training step).
pub(crate) fn product(a: Mat, b: Mat, scale: f32) -> Vec<f32> {
    let len = a.rows * b.cols;
    check(len, a, b);
    let mut dst = Vec::<f32>::with_capacity(len);
    // SAFETY: the capacity holds the product; `par_gemm` with `accumulate` false writes all
    // `len` values (zero-filling them itself when the depth is 0) and reads none before.
    unsafe {
        par_gemm(SyncPtr(dst.as_mut_ptr()), a, b, scale, false);
        dst.set_len(len);
    }
    dst
}

/// As [`gemm`] on the calling thread (for small products inside pool tasks).
pub(crate) fn gemm1(dst: &mut [f32], a: Mat, b: Mat, scale: f32, accumulate: bool) {
    check(dst.len(), a, b);
    // SAFETY: `check` bounds every index; `dst` is exclusively borrowed.
    unsafe { raw_gemm(dst.as_mut_ptr(), b.cols, a, b, scale, accumulate) }
}

/// As [`gemm1`] into a destination whose rows lie `rs` values apart (a block of a wider
/// matrix).
pub(crate) fn gemm1_strided(
    dst: &mut [f32],
    rs: usize,
    a: Mat,
    b: Mat,
    scale: f32,
    accumulate: bool,
) {
    assert!(b.rows == a.cols && a.covers() && b.covers() && rs >= b.cols);
    assert!(a.rows == 0 || (a.rows - 1) * rs + b.cols <= dst.len());
    // SAFETY: the asserts bound every index; `dst` is exclusively borrowed.
    unsafe { raw_gemm(dst.as_mut_ptr(), rs, a, b, scale, accumulate) }
}

/// Panics unless `a b` fits a destination of `len` values and both views lie inside their
/// slices.
fn check(len: usize, a: Mat, b: Mat) {
    assert!(b.rows == a.cols && len == a.rows * b.cols && a.covers() && b.covers());
}

/// The single-threaded GEMM into `dst` with row stride `dst_rs`.
///
/// # Safety
/// `dst` must be valid for writes at `i * dst_rs + j` for every `(i, j)` of the product, and
/// nothing else may access those elements meanwhile; `a` and `b` must cover their views.
unsafe fn raw_gemm(dst: *mut f32, dst_rs: usize, a: Mat, b: Mat, scale: f32, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // All-zero bytes are 0.0; no reference to possibly uninitialised memory.
                std::ptr::write_bytes(dst.add(i * dst_rs), 0, n);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// The f32 values of a contiguous CPU storage.
pub(crate) fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("training ops take f32 tensors")
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("training op: input not contiguous".into()))?;
    Ok(&v[a..b])
}

/// The f32 values of a contiguous tensor's storage (`t.storage_and_layout()`), on the CPU.
pub(crate) fn storage_f32<'a>(
    st: &'a candle_core::Storage,
    l: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::Storage::Cpu(s) = st else {
        candle_core::bail!("training ops run on the CPU")
    };
    cpu_f32(s, l)
}

/// Binds `$v` to the f32 values of tensor `$t` (made contiguous) for the rest of the scope.
macro_rules! f32_of {
    ($v:ident = $t:expr) => {
        let __t = $t.contiguous()?;
        let __g = __t.storage_and_layout();
        let $v = $crate::model::train_ops::storage_f32(&__g.0, __g.1)?;
    };
}
pub(crate) use f32_of;

/// A buffer of `len` values that is not zero-filled: an op's output that its pool tasks
/// write completely through [`Unfilled::ptr`]. Zeroing activation-sized outputs was a serial
/// memset per op on the main thread (~10% of its time in a bf16 training step, the other
/// core idle meanwhile).
pub(crate) struct Unfilled<T> {
    buf: Vec<T>,
    len: usize,
}

impl<T> Unfilled<T> {
    /// Room for `len` values, none written yet.
    pub(crate) fn new(len: usize) -> Self {
        Self {
            buf: Vec::with_capacity(len),
            len,
        }
    }

    /// Where the values go.
    pub(crate) fn ptr(&mut self) -> SyncPtr<T> {
        SyncPtr(self.buf.as_mut_ptr())
    }

    /// The buffer, once written.
    ///
    /// # Safety
    /// All `len` values must have been written through [`Unfilled::ptr`].
    pub(crate) unsafe fn written(mut self) -> Vec<T> {
        // SAFETY: the capacity holds `len`, all written (the caller's promise).
        unsafe { self.buf.set_len(self.len) };
        self.buf
    }
}

/// A tensor of `t`'s shape on `t`'s device from values.
pub(crate) fn like(t: &Tensor, v: Vec<f32>) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, t.shape(), t.device())
}

/// Runs `f(i)` for `i in 0..n` on candle's CPU pool.
pub(crate) fn par_for(n: usize, f: impl Fn(usize) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n, |r| r.for_each(&f));
}

/// A row-major `[m, n]` product computed tile by tile on candle's pool: `tile(p, blk, d,
/// rows, cols, c)` adds depth chunk `d`'s part of the `rows x cols` values of row block `blk`
/// (blocks of `mr` rows) and column panel `p` (panels of `nr` columns) through `c`, which
/// points at the tile's first value (row stride `n`); chunk 0 writes them, later chunks add
/// to them. Panels are split between the pool's threads, so each value has one writer; the
/// output is not zero-filled first.
///
/// Each thread goes chunk by chunk, and within a chunk panel by panel: a chunk of one panel
/// is reused by every row block while it sits in L1, and a chunk of the whole left operand by
/// every panel while it sits in L2. With one chunk and a deep product (the LM head's
/// backward, 49152 deep) a panel (MBs) would stream from L3 once per row block instead.
///
/// # Safety
/// Every call of `tile` with `d == 0` must write all of its `rows x cols` values, and
/// with `d > 0` add to them, and touch nothing else.
pub(crate) unsafe fn tiled_product(
    m: usize,
    n: usize,
    (mr, nr): (usize, usize),
    chunks: usize,
    tile: impl Fn(usize, usize, usize, usize, usize, *mut f32) + Sync,
) -> Vec<f32> {
    let mut c = Vec::<f32>::with_capacity(m * n);
    let cp = SyncPtr(c.as_mut_ptr());
    let (panels, blocks) = (n.div_ceil(nr), m.div_ceil(mr));
    let panel = |p: usize, d: usize| {
        for blk in 0..blocks {
            let (rows, cols) = (mr.min(m - blk * mr), nr.min(n - p * nr));
            tile(p, blk, d, rows, cols, cp.at(blk * mr * n + p * nr));
        }
    };
    if chunks <= 1 {
        // Panels are handed out as threads come for them: a vCPU that runs slower for a
        // while takes fewer, instead of the others waiting for it at the end.
        par_for(panels, |p| panel(p, 0));
    } else {
        // Chunk order within a panel must hold, so each thread keeps its own panels.
        let tasks = candle_core::utils::get_num_threads().clamp(1, panels.max(1));
        par_for(tasks, |t| {
            let per = panels.div_ceil(tasks);
            for d in 0..chunks {
                (t * per..((t + 1) * per).min(panels)).for_each(|p| panel(p, d));
            }
        });
    }
    // SAFETY: row blocks x column panels cover the product, and each tile wrote its values
    // (the caller's promise).
    unsafe { c.set_len(m * n) };
    c
}

/// A rank-`r` term `u v` to add to a product (`u` `[m, r]`, `v` `[r, n]`, row-major): a LoRA
/// pair's part of a layer's output or input gradient, added where a half-width product
/// writes its output instead of in a pass of its own over it.
#[derive(Clone, Copy)]
pub(crate) struct RankUpdate<'a> {
    /// `[m, r]`.
    pub(crate) u: &'a [f32],
    /// `[r, n]`.
    pub(crate) v: &'a [f32],
    /// The rank.
    pub(crate) r: usize,
}

impl RankUpdate<'_> {
    /// Adds the term to a row-major `[m, n]` product `c`.
    pub(crate) fn add_to(&self, c: &mut [f32], m: usize) {
        let n = self.v.len() / self.r.max(1);
        gemm(
            c,
            Mat::new(self.u, m, self.r),
            Mat::new(self.v, self.r, n),
            1.0,
            true,
        );
    }
}

/// Shared mutable access to disjoint parts of one buffer from pool tasks.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T = f32>(*mut T);

// SAFETY: only used to hand disjoint ranges of one buffer to pool tasks (`par_for`).
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// Points at `v`.
    pub(crate) fn new(v: &mut [T]) -> Self {
        Self(v.as_mut_ptr())
    }

    /// The element at `i` (for unsafe callers that stride it themselves).
    pub(crate) fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }

    /// `len` values from `start`.
    ///
    /// # Safety
    /// The range must lie inside the buffer, and no other live slice may overlap it.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    pub(crate) use crate::test_util::rel;
    use candle_core::{Device, Tensor, Var};

    /// A spread of values in [-1, 1) for index `i` of stream `s`, without a generator (for
    /// the product kernels' tests, which index operands directly).
    pub(crate) fn spread(i: usize, s: u64) -> f32 {
        ((i as u64 * 2_654_435_761 + s) % 1000) as f32 / 500.0 - 1.0
    }

    /// Random f32 values in [-1, 1) from a fixed seed.
    pub(crate) fn rand(dims: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.random::<f32>() * 2.0 - 1.0).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    /// Output and input gradients of `f` under the loss `sum(y * probe)` (a probe makes every
    /// output element's gradient different, so a transposed or misplaced term shows).
    pub(crate) fn grads(
        f: impl Fn(&[Tensor]) -> Tensor,
        inputs: &[Tensor],
        seed: u64,
    ) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        // Freed NaNs of the first input's size, which the allocator tends to hand back to
        // an op's input-sized output: a value an op leaves unwritten shows as NaN.
        drop(std::hint::black_box(vec![f32::NAN; inputs[0].elem_count()]));
        let y = f(&ts);
        let probe = rand(y.dims(), seed);
        let g = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs = ts
            .iter()
            .map(|t| g.get(t).expect("gradient reaches every input").clone())
            .collect();
        (y.detach(), gs)
    }

    /// `product` writes into memory it never zeroed: over freed NaNs (which the allocator
    /// tends to hand back), across several depth blocks and split over the pool, and with
    /// no depth at all.
    #[test]
    fn product_never_reads_its_fresh_buffer() -> candle_core::Result<()> {
        use super::{product, Mat};
        let (m, k, n) = (64, 1100, 300);
        let a = rand(&[m, k], 1);
        let b = rand(&[k, n], 2);
        let want = a.matmul(&b)?;
        for _ in 0..3 {
            drop(std::hint::black_box(vec![f32::NAN; m * n]));
            f32_of!(av = a);
            f32_of!(bv = b);
            let got = product(Mat::new(av, m, k), Mat::new(bv, k, n), 1.0);
            let got = Tensor::from_vec(got, (m, n), &Device::Cpu)?;
            assert!(rel(&got, &want) < 1e-5);
        }
        drop(std::hint::black_box(vec![f32::NAN; 12]));
        assert_eq!(
            product(Mat::new(&[], 3, 0), Mat::new(&[], 0, 4), 1.0),
            vec![0f32; 12]
        );
        Ok(())
    }

    #[test]
    fn gemm_matches_candle_for_every_transpose() -> candle_core::Result<()> {
        use super::{gemm, Mat};
        let a = rand(&[7, 5], 1);
        let b = rand(&[5, 9], 2);
        let want = a.matmul(&b).unwrap();
        let at = a.t().unwrap().contiguous().unwrap();
        let bt = b.t().unwrap().contiguous().unwrap();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut out = vec![1f32; 63];
            f32_of!(av = if ta { &at } else { &a });
            f32_of!(bv = if tb { &bt } else { &b });
            let am = if ta {
                Mat::new(av, 5, 7).t()
            } else {
                Mat::new(av, 7, 5)
            };
            let bm = if tb {
                Mat::new(bv, 9, 5).t()
            } else {
                Mat::new(bv, 5, 9)
            };
            gemm(&mut out, am, bm, 2.0, true);
            let got = Tensor::from_vec(out, (7, 9), &Device::Cpu)?;
            let want = ((&want * 2.0)? + 1.0)?;
            assert!(rel(&got, &want) < 1e-6, "transposes {ta} {tb}");
        }
        Ok(())
    }
}
