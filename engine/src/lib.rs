//! Bulwark: a secure-by-default LLM inference server. The binary is `src/main.rs`; this library
//! exposes the parts so that integration tests can drive them without a socket.

pub mod api;
pub mod audit;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod confine;
pub mod digest;
pub mod files;
pub mod firewall_cmd;
pub mod infer;
pub mod keys;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod serve;
pub mod tls;
