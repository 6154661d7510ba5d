//! The configuration file: one TOML document, `deny_unknown_fields` everywhere, every value
//! validated with an error that names its key. Relative paths are relative to the file.
//! Every key is documented in docs/configuration.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::cluster::config::{ClusterConfig, Role};
use crate::digest::Sha256;
use crate::model::arch::WeightFormat;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The API. Required except on a cluster worker, which serves no API at all.
    pub server: Option<ServerConfig>,
    pub model: ModelConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub sandbox: SandboxConfig,
    #[serde(default)]
    pub firewall: FirewallConfig,
    /// Multi-node pipeline (docs/cluster.md); absent on a single node.
    pub cluster: Option<ClusterConfig>,
    /// Where the file was read from; relative paths resolve against its directory.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// API listener, `ADDR:PORT`.
    pub listen: SocketAddr,
    /// TLS certificate chain (PEM). Required unless `plaintext = true`.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM, mode 0600 or stricter).
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP: only accepted on a loopback `listen` address.
    #[serde(default)]
    pub plaintext: bool,
    /// CA bundle (PEM): when set, API clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
    /// Hashed API keys, one `name sha256:<hex>` per line (mode 0600 or stricter).
    pub keys_file: PathBuf,
    /// Browser origins allowed by CORS, exact `scheme://host[:port]` strings. Empty: CORS off.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// Answer `GET /health` without a key (for load balancers that cannot send one). Off by
    /// default: then every route, /health included, needs a key.
    #[serde(default)]
    pub anonymous_health: bool,
    /// Seconds allowed for in-flight requests to finish after SIGTERM.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
}

fn default_shutdown_grace() -> u64 {
    10
}

/// How the API listener talks, derived once from `server.plaintext`, `tls_cert`, `tls_key` and
/// `client_ca` (validation has refused every other combination, each by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport<'a> {
    /// TLS with this certificate and key; with `client_ca`, a client must present a
    /// certificate it signed.
    Tls {
        cert: &'a Path,
        key: &'a Path,
        client_ca: Option<&'a Path>,
    },
    /// Plain HTTP, on a loopback address only.
    LoopbackPlaintext,
}

impl ServerConfig {
    pub fn transport(&self) -> Result<Transport<'_>> {
        match (self.plaintext, &self.tls_cert, &self.tls_key) {
            (true, None, None) => Ok(Transport::LoopbackPlaintext),
            (false, Some(cert), Some(key)) => Ok(Transport::Tls {
                cert,
                key,
                client_ca: self.client_ca.as_deref(),
            }),
            _ => bail!(
                "server.tls_cert and server.tls_key are required unless server.plaintext = true"
            ),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A local GGUF file, or a Hugging Face directory (config.json, safetensors weights,
    /// tokenizer.json, tokenizer_config.json).
    pub path: PathBuf,
    /// SHA-256 of the GGUF file (`bulwark model hash FILE`); checked before parsing.
    pub sha256: Option<Sha256>,
    /// For a directory: every file the server reads, by name, with its SHA-256 (`bulwark model
    /// hash DIR` prints the table); all checked before any is parsed.
    pub files: Option<std::collections::BTreeMap<String, Sha256>>,
    /// The model id clients put in `model`.
    pub name: String,
    /// Context window in tokens (prompt + completion); at most the model's own.
    pub context_length: Option<usize>,
    /// How weights are held for compute: `quantized`, `f16` or `f32`. Unset: see
    /// [`ModelConfig::weights_on`].
    pub weights: Option<WeightFormat>,
}

impl ModelConfig {
    /// The pin of the model's bytes (`validate` makes exactly one of `sha256` and `files` set;
    /// with neither, an empty table, which opening refuses).
    pub fn pin(&self) -> crate::model::pin::Pin {
        use crate::model::pin::Pin;
        match (&self.files, self.sha256) {
            (Some(files), _) => Pin::Files(files.clone()),
            (None, Some(sha)) => Pin::File(sha),
            (None, None) => Pin::Files(Default::default()),
        }
    }

    /// The weight format for `device`: the configured one, else `quantized` for a GGUF file on
    /// the CPU (the packed kernels path), and `f32` on CUDA (what the GPU path has been
    /// measured with) and for a Hugging Face directory (which has no quantized blocks).
    pub fn weights_on(&self, device: &candle_core::Device) -> WeightFormat {
        self.weights
            .unwrap_or(if device.is_cpu() && self.files.is_none() {
                WeightFormat::Quantized
            } else {
                WeightFormat::F32
            })
    }
}

/// Limits on what clients may ask; each has a 4xx/503 answer that names it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub max_connections: usize,
    /// Connections open at once from one source address; 0 disables the cap.
    pub max_connections_per_source: usize,
    /// Seconds allowed to receive a request body once its headers arrived (stalled uploads).
    pub body_read_timeout_secs: u64,
    /// Seconds a streaming response may wait for the client to read before it is abandoned
    /// (a client whose flow-control window stays shut).
    pub write_timeout_secs: u64,
    pub max_in_flight: usize,
    /// Requests per minute per key; 0 disables the rate limit.
    pub rate_limit_per_minute: u32,
    pub max_tokens: usize,
    pub max_prompt_tokens: usize,
    /// Requests waiting for a batch slot before 503.
    pub queue_depth: usize,
    /// Messages in one chat request.
    pub max_messages: usize,
    /// Stop sequences in one request.
    pub max_stop_sequences: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_header_bytes: 16 << 10,
            max_headers: 64,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_connections: 256,
            max_connections_per_source: 64,
            body_read_timeout_secs: 30,
            write_timeout_secs: 30,
            max_in_flight: 64,
            rate_limit_per_minute: 600,
            max_tokens: 2048,
            max_prompt_tokens: 6144,
            queue_depth: 64,
            max_messages: 256,
            max_stop_sequences: 4,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Compute threads for the model; 0 picks the number of cores minus one (at least 1).
    pub threads: usize,
    /// Threads for the network runtime (TLS, HTTP).
    pub io_threads: usize,
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Prompt tokens processed per step across the batch (bounds a step's latency).
    pub max_batch_tokens: usize,
    /// Memory for the KV caches of recent prompts, reused by later prompts of the same API
    /// key that start with the same tokens (`infer::prefix`); 0 turns reuse off.
    pub prefix_cache_mb: usize,
    /// `cpu`, or `cuda:N` in builds with the `cuda` feature.
    pub device: Device,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            io_threads: 1,
            max_batch: 16,
            max_batch_tokens: 512,
            prefix_cache_mb: 64,
            device: Device::Cpu,
        }
    }
}

/// A network of `firewall.api_sources` (`10.1.0.0/16`, `2001:db8::/32`), parsed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct SourceCidr(pub firewall::Cidr);

impl TryFrom<String> for SourceCidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
            .map(Self)
            .map_err(|e: firewall::Error| e.to_string())
    }
}

impl From<SourceCidr> for String {
    fn from(c: SourceCidr) -> String {
        c.0.to_string()
    }
}

/// Where the model computes: `engine.device`, parsed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    Cpu,
    /// A CUDA device by ordinal (`cuda:N`).
    Cuda(usize),
}

impl TryFrom<String> for Device {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "cpu" => Ok(Self::Cpu),
            d => d
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("must be \"cpu\" or \"cuda:N\" (got {d:?})")),
        }
    }
}

impl From<Device> for String {
    fn from(d: Device) -> String {
        match d {
            Device::Cpu => "cpu".into(),
            Device::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Prometheus listener (always on). Non-loopback needs `allow_non_loopback`.
    pub listen: Option<SocketAddr>,
    pub allow_non_loopback: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            allow_non_loopback: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SandboxEnforcement {
    /// Refuse to serve unless Landlock and seccomp are fully enforced.
    #[default]
    Required,
    /// Serve with whatever the kernel enforces, with a loud warning.
    BestEffort,
}

/// Self-confinement (docs/landlock.md, docs/seccomp.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    pub enforcement: SandboxEnforcement,
    /// User to switch to when started as root (name or id).
    pub user: String,
    /// Group to switch to when started as root (name or id).
    pub group: String,
    /// Debugging escape hatch: log forbidden system calls instead of killing the process.
    pub seccomp_log_only: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            enforcement: SandboxEnforcement::Required,
            user: "nobody".into(),
            group: "nogroup".into(),
            seccomp_log_only: false,
        }
    }
}

/// The host firewall generated by `bulwark firewall print|apply|verify` (docs/firewall.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirewallConfig {
    /// nftables table (family inet) that holds Bulwark's rules.
    pub table: String,
    /// Networks allowed to reach the API port (`ADDR/LEN`); empty means any.
    pub api_sources: Vec<SourceCidr>,
    /// New API connections per second allowed from one source address; 0 disables the limit.
    pub api_new_connections_per_second: u32,
    /// Burst above that rate.
    pub api_new_connections_burst: u32,
    /// User whose outbound traffic is limited to the peers; defaults to sandbox.user.
    pub engine_user: Option<String>,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        Self {
            table: "bulwark".into(),
            api_sources: Vec::new(),
            api_new_connections_per_second: 20,
            api_new_connections_burst: 40,
            engine_user: None,
        }
    }
}

/// The allowed range of every numeric limit: large enough for any deployment, small enough
/// that no value can overflow what it sizes (a semaphore, a timer, an allocation).
fn limit_ranges(l: &Limits) -> [(&'static str, u64, std::ops::RangeInclusive<u64>); 16] {
    const DAY: u64 = 86_400;
    const MANY: u64 = 1 << 20;
    [
        (
            "header_read_timeout_secs",
            l.header_read_timeout_secs,
            1..=DAY,
        ),
        ("idle_timeout_secs", l.idle_timeout_secs, 1..=DAY),
        ("body_read_timeout_secs", l.body_read_timeout_secs, 1..=DAY),
        ("write_timeout_secs", l.write_timeout_secs, 1..=DAY),
        ("max_connections", l.max_connections as u64, 1..=MANY),
        (
            "max_connections_per_source",
            l.max_connections_per_source as u64,
            0..=MANY,
        ),
        ("max_in_flight", l.max_in_flight as u64, 1..=MANY),
        (
            "rate_limit_per_minute",
            u64::from(l.rate_limit_per_minute),
            0..=MANY,
        ),
        ("max_tokens", l.max_tokens as u64, 1..=MANY),
        ("max_prompt_tokens", l.max_prompt_tokens as u64, 1..=MANY),
        ("queue_depth", l.queue_depth as u64, 1..=MANY),
        ("max_messages", l.max_messages as u64, 1..=MANY),
        ("max_stop_sequences", l.max_stop_sequences as u64, 0..=64),
        (
            "max_headers",
            l.max_headers as u64,
            1..=MAX_HEADERS_CEILING as u64,
        ),
        (
            "max_body_bytes",
            l.max_body_bytes as u64,
            1..=MAX_BODY_BYTES_CEILING as u64,
        ),
        (
            "max_header_bytes",
            l.max_header_bytes as u64,
            1024..=MAX_HEADER_BYTES_CEILING as u64,
        ),
    ]
}

/// Hard ceilings the configuration itself cannot raise (they protect the process).
const MAX_BODY_BYTES_CEILING: usize = 64 << 20;
const MAX_HEADER_BYTES_CEILING: usize = 1 << 20;
/// hyper's own hard cap on the number of headers it parses.
pub const MAX_HEADERS_CEILING: usize = 100;

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::files::read_small(path, "configuration")?;
        let mut cfg: Config = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}", explain_toml_error(&text, &e)))
            .with_context(|| format!("configuration {} is invalid", path.display()))?;
        cfg.base_dir = path.parent().map(Path::to_owned).unwrap_or_default();
        cfg.validate()
            .with_context(|| format!("configuration {} is invalid", path.display()))?;
        Ok(cfg)
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The API section; present on every node but a cluster worker (checked by `validate`).
    /// The API listener's settings (`[server]`; a cluster worker has none).
    pub fn api(&self) -> Result<&ServerConfig> {
        self.server
            .as_ref()
            .context("[server] is required (only a cluster worker has none)")
    }

    /// The node's cluster role, if it is part of a cluster.
    pub fn role(&self) -> Option<Role> {
        self.cluster.as_ref().map(|c| c.role)
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        match (&self.server, self.role()) {
            (Some(_), Some(Role::Worker)) => bail!(
                "[server] must be absent on a cluster worker: a worker serves no API                  (cluster.role = \"worker\")"
            ),
            (Some(s), _) => self.validate_server(s)?,
            (None, Some(Role::Worker)) => {}
            (None, _) => bail!("[server] is required (only a cluster worker has none)"),
        }
        self.validate_rest()
    }

    fn validate_server(&self, s: &ServerConfig) -> Result<()> {
        if s.plaintext {
            ensure!(
                s.listen.ip().is_loopback(),
                "server.plaintext = true is only allowed on a loopback server.listen address \
                 (got {}); use TLS (server.tls_cert, server.tls_key)",
                s.listen
            );
            ensure!(
                s.client_ca.is_none(),
                "server.client_ca needs TLS; it cannot be combined with server.plaintext"
            );
            ensure!(
                s.tls_cert.is_none() && s.tls_key.is_none(),
                "server.plaintext = true cannot be combined with server.tls_cert or \
                 server.tls_key; choose one"
            );
        } else {
            ensure!(
                s.tls_cert.is_some(),
                "server.tls_cert is required unless server.plaintext = true"
            );
            ensure!(
                s.tls_key.is_some(),
                "server.tls_key is required unless server.plaintext = true"
            );
        }
        for o in &s.cors_origins {
            validate_origin(o).with_context(|| format!("server.cors_origins entry {o:?}"))?;
        }
        if let Some(addr) = self.metrics.listen {
            ensure!(
                !same_socket(addr, s.listen),
                "metrics.listen {addr} and server.listen {} are the same port; metrics need a \
                 listener of their own",
                s.listen
            );
        }
        Ok(())
    }

    fn validate_rest(&self) -> Result<()> {
        self.validate_model()?;
        for (key, value, range) in limit_ranges(&self.limits) {
            ensure!(
                range.contains(&value),
                "limits.{key} must be between {} and {} (got {value})",
                range.start(),
                range.end()
            );
        }
        self.validate_sandbox_and_firewall()?;
        self.validate_engine()?;
        self.validate_metrics()
    }

    fn validate_model(&self) -> Result<()> {
        let m = &self.model;
        ensure!(
            !m.path.to_string_lossy().contains("://"),
            "model.path {:?} is a URL; models are loaded only from local files",
            m.path
        );
        match (&m.sha256, &m.files) {
            (Some(_), Some(_)) => bail!(
                "model.sha256 and model.files are both set: pin a GGUF file with model.sha256, a \
                 Hugging Face directory with model.files"
            ),
            (None, None) => bail!(
                "model.sha256 (a GGUF file) or model.files (a directory) is required: print it \
                 with `bulwark model hash PATH`"
            ),
            (None, Some(files)) => {
                ensure!(!files.is_empty(), "model.files is empty");
                if let Some(bad) = files
                    .keys()
                    .find(|n| !crate::model::pin::valid_file_name(n))
                {
                    bail!("model.files: {bad:?} is not a plain file name in the model directory");
                }
                ensure!(
                    m.weights != Some(WeightFormat::Quantized),
                    "model.weights = \"quantized\" needs a GGUF file; a Hugging Face directory \
                     holds f32, f16 or bf16 weights: use \"f32\" or \"f16\""
                );
            }
            (Some(_), None) => {}
        }
        ensure!(
            m.context_length.is_none_or(|n| (1..=1 << 24).contains(&n)),
            "model.context_length must be between 1 and {} tokens",
            1 << 24
        );
        ensure!(
            !m.name.is_empty() && m.name.len() <= 128 && !m.name.chars().any(char::is_control),
            "model.name must be 1 to 128 printable characters"
        );
        Ok(())
    }

    fn validate_sandbox_and_firewall(&self) -> Result<()> {
        ensure!(
            self.sandbox.user != "root" && self.sandbox.user != "0",
            "sandbox.user must be an unprivileged user, not root"
        );
        ensure!(
            !self.firewall.table.is_empty()
                && self.firewall.table.len() <= 32
                && self
                    .firewall
                    .table
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "firewall.table must be 1 to 32 characters of a-z, 0-9 and _"
        );
        Ok(())
    }

    fn validate_engine(&self) -> Result<()> {
        let e = &self.engine;
        ensure!(
            (1..=256).contains(&e.max_batch),
            "engine.max_batch must be between 1 and 256"
        );
        ensure!(
            e.max_batch_tokens >= 16,
            "engine.max_batch_tokens must be at least 16"
        );
        ensure!(
            (1..=64).contains(&e.io_threads),
            "engine.io_threads must be between 1 and 64"
        );
        ensure!(
            e.prefix_cache_mb <= 65_536,
            "engine.prefix_cache_mb must be at most 65536 (64 GiB)"
        );
        match self.cuda_ordinal() {
            Some(_) if !cfg!(feature = "cuda") => {
                bail!(
                    "engine.device {:?} needs a build with the cuda feature (cargo build --features cuda)",
                    e.device
                )
            }
            Some(_) => ensure!(
                self.sandbox.enforcement == SandboxEnforcement::BestEffort,
                "engine.device {:?}: the CUDA driver starts threads while the model loads, before \
                 confinement, and Landlock (ABI < 8) cannot restrict them; set \
                 sandbox.enforcement = \"best-effort\" to serve on a GPU (seccomp still covers every thread)",
                e.device
            ),
            None => {}
        }
        Ok(())
    }

    fn validate_metrics(&self) -> Result<()> {
        if let Some(addr) = self.metrics.listen {
            ensure!(
                addr.ip().is_loopback() || self.metrics.allow_non_loopback,
                "metrics.listen {addr} is not loopback; metrics carry operational data, set \
                 metrics.allow_non_loopback = true to expose them deliberately"
            );
            if let Some(listen) = self.cluster.as_ref().and_then(|c| c.listen) {
                ensure!(
                    addr != listen,
                    "metrics.listen must differ from cluster.listen"
                );
            }
        }
        Ok(())
    }

    /// `Some(N)` for `engine.device = "cuda:N"`, `None` for the CPU.
    pub fn cuda_ordinal(&self) -> Option<usize> {
        match self.engine.device {
            Device::Cpu => None,
            Device::Cuda(n) => Some(n),
        }
    }

    pub fn compute_threads(&self) -> usize {
        if self.engine.threads > 0 {
            return self.engine.threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_sub(1).max(1)
    }
}

/// A TOML error as a user can act on it: the dotted key it is about (from the table header
/// above the offending line), and Rust type names replaced by what they mean.
fn explain_toml_error(text: &str, e: &toml::de::Error) -> String {
    let plain = e
        .message()
        .replace("expected usize", "expected a non-negative integer")
        .replace("expected u64", "expected a non-negative integer")
        .replace("expected u32", "expected a non-negative integer")
        .replace("expected u16", "expected a port number")
        .replace("expected i64", "expected an integer")
        .replace("expected f32", "expected a number")
        .replace("expected f64", "expected a number");
    let Some(span) = e.span() else {
        return format!("{e}");
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.rsplit('\n').next().unwrap_or("");
    let key = line
        .split('=')
        .next()
        .map(str::trim)
        .filter(|k| !k.is_empty() && line.contains('='));
    let table = before
        .lines()
        .rev()
        .find_map(|l| {
            let l = l.trim();
            l.strip_prefix("[[")
                .and_then(|r| r.strip_suffix("]]"))
                .or_else(|| l.strip_prefix('[').and_then(|r| r.strip_suffix(']')))
        })
        .map(str::trim);
    let line_no = before.matches('\n').count() + 1;
    match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k} (line {line_no}): {plain}"),
        (None, Some(k)) => format!("{k} (line {line_no}): {plain}"),
        _ => format!("line {line_no}: {plain}"),
    }
}

/// Whether two listeners would need the same port: same port, and the same address or either
/// one on every address.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// An origin is `scheme://host[:port]` exactly as browsers send it: no path, no wildcard.
fn validate_origin(o: &str) -> Result<()> {
    if o.contains('*') {
        bail!("wildcards are not allowed; list each origin exactly");
    }
    let rest = o
        .strip_prefix("https://")
        .or_else(|| o.strip_prefix("http://"))
        .context("an origin starts with https:// or http://")?;
    ensure!(!rest.is_empty(), "an origin needs a host");
    ensure!(
        !rest.contains('/'),
        "an origin has no path (not even a trailing /)"
    );
    ensure!(
        rest.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']')),
        "an origin contains only a host and an optional port"
    );
    ensure!(
        o == o.to_ascii_lowercase(),
        "write the origin in lower case, as browsers send it"
    );
    Ok(())
}

/// The one builder of configurations for the library's unit tests (the integration tests
/// have `engine/tests/it/util.rs::config`, which points at the real demo model).
#[cfg(test)]
pub(crate) mod testing {
    use super::{Config, explain_toml_error};

    /// `[server]` (TLS on 0.0.0.0:8443) and `[model]`, as TOML.
    pub(crate) fn server_base() -> String {
        format!("[server]\n{}{}", server_keys(), model_section())
    }

    /// `[model]` alone, as TOML: what a cluster worker's configuration starts with.
    pub(crate) fn model_section() -> String {
        "[model]\npath = \"m.gguf\"\nsha256 = \"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\"\nname = \"smollm2\"\n".to_owned()
    }

    fn server_keys() -> &'static str {
        "listen = \"0.0.0.0:8443\"\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\nkeys_file = \"keys\"\n"
    }

    /// Parses and validates, with the errors the server itself would print.
    pub(crate) fn parse(s: &str) -> anyhow::Result<Config> {
        let cfg: Config =
            toml::from_str(s).map_err(|e| anyhow::anyhow!("{}", explain_toml_error(s, &e)))?;
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::parse;
    use super::*;

    fn base() -> String {
        super::testing::server_base()
    }

    #[test]
    fn minimal_config_is_valid() {
        parse(&base()).unwrap();
    }

    /// Unset, `model.weights` is the packed quantized path on the CPU and f32 on CUDA; a
    /// value given is kept on both.
    #[test]
    fn weights_default_by_device() {
        let cpu = candle_core::Device::Cpu;
        let unset = parse(&base()).unwrap();
        assert_eq!(unset.model.weights_on(&cpu), WeightFormat::Quantized);
        let f32 = parse(&base().replace(
            "name = \"smollm2\"",
            "name = \"smollm2\"\nweights = \"f32\"",
        ))
        .unwrap();
        assert_eq!(f32.model.weights_on(&cpu), WeightFormat::F32);
    }

    #[test]
    fn prefix_cache_budget_is_bounded_by_name() {
        let ok = parse(&format!("{}\n[engine]\nprefix_cache_mb = 0\n", base())).unwrap();
        assert_eq!(ok.engine.prefix_cache_mb, 0);
        let err = parse(&format!("{}\n[engine]\nprefix_cache_mb = 65537\n", base())).unwrap_err();
        assert!(
            format!("{err:#}").contains("engine.prefix_cache_mb"),
            "{err:#}"
        );
    }

    /// The listener's transport is decided once, from the validated keys.
    #[test]
    fn transport_is_tls_or_loopback_plaintext() {
        let tls = parse(&base().replace("keys_file", "client_ca = \"ca.pem\"\nkeys_file")).unwrap();
        assert_eq!(
            tls.api().unwrap().transport().unwrap(),
            Transport::Tls {
                cert: Path::new("cert.pem"),
                key: Path::new("key.pem"),
                client_ca: Some(Path::new("ca.pem")),
            }
        );
        let plain = base().replace("0.0.0.0:8443", "127.0.0.1:8443").replace(
            "tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"",
            "plaintext = true",
        );
        let plain = parse(&plain).unwrap();
        assert_eq!(
            plain.api().unwrap().transport().unwrap(),
            Transport::LoopbackPlaintext
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse(&format!("{}\n[limits]\nmax_tokenz = 5\n", base())).unwrap_err();
        assert!(format!("{err:#}").contains("max_tokenz"), "{err:#}");
    }

    #[test]
    fn cors_wildcard_is_rejected() {
        let s = base().replace(
            "keys_file = \"keys\"",
            "keys_file = \"keys\"\ncors_origins = [\"*\"]",
        );
        let err = parse(&s).unwrap_err();
        assert!(format!("{err:#}").contains("wildcard"), "{err:#}");
        let s = base().replace(
            "keys_file = \"keys\"",
            "keys_file = \"keys\"\ncors_origins = [\"https://*.example.com\"]",
        );
        assert!(parse(&s).is_err());
    }

    #[test]
    fn plaintext_only_on_loopback() {
        let s = base().replace(
            "tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"",
            "plaintext = true",
        );
        let err = parse(&s).unwrap_err();
        assert!(format!("{err:#}").contains("loopback"), "{err:#}");
        parse(&s.replace("0.0.0.0:8443", "127.0.0.1:8443")).unwrap();
    }

    #[test]
    fn tls_required_by_default() {
        let s = base().replace("tls_cert = \"cert.pem\"\n", "");
        let err = parse(&s).unwrap_err();
        assert!(format!("{err:#}").contains("server.tls_cert"), "{err:#}");
    }

    #[test]
    fn metrics_on_public_address_needs_opt_in() {
        let s = format!("{}\n[metrics]\nlisten = \"0.0.0.0:9464\"\n", base());
        let err = parse(&s).unwrap_err();
        assert!(
            format!("{err:#}").contains("metrics.allow_non_loopback"),
            "{err:#}"
        );
    }

    #[test]
    fn cuda_device_needs_the_feature_and_best_effort() {
        let err = parse(&format!("{}\n[engine]\ndevice = \"cuda:0\"\n", base())).unwrap_err();
        let msg = format!("{err:#}");
        if cfg!(feature = "cuda") {
            assert!(msg.contains("best-effort"), "{msg}");
        } else {
            assert!(msg.contains("cuda feature"), "{msg}");
        }
        let err = parse(&format!("{}\n[engine]\ndevice = \"gpu\"\n", base())).unwrap_err();
        assert!(format!("{err:#}").contains("engine.device"));
    }

    #[test]
    fn firewall_and_sandbox_keys_are_validated_by_name() {
        let err = parse(&format!(
            "{}\n[firewall]\napi_sources = [\"10.0.0.0/40\"]\n",
            base()
        ))
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("firewall.api_sources"),
            "{err:#}"
        );
        let err = parse(&format!("{}\n[firewall]\ntable = \"Bad-Name\"\n", base())).unwrap_err();
        assert!(format!("{err:#}").contains("firewall.table"), "{err:#}");
        let err = parse(&format!("{}\n[sandbox]\nuser = \"root\"\n", base())).unwrap_err();
        assert!(format!("{err:#}").contains("sandbox.user"), "{err:#}");
        let err = parse(&format!(
            "{}\n[sandbox]\nenforcement = \"sometimes\"\n",
            base()
        ))
        .unwrap_err();
        assert!(format!("{err:#}").contains("enforcement"), "{err:#}");
    }

    #[test]
    fn limits_out_of_range_are_named_not_a_panic_later() {
        // Regression: i64::MAX passed check-config and made the server panic after confinement.
        for key in [
            "max_connections",
            "max_in_flight",
            "queue_depth",
            "idle_timeout_secs",
        ] {
            let err = parse(&format!(
                "{}\n[limits]\n{key} = 9223372036854775807\n",
                base()
            ))
            .unwrap_err();
            assert!(
                format!("{err:#}").contains(&format!("limits.{key}")),
                "{err:#}"
            );
        }
        let err = parse(&format!(
            "{}\n[limits]\nbody_read_timeout_secs = 0\n",
            base()
        ))
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("limits.body_read_timeout_secs"),
            "{err:#}"
        );
    }

    #[test]
    fn check_config_refuses_what_serve_could_not_use() {
        let cases = [
            (
                base().replace("path = \"m.gguf\"", "path = \"https://example.com/m.gguf\""),
                "model.path",
            ),
            (
                base().replace(
                    "name = \"smollm2\"",
                    "name = \"smollm2\"\ncontext_length = 0",
                ),
                "model.context_length",
            ),
            (
                base()
                    .replace("0.0.0.0:8443", "127.0.0.1:8443")
                    .replace("keys_file", "plaintext = true\nkeys_file"),
                "server.plaintext",
            ),
            (
                format!("{}\n[metrics]\nlisten = \"127.0.0.1:8443\"\n", base()),
                "metrics.listen",
            ),
        ];
        for (text, key) in cases {
            let err = parse(&text).unwrap_err();
            assert!(format!("{err:#}").contains(key), "{key}: {err:#}");
        }
    }

    #[test]
    fn type_errors_name_the_key_in_words() {
        let text = format!("{}\n[limits]\nmax_tokens = \"lots\"\n", base());
        let e = toml::from_str::<Config>(&text).unwrap_err();
        let msg = explain_toml_error(&text, &e);
        assert!(msg.starts_with("limits.max_tokens"), "{msg}");
        assert!(
            msg.contains("non-negative integer") && !msg.contains("usize"),
            "{msg}"
        );
    }

    /// `model.files` replaces `model.sha256` for a directory: exactly one of them, plain file
    /// names only, and no quantized weights (a directory has none); a table that passes is the
    /// pin the loader checks.
    #[test]
    fn a_directory_is_pinned_by_files_alone() {
        let sha = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
        let dir = |extra: &str, files: &str| {
            base().replace(&format!("sha256 = \"{sha}\"\n"), extra)
                + &format!("\n[model.files]\n{files}")
        };
        let ok = parse(&dir("", &format!("\"config.json\" = \"{sha}\"\n"))).unwrap();
        assert!(matches!(ok.model.pin(), crate::model::pin::Pin::Files(f) if f.len() == 1));
        assert_eq!(
            ok.model.weights_on(&candle_core::Device::Cpu),
            WeightFormat::F32
        );
        for (extra, files, want) in [
            (
                format!("sha256 = \"{sha}\"\n"),
                format!("\"config.json\" = \"{sha}\"\n"),
                "both set",
            ),
            (String::new(), String::new(), "model.files is empty"),
            (
                String::new(),
                format!("\"../keys\" = \"{sha}\"\n"),
                "not a plain file name",
            ),
            (
                "weights = \"quantized\"\n".into(),
                format!("\"config.json\" = \"{sha}\"\n"),
                "needs a GGUF file",
            ),
        ] {
            let err = format!("{:#}", parse(&dir(&extra, &files)).unwrap_err());
            assert!(err.contains(want), "{want}: {err}");
        }
        let neither = base().replace(&format!("sha256 = \"{sha}\"\n"), "");
        assert!(format!("{:#}", parse(&neither).unwrap_err()).contains("is required"));
    }

    #[test]
    fn bad_pin_is_named() {
        let s = base().replace(
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "abc",
        );
        let err = parse(&s).unwrap_err();
        assert!(format!("{err:#}").contains("model.sha256"), "{err:#}");
    }
}
