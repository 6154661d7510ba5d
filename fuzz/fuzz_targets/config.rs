//! The configuration file as `bulwark check-config`, `serve` and `firewall print` read it:
//! TOML into `Config` (deny_unknown_fields throughout), `validate()`, then everything derived
//! from a valid configuration without touching the network: roles, paths, compute threads and
//! the rendered nftables table (text and JSON).
#![no_main]

use std::path::Path;

use bulwark::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = toml::from_str::<Config>(text) else {
        return;
    };
    if cfg.validate().is_err() {
        return;
    }
    let _ = cfg.role();
    let _ = cfg.api();
    let _ = cfg.cuda_ordinal();
    let _ = cfg.compute_threads();
    let _ = cfg.resolve(Path::new("relative/file"));
    if let Some(c) = &cfg.cluster {
        let _ = c.layer_range();
        let _ = c.worker_peer();
        let _ = c.total_layers();
    }
    if let Ok(policy) = bulwark::firewall_cmd::policy(&cfg)
        && let Ok(rules) = policy.render()
    {
        let _ = rules.to_nft();
        let _ = rules.to_json();
    }
});
