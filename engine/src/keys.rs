//! API keys: generated with 256 bits of entropy, stored only as SHA-256 hashes, compared in
//! constant time.
//!
//! Keys are random tokens, not passwords, so a fast hash is the right tool: guessing is bounded
//! by the 256-bit key space, not by the hash's cost.
//!
//! File format, one key per line: `NAME sha256:HEX`. Blank lines and `#` comments are ignored.
//! The file must not be readable or writable by group or others.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of every key: recognisable in secret scanners and logs that should not hold it.
pub const KEY_PREFIX: &str = "bwk_";
/// Random bytes per key (256 bits).
const KEY_BYTES: usize = 32;
/// Longest accepted key name: names appear in logs and metrics.
const MAX_NAME_LEN: usize = 64;
/// Most keys one file may hold (the lookup compares against each one).
pub const MAX_KEYS: usize = 10_000;

#[derive(Clone)]
pub struct KeyEntry {
    pub name: String,
    hash: [u8; 32],
}

#[derive(Clone, Default)]
pub struct KeyStore {
    entries: Vec<KeyEntry>,
}

fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Refuse a secret file that group or others can access in any way.
pub fn check_private_mode(path: &Path, what: &str) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{what} {} has mode {mode:04o}: group or others can access it; \
             run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
        "key name {name:?} must be 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '-', '_', '.'"
    );
    Ok(())
}

impl KeyStore {
    pub fn load(path: &Path) -> Result<Self> {
        check_private_mode(path, "keys file")?;
        let text = crate::files::read_small(path, "keys file")?;
        Self::parse(&text).with_context(|| format!("keys file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(name), Some(hash), None) = (parts.next(), parts.next(), parts.next()) else {
                bail!("line {}: expected `NAME sha256:HEX`", n + 1);
            };
            validate_name(name).with_context(|| format!("line {}", n + 1))?;
            let hex = hash
                .strip_prefix("sha256:")
                .with_context(|| format!("line {}: the hash must start with sha256:", n + 1))?;
            let bytes = hex::decode(hex)
                .ok()
                .filter(|b| b.len() == 32)
                .with_context(|| format!("line {}: sha256 must be 64 hex digits", n + 1))?;
            if entries.iter().any(|e: &KeyEntry| e.name == name) {
                bail!("line {}: key name {name:?} appears twice", n + 1);
            }
            let mut h = [0u8; 32];
            h.copy_from_slice(&bytes);
            entries.push(KeyEntry {
                name: name.to_owned(),
                hash: h,
            });
        }
        ensure!(
            !entries.is_empty(),
            "no keys: add one with `bulwark keys new`"
        );
        ensure!(entries.len() <= MAX_KEYS, "more than {MAX_KEYS} keys");
        Ok(Self { entries })
    }

    /// The name of the key that `presented` is, if any. Every entry is compared, in constant
    /// time each, so timing reveals neither which key matched nor how much of it.
    pub fn authenticate(&self, presented: &str) -> Option<&str> {
        let h = hash_key(presented);
        let mut found = None;
        for e in &self.entries {
            if bool::from(e.hash.ct_eq(&h)) {
                found = Some(e.name.as_str());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The keys-file line for `key` under `name`.
pub fn entry_line(name: &str, key: &str) -> String {
    format!("{name} sha256:{}", hex::encode(hash_key(key)))
}

/// A fresh key: `bwk_` + 43 characters of URL-safe base64 (256 random bits).
pub fn generate_key() -> Result<String> {
    let mut bytes = [0u8; KEY_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// Append a new key named `name` to `path` (created with mode 0600); returns the key, which
/// exists nowhere else afterwards.
pub fn append_new_key(path: &Path, name: &str) -> Result<String> {
    validate_name(name)?;
    if path.exists() {
        check_private_mode(path, "keys file")?;
        let text = crate::files::read_small(path, "keys file")?;
        if !text.trim().is_empty() {
            let store =
                KeyStore::parse(&text).with_context(|| format!("keys file {}", path.display()))?;
            ensure!(
                !store.entries.iter().any(|e| e.name == name),
                "a key named {name:?} already exists in {}",
                path.display()
            );
        }
    }
    let key = generate_key()?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{}", entry_line(name, &key))
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn new_key_authenticates_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys");
        let k1 = append_new_key(&p, "alice").unwrap();
        let k2 = append_new_key(&p, "bob").unwrap();
        assert!(k1.starts_with(KEY_PREFIX) && k1.len() == 47);
        let store = KeyStore::load(&p).unwrap();
        assert_eq!(store.authenticate(&k1), Some("alice"));
        assert_eq!(store.authenticate(&k2), Some("bob"));
        assert_eq!(store.authenticate("bwk_wrong"), None);
        assert_eq!(store.authenticate(""), None);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            !text.contains(&k1[4..]),
            "the key itself must never be stored"
        );
    }

    #[test]
    fn group_readable_keys_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys");
        append_new_key(&p, "alice").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = KeyStore::load(&p).err().unwrap();
        assert!(format!("{err:#}").contains("0640"), "{err:#}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert!(KeyStore::load(&p).is_err());
    }

    #[test]
    fn duplicate_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys");
        append_new_key(&p, "alice").unwrap();
        assert!(append_new_key(&p, "alice").is_err());
        assert!(append_new_key(&p, "bad name").is_err());
    }

    #[test]
    fn malformed_lines_are_named() {
        let err = KeyStore::parse("alice sha256:abcd\n").err().unwrap();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
        assert!(KeyStore::parse("# only a comment\n").is_err());
    }
}
