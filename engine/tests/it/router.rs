//! Authentication before routing, exact routes, CORS and limits, through the real router.
//! Every test but one runs on `util::router_state`: the demo model's tokenizer and template,
//! no weights (a request that passes every check is answered 503), so they take milliseconds.

use hyper::StatusCode;
use serde_json::json;

use crate::util::{self, call};

fn posture_routes() -> Vec<(String, String, bool)> {
    let text =
        std::fs::read_to_string(util::repo_root().join("engine/tests/data/posture-routes.txt"))
            .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[1].to_owned(), f[2].to_owned(), f[4] == "{}")
        })
        .collect()
}

#[tokio::test]
async fn every_scanner_route_is_401_anonymously_and_never_5xx_with_a_key() {
    let t = util::router_state("");
    let routes = posture_routes();
    assert_eq!(routes.len(), 63);
    let auth = t.bearer();
    for (method, path, body) in &routes {
        let body = body.then_some("{}");
        let anon = call(
            &t.state,
            method,
            path,
            &[("content-type", "application/json")],
            body,
        )
        .await;
        assert_eq!(
            anon.status,
            StatusCode::UNAUTHORIZED,
            "{method} {path}: {}",
            anon.text()
        );
        assert_eq!(anon.json()["error"]["code"], "invalid_api_key");
        assert!(anon.headers.get("server").is_none());
        let also_post = call(
            &t.state,
            "POST",
            path,
            &[("content-type", "application/json")],
            Some("{}"),
        )
        .await;
        assert_eq!(also_post.status, StatusCode::UNAUTHORIZED, "POST {path}");
        let keyed = call(
            &t.state,
            method,
            path,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await;
        let expected = match path.as_str() {
            "/v1/models" | "/health" => StatusCode::OK,
            // Real routes with the scanner's empty body: a clear 400, never 5xx.
            "/v1/chat/completions" | "/v1/completions" => StatusCode::BAD_REQUEST,
            _ => StatusCode::NOT_FOUND,
        };
        assert_eq!(
            keyed.status,
            expected,
            "{method} {path} with a key: {}",
            keyed.text()
        );
    }
}

#[tokio::test]
async fn auth_precedes_routing_for_every_method_and_path_variant() {
    let t = util::router_state("");
    let auth = t.bearer();
    let paths = [
        "/",
        "/v1",
        "/v1/",
        "/v1/models/",
        "//v1/models",
        "/v1//models",
        "/v1/../v1/models",
        "/v1/./models",
        "/v1/%6dodels",
        "/v1%2Fmodels",
        "/V1/MODELS",
        "/v1/Models",
        "/health/",
        "/HEALTH",
        "/health%20",
        "/v1/models?x=1",
        "/v1/chat/completions/",
        "/docs",
        "/metrics",
        "/openapi.json",
        "/version",
        "/.env",
        "/v1/models/../../etc/passwd",
    ];
    let methods = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND",
    ];
    for path in paths {
        for method in methods {
            let r = call(&t.state, method, path, &[], None).await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "anonymous {method} {path}"
            );
            let r = call(&t.state, method, path, &[("authorization", &auth)], None).await;
            let ok_exact = path == "/v1/models?x=1" && method == "GET";
            if !ok_exact {
                assert!(
                    matches!(
                        r.status,
                        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
                    ),
                    "{method} {path} with a key: {}",
                    r.status
                );
            }
        }
    }
    // Upgrade requests are authenticated like any other, and never upgraded.
    for (k, v) in [("upgrade", "websocket"), ("upgrade", "h2c")] {
        let r = call(
            &t.state,
            "GET",
            "/v1/models",
            &[(k, v), ("connection", "upgrade")],
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    // With anonymous health on, only a byte-exact GET /health is anonymous.
    let mut cfg = util::config("");
    cfg.server.as_mut().unwrap().anonymous_health = true;
    let t = util::state_with(cfg);
    assert_eq!(
        call(&t.state, "GET", "/health", &[], None).await.status,
        StatusCode::OK
    );
    for path in ["/health/", "/HEALTH", "//health", "/health?x", "/healthz"] {
        let expected = if path == "/health?x" {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(
            call(&t.state, "GET", path, &[], None).await.status,
            expected,
            "{path}"
        );
    }
    assert_eq!(
        call(&t.state, "HEAD", "/health", &[], None).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&t.state, "POST", "/health", &[], None).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn health_needs_a_key_unless_made_anonymous_and_says_nothing() {
    let t = util::router_state("");
    assert_eq!(
        call(&t.state, "GET", "/health", &[], None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let auth = t.bearer();
    assert_eq!(
        call(
            &t.state,
            "GET",
            "/health",
            &[("authorization", &auth)],
            None
        )
        .await
        .status,
        StatusCode::OK
    );
    let mut cfg = util::config("");
    cfg.server.as_mut().unwrap().anonymous_health = true;
    let t = util::state_with(cfg);
    let r = call(&t.state, "GET", "/health", &[], None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"status": "ok"}));
    assert!(r.headers.get("server").is_none());
}

#[tokio::test]
async fn keys_are_accepted_only_from_a_bearer_header() {
    let t = util::router_state("");
    let key = t.key.clone();
    let cases: Vec<(String, Vec<(&str, String)>)> = vec![
        (format!("/v1/models?api_key={key}"), vec![]),
        ("/v1/models".into(), vec![("x-api-key", key.clone())]),
        ("/v1/models".into(), vec![("authorization", key.clone())]),
        (
            "/v1/models".into(),
            vec![("authorization", format!("Basic {key}"))],
        ),
        (
            "/v1/models".into(),
            vec![("authorization", format!("Bearer {key}x"))],
        ),
        (
            "/v1/models".into(),
            vec![("authorization", format!("Bearer  {key}"))],
        ),
        (
            "/v1/models".into(),
            vec![("authorization", "Bearer ".into())],
        ),
        (
            "/v1/models".into(),
            vec![("authorization", format!("Bearer {}", &key[..20]))],
        ),
        (
            "/v1/models".into(),
            vec![
                ("authorization", format!("Bearer {key}")),
                ("authorization", format!("Bearer {key}")),
            ],
        ),
        ("/v1/models".into(), vec![("cookie", format!("key={key}"))]),
    ];
    for (path, headers) in cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = call(&t.state, "GET", &path, &h, None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path} {headers:?}");
        assert_eq!(r.headers.get("www-authenticate").unwrap(), "Bearer");
        assert!(!r.text().contains(&key));
    }
    let r = call(
        &t.state,
        "GET",
        "/v1/models",
        &[("authorization", &format!("bearer {key}"))],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "the scheme is case-insensitive");
    let other = format!("Bearer {}", t.other_key);
    let r = call(
        &t.state,
        "GET",
        "/v1/models",
        &[("authorization", &other)],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "every key in the file works");
}

#[tokio::test]
async fn models_lists_the_served_model_and_unknown_models_are_404() {
    let t = util::router_state("");
    let auth = t.bearer();
    let r = call(
        &t.state,
        "GET",
        "/v1/models",
        &[("authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(r.json()["data"][0]["id"], util::model_name());
    let r = call(
        &t.state,
        "GET",
        &format!("/v1/models/{}", util::model_name()),
        &[("authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = call(
        &t.state,
        "GET",
        "/v1/models/gpt-4",
        &[("authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let r = t
        .post(
            "/v1/chat/completions",
            json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["param"], "model");
}

#[tokio::test]
async fn cors_is_off_by_default() {
    let t = util::router_state("");
    let auth = t.bearer();
    let r = call(
        &t.state,
        "GET",
        "/v1/models",
        &[("authorization", &auth), ("origin", "https://evil.example")],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers.get("access-control-allow-origin").is_none());
    let r = call(
        &t.state,
        "OPTIONS",
        "/v1/completions",
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.headers
            .keys()
            .all(|k| !k.as_str().starts_with("access-control"))
    );
}

#[tokio::test]
async fn cors_allows_exact_origins_and_never_reflects() {
    let mut cfg = util::config("");
    cfg.server.as_mut().unwrap().cors_origins = vec!["https://app.example".into()];
    let t = util::state_with(cfg);
    let auth = t.bearer();
    let pre = [
        ("origin", "https://app.example"),
        ("access-control-request-method", "POST"),
    ];
    let r = call(&t.state, "OPTIONS", "/v1/chat/completions", &pre, None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example"
    );
    for evil in [
        "https://evil.example",
        "https://app.example.evil.example",
        "null",
        "https://APP.example",
    ] {
        let r = call(
            &t.state,
            "OPTIONS",
            "/v1/chat/completions",
            &[("origin", evil), ("access-control-request-method", "POST")],
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{evil}");
        let r = call(
            &t.state,
            "GET",
            "/v1/models",
            &[("authorization", &auth), ("origin", evil)],
            None,
        )
        .await;
        assert!(
            r.headers.get("access-control-allow-origin").is_none(),
            "{evil} reflected"
        );
    }
    // A preflight for an unknown path is not answered anonymously.
    let r = call(&t.state, "OPTIONS", "/admin", &pre, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn limits_answer_with_their_names() {
    let t = util::router_state(
        "[limits]\nmax_body_bytes = 2048\nmax_tokens = 64\nmax_prompt_tokens = 50\nmax_headers = 20\nmax_header_bytes = 2048\nmax_messages = 3\n",
    );
    let auth = t.bearer();
    let big =
        json!({"model": util::model_name(), "messages": [{"role": "user", "content": "x".repeat(4000)}]})
            .to_string();
    let r = call(
        &t.state,
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        Some(&big),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.text().contains("limits.max_body_bytes"), "{}", r.text());

    let r = t.chat("hi", json!({"max_tokens": 65})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().contains("limits.max_tokens"), "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "max_tokens");

    let r = t.chat(&"word ".repeat(80), json!({})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.text().contains("limits.max_prompt_tokens"),
        "{}",
        r.text()
    );

    let msgs: Vec<_> = (0..4)
        .map(|_| json!({"role": "user", "content": "a"}))
        .collect();
    let r = t
        .post(
            "/v1/chat/completions",
            json!({"model": util::model_name(), "messages": msgs}),
        )
        .await;
    assert!(r.text().contains("limits.max_messages"), "{}", r.text());

    let many: Vec<(String, String)> = (0..25).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let mut h: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    h.push(("authorization", &auth));
    let r = call(&t.state, "GET", "/v1/models", &h, None).await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(r.text().contains("limits.max_headers"));
    let long = "v".repeat(3000);
    let r = call(
        &t.state,
        "GET",
        "/v1/models",
        &[("authorization", &auth), ("x-long", &long)],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(r.text().contains("limits.max_header_bytes"));

    let r = call(
        &t.state,
        "POST",
        "/v1/chat/completions",
        &[("authorization", &auth), ("content-type", "text/plain")],
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn per_key_rate_limit_answers_429_with_retry_after() {
    let t = util::router_state("[limits]\nrate_limit_per_minute = 3\n");
    let auth = t.bearer();
    for _ in 0..3 {
        assert_eq!(
            call(
                &t.state,
                "GET",
                "/v1/models",
                &[("authorization", &auth)],
                None
            )
            .await
            .status,
            StatusCode::OK
        );
    }
    let r = call(
        &t.state,
        "GET",
        "/v1/models",
        &[("authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        r.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert!(r.text().contains("limits.rate_limit_per_minute"));
    let other = format!("Bearer {}", t.other_key);
    assert_eq!(
        call(
            &t.state,
            "GET",
            "/v1/models",
            &[("authorization", &other)],
            None
        )
        .await
        .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn in_flight_limit_answers_503_with_retry_after() {
    let t = util::router_state("[limits]\nmax_in_flight = 1\n");
    let permit = t.state.in_flight.clone().try_acquire_owned().unwrap();
    let auth = t.bearer();
    let r = call(
        &t.state,
        "GET",
        "/v1/models",
        &[("authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["retry-after"], "1");
    assert!(r.text().contains("limits.max_in_flight"));
    drop(permit);
    assert_eq!(
        call(
            &t.state,
            "GET",
            "/v1/models",
            &[("authorization", &auth)],
            None
        )
        .await
        .status,
        StatusCode::OK
    );
}

/// Regression: the official client's `model_dump()` of an assistant message carries
/// `refusal`, `annotations`, `audio`, `function_call` and `tool_calls` as null or empty, and
/// replaying it in the next turn got 400 `unknown field`.
#[tokio::test]
async fn replayed_assistant_messages_are_accepted_in_their_empty_forms() {
    let t = util::state("");
    let assistant = serde_json::json!({
        "role": "assistant", "content": "Paris.", "refusal": null, "annotations": [],
        "audio": null, "function_call": null, "tool_calls": null
    });
    let body = |a: serde_json::Value| {
        serde_json::json!({
            "model": util::model_name(), "max_tokens": 2,
            "messages": [{"role": "user", "content": "Capital of France?"}, a,
                         {"role": "user", "content": "And of Italy?"}]
        })
    };
    let r = t
        .post("/v1/chat/completions", body(assistant.clone()))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let mut with_calls = assistant;
    with_calls["tool_calls"] = serde_json::json!([{"id": "x", "type": "function"}]);
    let r = t.post("/v1/chat/completions", body(with_calls)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().contains("tool_calls"), "{}", r.text());
}

#[tokio::test]
async fn unsupported_inputs_are_refused_by_name() {
    let t = util::router_state("");
    let cases = [
        (json!({"chat_template": "{{ 7*7 }}"}), "chat_template"),
        (json!({"tools": [{"type": "function"}]}), "tools"),
        (json!({"n": 2}), "n"),
        (json!({"temperature": 3.0}), "temperature"),
        (json!({"top_p": 0.0}), "top_p"),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"presence_penalty": 0.5}), "presence_penalty"),
    ];
    for (extra, param) in cases {
        let r = t.chat("hi", extra.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{extra}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{extra}: {}", r.text());
    }
    let r = t
        .post(
            "/v1/completions",
            json!({"model": util::model_name(), "prompt": "hi", "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["param"], "stream_options", "{}", r.text());
    let r = t.chat("hi", json!({"frobnicate": 1})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().contains("frobnicate"), "{}", r.text());
    // Image URLs are refused: the server never fetches anything a request names.
    let r = t.post("/v1/chat/completions", json!({"model": util::model_name(), "messages": [{"role": "user", "content": [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data/"}}]}]})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().contains("never fetched"));
    // Malformed JSON gets a 400 without internals.
    let auth = t.bearer();
    let r = call(
        &t.state,
        "POST",
        "/v1/completions",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        Some("{\"model\":"),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["code"], "invalid_json");
}

#[tokio::test]
async fn context_window_is_enforced() {
    // The demo model has an 8192-token window; configure a smaller one.
    let mut cfg = util::config("[limits]\nmax_tokens = 4096\n");
    cfg.model.context_length = Some(64);
    let t = util::state_with(cfg);
    let r = t.chat("hello there", json!({"max_tokens": 60})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    let r = t
        .chat("hello there", json!({"max_tokens": 10, "temperature": 0}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}
