//! A model file held open by descriptor: opened with the privileges the server started with,
//! hashed and parsed through the descriptor after confinement.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
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
    pub(super) file: File,
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
    pub fn sha256(&mut self) -> Result<crate::digest::Sha256> {
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
        Ok(crate::digest::Sha256(hasher.finalize().into()))
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

    /// Length in bytes.
    pub fn byte_len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .with_context(|| format!("reading the metadata of {}", self.path.display()))?
            .len())
    }

    /// `len` bytes from `offset` (seek and read: the sandbox allows no `pread`).
    pub fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.read_exact(&mut buf).with_context(|| {
            format!("reading {len} bytes at {offset} of {}", self.path.display())
        })?;
        Ok(buf)
    }

    /// The whole file when it is at most `max` bytes (JSON files of a model directory).
    pub fn read_all(&mut self, max: u64) -> Result<Vec<u8>> {
        let len = self.byte_len()?;
        ensure!(
            len <= max,
            "{} is {len} bytes, more than the {max} allowed for it",
            self.path.display()
        );
        self.read_at(0, len as usize)
    }
}

/// SHA-256 of a regular file.
pub fn sha256_file(path: &Path) -> Result<crate::digest::Sha256> {
    ModelFile::open(path)?.sha256()
}
