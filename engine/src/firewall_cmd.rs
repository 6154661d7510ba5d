//! `bulwark firewall print|apply|verify`: the host's nftables table, from the configuration the
//! server runs with. What is opened and why: docs/firewall.md.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::config::Config;

/// The firewall policy implied by a configuration.
pub fn policy(cfg: &Config) -> Result<firewall::Policy> {
    let user = cfg
        .firewall
        .engine_user
        .as_deref()
        .unwrap_or(&cfg.sandbox.user);
    let (uid, _) = sandbox::resolve_user(user, &cfg.sandbox.group).with_context(|| {
        format!("resolving the engine user {user:?} (firewall.engine_user or sandbox.user)")
    })?;
    let f = &cfg.firewall;
    Ok(firewall::Policy {
        table: f.table.clone(),
        api_port: cfg.server.as_ref().map(|s| s.listen.port()),
        api_sources: f.api_sources.iter().map(|c| c.0).collect(),
        api_rate: (f.api_new_connections_per_second > 0).then_some(firewall::Rate {
            per_second: f.api_new_connections_per_second,
            burst: f.api_new_connections_burst,
        }),
        internal: internal_ports(cfg),
        metrics_port: cfg.metrics.listen.map(|a| a.port()),
        egress: Some(firewall::Egress {
            uid,
            peers: egress_peers(cfg),
        }),
    })
}

/// A worker's internal port, open to its head's address only.
fn internal_ports(cfg: &Config) -> Vec<firewall::InternalPort> {
    match cfg.cluster.as_ref().and_then(|c| c.worker_peer()) {
        Some(w) => vec![firewall::InternalPort {
            name: "cluster".into(),
            port: w.listen.port(),
            peers: vec![w.head_address],
        }],
        None => Vec::new(),
    }
}

/// The head's stages: the only destinations the engine's user may connect to.
fn egress_peers(cfg: &Config) -> Vec<(std::net::IpAddr, u16)> {
    cfg.cluster
        .iter()
        .flat_map(|c| c.stages.iter())
        .map(|s| (s.address.ip(), s.address.port()))
        .collect()
}

pub fn print(cfg: &Config, json: bool) -> Result<()> {
    let rs = policy(cfg)?.render()?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", rs.to_json())?;
    } else {
        write!(out, "{}", rs.to_nft())?;
    }
    Ok(())
}

/// Load the table into the current network namespace (atomically replacing the old one).
pub fn apply(cfg: &Config) -> Result<()> {
    let rs = policy(cfg)?.render()?;
    nftables::helper::apply_ruleset(&rs.to_nftables())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("loading the ruleset with nft")?;
    eprintln!("loaded table inet {}", rs.table);
    Ok(())
}

fn run(mut cmd: Command, stdin: Option<&str>) -> Result<std::process::Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("running nft (apt-get install nftables)")?;
    if let Some(s) = stdin {
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(s.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

/// nft's own listing of `script` once loaded, from a scratch network namespace: the canonical
/// form (order of set elements and ICMP types...) to compare a live table with.
fn canonical_listing(script: &str, table: &str) -> Result<String> {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--net",
        "sh",
        "-c",
        &format!("nft -f - && nft list table inet {table}"),
    ]);
    let out = run(cmd, Some(script))?;
    if !out.status.success() {
        bail!(
            "nft rejected the rendered ruleset: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Strip what changes at run time (counters, handles) and blank lines.
fn normalize(listing: &str) -> Vec<String> {
    listing
        .lines()
        .map(|l| {
            let mut l = l.trim().to_owned();
            while let Some(i) = l.find("counter packets ") {
                let rest = &l[i..];
                let end = rest
                    .find(" bytes ")
                    .and_then(|b| rest[b + 7..].find(' ').map(|e| b + 7 + e + 1))
                    .unwrap_or(rest.len());
                l.replace_range(i..i + end, "");
            }
            if let Some(i) = l.find(" # handle ") {
                l.truncate(i);
            }
            l
        })
        .filter(|l| !l.is_empty())
        .collect()
}

fn comment_of(line: &str) -> Option<&str> {
    line.split_once("comment \"")
        .map(|(_, c)| c.trim_end_matches('"'))
}

/// Differences between the expected and the live table, in words; empty when they match.
pub fn diff(expected: &[String], live: &[String]) -> Vec<String> {
    let missing: Vec<&String> = expected.iter().filter(|l| !live.contains(l)).collect();
    let added: Vec<&String> = live.iter().filter(|l| !expected.contains(l)).collect();
    let mut out = Vec::new();
    for m in &missing {
        match comment_of(m).and_then(|c| added.iter().find(|a| comment_of(a) == Some(c))) {
            Some(a) => out.push(format!("changed: {m}\n     now: {a}")),
            None => out.push(format!("missing: {m}")),
        }
    }
    for a in &added {
        if !comment_of(a).is_some_and(|c| missing.iter().any(|m| comment_of(m) == Some(c))) {
            out.push(format!("added:   {a}"));
        }
    }
    if out.is_empty() && expected != live {
        out.push("rules are in a different order".into());
    }
    out
}

/// Compare the live table with the rendered one; returns Ok(false) on drift (printed).
pub fn verify(cfg: &Config) -> Result<bool> {
    let rs = policy(cfg)?.render()?;
    // nft's own rendering of what we would load, from a scratch network namespace: the
    // canonical form (ordering of set elements, ICMP types...) to compare the live table with.
    let canonical = canonical_listing(&rs.to_nft(), &rs.table)?;
    let mut list = Command::new("nft");
    list.args(["list", "table", "inet", &rs.table]);
    let live = run(list, None)?;
    if !live.status.success() {
        println!("drift: table inet {} is not loaded", rs.table);
        return Ok(false);
    }
    let d = diff(
        &normalize(&canonical),
        &normalize(&String::from_utf8_lossy(&live.stdout)),
    );
    if d.is_empty() {
        println!("table inet {} matches the configuration", rs.table);
        Ok(true)
    } else {
        println!("drift in table inet {}:", rs.table);
        for l in d {
            println!("  {l}");
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "{}[sandbox]\nuser = \"65534\"\ngroup = \"65534\"\n{extra}",
            crate::config::testing::server_base()
        );
        crate::config::testing::parse(&text).unwrap()
    }

    #[test]
    fn policy_follows_the_configuration() {
        let p = policy(&config("[metrics]\nlisten = \"127.0.0.1:9999\"\n[firewall]\napi_sources = [\"10.1.0.0/16\"]\napi_new_connections_per_second = 0\nengine_user = \"4242\"\n")).unwrap();
        assert_eq!(p.api_port, Some(8443));
        assert_eq!(p.metrics_port, Some(9999));
        assert_eq!(p.api_sources, vec!["10.1.0.0/16".parse().unwrap()]);
        assert_eq!(p.api_rate, None, "0 disables the rate limit");
        assert_eq!(
            p.egress.unwrap().uid,
            4242,
            "firewall.engine_user overrides sandbox.user"
        );
        let p = policy(&config("")).unwrap();
        assert_eq!(
            p.api_rate,
            Some(firewall::Rate {
                per_second: 20,
                burst: 40
            })
        );
        assert_eq!(p.egress.unwrap().uid, 65534, "sandbox.user by default");
    }

    const CLUSTER_FILES: &str = "ca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";

    #[test]
    fn worker_opens_its_cluster_port_to_the_head_only_and_no_api() {
        let text = format!(
            "{}[sandbox]\nuser = \"65534\"\ngroup = \"65534\"\n\
             [cluster]\nrole = \"worker\"\nname = \"worker-1\"\n{CLUSTER_FILES}layers = [15, 30]\n\
             listen = \"10.89.0.11:7070\"\nhead_name = \"head\"\nhead_address = \"10.89.0.10\"\n",
            crate::config::testing::model_section()
        );
        let cfg = crate::config::testing::parse(&text).unwrap();
        let p = policy(&cfg).unwrap();
        assert_eq!(p.api_port, None);
        assert_eq!(p.internal.len(), 1);
        assert_eq!(p.internal[0].port, 7070);
        assert_eq!(
            p.internal[0].peers,
            vec!["10.89.0.10".parse::<std::net::IpAddr>().unwrap()]
        );
        assert!(
            p.egress.as_ref().unwrap().peers.is_empty(),
            "a worker dials nothing"
        );
        let nft = p.render().unwrap().to_nft();
        assert!(!nft.contains("8443"), "{nft}");
    }

    #[test]
    fn head_egress_goes_to_its_stages_only() {
        let cfg = config(&format!(
            "[cluster]\nrole = \"head\"\nname = \"head\"\n{CLUSTER_FILES}layers = [0, 8]\n\
             [[cluster.stages]]\nname = \"w1\"\naddress = \"10.0.0.2:7070\"\nlayers = [8, 20]\n\
             [[cluster.stages]]\nname = \"w2\"\naddress = \"10.0.0.3:7071\"\nlayers = [20, 30]\n"
        ));
        let p = policy(&cfg).unwrap();
        assert_eq!(
            p.egress.unwrap().peers,
            vec![
                ("10.0.0.2".parse().unwrap(), 7070),
                ("10.0.0.3".parse().unwrap(), 7071)
            ]
        );
        assert!(p.internal.is_empty());
    }

    #[test]
    fn normalize_strips_counters_and_handles() {
        let n = normalize(
            "  tcp dport 1 counter packets 5 bytes 300 drop comment \"x\" # handle 7\n\n",
        );
        assert_eq!(n, vec!["tcp dport 1 drop comment \"x\"".to_owned()]);
    }

    #[test]
    fn diff_names_missing_added_and_changed_rules() {
        let e: Vec<String> = ["a accept comment \"one\"", "b accept comment \"two\""]
            .map(String::from)
            .into();
        let l: Vec<String> = ["a drop comment \"one\"", "c accept comment \"three\""]
            .map(String::from)
            .into();
        let d = diff(&e, &l).join("\n");
        assert!(d.contains("changed: a accept"), "{d}");
        assert!(d.contains("missing: b accept"), "{d}");
        assert!(d.contains("added:   c accept"), "{d}");
        assert!(diff(&e, &e).is_empty());
    }
}
