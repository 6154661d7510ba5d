//! Generation through the scheduler: greedy answers, seeds, stop sequences, batching that
//! does not change results, and cancellation that frees the slot.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::util::{self, content};

/// On f32 weights the model's first choice for this prompt is "The" and it answers. (Its first
/// two tokens are 0.09 nats apart; see the next test.)
#[tokio::test]
async fn greedy_chat_answers_the_question() {
    let t = util::state("weights = \"f32\"");
    let r = t
        .chat(
            "What is the capital of France?",
            json!({"temperature": 0, "max_tokens": 24}),
        )
        .await;
    let text = content(&r);
    assert!(text.contains("Paris"), "{text}");
    let j = r.json();
    assert_eq!(j["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        j["usage"]["prompt_tokens"], 37,
        "same prompt length as llama.cpp's rendering"
    );
}

/// With the default quantized weights the server decodes what llama.cpp does: its greedy
/// answer to this prompt starts "L'Étoile, la" (engine/tests/data/llamacpp-greedy.json; the
/// reference test shows the first 11 tokens equal, after which a near tie parts them).
#[tokio::test]
async fn greedy_chat_follows_llama_cpp_on_quantized_weights() {
    let t = util::state("");
    let r = t
        .chat(
            "What is the capital of France?",
            json!({"temperature": 0, "max_tokens": 7}),
        )
        .await;
    assert_eq!(content(&r), "L'Étoile, la");
}

#[tokio::test]
async fn same_seed_same_output_and_seeds_matter() {
    let t = util::state("");
    let p = json!({"temperature": 1.0, "seed": 1234, "max_tokens": 24});
    let a = content(&t.chat("Tell me a story about a cat.", p.clone()).await);
    let b = content(&t.chat("Tell me a story about a cat.", p).await);
    assert_eq!(a, b);
    let mut outs = std::collections::HashSet::new();
    for seed in 1..=4 {
        outs.insert(content(
            &t.chat(
                "Tell me a story about a cat.",
                json!({"temperature": 1.0, "seed": seed, "max_tokens": 24}),
            )
            .await,
        ));
    }
    assert!(outs.len() > 1, "different seeds should sample differently");
}

#[tokio::test]
async fn stop_sequences_cut_the_output() {
    let t = util::state("");
    let base = content(
        &t.chat(
            "Count from 1 to 10, separated by commas.",
            json!({"temperature": 0, "max_tokens": 40}),
        )
        .await,
    );
    assert!(base.contains('5'), "{base}");
    let r = t
        .chat(
            "Count from 1 to 10, separated by commas.",
            json!({"temperature": 0, "max_tokens": 40, "stop": ["5"]}),
        )
        .await;
    let cut = content(&r);
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
    assert!(!cut.contains('5'), "{cut}");
    assert_eq!(
        cut,
        base[..base.find('5').unwrap()],
        "stops exactly before the stop sequence"
    );
}

#[tokio::test]
async fn max_tokens_ends_with_length() {
    let t = util::state("");
    let r = t.post("/v1/completions", json!({"model": util::model_name(), "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0})).await;
    let j = r.json();
    assert_eq!(j["choices"][0]["finish_reason"], "length", "{j}");
    assert_eq!(j["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn concurrent_requests_share_steps_and_get_the_same_answers() {
    let t = util::state("");
    let prompts = [
        "What is the capital of France?",
        "Name a color.",
        "What is 2+2?",
        "Say hello in Spanish.",
    ];
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(content(
            &t.chat(p, json!({"temperature": 0, "max_tokens": 32})).await,
        ));
    }
    assert_eq!(t.state.metrics.peak_batch.load(Ordering::Relaxed), 1);
    let futs = prompts.map(|p| {
        let s = &t;
        async move { content(&s.chat(p, json!({"temperature": 0, "max_tokens": 32})).await) }
    });
    let together = futures_join_all(futs).await;
    assert_eq!(alone, together, "batching must not change greedy answers");
    assert!(
        t.state.metrics.peak_batch.load(Ordering::Relaxed) >= 2,
        "requests did not share steps"
    );
}

async fn futures_join_all<F: std::future::Future>(futs: [F; 4]) -> Vec<F::Output> {
    let [a, b, c, d] = futs;
    let (a, b, c, d) = tokio::join!(a, b, c, d);
    vec![a, b, c, d]
}

#[tokio::test]
async fn a_dropped_request_frees_its_slot_at_once() {
    let t = util::state("");
    let metrics = t.state.metrics.clone();
    let fut = t.chat(
        "Write a long essay about the sea.",
        json!({"max_tokens": 2000, "temperature": 0.7, "seed": 7}),
    );
    // Abandon the request while it generates (as hyper does when a client disconnects): the
    // first token comes within about 0.1 s, and this seed's essay is hundreds of tokens.
    let _ = tokio::time::timeout(Duration::from_millis(300), fut).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while metrics.active.load(Ordering::Relaxed) != 0
        || metrics.cancelled.load(Ordering::Relaxed) == 0
    {
        assert!(Instant::now() < deadline, "slot not freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let generated = metrics.generated_tokens.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        metrics.generated_tokens.load(Ordering::Relaxed),
        generated,
        "still generating"
    );
}

#[tokio::test]
async fn logprobs_are_consistent() {
    let t = util::state("");
    let r = t
        .chat(
            "What is the capital of France?",
            json!({"temperature": 0, "max_tokens": 4, "logprobs": true, "top_logprobs": 5}),
        )
        .await;
    let j = r.json();
    let lp = j["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lp.len(), 4);
    for e in lp {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], e["token"]);
        let v: Vec<f64> = top.iter().map(|x| x["logprob"].as_f64().unwrap()).collect();
        assert!(v.windows(2).all(|w| w[0] >= w[1]) && v[0] <= 0.0);
    }
}

/// Tokens that carry part of a character (this answer's Japanese is byte tokens) give their
/// raw bytes in `logprobs`, and the bytes of all tokens rebuild the text (lossily only for a
/// character that max_tokens cut at the end).
#[tokio::test]
async fn logprob_bytes_rebuild_the_text_even_inside_a_character() {
    let t = util::state("");
    let r = t
        .chat(
            "Write the Japanese word for thank you, in Japanese script.",
            json!({"temperature": 0, "max_tokens": 24, "logprobs": true}),
        )
        .await;
    let j = r.json();
    let text = j["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let entries = j["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    let token_bytes: Vec<Vec<u8>> = entries
        .iter()
        .map(|e| {
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect()
        })
        .collect();
    // The end-of-turn token is neither in the text nor in the logprobs.
    assert_eq!(String::from_utf8_lossy(&token_bytes.concat()), text);
    assert!(
        token_bytes.iter().any(|b| std::str::from_utf8(b).is_err()),
        "the test needs a token that carries part of a character: {text}"
    );
}

/// Regression: a generation cut by max_tokens inside a character dropped the bytes of its last
/// token from the text while counting the token. Every length that cuts the answer must give
/// the lossy decoding of all its tokens' bytes.
#[tokio::test]
async fn a_generation_cut_inside_a_character_keeps_its_bytes() {
    let t = util::state("");
    let mut cut_inside = 0;
    for max_tokens in 1..=12 {
        let r = t
            .chat(
                "Write the Japanese word for thank you, in Japanese script.",
                json!({"temperature": 0, "max_tokens": max_tokens, "logprobs": true}),
            )
            .await;
        let j = r.json();
        let text = j["choices"][0]["message"]["content"].as_str().unwrap();
        let bytes: Vec<u8> = j["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| e["bytes"].as_array().unwrap().clone())
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        if std::str::from_utf8(&bytes).is_err() {
            cut_inside += 1;
        }
        assert_eq!(
            text,
            String::from_utf8_lossy(&bytes),
            "max_tokens {max_tokens}"
        );
    }
    assert!(
        cut_inside > 0,
        "no length cut the answer inside a character"
    );
}

/// A prompt that starts like an earlier one of the same key reuses that prompt's cached
/// prefix (the chat template's system prompt and more) and answers exactly as without it;
/// another key's prompt with the same prefix computes it again (no timing signal across keys).
#[tokio::test]
async fn prompt_prefixes_are_reused_within_a_key_only() {
    let t = util::state("");
    let reused = || t.state.metrics.prefix_reused_tokens.load(Ordering::Relaxed);
    let ask = json!({"temperature": 0, "max_tokens": 16});
    let question = "Name three colours of the rainbow.";
    let first = content(&t.chat(question, ask.clone()).await);
    assert_eq!(reused(), 0);
    let again = content(&t.chat(question, ask.clone()).await);
    let after_same_key = reused();
    assert!(after_same_key >= 30, "reused {after_same_key} tokens");
    assert_eq!(again, first, "a reused prefix changed the answer");

    let other = t.chat_as_other(question, ask.clone()).await;
    assert_eq!(content(&other), first);
    assert_eq!(
        reused(),
        after_same_key,
        "another key reused this key's prefix"
    );

    let off = util::state("[engine]\nprefix_cache_mb = 0\n");
    content(&off.chat(question, ask.clone()).await);
    content(&off.chat(question, ask).await);
    assert_eq!(
        off.state
            .metrics
            .prefix_reused_tokens
            .load(Ordering::Relaxed),
        0
    );
}
