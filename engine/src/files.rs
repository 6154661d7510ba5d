//! Reading files named in the configuration or on the command line: only regular files, opened
//! so that a FIFO cannot block the open, and read with a size cap, so that a keys file that is a
//! FIFO, a character device or `/dev/zero` gets an error naming it instead of a hang or an
//! exhausted memory.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result, ensure};

/// Largest configuration, keys, certificate or key file read (they are a few kilobytes).
pub const MAX_SMALL_FILE_BYTES: u64 = 1 << 20;

/// Open `path` for reading; refuse anything but a regular file.
pub fn open_regular(path: &Path, what: &str) -> Result<File> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer. It has no
    // effect on reads from a regular file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening {what} {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading the metadata of {}", path.display()))?;
    ensure!(
        meta.is_file(),
        "{what} {} is not a regular file",
        path.display()
    );
    Ok(file)
}

/// The whole text of a small regular file (at most [`MAX_SMALL_FILE_BYTES`]).
pub fn read_small(path: &Path, what: &str) -> Result<String> {
    let file = open_regular(path, what)?;
    let mut text = String::new();
    file.take(MAX_SMALL_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    ensure!(
        text.len() as u64 <= MAX_SMALL_FILE_BYTES,
        "{what} {} is larger than {MAX_SMALL_FILE_BYTES} bytes",
        path.display()
    );
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_fifos_devices_and_directories_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("keys");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path this test owns.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_small(&fifo, "keys file").unwrap_err();
        assert!(format!("{err:#}").contains("not a regular file"), "{err:#}");
        for p in ["/dev/zero", "/dev/null", "/tmp"] {
            assert!(read_small(Path::new(p), "keys file").is_err(), "{p}");
        }
        let f = dir.path().join("ok");
        std::fs::write(&f, "x").unwrap();
        assert_eq!(read_small(&f, "keys file").unwrap(), "x");
    }
}
