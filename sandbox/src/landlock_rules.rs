//! The Landlock ruleset built from a [`Policy`]: every right of the pinned ABI is handled, and
//! only the policy's paths and ports are granted.

use landlock::{
    Access, AccessFs, AccessNet, CompatLevel, Compatible, NetPort, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreated, RulesetCreatedAttr, Scope,
};

use crate::{Enforcement, Error, FsAccess, LANDLOCK_ABI, Policy};

/// Create the ruleset (opening the policy's paths now, while they are still reachable).
pub fn build(policy: &Policy) -> Result<RulesetCreated, Error> {
    let level = match policy.enforcement {
        Enforcement::Required => CompatLevel::HardRequirement,
        Enforcement::BestEffort => CompatLevel::BestEffort,
    };
    let abi = LANDLOCK_ABI;
    let mut rs = Ruleset::default()
        .set_compatibility(level)
        .handle_access(AccessFs::from_all(abi))
        .map_err(Error::Landlock)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(Error::Landlock)?
        .scope(Scope::from_all(abi))
        .map_err(Error::Landlock)?
        .create()
        .map_err(Error::Landlock)?;
    for rule in &policy.fs {
        let fd = PathFd::new(&rule.path).map_err(|source| Error::LandlockPath {
            path: rule.path.clone(),
            source,
        })?;
        // Directory-only rights (listing) cannot be granted on a file.
        let read = if rule.path.is_dir() {
            AccessFs::from_read(abi)
        } else {
            AccessFs::from_read(abi) & AccessFs::from_file(abi)
        };
        let access = match rule.access {
            FsAccess::Read => read,
            FsAccess::ReadWriteDevice => {
                AccessFs::from_read(abi) | AccessFs::WriteFile | AccessFs::IoctlDev
            }
        };
        rs = rs
            .add_rule(PathBeneath::new(fd, access))
            .map_err(Error::Landlock)?;
    }
    for &port in &policy.bind_tcp {
        rs = rs
            .add_rule(NetPort::new(port, AccessNet::BindTcp))
            .map_err(Error::Landlock)?;
    }
    for &port in &policy.connect_tcp {
        rs = rs
            .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
            .map_err(Error::Landlock)?;
    }
    Ok(rs)
}
