//! GGUF files: the header, typed access to metadata, and tensors by name.
//!
//! A file reaches [`GgufFile::parse`] only after its SHA-256 matched the pin
//! (`model::pin::OpenedModel::verify`), so a tampered file never reaches the GGUF, tokenizer
//! or template parsers.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::{Content, Value};

use super::file::ModelFile;

/// Nesting of arrays in GGUF metadata followed by [`check_alignment`] (candle allows 64).
const MAX_METADATA_DEPTH: usize = 64;

/// Refuse a `general.alignment` of 0 or one that is not a power of two before candle's reader
/// sees it: candle divides by it (a panic, not an error). A walk over the header and metadata
/// that reads only lengths and that one value, leaving the reader where it found it; anything
/// else malformed is left to candle, which reports it.
fn check_alignment<R: Read + Seek>(r: &mut R) -> Result<()> {
    let start = r.stream_position()?;
    let mut alignment = None;
    // A read error or a malformed entry ends the walk: candle reports it (and what was seen
    // before it is still checked, in case candle reads further than this walk).
    let _ = find_alignment(r, &mut alignment);
    r.seek(SeekFrom::Start(start))?;
    match alignment {
        Some(a) if a == 0 || !a.is_power_of_two() => {
            bail!("general.alignment is {a}; it must be a power of two")
        }
        _ => Ok(()),
    }
}

/// A reader that keeps count of its own position. candle's GGUF reader asks for the position
/// before every string it reads (to bound the string by the bytes left), and a `BufReader`
/// answers that with an `lseek` system call: two for each token of the vocabulary (its text
/// and its merge), 300,000 for a 150,000-token model.
struct Positioned<R> {
    inner: R,
    pos: u64,
}

impl<R: Seek> Positioned<R> {
    fn new(mut inner: R) -> std::io::Result<Self> {
        let pos = inner.stream_position()?;
        Ok(Self { inner, pos })
    }
}

impl<R: Read> Read for Positioned<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Seek> Seek for Positioned<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }

    fn stream_position(&mut self) -> std::io::Result<u64> {
        Ok(self.pos)
    }

    /// Forwarded, not left to the default (a `seek`): `BufReader` keeps its buffer for a
    /// relative seek inside it, and the metadata walk skips every value this way.
    fn seek_relative(&mut self, offset: i64) -> std::io::Result<()> {
        let to = self.pos.checked_add_signed(offset).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek out of range")
        })?;
        self.inner.seek_relative(offset)?;
        self.pos = to;
        Ok(())
    }
}

/// Longest key read in full by the walk (longer ones cannot be `general.alignment`).
const MAX_KEY_READ: u64 = 256;

/// Sets `alignment` to what candle will take from the metadata: the last `general.alignment`
/// entry (candle keeps the last of a repeated key), its name compared as candle reads it
/// (trailing NULs dropped), and only from the integer types candle honours.
fn find_alignment<R: Read + Seek>(r: &mut R, alignment: &mut Option<u64>) -> std::io::Result<()> {
    let magic = read_n::<4>(r)?;
    let long = match u32::from_le_bytes(read_n::<4>(r)?) {
        1 => false,
        2 | 3 => true,
        _ => return Ok(()),
    };
    if &magic != b"GGUF" {
        return Ok(());
    }
    let _tensors = read_len(r, long)?;
    let kvs = read_len(r, long)?;
    for _ in 0..kvs {
        let key_len = read_len(r, long)?;
        let is_alignment = if key_len <= MAX_KEY_READ {
            let mut key = vec![0u8; key_len as usize];
            r.read_exact(&mut key)?;
            while key.last() == Some(&0) {
                key.pop();
            }
            key == b"general.alignment"
        } else {
            r.seek_relative(i64::try_from(key_len).map_err(std::io::Error::other)?)?;
            false
        };
        let ty = u32::from_le_bytes(read_n::<4>(r)?);
        if !is_alignment {
            skip_value(r, ty, long, 0)?;
            continue;
        }
        // Negative values and other types: candle uses its default.
        *alignment = match ty {
            0 => Some(u64::from(read_n::<1>(r)?[0])),
            1 => Some(read_n::<1>(r)?[0] as i8)
                .filter(|v| *v >= 0)
                .map(|v| v as u64),
            2 => Some(u64::from(u16::from_le_bytes(read_n::<2>(r)?))),
            3 => Some(i16::from_le_bytes(read_n::<2>(r)?))
                .filter(|v| *v >= 0)
                .map(|v| v as u64),
            4 => Some(u64::from(u32::from_le_bytes(read_n::<4>(r)?))),
            5 => Some(i32::from_le_bytes(read_n::<4>(r)?))
                .filter(|v| *v >= 0)
                .map(|v| v as u64),
            _ => {
                skip_value(r, ty, long, 0)?;
                None
            }
        };
    }
    Ok(())
}

fn skip_value<R: Read + Seek>(r: &mut R, ty: u32, long: bool, depth: usize) -> std::io::Result<()> {
    let fixed =
        |n: u64| -> std::io::Result<i64> { i64::try_from(n).map_err(std::io::Error::other) };
    match ty {
        0 | 1 | 7 => r.seek_relative(1),
        2 | 3 => r.seek_relative(2),
        4..=6 => r.seek_relative(4),
        10..=12 => r.seek_relative(8),
        8 => {
            let n = read_len(r, long)?;
            r.seek_relative(fixed(n)?)
        }
        9 if depth < MAX_METADATA_DEPTH => {
            let elem = u32::from_le_bytes(read_n::<4>(r)?);
            let n = read_len(r, long)?;
            let size = match elem {
                0 | 1 | 7 => Some(1u64),
                2 | 3 => Some(2),
                4..=6 => Some(4),
                10..=12 => Some(8),
                _ => None,
            };
            match size {
                Some(size) => r.seek_relative(fixed(n.saturating_mul(size))?),
                None => {
                    for _ in 0..n {
                        skip_value(r, elem, long, depth + 1)?;
                    }
                    Ok(())
                }
            }
        }
        _ => Err(std::io::Error::other("not a GGUF value type")),
    }
}

fn read_n<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn read_len(r: &mut impl Read, long: bool) -> std::io::Result<u64> {
    Ok(if long {
        u64::from_le_bytes(read_n::<8>(r)?)
    } else {
        u64::from(u32::from_le_bytes(read_n::<4>(r)?))
    })
}

/// A GGUF file whose hash matched its pin and whose header parsed.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: Positioned<BufReader<Arc<File>>>,
}

impl super::TensorSource for GgufFile {
    fn tensor(
        &mut self,
        name: &str,
        device: &candle_core::Device,
    ) -> Result<candle_core::quantized::QTensor> {
        self.content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("reading tensor {name} from {}", self.path.display()))
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
}

impl GgufFile {
    /// Parse without a pin: only for `bulwark model inspect`, which never serves.
    pub fn open_unverified(path: &Path) -> Result<Self> {
        Self::parse(ModelFile::open(path)?)
    }

    pub(super) fn parse(file: ModelFile) -> Result<Self> {
        let path = file.path.clone();
        let mut reader = Positioned::new(BufReader::new(file.file))
            .with_context(|| format!("reading {}", path.display()))?;
        // INVARIANT: candle's reader divides by `general.alignment`; it is checked first.
        check_alignment(&mut reader)
            .with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
        let content = Content::read(&mut reader)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
        Ok(Self {
            path,
            content,
            reader,
        })
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .with_context(|| format!("GGUF metadata key {key} is missing"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|e| anyhow::anyhow!("GGUF metadata key {key}: {e}"))
    }

    pub fn opt_str(&self, key: &str) -> Option<&str> {
        self.content
            .metadata
            .get(key)?
            .to_string()
            .ok()
            .map(String::as_str)
    }

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.get(key)?;
        v.to_u32()
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .map_err(|e| anyhow::anyhow!("GGUF metadata key {key}: {e}"))
    }

    pub fn opt_u32(&self, key: &str) -> Option<u32> {
        self.content
            .metadata
            .contains_key(key)
            .then(|| self.get_u32(key).ok())
            .flatten()
    }

    pub fn opt_f32(&self, key: &str) -> Option<f32> {
        self.content.metadata.get(key)?.to_f32().ok()
    }

    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        self.content.metadata.get(key)?.to_bool().ok()
    }

    pub fn get_array(&self, key: &str) -> Result<&Vec<Value>> {
        self.get(key)?
            .to_vec()
            .map_err(|e| anyhow::anyhow!("GGUF metadata key {key}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positioned_reader_counts_as_the_file_does() {
        let bytes: Vec<u8> = (0..=255).cycle().take(100_000).collect();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &bytes).unwrap();
        file.seek(SeekFrom::Start(7)).unwrap();
        let mut r = Positioned::new(BufReader::with_capacity(64, Arc::new(file))).unwrap();
        let mut buf = vec![0u8; 1000];
        r.read_exact(&mut buf[..100]).unwrap();
        assert_eq!(r.stream_position().unwrap(), 107);
        assert_eq!(buf[0], 7);
        r.seek(SeekFrom::Current(-50)).unwrap();
        r.read_exact(&mut buf).unwrap();
        assert_eq!(r.stream_position().unwrap(), 1057);
        assert_eq!(buf[0], 57);
        // A short relative seek stays inside the buffer: no system call.
        r.read_exact(&mut buf[..1]).unwrap();
        assert!(r.inner.buffer().len() > 10);
        r.seek_relative(10).unwrap();
        assert!(!r.inner.buffer().is_empty(), "the buffer was dropped");
        assert_eq!(r.stream_position().unwrap(), 1068);
        r.read_exact(&mut buf[..1]).unwrap();
        assert_eq!(buf[0], (1068 % 256) as u8);
        assert!(r.seek_relative(-5000).is_err());
        assert_eq!(r.stream_position().unwrap(), 1069);
        assert_eq!(r.seek(SeekFrom::End(-10)).unwrap(), 99_990);
        assert_eq!(r.read(&mut buf).unwrap(), 10);
        assert_eq!(r.read(&mut buf).unwrap(), 0);
        assert_eq!(r.stream_position().unwrap(), 100_000);
        assert_eq!(r.inner.stream_position().unwrap(), 100_000);
    }

    /// Found by the gguf fuzz target: `general.alignment = 0` (a u8 here) made candle's reader
    /// divide by zero, a panic in `model inspect` and `init` instead of an error.
    const ALIGNMENT_ZERO: [u8; 125] = [
        0x47, 0x47, 0x55, 0x46, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x67, 0x65, 0x6e, 0x65, 0x72, 0x61, 0x6c, 0x2e, 0x61, 0x6c, 0x69, 0x67, 0x6e,
        0x6d, 0x65, 0x6e, 0x74, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x40, 0x0c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x67, 0x65, 0x6e, 0x65, 0x72,
        0x61, 0x6c, 0x2e, 0x6e, 0x61, 0x6d, 0x65, 0x08, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x78,
    ];

    fn open(bytes: &[u8]) -> Result<GgufFile> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, bytes).unwrap();
        GgufFile::open_unverified(&path)
    }

    /// A GGUF v3 file with no tensors and one metadata entry, `general.alignment`, as a u32.
    fn with_alignment(a: u32) -> Vec<u8> {
        let mut f = b"GGUF".to_vec();
        f.extend_from_slice(&3u32.to_le_bytes());
        f.extend_from_slice(&0u64.to_le_bytes());
        f.extend_from_slice(&1u64.to_le_bytes());
        f.extend_from_slice(&17u64.to_le_bytes());
        f.extend_from_slice(b"general.alignment");
        f.extend_from_slice(&4u32.to_le_bytes());
        f.extend_from_slice(&a.to_le_bytes());
        f
    }

    #[test]
    fn gguf_alignment_zero_is_an_error_naming_the_key() {
        let err = open(&ALIGNMENT_ZERO).err().expect("alignment 0 refused");
        assert!(
            format!("{err:#}").contains("general.alignment is 0"),
            "{err:#}"
        );
        for bad in [0, 3, 48, u32::MAX] {
            let err = open(&with_alignment(bad)).err().expect("refused");
            assert!(format!("{err:#}").contains("general.alignment"), "{err:#}");
        }
        // Found by the gguf fuzz target after the first fix: the key with trailing NULs
        // (candle drops them), and a repeated key (candle keeps the last).
        let mut nul_key = with_alignment(0);
        nul_key[24..32].copy_from_slice(&21u64.to_le_bytes());
        nul_key.splice(49..49, [0u8; 4]);
        let err = open(&nul_key)
            .err()
            .expect("trailing NULs do not hide the key");
        assert!(
            format!("{err:#}").contains("general.alignment is 0"),
            "{err:#}"
        );
        let mut twice = with_alignment(32);
        twice[16..24].copy_from_slice(&2u64.to_le_bytes());
        twice.extend_from_slice(&with_alignment(0)[24..]);
        let err = open(&twice).err().expect("the last entry counts");
        assert!(
            format!("{err:#}").contains("general.alignment is 0"),
            "{err:#}"
        );
        for good in [1, 32, 1 << 31] {
            let g = open(&with_alignment(good)).unwrap();
            assert_eq!(g.content.tensor_data_offset % u64::from(good), 0);
        }
    }
}
