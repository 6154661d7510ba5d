//! Preparing and applying a [`Policy`], in the one order that is safe.

use landlock::{RulesetCreated, RulesetStatus};
use seccompiler::BpfProgram;

use crate::seccomp::{self, Category};
use crate::{Enforcement, Error, LandlockStatus, Policy, SeccompStatus, Status, sys};

/// Everything built while the process still holds its privileges and its paths are reachable.
pub struct Prepared {
    policy: Policy,
    landlock: RulesetCreated,
    process_filter: BpfProgram,
    compute_filter: BpfProgram,
    clone3_filter: BpfProgram,
}

/// Build every filter and ruleset; nothing is enforced yet.
pub fn prepare(policy: &Policy) -> Result<Prepared, Error> {
    Ok(Prepared {
        landlock: crate::landlock_rules::build(policy)?,
        process_filter: seccomp::compile(Category::Process, policy.gpu, policy.seccomp_log_only)?,
        compute_filter: seccomp::compile(Category::Compute, policy.gpu, policy.seccomp_log_only)?,
        clone3_filter: seccomp::compile_clone3_fallback()?,
        policy: policy.clone(),
    })
}

/// Threads of this process, from /proc (read before Landlock denies /proc).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}

/// Names of this process's threads (for the error that lists them).
fn thread_names() -> String {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                .map(|n| n.trim().to_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.join(", ")
}

/// Capability sets of this thread all empty (from /proc/thread-self/status).
fn capabilities_empty() -> bool {
    let Ok(s) = std::fs::read_to_string("/proc/thread-self/status") else {
        return false;
    };
    ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"]
        .iter()
        .all(|k| {
            s.lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .is_some_and(|v| v.chars().all(|c| c == '0'))
        })
}

fn privileges(operation: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Privileges { operation, source }
}

impl Prepared {
    /// Confine the process. Must run while it is single-threaded; every thread created later
    /// inherits everything. Returns what the kernel enforced.
    pub fn apply(self) -> Result<(Status, ComputeFilter), Error> {
        // INVARIANT: single-threaded, or Landlock (ABI < 8) would leave other threads free.
        // Best effort accepts that (a GPU driver's threads), and reports Landlock as partial.
        let count = thread_count();
        if count != 1 && self.policy.enforcement == Enforcement::Required {
            return Err(Error::NotSingleThreaded {
                count,
                names: thread_names(),
            });
        }
        let root = sys::geteuid() == 0;
        // INVARIANT: the bounding set is dropped while CAP_SETPCAP is still held (before the
        // user switch) and before the capability sets are emptied.
        if root {
            sys::drop_bounding_set().map_err(privileges("dropping the capability bounding set"))?;
        }
        sys::clear_ambient().map_err(privileges("clearing ambient capabilities"))?;
        if let Some(u) = self.policy.user {
            sys::switch_user(u.uid, u.gid)
                .map_err(privileges("switching to the unprivileged user"))?;
        }
        // Switching away from root empties the sets already; a non-root start may still hold
        // some (file capabilities, systemd AmbientCapabilities).
        sys::clear_capabilities().map_err(privileges("emptying the capability sets"))?;
        let capabilities_dropped = capabilities_empty();
        sys::set_no_new_privs().map_err(privileges("setting no_new_privs"))?;

        // INVARIANT: Landlock before seccomp (seccomp does not allow the Landlock calls).
        let ls = self.landlock.restrict_self().map_err(Error::Landlock)?;
        let abi = sys::landlock_abi();
        let landlock = match ls.ruleset {
            RulesetStatus::FullyEnforced if count != 1 => LandlockStatus::Partial,
            RulesetStatus::FullyEnforced => LandlockStatus::Full,
            RulesetStatus::PartiallyEnforced => LandlockStatus::Partial,
            RulesetStatus::NotEnforced => LandlockStatus::None,
        };
        if landlock != LandlockStatus::Full && self.policy.enforcement == Enforcement::Required {
            return Err(Error::LandlockNotEnforced(landlock, abi));
        }
        let uid = sys::geteuid();
        // INVARIANT: the SIGSYS reporter is in place before any filter can trap.
        if !self.policy.seccomp_log_only {
            sys::install_sigsys_reporter().map_err(privileges("installing the SIGSYS reporter"))?;
        }
        // INVARIANT: seccomp last, on every thread (TSYNC; there is only this one); the
        // allowlist goes on after the clone3 filter, as nothing but itself can be loaded after.
        seccompiler::apply_filter_all_threads(&self.clone3_filter).map_err(|source| {
            Error::SeccompLoad {
                category: "clone3",
                source,
            }
        })?;
        seccompiler::apply_filter_all_threads(&self.process_filter).map_err(|source| {
            Error::SeccompLoad {
                category: "process",
                source,
            }
        })?;
        let status = Status {
            landlock,
            landlock_abi: abi,
            seccomp: if self.policy.seccomp_log_only {
                SeccompStatus::LogOnly
            } else {
                SeccompStatus::Enforced
            },
            no_new_privs: ls.no_new_privs,
            capabilities_dropped,
            uid,
        };
        Ok((status, ComputeFilter(self.compute_filter)))
    }
}

/// The compute category's filter, to be applied by the inference thread itself when it starts.
pub struct ComputeFilter(BpfProgram);

impl ComputeFilter {
    /// Stack the compute allowlist on the calling thread (and the threads it creates).
    pub fn apply_to_current_thread(&self) -> Result<(), Error> {
        seccompiler::apply_filter(&self.0).map_err(|source| Error::SeccompLoad {
            category: "compute",
            source,
        })
    }
}
