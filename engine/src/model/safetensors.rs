//! safetensors files (Hugging Face's weight format): the header parsed and checked in full, then
//! tensors read one at a time by offset through the pinned file's descriptor.
//!
//! The format: an 8-byte little-endian header length, a JSON header naming each tensor's
//! dtype, shape and byte range in the data section, then the data. Every range is checked to
//! lie inside the file, to match its dtype and shape, and not to overlap another, before any
//! tensor is read; only f32, f16 and bf16 are accepted (what Llama, Mistral and Qwen
//! checkpoints hold).

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail, ensure};
use candle_core::quantized::{GgmlDType, QTensor};

use super::file::ModelFile;

/// Largest header read: the crate that defines the format caps it at 100 MB; real ones are a
/// few hundred KB for thousands of tensors.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Most dimensions a tensor may have (weights have 1 or 2).
const MAX_DIMS: usize = 4;

/// The element types read, as candle's raw-tensor types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::Bf16,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Bf16 => GgmlDType::BF16,
        }
    }
}

/// One tensor's entry in the header, checked.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range in the file (header included).
    start: u64,
    len: usize,
}

/// An entry as the JSON header writes it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// A parsed safetensors file: its tensors by name, and the descriptor to read them through.
pub struct SafetensorsFile {
    file: ModelFile,
    pub tensors: BTreeMap<String, Entry>,
}

impl SafetensorsFile {
    /// Parse and check the header of `file` (already hashed against its pin).
    pub fn parse(mut file: ModelFile) -> Result<Self> {
        let tensors = read_header(&mut file).with_context(|| {
            format!("{} is not a readable safetensors file", file.path.display())
        })?;
        Ok(Self { file, tensors })
    }

    pub fn name(&self) -> String {
        self.file.path.display().to_string()
    }

    /// The raw bytes of tensor `name`, little-endian, rows contiguous.
    pub fn bytes(&mut self, name: &str) -> Result<(Entry, Vec<u8>)> {
        let entry = self
            .tensors
            .get(name)
            .with_context(|| format!("{} has no tensor {name}", self.name()))?
            .clone();
        let bytes = self.file.read_at(entry.start, entry.len)?;
        Ok((entry, bytes))
    }
}

/// Turn raw little-endian bytes into a tensor of the file's own element type on `device`.
pub fn qtensor(
    dtype: Dtype,
    bytes: &[u8],
    shape: &[usize],
    device: &candle_core::Device,
) -> Result<QTensor> {
    // candle views the bytes as elements without checking their count.
    let elems = shape.iter().product::<usize>();
    ensure!(
        bytes.len() == elems * dtype.size(),
        "{} bytes for a {dtype:?} tensor of shape {shape:?}",
        bytes.len()
    );
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype.ggml(),
        bytes,
        shape.to_vec(),
        device,
    )?)
}

fn read_header(file: &mut ModelFile) -> Result<BTreeMap<String, Entry>> {
    let file_len = file.byte_len()?;
    ensure!(
        file_len >= 8,
        "the file is shorter than its 8-byte header length"
    );
    let n = u64::from_le_bytes(file.read_at(0, 8)?.try_into().expect("8 bytes"));
    ensure!(
        n <= MAX_HEADER_BYTES && n <= file_len - 8,
        "the header length {n} is larger than the file or than {MAX_HEADER_BYTES} bytes"
    );
    let header = file.read_at(8, n as usize)?;
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).context("the header is not a JSON object")?;
    let data_start = 8 + n;
    let mut tensors = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let raw: RawEntry = serde_json::from_value(value)
            .with_context(|| format!("the header's entry for tensor {name}"))?;
        let entry = check_entry(&name, raw, data_start, file_len)?;
        tensors.insert(name, entry);
    }
    check_layout(&tensors, file_len)?;
    Ok(tensors)
}

fn check_entry(name: &str, raw: RawEntry, data_start: u64, file_len: u64) -> Result<Entry> {
    let Some(dtype) = Dtype::from_name(&raw.dtype) else {
        bail!(
            "tensor {name} is {}: only F32, F16 and BF16 weights are supported",
            raw.dtype
        );
    };
    ensure!(
        !raw.shape.is_empty() && raw.shape.len() <= MAX_DIMS,
        "tensor {name} has {} dimensions (1 to {MAX_DIMS} supported)",
        raw.shape.len()
    );
    let shape: Vec<usize> = raw
        .shape
        .iter()
        .map(|&d| usize::try_from(d).ok().filter(|&d| d > 0))
        .collect::<Option<_>>()
        .with_context(|| format!("tensor {name} has an empty or oversized dimension"))?;
    let len = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .with_context(|| format!("tensor {name}'s size overflows"))?;
    let [begin, end] = raw.data_offsets;
    ensure!(
        end >= begin && end - begin == len as u64,
        "tensor {name}'s byte range [{begin}, {end}) does not hold {:?} {shape:?}",
        dtype
    );
    // Checked against the file before any sum: offsets near u64::MAX would otherwise wrap
    // and pass every later comparison.
    let data_len = file_len - data_start;
    ensure!(
        end <= data_len,
        "tensor {name} ends at byte {end} of the data, past the end of the file ({data_len} \
         bytes of data)"
    );
    let start = data_start + begin;
    Ok(Entry {
        dtype,
        shape,
        start,
        len,
    })
}

/// Ranges inside the file and disjoint (the format also wants them contiguous; overlap is
/// what matters here: two names for the same bytes would let one tensor be read as another).
fn check_layout(tensors: &BTreeMap<String, Entry>, file_len: u64) -> Result<()> {
    let mut ranges: Vec<(u64, u64, &str)> = tensors
        .iter()
        .map(|(name, e)| (e.start, e.start + e.len as u64, name.as_str()))
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        ensure!(
            pair[0].1 <= pair[1].0,
            "tensors {} and {} overlap",
            pair[0].2,
            pair[1].2
        );
    }
    debug_assert!(
        ranges.last().is_none_or(|r| r.1 <= file_len),
        "checked per entry"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file from a header and data, written to a temporary file.
    fn file_with(header: &str, data: &[u8]) -> (tempfile::TempDir, ModelFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(&path, bytes).unwrap();
        let file = ModelFile::open(&path).unwrap();
        (dir, file)
    }

    fn parse_err(header: &str, data: &[u8]) -> String {
        let (_dir, file) = file_with(header, data);
        format!("{:#}", SafetensorsFile::parse(file).err().expect("refused"))
    }

    #[test]
    fn reads_f32_f16_and_bf16_to_the_same_values() {
        // 1.5 and -2.0 in each type, little-endian.
        let mut data = Vec::new();
        data.extend_from_slice(&1.5f32.to_le_bytes());
        data.extend_from_slice(&(-2.0f32).to_le_bytes());
        data.extend_from_slice(&[0x00, 0x3e, 0x00, 0xc0]); // f16
        data.extend_from_slice(&[0xc0, 0x3f, 0x00, 0xc0]); // bf16
        let header = r#"{"__metadata__":{"format":"pt"},
            "a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
            "b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},
            "c":{"dtype":"BF16","shape":[1,2],"data_offsets":[12,16]}}"#;
        let (_dir, file) = file_with(header, &data);
        let mut st = SafetensorsFile::parse(file).unwrap();
        for name in ["a", "b", "c"] {
            let (e, bytes) = st.bytes(name).unwrap();
            let q = qtensor(e.dtype, &bytes, &e.shape, &candle_core::Device::Cpu).unwrap();
            let v: Vec<f32> = q
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(v, [1.5, -2.0], "{name}");
        }
    }

    #[test]
    fn hostile_headers_are_errors_naming_the_problem() {
        let cases = [
            (
                r#"{"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
                "only F32",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                "does not hold",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                "past the end",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#,
                "dimensions",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#,
                "empty or oversized",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#,
                "overflows",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                    "b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                "overlap",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}"#,
                "unknown field",
            ),
            (r#"[1,2]"#, "not a JSON object"),
            // The end wraps past u64::MAX to just before the data: refused before any sum.
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551607,18446744073709551615]}}"#,
                "past the end",
            ),
        ];
        for (header, want) in cases {
            let err = parse_err(header, &[0u8; 8]);
            assert!(err.contains(want), "{header}: {err}");
        }
    }

    #[test]
    fn a_header_length_past_the_file_is_refused_before_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        std::fs::write(&path, u64::MAX.to_le_bytes()).unwrap();
        let err = SafetensorsFile::parse(ModelFile::open(&path).unwrap())
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("header length"), "{err:#}");
    }
}
