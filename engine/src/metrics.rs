//! Prometheus metrics, served on their own listener (loopback by default), never on the API.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the time-to-first-token histogram buckets.
const TTFT_BUCKETS: [f64; 10] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
pub struct Metrics {
    pub queued: AtomicU64,
    pub active: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens taken from the prefix cache instead of being computed.
    pub prefix_reused_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub connections: AtomicU64,
    /// Most sequences that ever ran in one step (evidence that requests share steps).
    pub peak_batch: AtomicU64,
    /// Requests answered, by status class and reason (limits named).
    responses: Mutex<std::collections::BTreeMap<(u16, &'static str), u64>>,
    ttft: Mutex<([u64; TTFT_BUCKETS.len()], u64, f64)>,
    /// 1 when the sandbox is fully enforced, 0 otherwise (set at start-up).
    pub sandbox_enforced: AtomicU64,
}

impl Metrics {
    pub fn observe_ttft(&self, d: Duration) {
        let s = d.as_secs_f64();
        let mut h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in TTFT_BUCKETS.iter().enumerate() {
            if s <= *b {
                h.0[i] += 1;
            }
        }
        h.1 += 1;
        h.2 += s;
    }

    pub fn count_response(&self, status: u16, reason: &'static str) {
        let mut r = self.responses.lock().unwrap_or_else(|e| e.into_inner());
        *r.entry((status, reason)).or_default() += 1;
    }

    /// The single-valued metrics, as a table: name, help, type, value.
    fn scalars(&self) -> [(&'static str, &'static str, &'static str, &AtomicU64); 10] {
        [
            (
                "bulwark_queue_depth",
                "Requests waiting for a batch slot.",
                "gauge",
                &self.queued,
            ),
            (
                "bulwark_active_sequences",
                "Sequences in the running batch.",
                "gauge",
                &self.active,
            ),
            (
                "bulwark_peak_batch_size",
                "Most sequences run in one step.",
                "gauge",
                &self.peak_batch,
            ),
            (
                "bulwark_open_connections",
                "Open API connections.",
                "gauge",
                &self.connections,
            ),
            (
                "bulwark_prompt_tokens_total",
                "Prompt tokens computed (those reused from the prefix cache are not).",
                "counter",
                &self.prompt_tokens,
            ),
            (
                "bulwark_prefix_reused_tokens_total",
                "Prompt tokens whose KV cache came from an earlier prompt of the same key.",
                "counter",
                &self.prefix_reused_tokens,
            ),
            (
                "bulwark_generated_tokens_total",
                "Tokens generated.",
                "counter",
                &self.generated_tokens,
            ),
            (
                "bulwark_requests_completed_total",
                "Generations finished.",
                "counter",
                &self.completed,
            ),
            (
                "bulwark_requests_cancelled_total",
                "Generations abandoned by their client.",
                "counter",
                &self.cancelled,
            ),
            (
                "bulwark_sandbox_enforced",
                "1 when Landlock and seccomp are fully enforced.",
                "gauge",
                &self.sandbox_enforced,
            ),
        ]
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut o = String::new();
        for (name, help, kind, v) in self.scalars() {
            let v = v.load(Ordering::Relaxed);
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
        self.render_responses(&mut o);
        self.render_ttft(&mut o);
        o
    }

    fn render_responses(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "# HELP bulwark_responses_total API responses by status and reason.\n# TYPE bulwark_responses_total counter"
        );
        for ((status, reason), v) in self
            .responses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                o,
                "bulwark_responses_total{{status=\"{status}\",reason=\"{reason}\"}} {v}"
            );
        }
    }

    fn render_ttft(&self, o: &mut String) {
        let h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            o,
            "# HELP bulwark_time_to_first_token_seconds Time from admission to the first token.\n# TYPE bulwark_time_to_first_token_seconds histogram"
        );
        for (i, b) in TTFT_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "bulwark_time_to_first_token_seconds_bucket{{le=\"{b}\"}} {}",
                h.0[i]
            );
        }
        let _ = writeln!(
            o,
            "bulwark_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {}",
            h.1
        );
        let _ = writeln!(o, "bulwark_time_to_first_token_seconds_sum {}", h.2);
        let _ = writeln!(o, "bulwark_time_to_first_token_seconds_count {}", h.1);
    }
}
