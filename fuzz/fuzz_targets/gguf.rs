//! GGUF files as `bulwark model inspect` and the loader read them: arbitrary bytes written to
//! a file, parsed by `GgufFile` (candle's reader behind the engine's own checks), then the
//! whole `model inspect` path (architecture, tensors, tokenizer, template presence).
#![no_main]

use std::sync::OnceLock;

use bulwark_fuzz::ScratchFile;
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static ScratchFile {
    static S: OnceLock<ScratchFile> = OnceLock::new();
    S.get_or_init(|| ScratchFile::new("gguf"))
}

fuzz_target!(|data: &[u8]| {
    let path = scratch().write(data);
    if let Ok(g) = bulwark::model::gguf::GgufFile::open_unverified(path) {
        // Typed access to whatever metadata parsed.
        for key in g.content.metadata.keys().take(64) {
            let _ = g.opt_str(key);
            let _ = g.opt_u32(key);
            let _ = g.opt_f32(key);
            let _ = g.opt_bool(key);
            let _ = g.get_array(key);
        }
        let _ = bulwark::model::arch::LlamaConfig::from_gguf(&g);
        // inspect reopens the same file: the path every user of `model inspect` takes.
        // On its own thread: inspect builds a tokenizer (see on_own_thread).
        bulwark_fuzz::on_own_thread(|| {
            let _ = bulwark::model::inspect(path);
        });
    }
});
