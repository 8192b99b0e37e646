//! 4-bit weights repacked at load for an AVX-512 kernel (Q4_0 and Q4_1).
//!
//! The GGUF layout interleaves each 32-weight block's f16 scales with its nibbles, so a kernel
//! must convert two scalars and broadcast a product for every block and every token: more
//! instructions than the integer dot itself. Repacked, a row is
//!
//! ```text
//! [ d: B x f16 | m: B x f16 | nibbles: B/2 pairs x 32 bytes ]      (B blocks, rounded up to even)
//! ```
//!
//! where byte `j` of pair `p` holds element `j` of block `2p` in its low nibble and element `j`
//! of block `2p+1` in its high one, so one 32-byte load and two masks give 64 weights in
//! element order for one 512-bit `vpdpbusd`. Scales come first because the kernel reads them
//! before the weights they scale: the row is then read front to back, as the hardware
//! prefetcher expects (scales last cost decode a fifth). A weight is `d * q + m` (Q4_0 becomes `m = -8 d`,
//! exact in f16), so both formats share one kernel: `Σ_b d_b dx_b Σ q x + Σ_b m_b sx_b`, where
//! the scale products and the minimum terms are computed sixteen blocks per instruction.
//! The row takes exactly as many bytes as in the file (20 per block) when B is even.
//!
//! Activations go in a matching layout ([`Acts`]): all blocks' 8-bit values contiguous (so two
//! blocks are one 64-byte load), then the scales and sums as plain f32 arrays.
//!
//! Written by hand for the same reason as [`crate::kernels`]: no crate has these layouts.
//! A portable reference (always built, tested against the GGUF-layout kernels) defines the
//! numbers; the AVX-512 build sums in a different order and agrees within float rounding.

use half::f16;

use crate::quant::{DType, QK};

/// Whether weights of `dtype` can be repacked.
pub fn packable(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_0 | DType::Q4_1)
}

/// Whether this GGUF row of `dtype` packs exactly: Q4_0's `-8 d` must be an f16 (`|d| <=
/// 8188`; no real model comes near, but a file is input).
pub fn fits(dtype: DType, src: &[u8]) -> bool {
    match dtype {
        DType::Q4_0 => src
            .chunks_exact(dtype.block_bytes())
            .all(|b| f16::from_le_bytes([b[0], b[1]]).to_f32().abs() <= 8188.0),
        _ => packable(dtype),
    }
}

/// Blocks in a packed row of `cols` weights: rounded up to whole pairs.
pub fn blocks(cols: usize) -> usize {
    cols.div_ceil(QK).next_multiple_of(2)
}

/// Bytes of one packed row.
pub fn row_bytes(cols: usize) -> usize {
    blocks(cols) * 20
}

/// Repacks one GGUF row of `dtype` (Q4_0 or Q4_1) into `out` (`row_bytes(cols)` long).
pub fn pack_row(dtype: DType, src: &[u8], cols: usize, out: &mut [u8]) {
    let nb = cols / QK;
    let pb = blocks(cols);
    assert!(packable(dtype) && cols.is_multiple_of(QK) && out.len() == pb * 20);
    let bb = dtype.block_bytes();
    out.fill(0);
    let (ds, rest) = out.split_at_mut(pb * 2);
    let (ms, nib) = rest.split_at_mut(pb * 2);
    for (b, blk) in src.chunks_exact(bb).take(nb).enumerate() {
        let d = f16::from_le_bytes([blk[0], blk[1]]);
        let (m, qs) = match dtype {
            DType::Q4_1 => (f16::from_le_bytes([blk[2], blk[3]]), &blk[4..20]),
            // -8 d is exact in f16 (a power-of-two scaling); `fits` checked it cannot overflow.
            _ => (f16::from_f32(-8.0 * d.to_f32()), &blk[2..18]),
        };
        ds[2 * b..2 * b + 2].copy_from_slice(&d.to_le_bytes());
        ms[2 * b..2 * b + 2].copy_from_slice(&m.to_le_bytes());
        let (pair, shift) = (b / 2, 4 * (b % 2));
        for j in 0..QK {
            // GGUF: element j < 16 is the low nibble of byte j, element j >= 16 the high one
            // of byte j - 16.
            let q = if j < 16 {
                qs[j] & 0x0F
            } else {
                qs[j - 16] >> 4
            };
            nib[pair * 32 + j] |= q << shift;
        }
    }
}

/// Dequantizes a packed row (the embedding lookup reads the tied output matrix this way).
pub fn dequantize_row(row: &[u8], out: &mut [f32]) {
    let pb = row.len() / 20;
    let (ds, rest) = row.split_at(pb * 2);
    let (ms, nib) = rest.split_at(pb * 2);
    for (b, o) in out.chunks_exact_mut(QK).enumerate() {
        let d = f16::from_le_bytes([ds[2 * b], ds[2 * b + 1]]).to_f32();
        let m = f16::from_le_bytes([ms[2 * b], ms[2 * b + 1]]).to_f32();
        let (pair, shift) = (b / 2, 4 * (b % 2));
        for (j, v) in o.iter_mut().enumerate() {
            *v = d * ((nib[pair * 32 + j] >> shift) & 0x0F) as f32 + m;
        }
    }
}

/// One token's input and the slices its quantized blocks go to.
type TokenOut<'a> = ((&'a [f32], &'a mut [i8]), (&'a mut [f32], &'a mut [f32]));

/// Token counts from which activations are quantized on the pool rather than the caller.
const PARALLEL_QUANTIZE_TOKENS: usize = 16;

/// Quantized activations of `n` tokens in the packed kernel's layout.
#[derive(Debug, Default)]
pub struct Acts {
    /// Blocks per token (even; the padding block, if any, is all zeros).
    blocks: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

/// One token's activations.
#[derive(Debug, Clone, Copy)]
pub struct Token<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
}

impl Acts {
    /// Quantizes `n` tokens of `cols` values each (a multiple of 32) from `x`, reusing buffers.
    pub fn quantize(&mut self, x: &[f32], n: usize, cols: usize) {
        assert!(cols.is_multiple_of(QK) && x.len() == n * cols);
        let pb = blocks(cols);
        self.blocks = pb;
        self.qs.clear();
        self.qs.resize(n * pb * QK, 0);
        self.d.clear();
        self.d.resize(n * pb, 0.0);
        self.s.clear();
        self.s.resize(n * pb, 0.0);
        let quantize = |((xt, qs), (d, s)): TokenOut<'_>| {
            for (((xb, qb), d), s) in xt
                .chunks_exact(QK)
                .zip(qs.chunks_exact_mut(QK))
                .zip(d)
                .zip(s)
            {
                (*d, *s) = crate::kernels::quantize_block(xb, qb);
            }
        };
        // A prefill chunk or a large batch is a few hundred thousand values: worth both cores
        // (serial, it was 3% of a 32-stream server's time); a decode step's few are not.
        if n >= PARALLEL_QUANTIZE_TOKENS {
            use rayon::prelude::*;
            x.par_chunks_exact(cols)
                .zip(self.qs.par_chunks_exact_mut(pb * QK))
                .zip(
                    self.d
                        .par_chunks_exact_mut(pb)
                        .zip(self.s.par_chunks_exact_mut(pb)),
                )
                .for_each(quantize);
        } else {
            x.chunks_exact(cols)
                .zip(self.qs.chunks_exact_mut(pb * QK))
                .zip(self.d.chunks_exact_mut(pb).zip(self.s.chunks_exact_mut(pb)))
                .for_each(quantize);
        }
    }

    pub fn token(&self, t: usize) -> Token<'_> {
        let pb = self.blocks;
        Token {
            qs: &self.qs[t * pb * QK..(t + 1) * pb * QK],
            d: &self.d[t * pb..(t + 1) * pb],
            s: &self.s[t * pb..(t + 1) * pb],
        }
    }
}

/// Dot products of `R` packed rows with `N` tokens: `out[r][t]`. Each (row, token) result is
/// computed by the same instructions whatever `R` and `N` are, so batching never changes it.
#[inline]
pub fn dot_tile<const R: usize, const N: usize>(
    rows: [&[u8]; R],
    xs: [Token<'_>; N],
) -> [[f32; N]; R] {
    let pb = rows[0].len() / 20;
    assert!(rows.iter().all(|r| r.len() == pb * 20));
    assert!(xs
        .iter()
        .all(|x| x.d.len() == pb && x.s.len() == pb && x.qs.len() == pb * QK));
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::has_avx512() {
            // SAFETY: the AVX-512 features this build uses were detected at run time, and the
            // lengths were checked above.
            return unsafe { avx512::dot_tile(rows, xs) };
        }
    }
    rows.map(|r| xs.map(|x| portable_dot(r, x)))
}

/// The reference: block by block, `d dx Σ q x + m sx`.
pub fn portable_dot(row: &[u8], x: Token<'_>) -> f32 {
    let pb = row.len() / 20;
    let (ds, rest) = row.split_at(pb * 2);
    let (ms, nib) = rest.split_at(pb * 2);
    let mut sum = 0f32;
    for b in 0..pb {
        let d = f16::from_le_bytes([ds[2 * b], ds[2 * b + 1]]).to_f32();
        let m = f16::from_le_bytes([ms[2 * b], ms[2 * b + 1]]).to_f32();
        let (pair, shift) = (b / 2, 4 * (b % 2));
        let mut isum = 0i32;
        for j in 0..QK {
            let q = (nib[pair * 32 + j] >> shift) & 0x0F;
            isum += q as i32 * x.qs[b * QK + j] as i32;
        }
        sum += d * x.d[b] * isum as f32 + m * x.s[b];
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Token;

    /// Sixteen blocks' scales per chunk: one 512-bit vector of f32.
    const CHUNK: usize = 16;

    /// One accumulator per (row, token), holding both the scaled integer sums and the minimum
    /// terms (all of it is summed in the end), so a 2 x 4 tile keeps its 8 accumulators and 8
    /// scale vectors in registers.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_tile<const R: usize, const N: usize>(
        rows: [&[u8]; R],
        xs: [Token<'_>; N],
    ) -> [[f32; N]; R] {
        let pb = rows[0].len() / 20;
        // Decode reads each weight once, so it waits on memory: start fetching the next tile
        // (the rows that follow these in the matrix) while this one computes. A prefetch never
        // faults; the address is only computed, with wrapping arithmetic, never dereferenced.
        let next = rows[R - 1].as_ptr_range().end;
        for line in (0..R * pb * 20).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line) as *const i8);
        }
        let ds = rows.map(|r| r.as_ptr() as *const i16);
        let nib = rows.map(|r| r.as_ptr().add(pb * 4));
        let m4 = _mm256_set1_epi8(0x0F);
        // Lanes 0..8 take scale 0, lanes 8..16 scale 1: the pair's two blocks.
        let idx0 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        let mut c = 0;
        while c < pb {
            let k = (pb - c).min(CHUNK);
            let mask: __mmask16 = ((1u32 << k) - 1) as u16;
            let mut sc = [[_mm512_setzero_ps(); N]; R];
            for t in 0..N {
                let dx = _mm512_maskz_loadu_ps(mask, xs[t].d.as_ptr().add(c));
                let sx = _mm512_maskz_loadu_ps(mask, xs[t].s.as_ptr().add(c));
                for r in 0..R {
                    let dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, ds[r].add(c)));
                    let mw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, ds[r].add(pb + c)));
                    sc[r][t] = _mm512_mul_ps(dw, dx);
                    acc[r][t] = _mm512_fmadd_ps(mw, sx, acc[r][t]);
                }
            }
            for pp in 0..k / 2 {
                let p = c / 2 + pp;
                let idx = _mm512_add_epi32(idx0, _mm512_set1_epi32(2 * pp as i32));
                // Loops, not closures, here and below: a closure would not inherit this
                // function's target features, and its intrinsics would become calls.
                let mut w = [_mm512_setzero_si512(); R];
                for r in 0..R {
                    let q = _mm256_loadu_si256(nib[r].add(p * 32) as *const __m256i);
                    let lo = _mm256_and_si256(q, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                    w[r] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                }
                for t in 0..N {
                    let x = _mm512_loadu_si512(xs[t].qs.as_ptr().add(p * 64) as *const _);
                    for r in 0..R {
                        let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[r], x);
                        let s = _mm512_permutexvar_ps(idx, sc[r][t]);
                        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, acc[r][t]);
                    }
                }
            }
            c += CHUNK;
        }
        let mut out = [[0f32; N]; R];
        for r in 0..R {
            let mut t = 0;
            while t + 4 <= N {
                let v = sum4([acc[r][t], acc[r][t + 1], acc[r][t + 2], acc[r][t + 3]]);
                out[r][t..t + 4].copy_from_slice(&v);
                t += 4;
            }
            for t in t..N {
                out[r][t] = sum4([acc[r][t]; 4])[0];
            }
        }
        out
    }

    #[inline(always)]
    unsafe fn half(v: __m512) -> __m256 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        _mm256_add_ps(_mm512_castps512_ps256(v), hi)
    }

    /// Four vectors' totals, each summed in one fixed order (halves, then pairs of lanes) so a
    /// token's total is the same whether it is reduced alone or with three others.
    #[inline(always)]
    unsafe fn sum4(a: [__m512; 4]) -> [f32; 4] {
        let [a, b, c, d] = [half(a[0]), half(a[1]), half(a[2]), half(a[3])];
        let h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), s);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{self, BlockQ8};
    use crate::quant::{dequantize_row as gguf_dequantize, quantize_row};
    use crate::testing::random_vec;

    fn packed(dt: DType, cols: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let src = quantize_row(dt, &random_vec(cols, seed));
        let mut out = vec![0u8; row_bytes(cols)];
        pack_row(dt, &src, cols, &mut out);
        (src, out)
    }

    #[test]
    fn q4_0_scales_too_large_for_f16_stay_in_file_format() {
        let mut src = quantize_row(DType::Q4_0, &random_vec(64, 1));
        assert!(fits(DType::Q4_0, &src));
        src[18..20].copy_from_slice(&f16::from_f32(9000.0).to_le_bytes());
        assert!(!fits(DType::Q4_0, &src));
    }

    #[test]
    fn packing_keeps_every_weight() {
        for dt in [DType::Q4_0, DType::Q4_1] {
            for cols in [32, 64, 96, 576] {
                let (src, row) = packed(dt, cols, cols as u64);
                let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
                gguf_dequantize(dt, &src, &mut a);
                dequantize_row(&row, &mut b);
                assert_eq!(a, b, "{dt:?} cols={cols}");
            }
        }
    }

    /// The packed reference equals the GGUF-layout kernel's reference up to float rounding:
    /// same integers, same scales, summed in another order.
    #[test]
    fn the_reference_matches_the_gguf_layout_kernel() {
        for dt in [DType::Q4_0, DType::Q4_1] {
            for cols in [32, 96, 576, 1536] {
                let (src, row) = packed(dt, cols, 3 + cols as u64);
                let x = random_vec(cols, 5);
                let mut acts = Acts::default();
                acts.quantize(&x, 1, cols);
                let mut xq: Vec<BlockQ8> = Vec::new();
                kernels::quantize_acts(&x, &mut xq);
                let (got, want) = (
                    portable_dot(&row, acts.token(0)),
                    kernels::portable::dot(dt, &src, &xq),
                );
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{dt:?} cols={cols}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn the_dispatched_kernel_matches_the_reference_and_batches_bit_for_bit() {
        for dt in [DType::Q4_0, DType::Q4_1] {
            // Odd block counts (a padding block), one chunk, several chunks and a tail.
            for cols in [32, 96, 512, 576, 1536, 32 * 35] {
                let (_, row) = packed(dt, cols, 7 + cols as u64);
                let x = random_vec(4 * cols, 11);
                let mut acts = Acts::default();
                acts.quantize(&x, 4, cols);
                let (_, row2) = packed(dt, cols, 8 + cols as u64);
                let xs = [acts.token(0), acts.token(1), acts.token(2), acts.token(3)];
                let tile = dot_tile::<2, 4>([&row, &row2], xs);
                for (t, v) in tile[0].iter().enumerate() {
                    let one = dot_tile::<1, 1>([&row], [xs[t]])[0][0];
                    assert_eq!(v.to_bits(), one.to_bits(), "{dt:?} cols={cols} token {t}");
                    let two = dot_tile::<1, 1>([&row2], [xs[t]])[0][0];
                    assert_eq!(
                        tile[1][t].to_bits(),
                        two.to_bits(),
                        "{dt:?} cols={cols} row 2"
                    );
                    let want = portable_dot(&row, xs[t]);
                    assert!(
                        (v - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{dt:?} cols={cols}: {v} vs {want}"
                    );
                }
            }
        }
    }
}
