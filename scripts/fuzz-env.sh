# Sourced by scripts/fuzz.sh and scripts/fuzz-smoke.sh: the tools a fuzz run needs, installed
# idempotently (a nightly toolchain beside the pinned stable one, and cargo-fuzz), and each
# target's libFuzzer options.

# Nightly is used for fuzzing only (sanitizer and coverage flags); rust-toolchain.toml keeps
# the pinned stable for everything else. Returns 1, saying why, when it cannot be had.
fuzz_ensure_tools() {
    if ! command -v rustup >/dev/null 2>&1; then
        echo "fuzz: rustup is missing; install it to fuzz (https://rustup.rs)" >&2
        return 1
    fi
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
        echo "fuzz: installing the nightly toolchain (fuzzing only)"
        rustup toolchain install nightly --profile minimal >&2 || {
            echo "fuzz: could not install the nightly toolchain" >&2
            return 1
        }
    fi
    if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
        echo "fuzz: installing cargo-fuzz"
        cargo +nightly install cargo-fuzz --locked >&2 || {
            echo "fuzz: could not install cargo-fuzz" >&2
            return 1
        }
    fi
}

# libFuzzer options per target: dictionaries and input sizes.
fuzz_target_args() {
    local dicts=fuzz/dicts
    [ -d "$dicts" ] || dicts=../fuzz/dicts
    dicts=$(cd "$dicts" && pwd)
    case $1 in
        cluster_frame) echo "-max_len=4096" ;;
        gguf) echo "-max_len=65536 -dict=$dicts/gguf.dict" ;;
        tokenizer) echo "-max_len=4096 -dict=$dicts/chatml.dict" ;;
        chat_template) echo "-max_len=4096 -dict=$dicts/chatml.dict" ;;
        openai_api) echo "-max_len=8192 -dict=$dicts/json.dict" ;;
        config) echo "-max_len=4096 -dict=$dicts/toml.dict" ;;
        audit_response) echo "-max_len=8192 -dict=$dicts/http.dict" ;;
        hf_directory) echo "-max_len=16384 -dict=$dicts/json.dict" ;;
    esac
}

# The committed corpus keeps inputs up to this many bytes (longer ones are cut by the merge),
# so that the repository stays small (about 13 MB in all, most of it gguf's whole files and
# hf_directory's directories). Measured: cutting config and
# audit_response inputs to 1 KiB loses no coverage; cutting gguf's to 4 KiB lost a quarter of
# it, so gguf inputs are kept whole.
fuzz_corpus_max_len() {
    case $1 in
        config | audit_response) echo 1024 ;;
        gguf) echo 65536 ;;
        hf_directory) echo 16384 ;;
        *) echo 8192 ;;
    esac
}
