//! The seccomp allowlists, as data: one table per thread category, one reason per entry.
//!
//! - [`Category::Process`] is loaded with TSYNC onto every thread once the server is ready to
//!   serve: the network runtime, the inference thread and every thread created later.
//! - [`Category::Compute`] is stacked on top, on the inference thread only (and the compute
//!   pool it starts): it has no network calls at all, so a bug reached through the model code
//!   cannot even accept or send.
//!
//! Filters stack: a call must be allowed by every filter of the thread. The default action is
//! a trap (`SECCOMP_RET_TRAP`): the SIGSYS handler names the call in the log and the process
//! dies of SIGSYS, so a missing entry shows up as a crash in tests rather than as silently
//! weaker confinement.
//!
//! `clone3` passes the allowlist but a second filter answers it with `ENOSYS`: its flags live
//! in a struct that seccomp cannot inspect, and glibc falls back to `clone`, whose flags we can
//! check (threads only, never a new process).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use crate::Error;

// The tables below name system calls by this target's numbers (`libc::SYS_*`) and were
// reviewed, entry by entry, for x86_64: another architecture has other calls (no `open`,
// `poll` or `epoll_wait` on aarch64, say) and needs its own reviewed tables, not a silent port.
#[cfg(not(target_arch = "x86_64"))]
compile_error!(
    "the seccomp allowlists are written and reviewed for x86_64 only: add tables for this \
     architecture (sandbox/src/seccomp.rs) before building for it"
);

/// The architecture the filters are compiled for (the kernel checks it on every call).
const TARGET_ARCH: TargetArch = TargetArch::x86_64;

/// A thread category with its own allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// Every thread of the server.
    Process,
    /// The inference thread and its compute pool.
    Compute,
}

impl Category {
    /// Name for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Compute => "compute",
        }
    }
}

/// A condition on a call's arguments; the call is allowed when it holds.
#[derive(Debug, Clone, Copy)]
pub enum Args {
    /// Any arguments.
    Any,
    /// Argument `arg` (32-bit) equals one of `values`.
    OneOf(u8, &'static [u64]),
    /// Argument `arg` has none of the bits in `mask`.
    NoneOf(u8, u64),
    /// Argument `arg` has every bit in `mask`.
    AllOf(u8, u64),
}

/// One allowlist entry.
#[derive(Debug, Clone, Copy)]
pub struct Allowed {
    /// The system call.
    pub name: &'static str,
    /// Its number on the target architecture.
    pub nr: i64,
    /// When it is allowed.
    pub args: Args,
    /// Why the server needs it.
    pub reason: &'static str,
}

macro_rules! allow {
    ($name:ident, $args:expr, $reason:expr) => {
        Allowed {
            name: stringify!($name),
            nr: libc::$name,
            args: $args,
            reason: $reason,
        }
    };
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
const CLONE_THREAD: u64 = libc::CLONE_THREAD as u64;
const SOCKET_FAMILIES: &[u64] = &[libc::AF_INET as u64, libc::AF_INET6 as u64];
const SOCKETPAIR_FAMILIES: &[u64] = &[libc::AF_UNIX as u64];
/// ioctl requests: set non-blocking (std's `set_nonblocking`), close-on-exec, and the
/// terminal probe that logging makes on stderr.
const IOCTL_REQUESTS: &[u64] = &[libc::FIONBIO, libc::FIOCLEX, libc::TCGETS];
/// prctl options: thread names, and no_new_privs (which seccompiler sets again before every
/// filter it loads; it can only remove privileges).
const PRCTL_OPTIONS: &[u64] = &[
    libc::PR_SET_NAME as u64,
    libc::PR_GET_NAME as u64,
    libc::PR_SET_NO_NEW_PRIVS as u64,
];
/// seccomp operations: adding a filter (it can only narrow what is allowed).
const SECCOMP_OPERATIONS: &[u64] = &[libc::SECCOMP_SET_MODE_FILTER as u64];
/// fcntl commands used on sockets and pipes.
const FCNTL_COMMANDS: &[u64] = &[
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_DUPFD_CLOEXEC as u64,
];
/// fcntl commands on model files: reading a read lease (taking one happens before confinement).
const FCNTL_LEASE_COMMANDS: &[u64] = &[libc::F_GETLEASE as u64];

/// Calls every thread may make (memory, threads, time, signals, exit).
const COMMON: &[Allowed] = &[
    allow!(SYS_brk, Args::Any, "heap growth by the allocator"),
    allow!(
        SYS_mmap,
        Args::NoneOf(2, PROT_EXEC),
        "allocator, thread stacks, tensors; never executable"
    ),
    allow!(SYS_munmap, Args::Any, "allocator frees"),
    allow!(
        SYS_mremap,
        Args::Any,
        "allocator grows large buffers in place"
    ),
    allow!(
        SYS_mprotect,
        Args::NoneOf(2, PROT_EXEC),
        "thread stack guard pages; never executable"
    ),
    allow!(
        SYS_madvise,
        Args::Any,
        "allocator returns memory to the kernel"
    ),
    allow!(
        SYS_futex,
        Args::Any,
        "mutexes, condition variables, thread parking"
    ),
    allow!(
        SYS_sched_yield,
        Args::Any,
        "spin-then-yield in the compute pool"
    ),
    allow!(
        SYS_sched_getaffinity,
        Args::Any,
        "thread pools size themselves by the CPU mask"
    ),
    allow!(
        SYS_clone,
        Args::AllOf(0, CLONE_THREAD),
        "new threads only (CLONE_THREAD), never processes"
    ),
    allow!(
        SYS_clone3,
        Args::Any,
        "answered ENOSYS by the second filter so glibc falls back to clone"
    ),
    allow!(
        SYS_set_robust_list,
        Args::Any,
        "glibc registers each new thread's robust futex list"
    ),
    allow!(
        SYS_rseq,
        Args::Any,
        "glibc registers restartable sequences for each new thread"
    ),
    allow!(
        SYS_gettid,
        Args::Any,
        "thread ids in logs and thread start-up"
    ),
    allow!(
        SYS_getpid,
        Args::Any,
        "glibc and tokio identify the process"
    ),
    allow!(
        SYS_prctl,
        Args::OneOf(0, PRCTL_OPTIONS),
        "naming threads; no_new_privs before stacking a filter"
    ),
    allow!(
        SYS_seccomp,
        Args::OneOf(0, SECCOMP_OPERATIONS),
        "the inference thread stacks its narrower filter"
    ),
    allow!(SYS_exit, Args::Any, "a thread ends"),
    allow!(SYS_exit_group, Args::Any, "the process ends"),
    allow!(
        SYS_clock_gettime,
        Args::Any,
        "time, when the vDSO falls back to the kernel"
    ),
    allow!(
        SYS_clock_nanosleep,
        Args::Any,
        "sleeps in the runtime and pools"
    ),
    allow!(SYS_nanosleep, Args::Any, "sleeps in the runtime and pools"),
    allow!(SYS_getrandom, Args::Any, "request ids and sampling seeds"),
    allow!(
        SYS_rt_sigaction,
        Args::Any,
        "signal handlers (SIGTERM, SIGINT)"
    ),
    allow!(
        SYS_rt_sigprocmask,
        Args::Any,
        "glibc blocks signals while creating threads"
    ),
    allow!(
        SYS_rt_sigreturn,
        Args::Any,
        "returning from a signal handler"
    ),
    allow!(
        SYS_sigaltstack,
        Args::Any,
        "Rust's stack-overflow handler on each thread"
    ),
    allow!(
        SYS_write,
        Args::Any,
        "logs to stderr, wake-up of event loops"
    ),
    allow!(SYS_writev, Args::Any, "logs to stderr"),
    allow!(
        SYS_close,
        Args::Any,
        "closing connections and wake-up descriptors"
    ),
    allow!(
        SYS_openat,
        Args::Any,
        "the compute pool probes /sys for CPU topology; Landlock answers EACCES"
    ),
];

/// Calls only the network side makes.
const NETWORK: &[Allowed] = &[
    allow!(
        SYS_read,
        Args::Any,
        "reading connections and wake-up descriptors"
    ),
    allow!(SYS_readv, Args::Any, "reading connections"),
    allow!(SYS_recvfrom, Args::Any, "reading connections"),
    allow!(SYS_recvmsg, Args::Any, "reading connections"),
    allow!(SYS_sendto, Args::Any, "writing connections"),
    allow!(SYS_sendmsg, Args::Any, "writing connections"),
    allow!(
        SYS_accept4,
        Args::Any,
        "accepting connections on the listeners bound before confinement"
    ),
    allow!(
        SYS_socket,
        Args::OneOf(0, SOCKET_FAMILIES),
        "TCP connections to peers (Landlock limits the ports)"
    ),
    allow!(
        SYS_connect,
        Args::Any,
        "connecting to peers (Landlock limits the ports)"
    ),
    allow!(
        SYS_socketpair,
        Args::OneOf(0, SOCKETPAIR_FAMILIES),
        "the runtime's signal wake-up pair"
    ),
    allow!(
        SYS_shutdown,
        Args::Any,
        "closing the write side of a connection"
    ),
    allow!(SYS_getsockname, Args::Any, "local address of a connection"),
    allow!(SYS_getpeername, Args::Any, "peer address of a connection"),
    allow!(
        SYS_setsockopt,
        Args::Any,
        "TCP_NODELAY on accepted connections"
    ),
    allow!(
        SYS_getsockopt,
        Args::Any,
        "SO_ERROR after a non-blocking connect"
    ),
    allow!(SYS_epoll_create1, Args::Any, "the runtime's event loop"),
    allow!(
        SYS_epoll_ctl,
        Args::Any,
        "registering connections with the event loop"
    ),
    allow!(SYS_epoll_wait, Args::Any, "waiting for events"),
    allow!(SYS_epoll_pwait, Args::Any, "waiting for events"),
    allow!(SYS_eventfd2, Args::Any, "waking the event loop"),
    allow!(
        SYS_ioctl,
        Args::OneOf(1, IOCTL_REQUESTS),
        "non-blocking and close-on-exec flags; terminal probe"
    ),
    allow!(
        SYS_fcntl,
        Args::OneOf(1, FCNTL_COMMANDS),
        "descriptor flags"
    ),
    allow!(
        SYS_fcntl,
        Args::OneOf(1, FCNTL_LEASE_COMMANDS),
        "whether a model file's read lease was broken while the model was loaded"
    ),
    allow!(SYS_pipe2, Args::Any, "the runtime's wake-up pipe"),
    allow!(
        SYS_tgkill,
        Args::Any,
        "signals to the server's own threads (Landlock scopes signals)"
    ),
    allow!(
        SYS_statx,
        Args::Any,
        "std inspects descriptors; Landlock denies any path"
    ),
    allow!(
        SYS_newfstatat,
        Args::Any,
        "std inspects descriptors; Landlock denies any path"
    ),
    allow!(SYS_fstat, Args::Any, "std inspects descriptors"),
    allow!(
        SYS_lseek,
        Args::Any,
        "std positions reads of /proc files (denied by Landlock anyway)"
    ),
    allow!(SYS_poll, Args::Any, "std waits on a descriptor"),
    allow!(SYS_ppoll, Args::Any, "std waits on a descriptor"),
];

/// GPU additions: the NVIDIA driver's ioctls and device files (run on an H100 with driver 580).
const GPU: &[Allowed] = &[
    allow!(
        SYS_ioctl,
        Args::Any,
        "CUDA driver ioctls on /dev/nvidia* (Landlock limits the files); run on an H100, driver 580"
    ),
    allow!(
        SYS_openat,
        Args::Any,
        "the CUDA driver opens /dev/nvidia* lazily; run on an H100, driver 580"
    ),
    allow!(
        SYS_read,
        Args::Any,
        "the CUDA driver reads its device files; run on an H100, driver 580"
    ),
];

/// The allowlist of a category.
pub fn allowlist(category: Category, gpu: bool) -> Vec<Allowed> {
    let mut v: Vec<Allowed> = COMMON.to_vec();
    if category == Category::Process {
        v.extend_from_slice(NETWORK);
    }
    if gpu {
        v.extend_from_slice(GPU);
    }
    v
}

fn rules_for(
    entries: &[Allowed],
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut unconditional = std::collections::BTreeSet::new();
    for e in entries {
        let rules: Vec<SeccompRule> = match e.args {
            Args::Any => {
                unconditional.insert(e.nr);
                Vec::new()
            }
            Args::OneOf(arg, values) => values
                .iter()
                .map(|v| {
                    SeccompRule::new(vec![SeccompCondition::new(arg, Len::Dword, Op::Eq, *v)?])
                })
                .collect::<Result<_, _>>()?,
            Args::NoneOf(arg, mask) => {
                vec![SeccompRule::new(vec![SeccompCondition::new(
                    arg,
                    Len::Qword,
                    Op::MaskedEq(mask),
                    0,
                )?])?]
            }
            Args::AllOf(arg, mask) => {
                vec![SeccompRule::new(vec![SeccompCondition::new(
                    arg,
                    Len::Qword,
                    Op::MaskedEq(mask),
                    mask,
                )?])?]
            }
        };
        map.entry(e.nr).or_default().extend(rules);
    }
    // An unconditional entry (e.g. from the GPU table) wins over conditional ones.
    for nr in unconditional {
        map.insert(nr, Vec::new());
    }
    Ok(map)
}

/// Compile a category's allowlist to BPF.
pub fn compile(category: Category, gpu: bool, log_only: bool) -> Result<BpfProgram, Error> {
    let wrap = |source| Error::SeccompCompile {
        category: category.name(),
        source,
    };
    let rules = rules_for(&allowlist(category, gpu)).map_err(wrap)?;
    // Trap, not kill: the SIGSYS handler (`sys::install_sigsys_reporter`) names the call in
    // the log, then the process dies of SIGSYS as it would have. A new toolchain that makes a
    // new system call is then diagnosable from the log alone.
    let mismatch = if log_only {
        SeccompAction::Log
    } else {
        SeccompAction::Trap
    };
    let filter =
        SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TARGET_ARCH).map_err(wrap)?;
    filter.try_into().map_err(wrap)
}

/// The name of a system call, for the SIGSYS report: the calls of every allowlist and those a
/// toolchain or library bump most plausibly adds. Anything else is reported by number.
pub fn syscall_name(nr: i64) -> &'static str {
    macro_rules! names {
        ($($n:ident),* $(,)?) => {
            $(if nr == libc::$n { return &stringify!($n)[4..]; })*
        };
    }
    names!(
        SYS_read,
        SYS_write,
        SYS_open,
        SYS_close,
        SYS_stat,
        SYS_fstat,
        SYS_lstat,
        SYS_poll,
        SYS_lseek,
        SYS_mmap,
        SYS_mprotect,
        SYS_munmap,
        SYS_brk,
        SYS_rt_sigaction,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_ioctl,
        SYS_pread64,
        SYS_pwrite64,
        SYS_readv,
        SYS_writev,
        SYS_access,
        SYS_pipe,
        SYS_select,
        SYS_sched_yield,
        SYS_mremap,
        SYS_madvise,
        SYS_dup,
        SYS_dup2,
        SYS_nanosleep,
        SYS_getpid,
        SYS_socket,
        SYS_connect,
        SYS_accept,
        SYS_sendto,
        SYS_recvfrom,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_shutdown,
        SYS_bind,
        SYS_listen,
        SYS_getsockname,
        SYS_getpeername,
        SYS_socketpair,
        SYS_setsockopt,
        SYS_getsockopt,
        SYS_clone,
        SYS_fork,
        SYS_vfork,
        SYS_execve,
        SYS_exit,
        SYS_wait4,
        SYS_kill,
        SYS_uname,
        SYS_fcntl,
        SYS_flock,
        SYS_fsync,
        SYS_getcwd,
        SYS_chdir,
        SYS_rename,
        SYS_mkdir,
        SYS_rmdir,
        SYS_unlink,
        SYS_readlink,
        SYS_chmod,
        SYS_chown,
        SYS_umask,
        SYS_getrlimit,
        SYS_getrusage,
        SYS_sysinfo,
        SYS_ptrace,
        SYS_getuid,
        SYS_getgid,
        SYS_setuid,
        SYS_setgid,
        SYS_geteuid,
        SYS_getegid,
        SYS_getppid,
        SYS_setsid,
        SYS_capget,
        SYS_capset,
        SYS_sigaltstack,
        SYS_prctl,
        SYS_arch_prctl,
        SYS_setrlimit,
        SYS_mount,
        SYS_umount2,
        SYS_gettid,
        SYS_futex,
        SYS_sched_getaffinity,
        SYS_sched_setaffinity,
        SYS_epoll_create,
        SYS_getdents64,
        SYS_set_tid_address,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_exit_group,
        SYS_epoll_wait,
        SYS_epoll_ctl,
        SYS_tgkill,
        SYS_openat,
        SYS_mkdirat,
        SYS_newfstatat,
        SYS_unlinkat,
        SYS_readlinkat,
        SYS_faccessat,
        SYS_pselect6,
        SYS_ppoll,
        SYS_set_robust_list,
        SYS_get_robust_list,
        SYS_epoll_pwait,
        SYS_eventfd2,
        SYS_epoll_create1,
        SYS_pipe2,
        SYS_prlimit64,
        SYS_getrandom,
        SYS_memfd_create,
        SYS_bpf,
        SYS_execveat,
        SYS_statx,
        SYS_rseq,
        SYS_clone3,
        SYS_faccessat2,
        SYS_accept4,
        SYS_seccomp,
        SYS_landlock_create_ruleset,
        SYS_landlock_add_rule,
        SYS_landlock_restrict_self,
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_unshare,
        SYS_setns,
        SYS_pidfd_open,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_keyctl,
        SYS_add_key,
        SYS_request_key,
        SYS_init_module,
        SYS_finit_module,
        SYS_perf_event_open,
        SYS_sched_getparam,
        SYS_sched_setscheduler,
        SYS_sched_getscheduler,
        SYS_membarrier,
        SYS_mlock,
        SYS_munlock,
        SYS_getpriority,
        SYS_setpriority,
        SYS_timerfd_create,
        SYS_signalfd4,
        SYS_inotify_init1,
        SYS_fadvise64,
        SYS_copy_file_range,
        SYS_sendfile,
        SYS_splice,
        SYS_userfaultfd,
    );
    "unknown"
}

/// The second filter: `clone3` answers ENOSYS (see the module docs).
pub fn compile_clone3_fallback() -> Result<BpfProgram, Error> {
    let wrap = |source| Error::SeccompCompile {
        category: "clone3",
        source,
    };
    let mut rules = BTreeMap::new();
    rules.insert(libc::SYS_clone3, Vec::new());
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TARGET_ARCH,
    )
    .map_err(wrap)?;
    filter.try_into().map_err(wrap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(c: Category) -> Vec<&'static str> {
        let mut v: Vec<&str> = allowlist(c, false)
            .iter()
            .map(|a| a.name.trim_start_matches("SYS_"))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Any change to the allowlists shows up here, in review.
    #[test]
    fn allowlist_snapshot() {
        assert_eq!(
            names(Category::Compute).join(" "),
            "brk clock_gettime clock_nanosleep clone clone3 close exit exit_group futex getpid getrandom gettid madvise mmap mprotect mremap munmap nanosleep openat prctl rseq rt_sigaction rt_sigprocmask rt_sigreturn sched_getaffinity sched_yield seccomp set_robust_list sigaltstack write writev"
        );
        assert_eq!(
            names(Category::Process).join(" "),
            "accept4 brk clock_gettime clock_nanosleep clone clone3 close connect epoll_create1 epoll_ctl epoll_pwait epoll_wait eventfd2 exit exit_group fcntl fstat futex getpeername getpid getrandom getsockname getsockopt gettid ioctl lseek madvise mmap mprotect mremap munmap nanosleep newfstatat openat pipe2 poll ppoll prctl read readv recvfrom recvmsg rseq rt_sigaction rt_sigprocmask rt_sigreturn sched_getaffinity sched_yield seccomp sendmsg sendto set_robust_list setsockopt shutdown sigaltstack socket socketpair statx tgkill write writev"
        );
    }

    #[test]
    fn every_entry_has_a_reason() {
        for c in [Category::Process, Category::Compute] {
            for a in allowlist(c, true) {
                assert!(a.reason.len() > 10, "{} has no reason", a.name);
            }
        }
    }

    #[test]
    fn dangerous_calls_are_absent() {
        let all = names(Category::Process);
        for forbidden in [
            "execve",
            "execveat",
            "ptrace",
            "mount",
            "bpf",
            "unshare",
            "setns",
            "init_module",
            "finit_module",
            "add_key",
            "keyctl",
            "request_key",
            "bind",
            "listen",
            "fork",
            "vfork",
            "kill",
            "process_vm_writev",
            "perf_event_open",
            "userfaultfd",
            "io_uring_setup",
        ] {
            assert!(!all.contains(&forbidden), "{forbidden} must not be allowed");
        }
    }

    #[test]
    fn every_allowed_call_has_a_name_for_the_report() {
        for c in [Category::Process, Category::Compute] {
            for a in allowlist(c, true) {
                assert_ne!(syscall_name(a.nr), "unknown", "{}", a.name);
            }
        }
        assert_eq!(syscall_name(libc::SYS_lseek), "lseek");
        assert_eq!(syscall_name(libc::SYS_execve), "execve");
    }

    #[test]
    fn filters_compile() {
        for c in [Category::Process, Category::Compute] {
            assert!(!compile(c, false, false).unwrap().is_empty());
            assert!(!compile(c, true, false).unwrap().is_empty());
        }
        assert!(!compile_clone3_fallback().unwrap().is_empty());
    }
}
