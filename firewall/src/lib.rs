//! The host firewall of a Bulwark node: a typed [`Policy`] rendered deterministically into
//! one nftables table, as nft text ([`Ruleset::to_nft`]) and as JSON built with the
//! `nftables` crate ([`Ruleset::to_json`]), every rule carrying its reason as a comment.
//!
//! # Threat model
//! A host on the network that is not a peer must reach nothing but the API port; a peer must
//! reach its internal port and nothing else; the metrics listener is never reachable from the
//! network; and a compromised engine process must not open connections to anything but its
//! peers, even if its own confinement failed.
//!
//! # What is enforced
//! Input policy drop, with loopback, established/related, essential ICMP/ICMPv6, the API port
//! (optionally only from listed CIDRs, with a per-source new-connection rate limit) and each
//! internal port from its peers only. Output: the engine's user (`meta skuid`) may only answer
//! and connect to its peers' ports; other users' traffic is not touched.
//!
//! # Limitations
//! The table is one of several: NixOS or another tool may add its own tables, and a packet must
//! be accepted by every table's chains (a drop anywhere wins). Egress is identified by the
//! engine's uid, so the engine must run as a user of its own.
//!
//! # Test strategy
//! Golden files under `tests/golden/`, `nft -c` on every rendered ruleset, and the netns lab
//! (`vm-tests/lab.py`) with real connections both ways.

#![warn(missing_docs)]

mod json;
mod text;

use std::net::IpAddr;

/// A network prefix, `ADDR/LEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    /// The network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidCidr(s.to_owned());
        let (a, l) = s.split_once('/').map_or((s, None), |(a, l)| (a, Some(l)));
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if len > max {
            return Err(bad());
        }
        Ok(Self { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.len == max {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.len)
        }
    }
}

/// New-connection rate allowed per source address on the API port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Sustained new connections per second.
    pub per_second: u32,
    /// Burst above the rate.
    pub burst: u32,
}

/// An internal port and the peers allowed to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalPort {
    /// Name, used in set names and comments (`[a-z0-9_]`).
    pub name: String,
    /// TCP port.
    pub port: u16,
    /// Peer addresses.
    pub peers: Vec<IpAddr>,
}

/// The engine's own outbound traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    /// The engine's user id (its sockets carry it).
    pub uid: u32,
    /// Peer `(address, port)` pairs it may connect to.
    pub peers: Vec<(IpAddr, u16)>,
}

/// The firewall policy of one node, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// nftables table name (family inet).
    pub table: String,
    /// The API port; `None` on a node that serves no API (a cluster worker).
    pub api_port: Option<u16>,
    /// Sources allowed to reach the API; empty means any.
    pub api_sources: Vec<Cidr>,
    /// Per-source new-connection limit on the API port.
    pub api_rate: Option<Rate>,
    /// Internal ports, each open only to its peers.
    pub internal: Vec<InternalPort>,
    /// The metrics port, never opened (rendered as an explicit drop).
    pub metrics_port: Option<u16>,
    /// The engine's egress, limited to its peers.
    pub egress: Option<Egress>,
}

/// Failures of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A CIDR did not parse.
    #[error("invalid CIDR {0:?}: expected ADDR/LEN")]
    InvalidCidr(String),
    /// A name is not usable in nftables identifiers.
    #[error("invalid name {0:?}: use 1 to 32 characters of a-z, 0-9 and _")]
    InvalidName(String),
    /// Two ports of the policy collide.
    #[error("port {0} is used twice in the firewall policy")]
    PortClash(u16),
}

/// Address family of a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 (`ip`).
    V4,
    /// IPv6 (`ip6`).
    V6,
}

impl Family {
    fn of(a: &IpAddr) -> Self {
        if a.is_ipv4() { Self::V4 } else { Self::V6 }
    }
    fn proto(self) -> &'static str {
        match self {
            Self::V4 => "ip",
            Self::V6 => "ip6",
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Self::V4 => "v4",
            Self::V6 => "v6",
        }
    }
}

/// One condition of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// Arrived on the loopback interface.
    IifLoopback,
    /// Connection-tracking state is one of these.
    CtState(Vec<&'static str>),
    /// TCP destination port.
    TcpDport(u16),
    /// Source address in a named set.
    SaddrInSet(Family, String),
    /// Destination address.
    Daddr(IpAddr),
    /// The socket belongs to this user id.
    SkUid(u32),
    /// ICMPv4 type in the list.
    IcmpType(Vec<&'static str>),
    /// ICMPv6 type in the list.
    Icmpv6Type(Vec<&'static str>),
    /// The source exceeds a per-source rate of new connections (a meter).
    SourceOverRate {
        /// Meter name.
        meter: String,
        /// Address family of the source.
        family: Family,
        /// The rate.
        rate: Rate,
    },
}

/// What a matching packet gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through.
    Accept,
    /// Discard it silently.
    Drop,
}

/// One rule with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// All must hold.
    pub matches: Vec<Match>,
    /// The verdict.
    pub verdict: Verdict,
    /// Why the rule exists (rendered as the nft comment; unique within the table).
    pub comment: String,
}

/// A base chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainDef {
    /// Chain name (`input` or `output`).
    pub name: &'static str,
    /// Default verdict.
    pub policy: Verdict,
    /// Rules in order.
    pub rules: Vec<Rule>,
}

/// A named address set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDef {
    /// Set name.
    pub name: String,
    /// Address family.
    pub family: Family,
    /// Elements (addresses or prefixes), sorted.
    pub elements: Vec<Cidr>,
}

/// The rendered table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// Table name (family inet).
    pub table: String,
    /// Named sets.
    pub sets: Vec<SetDef>,
    /// Base chains.
    pub chains: Vec<ChainDef>,
}

const ICMP_TYPES: &[&str] = &[
    "destination-unreachable",
    "echo-request",
    "parameter-problem",
    "time-exceeded",
];
const ICMPV6_TYPES: &[&str] = &[
    "destination-unreachable",
    "echo-request",
    "nd-neighbor-advert",
    "nd-neighbor-solicit",
    "nd-router-advert",
    "packet-too-big",
    "parameter-problem",
    "time-exceeded",
];

fn check_name(n: &str) -> Result<(), Error> {
    if n.is_empty()
        || n.len() > 32
        || !n
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(Error::InvalidName(n.to_owned()));
    }
    Ok(())
}

/// The named address sets of a table, one per family, built as rules need them.
#[derive(Default)]
struct Sets(Vec<SetDef>);

impl Sets {
    /// Add `base_v4` / `base_v6` for the addresses of `cidrs` (sorted, deduplicated; a family
    /// with none gets no set); returns the sets made.
    fn add(&mut self, base: &str, cidrs: &[Cidr]) -> Vec<(Family, String)> {
        let mut out = Vec::new();
        for fam in [Family::V4, Family::V6] {
            let mut elements: Vec<Cidr> = cidrs
                .iter()
                .copied()
                .filter(|c| Family::of(&c.addr) == fam)
                .collect();
            elements.sort();
            elements.dedup();
            if !elements.is_empty() {
                let name = format!("{base}_{}", fam.suffix());
                self.0.push(SetDef {
                    name: name.clone(),
                    family: fam,
                    elements,
                });
                out.push((fam, name));
            }
        }
        out
    }
}

/// What every input chain starts with: loopback, replies, invalid packets, essential ICMP.
fn base_input_rules() -> Vec<Rule> {
    vec![
        rule(
            vec![Match::IifLoopback],
            Verdict::Accept,
            "loopback: local clients and the metrics scraper",
        ),
        rule(
            vec![Match::CtState(vec!["established", "related"])],
            Verdict::Accept,
            "replies and related traffic of allowed connections",
        ),
        rule(
            vec![Match::CtState(vec!["invalid"])],
            Verdict::Drop,
            "packets that belong to no valid connection",
        ),
        rule(
            vec![Match::IcmpType(ICMP_TYPES.to_vec())],
            Verdict::Accept,
            "essential ICMPv4: errors, path MTU, echo",
        ),
        rule(
            vec![Match::Icmpv6Type(ICMPV6_TYPES.to_vec())],
            Verdict::Accept,
            "essential ICMPv6: errors, path MTU, neighbour discovery",
        ),
    ]
}

/// The engine user's egress: replies, its peers' internal ports, nothing else.
fn egress_chain(e: &Egress) -> ChainDef {
    let mut out = vec![rule(
        vec![
            Match::SkUid(e.uid),
            Match::CtState(vec!["established", "related"]),
        ],
        Verdict::Accept,
        "engine: replies on connections already allowed",
    )];
    let mut peers = e.peers.clone();
    peers.sort();
    peers.dedup();
    for (addr, port) in peers {
        out.push(rule(
            vec![
                Match::SkUid(e.uid),
                Match::Daddr(addr),
                Match::TcpDport(port),
            ],
            Verdict::Accept,
            format!("engine: to peer {addr} port {port}"),
        ));
    }
    out.push(rule(
        vec![Match::SkUid(e.uid)],
        Verdict::Drop,
        "engine: no other outbound traffic",
    ));
    ChainDef {
        name: "output",
        policy: Verdict::Accept,
        rules: out,
    }
}

fn rule(matches: Vec<Match>, verdict: Verdict, comment: impl Into<String>) -> Rule {
    Rule {
        matches,
        verdict,
        comment: comment.into(),
    }
}

impl Policy {
    /// Render the policy into its ruleset (deterministic: inputs are sorted).
    pub fn render(&self) -> Result<Ruleset, Error> {
        check_name(&self.table)?;
        self.check_ports()?;
        let mut sets = Sets::default();
        let mut input = base_input_rules();
        if let Some(m) = self.metrics_port {
            input.push(rule(
                vec![Match::TcpDport(m)],
                Verdict::Drop,
                "metrics listener: never reachable from the network",
            ));
        }
        // A cluster worker serves no API: no API rule at all.
        if let Some(api_port) = self.api_port {
            input.extend(self.api_rules(api_port, &mut sets));
        }
        input.extend(self.internal_rules(&mut sets)?);
        let mut chains = vec![ChainDef {
            name: "input",
            policy: Verdict::Drop,
            rules: input,
        }];
        if let Some(e) = &self.egress {
            chains.push(egress_chain(e));
        }
        Ok(Ruleset {
            table: self.table.clone(),
            sets: sets.0,
            chains,
        })
    }

    /// Every port the table opens or closes is distinct.
    fn check_ports(&self) -> Result<(), Error> {
        let mut ports: Vec<u16> = self.api_port.into_iter().collect();
        ports.extend(self.internal.iter().map(|i| i.port));
        ports.extend(self.metrics_port);
        let mut seen = std::collections::BTreeSet::new();
        for p in ports {
            if !seen.insert(p) {
                return Err(Error::PortClash(p));
            }
        }
        Ok(())
    }

    /// The API port: a per-source rate limit on new connections, then open to everyone or to
    /// the listed networks.
    fn api_rules(&self, api_port: u16, sets: &mut Sets) -> Vec<Rule> {
        let mut rules = Vec::new();
        if let Some(rate) = self.api_rate {
            for fam in [Family::V4, Family::V6] {
                rules.push(rule(
                    vec![
                        Match::TcpDport(api_port),
                        Match::CtState(vec!["new"]),
                        Match::SourceOverRate {
                            meter: format!("api_new_{}", fam.suffix()),
                            family: fam,
                            rate,
                        },
                    ],
                    Verdict::Drop,
                    format!(
                        "API: over {}/s new connections from one {} source",
                        rate.per_second,
                        fam.proto()
                    ),
                ));
            }
        }
        if self.api_sources.is_empty() {
            rules.push(rule(
                vec![Match::TcpDport(api_port)],
                Verdict::Accept,
                "API: open to clients",
            ));
        } else {
            for (fam, set) in sets.add("api_sources", &self.api_sources) {
                rules.push(rule(
                    vec![Match::SaddrInSet(fam, set), Match::TcpDport(api_port)],
                    Verdict::Accept,
                    format!("API: open to the listed {} client networks", fam.proto()),
                ));
            }
        }
        rules
    }

    /// Internal (multi-node) ports, each open only to its peers' addresses.
    fn internal_rules(&self, sets: &mut Sets) -> Result<Vec<Rule>, Error> {
        let mut rules = Vec::new();
        let mut internal = self.internal.clone();
        internal.sort_by(|a, b| a.name.cmp(&b.name));
        for ip in &internal {
            check_name(&ip.name)?;
            let cidrs: Vec<Cidr> = ip
                .peers
                .iter()
                .map(|a| Cidr {
                    addr: *a,
                    len: if a.is_ipv4() { 32 } else { 128 },
                })
                .collect();
            for (fam, set) in sets.add(&format!("peers_{}", ip.name), &cidrs) {
                rules.push(rule(
                    vec![Match::SaddrInSet(fam, set), Match::TcpDport(ip.port)],
                    Verdict::Accept,
                    format!(
                        "internal port {}: only from its {} peers",
                        ip.name,
                        fam.proto()
                    ),
                ));
            }
        }
        Ok(rules)
    }
}
