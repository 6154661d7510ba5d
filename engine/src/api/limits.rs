//! Request limits enforced in the router: header size and count, and the per-key rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use hyper::header::HeaderMap;

use super::error::ApiError;
use crate::config::Limits;

/// Header size and count against the configured limits. hyper enforces hard ceilings before
/// this (see serve/connection.rs); this check gives the configured, named answer.
pub fn check_headers(headers: &HeaderMap, limits: &Limits) -> Result<(), ApiError> {
    if headers.len() > limits.max_headers {
        return Err(ApiError::HeadersTooLarge {
            message: format!(
                "Too many request headers: the limit (limits.max_headers) is {}.",
                limits.max_headers
            ),
        });
    }
    let size: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if size > limits.max_header_bytes {
        return Err(ApiError::HeadersTooLarge {
            message: format!(
                "Request headers are too large: the limit (limits.max_header_bytes) is {} bytes.",
                limits.max_header_bytes
            ),
        });
    }
    Ok(())
}

/// A token bucket per key name: `per_minute` requests per minute, bursts up to that many.
pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn check(&self, key: &str) -> Result<(), ApiError> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let cap = self.per_minute as f64;
        let per_sec = cap / 60.0;
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        // Key names come from the keys file, so the map is bounded by its size.
        let (tokens, last) = b.entry(key.to_owned()).or_insert((cap, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * per_sec).min(cap);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - *tokens) / per_sec).ceil().max(1.0) as u64;
            Err(ApiError::RateLimited {
                retry_after_secs: wait,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_per_key() {
        let r = RateLimiter::new(2);
        assert!(r.check("a").is_ok());
        assert!(r.check("a").is_ok());
        let e = r.check("a").unwrap_err();
        assert!(matches!(e, ApiError::RateLimited { retry_after_secs } if retry_after_secs >= 1));
        assert!(r.check("b").is_ok(), "another key has its own bucket");
    }

    #[test]
    fn header_count_limit_is_named() {
        let mut h = HeaderMap::new();
        for i in 0..5 {
            h.insert(
                hyper::header::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                "v".parse().unwrap(),
            );
        }
        let limits = Limits {
            max_headers: 4,
            ..Limits::default()
        };
        let e = check_headers(&h, &limits).unwrap_err();
        assert!(e.body().to_string().contains("limits.max_headers"));
    }
}
