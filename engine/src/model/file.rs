//! A model file held open by descriptor: opened with the privileges the server started with,
//! hashed and parsed through the descriptor after confinement, and checked unchanged once the
//! load is over (a [`Tripwire`], with the file's read lease where the kernel grants one).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use sha2::{Digest, Sha256};

use super::lease::{self, ReadLease};

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
    /// Shared with the [`Tripwire`] that checks the file after the load.
    pub(super) file: Arc<File>,
    /// The inode as it was when the file was opened, before it was hashed.
    stamp: Stamp,
    /// Whether the file is held under a read lease ([`ModelFile::open_leased`]).
    leased: bool,
    /// The SHA-256 the whole file had when it was hashed and matched its pin.
    verified: Option<crate::digest::Sha256>,
}

impl ModelFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::files::open_regular(path, "model file")?;
        Self::with_lease(path, file, false)
    }

    /// Open a file that is to be loaded under its pin, and take a read lease on it: refused,
    /// naming the file, when some process has it open for writing or mapped writable; where
    /// the kernel grants no lease, the log says why and the [`Tripwire`] has the file's size
    /// and times alone.
    pub fn open_leased(path: &Path) -> Result<Self> {
        let file = crate::files::open_regular(path, "model file")?;
        // INVARIANT: the lease is taken before the stamp and the hash, so that a writer that
        // comes after both is seen, and a writer from before is refused here.
        let leased = match lease::take(&file, path)? {
            ReadLease::Held => true,
            ReadLease::NoneOnReadOnlyMount(why) => {
                tracing::info!(
                    file = %path.display(),
                    why,
                    "no read lease on the model file, which is on a read-only mount"
                );
                false
            }
            ReadLease::Unavailable(why) => {
                tracing::warn!(
                    file = %path.display(),
                    why,
                    "no read lease on the model file: changes during the load are seen by its \
                     size and times only"
                );
                false
            }
        };
        Self::with_lease(path, file, leased)
    }

    fn with_lease(path: &Path, file: File, leased: bool) -> Result<Self> {
        let stamp = Stamp::of(&file, path)?;
        Ok(Self {
            path: path.to_owned(),
            file: Arc::new(file),
            stamp,
            leased,
            verified: None,
        })
    }

    /// Record that the file's bytes, hashed now, matched the pin `sha`.
    pub(super) fn set_verified(&mut self, sha: crate::digest::Sha256) {
        self.verified = Some(sha);
    }

    /// What a [`Tripwire`] needs to check this file later, through the same descriptor.
    pub(super) fn watch(&self) -> Watched {
        Watched {
            path: self.path.clone(),
            file: Arc::clone(&self.file),
            stamp: self.stamp,
            leased: self.leased,
        }
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

    /// The whole file when it is at most `max` bytes (JSON files of a model directory). For a
    /// verified file these very bytes are hashed again and compared with the pin: what is
    /// parsed is what was pinned, whatever happened to the file since (a shared writable
    /// mapping changes a file without moving its times, see [`Tripwire`]).
    pub fn read_all(&mut self, max: u64) -> Result<Vec<u8>> {
        let len = self.byte_len()?;
        ensure!(
            len <= max,
            "{} is {len} bytes, more than the {max} allowed for it",
            self.path.display()
        );
        let bytes = self.read_at(0, len as usize)?;
        if let Some(want) = self.verified {
            let read = crate::digest::Sha256::of(&bytes);
            ensure!(
                read == want,
                "model file {} changed after it was hashed (its bytes now have SHA-256 {read}, \
                 not the pinned {want}); refusing to parse it",
                self.path.display()
            );
        }
        Ok(bytes)
    }
}

/// What the inode says about a file's contents. A `write` or `truncate` sets the file's mtime
/// and ctime to the current time, and no process without the power to set the system clock
/// can set a ctime back (`utimensat` sets mtime and atime, and moves ctime to now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(file: &File, path: &Path) -> Result<Self> {
        let m = file
            .metadata()
            .with_context(|| format!("reading the metadata of {}", path.display()))?;
        Ok(Self {
            len: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// One file a [`Tripwire`] watches.
pub(super) struct Watched {
    path: PathBuf,
    file: Arc<File>,
    stamp: Stamp,
    leased: bool,
}

/// Checks, once a model is loaded, that none of its files changed after it was opened: the
/// pins were compared with the bytes as they were when hashed, and the parsers read the files
/// again afterwards through the same descriptors, so a file rewritten in between (by anyone
/// with write access to it) would be loaded unpinned.
///
/// A file under a read lease ([`ModelFile::open_leased`]) is refused when the lease was broken,
/// that is when any process opened it for writing during the load, whether or not it wrote;
/// one mapped writable before the opening was refused there. Every file is also refused when
/// its size, mtime or ctime moved. Without a lease (the kernel grants one only to the file's
/// owner or a holder of `CAP_LEASE`, on local filesystems), the times alone cannot see, and so
/// keeping the files writable by no one the server must not trust still matters for (the
/// NixOS module serves them from the read-only store):
/// - stores through a shared writable mapping made before the file was opened: the kernel
///   moves the times when a store dirties a clean page, not at every store, and on tmpfs
///   never again after the first;
/// - a write in the very clock tick of a change made just before the opening (timestamps
///   advance in ticks of a few milliseconds on kernels before 6.13);
/// - filesystems that report times of their own making (FUSE, network filesystems).
///
/// The JSON files of a directory (configuration, tokenizer, chat template) do not depend on
/// it: [`ModelFile::read_all`] hashes the bytes it parses. What it guards is the weights and a
/// GGUF file's header, read in pieces. A change of metadata alone (`chmod`, a new hard link)
/// moves the ctime too, and is refused the same way.
pub struct Tripwire(pub(super) Vec<Watched>);

impl Tripwire {
    /// Fail naming the first file whose read lease was broken, or whose size, mtime or ctime
    /// moved, since it was opened.
    pub fn check(&self) -> Result<()> {
        for w in &self.0 {
            ensure!(
                !(w.leased && lease::broken(&w.file, &w.path)?),
                "model file {} was opened for writing while the model was loaded (the kernel \
                 broke the server's read lease on it); refusing to serve what may not match \
                 its pin",
                w.path.display()
            );
            let now = Stamp::of(&w.file, &w.path)?;
            ensure!(
                now == w.stamp,
                "model file {} changed while the model was loaded (its size or times moved \
                 after it was opened and hashed); refusing to serve what may not match its pin",
                w.path.display()
            );
        }
        Ok(())
    }
}

/// SHA-256 of a regular file.
pub fn sha256_file(path: &Path) -> Result<crate::digest::Sha256> {
    ModelFile::open(path)?.sha256()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    /// Longer than one filesystem timestamp tick (10 ms at HZ=100), so that a write in the
    /// test moves the ctime.
    const PAST_ONE_TICK: Duration = Duration::from_millis(50);

    /// A file of `bytes`, opened, hashed, and watched by a tripwire; then one tick passes.
    fn hashed_and_watched(bytes: &[u8]) -> (tempfile::TempDir, PathBuf, ModelFile, Tripwire) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, bytes).unwrap();
        let mut file = ModelFile::open(&path).unwrap();
        let tripwire = Tripwire(vec![file.watch()]);
        let sha = file.sha256().unwrap();
        file.set_verified(sha);
        std::thread::sleep(PAST_ONE_TICK);
        (dir, path, file, tripwire)
    }

    #[test]
    fn a_file_only_read_passes_the_tripwire() {
        let (_dir, _path, mut file, tripwire) = hashed_and_watched(b"weights");
        assert_eq!(file.read_all(100).unwrap(), b"weights");
        tripwire.check().unwrap();
    }

    #[test]
    fn a_file_rewritten_in_place_after_hashing_trips_it() {
        let (_dir, path, _file, tripwire) = hashed_and_watched(b"weights");
        // Same length, same mtime put back: only the ctime can tell.
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let mut w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        w.write_all(b"WEIGHTS").unwrap();
        w.set_modified(mtime).unwrap();
        drop(w);
        let err = tripwire.check().unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("changed while the model was loaded"), "{err}");
    }

    #[test]
    fn a_leased_file_opened_for_writing_during_the_load_trips_it_though_unwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, b"weights").unwrap();
        let file = ModelFile::open_leased(&path).unwrap();
        let tripwire = Tripwire(vec![file.watch()]);
        tripwire.check().unwrap();
        // Another process opens it for writing and writes nothing: its times do not move, so
        // only the broken lease tells (a store through a mapping it made would be as silent).
        lease::open_for_writing_in_a_child(&path);
        let err = tripwire.check().unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(
            err.contains("opened for writing while the model was loaded"),
            "{err}"
        );
    }

    #[test]
    fn a_file_grown_after_hashing_trips_it() {
        let (_dir, path, _file, tripwire) = hashed_and_watched(b"weights");
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        w.write_all(b" and more").unwrap();
        drop(w);
        let err = tripwire.check().unwrap_err().to_string();
        assert!(err.contains("changed while the model was loaded"), "{err}");
    }

    #[test]
    fn a_verified_file_is_parsed_only_as_it_was_hashed() {
        let (_dir, path, mut file, _tripwire) = hashed_and_watched(b"{\"a\": 1}");
        assert_eq!(file.read_all(100).unwrap(), b"{\"a\": 1}");
        // Rewritten by any means after the hash (here a plain write): the bytes read are
        // hashed again, so no change of times is needed to see it.
        std::fs::write(&path, b"{\"a\": 2}").unwrap();
        let err = file.read_all(100).unwrap_err().to_string();
        assert!(err.contains("changed after it was hashed"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
