#!/usr/bin/env bash
# Build `bulwark` with the cuda feature on a machine without a GPU or a system CUDA: the
# toolkit comes from NVIDIA's PyPI wheels (CUDA 13.0, to match driver 580 hosts; cudarc
# 0.19 accepts 11.4 to 13.4), and libcuda, which only ships with the driver, is linked
# against a stub. The binary runs on a host with the NVIDIA driver and the CUDA 13 runtime
# libraries (libcudart, libcublas, libcurand) on its library path.
# Output: target-cuda/release/bulwark. About 17 minutes cold on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-.cuda-venv}
CAP=${CUDA_COMPUTE_CAP:-90}
if [ ! -x "$VENV/bin/pip" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 \
  nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85 'nvidia-curand<10.5' 'nvidia-cublas<13.2'
C=$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)
C=$(cd "$C" && pwd)
# The wheels ship versioned sonames only; the linker wants the plain names.
for l in cudart nvrtc cublas cublasLt; do ln -sf "lib$l.so.13" "$C/lib/lib$l.so"; done
ln -sf libcurand.so.10 "$C/lib/libcurand.so"
# A link-time stub of the driver API (every cu* symbol cudarc declares).
mkdir -p "$C/lib/stubs"
if [ ! -f "$C/lib/stubs/libcuda.so" ]; then
  cargo fetch --quiet
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | head -n1)
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]+\b' "$src" | sort -u | awk '{print "int "$1"(void){return 999;}"}' > "$C/lib/stubs/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$C/lib/stubs/libcuda.so" "$C/lib/stubs/stub.c"
fi
export CUDA_HOME=$C CUDA_PATH=$C CUDA_ROOT=$C PATH=$C/bin:$PATH CUDA_COMPUTE_CAP=$CAP
export LIBRARY_PATH=$C/lib:$C/lib/stubs CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
cargo build --release -p bulwark --features cuda
echo "built $CARGO_TARGET_DIR/release/bulwark (sm_$CAP)"
