//! Read leases on model files (`fcntl(F_SETLEASE, F_RDLCK)`): the kernel's own word on
//! whether any process had a model file open for writing while the server read it.
//!
//! A read lease cannot be taken while the file is open for writing anywhere, and a shared
//! writable mapping keeps its file open for writing after its descriptor is closed: so a file
//! that some process could still change in place is refused at the opening. Once taken, the
//! lease is broken by any later opening for writing (or truncation), by any process, and
//! `F_GETLEASE` then no longer answers `F_RDLCK`: the [`super::file::Tripwire`] asks it at the
//! end of the load. That covers what the file's times cannot show (stores through a mapping,
//! writes within one timestamp tick). A writer that does not ask for non-blocking I/O waits
//! until the load is over (the descriptors close, and the lease with them) or
//! `fs.lease-break-time` (45 s by default) has passed.
//!
//! A lease is asked for only on the local filesystems of [`LOCAL_FILESYSTEMS`], where every
//! opening goes through this kernel: on a network or FUSE filesystem other hosts (or the FUSE
//! server) write without it seeing, and NFS and SMB refuse a lease with the very EAGAIN that
//! means "open for writing" here. The kernel grants one only to the file's owner or a holder
//! of `CAP_LEASE`. Where there is no lease, the file is watched by its size and times alone,
//! and the log says why (at warning level, unless the file's mount is read-only).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use anyhow::{Result, bail};

/// Whether a file is held under a read lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadLease {
    Held,
    /// None was taken (the reason, for the log), but the file's mount is read-only, so nothing
    /// writes to it through that mount (the NixOS store, served by an unprivileged user).
    NoneOnReadOnlyMount(&'static str),
    /// None was taken (the reason, for the log).
    Unavailable(&'static str),
}

/// How long a file may look open for writing before it is refused. A process that forks while
/// it holds a writable descriptor (any program that writes a file and starts another) leaves
/// the child a copy until the child's exec or exit closes it, a few milliseconds: that is not
/// a writer of the model, and a writer that is stays open past this.
const WRITER_GRACE: Duration = Duration::from_millis(500);
const WRITER_POLL: Duration = Duration::from_millis(25);

/// Filesystems (`statfs` magic numbers) on which every opening of a file goes through this
/// kernel, so a lease sees every writer: the only ones a lease is asked for on.
const LOCAL_FILESYSTEMS: &[(i64, &str)] = &[
    (libc::EXT4_SUPER_MAGIC, "ext2, ext3, ext4"),
    (0x5846_5342, "xfs (XFS_SUPER_MAGIC)"),
    (libc::BTRFS_SUPER_MAGIC, "btrfs"),
    (libc::F2FS_SUPER_MAGIC, "f2fs"),
    (libc::BCACHEFS_SUPER_MAGIC, "bcachefs"),
    (0x2fc1_2fc1, "zfs (OpenZFS's ZFS_SUPER_MAGIC)"),
    (libc::TMPFS_MAGIC, "tmpfs"),
    (
        libc::OVERLAYFS_SUPER_MAGIC,
        "overlayfs, a container's root: openings through the overlay; its lower layers are \
         read-only",
    ),
    (0x7371_7368, "squashfs (SQUASHFS_MAGIC), read-only images"),
];

fn is_local(magic: i64) -> bool {
    LOCAL_FILESYSTEMS.iter().any(|(m, _)| *m == magic)
}

/// The filesystem under `file`: its magic number, and whether its mount is read-only.
fn filesystem(file: &File, path: &Path) -> Result<(i64, bool)> {
    // SAFETY: zeroed statfs and statvfs are valid buffers for the kernel to fill; the
    // descriptor is this `File`'s own.
    let (fs, vfs) = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        let mut vfs: libc::statvfs = std::mem::zeroed();
        let fd = file.as_raw_fd();
        if libc::fstatfs(fd, &mut fs) != 0 || libc::fstatvfs(fd, &mut vfs) != 0 {
            bail!(
                "reading the filesystem of model file {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        (fs, vfs)
    };
    Ok((fs.f_type, vfs.f_flag & libc::ST_RDONLY != 0))
}

/// Take a read lease on `file`, which was opened read-only from `path`. Fails naming the file
/// when some process has it open for writing or mapped writable.
pub fn take(file: &File, path: &Path) -> Result<ReadLease> {
    let (magic, read_only) = filesystem(file, path)?;
    if !is_local(magic) {
        // A read-only mount of a network filesystem says nothing of its server's writers.
        return Ok(ReadLease::Unavailable(
            "not a local filesystem: a lease there would not see every writer",
        ));
    }
    let none = |why| {
        Ok(if read_only {
            ReadLease::NoneOnReadOnlyMount(why)
        } else {
            ReadLease::Unavailable(why)
        })
    };
    ignore_lease_break_signal();
    let mut waited = Duration::ZERO;
    let err = loop {
        // SAFETY: fcntl on a descriptor this `File` owns; F_SETLEASE takes an int argument.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
        if rc == 0 {
            return Ok(ReadLease::Held);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EAGAIN) || waited >= WRITER_GRACE {
            break err;
        }
        std::thread::sleep(WRITER_POLL);
        waited += WRITER_POLL;
    };
    none(match err.raw_os_error() {
        Some(libc::EAGAIN) => bail!(
            "model file {} is open for writing (or mapped writable) by some process, so it \
             could change while it is hashed and read; refusing to load it: stop that \
             writer, or serve a copy no one writes",
            path.display()
        ),
        Some(libc::EACCES) => {
            "the server's user neither owns the file nor has CAP_LEASE (or a security module \
             refused the lease)"
        }
        Some(libc::EINVAL) => "its filesystem grants no leases (or fs.leases-enable is 0)",
        _ => "the kernel refused it",
    })
}

/// Whether the lease taken on `file` was broken (by an opening for writing or a truncation)
/// since [`take`] returned [`ReadLease::Held`].
pub fn broken(file: &File, path: &Path) -> Result<bool> {
    // SAFETY: fcntl on a descriptor this `File` owns; F_GETLEASE takes no argument.
    let lease = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLEASE) };
    if lease < 0 {
        bail!(
            "asking the kernel whether the read lease on model file {} is intact: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    // While a break is pending F_GETLEASE answers the type the lease is going to (F_UNLCK for
    // a read lease), and once it is over, F_UNLCK.
    Ok(lease != libc::F_RDLCK)
}

/// The kernel tells a lease holder of a break with SIGIO, whose default action ends the
/// process. The server never handles it: the break is read from `F_GETLEASE` instead, and an
/// ignored SIGIO leaves the breaker waiting for the lease to be released, as intended.
fn ignore_lease_break_signal() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
        unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
    });
}

/// Another process opens `path` for writing, without blocking, as a writer of the model file
/// would (it is refused while the break is pending, but the break is made); fails the test if
/// the opening succeeded, that is if no lease held the writer off.
#[cfg(test)]
pub(super) fn open_for_writing_in_a_child(path: &Path) {
    let out = std::process::Command::new("dd")
        .arg("if=/dev/null")
        .arg(format!("of={}", path.display()))
        .args(["oflag=nonblock", "conv=notrunc", "status=none"])
        .output()
        .unwrap();
    // dd fails to open it (EWOULDBLOCK while the break is pending).
    assert!(
        !out.status.success(),
        "the lease did not hold the writer off: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;
    use std::process::Command;

    fn file_of(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    #[test]
    fn leases_are_asked_for_on_local_filesystems_only() {
        assert!(is_local(libc::EXT4_SUPER_MAGIC));
        assert!(is_local(libc::TMPFS_MAGIC));
        // NFS and SMB answer EAGAIN when they hold no delegation or oplock, which would read
        // as "open for writing"; FUSE's server writes where the kernel does not see.
        for remote in [
            libc::NFS_SUPER_MAGIC,
            libc::SMB_SUPER_MAGIC,
            libc::FUSE_SUPER_MAGIC,
        ] {
            assert!(!is_local(remote), "{remote:#x}");
        }
    }

    #[test]
    fn the_test_directory_is_on_a_local_filesystem() {
        // Otherwise every test below would pass for want of a lease, proving nothing.
        let (_dir, path) = file_of(b"weights");
        let (magic, _) = filesystem(&File::open(&path).unwrap(), &path).unwrap();
        assert!(is_local(magic), "{magic:#x}");
    }

    #[test]
    fn an_untouched_file_keeps_its_lease() {
        let (_dir, path) = file_of(b"weights");
        let file = File::open(&path).unwrap();
        assert_eq!(take(&file, &path).unwrap(), ReadLease::Held);
        // Other readers do not break a read lease.
        std::fs::read(&path).unwrap();
        assert!(!broken(&file, &path).unwrap());
    }

    #[test]
    fn another_process_opening_it_for_writing_breaks_the_lease() {
        let (_dir, path) = file_of(b"weights");
        let file = File::open(&path).unwrap();
        assert_eq!(take(&file, &path).unwrap(), ReadLease::Held);
        open_for_writing_in_a_child(&path);
        assert!(broken(&file, &path).unwrap());
        // The signal the kernel sent for the break did not end this process.
    }

    #[test]
    fn a_file_mapped_writable_beforehand_is_refused_naming_it() {
        let (_dir, path) = file_of(&[0u8; 4096]);
        let w = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // SAFETY: a fresh shared mapping of a 4 KiB file this test owns, unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                w.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        // The descriptor is gone; the mapping still writes to the file.
        drop(w);
        let file = File::open(&path).unwrap();
        let err = take(&file, &path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(
            err.contains("open for writing (or mapped writable)"),
            "{err}"
        );
        // SAFETY: the mapping made above, of that length.
        unsafe { libc::munmap(map, 4096) };
        assert_eq!(take(&file, &path).unwrap(), ReadLease::Held);
    }

    #[test]
    fn a_file_another_process_holds_open_for_writing_is_refused() {
        let (_dir, path) = file_of(b"weights");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec 3>>"$1"; echo open; read _"#)
            .arg("sh")
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "open\n");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let err = take(&file, &path).unwrap_err().to_string();
        drop(child.stdin.take());
        child.wait().unwrap();
        assert!(err.contains("open for writing"), "{err}");
    }
}
