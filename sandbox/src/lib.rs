//! Self-confinement for an inference server: a [`Policy`] as plain data, turned into Landlock
//! rules, seccomp filters, `no_new_privs`, emptied capability sets and an unprivileged user,
//! applied in a fixed order, with a [`Status`] that says what the kernel enforced.
//!
//! # Threat model
//! A bug in a parser the server runs on untrusted input (HTTP, JSON, GGUF, tokenizer, chat
//! template) lets an attacker run code inside the process. Once confined, that code can read
//! and write no file, execute no program, bind no new port, connect only to the peer ports in
//! the policy, signal or reach no process outside the sandbox, gain no privilege, and make only
//! the system calls the server itself needs (anything else kills the process).
//!
//! # What is enforced
//! - Landlock (ABI pinned in [`LANDLOCK_ABI`]): every file-system right is handled, so only the
//!   paths listed in [`Policy::fs`] are reachable; TCP bind and connect are handled, so only the
//!   listed ports are; abstract Unix sockets and signals are scoped to the sandbox.
//! - seccomp: an allowlist per thread category ([`seccomp`]), default action a trap that
//!   names the call and ends the process, with argument conditions on `socket` (families),
//!   `ioctl` (requests), `clone` (threads only), `mmap`/`mprotect` (never executable) and
//!   `prctl` (thread names and `no_new_privs` only).
//! - `no_new_privs`; the capability bounding set, ambient, inheritable, permitted and effective
//!   sets emptied; when started as root, a switch to the configured user and group.
//!
//! # Order (fails closed)
//! [`prepare`] builds every filter and ruleset and resolves the user while the process still
//! holds its privileges; [`Prepared::apply`] then, in one fixed order: checks the process is
//! single-threaded, drops the bounding set, switches user, empties the capability sets, sets
//! `no_new_privs`, restricts itself with Landlock, and loads the seccomp filters (TSYNC). Every
//! thread started afterwards inherits all of it.
//!
//! # Limitations
//! - Landlock restricts only the calling thread and threads created later on ABI < 8, so
//!   [`Prepared::apply`] refuses to run while other threads exist.
//! - Landlock does not cover UDP or already-open descriptors; seccomp's `socket` rule and the
//!   server's own design (no descriptors to secrets are kept) cover those.
//! - The GPU entries (`ioctl` on `/dev/nvidia*`) are broad; they have run on one H100 host.
//!
//! # Test strategy
//! `tests/confinement.rs` is its own harness: for each forbidden action (exec, reading
//! /etc/shadow, writing, connecting or binding a port, ptrace, mount, bpf, user namespaces) it
//! starts itself as a child, confines the child, tries the action, and checks it failed with
//! the designed errno or killed the child with SIGSYS. A unit test snapshots the sorted
//! allowlist so any change shows in review.

#![warn(missing_docs)]

mod apply;
pub mod landlock_rules;
pub mod seccomp;
mod sys;

use std::path::PathBuf;

pub use apply::{ComputeFilter, Prepared, prepare, thread_count};
pub use sys::resolve_user;

/// The process runs with effective uid 0 (it must then switch to [`Policy::user`]).
pub fn running_as_root() -> bool {
    sys::geteuid() == 0
}

/// The Landlock ABI whose rights we handle. Pinned: a newer ABI adds rights whose effect must
/// be reviewed (and tested) before we handle them. V6 adds the scoping of abstract Unix sockets
/// and signals.
pub const LANDLOCK_ABI: landlock::ABI = landlock::ABI::V6;

/// Everything the confined process may still do, as plain data.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Paths that stay reachable, with their access.
    pub fs: Vec<FsRule>,
    /// TCP ports the process may still bind (normally none: listeners are bound before).
    pub bind_tcp: Vec<u16>,
    /// TCP ports the process may connect to (its peers' internal ports).
    pub connect_tcp: Vec<u16>,
    /// Switch to this user and group (needed when started as root).
    pub user: Option<UserSwitch>,
    /// Whether a kernel that cannot enforce everything is an error (the default) or a warning.
    pub enforcement: Enforcement,
    /// Replace seccomp's trap-and-die action by logging (debugging escape hatch; reported
    /// loudly).
    pub seccomp_log_only: bool,
    /// Add the entries a CUDA process needs (run confined on an H100: docs/seccomp.md).
    pub gpu: bool,
}

/// One reachable path.
#[derive(Debug, Clone)]
pub struct FsRule {
    /// The file or directory (rules apply beneath a directory).
    pub path: PathBuf,
    /// What may be done there.
    pub access: FsAccess,
}

/// Access to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsAccess {
    /// Read files and list directories.
    Read,
    /// Read, and read-write access to device files (GPU character devices).
    ReadWriteDevice,
}

/// A resolved user and group to switch to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserSwitch {
    /// User id.
    pub uid: u32,
    /// Group id (the only group kept; supplementary groups are cleared).
    pub gid: u32,
}

/// What to do when the kernel cannot enforce every restriction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Enforcement {
    /// Refuse: [`Prepared::apply`] returns an error.
    #[default]
    Required,
    /// Apply what the kernel supports and report the rest in [`Status`].
    BestEffort,
}

/// How much of the Landlock ruleset the kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LandlockStatus {
    /// Every rule, on the only thread.
    Full,
    /// Some of the access rights (an older ABI), or with other threads unrestricted.
    Partial,
    /// Nothing: the kernel has no Landlock.
    None,
}

/// How the seccomp allowlists act on a call they do not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SeccompStatus {
    /// Report it and end the process (`SIGSYS`).
    Enforced,
    /// Log it and let it run (`sandbox.seccomp_log_only`, for finding a missing entry).
    LogOnly,
}

impl std::fmt::Display for LandlockStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Full => "full",
            Self::Partial => "partial",
            Self::None => "none",
        })
    }
}

impl std::fmt::Display for SeccompStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Enforced => "enforced",
            Self::LogOnly => "log-only",
        })
    }
}

/// What was enforced, for the start-up log and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Landlock, as far as the kernel enforces it.
    pub landlock: LandlockStatus,
    /// The kernel's Landlock ABI version (0 when unsupported).
    pub landlock_abi: i32,
    /// The seccomp filters' action on an unlisted call.
    pub seccomp: SeccompStatus,
    /// `no_new_privs` is set.
    pub no_new_privs: bool,
    /// Every capability set, bounding set included, is empty.
    pub capabilities_dropped: bool,
    /// The user id after the switch.
    pub uid: u32,
}

impl Status {
    /// True when every restriction is in force.
    pub fn fully_enforced(&self) -> bool {
        self.landlock == LandlockStatus::Full
            && self.seccomp == SeccompStatus::Enforced
            && self.no_new_privs
            && self.capabilities_dropped
    }
}

/// Failures while preparing or applying the confinement.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Other threads exist; Landlock would not restrict them.
    #[error(
        "{count} threads exist ({names}); confinement must be applied while the process is single-threaded"
    )]
    NotSingleThreaded {
        /// Threads found.
        count: usize,
        /// Their names.
        names: String,
    },
    /// A path in the policy could not be opened.
    #[error("Landlock rule for {}", path.display())]
    LandlockPath {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: landlock::PathFdError,
    },
    /// Building or applying the Landlock ruleset failed (or the kernel lacks the ABI).
    #[error("Landlock ruleset")]
    Landlock(#[source] landlock::RulesetError),
    /// The kernel enforced Landlock only partly, and enforcement is required.
    #[error(
        "Landlock is only {0} enforced by this kernel (ABI {1}); set sandbox.enforcement = \"best-effort\" to run anyway"
    )]
    LandlockNotEnforced(LandlockStatus, i32),
    /// A seccomp filter did not compile.
    #[error("seccomp filter for {category}")]
    SeccompCompile {
        /// The thread category.
        category: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::BackendError,
    },
    /// Loading a seccomp filter failed.
    #[error("loading the seccomp filter for {category}")]
    SeccompLoad {
        /// The thread category.
        category: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::Error,
    },
    /// A privilege operation (setuid, capset, prctl) failed.
    #[error("{operation}")]
    Privileges {
        /// The operation.
        operation: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}
