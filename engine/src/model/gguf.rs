//! GGUF files: the pinned-hash check, the header, and typed access to metadata.
//!
//! Order matters here: the SHA-256 of the whole file is computed and compared with the pinned
//! value *before* a single byte of it is parsed, so a tampered file never reaches the GGUF,
//! tokenizer or template parsers.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use sha2::{Digest, Sha256};

/// Read buffer for hashing: large enough that hashing a 100 MB file is I/O bound.
const HASH_CHUNK_BYTES: usize = 1 << 20;

/// A model file opened for reading: a regular file (never a FIFO, a device or a directory,
/// which would hang or never end), held open by descriptor.
///
/// The server opens it before it drops privileges and confines itself, then hashes and parses
/// it through this descriptor: the file's parent directories may be closed to the unprivileged
/// user (a clone in /root), and Landlock needs no rule for it at all.
pub struct ModelFile {
    pub path: PathBuf,
    file: File,
}

impl ModelFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::files::open_regular(path, "model file")?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    /// SHA-256 of the whole file, as lowercase hex; leaves the file positioned at its start.
    pub fn sha256(&mut self) -> Result<String> {
        self.file.seek(SeekFrom::Start(0))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; HASH_CHUNK_BYTES];
        loop {
            let n = self
                .file
                .read(&mut buf)
                .with_context(|| format!("reading {}", self.path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        self.file.seek(SeekFrom::Start(0))?;
        Ok(hex::encode(hasher.finalize()))
    }

    /// Seconds since the epoch of the last modification (the API's `created`), 0 if unknown.
    pub fn modified_secs(&self) -> u64 {
        self.file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs())
    }
}

/// SHA-256 of a regular file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    ModelFile::open(path)?.sha256()
}

/// A GGUF file whose hash matched its pin and whose header parsed.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    /// Hash the file, compare with `expected_sha256`, and only then parse the header.
    pub fn open_pinned(mut file: ModelFile, expected_sha256: &str) -> Result<Self> {
        let actual = file.sha256()?;
        if !actual.eq_ignore_ascii_case(expected_sha256) {
            bail!(
                "model file {} has SHA-256 {actual}, but the configuration pins {expected_sha256} \
                 (model.sha256); refusing to load it",
                file.path.display()
            );
        }
        Self::parse(file)
    }

    /// Parse without a pin: only for `bulwark model inspect`, which never serves.
    pub fn open_unverified(path: &Path) -> Result<Self> {
        Self::parse(ModelFile::open(path)?)
    }

    fn parse(file: ModelFile) -> Result<Self> {
        let ModelFile { path, file } = file;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
        Ok(Self {
            path,
            content,
            reader,
        })
    }

    pub fn tensor(
        &mut self,
        name: &str,
        device: &candle_core::Device,
    ) -> Result<candle_core::quantized::QTensor> {
        self.content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("reading tensor {name} from {}", self.path.display()))
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
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
