//! Weights repacked at load for an AVX-512 kernel: Q4_0, Q4_1 and Q8_0 in groups of 16 rows,
//! one row per 32-bit lane of a 512-bit register.
//!
//! In the GGUF layout a row's blocks lie one after another, so a kernel that takes one row at
//! a time must reduce every block's integer sum across a register, convert its scales and
//! broadcast them: more instructions than the integer dot itself. Here a group of 16 rows is
//! stored block by block, and within a block the 16 rows side by side:
//!
//! ```text
//! group = block 0 | block 1 | ...                        (cols / 32 blocks)
//! block = d: 16 x f16 | m: 16 x f16 (Q4_1 only) | weights
//! Q4_0, Q4_1 weights: 4 chunks of 64 bytes; byte 4i+e of chunk L holds row i's element 4L+e
//!                     in its low nibble and element 16+4L+e in its high one
//! Q8_0 weights:       8 chunks of 64 bytes; byte 4i+e of chunk j is row i's element 4j+e + 128
//! ```
//!
//! so one 64-byte load and two masks give lane `i` four consecutive weights of row `i` for a
//! `vpdpbusd` against four activations broadcast to every lane: eight of them sum a block for
//! 16 rows at once, with no reduction across lanes, and the block's scale is one multiply by
//! the 16 rows' scales. The 4-bit byte is the GGUF byte unchanged (a GGUF Q4 block keeps
//! element `j` and `j + 16` in one byte too). `vpdpbusd` multiplies unsigned weights by signed
//! activations, so Q4_0's `q - 8` and Q8_0's signed `q` are stored unsigned (`q` and `q + 128`)
//! and the integer sum starts at `-8 Σx` or `-128 Σx` instead of 0: the same integers as the
//! file-layout kernels, exactly. A group takes as many bytes as its 16 rows do in the file.
//!
//! Per lane, block after block: `acc = fma(I, d·dx, acc)`, then for Q4_1 `acc = fma(m, sx,
//! acc)`, where `I` is the block's exact integer sum. That order is the same for every tile
//! shape, so a (row, token) result never depends on which rows and tokens share its call, and
//! the portable reference (always built; `f32::mul_add` is the same fused operation) agrees
//! with the AVX-512 build bit for bit.
//!
//! Activations go in a matching layout ([`Acts`]): every token's 8-bit values contiguous, then
//! scales, scaled sums and integer sums as plain arrays.
//!
//! Written by hand for the same reason as [`crate::kernels`]: no crate has these layouts.

use half::f16;

use crate::quant::{DType, QK};

/// Rows per group: one per 32-bit lane of a 512-bit register.
pub const GROUP: usize = 16;

/// Whether weights of `dtype` can be repacked.
pub fn packable(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q8_0)
}

/// Bytes of one block (32 columns) of one group.
pub fn block_bytes(dtype: DType) -> usize {
    match dtype {
        DType::Q4_0 => 32 + 256,
        DType::Q4_1 => 64 + 256,
        DType::Q8_0 => 32 + 512,
        other => panic!("{other:?} is not packable"),
    }
}

/// Bytes of one group of `cols` columns.
pub fn group_bytes(dtype: DType, cols: usize) -> usize {
    cols / QK * block_bytes(dtype)
}

/// Groups of a matrix of `rows` rows (the last one padded with zero rows).
pub fn groups(rows: usize) -> usize {
    rows.div_ceil(GROUP)
}

/// Offset of the weights within a block.
fn weights_at(dtype: DType) -> usize {
    if dtype == DType::Q4_1 {
        64
    } else {
        32
    }
}

/// Repacks up to [`GROUP`] GGUF rows of `dtype` into one group (`out`, `group_bytes` long).
/// Lanes without a row stay zero: their scales are 0, so their results are 0 (and unread).
pub fn pack_group(dtype: DType, rows: &[&[u8]], cols: usize, out: &mut [u8]) {
    assert!(packable(dtype) && cols.is_multiple_of(QK) && rows.len() <= GROUP);
    assert_eq!(out.len(), group_bytes(dtype, cols));
    let (fb, pb, wa) = (dtype.block_bytes(), block_bytes(dtype), weights_at(dtype));
    out.fill(0);
    for (i, row) in rows.iter().enumerate() {
        for (b, src) in row.chunks_exact(fb).take(cols / QK).enumerate() {
            let blk = &mut out[b * pb..(b + 1) * pb];
            blk[2 * i..2 * i + 2].copy_from_slice(&src[0..2]);
            let qs = match dtype {
                DType::Q4_1 => {
                    blk[32 + 2 * i..32 + 2 * i + 2].copy_from_slice(&src[2..4]);
                    &src[4..20]
                }
                DType::Q4_0 => &src[2..18],
                _ => &src[2..34],
            };
            let w = &mut blk[wa..];
            if dtype == DType::Q8_0 {
                for (k, &q) in qs.iter().enumerate() {
                    // Signed to offset binary: q + 128.
                    w[(k / 4) * 64 + 4 * i + k % 4] = q ^ 0x80;
                }
            } else {
                for (k, &q) in qs.iter().enumerate() {
                    w[(k / 4) * 64 + 4 * i + k % 4] = q;
                }
            }
        }
    }
}

/// The unsigned weight of lane `lane`, element `k` (0..32), of one packed block.
#[inline(always)]
fn weight(dtype: DType, blk: &[u8], lane: usize, k: usize) -> u8 {
    let w = &blk[weights_at(dtype)..];
    if dtype == DType::Q8_0 {
        w[(k / 4) * 64 + 4 * lane + k % 4]
    } else {
        let kk = k % 16;
        let byte = w[(kk / 4) * 64 + 4 * lane + kk % 4];
        if k < 16 {
            byte & 0x0F
        } else {
            byte >> 4
        }
    }
}

/// What a packed format's unsigned weights are offset by (`w = d * (q - offset) [+ m]`).
fn offset(dtype: DType) -> i32 {
    match dtype {
        DType::Q4_0 => 8,
        DType::Q8_0 => 128,
        _ => 0,
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()
}

/// Dequantizes row `lane` of a packed group (the embedding lookup reads the tied output
/// matrix this way).
pub fn dequantize_row(dtype: DType, group: &[u8], lane: usize, out: &mut [f32]) {
    let pb = block_bytes(dtype);
    for (blk, o) in group.chunks_exact(pb).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(blk, lane);
        let m = if dtype == DType::Q4_1 {
            f16_at(&blk[32..], lane)
        } else {
            0.0
        };
        for (k, v) in o.iter_mut().enumerate() {
            let q = weight(dtype, blk, lane, k) as i32 - offset(dtype);
            *v = d * q as f32 + m;
        }
    }
}

/// Token counts from which activations are quantized on the pool rather than the caller.
const PARALLEL_QUANTIZE_TOKENS: usize = 16;

/// Quantized activations of `n` tokens in the packed kernel's layout.
#[derive(Debug, Default)]
pub struct Acts {
    /// Tokens.
    n: usize,
    blocks: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    /// `d * Σq` per block (Q4_1's minimum term).
    s: Vec<f32>,
    /// `Σq` per block (where Q4_0's and Q8_0's integer sums start).
    sq: Vec<i32>,
}

/// One token's activations.
#[derive(Debug, Clone, Copy)]
pub struct Token<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
    sq: &'a [i32],
}

/// One token's input and the slices its quantized blocks go to.
type TokenOut<'a> = (
    (&'a [f32], &'a mut [i8]),
    ((&'a mut [f32], &'a mut [f32]), &'a mut [i32]),
);

impl Acts {
    /// Quantizes `n` tokens of `cols` values each (a multiple of 32) from `x`, reusing buffers.
    pub fn quantize(&mut self, x: &[f32], n: usize, cols: usize) {
        assert!(cols.is_multiple_of(QK) && x.len() == n * cols);
        let nb = cols / QK;
        self.n = n;
        self.blocks = nb;
        for v in [&mut self.d, &mut self.s] {
            v.clear();
            v.resize(n * nb, 0.0);
        }
        self.qs.clear();
        self.qs.resize(n * nb * QK, 0);
        self.sq.clear();
        self.sq.resize(n * nb, 0);
        let quantize = |((xt, qs), ((d, s), sq)): TokenOut<'_>| {
            for ((((xb, qb), d), s), sq) in xt
                .chunks_exact(QK)
                .zip(qs.chunks_exact_mut(QK))
                .zip(d)
                .zip(s)
                .zip(sq)
            {
                let (scale, sum) = crate::kernels::quantize_block_sum(xb, qb);
                (*d, *s, *sq) = (scale, scale * sum as f32, sum);
            }
        };
        // A prefill chunk or a large batch is a few hundred thousand values: worth both cores
        // (serial, it was 3% of a 32-stream server's time); a decode step's few are not.
        if n >= PARALLEL_QUANTIZE_TOKENS {
            use rayon::prelude::*;
            x.par_chunks_exact(cols)
                .zip(self.qs.par_chunks_exact_mut(nb * QK))
                .zip(
                    self.d
                        .par_chunks_exact_mut(nb)
                        .zip(self.s.par_chunks_exact_mut(nb))
                        .zip(self.sq.par_chunks_exact_mut(nb)),
                )
                .for_each(quantize);
        } else {
            x.chunks_exact(cols)
                .zip(self.qs.chunks_exact_mut(nb * QK))
                .zip(
                    self.d
                        .chunks_exact_mut(nb)
                        .zip(self.s.chunks_exact_mut(nb))
                        .zip(self.sq.chunks_exact_mut(nb)),
                )
                .for_each(quantize);
        }
    }

    pub fn tokens(&self) -> usize {
        self.n
    }

    pub fn token(&self, t: usize) -> Token<'_> {
        let nb = self.blocks;
        Token {
            qs: &self.qs[t * nb * QK..(t + 1) * nb * QK],
            d: &self.d[t * nb..(t + 1) * nb],
            s: &self.s[t * nb..(t + 1) * nb],
            sq: &self.sq[t * nb..(t + 1) * nb],
        }
    }
}

/// One task's share of a packed matmul: the packed `groups` (each [`GROUP`] rows, of which
/// the first `lanes[i]` are real) times every token of `acts`. Result (token `t`, group `i`,
/// lane `l`) goes to `dst[i] + t * stride + l`. Tokens go eight at a time through each group
/// (then four, two, one); a lone token takes two groups per pass so their chains overlap.
/// Each (row, token) result is computed by the same instructions whatever the shape of the
/// tile it falls in, so batching never changes it.
///
/// The token loop lives here, beside the kernel, so the lengths are checked once per call and
/// each tile's activations and destinations are pointer arithmetic, not arrays of slices
/// built and checked per tile by the caller.
///
/// # Safety
/// For every group `i` and token `t < acts.tokens()`, `dst[i] + t * stride` must be valid for
/// `lanes[i]` writes of `f32` that nothing else reads or writes during the call.
pub unsafe fn dot_groups_into(
    dtype: DType,
    groups: &[&[u8]],
    lanes: &[usize],
    acts: &Acts,
    dst: &[*mut f32],
    stride: usize,
) {
    let nb = acts.blocks;
    assert!(groups.len() == lanes.len() && groups.len() == dst.len());
    assert!(lanes.iter().all(|&k| k <= GROUP));
    assert!(groups.iter().all(|g| g.len() == nb * block_bytes(dtype)));
    let n = acts.n;
    assert!(
        acts.qs.len() == n * nb * QK
            && acts.d.len() == n * nb
            && acts.s.len() == n * nb
            && acts.sq.len() == n * nb
    );
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::has_avx512() {
            let x = avx512::Xs {
                qs: acts.qs.as_ptr(),
                d: acts.d.as_ptr(),
                s: acts.s.as_ptr(),
                sq: acts.sq.as_ptr(),
                nb,
            };
            // SAFETY: the AVX-512 features this build uses were detected at run time, the
            // lengths were checked above, and the caller vouches for `dst`.
            unsafe {
                match dtype {
                    DType::Q4_0 => avx512::groups::<Q4_0>(groups, lanes, x, n, dst, stride),
                    DType::Q4_1 => avx512::groups::<Q4_1>(groups, lanes, x, n, dst, stride),
                    _ => avx512::groups::<Q8_0>(groups, lanes, x, n, dst, stride),
                }
            }
            return;
        }
    }
    for (i, group) in groups.iter().enumerate() {
        for t in 0..n {
            for lane in 0..lanes[i] {
                let v = portable_dot(dtype, group, lane, acts.token(t));
                // SAFETY: the caller vouches for `dst`.
                unsafe { *dst[i].wrapping_add(t * stride + lane) = v };
            }
        }
    }
}

/// Kernel variants, as const parameters.
const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;

/// The reference: lane `lane` of a group, block by block, `acc = fma(I, d dx, acc)` (then
/// `acc = fma(m, sx, acc)` for Q4_1), with `I` the exact integer sum of `w - offset` times `x`.
pub fn portable_dot(dtype: DType, group: &[u8], lane: usize, x: Token<'_>) -> f32 {
    let pb = block_bytes(dtype);
    let mut acc = 0f32;
    for (b, blk) in group.chunks_exact(pb).enumerate() {
        let mut isum = -offset(dtype) * x.sq[b];
        for k in 0..QK {
            isum += weight(dtype, blk, lane, k) as i32 * x.qs[b * QK + k] as i32;
        }
        acc = (isum as f32).mul_add(f16_at(blk, lane) * x.d[b], acc);
        if dtype == DType::Q4_1 {
            acc = f16_at(&blk[32..], lane).mul_add(x.s[b], acc);
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Q4_0, Q4_1, Q8_0};

    /// Activations in [`super::Acts`]'s layout, as pointers (token `t`'s 8-bit values at
    /// `qs + t * nb * 32`, its scales and sums at `t * nb`).
    #[derive(Clone, Copy)]
    pub struct Xs {
        pub qs: *const i8,
        pub d: *const f32,
        pub s: *const f32,
        pub sq: *const i32,
        pub nb: usize,
    }

    /// [`super::dot_groups_into`]'s loop over tiles, for kind `K`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn groups<const K: u8>(
        groups: &[&[u8]],
        lanes: &[usize],
        x: Xs,
        n: usize,
        dst: &[*mut f32],
        stride: usize,
    ) {
        let at = |i: usize, t: usize| dst[i].wrapping_add(t * stride);
        let mut t = 0;
        while t + 8 <= n {
            for (i, g) in groups.iter().enumerate() {
                tile::<1, 8, K>([g.as_ptr()], x, t, [at(i, t)], stride, [lanes[i]]);
            }
            t += 8;
        }
        if t + 4 <= n {
            for (i, g) in groups.iter().enumerate() {
                tile::<1, 4, K>([g.as_ptr()], x, t, [at(i, t)], stride, [lanes[i]]);
            }
            t += 4;
        }
        if t + 2 <= n {
            for (i, g) in groups.iter().enumerate() {
                tile::<1, 2, K>([g.as_ptr()], x, t, [at(i, t)], stride, [lanes[i]]);
            }
            t += 2;
        }
        if t < n {
            let mut i = 0;
            while i + 2 <= groups.len() {
                let gp = [groups[i].as_ptr(), groups[i + 1].as_ptr()];
                tile::<2, 1, K>(
                    gp,
                    x,
                    t,
                    [at(i, t), at(i + 1, t)],
                    stride,
                    [lanes[i], lanes[i + 1]],
                );
                i += 2;
            }
            if i < groups.len() {
                tile::<1, 1, K>([groups[i].as_ptr()], x, t, [at(i, t)], stride, [lanes[i]]);
            }
        }
    }

    /// `G` groups times tokens `t..t + N`, kind `K`; (group `g`, token `t + k`) stored at
    /// `dst[g] + k * stride`. Per block, each group's scales are converted and its weights
    /// unpacked once into eight registers, then every token runs eight `vpdpbusd` against its
    /// activations broadcast four bytes at a time: one chain per token, the tile's tokens
    /// interleaved so their chains overlap (integer sums, so the order is exact), or two
    /// chains per token where the tile holds fewer than four (group, token) pairs.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn tile<const G: usize, const N: usize, const K: u8>(
        gp: [*const u8; G],
        x: Xs,
        t: usize,
        dst: [*mut f32; G],
        stride: usize,
        lanes: [usize; G],
    ) {
        let nb = x.nb;
        let (bb, wa) = match K {
            Q4_0 => (288, 32),
            Q4_1 => (320, 64),
            _ => (544, 32),
        };
        let m4 = _mm512_set1_epi8(0x0F);
        let mut acc = [[_mm512_setzero_ps(); N]; G];
        // Token t + k's block b: 8-bit values at qs + k * row + 32 b, scales at sc + k * nb + b.
        let row = nb * 32;
        let qs = x.qs.add(t * row);
        let sc = t * nb;
        for b in 0..nb {
            for g in 0..G {
                let p = gp[g].add(b * bb);
                // Decode reads each weight once and waits on memory: ask for the next block
                // while this one computes (a prefetch never faults; past the end it is only
                // an address, computed with wrapping arithmetic and never dereferenced).
                // Batched calls reuse the block from cache and are bound by arithmetic instead.
                if N <= 2 {
                    for line in (0..bb).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(bb + line) as *const i8);
                    }
                }
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
                let mw = if K == Q4_1 {
                    _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32) as *const __m256i))
                } else {
                    _mm512_setzero_ps()
                };
                let wp = p.add(wa);
                // Loops, not closures, here and below: a closure would not inherit this
                // function's target features, and its intrinsics would become calls.
                let mut w = [_mm512_setzero_si512(); 8];
                if K == Q8_0 {
                    for (j, wj) in w.iter_mut().enumerate() {
                        *wj = _mm512_loadu_si512(wp.add(64 * j) as *const _);
                    }
                } else {
                    for l in 0..4 {
                        let v = _mm512_loadu_si512(wp.add(64 * l) as *const _);
                        w[l] = _mm512_and_si512(v, m4);
                        w[l + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                    }
                }
                let mut isum = [_mm512_setzero_si512(); N];
                for (k, i) in isum.iter_mut().enumerate() {
                    let sq = *x.sq.add(sc + k * nb + b);
                    *i = match K {
                        Q4_0 => _mm512_set1_epi32(-8 * sq),
                        Q8_0 => _mm512_set1_epi32(-128 * sq),
                        _ => _mm512_setzero_si512(),
                    };
                }
                let xq = |k: usize, j: usize| {
                    qs.add(k * row + b * 32 + 4 * j)
                        .cast::<i32>()
                        .read_unaligned()
                };
                if N * G >= 4 {
                    for (j, wj) in w.iter().enumerate() {
                        for (k, i) in isum.iter_mut().enumerate() {
                            *i = _mm512_dpbusd_epi32(*i, *wj, _mm512_set1_epi32(xq(k, j)));
                        }
                    }
                } else {
                    for (k, i) in isum.iter_mut().enumerate() {
                        let mut i1 = _mm512_setzero_si512();
                        for j in 0..4 {
                            let x0 = _mm512_set1_epi32(xq(k, 2 * j));
                            let x1 = _mm512_set1_epi32(xq(k, 2 * j + 1));
                            *i = _mm512_dpbusd_epi32(*i, w[2 * j], x0);
                            i1 = _mm512_dpbusd_epi32(i1, w[2 * j + 1], x1);
                        }
                        *i = _mm512_add_epi32(*i, i1);
                    }
                }
                for (k, i) in isum.iter().enumerate() {
                    let at = sc + k * nb + b;
                    let s = _mm512_mul_ps(dw, _mm512_set1_ps(*x.d.add(at)));
                    acc[g][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*i), s, acc[g][k]);
                    if K == Q4_1 {
                        acc[g][k] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*x.s.add(at)), acc[g][k]);
                    }
                }
            }
        }
        for g in 0..G {
            let mask: __mmask16 = ((1u32 << lanes[g]) - 1) as u16;
            for (k, a) in acc[g].iter().enumerate() {
                _mm512_mask_storeu_ps(dst[g].wrapping_add(k * stride), mask, *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{self, BlockQ8};
    use crate::quant::{dequantize_row as gguf_dequantize, quantize_row};
    use crate::testing::random_vec;

    const TYPES: [DType; 3] = [DType::Q4_0, DType::Q4_1, DType::Q8_0];

    /// `rows` random GGUF rows and their packed groups.
    fn packed(dt: DType, rows: usize, cols: usize, seed: u64) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let src: Vec<Vec<u8>> = (0..rows)
            .map(|r| quantize_row(dt, &random_vec(cols, seed * 1000 + r as u64)))
            .collect();
        let groups = src
            .chunks(GROUP)
            .map(|rs| {
                let refs: Vec<&[u8]> = rs.iter().map(Vec::as_slice).collect();
                let mut out = vec![0u8; group_bytes(dt, cols)];
                pack_group(dt, &refs, cols, &mut out);
                out
            })
            .collect();
        (src, groups)
    }

    #[test]
    fn packing_keeps_every_weight() {
        for dt in TYPES {
            for (rows, cols) in [(1, 32), (16, 64), (17, 96), (33, 576)] {
                let (src, groups) = packed(dt, rows, cols, cols as u64);
                for (r, row) in src.iter().enumerate() {
                    let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
                    gguf_dequantize(dt, row, &mut a);
                    dequantize_row(dt, &groups[r / GROUP], r % GROUP, &mut b);
                    assert_eq!(a, b, "{dt:?} {rows}x{cols} row {r}");
                }
            }
        }
    }

    /// The packed reference equals the GGUF-layout kernel's reference up to float rounding:
    /// the same integers and scales, combined with fused multiply-adds.
    #[test]
    fn the_reference_matches_the_gguf_layout_kernel() {
        for dt in TYPES {
            for cols in [32, 96, 576, 1536] {
                let (src, groups) = packed(dt, GROUP, cols, 3 + cols as u64);
                let x = random_vec(cols, 5);
                let mut acts = Acts::default();
                acts.quantize(&x, 1, cols);
                let mut xq: Vec<BlockQ8> = Vec::new();
                kernels::quantize_acts(&x, &mut xq);
                for (lane, row) in src.iter().enumerate() {
                    let got = portable_dot(dt, &groups[0], lane, acts.token(0));
                    let want = kernels::portable::dot(dt, row, &xq);
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{dt:?} cols={cols} lane {lane}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Every tile shape the matmul uses (tokens 8, 4, 2 and 1 at a time; a lone token with two
    /// groups or one) gives each (row, token) exactly the reference's bits, partial groups
    /// write only their rows, and nothing lands outside a token's rows.
    #[test]
    fn the_dispatched_kernel_equals_the_reference_bit_for_bit_in_every_tile() {
        for dt in TYPES {
            for cols in [32, 96, 576, 1536] {
                let (_, groups) = packed(dt, 3 * GROUP, cols, 7 + cols as u64);
                for n in [1, 2, 3, 5, 8, 15, 19] {
                    let x = random_vec(n * cols, 11 + n as u64);
                    let mut acts = Acts::default();
                    acts.quantize(&x, n, cols);
                    for (gs, lanes) in [
                        (&groups[..], &[16, 16, 9][..]),
                        (&groups[1..], &[16, 5][..]),
                        (&groups[2..], &[16][..]),
                    ] {
                        let refs: Vec<&[u8]> = gs.iter().map(Vec::as_slice).collect();
                        // Output rows of 3 groups per token, plus a guard row after the last.
                        let stride = 3 * GROUP;
                        let mut out = vec![f32::NAN; (n + 1) * stride];
                        let base = out.as_mut_ptr();
                        let dst: Vec<*mut f32> = (0..gs.len())
                            .map(|i| base.wrapping_add(i * GROUP))
                            .collect();
                        // SAFETY: token t's group i writes `lanes[i]` floats at
                        // `t * stride + i * GROUP`, inside `out`.
                        unsafe { dot_groups_into(dt, &refs, lanes, &acts, &dst, stride) };
                        for t in 0..=n {
                            for (i, (g, &k)) in refs.iter().zip(lanes).enumerate() {
                                for lane in 0..GROUP {
                                    let got = out[t * stride + i * GROUP + lane];
                                    if t < n && lane < k {
                                        let want = portable_dot(dt, g, lane, acts.token(t));
                                        assert_eq!(
                                            got.to_bits(),
                                            want.to_bits(),
                                            "{dt:?} cols={cols} n={n} group {i} token {t} lane {lane}"
                                        );
                                    } else {
                                        assert!(got.is_nan(), "{dt:?} n={n} wrote past lane {k}");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
