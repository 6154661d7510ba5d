//! The cluster: pipelines of 2 and 3 stages give the single node's answers, and a worker
//! refuses every connection that is not its head's (each refusal test has an accepted twin,
//! so that it fails if the check it covers is removed).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bulwark::cluster::frame::{self, Hello, Kind};
use bulwark::config::Config;
use bulwark::tls::ClusterIdentity;
use serde_json::json;

use crate::util::{self, TestState};

/// Certificates for a cluster on loopback: a CA, the head, two workers, and a foreign CA's
/// certificate carrying the head's name.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        bulwark::certs::make_cluster_ca(&p.join("ca")).unwrap();
        bulwark::certs::make_cluster_ca(&p.join("foreign-ca")).unwrap();
        let lo: [IpAddr; 1] = ["127.0.0.1".parse().unwrap()];
        for name in ["head", "worker-1", "worker-2"] {
            bulwark::certs::issue_node_cert(&p.join("ca"), name, &lo, &p.join(name)).unwrap();
        }
        bulwark::certs::issue_node_cert(&p.join("foreign-ca"), "head", &lo, &p.join("foreign"))
            .unwrap();
        Self { dir }
    }

    fn node(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca/ca.pem")
    }

    fn files(&self, name: &str) -> String {
        format!(
            "ca = {:?}\ncert = {:?}\nkey = {:?}\n",
            self.ca(),
            self.node(name).join("cert.pem"),
            self.node(name).join("key.pem")
        )
    }

    /// The identity a client presents: `cert_of`'s certificate, trusting the cluster CA.
    fn identity(&self, cert_of: &str) -> ClusterIdentity {
        let n = self.node(cert_of);
        ClusterIdentity::load(&self.ca(), &n.join("cert.pem"), &n.join("key.pem")).unwrap()
    }
}

/// Start a worker for `layers` on an ephemeral loopback port; it accepts `head_address`.
fn worker(pki: &Pki, name: &str, layers: [usize; 2], head_address: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let text = format!(
        "{model}context_length = 512\n\
         [cluster]\nrole = \"worker\"\nname = \"{name}\"\n{files}layers = [{}, {}]\n\
         listen = \"{addr}\"\nhead_name = \"head\"\nhead_address = \"{head_address}\"\n",
        layers[0],
        layers[1],
        model = util::model_toml("m"),
        files = pki.files(name),
    );
    let cfg: Config = toml::from_str(&text).unwrap();
    cfg.validate().unwrap();
    bulwark::cluster::worker::spawn_unconfined(&cfg, listener).unwrap();
    addr
}

/// A head whose stages are `stages` (name, address, layers), running `[0, head_end)` itself.
fn head(pki: &Pki, head_end: usize, stages: &[(&str, SocketAddr, [usize; 2])]) -> TestState {
    let mut extra = format!(
        "[cluster]\nrole = \"head\"\nname = \"head\"\n{}layers = [0, {head_end}]\n",
        pki.files("head")
    );
    for (name, addr, l) in stages {
        extra += &format!(
            "[[cluster.stages]]\nname = \"{name}\"\naddress = \"{addr}\"\nlayers = [{}, {}]\n",
            l[0], l[1]
        );
    }
    let state = util::state_with(util::config(&format!("context_length = 512\n{extra}")));
    wait_until_available(&state);
    state
}

fn wait_until_available(s: &TestState) {
    for _ in 0..100 {
        if s.state.scheduler.is_available() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the pipeline never came up");
}

const PROMPTS: [&str; 3] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
];

/// Greedy answers to every prompt, sent concurrently: (text, first-token top logprobs).
async fn answers(s: &TestState) -> Vec<(String, Vec<(String, f64)>)> {
    let futs = PROMPTS.map(|p| {
        s.chat(
            p,
            json!({"temperature": 0, "max_tokens": 24, "logprobs": true, "top_logprobs": 5}),
        )
    });
    let replies = futures_join(futs).await;
    replies
        .iter()
        .map(|r| {
            let text = util::content(r);
            let first = &r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"];
            let top = first
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["token"].as_str().unwrap().to_owned(),
                        t["logprob"].as_f64().unwrap(),
                    )
                })
                .collect();
            (text, top)
        })
        .collect()
}

async fn futures_join<F: std::future::Future>(futs: [F; 3]) -> Vec<F::Output> {
    let [a, b, c] = futs;
    let (a, b, c) = tokio::join!(a, b, c);
    vec![a, b, c]
}

fn assert_same(single: &[(String, Vec<(String, f64)>)], other: &[(String, Vec<(String, f64)>)]) {
    for (s, o) in single.iter().zip(other) {
        assert_eq!(s.0, o.0, "greedy text differs");
        for (st, ot) in s.1.iter().zip(&o.1) {
            assert_eq!(st.0, ot.0, "top tokens differ");
            // Activations cross nodes bit-exact; only the batch's composition (timing) can
            // change the order of floating-point sums.
            assert!((st.1 - ot.1).abs() < 1e-3, "{st:?} vs {ot:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_of_two_and_three_stages_answer_like_a_single_node() {
    let single = answers(&util::state("context_length = 512\n")).await;
    let pki = Pki::new();
    let w = worker(&pki, "worker-1", [15, 30], "127.0.0.1");
    let two = head(&pki, 15, &[("worker-1", w, [15, 30])]);
    assert_same(&single, &answers(&two).await);

    let w1 = worker(&pki, "worker-1", [8, 21], "127.0.0.1");
    let w2 = worker(&pki, "worker-2", [21, 30], "127.0.0.1");
    let three = head(
        &pki,
        8,
        &[("worker-1", w1, [8, 21]), ("worker-2", w2, [21, 30])],
    );
    assert_same(&single, &answers(&three).await);
}

/// How a worker turned a connection down.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// A Refuse frame, with its reason.
    Refused(String),
    /// The TLS handshake failed or the connection was closed.
    Closed(String),
}

/// A TLS 1.3 client to a worker presenting `ident`'s certificate; the Hello exchange's answer.
fn handshake(ident: &ClusterIdentity, addr: SocketAddr, hello: &Hello) -> Result<Kind, Refusal> {
    let closed = |e: anyhow::Error| Refusal::Closed(format!("{e:#}"));
    let tcp = TcpStream::connect(addr).map_err(|e| closed(e.into()))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn = rustls::ClientConnection::new(
        Arc::new(ident.client_config().unwrap()),
        "worker-1".try_into().unwrap(),
    )
    .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    frame::write_frame(&mut tls, Kind::Hello, &hello.encode()).map_err(closed)?;
    let f = frame::read_frame(&mut tls, frame::HANDSHAKE_MAX_FRAME).map_err(closed)?;
    if f.kind == Kind::Refuse {
        return Err(Refusal::Refused(frame::decode_reason(&f.payload)));
    }
    Ok(f.kind)
}

fn good_hello() -> Hello {
    let mut sha = [0u8; 32];
    hex::decode_to_slice(util::model_sha256(), &mut sha).unwrap();
    Hello {
        version: frame::PROTOCOL_VERSION,
        model_sha256: sha,
        layers: (15, 30),
        last: true,
        dtype: frame::DTYPE_F32,
        hidden: 576,
        vocab: 49152,
        max_rows: 512,
        max_items: 16,
    }
}

/// The same, retried while the worker may still hold the previous connection's session slot
/// (a session ends on its own thread, just after the client sees it end). A refusal by frame is
/// final at once.
fn handshake_when_free(
    ident: &ClusterIdentity,
    addr: SocketAddr,
    hello: &Hello,
) -> Result<Kind, Refusal> {
    let mut last = handshake(ident, addr, hello);
    for _ in 0..20 {
        if !matches!(last, Err(Refusal::Closed(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        last = handshake(ident, addr, hello);
    }
    last
}

#[test]
fn worker_accepts_only_its_head_with_a_matching_handshake() {
    let pki = Pki::new();
    let addr = worker(&pki, "worker-1", [15, 30], "127.0.0.1");
    let head = pki.identity("head");

    // Accepted: the head's certificate, from the head's address, the right Hello.
    assert_eq!(
        handshake_when_free(&head, addr, &good_hello()),
        Ok(Kind::HelloOk)
    );

    // Wrong model hash, wrong layer range: refused by name.
    let mut h = good_hello();
    h.model_sha256[0] ^= 1;
    let Err(Refusal::Refused(err)) = handshake_when_free(&head, addr, &h) else {
        panic!("a wrong model hash was not refused by name")
    };
    assert!(err.contains("model.sha256"), "{err}");
    let mut h = good_hello();
    h.layers = (16, 30);
    let Err(Refusal::Refused(err)) = handshake_when_free(&head, addr, &h) else {
        panic!("a wrong layer range was not refused by name")
    };
    assert!(err.contains("cluster.layers"), "{err}");

    // Another node's valid cluster certificate: refused after the handshake, before any frame.
    assert!(matches!(
        handshake_when_free(&pki.identity("worker-2"), addr, &good_hello()),
        Err(Refusal::Closed(_))
    ));

    // The head's name signed by a CA the cluster does not trust: the handshake fails.
    let foreign = ClusterIdentity::load(
        &pki.ca(),
        &pki.node("foreign").join("cert.pem"),
        &pki.node("foreign").join("key.pem"),
    )
    .unwrap();
    assert!(matches!(
        handshake_when_free(&foreign, addr, &good_hello()),
        Err(Refusal::Closed(_))
    ));

    // Still accepting the real head afterwards.
    assert_eq!(
        handshake_when_free(&head, addr, &good_hello()),
        Ok(Kind::HelloOk)
    );
}

#[test]
fn worker_refuses_the_right_certificate_from_the_wrong_address() {
    let pki = Pki::new();
    // The head is configured at 127.0.0.2; this test connects from 127.0.0.1.
    let elsewhere = worker(&pki, "worker-1", [15, 30], "127.0.0.2");
    assert!(handshake(&pki.identity("head"), elsewhere, &good_hello()).is_err());
    // Its twin: the same certificate, configured address matching, is accepted.
    let here = worker(&pki, "worker-1", [15, 30], "127.0.0.1");
    assert_eq!(
        handshake(&pki.identity("head"), here, &good_hello()),
        Ok(Kind::HelloOk)
    );
}

#[test]
fn worker_ends_a_session_on_an_oversized_or_unknown_frame_and_refuses_a_second_one() {
    let pki = Pki::new();
    let addr = worker(&pki, "worker-1", [15, 30], "127.0.0.1");
    let head = pki.identity("head");
    let open = || {
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let conn = rustls::ClientConnection::new(
            Arc::new(head.client_config().unwrap()),
            "worker-1".try_into().unwrap(),
        )
        .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        frame::write_frame(&mut tls, Kind::Hello, &good_hello().encode()).unwrap();
        let f = frame::read_frame(&mut tls, frame::HANDSHAKE_MAX_FRAME).unwrap();
        assert_eq!(f.kind, Kind::HelloOk);
        tls
    };
    let ended = |tls: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>| {
        let mut b = [0u8; 1];
        matches!(tls.read(&mut b), Ok(0) | Err(_))
    };

    // A heartbeat is answered (the session is alive), and a second session is refused.
    let mut tls = open();
    frame::write_frame(&mut tls, Kind::Ping, &[]).unwrap();
    assert_eq!(frame::read_frame(&mut tls, 64).unwrap().kind, Kind::Pong);
    assert!(
        handshake(&head, addr, &good_hello()).is_err(),
        "a second session was accepted"
    );

    // A frame header announcing more than the agreed maximum ends the session.
    let max = good_hello().max_frame() as u32 + 1;
    let mut header = [0u8; 8];
    header[0] = Kind::Step as u8;
    header[4..].copy_from_slice(&max.to_le_bytes());
    tls.write_all(&header).unwrap();
    tls.flush().unwrap();
    assert!(ended(&mut tls));
    drop(tls);

    // An unknown frame kind ends the session too.
    let mut tls = loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(t) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(open)) {
            break t;
        }
    };
    tls.write_all(&[0x7f, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    tls.flush().unwrap();
    assert!(ended(&mut tls));
}
