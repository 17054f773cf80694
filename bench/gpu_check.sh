#!/usr/bin/env bash
# The GPU check of issue 13, in one go (under 8 minutes on one H100/H200 with 16 cores), ending
# with one table:
#   1. extract  bf16 extractor frames/s vs the bare encoder: ViT-B-16 (random init), 8 frames,
#               decode workers tried at a few counts, the best kept (bench/bench_extract.py);
#   2. read     the loader's videos/s into EVL on the GPU (bench/bench_read.py --device cuda --quick);
#   3. train    EVL's epoch from the cache vs online (bench/bench_train.py --device cuda).
# Each step runs under `timeout`, so one failure or hang cannot eat the budget; a step that
# fails, times out or is missing is reported as such in the table and the others still run.
# No internet is needed: random-init weights, built-in model configs, synthetic videos.
#
#   bash bench/gpu_check.sh                 # on the GPU machine
#   bash bench/gpu_check.sh --cpu-dry-run   # every step with tiny sizes on CPU (a minute or
#                                           # two): checks the script end to end without a GPU
# Options: --out DIR (logs and JSON, default artifacts/gpu_check), --python PATH.
# Environment: GPU_CHECK_T_EXTRACT / _T_READ / _T_TRAIN / _T_SETUP override the step timeouts (s).
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
DRY=0
OUT=artifacts/gpu_check
PY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    --python) PY=$2; shift ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export HF_HUB_OFFLINE=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
T0=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*"; }

# ---------------------------------------------------------------- a python that can run the benches
NEEDS="import torch, numpy, zarr, av, open_clip, rich, typer"
works() { [ -n "$1" ] && timeout 120 "$1" -c "$NEEDS" >/dev/null 2>&1; }
if [ -z "$PY" ]; then
  # the repo's venv (made by `make setup`), one an earlier run of this script made, the
  # interpreter of an active venv or conda env, then the system's
  for cand in "$REPO/.venv/bin/python" "$OUT/venv/bin/python" "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" \
      "${CONDA_PREFIX:+$CONDA_PREFIX/bin/python}" "$(command -v python3 || true)" "$(command -v python || true)"; do
    if works "$cand"; then PY=$cand; break; fi
  done
fi
if [ -z "$PY" ]; then
  # a venv over the system's packages (torch and the rest, where the image has them), with the
  # project installed from this checkout by `pip install -e .` without an index: nothing is
  # downloaded (there is no internet), so it fails fast instead of hanging; wheels in
  # $REPO/.whl are used when present. The benches run from PYTHONPATH in any case.
  say "no python with the project's dependencies found; trying a venv over the system packages"
  base=$(command -v python3 || command -v python || true)
  links=(); [ -d "$REPO/.whl" ] && links=(--find-links "$REPO/.whl")
  if [ -n "$base" ] && timeout "${GPU_CHECK_T_SETUP:-120}" "$base" -m venv --system-site-packages --without-pip \
      "$OUT/venv" >"$OUT/setup.log" 2>&1; then
    timeout "${GPU_CHECK_T_SETUP:-120}" "$base" -m pip --python "$OUT/venv/bin/python" install -q --no-index \
      --no-build-isolation "${links[@]}" -e "$REPO" >>"$OUT/setup.log" 2>&1 \
      || say "pip install -e . without an index failed (a dependency is not installed): see $OUT/setup.log"
    works "$OUT/venv/bin/python" && PY="$OUT/venv/bin/python"
  fi
fi
if [ -z "$PY" ]; then
  say "no usable python: $NEEDS fails everywhere; missing modules:"
  for m in torch numpy zarr av open_clip rich typer; do
    python3 -c "import $m" >/dev/null 2>&1 || echo "  $m"
  done
  exit 3
fi
say "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'))"
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device visible to torch: nothing measured (use --cpu-dry-run to check the script on CPU)"
  exit 4
fi
CORES=$(nproc 2>/dev/null || echo 4)

# ---------------------------------------------------------------- the steps
# run_step NAME TIMEOUT CMD...: runs CMD under timeout, log in $OUT/NAME.log, status in $OUT/NAME.status
run_step() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s) rc
  say "$name: $* (timeout ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t ))
  if [ $rc = 0 ]; then echo "ok ${dt}s" >"$OUT/$name.status"
  elif [ $rc = 124 ] || [ $rc = 137 ]; then echo "timed out after ${limit}s" >"$OUT/$name.status"
  elif [ $rc = 2 ] && grep -q "can't open file" "$OUT/$name.log"; then echo "missing: $2 not in this checkout" >"$OUT/$name.status"
  else echo "failed (exit $rc) after ${dt}s: $(tail -n 1 "$OUT/$name.log" | cut -c1-120)" >"$OUT/$name.status"
  fi
  say "$name: $(cat "$OUT/$name.status")"
}
rm -f "$OUT"/*.status "$OUT"/*.json

if [ "$DRY" = 1 ]; then
  DEV=cpu
  run_step extract "${GPU_CHECK_T_EXTRACT:-420}" "$PY" bench/bench_extract.py --device cpu --models tiny --threads 1 \
    --workers 0,1 --repeats 1 --videos 8 --world 2,3,1 --no-diag --workdir "$OUT/work-extract" --json "$OUT/extract.json"
  run_step read "${GPU_CHECK_T_READ:-120}" "$PY" bench/bench_read.py --device cpu --quick
  run_step train "${GPU_CHECK_T_TRAIN:-600}" "$PY" bench/bench_train.py --quick --heads evl --device cpu --per-class 2 --no-streamed \
    --no-read --workdir "$OUT/work-train" --json "$OUT/train.json"
else
  DEV=cuda
  W=$(( CORES - 1 ))
  run_step extract "${GPU_CHECK_T_EXTRACT:-240}" "$PY" bench/bench_extract.py --device cuda --models ViT-B-16 \
    --threads "$CORES" --workers "2,4,8,$W" --batch 256 --videos 0 --world 8,16,4 --repeats 1 --no-diag \
    --workdir "$OUT/work-extract" --json "$OUT/extract.json"
  run_step read "${GPU_CHECK_T_READ:-90}" "$PY" bench/bench_read.py --device cuda --quick
  run_step train "${GPU_CHECK_T_TRAIN:-120}" "$PY" bench/bench_train.py --heads evl --device cuda --per-class 8 \
    --batch 8 --no-read --workdir "$OUT/work-train" --json "$OUT/train.json"
fi

# ---------------------------------------------------------------- one table
"$PY" - "$OUT" "$DEV" "$DRY" <<'EOF'
import json, os, re, statistics, sys
from pathlib import Path

out, dev, dry = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
status = lambda n: (out / f"{n}.status").read_text().strip() if (out / f"{n}.status").exists() else "not run"
rows = []
ex = out / "extract.json"
if ex.exists():
    R = json.loads(ex.read_text())["rows"]
    bare = max((r for r in R if r["path"] == "bare encoder"), key=lambda r: r["fps"])
    pipe = [r for r in R if r["path"].startswith("pipelined")]
    best = max(pipe, key=lambda r: r["fps"])
    rows.append(("extractor vs bare encoder", f"{best['fps']:,.0f} f/s vs {bare['fps']:,.0f} f/s",
                 f"{100 * best['fps'] / bare['fps']:.0f}% ({best['path'].split()[-1]}; tried "
                 + ", ".join(r["path"].split("=")[-1] for r in pipe) + ")", status("extract")))
else:
    rows.append(("extractor vs bare encoder", "-", "-", status("extract")))
log = out / "read.log"
hits = [l.strip() for l in log.read_text(errors="replace").splitlines() if re.search(r"videos/s|v/s", l)] if log.exists() else []
rows.append(("loader into EVL", hits[-1][:70] if hits and status("read").startswith("ok") else "-",
             "see read.log" if hits else "-", status("read")))
tr = out / "train.json"
if tr.exists():
    res = json.loads(tr.read_text())["results"]["evl"]
    c, o = statistics.median(res["cache"]["epoch_s"]), statistics.median(res["online"]["epoch_s"])
    rows.append(("EVL epoch: cache vs online", f"{c:.3f} s vs {o:.3f} s", f"{o / c:.2f}x faster from the cache",
                 status("train")))
else:
    rows.append(("EVL epoch: cache vs online", "-", "-", status("train")))
title = "GPU check" + (" -- CPU DRY RUN: tiny sizes on CPU, not GPU figures" if dry else f" on {dev}")
try:
    import torch
    if not dry and torch.cuda.is_available():
        title += f": {torch.cuda.get_device_name(0)}"
except Exception:
    pass
w = [max(len(str(r[i])) for r in rows + [("step", "figures", "ratio", "status")]) for i in range(4)]
line = lambda r: "| " + " | ".join(str(x).ljust(w[i]) for i, x in enumerate(r)) + " |"
print("\n" + title + f" (load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores)")
print(line(("step", "figures", "ratio", "status")))
print("|" + "|".join("-" * (x + 2) for x in w) + "|")
for r in rows:
    print(line(r))
print(f"logs: {out}/*.log")
EOF
say "done in $(( $(date +%s) - T0 ))s"
