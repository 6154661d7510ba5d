//! The server's confinement policy, built from its configuration and applied through the
//! `sandbox` crate. What is allowed, and why: docs/landlock.md and docs/seccomp.md.

use anyhow::{Context, Result};

use crate::config::{Config, SandboxEnforcement};

/// The policy for a CPU node: no path at all (the model file was opened before and is parsed
/// through its descriptor), no new port, and outgoing connections only to a head's stages.
pub fn policy(cfg: &Config) -> Result<sandbox::Policy> {
    let user = if sandbox::running_as_root() {
        let (uid, gid) = sandbox::resolve_user(&cfg.sandbox.user, &cfg.sandbox.group)
            .with_context(|| {
                format!(
                    "resolving sandbox.user {:?} / sandbox.group {:?}",
                    cfg.sandbox.user, cfg.sandbox.group
                )
            })?;
        anyhow::ensure!(
            uid != 0,
            "sandbox.user resolves to uid 0; choose an unprivileged user"
        );
        Some(sandbox::UserSwitch { uid, gid })
    } else {
        None
    };
    let gpu = cfg.cuda_ordinal().is_some();
    // The CUDA driver keeps talking to its device files and reads its /proc and /sys entries.
    // The model needs no rule: it was opened before confinement and is read by descriptor.
    let fs = if gpu {
        let mut fs = Vec::new();
        for dev in [
            "/dev/nvidiactl",
            "/dev/nvidia-uvm",
            "/dev/nvidia-uvm-tools",
            "/dev/nvidia0",
            "/dev/nvidia1",
            "/dev/nvidia2",
            "/dev/nvidia3",
            "/dev/nvidia4",
            "/dev/nvidia5",
            "/dev/nvidia6",
            "/dev/nvidia7",
        ] {
            if std::path::Path::new(dev).exists() {
                fs.push(sandbox::FsRule {
                    path: dev.into(),
                    access: sandbox::FsAccess::ReadWriteDevice,
                });
            }
        }
        for ro in [
            "/proc/driver/nvidia",
            "/sys/devices/system/cpu",
            "/sys/bus/pci/devices",
        ] {
            if std::path::Path::new(ro).exists() {
                fs.push(sandbox::FsRule {
                    path: ro.into(),
                    access: sandbox::FsAccess::Read,
                });
            }
        }
        fs
    } else {
        Vec::new()
    };
    // A cluster head connects to its stages' ports and nowhere else; a worker dials nothing.
    let connect_tcp = cfg
        .cluster
        .iter()
        .flat_map(|c| c.stages.iter())
        .map(|s| s.address.port())
        .collect();
    Ok(sandbox::Policy {
        fs,
        bind_tcp: Vec::new(),
        connect_tcp,
        user,
        enforcement: match cfg.sandbox.enforcement {
            SandboxEnforcement::Required => sandbox::Enforcement::Required,
            SandboxEnforcement::BestEffort => sandbox::Enforcement::BestEffort,
        },
        seccomp_log_only: cfg.sandbox.seccomp_log_only,
        gpu,
    })
}

/// Confine this process; logs and returns the status. Fails closed unless best effort was
/// asked for.
pub fn confine(cfg: &Config) -> Result<(sandbox::Status, sandbox::ComputeFilter)> {
    let policy = policy(cfg)?;
    let prepared = sandbox::prepare(&policy).context("preparing the sandbox")?;
    let (status, compute) = prepared.apply().context("confining the process")?;
    tracing::info!(
        landlock = %status.landlock,
        landlock_abi = status.landlock_abi,
        seccomp = %status.seccomp,
        no_new_privs = status.no_new_privs,
        capabilities_dropped = status.capabilities_dropped,
        uid = status.uid,
        fully_enforced = status.fully_enforced(),
        "sandbox applied"
    );
    if status.fully_enforced() {
        tracing::info!("sandbox fully enforced");
    } else {
        tracing::warn!(
            "SANDBOX NOT FULLY ENFORCED: a compromised server process is less contained \
             (sandbox.enforcement = best-effort or sandbox.seccomp_log_only)"
        );
    }
    Ok((status, compute))
}

/// The seccomp allowlists as JSON for review (`bulwark sandbox allowlist`): per thread
/// category, each allowed call's name, number, argument condition and reason.
pub fn allowlist_json(gpu: bool) -> String {
    use sandbox::seccomp::{Args, Category, allowlist};
    let entry = |a: sandbox::seccomp::Allowed| {
        let args = match a.args {
            Args::Any => serde_json::json!("any"),
            Args::OneOf(arg, values) => serde_json::json!({ "arg": arg, "one_of": values }),
            Args::NoneOf(arg, mask) => serde_json::json!({ "arg": arg, "none_of_bits": mask }),
            Args::AllOf(arg, mask) => serde_json::json!({ "arg": arg, "all_of_bits": mask }),
        };
        let name = a.name.trim_start_matches("SYS_");
        serde_json::json!({ "name": name, "nr": a.nr, "args": args, "reason": a.reason })
    };
    let lists: serde_json::Map<String, serde_json::Value> = [Category::Process, Category::Compute]
        .into_iter()
        .map(|c| {
            let calls: Vec<_> = allowlist(c, gpu).into_iter().map(entry).collect();
            (c.name().to_owned(), calls.into())
        })
        .collect();
    serde_json::to_string_pretty(&serde_json::json!({
        "architecture": std::env::consts::ARCH,
        "gpu": gpu,
        "categories": lists,
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    /// The export lists exactly the tables' calls, each with its number and reason.
    #[test]
    fn allowlist_json_is_the_tables() {
        use sandbox::seccomp::{Category, allowlist};
        let v: serde_json::Value = serde_json::from_str(&super::allowlist_json(false)).unwrap();
        for c in [Category::Process, Category::Compute] {
            let listed = v["categories"][c.name()].as_array().unwrap();
            let table = allowlist(c, false);
            assert_eq!(listed.len(), table.len(), "{}", c.name());
            for (l, a) in listed.iter().zip(&table) {
                assert_eq!(l["name"], a.name.trim_start_matches("SYS_"));
                assert_eq!(l["nr"], a.nr);
                assert_eq!(l["reason"], a.reason);
            }
        }
        assert!(
            v["categories"]["process"]
                .to_string()
                .contains("\"accept4\"")
        );
    }
}
