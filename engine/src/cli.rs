//! Command-line interface (the commands and their contracts: README.md, "Commands").

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::LogFormat;

#[derive(Parser)]
#[command(
    name = "bulwark",
    about = "Secure-by-default LLM inference server",
    disable_version_flag = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve the configured model over the OpenAI-compatible API.
    Serve {
        #[arg(long)]
        config: PathBuf,
        /// Overrides log.format from the configuration.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Validate a configuration file and exit.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
        /// Also load the keys file and TLS material and verify the model's pinned hash.
        #[arg(long)]
        check_files: bool,
    },
    /// Create a ready-to-serve directory: configuration, certificate, key and one API key.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// The model id clients use; defaults to the file name without extension.
        #[arg(long)]
        name: Option<String>,
    },
    /// The host firewall (nftables) implied by the configuration.
    Firewall {
        #[command(subcommand)]
        command: FirewallCommand,
    },
    /// Probe any OpenAI-compatible server's HTTP posture; exit 0 clean, 1 findings, 2 unreachable
    /// or a usage error, 3 inconclusive (no finding, but some probes got no definite answer).
    Audit {
        /// Base URL, e.g. https://host:8443
        url: String,
        /// File holding an API key (first line), for the authenticated pass.
        #[arg(long)]
        api_key_file: Option<PathBuf>,
        /// CA bundle (PEM) to verify the server with; default: the system's.
        #[arg(long, conflicts_with = "insecure")]
        ca: Option<PathBuf>,
        /// Do not verify the server's certificate.
        #[arg(long)]
        insecure: bool,
        /// Seconds per probe.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// Seconds for the whole audit; probes not sent by then count as inconclusive.
        #[arg(long, default_value_t = 120)]
        deadline: u64,
        #[arg(long, value_enum, default_value = "text")]
        format: AuditFormat,
        /// Send real empty POSTs to state-changing routes (/pause, /sleep, ...) instead of GETs.
        #[arg(long)]
        intrusive: bool,
    },
    /// API key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Model file tools.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// The cluster's CA and node certificates (docs/cluster.md).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// The self-confinement's tables, for review (docs/seccomp.md).
    Sandbox {
        #[command(subcommand)]
        command: SandboxCommand,
    },
}

#[derive(Subcommand)]
pub enum SandboxCommand {
    /// Print the seccomp allowlists as JSON: per thread category, every allowed system call
    /// with its number, its argument condition and the reason it is needed.
    Allowlist {
        /// The lists of a server on a GPU (`engine.device = "cuda:N"`): a few more calls for
        /// the driver.
        #[arg(long)]
        gpu: bool,
    },
}

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Make a new cluster CA in DIR: ca.pem and ca.key (0600).
    Ca {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate (server and client) signed by the CA in --ca-dir: OUT/cert.pem
    /// and OUT/key.pem (0600), with NODE as its DNS name and every --ip as an IP name.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long = "ip")]
        ips: Vec<std::net::IpAddr>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum FirewallCommand {
    /// Render the table (nft script by default).
    Print {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "nft")]
        format: FirewallFormat,
    },
    /// Load the table into the current network namespace, replacing it atomically.
    Apply {
        #[arg(long)]
        config: PathBuf,
    },
    /// Compare the live table with the rendered one; exit 1 on drift, saying what differs.
    Verify {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum AuditFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum FirewallFormat {
    Nft,
    Json,
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Append a new hashed key to the keys file and print the key once.
    New {
        #[arg(long)]
        name: String,
        #[arg(long)]
        keys_file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Print the pin of a model: a GGUF file's SHA-256 (model.sha256), or a Hugging Face
    /// directory's model.files table.
    Hash { path: PathBuf },
    /// Architecture, tensors and tokenizer summary.
    Inspect { file: PathBuf },
}
