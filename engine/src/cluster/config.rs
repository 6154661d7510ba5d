//! The `[cluster]` section: this node's role, name, certificates and layers, and its peers.
//! Documented in docs/cluster.md and docs/configuration.md.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

/// Most stages a pipeline may have besides the head (each is a connection and a thread).
pub const MAX_STAGES: usize = 16;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Serves the API and runs the first layers; dials every stage.
    Head,
    /// Runs one range of layers for the one head it accepts; serves no API.
    Worker,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub role: Role,
    /// This node's name; its cluster certificate carries it as a DNS name.
    pub name: String,
    /// The cluster CA certificate (PEM): the only issuer of peers' certificates.
    pub ca: PathBuf,
    /// This node's certificate chain (PEM), for both server and client authentication.
    pub cert: PathBuf,
    /// This node's private key (PEM, mode 0600 or stricter).
    pub key: PathBuf,
    /// The layers this node runs, `[start, end)`.
    pub layers: [usize; 2],
    /// Worker: the internal listener, bound before confinement.
    pub listen: Option<SocketAddr>,
    /// Worker: the only certificate name accepted from a client.
    pub head_name: Option<String>,
    /// Worker: the only source address accepted.
    pub head_address: Option<IpAddr>,
    /// Head: the workers, in pipeline order.
    #[serde(default)]
    pub stages: Vec<StageConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// The name the stage's certificate must carry.
    pub name: String,
    /// Where the stage listens.
    pub address: SocketAddr,
    /// Its layers, `[start, end)`.
    pub layers: [usize; 2],
}

/// A validated worker's view: where it listens and whom it accepts.
#[derive(Debug, Clone)]
pub struct WorkerPeer {
    pub listen: SocketAddr,
    pub head_name: String,
    pub head_address: IpAddr,
}

impl ClusterConfig {
    pub fn layer_range(&self) -> Range<usize> {
        self.layers[0]..self.layers[1]
    }

    /// The worker's listener and its one peer (validated to be present for workers).
    pub fn worker_peer(&self) -> Option<WorkerPeer> {
        Some(WorkerPeer {
            listen: self.listen?,
            head_name: self.head_name.clone()?,
            head_address: self.head_address?,
        })
    }

    /// The end of the last layer range: the model must have exactly this many layers.
    pub fn total_layers(&self) -> usize {
        self.stages.last().map_or(self.layers[1], |s| s.layers[1])
    }

    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name).map_err(|e| e.context("cluster.name"))?;
        ensure!(
            self.layers[0] < self.layers[1],
            "cluster.layers {:?} must be a non-empty range [start, end)",
            self.layers
        );
        match self.role {
            Role::Head => self.validate_head(),
            Role::Worker => self.validate_worker(),
        }
    }

    fn validate_head(&self) -> Result<()> {
        ensure!(
            self.listen.is_none() && self.head_name.is_none() && self.head_address.is_none(),
            "cluster.listen, cluster.head_name and cluster.head_address are for workers; a head \
             dials its stages (cluster.stages)"
        );
        ensure!(
            self.layers[0] == 0,
            "cluster.layers of the head must start at 0 (it runs the first layers)"
        );
        ensure!(
            !self.stages.is_empty(),
            "cluster.stages is empty; a head needs at least one worker stage"
        );
        ensure!(
            self.stages.len() <= MAX_STAGES,
            "cluster.stages has {} entries; at most {MAX_STAGES}",
            self.stages.len()
        );
        let mut end = self.layers[1];
        for (i, s) in self.stages.iter().enumerate() {
            validate_name(&s.name).map_err(|e| e.context(format!("cluster.stages[{i}].name")))?;
            ensure!(
                s.name != self.name && !self.stages[..i].iter().any(|o| o.name == s.name),
                "cluster.stages[{i}].name {:?} is not unique",
                s.name
            );
            ensure!(
                s.layers[0] == end && s.layers[0] < s.layers[1],
                "cluster.stages[{i}].layers {:?} must start at {end} (where the previous range \
                 ends) and be non-empty: ranges are contiguous and cover the layers once",
                s.layers
            );
            end = s.layers[1];
        }
        Ok(())
    }

    fn validate_worker(&self) -> Result<()> {
        ensure!(
            self.stages.is_empty(),
            "cluster.stages is for the head; a worker dials nothing"
        );
        ensure!(
            self.listen.is_some(),
            "cluster.listen is required for a worker (its internal ADDR:PORT)"
        );
        let head = self
            .head_name
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("cluster.head_name is required for a worker"))?;
        validate_name(head).map_err(|e| e.context("cluster.head_name"))?;
        ensure!(
            self.head_address.is_some(),
            "cluster.head_address is required for a worker (the only source address accepted)"
        );
        ensure!(
            self.layers[0] > 0,
            "cluster.layers of a worker cannot start at 0: the head runs the first layers"
        );
        Ok(())
    }
}

/// A node name is a DNS label sequence: it is matched against certificates' DNS names.
pub fn validate_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && !name.starts_with(['-', '.'])
            && !name.ends_with(['-', '.']),
        "{name:?} must be 1 to 63 characters of a-z, 0-9, '-' and '.' (a DNS name)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(stages: &str, layers: &str) -> ClusterConfig {
        toml::from_str(&format!(
            "role = \"head\"\nname = \"head\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n\
             layers = {layers}\n{stages}"
        ))
        .unwrap()
    }

    fn stage(name: &str, layers: &str) -> String {
        format!("[[stages]]\nname = \"{name}\"\naddress = \"10.0.0.2:7070\"\nlayers = {layers}\n")
    }

    fn err(c: &ClusterConfig) -> String {
        format!("{:#}", c.validate().unwrap_err())
    }

    #[test]
    fn layer_ranges_must_be_contiguous_and_start_at_zero() {
        let ok = head(
            &(stage("w1", "[8, 20]") + &stage("w2", "[20, 30]")),
            "[0, 8]",
        );
        ok.validate().unwrap();
        assert_eq!(ok.total_layers(), 30);
        let gap = head(
            &(stage("w1", "[8, 20]") + &stage("w2", "[21, 30]")),
            "[0, 8]",
        );
        assert!(
            err(&gap).contains("cluster.stages[1].layers"),
            "{}",
            err(&gap)
        );
        let overlap = head(&stage("w1", "[7, 30]"), "[0, 8]");
        assert!(err(&overlap).contains("cluster.stages[0].layers"));
        let late = head(&stage("w1", "[8, 30]"), "[1, 8]");
        assert!(err(&late).contains("start at 0"), "{}", err(&late));
        let none = head("", "[0, 8]");
        assert!(err(&none).contains("cluster.stages is empty"));
        let twice = head(
            &(stage("w1", "[8, 20]") + &stage("w1", "[20, 30]")),
            "[0, 8]",
        );
        assert!(err(&twice).contains("not unique"));
    }

    #[test]
    fn a_worker_names_its_listener_and_its_one_head() {
        let w = |extra: &str| -> ClusterConfig {
            toml::from_str(&format!(
                "role = \"worker\"\nname = \"w1\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n\
                 layers = [8, 30]\n{extra}"
            ))
            .unwrap()
        };
        let full =
            "listen = \"10.0.0.2:7070\"\nhead_name = \"head\"\nhead_address = \"10.0.0.1\"\n";
        w(full).validate().unwrap();
        assert!(
            err(&w("head_name = \"head\"\nhead_address = \"10.0.0.1\"\n"))
                .contains("cluster.listen")
        );
        assert!(
            err(&w(
                "listen = \"10.0.0.2:7070\"\nhead_address = \"10.0.0.1\"\n"
            ))
            .contains("cluster.head_name")
        );
        assert!(
            err(&w("listen = \"10.0.0.2:7070\"\nhead_name = \"head\"\n"))
                .contains("cluster.head_address")
        );
        assert!(
            err(&w(&format!(
                "{full}[[stages]]\nname = \"x\"\naddress = \"10.0.0.3:1\"\nlayers = [1, 2]\n"
            )))
            .contains("cluster.stages")
        );
        let bad_name = w(&full.replace("head_name = \"head\"", "head_name = \"Head!\""));
        assert!(err(&bad_name).contains("cluster.head_name"));
    }
}
