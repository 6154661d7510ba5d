//! Fixtures: the demo model, a router state built from a real configuration, and a call
//! helper that drives the router like hyper would.

use std::path::PathBuf;
use std::sync::Arc;

use bulwark::api::{self, AppState};
use bulwark::config::Config;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};

/// The demo model as scripts/demo-model.json describes it: the one place its name, file and
/// hash are written.
#[derive(serde::Deserialize)]
pub struct DemoModel {
    pub name: String,
    pub file: String,
    pub dir: String,
    pub sha256: String,
}

pub fn demo() -> &'static DemoModel {
    static DEMO: std::sync::LazyLock<DemoModel> = std::sync::LazyLock::new(|| {
        serde_json::from_str(include_str!("../../../scripts/demo-model.json"))
            .expect("scripts/demo-model.json")
    });
    &DEMO
}

pub fn model_sha256() -> &'static str {
    &demo().sha256
}

pub fn model_name() -> &'static str {
    &demo().name
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

pub fn model_path() -> PathBuf {
    let p = std::env::var_os("BULWARK_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(&demo().dir).join(&demo().file));
    assert!(
        p.exists(),
        "demo model missing at {}: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

pub struct TestState {
    pub state: Arc<AppState>,
    pub key: String,
    pub other_key: String,
}

/// A configuration for the demo model; `extra` is appended TOML (sections of its own).
/// The one configuration builder of the integration tests.
pub fn config(extra: &str) -> Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:1\"\nplaintext = true\nkeys_file = \"unused\"\n{}{extra}",
        model_toml(model_name())
    );
    let cfg: Config = toml::from_str(&text).unwrap();
    cfg.validate().unwrap();
    cfg
}

/// The demo model's `[model]` section served as `name` (a worker's configuration starts
/// with it; it has no `[server]`).
pub fn model_toml(name: &str) -> String {
    format!(
        "[model]\npath = {path:?}\nsha256 = \"{sha}\"\nname = \"{name}\"\n",
        path = model_path().display().to_string(),
        sha = model_sha256(),
    )
}

pub fn state(extra: &str) -> TestState {
    state_with(config(extra))
}

pub fn state_with(cfg: Config) -> TestState {
    let (keys, key, other_key) = two_keys();
    let (state, _thread) = bulwark::serve::build_state(&cfg, keys).unwrap();
    TestState {
        state,
        key,
        other_key,
    }
}

/// A router state with the demo model's tokenizer, template and context window but no
/// weights (`NoModel`): for tests that route, authenticate, validate and tokenize but never
/// generate. A request that passes every check is answered 503. Milliseconds, not a model
/// load.
pub fn router_state(extra: &str) -> TestState {
    use bulwark::infer::scheduler;
    let cfg = config(extra);
    let gguf = bulwark::model::gguf::GgufFile::open_unverified(&model_path()).unwrap();
    let info = bulwark::infer::load::model_info(
        &bulwark::model::ParsedModel::Gguf(gguf),
        &cfg.model.name,
        0,
        cfg.model.context_length,
    )
    .unwrap();
    let info = Arc::new(info);
    let metrics = Arc::new(bulwark::metrics::Metrics::default());
    let pending = scheduler::spawn(
        bulwark::serve::scheduler_config(&cfg),
        1,
        metrics.clone(),
        None,
    )
    .unwrap();
    let (handle, _thread) = pending
        .start(Box::new(scheduler::NoModel), info.clone())
        .unwrap();
    let (keys, key, other_key) = two_keys();
    let state = bulwark::serve::app_state(&cfg, keys, metrics, info, handle).unwrap();
    TestState {
        state,
        key,
        other_key,
    }
}

/// A keys file with two keys, "tester" and "other", and both keys.
fn two_keys() -> (bulwark::keys::KeyStore, String, String) {
    let key = bulwark::keys::generate_key().unwrap();
    let other_key = bulwark::keys::generate_key().unwrap();
    let keys = bulwark::keys::KeyStore::parse(&format!(
        "{}\n{}\n",
        bulwark::keys::entry_line("tester", &key),
        bulwark::keys::entry_line("other", &other_key)
    ))
    .unwrap();
    (keys, key, other_key)
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn call(
    state: &Arc<AppState>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Reply {
    let mut b = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .unwrap();
    let resp = api::handle(state.clone(), req).await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

impl TestState {
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.key)
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> Reply {
        self.post_with_key(&self.key, path, body).await
    }

    async fn post_with_key(&self, key: &str, path: &str, body: serde_json::Value) -> Reply {
        let auth = format!("Bearer {key}");
        call(
            &self.state,
            "POST",
            path,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Some(&body.to_string()),
        )
        .await
    }

    pub async fn chat(&self, content: &str, extra: serde_json::Value) -> Reply {
        self.post("/v1/chat/completions", chat_body(content, extra))
            .await
    }

    /// `chat` with the second key ("other").
    pub async fn chat_as_other(&self, content: &str, extra: serde_json::Value) -> Reply {
        self.post_with_key(
            &self.other_key,
            "/v1/chat/completions",
            chat_body(content, extra),
        )
        .await
    }
}

fn chat_body(content: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": model_name(),
        "messages": [{"role": "user", "content": content}],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Content of a non-streaming chat reply.
pub fn content(r: &Reply) -> String {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// One step of a greedy llama.cpp reference: the token it chose and its two most likely
/// tokens with their log-probabilities.
#[derive(serde::Deserialize)]
pub struct GreedyStep {
    pub id: u32,
    pub top2: [(u32, f32); 2],
}

/// Decodes greedily after `prompt`, step by step against llama.cpp's `steps`: ours must be
/// llama.cpp's choice, or one of its top two where they are within `near_tie` nats (rounding
/// decides those); once ours takes the other one the contexts differ and the comparison
/// ends. Returns the logits of the first step and how many tokens were equal.
pub fn follow_greedy(
    model: &bulwark::infer::models::llama::LlamaModel,
    prompt: &[u32],
    steps: &[GreedyStep],
    near_tie: f32,
    what: &str,
) -> (Vec<f32>, usize) {
    let mut cache = model.new_cache();
    let mut next = prompt.to_vec();
    let mut first = Vec::new();
    for (s, step) in steps.iter().enumerate() {
        let mut logits = model
            .forward(&mut [bulwark::infer::models::llama::BatchItem {
                tokens: &next,
                cache: &mut cache,
            }])
            .unwrap();
        let ours = bulwark::infer::sampler::argmax(&logits[0]);
        if s == 0 {
            first = logits.swap_remove(0);
        }
        let [(a, lp1), (b, lp2)] = step.top2;
        if lp1 - lp2 < near_tie {
            assert!(
                ours == a || ours == b,
                "{what}: step {s}: ours {ours}, llama.cpp's near tie {a}/{b}"
            );
        } else {
            assert_eq!(ours, step.id, "{what}: step {s}");
        }
        if ours != step.id {
            return (first, s);
        }
        next = vec![ours];
    }
    (first, steps.len())
}
