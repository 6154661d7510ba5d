//! The probe table: every route a vLLM posture scanner probes (cnspec / mql `vllm` provider
//! v14; the same list is `engine/tests/data/posture-routes.txt`), with the method actually sent.
//!
//! State-changing routes are probed with GET (an answer other than 401/403/404 means the route
//! exists and is exposed) unless `--intrusive` asks for a real empty-body POST.

/// What a route is, for grouping findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    Documentation,
    Metadata,
    Utility,
    Metrics,
    Openai,
    CustomInference,
    Responses,
    Lora,
    OperationalControl,
    Development,
    Profiler,
}

/// One probe.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// The method the route is documented with.
    pub method: &'static str,
    pub path: &'static str,
    pub category: Category,
    /// Sending the documented method could change the server's state.
    pub state_changing: bool,
}

const fn get(path: &'static str, category: Category) -> Route {
    Route {
        method: "GET",
        path,
        category,
        state_changing: false,
    }
}

/// A POST that only reads (inference, tokenisation): probed with `{}`.
const fn post(path: &'static str, category: Category) -> Route {
    Route {
        method: "POST",
        path,
        category,
        state_changing: false,
    }
}

/// A POST that changes state: probed with GET unless intrusive.
const fn act(path: &'static str, category: Category) -> Route {
    Route {
        method: "POST",
        path,
        category,
        state_changing: true,
    }
}

use Category::*;

pub const ROUTES: &[Route] = &[
    get("/docs", Documentation),
    get("/redoc", Documentation),
    get("/openapi.json", Documentation),
    get("/version", Metadata),
    get("/health", Utility),
    get("/ping", Utility),
    get("/load", Utility),
    get("/metrics", Metrics),
    get("/tokenizer_info", Utility),
    post("/tokenize", Utility),
    post("/detokenize", Utility),
    get("/v1/models", Openai),
    post("/v1/chat/completions", Openai),
    post("/v1/completions", Openai),
    post("/v1/embeddings", Openai),
    post("/v1/audio/transcriptions", Openai),
    post("/v1/audio/translations", Openai),
    post("/v1/messages", Openai),
    post("/v1/responses", Openai),
    post("/v1/score", Openai),
    post("/v1/rerank", Openai),
    post("/invocations", CustomInference),
    post("/inference/v1/generate", CustomInference),
    post("/pooling", CustomInference),
    post("/classify", CustomInference),
    post("/score", CustomInference),
    post("/rerank", CustomInference),
    post("/generative_scoring", CustomInference),
    post("/v1/audio/speech", Openai),
    post("/v1/completions/render", Openai),
    post("/v1/chat/completions/render", Openai),
    get(
        "/v1/responses/resp_00000000000000000000000000000000",
        Responses,
    ),
    act(
        "/v1/responses/resp_00000000000000000000000000000000/cancel",
        Responses,
    ),
    act("/v1/load_lora_adapter", Lora),
    act("/v1/unload_lora_adapter", Lora),
    act("/load_lora_adapter", Lora),
    act("/unload_lora_adapter", Lora),
    act("/pause", OperationalControl),
    act("/resume", OperationalControl),
    act("/abort_requests", OperationalControl),
    act("/scale_elastic_ep", OperationalControl),
    post("/is_scaling_elastic_ep", OperationalControl),
    get("/fault_tolerance/status", OperationalControl),
    act("/fault_tolerance/apply", OperationalControl),
    get("/server_info", Development),
    act("/reset_prefix_cache", Development),
    act("/reset_mm_cache", Development),
    act("/reset_encoder_cache", Development),
    act("/sleep", Development),
    act("/wake_up", Development),
    get("/is_sleeping", Development),
    act("/collective_rpc", Development),
    act("/init_weight_transfer_engine", Development),
    act("/start_weight_update", Development),
    act("/start_draft_weight_update", Development),
    act("/update_weights", Development),
    act("/finish_weight_update", Development),
    act("/update_weight_version", Development),
    get("/weight_info", Development),
    get("/is_paused", Development),
    get("/get_world_size", Development),
    act("/start_profile", Profiler),
    act("/stop_profile", Profiler),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The table matches the scanner's list, row for row (engine/tests/data holds a copy).
    #[test]
    fn table_matches_the_scanner_list() {
        let text = include_str!("../../tests/data/posture-routes.txt");
        let rows: Vec<Vec<&str>> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows.len(), ROUTES.len());
        for (row, r) in rows.iter().zip(ROUTES) {
            assert_eq!(row[0], r.method, "{}", r.path);
            assert_eq!(row[2], r.path);
            let wire = if r.state_changing { "GET" } else { r.method };
            assert_eq!(row[1], wire, "{}", r.path);
        }
    }
}
