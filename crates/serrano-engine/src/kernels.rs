//! Integer dot-product kernels for the 32-element weight formats (Q4_0, Q4_1, Q8_0) and the
//! 256-element k-quants (Q4_K, Q5_K, Q6_K).
//!
//! Activations are quantized once per matmul to 8 bits in blocks of 32 ([`BlockQ8`]), as
//! llama.cpp does; a weight block times an activation block is then an exact integer dot product
//! scaled by the two block scales. Written by hand because no crate offers these GGUF block
//! layouts with runtime-dispatched SIMD (candle's Q4_1 path, for one, is scalar).
//!
//! Each kernel has a portable version (the reference, always built and tested) and an AVX2
//! version chosen at run time. Within one process a (row, token) pair always goes through the
//! same kernel, so a sequence's logits do not depend on its batch-mates.

use half::f16;

use crate::quant::{scale_min_k4, DType, QK, QK_K};

/// One block of 32 activations quantized to 8 bits: `x[j] ≈ d * qs[j]`; `s = d * Σ qs`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

/// The weight formats with an integer kernel here: the list tests and benchmarks go through.
pub const FORMATS: [DType; 6] = [
    DType::Q4_0,
    DType::Q4_1,
    DType::Q8_0,
    DType::Q4_K,
    DType::Q5_K,
    DType::Q6_K,
];

/// Whether `dtype` has an integer kernel here.
pub fn supported(dtype: DType) -> bool {
    FORMATS.contains(&dtype)
}

/// Quantizes `x` (a multiple of 32 long) into `out`, replacing its contents.
pub fn quantize_acts(x: &[f32], out: &mut Vec<BlockQ8>) {
    out.clear();
    for b in x.chunks_exact(QK) {
        let mut blk = BlockQ8::default();
        (blk.d, blk.s) = quantize_block(b, &mut blk.qs);
        out.push(blk);
    }
}

/// Quantizes one block of 32 activations into `qs`; returns the scale `d` and `d * Σ qs`.
#[inline]
pub fn quantize_block(x: &[f32], qs: &mut [i8]) -> (f32, f32) {
    let (d, sum) = quantize_block_sum(x, qs);
    (d, d * sum as f32)
}

/// [`quantize_block`], returning the scale `d` and the integer `Σ qs`: through the AVX-512
/// build where the CPU has it (the default build's SSE2 left it scalar, and a prefill spent a
/// tenth of its time here), which gives the portable code's bits.
#[inline]
pub fn quantize_block_sum(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if x.len() == QK && qs.len() == QK && has_avx512() {
        // SAFETY: AVX-512 F was detected at run time; both blocks are 32 long.
        return unsafe { avx512::quantize_block_sum(x, qs) };
    }
    portable_quantize_block_sum(x, qs)
}

/// The reference of [`quantize_block_sum`].
#[inline]
pub fn portable_quantize_block_sum(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        // Round half away from zero without a libm call, so the loop vectorizes.
        let x = v * id;
        *q = (x + 0.5f32.copysign(x)) as i8;
        sum += *q as i32;
    }
    (d, sum)
}

/// Dot product of one weight row (`dtype` blocks) with quantized activations.
#[inline]
pub fn dot(dtype: DType, row: &[u8], x: &[BlockQ8]) -> f32 {
    dot_n::<1>(dtype, row, [x])[0]
}

/// Dot products of one weight row with `N` tokens' activations at once: the weight block is
/// decoded once for all of them. Each token's result is bit-identical to [`dot`]'s, so batching
/// never changes a sequence's numbers.
#[inline]
pub fn dot_n<const N: usize>(dtype: DType, row: &[u8], xs: [&[BlockQ8]; N]) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    {
        match simd() {
            // SAFETY: AVX2, FMA, F16C, AVX512-VNNI and AVX512-VL were detected at run time.
            Simd::Vnni | Simd::Avx512 => return unsafe { avx2::dot_n_vnni(dtype, row, xs) },
            // SAFETY: AVX2, FMA and F16C were detected at run time.
            Simd::Avx2 => return unsafe { avx2::dot_n(dtype, row, xs) },
            Simd::None => {}
        }
    }
    xs.map(|x| portable::dot(dtype, row, x))
}

/// The widest kernel build this CPU runs. All of them compute the same integer block sums, so
/// the choice changes speed, never a result.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Simd {
    None,
    Avx2,
    /// AVX2 plus `vpdpbusd` (AVX512-VNNI on 256-bit registers): one instruction for what
    /// `vpmaddubsw` + `vpmaddwd` do in two.
    Vnni,
    /// Full AVX-512 (F, BW, VL, VNNI): 4-bit weights are repacked for [`crate::packed`].
    Avx512,
}

/// Whether 4-bit weights should be repacked for the AVX-512 kernel.
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        simd() == Simd::Avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The environment variable that caps the kernels used (`portable`, `avx2`, `vnni`,
/// `avx512`), to compare them on one machine; unset or unrecognised, the best the CPU has.
pub const SIMD_ENV: &str = "SERRANO_SIMD";

/// The kernel family in use, for logs and benchmark records.
pub fn simd_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        match simd() {
            Simd::None => "portable",
            Simd::Avx2 => "avx2",
            Simd::Vnni => "avx2+vnni",
            Simd::Avx512 => "avx512",
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "portable"
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn simd() -> Simd {
    use std::arch::is_x86_feature_detected as has;
    use std::sync::OnceLock;
    static SIMD: OnceLock<Simd> = OnceLock::new();
    *SIMD.get_or_init(|| {
        let cap = match std::env::var(SIMD_ENV).as_deref() {
            Ok("portable") => Simd::None,
            Ok("avx2") => Simd::Avx2,
            Ok("vnni") => Simd::Vnni,
            _ => Simd::Avx512,
        };
        let best = if !(has!("avx2") && has!("fma") && has!("f16c")) {
            Simd::None
        } else if !(has!("avx512vnni") && has!("avx512vl")) {
            Simd::Avx2
        } else if !(has!("avx512f") && has!("avx512bw")) {
            Simd::Vnni
        } else {
            Simd::Avx512
        };
        best.min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::portable_quantize_block_sum`] of one 32-value block, operation for operation:
    /// the same maximum (a NaN is skipped, as `f32::max` skips it), scale, products and
    /// rounding; `as i8` of an in-range value is truncation, and of a NaN 0, which is also
    /// the low byte that `vpmovdb` keeps of the conversion's 0x80000000. The sum is taken of
    /// the stored bytes, so it is theirs in every case.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn quantize_block_sum(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
        let p = x.as_ptr();
        let v = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
        // `max(a, b)` returns `b` when either is NaN: the running maximum goes second.
        let mut m = _mm512_setzero_ps();
        for x in v {
            m = _mm512_max_ps(_mm512_abs_ps(x), m);
        }
        let amax = _mm512_reduce_max_ps(m);
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let (sign, half) = (
            _mm512_set1_epi32(i32::MIN),
            _mm512_set1_epi32(0.5f32.to_bits() as i32),
        );
        let out = qs.as_mut_ptr() as *mut __m128i;
        let mut sum = _mm512_setzero_si512();
        for (i, x) in v.into_iter().enumerate() {
            let y = _mm512_mul_ps(x, id);
            let h = _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(y), sign), half);
            let q = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(_mm512_add_ps(
                y,
                _mm512_castsi512_ps(h),
            )));
            _mm_storeu_si128(out.add(i), q);
            sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(q));
        }
        (d, _mm512_reduce_add_epi32(sum))
    }
}

#[inline(always)]
fn f16_le(lo: u8, hi: u8) -> f32 {
    f16::from_le_bytes([lo, hi]).to_f32()
}

pub mod portable {
    use super::*;

    pub fn dot(dtype: DType, row: &[u8], x: &[BlockQ8]) -> f32 {
        let bb = dtype.block_bytes();
        match dtype {
            DType::Q4_K => return dot_q45_k::<144>(row, x),
            DType::Q5_K => return dot_q45_k::<176>(row, x),
            DType::Q6_K => return dot_q6_k(row, x),
            _ => {}
        }
        let mut s = 0f32;
        for (b, xb) in row.chunks_exact(bb).zip(x) {
            s += match dtype {
                DType::Q4_1 => {
                    let (d, m) = (f16_le(b[0], b[1]), f16_le(b[2], b[3]));
                    let mut isum = 0i32;
                    for j in 0..16 {
                        isum += (b[4 + j] & 0x0F) as i32 * xb.qs[j] as i32
                            + (b[4 + j] >> 4) as i32 * xb.qs[j + 16] as i32;
                    }
                    d * xb.d * isum as f32 + m * xb.s
                }
                DType::Q4_0 => {
                    let d = f16_le(b[0], b[1]);
                    let mut isum = 0i32;
                    for j in 0..16 {
                        isum += ((b[2 + j] & 0x0F) as i32 - 8) * xb.qs[j] as i32
                            + ((b[2 + j] >> 4) as i32 - 8) * xb.qs[j + 16] as i32;
                    }
                    d * xb.d * isum as f32
                }
                DType::Q8_0 => {
                    let d = f16_le(b[0], b[1]);
                    let mut isum = 0i32;
                    for j in 0..32 {
                        isum += b[2 + j] as i8 as i32 * xb.qs[j] as i32;
                    }
                    d * xb.d * isum as f32
                }
                other => unreachable!("no integer kernel for {other:?}"),
            };
        }
        s
    }

    /// Q4_K (`B` = 144) and Q5_K (176): per super-block of 256, `d`, `dmin`, eight 6-bit
    /// (scale, min) pairs, for Q5_K 32 bytes of fifth bits (bit `j` of byte `l` belongs to
    /// sub-block `j`), then 32-byte chunks whose low nibbles are one sub-block of 32 and high
    /// nibbles the next. Element `w = d*sc*q - dmin*m`, so a sub-block's dot is
    /// `d*sc*xd*Σq·xq - dmin*m*xs`.
    fn dot_q45_k<const B: usize>(row: &[u8], x: &[BlockQ8]) -> f32 {
        let mut s = 0f32;
        for (b, xs) in row.chunks_exact(B).zip(x.chunks_exact(QK_K / QK)) {
            let (d, dmin) = (f16_le(b[0], b[1]), f16_le(b[2], b[3]));
            let (scales, qh, qs) = (&b[4..16], &b[16..B - 128], &b[B - 128..B]);
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                let chunk = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                let shift = 4 * (j % 2);
                let xb = &xs[j];
                let isum: i32 = (0..32)
                    .map(|l| {
                        let fifth = qh.get(l).map_or(0, |h| ((h >> j) & 1) << 4);
                        (((chunk[l] >> shift) & 0x0F) | fifth) as i32 * xb.qs[l] as i32
                    })
                    .sum();
                s += d * sc as f32 * xb.d * isum as f32 - dmin * m as f32 * xb.s;
            }
        }
        s
    }

    /// Q6_K: per super-block of 256, low nibbles (128 bytes), high 2-bit pairs (64), sixteen
    /// signed 8-bit scales (one per 16 elements), then `d`. Element `w = d*sc*(q - 32)`.
    fn dot_q6_k(row: &[u8], x: &[BlockQ8]) -> f32 {
        let mut s = 0f32;
        for (b, xs) in row.chunks_exact(210).zip(x.chunks_exact(QK_K / QK)) {
            let d = f16_le(b[208], b[209]);
            for (k, xb) in xs.iter().enumerate() {
                let (half, k4) = (k / 4, k % 4);
                let ql = &b[64 * half + 32 * (k4 % 2)..];
                let qh = &b[128 + 32 * half..];
                let mut isum = [0i32; 2];
                for l in 0..32 {
                    let lo = if k4 < 2 { ql[l] & 0x0F } else { ql[l] >> 4 };
                    let q = (lo | (((qh[l] >> (2 * k4)) & 3) << 4)) as i32 - 32;
                    isum[l / 16] += q * xb.qs[l] as i32;
                }
                let sc = &b[192 + 8 * half + 2 * k4..];
                s += d
                    * xb.d
                    * (sc[0] as i8 as f32 * isum[0] as f32 + sc[1] as i8 as f32 * isum[1] as f32);
            }
        }
        s
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_n<const N: usize>(dtype: DType, row: &[u8], xs: [&[BlockQ8]; N]) -> [f32; N] {
        dispatch::<N, false>(dtype, row, xs)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub unsafe fn dot_n_vnni<const N: usize>(
        dtype: DType,
        row: &[u8],
        xs: [&[BlockQ8]; N],
    ) -> [f32; N] {
        dispatch::<N, true>(dtype, row, xs)
    }

    #[inline(always)]
    unsafe fn dispatch<const N: usize, const VNNI: bool>(
        dtype: DType,
        row: &[u8],
        xs: [&[BlockQ8]; N],
    ) -> [f32; N] {
        // The kernels index activation blocks unchecked: every token must cover the row's
        // blocks of 32 (eight per k-quant block).
        let blocks = row.len() / dtype.block_bytes() * (dtype.block_elems() / QK);
        assert!(xs.iter().all(|x| x.len() >= blocks));
        match dtype {
            DType::Q4_1 => dot_q4_1::<N, VNNI>(row, xs),
            DType::Q4_0 => dot_signed::<N, 18, VNNI>(row, xs),
            DType::Q8_0 => dot_signed::<N, 34, VNNI>(row, xs),
            DType::Q4_K => dot_q45_k::<N, 144, VNNI>(row, xs),
            DType::Q5_K => dot_q45_k::<N, 176, VNNI>(row, xs),
            DType::Q6_K => dot_q6_k::<N, VNNI>(row, xs),
            other => unreachable!("no integer kernel for {other:?}"),
        }
    }

    /// The 32 nibbles of a 4-bit block as unsigned bytes, in element order (low nibbles are
    /// elements 0..16, high nibbles 16..32).
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let q = _mm_loadu_si128(p as *const __m128i);
        let m4 = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(q, m4);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
        _mm256_set_m128i(hi, lo)
    }

    /// Eight i32 partial sums of unsigned `a` times signed `b`, as floats. The two ways give
    /// the same integers: no pair of products here reaches `vpmaddubsw`'s i16 saturation
    /// (4-bit weights times |x| <= 127, or |w| <= 128 times |x| <= 127).
    #[inline(always)]
    unsafe fn mul_sum_u8_i8<const VNNI: bool>(a: __m256i, b: __m256i) -> __m256 {
        if VNNI {
            _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b))
        } else {
            let p16 = _mm256_maddubs_epi16(a, b);
            _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Runs `$step` (`|i, acc, mins| ...`, given block `i` and that chain's per-token
    /// accumulators) over `$blocks` blocks with two accumulators per token: even blocks into the
    /// first, odd into the second, which breaks the FMA latency chain. The pair is unrolled by
    /// hand so the accumulators live in registers (indexing one array by `i & 1` kept them on
    /// the stack, a store-to-load round trip on every block's chain). A macro, not a function
    /// taking a closure: a closure would not inherit the caller's target features, and every
    /// intrinsic in it would become a call.
    macro_rules! two_chains {
        ($n:expr, $blocks:expr, |$i:ident, $acc:ident, $mins:ident| $step:block) => {{
            let mut chains = [([_mm256_setzero_ps(); $n], [0f32; $n]); 2];
            let blocks = $blocks;
            let mut base = 0;
            while base + 2 <= blocks {
                {
                    let $i = base;
                    let ($acc, $mins) = (&mut chains[0].0, &mut chains[0].1);
                    $step
                }
                {
                    let $i = base + 1;
                    let ($acc, $mins) = (&mut chains[1].0, &mut chains[1].1);
                    $step
                }
                base += 2;
            }
            if base < blocks {
                let $i = base;
                let ($acc, $mins) = (&mut chains[0].0, &mut chains[0].1);
                $step
            }
            let [(acc0, min0), (acc1, min1)] = chains;
            let mut out = [0f32; $n];
            for t in 0..$n {
                out[t] = hsum(_mm256_add_ps(acc0[t], acc1[t])) + (min0[t] + min1[t]);
            }
            out
        }};
    }

    #[inline(always)]
    unsafe fn dot_q4_1<const N: usize, const VNNI: bool>(
        row: &[u8],
        xs: [&[BlockQ8]; N],
    ) -> [f32; N] {
        // The minimum terms go in two chains too, so neither the FMA nor this add's latency
        // serializes a single-token (decode) row.
        two_chains!(N, row.len() / 20, |i, acc, mins| {
            let b = row.as_ptr().add(i * 20);
            let w = nibbles(b.add(4));
            // Both f16 scales (d, m) in one conversion.
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((b as *const i32).read_unaligned()));
            let d = _mm_cvtss_f32(dm);
            let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
            for t in 0..N {
                let xb = xs[t].get_unchecked(i);
                let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                acc[t] = _mm256_fmadd_ps(
                    _mm256_set1_ps(d * xb.d),
                    mul_sum_u8_i8::<VNNI>(w, xq),
                    acc[t],
                );
                mins[t] += m * xb.s;
            }
        })
    }

    /// Formats with signed weights, told apart by block size: Q4_0 (18 bytes: nibbles minus 8)
    /// and Q8_0 (34 bytes: signed bytes).
    #[inline(always)]
    unsafe fn dot_signed<const N: usize, const B: usize, const VNNI: bool>(
        row: &[u8],
        xs: [&[BlockQ8]; N],
    ) -> [f32; N] {
        two_chains!(N, row.len() / B, |i, acc, _mins| {
            let b = row.as_ptr().add(i * B);
            let w = if B == 18 {
                _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8))
            } else {
                _mm256_loadu_si256(b.add(2) as *const __m256i)
            };
            let aw = _mm256_sign_epi8(w, w);
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                (b as *const u16).read_unaligned() as i32,
            )));
            for t in 0..N {
                let xb = xs[t].get_unchecked(i);
                let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                let p = mul_sum_u8_i8::<VNNI>(aw, _mm256_sign_epi8(xq, w));
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), p, acc[t]);
            }
        })
    }

    /// See `portable::dot_q45_k` for the layouts. Each 32-byte chunk holds two sub-blocks (low
    /// and high nibbles), which feed the two accumulator chains.
    #[inline(always)]
    unsafe fn dot_q45_k<const N: usize, const B: usize, const VNNI: bool>(
        row: &[u8],
        xs: [&[BlockQ8]; N],
    ) -> [f32; N] {
        let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
        let mut mins = [0f32; N];
        let (m4, one) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(1));
        for (sb, b) in row.chunks_exact(B).enumerate() {
            let (d, dmin) = (f16_le(b[0], b[1]), f16_le(b[2], b[3]));
            let mut scale = [0f32; 8];
            let mut min = [0f32; 8];
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, &b[4..16]);
                (scale[j], min[j]) = (d * sc as f32, dmin * m as f32);
            }
            // Q5_K's fifth bits, shifted down two sub-blocks per chunk.
            let mut qh = if B == 176 {
                _mm256_loadu_si256(b.as_ptr().add(16) as *const __m256i)
            } else {
                _mm256_setzero_si256()
            };
            for c in 0..4 {
                let q = _mm256_loadu_si256(b.as_ptr().add(B - 128 + 32 * c) as *const __m256i);
                let mut lo = _mm256_and_si256(q, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                if B == 176 {
                    let h0 = _mm256_and_si256(qh, one);
                    let h1 = _mm256_and_si256(_mm256_srli_epi16(qh, 1), one);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(h0, 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(h1, 4));
                    qh = _mm256_srli_epi16(qh, 2);
                }
                for t in 0..N {
                    let x0 = xs[t].get_unchecked(8 * sb + 2 * c);
                    let x1 = xs[t].get_unchecked(8 * sb + 2 * c + 1);
                    let p0 = mul_sum_u8_i8::<VNNI>(lo, _mm256_loadu_si256(x0.qs.as_ptr().cast()));
                    let p1 = mul_sum_u8_i8::<VNNI>(hi, _mm256_loadu_si256(x1.qs.as_ptr().cast()));
                    acc0[t] = _mm256_fmadd_ps(_mm256_set1_ps(scale[2 * c] * x0.d), p0, acc0[t]);
                    acc1[t] = _mm256_fmadd_ps(_mm256_set1_ps(scale[2 * c + 1] * x1.d), p1, acc1[t]);
                    mins[t] += min[2 * c] * x0.s + min[2 * c + 1] * x1.s;
                }
            }
        }
        let mut out = [0f32; N];
        for t in 0..N {
            out[t] = hsum(_mm256_add_ps(acc0[t], acc1[t])) - mins[t];
        }
        out
    }

    /// See `portable::dot_q6_k` for the layout. Weights are `q - 32` (signed), multiplied with
    /// the sign trick; one block of 32 spans two 16-element scales, which `mul_sum_u8_i8`'s
    /// lanes keep apart (lanes 0-3 hold elements 0-15, lanes 4-7 elements 16-31).
    #[inline(always)]
    unsafe fn dot_q6_k<const N: usize, const VNNI: bool>(
        row: &[u8],
        xs: [&[BlockQ8]; N],
    ) -> [f32; N] {
        let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
        let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
        for (sb, b) in row.chunks_exact(210).enumerate() {
            let d = f16_le(b[208], b[209]);
            for half in 0..2 {
                let ql = b.as_ptr().add(64 * half);
                let qa = _mm256_loadu_si256(ql as *const __m256i);
                let qb = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let qh = _mm256_loadu_si256(b.as_ptr().add(128 + 32 * half) as *const __m256i);
                // Bits 4-5 of each block's weights: the k-th 2-bit pair of `qh`.
                let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4);
                let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4);
                let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4);
                let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4);
                let q = [
                    _mm256_or_si256(_mm256_and_si256(qa, m4), h0),
                    _mm256_or_si256(_mm256_and_si256(qb, m4), h1),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qa, 4), m4), h2),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qb, 4), m4), h3),
                ];
                let sc = &b[192 + 8 * half..200 + 8 * half];
                let first = 8 * sb + 4 * half;
                q6_block::<N, VNNI>(&mut acc0, q[0], [sc[0], sc[1]], d, xs, first);
                q6_block::<N, VNNI>(&mut acc1, q[1], [sc[2], sc[3]], d, xs, first + 1);
                q6_block::<N, VNNI>(&mut acc0, q[2], [sc[4], sc[5]], d, xs, first + 2);
                q6_block::<N, VNNI>(&mut acc1, q[3], [sc[6], sc[7]], d, xs, first + 3);
            }
        }
        let mut out = [0f32; N];
        for t in 0..N {
            out[t] = hsum(_mm256_add_ps(acc0[t], acc1[t]));
        }
        out
    }

    /// One block of 32 six-bit weights `q` (unsigned, 0..64) times activation block `at` of
    /// each token, scaled per 16 elements, into `acc`.
    #[inline(always)]
    unsafe fn q6_block<const N: usize, const VNNI: bool>(
        acc: &mut [__m256; N],
        q: __m256i,
        sc: [u8; 2],
        d: f32,
        xs: [&[BlockQ8]; N],
        at: usize,
    ) {
        let w = _mm256_sub_epi8(q, _mm256_set1_epi8(32));
        let aw = _mm256_sign_epi8(w, w);
        let (s0, s1) = (sc[0] as i8 as f32 * d, sc[1] as i8 as f32 * d);
        for t in 0..N {
            let xb = xs[t].get_unchecked(at);
            let xq = _mm256_loadu_si256(xb.qs.as_ptr().cast());
            let p = mul_sum_u8_i8::<VNNI>(aw, _mm256_sign_epi8(xq, w));
            let scale = _mm256_set_m128(_mm_set1_ps(s1 * xb.d), _mm_set1_ps(s0 * xb.d));
            acc[t] = _mm256_fmadd_ps(scale, p, acc[t]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;

    use crate::testing::random_vec as rand_vec;

    /// A row of `blocks` blocks of `dt`; Q8_0 gets a -128, the sign trick's edge.
    fn random_row(dt: DType, blocks: usize, seed: u64) -> Vec<u8> {
        let mut w = crate::testing::random_quant_row(dt, blocks * dt.block_elems(), seed);
        if dt == DType::Q8_0 {
            w[2] = 0x80;
        }
        w
    }

    fn random_acts(n: usize, seed: u64) -> Vec<BlockQ8> {
        let mut q = Vec::new();
        quantize_acts(&rand_vec(n, seed), &mut q);
        q
    }

    /// The dispatched quantization gives the reference's bytes, scale and sum, for ordinary
    /// blocks and ones with ties, zeros, infinities and NaNs.
    #[test]
    fn block_quantization_equals_the_reference_bit_for_bit() {
        let mut blocks: Vec<Vec<f32>> = (0..64).map(|s| rand_vec(QK, 100 + s)).collect();
        let mut ties = rand_vec(QK, 9);
        ties[0] = 127.0;
        for (i, v) in ties.iter_mut().enumerate().skip(1) {
            *v = (i as f32 - 16.0) + 0.5;
        }
        blocks.push(ties);
        blocks.push(vec![0.0; QK]);
        blocks.push(vec![-0.0; QK]);
        for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-40, -3e38] {
            let mut b = rand_vec(QK, 5);
            b[7] = special;
            blocks.push(b);
        }
        blocks.push(vec![f32::NAN; QK]);
        for x in &blocks {
            let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
            let got = quantize_block_sum(x, &mut a);
            let want = portable_quantize_block_sum(x, &mut b);
            assert_eq!(
                (got.0.to_bits(), got.1, a),
                (want.0.to_bits(), want.1, b),
                "{x:?}"
            );
        }
    }

    #[test]
    fn activation_quantization_round_trips_within_a_step() {
        let x = rand_vec(96, 3);
        let mut q = Vec::new();
        quantize_acts(&x, &mut q);
        for (b, xs) in q.iter().zip(x.chunks(32)) {
            for (qv, v) in b.qs.iter().zip(xs) {
                assert!((*qv as f32 * b.d - v).abs() <= b.d * 0.5 + 1e-6);
            }
            assert!((b.s - b.d * b.qs.iter().map(|&v| v as i32).sum::<i32>() as f32).abs() < 1e-6);
        }
    }

    /// The portable kernel against an f64 dot of the dequantized weights and activations: equal
    /// up to float rounding, for every format and odd block counts.
    #[test]
    fn portable_kernels_match_dequantized_reference() {
        for dt in FORMATS {
            for blocks in [1, 3, 18] {
                let n = blocks * dt.block_elems();
                let w = random_row(dt, blocks, blocks as u64);
                let mut wf = vec![0f32; n];
                dequantize_row(dt, &w, &mut wf);
                let xq = random_acts(n, 77);
                let reference: f64 = wf
                    .iter()
                    .enumerate()
                    .map(|(i, &wv)| wv as f64 * xq[i / 32].qs[i % 32] as f64 * xq[i / 32].d as f64)
                    .sum();
                let got = portable::dot(dt, &w, &xq) as f64;
                assert!(
                    (got - reference).abs() < 1e-4 * (1.0 + reference.abs()),
                    "{dt:?} x{blocks}: {got} vs {reference}"
                );
            }
        }
    }

    #[test]
    fn four_tokens_at_once_equal_one_at_a_time_bit_for_bit() {
        for dt in FORMATS {
            let blocks = 18 * 32 / dt.block_elems();
            let w = random_row(dt, blocks, 11);
            let acts: Vec<Vec<BlockQ8>> = (0..4)
                .map(|t| random_acts(blocks * dt.block_elems(), 20 + t))
                .collect();
            let four = dot_n::<4>(dt, &w, [&acts[0], &acts[1], &acts[2], &acts[3]]);
            for t in 0..4 {
                assert_eq!(
                    four[t].to_bits(),
                    dot(dt, &w, &acts[t]).to_bits(),
                    "{dt:?} token {t}"
                );
            }
        }
    }

    /// The VNNI build computes the same integer sums as the AVX2 one, so the floats match bit
    /// for bit (runs where the CPU has both).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni_and_avx2_builds_agree_bit_for_bit() {
        if simd() < Simd::Vnni {
            return;
        }
        for dt in FORMATS {
            for blocks in [1, 2, 7] {
                let n = blocks * dt.block_elems();
                let w = random_row(dt, blocks, 40 + blocks as u64);
                let acts: Vec<Vec<BlockQ8>> = (0..4).map(|t| random_acts(n, 60 + t)).collect();
                let xs = [&acts[0][..], &acts[1], &acts[2], &acts[3]];
                // SAFETY: `simd()` found AVX2, FMA, F16C, AVX512-VNNI and AVX512-VL.
                let (a, b) = unsafe { (avx2::dot_n(dt, &w, xs), avx2::dot_n_vnni(dt, &w, xs)) };
                assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits), "{dt:?} x{blocks}");
            }
        }
    }

    #[test]
    fn dispatched_kernels_match_portable() {
        for dt in FORMATS {
            for blocks in [1, 2, 7, 18] {
                let n = blocks * dt.block_elems();
                let w = random_row(dt, blocks, 5 + blocks as u64);
                let xq = random_acts(n, 9);
                let (a, b) = (dot(dt, &w, &xq), portable::dot(dt, &w, &xq));
                assert!(
                    (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{dt:?} x{blocks}: {a} vs {b}"
                );
            }
        }
    }
}
