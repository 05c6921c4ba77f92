#!/usr/bin/env bash
# Optional GPU extra: build FlashAttention-3's forward kernel for Hopper (H100/H200) from a flash-attention
# checkout, reduced to what HiDream-O1 runs (bf16, head dim 128, dense, no backward): three files to
# compile instead of hundreds. Needs nvcc (CUDA >= 12.3) and the checkout's csrc/cutlass submodule.
#
#   bash scripts/build-fa3.sh /path/to/flash-attention
#   export PYTHONPATH=/path/to/flash-attention/hopper:$PYTHONPATH   # the engine then uses it
set -euo pipefail
src=${1:?usage: build-fa3.sh <flash-attention checkout>}
cd "$src/hopper"
[ -d ../csrc/cutlass/include ] || { echo "missing $src/csrc/cutlass/include (git submodule update --init csrc/cutlass)" >&2; exit 1; }
for f in SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP FP16 FP8 VARLEN SM80 \
         HDIM64 HDIM96 HDIM192 HDIM256 HDIMDIFF64 HDIMDIFF192 BACKWARD; do
  export "FLASH_ATTENTION_DISABLE_$f=TRUE"
done
MAX_JOBS=${MAX_JOBS:-$(nproc)} NVCC_THREADS=${NVCC_THREADS:-4} python3 setup.py build_ext --inplace
python3 - <<'PY'
import torch, flash_attn_interface as fa
q = torch.randn(1, 256, 32, 128, device="cuda", dtype=torch.bfloat16)
kv = torch.randn(1, 300, 8, 128, device="cuda", dtype=torch.bfloat16)
ref = torch.nn.functional.scaled_dot_product_attention(
    q.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2), enable_gqa=True).transpose(1, 2)
err = (fa.flash_attn_func(q, kv, kv) - ref).abs().max().item()
print(f"FlashAttention-3 built; max difference from SDPA {err:.2e}")
assert err < 2e-2
PY
echo "use it: export PYTHONPATH=$PWD:\$PYTHONPATH"
