# Set-up shared by the scripts/gpu_run_*.sh scripts (sourced, from the repo root): on the GPU
# machine the carried wheels (.whl/, no package index there), $OUT, and the environment every
# run needs -- NVLink multicast off, no hub access, unbuffered output.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
