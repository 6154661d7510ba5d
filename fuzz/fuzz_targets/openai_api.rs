//! The OpenAI request bodies through the real router: authentication passes (the input's
//! first byte picks the route and a few header variants), then body reading, JSON parsing into
//! the request types (deny_unknown_fields), validation, template rendering and tokenizing, as
//! a server with the demo model's tokenizer and template does. The model itself is absent: a
//! request that passes every check is answered 503 by the scheduler, so inputs cost
//! microseconds, not a generation.
//!
//! Invariants: no 5xx other than that 503, and every answer is an OpenAI-style JSON error.
#![no_main]

use std::sync::{Arc, OnceLock};

use bulwark::api::{self, AppState};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    rt: tokio::runtime::Runtime,
    state: Arc<AppState>,
    bearer: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (state, key) = bulwark_fuzz::app_state();
        Fixture {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            state,
            bearer: format!("Bearer {key}"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let path = if sel & 1 == 0 {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("authorization", f.bearer.as_str());
    if sel & 2 == 0 {
        b = b.header("content-type", "application/json");
    }
    let req = b
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("a request");
    let (status, bytes) = f.rt.block_on(async {
        let resp = api::handle(f.state.clone(), req).await;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .expect("the body")
            .to_bytes();
        (status, bytes)
    });
    assert!(
        !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
        "{status} for {:?}: {}",
        String::from_utf8_lossy(body),
        String::from_utf8_lossy(&bytes)
    );
    assert_ne!(status, StatusCode::OK, "a generation without a model");
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("a JSON answer");
    assert!(
        v["error"]["message"].is_string(),
        "not an OpenAI error: {v}"
    );
});
