//! Shared fixtures for the fuzz targets: the tiny GGUF built from the demo model's metadata
//! (`seeds/make_tiny_gguf.py`), a per-process scratch file for parsers that only read paths,
//! the tokenizer and template built from it, and a router state with no model behind it.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bulwark::api::AppState;
use bulwark::api::limits::RateLimiter;
use bulwark::config::Limits;
use bulwark::infer::scheduler::{self, SchedulerConfig};
use bulwark::keys::KeyStore;
use bulwark::metrics::Metrics;
use bulwark::model::ModelInfo;
use bulwark::model::gguf::GgufFile;
use bulwark::model::template::ChatTemplate;
use bulwark::model::tokenizer::ModelTokenizer;

/// The demo model's metadata (every key, its chat template included) with a 673-token
/// vocabulary and no tensors: 17 KB instead of 98 MB.
pub const TINY_GGUF: &[u8] = include_bytes!("../seeds/tiny.gguf");

/// The model name the router state answers to.
pub const MODEL_NAME: &str = "smollm2-135m-instruct";

/// A file this process owns, rewritten for every input (the GGUF parsers read from a path).
/// Created under /dev/shm when it exists (a campaign does not wear a disk) and unlinked at
/// once where /proc is mounted: the parsers reach it as /proc/self/fd/N, and a crash or the
/// end of the process leaves nothing behind (statics are never dropped).
pub struct ScratchFile {
    file: File,
    path: PathBuf,
    named: bool,
}

impl ScratchFile {
    pub fn new(name: &str) -> Self {
        let dir = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let named = dir.join(format!("bulwark-fuzz-{name}-{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&named)
            .expect("creating the scratch file");
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        if by_fd.exists() {
            let _ = std::fs::remove_file(&named);
            Self {
                file,
                path: by_fd,
                named: false,
            }
        } else {
            Self {
                file,
                path: named,
                named: true,
            }
        }
    }

    pub fn write(&self, data: &[u8]) -> &Path {
        let mut f = &self.file;
        f.set_len(0).expect("truncating the scratch file");
        f.seek(SeekFrom::Start(0))
            .expect("rewinding the scratch file");
        f.write_all(data).expect("writing the scratch file");
        &self.path
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        if self.named {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Parse GGUF bytes through the engine's own path-based entry point.
pub fn open_gguf(scratch: &ScratchFile, bytes: &[u8]) -> anyhow::Result<GgufFile> {
    GgufFile::open_unverified(scratch.write(bytes))
}

/// The tiny model's tokenizer and chat template, built once per process.
pub struct TinyModel {
    pub tokenizer: ModelTokenizer,
    pub template_source: String,
    pub bos: String,
    pub eos: String,
}

impl TinyModel {
    pub fn template(&self) -> ChatTemplate {
        ChatTemplate::new(&self.template_source, self.bos.clone(), self.eos.clone())
            .expect("the demo model's template parses")
    }
}

fn build_tiny() -> TinyModel {
    let scratch = ScratchFile::new("tiny-model");
    let gguf = open_gguf(&scratch, TINY_GGUF).expect("the tiny GGUF parses");
    let tokenizer = ModelTokenizer::from_gguf(&gguf).expect("the tiny tokenizer builds");
    let template_source = gguf
        .opt_str("tokenizer.chat_template")
        .expect("the tiny GGUF has the demo template")
        .to_owned();
    // As infer/load.rs does: the template's bos_token and eos_token are the tokens' text.
    let bos = tokenizer
        .bos_id
        .map(|id| tokenizer.token_text(id))
        .unwrap_or_default();
    let eos = tokenizer.token_text(tokenizer.eos_id);
    TinyModel {
        tokenizer,
        template_source,
        bos,
        eos,
    }
}

pub fn tiny() -> &'static TinyModel {
    static TINY: OnceLock<TinyModel> = OnceLock::new();
    TINY.get_or_init(build_tiny)
}

/// The router's state for the tiny model; its one key is returned beside it.
pub fn app_state() -> (Arc<AppState>, String) {
    let key = bulwark::keys::generate_key().expect("a key");
    let keys = KeyStore::parse(&format!("{}\n", bulwark::keys::entry_line("fuzz", &key)))
        .expect("the keys file parses");
    let limits = Limits {
        // Every input must reach the parsers, not the per-key rate limit.
        rate_limit_per_minute: 0,
        ..Limits::default()
    };
    let metrics = Arc::new(Metrics::default());
    let pending = scheduler::spawn(
        SchedulerConfig {
            max_batch: 1,
            max_batch_tokens: 16,
            queue_depth: limits.queue_depth,
            prefix_cache_bytes: 0,
        },
        1,
        metrics.clone(),
        None,
    )
    .expect("the inference thread starts");
    let t = build_tiny();
    let template = Some(t.template());
    let info = Arc::new(ModelInfo {
        name: MODEL_NAME.into(),
        tokenizer: t.tokenizer,
        template,
        context_length: 8192,
        created: 0,
    });
    let (handle, _thread) = pending
        .start(Box::new(scheduler::NoModel), info.clone())
        .expect("the inference thread takes the runner");
    let state = Arc::new(AppState {
        keys,
        limits: limits.clone(),
        cors_origins: Vec::new(),
        anonymous_health: false,
        model: info,
        scheduler: handle,
        metrics,
        rate: RateLimiter::new(limits.rate_limit_per_minute),
        in_flight: Arc::new(tokio::sync::Semaphore::new(limits.max_in_flight)),
    });
    (state, key)
}

/// Run `f` on a new thread and wait for it; a panic in it is re-raised here (libFuzzer's
/// panic hook reports it either way). Thread-local state `f` leaves behind dies with the
/// thread: the tokenizers crate keeps a per-thread cache for every BPE tokenizer ever built
/// and never frees it, which targets that build one tokenizer per input would accumulate.
pub fn on_own_thread<F: FnOnce() + Send>(f: F) {
    std::thread::scope(|s| {
        if let Err(panic) = s.spawn(f).join() {
            std::panic::resume_unwind(panic);
        }
    });
}
