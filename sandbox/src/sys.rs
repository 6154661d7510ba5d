//! The raw system calls for privileges, in one place. Every `unsafe` block of the crate is here.

use std::ffi::CString;
use std::io;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Highest capability number the kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Remove every capability from the bounding set (needs CAP_SETPCAP for any still present).
pub fn drop_bounding_set() -> io::Result<()> {
    for cap in 0..=last_cap() {
        // SAFETY: PR_CAPBSET_READ takes an integer argument and touches no memory.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if present == 1 {
            // SAFETY: as above; PR_CAPBSET_DROP takes an integer argument.
            check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) })?;
        }
    }
    Ok(())
}

/// Clear the ambient capability set.
pub fn clear_ambient() -> io::Result<()> {
    // SAFETY: integer arguments only.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    })
}

/// Switch to `uid`/`gid` for good: supplementary groups cleared, real, effective and saved ids.
pub fn switch_user(uid: u32, gid: u32) -> io::Result<()> {
    // INVARIANT: groups, then gid, then uid: after setresuid the process may no longer change
    // its groups.
    // SAFETY: an empty list with a null pointer is valid for setgroups.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::setresuid(uid, uid, uid) })
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Empty the effective, permitted and inheritable sets of the calling thread.
pub fn clear_capabilities() -> io::Result<()> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: header and data are valid, properly laid out (v3 takes two data structs), and
    // outlive the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        ) as libc::c_int
    })
}

/// Set `no_new_privs`: no exec can ever gain privileges again.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
}

/// The effective user id.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Resolve a user name (or numeric id) and a group name (or id) to ids.
pub fn resolve_user(user: &str, group: &str) -> io::Result<(u32, u32)> {
    let uid = match user.parse::<u32>() {
        Ok(n) => n,
        Err(_) => {
            let name =
                CString::new(user).map_err(|_| io::Error::other("user name has a NUL byte"))?;
            // SAFETY: name is a valid C string; getpwnam's result is read at once, before any
            // other call that could overwrite its static buffer (single-threaded start-up).
            let pw = unsafe { libc::getpwnam(name.as_ptr()) };
            if pw.is_null() {
                return Err(io::Error::other(format!("no user named {user:?}")));
            }
            // SAFETY: pw is non-null and points to a valid passwd record.
            unsafe { (*pw).pw_uid }
        }
    };
    let gid = match group.parse::<u32>() {
        Ok(n) => n,
        Err(_) => {
            let name =
                CString::new(group).map_err(|_| io::Error::other("group name has a NUL byte"))?;
            // SAFETY: as for getpwnam above.
            let gr = unsafe { libc::getgrnam(name.as_ptr()) };
            if gr.is_null() {
                return Err(io::Error::other(format!("no group named {group:?}")));
            }
            // SAFETY: gr is non-null and points to a valid group record.
            unsafe { (*gr).gr_gid }
        }
    };
    Ok((uid, gid))
}

/// The kernel's Landlock ABI (0: unsupported).
pub fn landlock_abi() -> i32 {
    // SAFETY: landlock_create_ruleset with a null attribute, size 0 and the VERSION flag only
    // returns the ABI number; it reads no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    if v < 0 { 0 } else { v as i32 }
}

/// Install the SIGSYS handler that reports a seccomp violation before the process dies.
///
/// With the filters' mismatch action set to trap, a forbidden system call raises SIGSYS in the
/// thread that made it instead of killing the process at once. The handler writes one line to
/// stderr naming the call, then makes the process die of SIGSYS exactly as the kill action
/// would have (default disposition restored, signal unblocked, then `ptrace`, which no
/// allowlist has: the filter traps it and the default action ends the process; repeating the
/// original call would not do, as its arguments are gone and another form of it may be
/// allowed). It uses only `write`, `rt_sigaction` and `rt_sigprocmask`, which every thread's
/// allowlist has.
pub fn install_sigsys_reporter() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid value to fill in; the handler is an
    // `extern "C" fn(c_int, *mut siginfo_t, *mut c_void)` as SA_SIGINFO requires, and it
    // calls only async-signal-safe system calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = report_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        check(libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()))
    }
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` (Linux, 64-bit): the union starts at 16,
/// after the `si_call_addr` pointer comes the system call number.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn report_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; for SIGSYS the
    // system call number sits at SI_SYSCALL_OFFSET (include/uapi/asm-generic/siginfo.h).
    let nr = unsafe {
        *(info as *const u8)
            .add(SI_SYSCALL_OFFSET)
            .cast::<libc::c_int>()
    };
    let mut line = [0u8; 160];
    let mut len = 0;
    let mut digits = [0u8; 12];
    let number = itoa(nr, &mut digits);
    for part in [
        &b"bulwark: seccomp: system call "[..],
        number,
        b" (",
        crate::seccomp::syscall_name(i64::from(nr)).as_bytes(),
        b") is not in this thread's allowlist; the process ends\n",
    ] {
        let n = part.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: plain system calls on memory this function owns; SIG_DFL is a valid disposition.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        // In no allowlist (a test checks), so trapped before it can run: this time SIGSYS
        // ends the process.
        libc::syscall(libc::SYS_ptrace, 0, 0, 0, 0);
    }
}

/// Decimal digits of `n` without allocating (async-signal-safe).
fn itoa(n: libc::c_int, buf: &mut [u8; 12]) -> &[u8] {
    let mut i = buf.len();
    let neg = n < 0;
    let mut v = i64::from(n).unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if neg {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}
