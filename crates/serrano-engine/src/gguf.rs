//! GGUF container: metadata and tensor directory over a memory-mapped file.
//!
//! Every length read from the file is checked against the bytes that remain before anything is
//! allocated, so a corrupt or hostile file yields an error, never a panic or a huge allocation.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::error::{EngineError, Result};
use crate::quant::DType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Upper bounds on directory sizes, far above any real model, so that a corrupt count fails fast.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KV: u64 = 1 << 20;
const MAX_DIMS: u32 = 4;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor lives in the file and how to read it.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) length.
    pub dims: Vec<u64>,
    pub dtype: DType,
    /// Absolute offset of the first byte in the file.
    pub offset: usize,
    pub size_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Backing bytes of a GGUF: a memory map in production, a plain buffer in tests.
pub enum Bytes {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    /// Drops `len` bytes at `offset` from this process's resident memory where they are a file
    /// mapping; read again, they come back from the file unchanged. For weights copied
    /// elsewhere (repacked), so that resident memory does not count them twice.
    pub fn release(&self, offset: usize, len: usize) {
        match self {
            #[cfg(unix)]
            Bytes::Mmap(m) => {
                // SAFETY: the map is a read-only mapping of the model file that nothing
                // writes, so MADV_DONTNEED only drops page-table entries: a later read (of a
                // page shared with a neighbouring tensor, say) faults the same bytes back in.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
                };
            }
            _ => {}
        }
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mmap(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub bytes: Arc<Bytes>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|source| EngineError::Open {
            path: path.into(),
            source,
        })?;
        // SAFETY: the map is read-only; a file truncated underneath us is outside our contract, as
        // for every mmap-based loader (llama.cpp included).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| EngineError::Open {
            path: path.into(),
            source,
        })?;
        Self::parse(Arc::new(Bytes::Mmap(map)))
    }

    pub fn from_vec(bytes: Vec<u8>) -> Result<GgufFile> {
        Self::parse(Arc::new(Bytes::Owned(bytes)))
    }

    fn parse(bytes: Arc<Bytes>) -> Result<GgufFile> {
        let mut r = Reader {
            buf: &bytes,
            pos: 0,
        };
        if r.take(4)? != MAGIC {
            return Err(EngineError::Format("bad magic (expected 'GGUF')".into()));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(EngineError::Version(version));
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        if n_tensors > MAX_TENSORS || n_kv > MAX_KV {
            return Err(EngineError::Format(format!(
                "implausible counts: {n_tensors} tensors, {n_kv} metadata keys"
            )));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| {
                EngineError::Format("general.alignment is not a power of two".into())
            })?,
            None => DEFAULT_ALIGNMENT,
        };
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(EngineError::Format(format!(
                    "tensor '{name}' has {n_dims} dimensions"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64()?);
            }
            let type_id = r.u32()?;
            let offset = r.u64()?;
            infos.push((name, dims, type_id, offset));
        }
        let data_start = r.pos.div_ceil(alignment as usize) * alignment as usize;
        let mut tensors = BTreeMap::new();
        for (name, dims, type_id, rel) in infos {
            let dtype = DType::from_ggml(type_id).ok_or_else(|| EngineError::UnsupportedType {
                tensor: name.clone(),
                type_id,
                type_name: crate::quant::ggml_type_name(type_id).to_string(),
            })?;
            let n: u64 = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| EngineError::Format(format!("tensor '{name}' is too large")))?;
            if dims[0] % dtype.block_elems() as u64 != 0 {
                return Err(EngineError::Format(format!(
                    "tensor '{name}': row length {} is not a multiple of the {dtype:?} block size",
                    dims[0]
                )));
            }
            let size = (n / dtype.block_elems() as u64).checked_mul(dtype.block_bytes() as u64);
            let offset = (data_start as u64).checked_add(rel);
            let (Some(size), Some(offset)) = (size, offset) else {
                return Err(EngineError::Format(format!("tensor '{name}' overflows")));
            };
            if offset
                .checked_add(size)
                .is_none_or(|end| end > bytes.len() as u64)
            {
                return Err(EngineError::Format(format!(
                    "tensor '{name}' extends past the end of the file (file truncated?)"
                )));
            }
            let info = TensorInfo {
                name: name.clone(),
                dims,
                dtype,
                offset: offset as usize,
                size_bytes: size as usize,
            };
            if tensors.insert(name.clone(), info).is_some() {
                return Err(EngineError::Format(format!("duplicate tensor '{name}'")));
            }
        }
        Ok(GgufFile {
            version,
            metadata,
            tensors,
            bytes,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self
            .metadata
            .get(key)
            .ok_or_else(|| EngineError::MissingKey(key.into()))?;
        v.as_str().ok_or(EngineError::KeyType {
            key: key.into(),
            expected: "string",
        })
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self
            .metadata
            .get(key)
            .ok_or_else(|| EngineError::MissingKey(key.into()))?;
        v.as_u64().ok_or(EngineError::KeyType {
            key: key.into(),
            expected: "unsigned integer",
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self
            .metadata
            .get(key)
            .ok_or_else(|| EngineError::MissingKey(key.into()))?;
        v.as_f64().ok_or(EngineError::KeyType {
            key: key.into(),
            expected: "number",
        })
    }

    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.bytes[info.offset..info.offset + info.size_bytes]
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                EngineError::Format(format!("unexpected end of file at byte {}", self.pos))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > self.remaining() as u64 {
            return Err(EngineError::Format(format!(
                "string length {n} exceeds the file at byte {}",
                self.pos
            )));
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| EngineError::Format(format!("invalid UTF-8 string at byte {}", self.pos)))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.arr::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(EngineError::Format("arrays nested too deeply".into()));
                }
                let elem = self.u32()?;
                let n = self.u64()?;
                // Every element takes at least one byte, so a count above the remaining bytes is corrupt.
                if n > self.remaining() as u64 {
                    return Err(EngineError::Format(format!(
                        "array length {n} exceeds the file at byte {}",
                        self.pos
                    )));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            other => {
                return Err(EngineError::Format(format!(
                    "unknown metadata value type {other}"
                )))
            }
        })
    }
}

/// Writes GGUF files. Used by tests (and tools) to build small models without a download.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, DType, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn meta(&mut self, key: &str, value: Value) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }
    /// `dims` in ggml order (row length first); `data` already encoded in `dtype`.
    pub fn tensor(&mut self, name: &str, dims: &[u64], dtype: DType, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), dtype, data));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            write_str(&mut out, k);
            out.extend_from_slice(&value_type(v).to_le_bytes());
            write_value(&mut out, v);
        }
        let mut offset = 0u64;
        for (name, dims, dtype, data) in &self.tensors {
            write_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&dtype.ggml_id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + data.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        }
        for (_, _, _, data) in &self.tensors {
            out.resize(
                out.len().div_ceil(DEFAULT_ALIGNMENT as usize) * DEFAULT_ALIGNMENT as usize,
                0,
            );
            out.extend_from_slice(data);
        }
        out
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            let elem = items.first().map(value_type).unwrap_or(4);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                write_value(out, it);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Value::String("llama".into()))
            .meta("llama.block_count", Value::U32(2))
            .meta("x.f", Value::F32(0.5))
            .meta(
                "x.arr",
                Value::Array(vec![Value::String("a".into()), Value::String("bc".into())]),
            )
            .tensor(
                "t0",
                &[4, 2],
                DType::F32,
                (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect(),
            )
            .tensor("t1", &[32], DType::Q8_0, vec![0u8; 34]);
        w.to_bytes()
    }

    #[test]
    fn round_trip_metadata_and_tensors() {
        let f = GgufFile::from_vec(sample()).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
        assert_eq!(f.get_f64("x.f").unwrap(), 0.5);
        assert_eq!(f.get("x.arr").unwrap().as_array().unwrap().len(), 2);
        let t0 = &f.tensors["t0"];
        assert_eq!(t0.dims, vec![4, 2]);
        assert_eq!(t0.offset % 32, 0);
        let b = f.tensor_bytes(t0);
        assert_eq!(f32::from_le_bytes(b[28..32].try_into().unwrap()), 7.0);
        assert_eq!(f.tensors["t1"].size_bytes, 34);
    }

    #[test]
    fn missing_keys_and_wrong_types_are_errors() {
        let f = GgufFile::from_vec(sample()).unwrap();
        assert!(matches!(f.get_str("nope"), Err(EngineError::MissingKey(_))));
        assert!(matches!(
            f.get_str("llama.block_count"),
            Err(EngineError::KeyType { .. })
        ));
    }

    #[test]
    fn bad_magic_and_version() {
        assert!(matches!(
            GgufFile::from_vec(b"GGML....".to_vec()),
            Err(EngineError::Format(_))
        ));
        let mut b = sample();
        b[4] = 9;
        assert!(matches!(
            GgufFile::from_vec(b),
            Err(EngineError::Version(9))
        ));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = sample();
        for n in 0..full.len() {
            assert!(
                GgufFile::from_vec(full[..n].to_vec()).is_err(),
                "truncated at {n} parsed"
            );
        }
    }

    #[test]
    fn unsupported_tensor_type_is_named() {
        let mut b = sample();
        // Patch t1's type id (Q8_0 = 8) to IQ2_XXS (16).
        let needle: Vec<u8> = [
            b"t1".as_slice(),
            &1u32.to_le_bytes(),
            &32u64.to_le_bytes(),
            &8u32.to_le_bytes(),
        ]
        .concat();
        let at = b
            .windows(needle.len())
            .position(|w| w == needle.as_slice())
            .unwrap()
            + needle.len()
            - 4;
        b[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
        let err = GgufFile::from_vec(b).unwrap_err().to_string();
        assert!(err.contains("IQ2_XXS") && err.contains("t1"), "{err}");
    }

    #[test]
    fn corrupt_lengths_do_not_allocate() {
        let mut b = sample();
        // The first key's length field lives right after the 24-byte header.
        b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(GgufFile::from_vec(b).is_err());
    }
}
