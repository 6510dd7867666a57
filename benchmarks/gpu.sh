#!/usr/bin/env bash
# GPU truth in one call (issue 12, item 6): run from the repository root of a copy of this repository on a bare
# CUDA machine that has torch but no TensorRT and no network. Writes under $OUT (default benchmarks/results/gpu):
#   gpu.log                          everything printed below
#   summary.md                       one line per step: ok / failed / timed out / skipped, seconds, its files
#   gpu_latency_cuda.{json,md}       torch-CUDA latency of full vs pruned: FP16, CUDA graphs, interleaved, p10/med/p90
#                                    (benchmarks/gpu_latency.py), corpus models at their default cut + shipped example
#   attribution_speed_cuda.{json,md} attribution seconds per image on CUDA (benchmarks/attribution_speed.py)
#   distributed.json                 the NCCL path: torchrun, one process per GPU, checked against one process
# and the GPU-marked tests (pytest -m gpu) into gpu.log. Budget: about 7.5 minutes on an H200 (--budget).
#
#   bash benchmarks/gpu.sh [--corpus DIR] [--out DIR] [--budget SECONDS] [--search] [--steps LIST] [--wheels DIR]
#                          [--python PY] [--dry-run]
#
#   --corpus DIR   folder with corpus.json, models/ and images/ (default: ../shared/corpus beside the repository,
#                  which does not travel to a device machine: copy it into an ignored folder of the repository, e.g.
#                  .corpus/, carry that, and pass --corpus .corpus). Without it: the shipped example alone.
#   --search       run disasm-compile's budget search on the device (default: the alpha it chose at defaults as
#                  recorded in benchmarks/results/corpus.json, which saves the search's trials; models without a
#                  record are searched anyway)
#   --steps LIST   comma-separated subset of tests,latency,distributed,attribution (default: all, in that order)
#   --wheels DIR   wheels to install offline first (default: .whl); the device image lacks onnx-graphsurgeon:
#                    echo /.whl/ >> .git/info/exclude
#                    .venv/bin/pip download --no-deps -d .whl onnx-graphsurgeon==0.6.1     # pure Python, 0.1 MB
#                  and name .whl (and .corpus) in the run's carry.
#   --dry-run      check the arguments and the environment and print the plan; runs nothing (no GPU needed)
#   (GPU_SH_WITHOUT_GPU=1 runs every step on a machine without a GPU, where each fails or skips: a test of the script)
#
# Nothing is installed from the network: the package is put on PYTHONPATH through a link folder (disasm.compiler ->
# compiler/, ...), because pyproject.toml pins Python 3.11 and torch 2.13 while the device image has Python 3.12 and
# its own torch; the versions found are printed. What needs CUDA here was never run where it was written (no GPU was
# lent): benchmarks/results/gpu.md says what was tested on a CPU.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

CORPUS="$ROOT/../shared/corpus"
OUT_DIR="${OUT:-benchmarks/results/gpu}"
BUDGET=450
SEARCH=0
STEPS="tests,latency,distributed,attribution"
WHEELS=".whl"
PY="${PYTHON:-python3}"
DRY_RUN=0

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu.sh: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --corpus) need_value "$@"; CORPUS="$2"; shift 2 ;;
    --out) need_value "$@"; OUT_DIR="$2"; shift 2 ;;
    --budget) need_value "$@"; BUDGET="$2"; shift 2 ;;
    --search) SEARCH=1; shift ;;
    --steps) need_value "$@"; STEPS="$2"; shift 2 ;;
    --wheels) need_value "$@"; WHEELS="$2"; shift 2 ;;
    --python) need_value "$@"; PY="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ "$BUDGET" =~ ^[0-9]+$ && "$BUDGET" -ge 60 ]] || die "--budget must be a whole number of seconds >= 60, got '$BUDGET'"
for step in ${STEPS//,/ }; do
  [[ "$step" =~ ^(tests|latency|distributed|attribution)$ ]] || \
    die "--steps: unknown step '$step'; choose from tests,latency,distributed,attribution"
done
command -v "$PY" >/dev/null || die "no python '$PY' (--python)"
[[ -f examples/shapes_seg.onnx ]] || die "examples/shapes_seg.onnx is missing: run from a full copy of the repository"
if [[ -f "$CORPUS/corpus.json" ]]; then
  CORPUS=$(cd "$CORPUS" && pwd); HAVE_CORPUS=1
else
  HAVE_CORPUS=0
fi

START_EPOCH=$(date +%s)
elapsed() { echo $(( $(date +%s) - START_EPOCH )); }
remaining() { echo $(( BUDGET - $(elapsed) )); }
min() { (( $1 < $2 )) && echo "$1" || echo "$2"; }
wants() { [[ ",$STEPS," == *",$1,"* ]]; }
say() { echo "[gpu.sh $(elapsed)s] $*"; }

if [[ $DRY_RUN -eq 0 ]]; then
  mkdir -p "$OUT_DIR" || die "cannot create --out $OUT_DIR"
  OUT_DIR=$(cd "$OUT_DIR" && pwd)
fi
SUMMARY="$OUT_DIR/summary.md"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/disasm-gpu.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# what the steps read: each runs in its own bash under `timeout` (see run_step)
export ROOT CORPUS HAVE_CORPUS OUT_DIR BUDGET SEARCH STEPS PY TMP START_EPOCH

# --- environment: the package without installing it, carried wheels, versions ---------------------------------------
setup_python() {
  local site="$TMP/site" shim="$TMP/shim"
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    say "installing carried wheels from $WHEELS (offline): $(ls "$WHEELS" | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl \
      || say "warning: installing the wheels in $WHEELS failed"
  fi
  local here
  here=$("$PY" -c 'import os, disasm.compiler as c; print(os.path.realpath(c.__path__[0]))' 2>/dev/null)
  if [[ "$here" != "$ROOT/compiler" ]]; then
    mkdir -p "$shim/disasm"
    for part in compiler attribution runtime; do ln -sfn "$ROOT/$part" "$shim/disasm/$part"; done
    say "disasm is not installed for $PY: using $ROOT through a link folder on PYTHONPATH"
  fi
  export PYTHONPATH="$shim:$site${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" - <<'PYEOF'
import importlib, platform, sys
print(f"python {platform.python_version()} ({sys.executable})")
missing = []
for name in ("torch", "numpy", "onnx", "onnxruntime", "onnx_graphsurgeon", "PIL", "rich", "matplotlib", "pytest",
             "hypothesis", "onnxscript", "disasm.runtime.torchrun"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '')}")
    except Exception as e:  # noqa: BLE001
        print(f"  {name}: MISSING ({type(e).__name__}: {e})")
        missing.append(name)
print("  (pyproject.toml pins torch 2.13.0, onnx 1.23.2, onnxruntime 1.32.0; the versions above are what runs)")
try:
    import torch
    print(f"  CUDA available: {torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}"
          + (f", {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}"
             if torch.cuda.is_available() else ""))
except Exception:  # noqa: BLE001
    pass
required = {"torch", "numpy", "onnx", "onnxruntime", "onnx_graphsurgeon", "PIL", "rich", "matplotlib",
            "disasm.runtime.torchrun"}
if required & set(missing):
    print("missing required packages: " + ", ".join(sorted(required & set(missing))) + "; carry their wheels "
          "(--wheels, see the header of benchmarks/gpu.sh)")
    sys.exit(3)
PYEOF
}

# --- steps: each is a function run by run_step in its own bash, under a timeout -------------------------------------
gpu_tests() {
  local files
  mapfile -t files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
  "$PY" -m pytest -m gpu -p no:cacheprovider -rA "${files[@]}"
}

distributed() {
  local ngpu began
  ngpu=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
  (( ngpu >= 1 )) || { echo "no GPU: the NCCL path needs one"; return 4; }
  (( ngpu == 1 )) && say "one GPU: torchrun --nproc-per-node 1, so NCCL initialises and all-reduces over a single rank"
  mkdir -p "$TMP/dist/calib"
  find examples/data/calib -name '*.png' | sort | head -16 | xargs -I{} cp {} "$TMP/dist/calib/"
  began=$(date +%s)
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$ngpu" -m disasm.attribution.distributed \
    examples/shapes_seg.onnx --images "$TMP/dist/calib" --cache "$TMP/dist/cache" --lsq --batch-size 4 || return $?
  DIST_SECONDS=$(( $(date +%s) - began )) NGPU=$ngpu "$PY" - <<'PYEOF'
import json, os, sys
from pathlib import Path
import numpy as np
from disasm.attribution import cache as attribution_cache
from disasm.attribution.calibration import cache_keys, calibrate
from disasm.attribution.disassembler import AttributionSettings
from disasm.compiler.channels import analyse
from disasm.compiler.images import load_images, preprocess, scan_images
from disasm.compiler.load import load_model

dist = Path(os.environ["TMP"]) / "dist"
model = load_model(Path("examples/shapes_seg.onnx"))
analysis = analyse(model.proto)
folder = scan_images(dist / "calib")
settings = AttributionSettings(batch_size=4)
key = cache_keys(model, analysis, attribution_cache.images_digest(folder.paths), settings, True)[0]
shared = attribution_cache.load(dist / "cache", key)
if shared is None:
    sys.exit("the distributed run left no cache entry under the key disasm-compile computes")
single = calibrate(model, analysis, preprocess(load_images(folder.paths, model.image_size), model.preprocessing),
                   settings, "cuda", moments=True)
worst = 0.0
for t in single.tensors:
    for a, b in ((shared.forward_sum, single.forward_sum), (shared.backward_sum, single.backward_sum),
                 (shared.mean_sum, single.mean_sum), (shared.taylor_sum, single.taylor_sum)):
        worst = max(worst, float(np.abs(a[t] - b[t]).max() / max(np.abs(b[t]).max(), 1e-30)))
for node in single.moments:
    m = single.moments[node]
    worst = max(worst, float(np.abs(shared.moments[node] - m).max() / max(np.abs(m).max(), 1e-30)))
counts_equal = bool(np.array_equal(shared.images_per_class, single.images_per_class)
                    and np.array_equal(shared.fallback, single.fallback)
                    and np.array_equal(shared.mask_pixels, single.mask_pixels))
processes = int(os.environ["NGPU"])
result = {"processes": processes, "backend": "nccl", "images": shared.images,
          "torchrun_seconds": int(os.environ["DIST_SECONDS"]), "counts_equal_single_process": counts_equal,
          "max_relative_difference_vs_single_process": worst,
          "note": "one GPU: one process, NCCL over a single rank" if processes == 1 else ""}
Path(os.environ["OUT_DIR"], "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result))
sys.exit(0 if counts_equal and worst < 1e-2 else 1)  # TF32 convolutions over other batches: about 1e-3 at most
PYEOF
}

attribution_speed() {
  local models="example"
  if [[ $HAVE_CORPUS -eq 1 ]]; then
    models="example,pan-mnv3s-skin-clothes-hair,road-segmentation-adas-0001,twinlitenet-drivable-lanes"
    # attribution_speed.py reads the corpus beside the repository (../shared/corpus); point that at --corpus
    if [[ ! -e "$ROOT/../shared/corpus" ]]; then
      mkdir -p "$ROOT/../shared" && ln -s "$CORPUS" "$ROOT/../shared/corpus" && say "linked ../shared/corpus -> $CORPUS"
    fi
  fi
  "$PY" benchmarks/attribution_speed.py --device cuda --models "$models" --images 8 --rounds 3 --out "$OUT_DIR"
}

latency() {  # latency SECONDS: the step's limit; no model starts in its last minute
  local extra=()
  [[ $SEARCH -eq 0 ]] && extra+=(--alpha-from benchmarks/results/corpus.json)
  "$PY" benchmarks/gpu_latency.py --device cuda --corpus "$CORPUS" --out "$OUT_DIR" --work "$TMP/latency" \
    --budget-s "$(( $1 > 90 ? $1 - 60 : 30 ))" "${extra[@]}"
}

record() {  # record NAME RC SECONDS DETAIL
  local verdict
  case "$2" in
    0) verdict="ok" ;; 124|137) verdict="timed out" ;; skip) verdict="skipped" ;; *) verdict="failed (exit $2)" ;;
  esac
  echo "| $1 | $verdict | $3 | $4 |" >> "$SUMMARY"
  say "$1: $verdict after $3 s"
}

STEP_FUNCTIONS="$(declare -f elapsed remaining say wants gpu_tests distributed attribution_speed latency)"
export STEP_FUNCTIONS

run_step() {  # run_step NAME CAP DETAIL FUNCTION: the function in its own bash, under timeout min(CAP, time left)
  local name="$1" cap="$2" detail="$3" fn="$4"; shift 4
  local left limit began rc
  left=$(( $(remaining) - 5 ))
  if (( left < 20 )); then record "$name" skip 0 "$detail: no time left in the budget of $BUDGET s"; return; fi
  limit=$(min "$cap" "$left")
  say "== $name (at most $limit s)"
  began=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" bash -c 'eval "$STEP_FUNCTIONS"; "$@"' _ "$fn" "$@" "$limit"
  rc=$?
  record "$name" "$rc" $(( $(date +%s) - began )) "$detail"
}

# time kept for the steps after the latency, out of what is left when it starts
latency_cap() {
  local left=$(( $(remaining) - 5 ))
  wants distributed && left=$(( left - 90 ))
  wants attribution && left=$(( left - 90 ))
  echo $(( left < 60 ? 60 : left ))
}

plan() {
  say "repository $ROOT, results in $OUT_DIR, budget $BUDGET s, steps $STEPS"
  if [[ $HAVE_CORPUS -eq 1 ]]; then say "corpus: $CORPUS"; else
    say "no corpus at $CORPUS (no corpus.json): the shipped example alone"; fi
  say "pruned models: $([[ $SEARCH -eq 1 ]] && echo 'the budget search, run here' ||
    echo 'the alpha the search chose, as recorded in benchmarks/results/corpus.json')"
}

main() {
  plan
  {
    echo "# GPU run (benchmarks/gpu.sh)"
    echo
    echo "Started $(date -u '+%Y-%m-%d %H:%M UTC'), budget $BUDGET s; results in this folder, the full log in gpu.log."
    echo
    echo "| step | result | seconds | what |"
    echo "|---|---|---:|---|"
  } > "$SUMMARY"
  nvidia-smi -L 2>/dev/null || say "nvidia-smi: not available"
  setup_python || { record setup "$?" "$(elapsed)" "environment check (see gpu.log)"; return 3; }
  if [[ "${GPU_SH_WITHOUT_GPU:-0}" == 1 ]]; then  # to test this script on a CPU: every step runs, and fails or skips
    say "GPU_SH_WITHOUT_GPU=1: not checking for a GPU"
  elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 4)'; then
    record setup 4 "$(elapsed)" "torch sees no CUDA GPU: nothing to measure"; return 4
  fi
  export PYTHONPATH
  wants tests && run_step tests 120 "pytest -m gpu (its output is in gpu.log)" gpu_tests
  wants latency && run_step latency "$(latency_cap)" "gpu_latency_cuda.{json,md}" latency
  wants distributed && run_step distributed 90 "distributed.json" distributed
  wants attribution && run_step attribution 90 "attribution_speed_cuda.{json,md}" attribution_speed
  { echo; echo "Finished after $(elapsed) s."; } >> "$SUMMARY"
  say "done in $(elapsed) s"
  cat "$SUMMARY"
  ! grep -q -E '^\| [a-z]+ \| (failed|timed out)' "$SUMMARY"  # exit 1 when a step failed or ran out of time
}

if [[ $DRY_RUN -eq 1 ]]; then
  plan
  say "dry run: would run, each under a timeout within the budget:"
  wants tests && echo "  tests:       $PY -m pytest -m gpu -p no:cacheprovider -rA" \
    "$(grep -l 'pytest.mark.gpu' tests/test_*.py | tr '\n' ' ')"
  wants latency && echo "  latency:     $PY benchmarks/gpu_latency.py --device cuda --corpus $CORPUS --out $OUT_DIR" \
    "--budget-s <its time - 60>$([[ $SEARCH -eq 0 ]] && echo ' --alpha-from benchmarks/results/corpus.json')"
  wants distributed && echo "  distributed: $PY -m torch.distributed.run --standalone --nproc-per-node <GPUs>" \
    "-m disasm.attribution.distributed examples/shapes_seg.onnx --images <16 calibration images> --lsq," \
    "then compared with one process"
  wants attribution && echo "  attribution: $PY benchmarks/attribution_speed.py --device cuda --images 8 --rounds 3"
  setup_python || say "the environment check failed (exit $?): a real run would stop here"
  exit 0
fi

main 2>&1 | tee -a "$OUT_DIR/gpu.log"
exit "${PIPESTATUS[0]}"
