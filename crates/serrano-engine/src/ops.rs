//! The numeric building blocks of the forward pass: matmul over quantized weights (integer SIMD
//! kernels from `kernels` and `packed` for the 32-element formats, dequantize-and-dot for the
//! rest), RMSNorm, RoPE. The f32 code is written so that LLVM vectorizes its inner loops.

use std::sync::Arc;

use rayon::prelude::*;

use crate::gguf::Bytes;
use crate::kernels;
use crate::packed;
use crate::quant::{dequantize_row, DType, QK};

/// A row-major weight matrix: in its file format, borrowed from the memory-mapped GGUF, or
/// repacked at load in groups of 16 rows for the kernel that runs here ([`crate::packed`]).
#[derive(Clone)]
pub struct QMatrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    bytes: Arc<Bytes>,
    offset: usize,
    row_bytes: usize,
    packed: bool,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({:?}, {}x{})", self.dtype, self.rows, self.cols)
    }
}

impl QMatrix {
    pub fn new(dtype: DType, rows: usize, cols: usize, bytes: Arc<Bytes>, offset: usize) -> Self {
        let row_bytes = dtype.row_bytes(cols);
        assert!(
            offset + rows * row_bytes <= bytes.len(),
            "matrix extends past its buffer"
        );
        QMatrix {
            dtype,
            rows,
            cols,
            bytes,
            offset,
            row_bytes,
            packed: false,
        }
    }

    /// Whether this matrix should be repacked for [`crate::packed`]'s kernel: that kernel
    /// runs here and takes its format.
    fn wants_packing(&self) -> bool {
        !self.packed
            && kernels::has_avx512()
            && packed::packable(self.dtype)
            && self.cols.is_multiple_of(QK)
    }

    /// Whether the rows are in [`crate::packed`]'s layout.
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// Row `r` in the file's format (not for packed matrices, whose rows are interleaved).
    pub fn row(&self, r: usize) -> &[u8] {
        assert!(!self.packed, "a packed matrix has groups, not rows");
        let at = self.offset + r * self.row_bytes;
        &self.bytes[at..at + self.row_bytes]
    }

    /// Group `g` (rows `16 g..16 g + 16`) of a packed matrix.
    pub fn group(&self, g: usize) -> &[u8] {
        debug_assert!(self.packed);
        let gb = packed::group_bytes(self.dtype, self.cols);
        let at = self.offset + g * gb;
        &self.bytes[at..at + gb]
    }

    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        if self.packed {
            let g = self.group(r / packed::GROUP);
            packed::dequantize_row(self.dtype, g, r % packed::GROUP, out);
        } else {
            dequantize_row(self.dtype, self.row(r), out);
        }
    }

    pub fn bytes_total(&self) -> usize {
        if self.packed {
            packed::groups(self.rows) * packed::group_bytes(self.dtype, self.cols)
        } else {
            self.rows * self.row_bytes
        }
    }
}

/// Rows handed to one rayon task: enough work to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 16;

/// Dot products are summed over chunks of this many elements, chunk sums added in order.
const DOT_CHUNK: usize = 32;

/// `y[t * w.rows + r] = dot(w[r], x[t * w.cols ..])` for `n` tokens.
///
/// Each task takes a band of weight rows, dequantizes each row once into an L1-resident buffer
/// and runs every token against it, so weights stream from memory once per call whatever `n` is.
/// One token or many, each (row, token) pair is summed in the same order, so a sequence's
/// logits do not depend on its batch-mates (same seed, same request, same output under load).
pub fn matmul(w: &QMatrix, x: &[f32], n: usize, y: &mut [f32]) {
    assert_eq!(x.len(), n * w.cols);
    assert_eq!(y.len(), n * w.rows);
    if w.packed || kernels::supported(w.dtype) {
        return matmul_q8_many(&[w], x, n, &mut [y]);
    }
    if n == 1 {
        y.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(c, ys)| band(w, x, 1, c * ROWS_PER_TASK, ys));
        return;
    }
    // Results are produced transposed (per weight row) so tasks own disjoint output slices.
    let mut yt = vec![0f32; n * w.rows];
    yt.par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .for_each(|(c, ys)| band(w, x, n, c * ROWS_PER_TASK, ys));
    for r in 0..w.rows {
        for t in 0..n {
            y[t * w.rows + r] = yt[r * n + t];
        }
    }
}

/// Repacks every matrix that [`crate::packed`]'s kernel wants into one arena, asked to be
/// backed by 2 MiB pages: decode streams all weights per token, and with 4 KiB pages a TLB
/// miss every 64 cache lines cost it several percent. Matrices that stay in file format are
/// left alone. The arena is the size of the repacked weights (as large as in the file); the
/// file's copies are dropped from resident memory, so the process holds the weights once.
pub fn pack_all(ms: &mut [&mut QMatrix]) -> std::io::Result<()> {
    const ALIGN: usize = 64;
    let pack: Vec<bool> = ms.iter().map(|m| m.wants_packing()).collect();
    let size = |m: &QMatrix| {
        (packed::groups(m.rows) * packed::group_bytes(m.dtype, m.cols)).next_multiple_of(ALIGN)
    };
    let mut offsets = Vec::with_capacity(ms.len());
    let mut total = 0;
    for (m, &p) in ms.iter().zip(&pack) {
        offsets.push(total);
        if p {
            total += size(m);
        }
    }
    if total == 0 {
        return Ok(());
    }
    let mut arena = memmap2::MmapMut::map_anon(total)?;
    #[cfg(target_os = "linux")]
    // Only a hint: without transparent huge pages the arena works the same, a little slower.
    let _ = arena.advise(memmap2::Advice::HugePage);
    let mut rest: &mut [u8] = &mut arena;
    let mut regions = Vec::with_capacity(ms.len());
    for (m, &p) in ms.iter().zip(&pack) {
        if p {
            let (region, tail) = rest.split_at_mut(size(m));
            regions.push(Some(region));
            rest = tail;
        } else {
            regions.push(None);
        }
    }
    ms.par_iter()
        .zip(regions.into_par_iter())
        .for_each(|(m, region)| {
            if let Some(region) = region {
                let gb = packed::group_bytes(m.dtype, m.cols);
                region[..packed::groups(m.rows) * gb]
                    .par_chunks_mut(gb)
                    .enumerate()
                    .for_each(|(g, out)| {
                        let end = ((g + 1) * packed::GROUP).min(m.rows);
                        let rows: Vec<&[u8]> = (g * packed::GROUP..end).map(|r| m.row(r)).collect();
                        packed::pack_group(m.dtype, &rows, m.cols, out);
                    });
                // At once, not after all are packed, so the peak holds one copy plus one matrix.
                m.bytes.release(m.offset, m.bytes_total());
            }
        });
    let arena = Arc::new(Bytes::Mmap(arena.make_read_only()?));
    for ((m, at), p) in ms.iter_mut().zip(offsets).zip(pack) {
        if p {
            m.bytes = arena.clone();
            m.offset = at;
            m.packed = true;
        }
    }
    Ok(())
}

/// [`matmul`] of several matrices over the same input (Q, K and V; gate and up): where they
/// all have integer kernels of one layout, the activations are quantized once and every
/// matrix's row bands go through one parallel loop, one fork-join instead of one per matrix.
/// Each output is exactly what [`matmul`] computes for it.
pub fn matmul_many(ws: &[&QMatrix], x: &[f32], n: usize, ys: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), ys.len());
    let same = |f: fn(&QMatrix) -> bool| ws.iter().all(|w| f(w) && w.cols == ws[0].cols);
    if same(|w| w.packed) || same(|w| !w.packed && kernels::supported(w.dtype)) {
        return matmul_q8_many(ws, x, n, ys);
    }
    for (w, y) in ws.iter().zip(ys.iter_mut()) {
        matmul(w, x, n, y);
    }
}

/// Most matrices one fused call takes (Q, K, V).
const MAX_FUSED: usize = 3;

/// The integer paths: activations quantized once per call (in the layout the matrices' kernel
/// reads), then every (row, token) pair through that kernel.
fn matmul_q8_many(ws: &[&QMatrix], x: &[f32], n: usize, ys: &mut [&mut [f32]]) {
    let cols = ws[0].cols;
    assert_eq!(x.len(), n * cols);
    if ws[0].packed {
        return with_scratch(&PACKED_ACTS, |acts| {
            acts.quantize(x, n, cols);
            packed_groups(ws, n, ys, acts)
        });
    }
    with_scratch(&Q8_ACTS, |xq| {
        // Rows are whole blocks, so token t's blocks are `t * cols / 32..`.
        kernels::quantize_acts(x, xq);
        q8_bands(ws, n, ys, xq, cols / QK)
    })
}

thread_local! {
    /// Quantized activations, reused across calls so a decode step allocates none: each op
    /// used to allocate its own (a dozen allocations per layer per step).
    static PACKED_ACTS: std::cell::RefCell<packed::Acts> = Default::default();
    static Q8_ACTS: std::cell::RefCell<Vec<kernels::BlockQ8>> = Default::default();
}

/// Runs `f` on this thread's scratch buffer, or on a fresh one if the buffer is in use (a
/// worker that waits in a parallel loop may run another op's task meanwhile).
pub(crate) fn with_scratch<T: Default + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut T::default()),
    })
}

/// Most groups [`groups_per_task`] hands one task.
const MAX_GROUPS_PER_TASK: usize = 4;

/// Groups of 16 rows handed to one task of a packed matmul: a decode-sized call does too
/// little per group to pay for a task, a batched one plenty.
fn groups_per_task(n: usize) -> usize {
    if n < 4 {
        4
    } else {
        1
    }
}

/// The packed matmul's parallel loop: tasks of whole groups of every matrix, each running all
/// tokens through [`packed::dot_groups_into`].
fn packed_groups(ws: &[&QMatrix], n: usize, ys: &mut [&mut [f32]], a: &packed::Acts) {
    assert!(!ws.is_empty() && ws.len() <= MAX_FUSED);
    assert_eq!(a.tokens(), n);
    if n == 0 {
        return;
    }
    let per = groups_per_task(n);
    assert!(per <= MAX_GROUPS_PER_TASK);
    let mut ends = [0usize; MAX_FUSED];
    let mut outs: [Option<Scatter>; MAX_FUSED] = [None, None, None];
    let mut total = 0;
    for (m, (w, y)) in ws.iter().zip(ys.iter_mut()).enumerate() {
        assert!(w.packed && w.cols == ws[0].cols);
        assert_eq!(y.len(), n * w.rows);
        total += packed::groups(w.rows).div_ceil(per);
        ends[m] = total;
        outs[m] = Some(Scatter::new(y, w.rows));
    }
    (0..total).into_par_iter().for_each(|i| {
        let m = ends.iter().position(|&e| i < e).unwrap_or(0);
        let c = i - if m == 0 { 0 } else { ends[m - 1] };
        let (w, Some(out)) = (ws[m], &outs[m]) else {
            return;
        };
        let (g0, g1) = (c * per, ((c + 1) * per).min(packed::groups(w.rows)));
        let k = g1 - g0;
        let mut groups: [&[u8]; MAX_GROUPS_PER_TASK] = [&[]; MAX_GROUPS_PER_TASK];
        let mut lanes = [0usize; MAX_GROUPS_PER_TASK];
        let mut dst = [std::ptr::null_mut(); MAX_GROUPS_PER_TASK];
        for (i, g) in (g0..g1).enumerate() {
            let r0 = g * packed::GROUP;
            lanes[i] = (w.rows - r0).min(packed::GROUP);
            groups[i] = w.group(g);
            // `span` checks the last token's row; rows are `w.rows` apart, so every earlier
            // token's lies inside the output too.
            out.span((n - 1, r0), lanes[i]);
            dst[i] = out.span((0, r0), lanes[i]);
        }
        // SAFETY: each (token, group) destination lies in the output (checked above); this
        // task alone owns the rows of its groups (tasks' groups are disjoint), and the output
        // is not read until every task has returned.
        unsafe {
            packed::dot_groups_into(w.dtype, &groups[..k], &lanes[..k], a, &dst[..k], w.rows)
        };
    });
}

fn q8_bands(ws: &[&QMatrix], n: usize, ys: &mut [&mut [f32]], xq: &[kernels::BlockQ8], nb: usize) {
    let act = |t: usize| &xq[t * nb..(t + 1) * nb];
    let dot1 = |w: &QMatrix, r: usize, t: usize| kernels::dot(w.dtype, w.row(r), act(t));
    run_bands::<1>(
        ws,
        n,
        ys,
        dot1,
        |w, r, t| [dot1(w, r, t)],
        |w, r, t| {
            let xs = [act(t), act(t + 1), act(t + 2), act(t + 3)];
            [kernels::dot_n::<4>(w.dtype, w.row(r), xs)]
        },
    );
}

/// The parallel loop of [`matmul_q8_many`]: bands of rows of every matrix, each band running
/// all tokens through kernel calls that each cover a tile of `R` rows from `r` and one token
/// (`tile1(w, r, t)`) or four (`tile4`: tokens `t..t + 4`); `one(w, r, t)` takes the rows
/// left over when a band is not a multiple of `R`.
fn run_bands<const R: usize>(
    ws: &[&QMatrix],
    n: usize,
    ys: &mut [&mut [f32]],
    one: impl Fn(&QMatrix, usize, usize) -> f32 + Sync,
    tile1: impl Fn(&QMatrix, usize, usize) -> [f32; R] + Sync,
    tile4: impl Fn(&QMatrix, usize, usize) -> [[f32; 4]; R] + Sync,
) {
    assert!(!ws.is_empty() && ws.len() <= MAX_FUSED);
    // Band i belongs to the first matrix whose cumulative band count passes i.
    let mut ends = [0usize; MAX_FUSED];
    let mut outs: [Option<Scatter>; MAX_FUSED] = [None, None, None];
    let mut total = 0;
    for (m, (w, y)) in ws.iter().zip(ys.iter_mut()).enumerate() {
        assert_eq!(w.cols, ws[0].cols);
        assert_eq!(y.len(), n * w.rows);
        total += w.rows.div_ceil(ROWS_PER_TASK);
        ends[m] = total;
        outs[m] = Some(Scatter::new(y, w.rows));
    }
    (0..total).into_par_iter().for_each(|i| {
        let m = ends.iter().position(|&e| i < e).unwrap_or(0);
        let c = i - if m == 0 { 0 } else { ends[m - 1] };
        let (w, Some(out)) = (ws[m], &outs[m]) else {
            return;
        };
        let (r0, r1) = (c * ROWS_PER_TASK, ((c + 1) * ROWS_PER_TASK).min(w.rows));
        let tiled = r0 + (r1 - r0) / R * R;
        // Tokens outside, rows inside: the band's weights (a few KiB) and four tokens'
        // activations stay in L1 while every pair is computed; rows outside would stream all
        // `n` tokens' activations from L2 once per row.
        // SAFETY (every `set` below): this task alone owns rows r0..r1 of matrix `m` (bands
        // are disjoint).
        let mut t = 0;
        while t + 4 <= n {
            for r in (r0..tiled).step_by(R) {
                for (i, vs) in tile4(w, r, t).into_iter().enumerate() {
                    for (k, v) in vs.into_iter().enumerate() {
                        unsafe { out.set(t + k, r + i, v) };
                    }
                }
            }
            t += 4;
        }
        for t in t..n {
            for r in (r0..tiled).step_by(R) {
                for (i, v) in tile1(w, r, t).into_iter().enumerate() {
                    unsafe { out.set(t, r + i, v) };
                }
            }
        }
        for r in tiled..r1 {
            for t in 0..n {
                unsafe { out.set(t, r, one(w, r, t)) };
            }
        }
    });
}

/// The output of a multi-token matmul, `y[t * rows + r]`, written from parallel tasks that each
/// own a band of rows `r`: their writes never overlap, and the borrow of `y` outlives them.
pub(crate) struct Scatter {
    ptr: *mut f32,
    len: usize,
    rows: usize,
}

// SAFETY: tasks write disjoint elements (see `set`), and `Scatter` does not outlive the `&mut`
// borrow it was made from (it lives inside the call that holds that borrow).
unsafe impl Send for Scatter {}
unsafe impl Sync for Scatter {}

impl Scatter {
    pub(crate) fn new(y: &mut [f32], rows: usize) -> Self {
        Scatter {
            ptr: y.as_mut_ptr(),
            len: y.len(),
            rows,
        }
    }

    /// SAFETY: no other thread may write element (`t`, `r`) during the call.
    #[inline]
    unsafe fn set(&self, t: usize, r: usize, v: f32) {
        let i = t * self.rows + r;
        assert!(i < self.len);
        *self.ptr.add(i) = v;
    }

    /// Where elements (`t`, `r0..r0 + k`) go, checked to lie in row `t` of the output.
    /// Writing through it is the caller's to make exclusive.
    #[inline]
    pub(crate) fn span(&self, (t, r0): (usize, usize), k: usize) -> *mut f32 {
        let i = t * self.rows + r0;
        assert!(r0 + k <= self.rows && i + k <= self.len);
        self.ptr.wrapping_add(i)
    }
}

/// One task's rows, dispatched to a build of the same code for AVX2 where the CPU has it.
/// The arithmetic is identical in both builds (no FMA contraction, same summation order); only
/// the vector width differs.
fn band(w: &QMatrix, x: &[f32], n: usize, row0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let half_precision = matches!(w.dtype, DType::F16 | DType::BF16);
        if half_precision && has!("avx2") && has!("fma") && has!("f16c") {
            // SAFETY: the features this build needs were detected just above.
            unsafe {
                match w.dtype {
                    DType::F16 => band_half_avx2::<false>(w, x, n, row0, out),
                    _ => band_half_avx2::<true>(w, x, n, row0, out),
                }
            };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features this build needs were detected just above.
            unsafe { band_avx2(w, x, n, row0, out) };
            return;
        }
    }
    band_portable(w, x, n, row0, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn band_avx2(w: &QMatrix, x: &[f32], n: usize, row0: usize, out: &mut [f32]) {
    band_portable(w, x, n, row0, out);
}

/// F16 (or, with `BF16`, bfloat16) rows converted eight weights at a time inside the dot
/// product: no f32 copy of the row (which, with the activations, outgrew L1 and ran at a third
/// of the memory bandwidth). Each (row, token) pair is summed the same way whatever `n` is.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn band_half_avx2<const BF16: bool>(
    w: &QMatrix,
    x: &[f32],
    n: usize,
    row0: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let cols = w.cols;
    let whole = cols / 32 * 32;
    // bfloat16 is the top half of an f32: widen and shift.
    let weight = |p: *const u8| {
        let h = _mm_loadu_si128(p as *const __m128i);
        if BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        } else {
            _mm256_cvtph_ps(h)
        }
    };
    let scalar = |b: [u8; 2]| {
        if BF16 {
            half::bf16::from_le_bytes(b).to_f32()
        } else {
            half::f16::from_le_bytes(b).to_f32()
        }
    };
    for (i, yr) in out.chunks_mut(n).enumerate() {
        let row = w.row(row0 + i);
        let r = row.as_ptr();
        for (t, o) in yr.iter_mut().enumerate() {
            let xt = &x[t * cols..(t + 1) * cols];
            let p = xt.as_ptr();
            let (mut a0, mut a1, mut a2, mut a3) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            for j in (0..whole).step_by(32) {
                a0 = _mm256_fmadd_ps(weight(r.add(2 * j)), _mm256_loadu_ps(p.add(j)), a0);
                a1 = _mm256_fmadd_ps(weight(r.add(2 * j + 16)), _mm256_loadu_ps(p.add(j + 8)), a1);
                a2 = _mm256_fmadd_ps(
                    weight(r.add(2 * j + 32)),
                    _mm256_loadu_ps(p.add(j + 16)),
                    a2,
                );
                a3 = _mm256_fmadd_ps(
                    weight(r.add(2 * j + 48)),
                    _mm256_loadu_ps(p.add(j + 24)),
                    a3,
                );
            }
            let v = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let mut s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
            for j in whole..cols {
                s += scalar([row[2 * j], row[2 * j + 1]]) * xt[j];
            }
            *o = s;
        }
    }
}

#[inline(always)]
fn band_portable(w: &QMatrix, x: &[f32], n: usize, row0: usize, out: &mut [f32]) {
    let mut buf = vec![0f32; w.cols];
    for (i, yr) in out.chunks_mut(n).enumerate() {
        dequantize_row(w.dtype, w.row(row0 + i), &mut buf);
        for (t, o) in yr.iter_mut().enumerate() {
            *o = chunked_dot(&buf, &x[t * w.cols..(t + 1) * w.cols]);
        }
    }
}

#[inline(always)]
fn chunked_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = 0f32;
    for (ac, bc) in a.chunks(DOT_CHUNK).zip(b.chunks(DOT_CHUNK)) {
        s += dot(ac, bc);
    }
    s
}

/// f32 dot product with 8 independent accumulators (vectorizes without fast-math).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// `out = x / rms(x) * w`, row by row.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = dot(xr, xr) / d as f32;
        let scale = 1.0 / (ss + eps).sqrt();
        for i in 0..d {
            or[i] = xr[i] * scale * w[i];
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Rotate adjacent pairs (x[2i], x[2i+1]): llama.cpp's LLAMA_ROPE_TYPE_NORM (Llama, Mistral).
    Adjacent,
    /// Rotate halves (x[i], x[i + d/2]): LLAMA_ROPE_TYPE_NEOX (Qwen2 and others).
    Neox,
}

/// Precomputed inverse frequencies for the rotated dimensions.
#[derive(Debug, Clone)]
pub struct Rope {
    pub style: RopeStyle,
    pub dims: usize,
    inv_freq: Vec<f32>,
    pos_scale: f32,
}

impl Rope {
    /// `freq_factors` (Llama 3's `rope_freqs`) divide the per-dimension frequencies;
    /// `pos_scale` is linear position interpolation (1.0 for none).
    pub fn new(
        style: RopeStyle,
        dims: usize,
        base: f32,
        freq_factors: Option<&[f32]>,
        pos_scale: f32,
    ) -> Rope {
        let inv_freq = (0..dims / 2)
            .map(|i| {
                let f = base.powf(-2.0 * i as f32 / dims as f32);
                f / freq_factors
                    .and_then(|ff| ff.get(i))
                    .copied()
                    .unwrap_or(1.0)
            })
            .collect();
        Rope {
            style,
            dims,
            inv_freq,
            pos_scale,
        }
    }

    /// Rotates one head vector in place for position `pos` (allocating: the forward pass
    /// computes [`Rope::angles`] once per token and [`Rope::rotate`]s every head by them).
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let mut angles = vec![(0f32, 0f32); self.dims / 2];
        self.angles(pos, &mut angles);
        self.rotate(x, &angles);
    }

    /// The `(sin, cos)` of each rotated pair's angle at position `pos` (`dims / 2` of them):
    /// every head of every layer at that position rotates by these, so a step computes them
    /// once per token (per head and layer, the sines were most of the rotation's cost).
    pub fn angles(&self, pos: usize, out: &mut [(f32, f32)]) {
        let p = pos as f32 * self.pos_scale;
        for (o, &f) in out.iter_mut().zip(&self.inv_freq) {
            *o = (p * f).sin_cos();
        }
    }

    /// Rotates one head vector in place by [`Rope::angles`]' output for its position.
    pub fn rotate(&self, x: &mut [f32], angles: &[(f32, f32)]) {
        let half = self.dims / 2;
        for (i, &(sin, cos)) in angles.iter().enumerate().take(half) {
            let (a, b) = match self.style {
                RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + half),
            };
            let (x0, x1) = (x[a], x[b]);
            x[a] = x0 * cos - x1 * sin;
            x[b] = x0 * sin + x1 * cos;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::random_vec as rand_vec;

    /// A `rows` x `cols` matrix of `dtype` with random weights (row `r` from seed `seed + r`).
    fn random_matrix(dtype: DType, rows: usize, cols: usize, seed: u64) -> QMatrix {
        let data: Vec<u8> = (0..rows)
            .flat_map(|r| crate::testing::random_quant_row(dtype, cols, seed + r as u64))
            .collect();
        QMatrix::new(dtype, rows, cols, Arc::new(Bytes::Owned(data)), 0)
    }

    /// Each token of `x` alone through `w` gives exactly its rows of `batched`.
    fn assert_tokens_match_alone(w: &QMatrix, x: &[f32], n: usize, batched: &[f32]) {
        let (rows, cols) = (w.rows, w.cols);
        for t in 0..n {
            let mut single = vec![0f32; rows];
            matmul(w, &x[t * cols..(t + 1) * cols], 1, &mut single);
            assert_eq!(
                single,
                batched[t * rows..(t + 1) * rows],
                "{:?} token {t}",
                w.dtype
            );
        }
    }

    fn reference(w: &QMatrix, x: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * w.rows];
        let mut row = vec![0f32; w.cols];
        for r in 0..w.rows {
            w.dequantize_row_into(r, &mut row);
            for t in 0..n {
                out[t * w.rows + r] = row
                    .iter()
                    .zip(&x[t * w.cols..])
                    .map(|(a, b)| (*a as f64 * *b as f64) as f32)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matmul_matches_scalar_reference_for_every_simple_type_and_odd_sizes() {
        for dtype in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
        ] {
            for (rows, cols, n) in [(1, 32, 1), (17, 64, 1), (33, 96, 3), (5, 320, 7)] {
                let w = random_matrix(dtype, rows, cols, 0);
                let x = rand_vec(cols * n, 99);
                let mut y = vec![0f32; rows * n];
                matmul(&w, &x, n, &mut y);
                // The integer path quantizes activations to 8 bits (about 0.4% per product).
                let tol = if crate::kernels::supported(dtype) {
                    1e-2 * (cols as f32).sqrt()
                } else {
                    1e-3
                };
                for (a, b) in y.iter().zip(reference(&w, &x, n)) {
                    assert!(
                        (a - b).abs() < tol * (1.0 + b.abs()),
                        "{dtype:?} {rows}x{cols}x{n}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// F16 and BF16 rows of any width (the fused kernel's tail included), alone and batched.
    #[test]
    fn half_precision_matmul_matches_scalar_reference_at_any_width() {
        let shapes = [(3, 8, 1), (9, 40, 3), (5, 100, 5), (2, 288, 2)];
        for (dtype, (rows, cols, n)) in [DType::F16, DType::BF16]
            .into_iter()
            .flat_map(|d| shapes.map(|s| (d, s)))
        {
            let w = random_matrix(dtype, rows, cols, 5);
            let x = rand_vec(cols * n, 6);
            let mut y = vec![0f32; rows * n];
            matmul(&w, &x, n, &mut y);
            for (a, b) in y.iter().zip(reference(&w, &x, n)) {
                assert!(
                    (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{dtype:?} {rows}x{cols}x{n}: {a} vs {b}"
                );
            }
            assert_tokens_match_alone(&w, &x, n, &y);
        }
    }

    #[test]
    fn k_quant_matmul_matches_scalar_reference() {
        for dtype in [DType::Q4_K, DType::Q5_K, DType::Q6_K] {
            for (rows, cols, n) in [(1, 256, 1), (17, 512, 1), (5, 768, 7)] {
                let w = random_matrix(dtype, rows, cols, 3);
                let x = rand_vec(cols * n, 98);
                let mut y = vec![0f32; rows * n];
                matmul(&w, &x, n, &mut y);
                let tol = 1e-2 * (cols as f32).sqrt();
                for (a, b) in y.iter().zip(reference(&w, &x, n)) {
                    assert!(
                        (a - b).abs() < tol * (1.0 + b.abs()),
                        "{dtype:?} {rows}x{cols}x{n}: {a} vs {b}"
                    );
                }
                let mut batched = vec![0f32; rows * n];
                matmul(&w, &x, n, &mut batched);
                assert_tokens_match_alone(&w, &x, n, &batched);
            }
        }
    }

    #[test]
    fn batched_and_single_token_matmul_agree_bit_for_bit() {
        for dtype in [DType::Q4_1, DType::Q8_0, DType::F16] {
            let (rows, cols, n) = (19, 96, 5);
            let w = random_matrix(dtype, rows, cols, 7);
            let x = rand_vec(cols * n, 3);
            let mut batched = vec![0f32; rows * n];
            matmul(&w, &x, n, &mut batched);
            assert_tokens_match_alone(&w, &x, n, &batched);
        }
    }

    /// Repacked matrices (where this CPU runs the AVX-512 kernel; elsewhere `pack_all` leaves
    /// them as they are and this checks the file-format path again): the same products as the
    /// file format up to float rounding, the embedding rows unchanged, and a token's result
    /// the same alone or in any batch, with row counts that leave a partial group and a
    /// partial task, and token counts that use every tile (8, 4, 2 and 1 tokens).
    #[test]
    fn packed_matrices_agree_with_the_file_format_and_batch_bit_for_bit() {
        for dtype in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
            for (rows, cols, n) in [(37, 96, 7), (83, 64, 19), (16, 32, 1)] {
                let file = random_matrix(dtype, rows, cols, 70);
                let mut packed = file.clone();
                pack_all(&mut [&mut packed]).unwrap();
                assert_eq!(packed.is_packed(), crate::kernels::has_avx512());
                let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
                for r in 0..rows {
                    file.dequantize_row_into(r, &mut a);
                    packed.dequantize_row_into(r, &mut b);
                    assert_eq!(a, b, "{dtype:?} row {r}");
                }
                let x = rand_vec(cols * n, 4);
                let (mut want, mut batched) = (vec![0f32; rows * n], vec![0f32; rows * n]);
                matmul(&file, &x, n, &mut want);
                matmul(&packed, &x, n, &mut batched);
                for (g, w) in batched.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                        "{dtype:?} {rows}x{cols}x{n}: {g} vs {w}"
                    );
                }
                assert_tokens_match_alone(&packed, &x, n, &batched);
            }
        }
    }

    /// Packed matrices of different formats over one input (a Q4_0 file's Q and K beside a
    /// Q8_0 V) in one fused call give each exactly its own matmul.
    #[test]
    fn fused_packed_matmuls_of_mixed_formats_equal_separate_ones() {
        let cols = 128;
        let mut ws: Vec<QMatrix> = [(DType::Q4_0, 40), (DType::Q4_1, 16), (DType::Q8_0, 9)]
            .iter()
            .enumerate()
            .map(|(i, &(d, rows))| random_matrix(d, rows, cols, 300 + i as u64))
            .collect();
        let mut refs: Vec<&mut QMatrix> = ws.iter_mut().collect();
        pack_all(&mut refs).unwrap();
        for n in [1, 5, 12] {
            let x = rand_vec(cols * n, 40 + n as u64);
            let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; n * w.rows]).collect();
            let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
            matmul_many(&[&ws[0], &ws[1], &ws[2]], &x, n, &mut outs);
            for (w, y) in ws.iter().zip(&ys) {
                let mut alone = vec![0f32; n * w.rows];
                matmul(w, &x, n, &mut alone);
                assert_eq!(&alone, y, "{:?} n={n}", w.dtype);
            }
        }
    }

    /// Fused matmuls over one input give each matrix exactly its own matmul, for integer-kernel
    /// formats (one parallel loop) and for mixes that fall back to one call each.
    #[test]
    fn fused_matmuls_equal_separate_ones_bit_for_bit() {
        // One k-quant block wide, so the k-quants mix with the 32-element formats.
        let cols = 256;
        let matrix = |dtype: DType, rows: usize, seed: u64| random_matrix(dtype, rows, cols, seed);
        for dtypes in [
            [DType::Q4_1, DType::Q4_1, DType::Q4_1],
            [DType::Q8_0, DType::Q4_0, DType::Q4_1],
            [DType::Q4_1, DType::F16, DType::Q8_0],
            // Q, K, V of a Q4_K_M file.
            [DType::Q4_K, DType::Q4_K, DType::Q6_K],
            [DType::Q5_K, DType::Q4_1, DType::Q8_0],
        ] {
            // Row counts that are not multiples of a task's band, and differ per matrix.
            let ws: Vec<QMatrix> = dtypes
                .iter()
                .zip([37, 5, 16])
                .enumerate()
                .map(|(i, (&d, rows))| matrix(d, rows, 100 * i as u64))
                .collect();
            for n in [1, 6] {
                let x = rand_vec(cols * n, n as u64);
                let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; n * w.rows]).collect();
                let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                matmul_many(&[&ws[0], &ws[1], &ws[2]], &x, n, &mut outs);
                for (w, y) in ws.iter().zip(&ys) {
                    let mut alone = vec![0f32; n * w.rows];
                    matmul(w, &x, n, &mut alone);
                    assert_eq!(&alone, y, "{dtypes:?} n={n}");
                }
            }
        }
    }

    #[test]
    fn rope_rotation_preserves_norm_and_is_identity_at_zero() {
        for style in [RopeStyle::Adjacent, RopeStyle::Neox] {
            let rope = Rope::new(style, 8, 10000.0, None, 1.0);
            let x0 = rand_vec(8, 1);
            let mut x = x0.clone();
            rope.apply(&mut x, 0);
            assert_eq!(x, x0);
            rope.apply(&mut x, 17);
            assert!((dot(&x, &x) - dot(&x0, &x0)).abs() < 1e-5);
        }
    }

    #[test]
    fn rope_adjacent_rotates_pairs() {
        let rope = Rope::new(RopeStyle::Adjacent, 2, 10000.0, None, 1.0);
        let mut x = vec![1.0, 0.0];
        rope.apply(&mut x, 1);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn rmsnorm_scales_by_the_root_mean_square() {
        let mut out = vec![0.0; 4];
        rmsnorm(&[2.0, 2.0, 2.0, 2.0], &[1.0, 0.5, 1.0, 1.0], 0.0, &mut out);
        assert_eq!(out, vec![1.0, 0.5, 1.0, 1.0]);
    }
}
