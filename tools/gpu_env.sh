# Sourced by the one-call GPU scripts (speed_check, decode_check, fuse_check, scan_check, gpu_hybrids,
# gpu_sweep): the multicast switches kept off, the carried wheels ($WHL, default .whl) installed
# beside the machine's own packages, and the card written to $1 (default $OUT/env.txt).
#   . "$(dirname "$0")/gpu_env.sh" [ENV_FILE]
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
WHL=${WHL:-.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "${1:-$OUT/env.txt}"
has() { [[ ",${STAGE:-}," == *",$1,"* ]]; }  # is stage $1 among the comma-separated $STAGE
quiet() { grep -v -E "Warning|warnings.warn|Evict LRU|^W1|OMP_NUM_THREADS"; }
