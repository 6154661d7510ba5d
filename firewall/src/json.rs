//! JSON rendering through the `nftables` crate's schema types (`nft -j -f -` accepts it).

use std::borrow::Cow;
use std::collections::HashSet;

use nftables::batch::Batch;
use nftables::expr::{
    CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, SetItem,
};
use nftables::schema::{self, NfListObject, SetFlag, SetType, SetTypeValue};
use nftables::stmt::{self, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::{ChainDef, Family, Match, Rule, Ruleset, SetDef, Verdict};

fn field(protocol: &'static str, name: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(name),
        },
    )))
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(stmt::Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn set_of(items: &[&'static str]) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items
            .iter()
            .map(|s| SetItem::Element(Expression::String(Cow::Borrowed(s))))
            .collect(),
    ))
}

fn statements(m: &Match) -> Vec<Statement<'static>> {
    match m {
        Match::IifLoopback => vec![eq(
            Expression::Named(NamedExpression::Meta(Meta {
                key: MetaKey::Iifname,
            })),
            Expression::String("lo".into()),
        )],
        Match::CtState(states) => vec![Statement::Match(stmt::Match {
            left: Expression::Named(NamedExpression::CT(CT {
                key: "state".into(),
                family: None,
                dir: None,
            })),
            right: if states.len() == 1 {
                Expression::String(Cow::Borrowed(states[0]))
            } else {
                Expression::List(
                    states
                        .iter()
                        .map(|s| Expression::String(Cow::Borrowed(s)))
                        .collect(),
                )
            },
            op: Operator::IN,
        })],
        Match::TcpDport(p) => vec![eq(field("tcp", "dport"), Expression::Number(u32::from(*p)))],
        Match::SaddrInSet(f, set) => vec![eq(
            field(f.proto(), "saddr"),
            Expression::String(format!("@{set}").into()),
        )],
        Match::Daddr(a) => vec![eq(
            field(Family::of(a).proto(), "daddr"),
            Expression::String(a.to_string().into()),
        )],
        Match::SkUid(u) => vec![eq(
            Expression::Named(NamedExpression::Meta(Meta {
                key: MetaKey::Skuid,
            })),
            Expression::Number(*u),
        )],
        Match::IcmpType(t) => vec![eq(field("icmp", "type"), set_of(t))],
        Match::Icmpv6Type(t) => vec![eq(field("icmpv6", "type"), set_of(t))],
        Match::SourceOverRate {
            meter,
            family,
            rate,
        } => vec![Statement::Meter(stmt::Meter {
            name: meter.clone().into(),
            key: field(family.proto(), "saddr"),
            stmt: Box::new(Statement::Limit(stmt::Limit {
                rate: rate.per_second,
                rate_unit: Some("packets".into()),
                per: Some("second".into()),
                burst: Some(rate.burst),
                burst_unit: Some("packets".into()),
                inv: Some(true),
            })),
        })],
    }
}

impl Ruleset {
    /// The ruleset as an `nftables` batch: add, delete and re-add the table (atomic reload),
    /// then its sets, chains and rules.
    pub fn to_nftables(&self) -> nftables::schema::Nftables<'static> {
        let table = schema::Table {
            family: NfFamily::INet,
            name: self.table.clone().into(),
            handle: None,
        };
        let mut b = Batch::new();
        // INVARIANT: add, delete, add: deleting a table that may not exist yet needs it to
        // exist, and the three apply atomically with the rest of the batch.
        b.add(NfListObject::Table(table.clone()));
        b.delete(NfListObject::Table(table.clone()));
        b.add(NfListObject::Table(table));
        for s in &self.sets {
            b.add(NfListObject::Set(Box::new(self.set(s))));
        }
        for c in &self.chains {
            b.add(NfListObject::Chain(self.chain(c)));
            for r in &c.rules {
                b.add(NfListObject::Rule(self.rule(c, r)));
            }
        }
        b.to_nftables()
    }

    /// A named interval set of addresses or prefixes.
    fn set(&self, s: &SetDef) -> schema::Set<'static> {
        let ty = match s.family {
            Family::V4 => SetType::Ipv4Addr,
            Family::V6 => SetType::Ipv6Addr,
        };
        let elems: Vec<Expression<'static>> = s
            .elements
            .iter()
            .map(|c| {
                let max = if c.addr.is_ipv4() { 32 } else { 128 };
                if c.len == max {
                    Expression::String(c.addr.to_string().into())
                } else {
                    Expression::Named(NamedExpression::Prefix(nftables::expr::Prefix {
                        addr: Box::new(Expression::String(c.addr.to_string().into())),
                        len: u32::from(c.len),
                    }))
                }
            })
            .collect();
        schema::Set {
            family: NfFamily::INet,
            table: self.table.clone().into(),
            name: s.name.clone().into(),
            handle: None,
            set_type: SetTypeValue::Single(ty),
            policy: None,
            flags: Some(HashSet::from([SetFlag::Interval])),
            elem: Some(elems.into()),
            timeout: None,
            gc_interval: None,
            size: None,
            comment: None,
        }
    }

    /// A base filter chain on the input or output hook, with its policy.
    fn chain(&self, c: &ChainDef) -> schema::Chain<'static> {
        let hook = if c.name == "input" {
            NfHook::Input
        } else {
            NfHook::Output
        };
        schema::Chain {
            family: NfFamily::INet,
            table: self.table.clone().into(),
            name: c.name.into(),
            _type: Some(NfChainType::Filter),
            hook: Some(hook),
            prio: Some(0),
            policy: Some(match c.policy {
                Verdict::Accept => NfChainPolicy::Accept,
                Verdict::Drop => NfChainPolicy::Drop,
            }),
            ..Default::default()
        }
    }

    /// One rule of chain `c`: its matches, then its verdict, with its reason as the comment.
    fn rule(&self, c: &ChainDef, r: &Rule) -> schema::Rule<'static> {
        let mut expr: Vec<Statement<'static>> = r.matches.iter().flat_map(statements).collect();
        expr.push(match r.verdict {
            Verdict::Accept => Statement::Accept(None),
            Verdict::Drop => Statement::Drop(None),
        });
        schema::Rule {
            family: NfFamily::INet,
            table: self.table.clone().into(),
            chain: c.name.into(),
            expr: expr.into(),
            handle: None,
            index: None,
            comment: Some(r.comment.clone().into()),
        }
    }

    /// The JSON text for `nft -j -f -`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.to_nftables()).unwrap_or_default()
    }
}
