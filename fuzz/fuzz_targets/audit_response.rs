//! What `bulwark audit` reads from the server it probes: arbitrary bytes as the whole answer
//! of a hostile server (status line, headers, body, chunked or not, cut anywhere) to the same
//! client the audit uses (hyper's HTTP/1 client connection, no redirects followed), turned into
//! an `audit::Answer` through the audit's own `audit::read_answer` (header values decoded lossily, at most
//! 64 KiB of body read), then into a probe and its JSON report form.
//!
//! The audit's reading code is private to `audit::Target` and needs a socket; this target
//! drives the same client over an in-memory pipe instead (docs/fuzzing.md says so).
#![no_main]

use std::sync::OnceLock;

use bulwark::audit::routes::Category;
use bulwark::audit::{Answer, Probe};
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

async fn ask(io: tokio::io::DuplexStream) -> anyhow::Result<Answer> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let request = async move {
        let req = Request::builder()
            .method("GET")
            .uri("/v1/models")
            .header("host", "target.invalid:8443")
            .header("accept", "application/json, text/plain, */*")
            .header("user-agent", "bulwark-audit")
            .body(Full::new(Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        anyhow::Ok(bulwark::audit::read_answer(resp).await)
    };
    // The connection task ends when the server's bytes do; the request decides the answer.
    let conn = async move {
        let _ = conn.await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        a = request => a,
        () = conn => unreachable!(),
    }
}

fuzz_target!(|data: &[u8]| {
    let answer = runtime().block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (mut server_read, mut server_write) = tokio::io::split(server);
        let serve = async move {
            // Answer once the request has arrived, as a server does (hyper refuses bytes that
            // come before its request).
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match server_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = server_write.write_all(data).await;
            let _ = server_write.shutdown().await;
        };
        let ((), a) = tokio::join!(serve, ask(client));
        a.unwrap_or_else(|e| Answer {
            status: None,
            headers: Vec::new(),
            error: Some(format!("{e:#}")),
        })
    });
    if std::env::var_os("BULWARK_FUZZ_DEBUG").is_some() {
        eprintln!("{answer:?}");
    }
    if let Some(s) = answer.status {
        assert!((100..=999).contains(&s), "status {s}");
    }
    let probe = Probe {
        method: "GET",
        path: "/v1/models",
        category: Category::Openai,
        anonymous: answer.clone(),
        authenticated: Some(answer),
    };
    serde_json::to_string(&probe).expect("a probe serialises");
});
