#!/usr/bin/env bash
# One GPU run that measures everything (bench/gpu.py): kernel tests on CUDA, the fused-update
# bandwidth sweep, step costs in gradient units, pair modes, versions.  Writes ONE file,
# "$OUT/gpu_results.json" (OUT defaults to ./out), in at most ~8 minutes.
#
#     bash bench/gpu.sh                  # from anywhere; runs in the repository root
#     bash bench/gpu.sh --sections env,bandwidth     # a subset (see python3 bench/gpu.py -h)
#     bash bench/gpu.sh --cpu-dry-run    # the same path on a CPU machine, tiny sizes (< 2 min)
#
# Nothing is downloaded: a machine without a CUDA build of torch gets a JSON file whose
# "error" field says so (the CPU parts can be dry-run with: python3 bench/gpu.py --cpu-dry-run).
set -u
cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-./out}"
mkdir -p "$OUT"
export OUT
RESULT="$OUT/gpu_results.json"
PY="${PYTHON:-python3}"
LIMIT="${TB_GPU_TIMEOUT:-465}"          # seconds; bench/gpu.py budgets its sections within 420
unset TRITON_INTERPRET                   # the compiled kernels, not the interpreter
export PYTHONUNBUFFERED=1

fail() {  # fail CODE MESSAGE: print and write the JSON with an error field
    echo "bench/gpu.sh: $2" >&2
    if command -v "$PY" >/dev/null 2>&1; then
        MSG="$2" "$PY" -c 'import json, os; json.dump({"schema": 1, "mode": "gpu", "error": os.environ["MSG"], "sections": {}}, open(os.environ["OUT"] + "/gpu_results.json", "w"), indent=1)'
    else
        printf '{"schema": 1, "mode": "gpu", "error": "%s", "sections": {}}\n' "$(printf '%s' "$2" | tr -d '"\\')" > "$RESULT"
    fi
    echo "wrote $RESULT"
    exit "$1"
}

command -v "$PY" >/dev/null 2>&1 || fail 3 "$PY not found on this machine"
probe="$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>&1)"
if [ $? -ne 0 ]; then
    fail 3 "torch does not import with $PY ($(printf '%s' "$probe" | tail -n 1)); nothing can be installed from here: install a CUDA build of torch, then rerun"
fi
read -r TORCH_VER TORCH_CUDA TORCH_GPU <<<"$(printf '%s' "$probe" | tail -n 1)"
DRY=0
for a in "$@"; do [ "$a" = "--cpu-dry-run" ] && DRY=1; done   # the wrapper's own dry run, on CPU
if [ $DRY -eq 0 ] && { [ "$TORCH_CUDA" = "None" ] || [ "$TORCH_GPU" != "True" ]; }; then
    fail 3 "torch $TORCH_VER (CUDA build: $TORCH_CUDA) sees no GPU (is_available=$TORCH_GPU): a CPU-only torch or no device; nothing measured"
fi
echo "bench/gpu.sh: torch $TORCH_VER, CUDA $TORCH_CUDA; running bench/gpu.py (limit ${LIMIT}s)"

timeout -k 10 "$LIMIT" "$PY" bench/gpu.py --out "$OUT" "$@"
rc=$?
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "bench/gpu.sh: bench/gpu.py was stopped at the ${LIMIT}s limit" >&2
    if [ -f "$RESULT" ]; then   # keep what it wrote, and say why it is incomplete
        "$PY" -c 'import json, os, sys; p = os.environ["OUT"] + "/gpu_results.json"; d = json.load(open(p)); d["error"] = d.get("error") or "stopped at the wall-time limit of gpu.sh (" + sys.argv[1] + " s); sections after the last written one did not run"; json.dump(d, open(p, "w"), indent=1)' "$LIMIT"
    else
        fail $rc "bench/gpu.py was stopped at the ${LIMIT}s limit before writing anything"
    fi
fi
echo "wrote $RESULT (exit $rc)"
exit $rc
