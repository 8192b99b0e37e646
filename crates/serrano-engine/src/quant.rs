//! Weight formats (ggml block layouts), dequantization and reference quantizers.
//!
//! The layouts follow ggml's `block_*` structs byte for byte. These scalar routines are the
//! reference that faster kernels are tested against.

use half::{bf16, f16};

#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

pub const QK: usize = 32;
pub const QK_K: usize = 256;

impl DType {
    pub fn from_ggml(id: u32) -> Option<DType> {
        Some(match id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            6 => DType::Q5_0,
            7 => DType::Q5_1,
            8 => DType::Q8_0,
            12 => DType::Q4_K,
            13 => DType::Q5_K,
            14 => DType::Q6_K,
            30 => DType::BF16,
            _ => return None,
        })
    }

    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q4_K => 12,
            DType::Q5_K => 13,
            DType::Q6_K => 14,
            DType::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => QK,
            DType::Q4_K | DType::Q5_K | DType::Q6_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q8_0 => 34,
            DType::Q4_K => 144,
            DType::Q5_K => 176,
            DType::Q6_K => 210,
        }
    }

    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_elems() * self.block_bytes()
    }
}

/// ggml's names for every type id, so an unsupported type can be named in the error.
pub fn ggml_type_name(id: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantize one row (`out.len()` elements, a multiple of the block size) from `src`.
#[inline(always)]
pub fn dequantize_row(dtype: DType, src: &[u8], out: &mut [f32]) {
    let be = dtype.block_elems();
    let bb = dtype.block_bytes();
    debug_assert_eq!(out.len() % be, 0);
    debug_assert!(src.len() >= out.len() / be * bb);
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => f16_row(src, out),
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q4_1 => fixed_blocks::<20>(src, out, |b, o| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for j in 0..16 {
                o[j] = (b[4 + j] & 0x0F) as f32 * d + m;
                o[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
            }
        }),
        DType::Q4_0 => fixed_blocks::<18>(src, out, |b, o| {
            let d = f16_at(b, 0);
            for j in 0..16 {
                o[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                o[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
            }
        }),
        DType::Q8_0 => fixed_blocks::<34>(src, out, |b, o| {
            let d = f16_at(b, 0);
            for j in 0..32 {
                o[j] = b[2 + j] as i8 as f32 * d;
            }
        }),
        _ => {
            for (o, b) in out.chunks_exact_mut(be).zip(src.chunks_exact(bb)) {
                dequantize_block(dtype, b, o);
            }
        }
    }
}

/// F16 to f32, exactly. Element by element, `half` converts in software (or checks for F16C on
/// every call): about 4 GB/s of weights, an eighth of this machine's memory bandwidth; F16C
/// converts eight at a time.
fn f16_row(src: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx")
        {
            // SAFETY: F16C and AVX were detected just above.
            unsafe { f16_row_f16c(src, out) };
            return;
        }
    }
    f16_row_portable(src, out);
}

fn f16_row_portable(src: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
        *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_row_f16c(src: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let n = out.len().min(src.len() / 2);
    let whole = n / 8 * 8;
    for i in (0..whole).step_by(8) {
        let h = _mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    f16_row_portable(&src[2 * whole..], &mut out[whole..]);
}

/// Runs `f` over 32-element blocks as fixed-size arrays, so the compiler drops bounds checks and
/// vectorizes the body. Must agree exactly with [`dequantize_block`] (tested).
#[inline(always)]
fn fixed_blocks<const B: usize>(src: &[u8], out: &mut [f32], f: impl Fn(&[u8; B], &mut [f32; 32])) {
    for (o, b) in out.chunks_exact_mut(QK).zip(src.chunks_exact(B)) {
        if let (Ok(o), Ok(b)) = (<&mut [f32; 32]>::try_from(o), <&[u8; B]>::try_from(b)) {
            f(b, o);
        }
    }
}

/// Dequantize one quantized block into `out` (`dtype.block_elems()` values).
#[inline(always)]
pub fn dequantize_block(dtype: DType, b: &[u8], out: &mut [f32]) {
    match dtype {
        DType::Q4_0 => {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                out[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                out[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        DType::Q4_1 => {
            let d = f16_at(b, 0);
            let m = f16_at(b, 2);
            let qs = &b[4..20];
            for j in 0..16 {
                out[j] = (qs[j] & 0x0F) as f32 * d + m;
                out[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        DType::Q5_0 => {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                out[j] = (((qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
                out[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
            }
        }
        DType::Q5_1 => {
            let d = f16_at(b, 0);
            let m = f16_at(b, 2);
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let qs = &b[8..24];
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                out[j] = ((qs[j] & 0x0F) as u32 | h0) as f32 * d + m;
                out[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
            }
        }
        DType::Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                out[j] = b[2 + j] as i8 as f32 * d;
            }
        }
        DType::Q4_K => {
            let d = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let scales = &b[4..16];
            let qs = &b[16..144];
            for (chunk, (o, q)) in out
                .chunks_exact_mut(64)
                .zip(qs.chunks_exact(32))
                .enumerate()
            {
                let (s1, m1) = scale_min_k4(2 * chunk, scales);
                let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
                let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                for l in 0..32 {
                    o[l] = d1 * (q[l] & 0x0F) as f32 - m1;
                    o[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }
        DType::Q5_K => {
            let d = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let scales = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            for (chunk, (o, ql)) in out
                .chunks_exact_mut(64)
                .zip(qs.chunks_exact(32))
                .enumerate()
            {
                let (s1, m1) = scale_min_k4(2 * chunk, scales);
                let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
                let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                let u1 = 1u8 << (2 * chunk);
                let u2 = 2u8 << (2 * chunk);
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    o[l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - m1;
                    o[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
                }
            }
        }
        DType::Q6_K => {
            let ql = &b[0..128];
            let qh = &b[128..192];
            let sc = &b[192..208];
            let d = f16_at(b, 208);
            for half in 0..2 {
                let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                let o = &mut out[128 * half..128 * half + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    o[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    o[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    o[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    o[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
        DType::F32 | DType::F16 | DType::BF16 => dequantize_row(dtype, b, out),
    }
}

/// The 6-bit scale and min of sub-block `j` in a Q4_K/Q5_K block's packed `scales`.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Reference quantizers (ggml's `quantize_row_*_ref`), used to write test models and check kernels.
pub fn quantize_row(dtype: DType, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(dtype.row_bytes(x.len()));
    match dtype {
        DType::F32 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        DType::Q8_0 => {
            for b in x.chunks_exact(QK) {
                let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
        }
        DType::Q4_0 => {
            for b in x.chunks_exact(QK) {
                let max = b
                    .iter()
                    .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                for j in 0..16 {
                    let q0 = ((b[j] * id + 8.5) as i32).clamp(0, 15) as u8;
                    let q1 = ((b[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        DType::Q4_1 => {
            for b in x.chunks_exact(QK) {
                let min = b.iter().copied().fold(f32::INFINITY, f32::min);
                let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                for j in 0..16 {
                    let q0 = (((b[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    let q1 = (((b[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    out.push(q0 | (q1 << 4));
                }
            }
        }
        other => {
            panic!("no reference quantizer for {other:?} (tests build k-quant blocks byte by byte)")
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 64) as f32 - 31.5) / 16.0)
            .collect()
    }

    #[test]
    fn simple_formats_round_trip_within_their_step() {
        let x = ramp(128);
        for (dt, tol) in [
            (DType::F32, 0.0),
            (DType::F16, 1e-3),
            (DType::BF16, 1e-2),
            (DType::Q8_0, 0.02),
            (DType::Q4_0, 0.3),
            (DType::Q4_1, 0.15),
        ] {
            let q = quantize_row(dt, &x);
            assert_eq!(q.len(), dt.row_bytes(x.len()), "{dt:?}");
            let mut y = vec![0f32; x.len()];
            dequantize_row(dt, &q, &mut y);
            let err = x
                .iter()
                .zip(&y)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            assert!(err <= tol, "{dt:?}: max error {err}");
        }
    }

    #[test]
    fn row_fast_paths_agree_with_block_reference() {
        let x = ramp(96);
        for dt in [DType::Q4_0, DType::Q4_1, DType::Q8_0] {
            let q = quantize_row(dt, &x);
            let mut fast = vec![0f32; 96];
            dequantize_row(dt, &q, &mut fast);
            let mut slow = vec![0f32; 96];
            for (o, b) in slow
                .chunks_exact_mut(32)
                .zip(q.chunks_exact(dt.block_bytes()))
            {
                dequantize_block(dt, b, o);
            }
            assert_eq!(fast, slow, "{dt:?}");
        }
    }

    #[test]
    fn q4_1_layout_matches_ggml() {
        // d = 1, m = -8, nibbles: element j = j % 16 (low), element j + 16 = 15 - j % 16 (high).
        let mut b = Vec::new();
        b.extend_from_slice(&f16::from_f32(1.0).to_le_bytes());
        b.extend_from_slice(&f16::from_f32(-8.0).to_le_bytes());
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let mut y = [0f32; 32];
        dequantize_block(DType::Q4_1, &b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], j as f32 - 8.0);
            assert_eq!(y[j + 16], (15 - j) as f32 - 8.0);
        }
    }

    /// The F16C conversion equals `half`'s, for every one of the 65,536 values (NaN payloads
    /// included) and for a tail shorter than eight.
    #[test]
    fn f16_rows_convert_exactly() {
        let src: Vec<u8> = (0..=u16::MAX)
            .flat_map(|v| v.to_le_bytes())
            .chain([0, 0x3c])
            .collect();
        let n = src.len() / 2;
        let (mut fast, mut reference) = (vec![0f32; n], vec![0f32; n]);
        f16_row(&src, &mut fast);
        f16_row_portable(&src, &mut reference);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fast), bits(&reference));
    }

    #[test]
    fn type_names_cover_unsupported_ids() {
        assert_eq!(ggml_type_name(16), "IQ2_XXS");
        assert_eq!(ggml_type_name(30), "BF16");
        assert_eq!(ggml_type_name(999), "unknown");
        for id in 0..40 {
            if let Some(dt) = DType::from_ggml(id) {
                assert_eq!(dt.ggml_id(), id);
                assert_eq!(format!("{dt:?}"), ggml_type_name(id));
            }
        }
    }

    /// k-quant blocks built from fixed random bytes, dequantized by the `gguf` Python package
    /// (gguf-py, the reference that ships with llama.cpp); see `testdata/kquants.json`.
    #[test]
    fn k_quants_match_gguf_py_reference() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../testdata/kquants.json")).unwrap();
        for case in fixture.as_array().unwrap() {
            let dt = match case["type"].as_str().unwrap() {
                "Q4_K" => DType::Q4_K,
                "Q5_K" => DType::Q5_K,
                "Q6_K" => DType::Q6_K,
                "Q5_0" => DType::Q5_0,
                "Q5_1" => DType::Q5_1,
                "Q4_0" => DType::Q4_0,
                other => panic!("{other}"),
            };
            let bytes: Vec<u8> = case["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u8)
                .collect();
            let want: Vec<f32> = case["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let mut got = vec![0f32; want.len()];
            dequantize_row(dt, &bytes, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "{dt:?}[{i}]: {g} vs {w}"
                );
            }
        }
    }
}
