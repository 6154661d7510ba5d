//! Golden files for representative policies, and `nft -c` on every rendering (text and JSON).
//! Set UPDATE_GOLDEN=1 to rewrite the files after an intended change, then review the diff.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use firewall::{Egress, InternalPort, Policy, Rate};

fn single() -> Policy {
    Policy {
        table: "bulwark".into(),
        api_port: Some(8443),
        api_sources: vec![],
        api_rate: Some(Rate {
            per_second: 20,
            burst: 40,
        }),
        internal: vec![],
        metrics_port: Some(9464),
        egress: Some(Egress {
            uid: 65534,
            peers: vec![],
        }),
    }
}

fn pipeline_head() -> Policy {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    Policy {
        table: "bulwark".into(),
        api_port: Some(8443),
        api_sources: vec![
            "10.20.0.0/16".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
            "192.168.1.7".parse().unwrap(),
        ],
        api_rate: Some(Rate {
            per_second: 50,
            burst: 100,
        }),
        internal: vec![InternalPort {
            name: "stage".into(),
            port: 7100,
            peers: vec![ip("10.77.0.3"), ip("10.77.0.2"), ip("fd00::3")],
        }],
        metrics_port: Some(9464),
        egress: Some(Egress {
            uid: 990,
            peers: vec![(ip("10.77.0.3"), 7100), (ip("10.77.0.2"), 7100)],
        }),
    }
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn check_golden(name: &str, actual: &str) {
    let path = dir().join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} missing; run with UPDATE_GOLDEN=1", path.display()));
    assert_eq!(actual, expected, "{name} differs from its golden file");
}

fn nft_check(args: &[&str], content: &str) {
    // One file per call: the tests run in parallel threads of one process, and a name made
    // of the pid and the arguments alone was shared by two of them (nft then read the other
    // test's file).
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = std::env::temp_dir().join(format!("fw-{}-{n}.nft", std::process::id()));
    std::fs::write(&tmp, content).unwrap();
    let out = Command::new("nft")
        .args(args)
        .arg("-c")
        .arg("-f")
        .arg(&tmp)
        .output()
        .expect("nft must be installed (apt-get install nftables)");
    let _ = std::fs::remove_file(&tmp);
    assert!(
        out.status.success(),
        "nft -c rejected it:\n{}\n{content}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn single_node_golden_and_valid() {
    let rs = single().render().unwrap();
    check_golden("single.nft", &rs.to_nft());
    check_golden("single.json", &rs.to_json());
    nft_check(&[], &rs.to_nft());
    nft_check(&["-j"], &rs.to_json());
}

#[test]
fn pipeline_head_golden_and_valid() {
    let rs = pipeline_head().render().unwrap();
    check_golden("pipeline-head.nft", &rs.to_nft());
    check_golden("pipeline-head.json", &rs.to_json());
    nft_check(&[], &rs.to_nft());
    nft_check(&["-j"], &rs.to_json());
}

#[test]
fn rendering_is_deterministic_whatever_the_input_order() {
    let mut p = pipeline_head();
    let a = p.render().unwrap().to_nft();
    p.api_sources.reverse();
    p.internal[0].peers.reverse();
    p.egress.as_mut().unwrap().peers.reverse();
    assert_eq!(a, p.render().unwrap().to_nft());
}

#[test]
fn every_rule_has_a_unique_reason() {
    for p in [single(), pipeline_head()] {
        let rs = p.render().unwrap();
        let comments = rs.rule_comments();
        let unique: std::collections::BTreeSet<_> = comments.iter().collect();
        assert_eq!(unique.len(), comments.len(), "{comments:?}");
        assert!(comments.iter().all(|(_, c)| c.len() > 8));
    }
}

#[test]
fn bad_policies_are_refused() {
    let mut p = single();
    p.metrics_port = Some(8443);
    assert!(p.render().is_err());
    let mut p = pipeline_head();
    p.internal[0].name = "Stage!".into();
    assert!(p.render().is_err());
    assert!("10.0.0.0/33".parse::<firewall::Cidr>().is_err());
}
