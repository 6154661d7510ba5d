//! `bulwark audit URL`: the HTTP posture of any OpenAI-compatible server, probed the way a
//! posture scanner does (every route anonymously and, with a key, authenticated; the same
//! verdict rules), plus stricter checks: a reflected CORS origin, plaintext answered on the TLS
//! port, auth edge cases, and any 5xx or timeout.
//!
//! Safe to point at production: redirects are never followed; state-changing routes are probed
//! with GET unless `--intrusive`; at most [`CONCURRENCY`] probes at a time, each bounded by the
//! timeout; the key is never printed.

pub mod routes;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use routes::{Category, ROUTES, Route};

/// Probes in flight at once: enough to finish in seconds, few enough to be gentle.
pub const CONCURRENCY: usize = 8;
/// Body bytes read per answer (the status and headers are what count).
const MAX_BODY_READ: usize = 64 << 10;
/// The origin used in CORS probes; a reserved name that no deployment allows.
const PROBE_ORIGIN: &str = "https://audit.bulwark.invalid";

pub struct Options {
    pub url: String,
    pub api_key: Option<String>,
    pub ca: Option<std::path::PathBuf>,
    pub insecure: bool,
    pub timeout: Duration,
    /// The whole audit's time budget: probes not sent by then get no answer (inconclusive).
    pub deadline: Duration,
    pub intrusive: bool,
}

struct Target {
    https: bool,
    host: String,
    port: u16,
    base: String,
    tls: Option<tokio_rustls::TlsConnector>,
    server_name: Option<ServerName<'static>>,
    timeout: Duration,
    deadline: tokio::time::Instant,
}

/// What one request got back: a status, or the transport error.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub status: Option<u16>,
    #[serde(skip)]
    pub headers: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn show(&self) -> String {
        match (self.status, &self.error) {
            (Some(s), _) => s.to_string(),
            (None, Some(e)) => format!("error ({e})"),
            (None, None) => "no answer".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub method: &'static str,
    pub path: &'static str,
    pub category: Category,
    pub anonymous: Answer,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authenticated: Option<Answer>,
}

/// What the audit keeps of a server's answer: its status and headers; a bounded part of the
/// body is read and dropped. Public so that the fuzz target reads hostile answers through it.
pub async fn read_answer(resp: hyper::Response<hyper::body::Incoming>) -> Answer {
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut body = resp.into_body();
    let mut read = 0;
    while read < MAX_BODY_READ {
        match body.frame().await {
            Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len()),
            _ => break,
        }
    }
    Answer {
        status: Some(status),
        headers,
        error: None,
    }
}

/// The scanner's verdicts (the table in engine/tests/data/posture-routes.txt, §2.2 of the scanner's rules), with one correction: a redirect is not an
/// answer (an SSO gateway redirects every anonymous request to its login page), so it counts as
/// not exposed and is noted in the report. `None`: no definite answer (timeout, error, 5xx).
fn anonymously_accessible(a: &Answer) -> Option<bool> {
    match a.status {
        Some(401 | 403 | 404 | 501) | Some(300..=399) => Some(false),
        None => None,
        Some(s) if s >= 500 => None,
        Some(_) => Some(true),
    }
}

fn requires_auth(a: &Answer) -> Option<bool> {
    match a.status {
        Some(401 | 403) | Some(300..=399) => Some(true),
        None | Some(404) => None,
        Some(s) if s >= 500 => None,
        Some(_) => Some(false),
    }
}

fn is_redirect(a: &Answer) -> bool {
    a.status.is_some_and(|s| (300..400).contains(&s))
}

fn present(p: &Probe) -> bool {
    let best = match p.authenticated.as_ref().and_then(|a| a.status) {
        Some(k) if k != 401 && k != 403 => Some(k),
        _ => p.anonymous.status,
    };
    best.is_some_and(|s| s != 404 && s != 501)
}

impl Target {
    fn parse(o: &Options) -> Result<Self> {
        let (https, rest) = if let Some(r) = o.url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = o.url.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("the URL must start with https:// or http://");
        };
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let (authority, base) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/').to_owned()),
            None => (rest, String::new()),
        };
        if authority.contains('@') {
            bail!("credentials in the URL are not accepted; use --api-key-file");
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_owned(),
                p.parse().context("invalid port in the URL")?,
            ),
            _ => (
                authority
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
                if https { 443 } else { 80 },
            ),
        };
        let (tls, server_name) = if https {
            let cfg = crate::tls::audit_client_config(o.ca.as_deref(), o.insecure)?;
            (
                Some(tokio_rustls::TlsConnector::from(Arc::new(cfg))),
                Some(ServerName::try_from(host.clone()).context("invalid host name in the URL")?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            https,
            host,
            port,
            base,
            tls,
            server_name,
            timeout: o.timeout,
            deadline: tokio::time::Instant::now() + o.deadline,
        })
    }

    async fn connect(&self) -> Result<Box<dyn Io>> {
        let tcp = tokio::time::timeout(
            self.timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .context("connect timed out")?
        .context("connect failed")?;
        match (&self.tls, &self.server_name) {
            (Some(c), Some(n)) => Ok(Box::new(
                tokio::time::timeout(self.timeout, c.connect(n.clone(), tcp))
                    .await
                    .context("TLS handshake timed out")??,
            )),
            _ => Ok(Box::new(tcp)),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<&'static str>,
    ) -> Answer {
        let left = self
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Answer {
                status: None,
                headers: vec![],
                error: Some("not sent: the audit's deadline passed".into()),
            };
        }
        let budget = self.timeout.min(left);
        match tokio::time::timeout(budget, self.send_inner(method, path, headers, body)).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => Answer {
                status: None,
                headers: vec![],
                error: Some(format!("{e:#}")),
            },
            Err(_) => Answer {
                status: None,
                headers: vec![],
                error: Some("timed out".into()),
            },
        }
    }

    async fn send_inner(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<&'static str>,
    ) -> Result<Answer> {
        let io = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        let host = if self.port == 443 || self.port == 80 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
            .header("host", host)
            .header("accept", "application/json, text/plain, */*")
            .header("user-agent", "bulwark-audit");
        if body.is_some() {
            b = b.header("content-type", "application/json");
        }
        for (k, v) in headers {
            b = b.header(*k, v.as_str());
        }
        let resp = sender
            .send_request(b.body(Full::new(Bytes::from_static(body.unwrap_or("").as_bytes())))?)
            .await?;
        Ok(read_answer(resp).await)
    }

    /// Does the TLS port also answer plain HTTP?
    async fn plaintext_answered(&self) -> bool {
        let fut = async {
            let mut tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .ok()?;
            tcp.write_all(
                format!(
                    "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                    self.host
                )
                .as_bytes(),
            )
            .await
            .ok()?;
            let mut buf = [0u8; 5];
            tcp.read_exact(&mut buf).await.ok()?;
            Some(&buf == b"HTTP/")
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A check that fails when any route of its categories (and paths) answers anonymously.
struct ExposureCheck {
    id: &'static str,
    title: &'static str,
    impact: u32,
    remediation: &'static str,
    categories: &'static [Category],
    paths: Option<&'static [&'static str]>,
}

/// The scanner's exposure checks, with its impacts (the scanner's impacts), plus LoRA loading.
const EXPOSURE_CHECKS: &[ExposureCheck] = &[
    ExposureCheck {
        id: "custom-inference-routes-not-anonymous",
        title: "Custom inference routes (/invocations, ...) are not anonymous",
        impact: 100,
        remediation: "Deny or authenticate /invocations, /pooling, /classify, /score, /rerank and the like.",
        categories: &[Category::CustomInference],
        paths: None,
    },
    ExposureCheck {
        id: "operational-control-routes-not-anonymous",
        title: "Operational-control routes (/pause, ...) are not anonymous",
        impact: 90,
        remediation: "Remove or authenticate /pause, /resume, /scale_elastic_ep and the fault-tolerance routes.",
        categories: &[Category::OperationalControl],
        paths: None,
    },
    ExposureCheck {
        id: "tokenization-routes-not-anonymous",
        title: "Tokenisation routes are not anonymous",
        impact: 70,
        remediation: "Authenticate or remove /tokenize and /detokenize.",
        categories: &[Category::Utility],
        paths: Some(&["/tokenize", "/detokenize"]),
    },
    ExposureCheck {
        id: "docs-not-exposed",
        title: "API documentation pages are not exposed",
        impact: 60,
        remediation: "Disable /docs and /redoc, or put them behind authentication.",
        categories: &[Category::Documentation],
        paths: Some(&["/docs", "/redoc"]),
    },
    ExposureCheck {
        id: "openapi-not-exposed",
        title: "The OpenAPI description is not exposed",
        impact: 60,
        remediation: "Serve the OpenAPI file from an internal docs system, not the API listener.",
        categories: &[Category::Documentation],
        paths: Some(&["/openapi.json"]),
    },
    ExposureCheck {
        id: "version-not-exposed",
        title: "The server version is not exposed",
        impact: 50,
        remediation: "Remove /version or authenticate it; keep versions in your inventory.",
        categories: &[Category::Metadata],
        paths: Some(&["/version"]),
    },
    ExposureCheck {
        id: "tokenizer-info-not-exposed",
        title: "Tokenizer information is not exposed",
        impact: 50,
        remediation: "Remove or authenticate /tokenizer_info.",
        categories: &[Category::Utility],
        paths: Some(&["/tokenizer_info"]),
    },
    ExposureCheck {
        id: "metrics-not-exposed",
        title: "Metrics are not exposed",
        impact: 70,
        remediation: "Serve metrics on a separate, loopback-only listener (Bulwark: metrics.listen) or authenticate them.",
        categories: &[Category::Metrics],
        paths: None,
    },
    ExposureCheck {
        id: "load-not-exposed",
        title: "The load endpoint is not exposed",
        impact: 60,
        remediation: "Remove or block /load.",
        categories: &[Category::Utility],
        paths: Some(&["/load"]),
    },
    ExposureCheck {
        id: "development-routes-not-exposed",
        title: "Development routes (/sleep, /collective_rpc, ...) are not exposed",
        impact: 90,
        remediation: "Never run development mode in production; authenticate before routing.",
        categories: &[Category::Development],
        paths: None,
    },
    ExposureCheck {
        id: "profiler-routes-not-exposed",
        title: "Profiler routes are not exposed",
        impact: 90,
        remediation: "Disable the profiler routes.",
        categories: &[Category::Profiler],
        paths: None,
    },
    ExposureCheck {
        id: "runtime-lora-not-exposed",
        title: "LoRA loading routes are not exposed",
        impact: 90,
        remediation: "Disable runtime adapter loading; models load once, at start-up.",
        categories: &[Category::Lora],
        paths: None,
    },
];

/// A check's verdict. Inconclusive: nothing failed, but some probe it depends on got no
/// definite answer (a timeout, an error, a 5xx, the deadline), so it cannot pass either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub id: &'static str,
    pub title: &'static str,
    pub severity: &'static str,
    pub impact: u32,
    pub verdict: Verdict,
    pub passed: bool,
    pub evidence: Vec<String>,
    /// Probes without a definite answer (why the check is inconclusive).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub undecided: Vec<String>,
    pub remediation: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub target: String,
    pub authenticated: bool,
    pub score: u32,
    pub checks: Vec<Check>,
    /// Observations that are not findings (redirects, treated as not exposed).
    pub notes: Vec<String>,
    pub probes: Vec<Probe>,
}

impl Report {
    /// The audit's overall verdict: any failure fails it; otherwise any inconclusive check
    /// leaves it inconclusive.
    pub fn verdict(&self) -> Verdict {
        let any = |v| self.checks.iter().any(|c| c.verdict == v);
        if any(Verdict::Fail) {
            Verdict::Fail
        } else if any(Verdict::Inconclusive) {
            Verdict::Inconclusive
        } else {
            Verdict::Pass
        }
    }
}

fn severity(impact: u32) -> &'static str {
    match impact {
        90.. => "critical",
        70..=89 => "high",
        50..=69 => "medium",
        _ => "low",
    }
}

/// What a check found: evidence of failure, and probes it could not decide.
#[derive(Default)]
struct Findings {
    evidence: Vec<String>,
    undecided: Vec<String>,
}

impl From<Vec<String>> for Findings {
    fn from(evidence: Vec<String>) -> Self {
        Self {
            evidence,
            undecided: Vec::new(),
        }
    }
}

fn check(
    id: &'static str,
    title: &'static str,
    impact: u32,
    remediation: &'static str,
    findings: impl Into<Findings>,
) -> Check {
    let Findings {
        evidence,
        undecided,
    } = findings.into();
    let verdict = match (evidence.is_empty(), undecided.is_empty()) {
        (false, _) => Verdict::Fail,
        (true, false) => Verdict::Inconclusive,
        (true, true) => Verdict::Pass,
    };
    Check {
        id,
        title,
        severity: severity(impact),
        impact,
        verdict,
        passed: verdict == Verdict::Pass,
        evidence,
        undecided,
        remediation,
    }
}

/// Probes of `cats` that answer anonymously, and those that got no definite answer.
fn exposed(probes: &[Probe], cats: &[Category], paths: Option<&[&str]>) -> Findings {
    let mut f = Findings::default();
    for p in probes
        .iter()
        .filter(|p| cats.contains(&p.category) && paths.is_none_or(|ps| ps.contains(&p.path)))
    {
        let line = format!("{} {} answered {}", p.method, p.path, p.anonymous.show());
        match anonymously_accessible(&p.anonymous) {
            Some(true) => f.evidence.push(line + " without credentials"),
            Some(false) => {}
            None => f.undecided.push(line),
        }
    }
    f
}

pub async fn run(o: &Options) -> Result<Option<Report>> {
    let t = Arc::new(Target::parse(o)?);
    // Reachability first: exit status 2 when the target cannot be reached at all.
    if let Err(e) = t.connect().await {
        eprintln!("cannot reach {}: {e:#}", o.url);
        return Ok(None);
    }
    let key = o.api_key.clone();
    let probes = probe_routes(&t, &key, o.intrusive).await?;
    let mut checks = vec![
        transport_check(&t, o).await,
        cors_check(&t, &key).await,
        openai_check(&probes),
    ];
    checks.extend(EXPOSURE_CHECKS.iter().map(|e| {
        check(
            e.id,
            e.title,
            e.impact,
            e.remediation,
            exposed(&probes, e.categories, e.paths),
        )
    }));
    checks.push(edge_check(&t, &key).await);
    checks.push(errors_check(&probes));
    Ok(Some(report(o, key.is_some(), checks, probes)))
}

/// Every route of the table, anonymously and (with a key) authenticated, a few at a time.
async fn probe_routes(
    t: &Arc<Target>,
    key: &Option<String>,
    intrusive: bool,
) -> Result<Vec<Probe>> {
    let sem = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for r in ROUTES {
        let (t, sem, key, intrusive) = (t.clone(), sem.clone(), key.clone(), intrusive);
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await;
            let r: &Route = r;
            let (method, body) = if r.method == "POST" && (!r.state_changing || intrusive) {
                ("POST", Some("{}"))
            } else {
                ("GET", None)
            };
            let anonymous = t.send(method, r.path, &[], body).await;
            let authenticated = match &key {
                Some(k) => Some(
                    t.send(
                        method,
                        r.path,
                        &[("authorization", format!("Bearer {k}"))],
                        body,
                    )
                    .await,
                ),
                None => None,
            };
            Probe {
                method,
                path: r.path,
                category: r.category,
                anonymous,
                authenticated,
            }
        }));
    }
    let mut probes = Vec::new();
    for task in tasks {
        probes.push(task.await?);
    }
    Ok(probes)
}

/// TLS is used, and the TLS port does not answer plaintext.
async fn transport_check(t: &Target, o: &Options) -> Check {
    let mut tls_evidence = Vec::new();
    if !t.https {
        tls_evidence.push(format!("{} is plain HTTP", o.url));
    } else if t.plaintext_answered().await {
        tls_evidence.push(format!(
            "plain HTTP on {}:{} got an HTTP answer",
            t.host, t.port
        ));
    }
    check(
        "use-tls",
        "TLS is used, and the TLS port does not answer plaintext",
        80,
        "Serve HTTPS natively (Bulwark: server.tls_cert/tls_key, the default) and never plain HTTP on the same port.",
        tls_evidence,
    )
}

/// CORS: preflight and simple requests on several paths; a wildcard or a reflected origin fails.
async fn cors_check(t: &Target, key: &Option<String>) -> Check {
    let mut cors = Findings::default();
    for path in ["/", "/v1/completions", "/v1/chat/completions", "/v1/models"] {
        let pre = [
            ("origin", PROBE_ORIGIN.to_owned()),
            ("access-control-request-method", "POST".to_owned()),
            (
                "access-control-request-headers",
                "authorization,content-type".to_owned(),
            ),
        ];
        let mut answers = vec![("OPTIONS", t.send("OPTIONS", path, &pre, None).await)];
        answers.push((
            "GET",
            t.send("GET", path, &[("origin", PROBE_ORIGIN.to_owned())], None)
                .await,
        ));
        if let Some(k) = &key {
            answers.push((
                "GET (key)",
                t.send(
                    "GET",
                    path,
                    &[
                        ("origin", PROBE_ORIGIN.to_owned()),
                        ("authorization", format!("Bearer {k}")),
                    ],
                    None,
                )
                .await,
            ));
        }
        for (what, a) in answers {
            match a.header("access-control-allow-origin") {
                Some("*") => cors
                    .evidence
                    .push(format!("{what} {path}: Access-Control-Allow-Origin: *")),
                Some(o) if o == PROBE_ORIGIN => cors
                    .evidence
                    .push(format!("{what} {path}: reflects an arbitrary Origin")),
                _ if a.status.is_none() => cors
                    .undecided
                    .push(format!("{what} {path} answered {}", a.show())),
                _ => {}
            }
        }
    }
    check(
        "cors-not-wide-open",
        "CORS allows no wildcard or reflected origin",
        70,
        "Allow only exact, configured origins (Bulwark: server.cors_origins, empty by default).",
        cors,
    )
}

/// OpenAI routes that exist must require authentication.
fn openai_check(probes: &[Probe]) -> Check {
    let mut openai = Findings::default();
    for p in probes
        .iter()
        .filter(|p| p.category == Category::Openai && (present(p) || p.anonymous.status.is_none()))
    {
        let line = format!("{} {} answered {}", p.method, p.path, p.anonymous.show());
        match requires_auth(&p.anonymous) {
            Some(true) => {}
            Some(false) => openai.evidence.push(line + " without credentials"),
            None if p.anonymous.status == Some(404) => {}
            None => openai.undecided.push(line),
        }
    }
    check(
        "openai-routes-require-authentication",
        "OpenAI routes require authentication",
        100,
        "Require an API key on every route (Bulwark authenticates before routing).",
        openai,
    )
}

/// Path variants are not anonymous; keys only from the Authorization header.
async fn edge_check(t: &Target, key: &Option<String>) -> Check {
    let mut edge = Findings::default();
    for v in [
        "//v1/models",
        "/v1/models/",
        "/V1/models",
        "/v1/./models",
        "/v1/%6dodels",
        "/v1/models%2F",
    ] {
        let a = t.send("GET", v, &[], None).await;
        match anonymously_accessible(&a) {
            Some(true) => edge
                .evidence
                .push(format!("GET {v} answered {} without credentials", a.show())),
            Some(false) => {}
            None => edge
                .undecided
                .push(format!("GET {v} answered {}", a.show())),
        }
    }
    if let Some(k) = &key {
        let q = t
            .send("GET", &format!("/v1/models?api_key={k}"), &[], None)
            .await;
        if q.status.is_some_and(|s| (200..300).contains(&s)) {
            edge.evidence
                .push("GET /v1/models accepted the key from the query string".into());
        }
        let x = t
            .send("GET", "/v1/models", &[("x-api-key", k.clone())], None)
            .await;
        if x.status.is_some_and(|s| (200..300).contains(&s)) {
            edge.evidence
                .push("GET /v1/models accepted the key from an X-API-Key header".into());
        }
    }
    check(
        "auth-edge-cases",
        "Path variants are not anonymous; keys only from the Authorization header",
        80,
        "Authenticate before routing, on the raw path; accept keys only as Authorization: Bearer.",
        edge,
    )
}

/// A 5xx is a finding (an unhandled error on an unauthenticated path); a timeout or a
/// transport error makes verdicts unknown, and can hide exposures: inconclusive.
fn errors_check(probes: &[Probe]) -> Check {
    let mut errors = Findings::default();
    for (p, w, a) in probes.iter().flat_map(|p| {
        std::iter::once(("anonymous", &p.anonymous))
            .chain(p.authenticated.iter().map(|a| ("with key", a)))
            .map(move |(w, a)| (p, w, a))
    }) {
        let line = format!("{} {} ({w}) answered {}", p.method, p.path, a.show());
        match a.status {
            Some(s) if s >= 500 => errors.evidence.push(line),
            Some(_) => {}
            None => errors.undecided.push(line),
        }
    }
    check(
        "no-errors-or-timeouts",
        "No probe got a 5xx or timed out",
        60,
        "Answer every unknown or unauthenticated request with a definite 401/403/404.",
        errors,
    )
}

/// The score, and the notes (redirects) that are not findings.
fn report(o: &Options, authenticated: bool, checks: Vec<Check>, probes: Vec<Probe>) -> Report {
    let total: u32 = checks.iter().map(|c| c.impact).sum();
    let passed: u32 = checks.iter().filter(|c| c.passed).map(|c| c.impact).sum();
    let redirected: Vec<&Probe> = probes
        .iter()
        .filter(|p| is_redirect(&p.anonymous))
        .collect();
    let mut notes = Vec::new();
    if let Some(first) = redirected.first() {
        notes.push(format!(
            "{} of {} routes answered anonymous requests with a redirect (e.g. {} {} to {}); \
             redirects are not followed and count as not exposed",
            redirected.len(),
            probes.len(),
            first.method,
            first.path,
            first.anonymous.header("location").unwrap_or("?")
        ));
    }
    Report {
        target: o.url.clone(),
        authenticated,
        score: passed * 100 / total.max(1),
        checks,
        notes,
        probes,
    }
}

pub fn render_text(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Posture audit of {} ({})\n",
        r.target,
        if r.authenticated {
            "anonymous and authenticated probes"
        } else {
            "anonymous probes only"
        }
    );
    let _ = writeln!(
        s,
        "{:<42} {:<6} {:<9} REMEDIATION",
        "CHECK", "RESULT", "SEVERITY"
    );
    for c in &r.checks {
        let _ = writeln!(
            s,
            "{:<42} {:<6} {:<9} {}",
            c.id,
            match c.verdict {
                Verdict::Pass => "pass",
                Verdict::Fail => "FAIL",
                Verdict::Inconclusive => "?",
            },
            c.severity,
            match c.verdict {
                Verdict::Pass => "",
                Verdict::Fail => c.remediation,
                Verdict::Inconclusive =>
                    "no definite answer from some probes (below); re-run with a longer --timeout",
            }
        );
        let shown = if c.verdict == Verdict::Fail {
            &c.evidence
        } else {
            &c.undecided
        };
        for e in shown.iter().take(8) {
            let _ = writeln!(s, "    {e}");
        }
        if shown.len() > 8 {
            let _ = writeln!(s, "    ... and {} more", shown.len() - 8);
        }
    }
    for n in &r.notes {
        let _ = writeln!(s, "\nnote: {n}");
    }
    let passed = r.checks.iter().filter(|c| c.passed).count();
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for p in &r.probes {
        *by_status.entry(p.anonymous.show()).or_default() += 1;
    }
    let _ = writeln!(
        s,
        "\nanonymous answers over {} routes: {}",
        r.probes.len(),
        by_status
            .iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        s,
        "score: {}/100 ({passed} of {} checks passed)",
        r.score,
        r.checks.len()
    );
    s
}
