//! Pinning: what the configuration says the model's bytes must be, and opening them so.
//!
//! A GGUF model is one file pinned by `model.sha256`. A Hugging Face directory is pinned by
//! `model.files`, a table of every file the server reads with its SHA-256. Every pinned file
//! is opened by descriptor with the privileges the server starts with (before the user switch
//! and Landlock), under a read lease where the kernel grants one (`super::lease`), and hashed
//! and compared before any of them is parsed. A file the loader needs that the table does not
//! list is refused by name; a file in the directory that is not listed is never opened.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use sha2::Digest;

use super::file::{ModelFile, Tripwire};
use crate::digest::Sha256;

/// The configured pin of the model's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    /// `model.sha256`: one GGUF file.
    File(Sha256),
    /// `model.files`: file name in the model directory → SHA-256.
    Files(BTreeMap<String, Sha256>),
}

impl Pin {
    /// One digest for the whole model, compared between the nodes of a cluster: the file's
    /// own SHA-256, or the SHA-256 of the sorted table (`name NUL hex LF` per file).
    pub fn identity(&self) -> Sha256 {
        match self {
            Self::File(sha) => *sha,
            Self::Files(files) => {
                let mut h = sha2::Sha256::new();
                for (name, sha) in files {
                    h.update(name.as_bytes());
                    h.update([0]);
                    h.update(sha.to_string().as_bytes());
                    h.update([b'\n']);
                }
                Sha256(h.finalize().into())
            }
        }
    }
}

/// Whether `name` may be a `model.files` entry: a plain file name inside the directory (no
/// path separator, no `..`, no hidden file), of the characters model repositories use.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The model's files, opened (not yet hashed or parsed).
pub enum OpenedModel {
    Gguf(ModelFile),
    /// A Hugging Face directory: every pinned file, by name.
    Directory {
        dir: PathBuf,
        files: BTreeMap<String, ModelFile>,
    },
}

impl OpenedModel {
    /// Open `path` as `pin` says: a file for `model.sha256`, a directory's pinned files for
    /// `model.files`.
    pub fn open(path: &Path, pin: &Pin) -> Result<Self> {
        let is_dir = path.is_dir();
        match pin {
            Pin::File(_) if is_dir => bail!(
                "model.path {} is a directory: pin its files with model.files (print the table \
                 with `bulwark model hash {}`)",
                path.display(),
                path.display()
            ),
            Pin::File(_) => Ok(Self::Gguf(ModelFile::open_leased(path)?)),
            Pin::Files(_) if !is_dir => bail!(
                "model.files pins the files of a directory, but model.path {} is not one \
                 (a GGUF file is pinned with model.sha256)",
                path.display()
            ),
            Pin::Files(table) => {
                ensure!(!table.is_empty(), "model.files is empty");
                let mut files = BTreeMap::new();
                for name in table.keys() {
                    ensure!(
                        valid_file_name(name),
                        "model.files: {name:?} is not a plain file name in the model directory"
                    );
                    let file = ModelFile::open_leased(&path.join(name))
                        .with_context(|| format!("model.files names {name}"))?;
                    files.insert(name.clone(), file);
                }
                Ok(Self::Directory {
                    dir: path.to_owned(),
                    files,
                })
            }
        }
    }

    /// Hash every file and compare it with its pin; nothing is parsed before all match.
    pub fn verify(mut self, pin: &Pin) -> Result<VerifiedModel> {
        match (&mut self, pin) {
            (Self::Gguf(file), Pin::File(want)) => check(file, want, "model.sha256")?,
            (Self::Directory { files, .. }, Pin::Files(table)) => {
                for (name, file) in files.iter_mut() {
                    let want = table.get(name).context("a file opened without a pin")?;
                    check(file, want, &format!("model.files.\"{name}\""))?;
                }
            }
            _ => bail!("the model was opened for another kind of pin"),
        }
        Ok(VerifiedModel(self))
    }

    /// Seconds since the epoch of the newest modification (the API's `created`).
    pub fn modified_secs(&self) -> u64 {
        match self {
            Self::Gguf(f) => f.modified_secs(),
            Self::Directory { files, .. } => files
                .values()
                .map(ModelFile::modified_secs)
                .max()
                .unwrap_or(0),
        }
    }
}

/// An opened model whose every file matched its pin.
pub struct VerifiedModel(pub OpenedModel);

impl VerifiedModel {
    /// A check, for the end of the load, that every file still is as it was when opened.
    pub fn tripwire(&self) -> Tripwire {
        Tripwire(match &self.0 {
            OpenedModel::Gguf(f) => vec![f.watch()],
            OpenedModel::Directory { files, .. } => files.values().map(ModelFile::watch).collect(),
        })
    }
}

fn check(file: &mut ModelFile, want: &Sha256, key: &str) -> Result<()> {
    let actual = file.sha256()?;
    ensure!(
        actual == *want,
        "model file {} has SHA-256 {actual}, but the configuration pins {want} ({key}); \
         refusing to load it",
        file.path.display()
    );
    file.set_verified(actual);
    Ok(())
}

/// The pins of a Hugging Face directory as it is now: the SHA-256 of each file the loader
/// reads that exists (configuration, tokenizer, weights; the index's shards).
pub fn directory_pins(dir: &Path) -> Result<BTreeMap<String, Sha256>> {
    let mut names: Vec<String> = super::hf::FILES_READ
        .iter()
        .filter(|n| dir.join(n).is_file())
        .map(|n| (*n).to_owned())
        .collect();
    let index = dir.join(super::hf::INDEX_FILE);
    if index.is_file() {
        // With an index, the loader reads its shards, never a model.safetensors beside it.
        names.retain(|n| n != super::hf::WEIGHTS_FILE);
        let mut f = ModelFile::open(&index)?;
        names.extend(super::hf::shard_names(
            &f.read_all(super::hf::MAX_INDEX_BYTES)?,
        )?);
    }
    ensure!(
        names.iter().any(|n| n == super::hf::CONFIG_FILE),
        "{} has no config.json: not a Hugging Face model directory",
        dir.display()
    );
    names
        .into_iter()
        .map(|name| {
            let sha = super::file::sha256_file(&dir.join(&name))?;
            Ok((name, sha))
        })
        .collect()
}

/// `bulwark model hash DIR`: the `model.files` table of a directory, as TOML.
pub fn files_table(pins: &BTreeMap<String, Sha256>) -> String {
    let mut out = String::from("[model.files]\n");
    for (name, sha) in pins {
        out.push_str(&format!("\"{name}\" = \"{sha}\"\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_plain_names_inside_the_directory() {
        for ok in [
            "config.json",
            "model-00001-of-00002.safetensors",
            "tokenizer_config.json",
        ] {
            assert!(valid_file_name(ok), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".hidden",
            "a/b",
            "../config.json",
            "/etc/passwd",
            "x y",
            "a\0",
        ] {
            assert!(!valid_file_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn an_altered_or_missing_file_is_refused_by_name_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "not json at all").unwrap();
        let mut table = BTreeMap::from([
            ("config.json".to_owned(), Sha256::of(b"{}")),
            ("tokenizer.json".to_owned(), Sha256::of(b"the pinned bytes")),
        ]);
        let pin = Pin::Files(table.clone());
        let opened = OpenedModel::open(dir.path(), &pin).unwrap();
        let err = format!("{:#}", opened.verify(&pin).err().unwrap());
        assert!(
            err.contains("tokenizer.json") && err.contains("refusing"),
            "{err}"
        );

        table.insert("model.safetensors".into(), Sha256::of(b""));
        let err = format!(
            "{:#}",
            OpenedModel::open(dir.path(), &Pin::Files(table))
                .err()
                .unwrap()
        );
        assert!(err.contains("model.safetensors"), "{err}");
    }

    #[test]
    fn the_pin_kind_must_match_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = OpenedModel::open(dir.path(), &Pin::File(Sha256::of(b"")))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("model.files"), "{err:#}");
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, "x").unwrap();
        let err = OpenedModel::open(&file, &Pin::Files(BTreeMap::new()))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("model.sha256"), "{err:#}");
    }

    #[test]
    fn the_identity_of_a_table_changes_with_any_name_or_hash() {
        let a = Pin::Files(BTreeMap::from([(
            "config.json".to_owned(),
            Sha256::of(b"1"),
        )]));
        let b = Pin::Files(BTreeMap::from([(
            "config.json".to_owned(),
            Sha256::of(b"2"),
        )]));
        let c = Pin::Files(BTreeMap::from([(
            "config2.json".to_owned(),
            Sha256::of(b"1"),
        )]));
        assert_ne!(a.identity(), b.identity());
        assert_ne!(a.identity(), c.identity());
        assert_eq!(a.identity(), a.clone().identity());
    }
}
