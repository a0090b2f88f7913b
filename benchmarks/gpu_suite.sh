#!/usr/bin/env bash
# All GPU measurements of docs/performance.md in one call (target: under 8 minutes on an H100).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        # default: $OUT, else ./gpu_results
#
# Runs from the repository root with PYTHONPATH=. (no install, no downloads, random
# weights). Steps run in priority order; each has its own timeout and the suite skips a
# step when the overall budget (SUITE_BUDGET_S, default 450 s) would be exceeded, so a
# failure or a slow step never costs the results of the others. Writes into OUT_DIR:
#
#   env.txt                     torch / CUDA / GPU / python packages
#   step_resnet101.jsonl        dast bench: stage-1 step, eager-fp32 vs fast
#   fast_vs_eager.json          200+200 steps at paper size, losses + inference agreement
#   fast_vs_eager_history.json  every step's losses of both runs
#   step_vgg16.jsonl, step2_resnet101.jsonl, infer_resnet101.jsonl, pseudo_resnet101.jsonl
#   ablation_resnet101.jsonl    eager-bf16, fast-nograph, fast-fp32 (one lever at a time)
#   tests_cuda.txt              the CUDA-only tests
#   profile_fast-nograph.txt/.json, profile_fast.txt/.json   torch.profiler: top kernels
#   compile_resnet101.jsonl     fast-compile (torch.compile of the segmentor halves)
#   status.tsv                  step, exit code, seconds
#   summary.txt                 one line per measurement
#
# A dry run of the mechanics on a CPU (minutes, not a measurement):
#   SUITE_DEVICE=cpu SUITE_SIZE=small SUITE_ARCH=small SUITE_ARCH2=small SUITE_ITERS=2 SUITE_STEPS=4 \
#     bash benchmarks/gpu_suite.sh /tmp/suite_dry
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-./gpu_results}}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
BUDGET="${SUITE_BUDGET_S:-450}"
START=$(date +%s)
DEVICE="${SUITE_DEVICE:-cuda}"; SIZE="${SUITE_SIZE:-paper}"; ITERS="${SUITE_ITERS:-20}"; STEPS="${SUITE_STEPS:-200}"
ARCH="${SUITE_ARCH:-resnet101}"; ARCH2="${SUITE_ARCH2:-vgg16}"
export SUITE_DEVICE="$DEVICE" SUITE_SIZE="$SIZE" SUITE_ARCH="$ARCH"
# the `dast bench` command without importing the whole CLI (fewer dependencies)
BENCH=("$PY" -m dast.commands.bench --device "$DEVICE" --size "$SIZE" --iters "$ITERS" --warmup 3)
printf "step\trc\tseconds\n" > "$OUT_DIR/status.tsv"

run_step() {  # run_step NAME TIMEOUT_S OUTFILE CMD...
  local name="$1" limit="$2" outfile="$3"; shift 3
  local now left t0 rc
  now=$(date +%s); left=$(( BUDGET - (now - START) ))
  if (( left < 20 )); then
    echo "== $name: skipped (suite budget spent)"; printf "%s\tskipped\t0\n" "$name" >> "$OUT_DIR/status.tsv"; return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit}s)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$outfile" 2> "$OUT_DIR/$outfile.stderr"
  rc=$?
  printf "%s\t%s\t%s\n" "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT_DIR/status.tsv"
  echo "   rc=$rc, $(( $(date +%s) - t0 )) s"; tail -n 3 "$OUT_DIR/$outfile.stderr" 2>/dev/null | sed 's/^/   stderr: /'
}

{
  date -u; nvidia-smi 2>&1 | head -n 15
  "$PY" - <<'EOF'
import importlib, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
      "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
for m in ("numpy", "PIL", "tqdm", "yaml", "pydantic", "safetensors", "pytest", "triton"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "present"))
    except Exception as exc:  # noqa: BLE001
        print(m, "MISSING", type(exc).__name__)
EOF
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

run_step step_resnet101 120 step_resnet101.jsonl \
  "${BENCH[@]}" --arch "$ARCH" --what step --modes eager-fp32,fast
run_step fast_vs_eager 180 fast_vs_eager.json \
  "$PY" benchmarks/fast_vs_eager.py --device "$DEVICE" --size "$SIZE" --arch "$ARCH" --steps "$STEPS" \
  --history "$OUT_DIR/fast_vs_eager_history.json"
run_step step_vgg16 90 step_vgg16.jsonl \
  "${BENCH[@]}" --arch "$ARCH2" --what step --modes eager-fp32,fast
run_step step2_resnet101 90 step2_resnet101.jsonl \
  "${BENCH[@]}" --arch "$ARCH" --what step2 --modes eager-fp32,fast
run_step infer_resnet101 90 infer_resnet101.jsonl \
  "${BENCH[@]}" --arch "$ARCH" --what infer --modes eager-fp32,fast-fp32,fast --batches 1,2,4,8
run_step pseudo_resnet101 90 pseudo_resnet101.jsonl \
  "${BENCH[@]}" --arch "$ARCH" --what pseudo --modes eager-fp32,fast-fp32,fast --batches 1,4
run_step ablation_resnet101 120 ablation_resnet101.jsonl \
  "${BENCH[@]}" --arch "$ARCH" --what step --modes eager-fp32,eager-bf16,fast-nograph,fast-fp32
run_step tests_cuda 120 tests_cuda.txt \
  "$PY" -m pytest -q --noconftest -p no:cacheprovider tests/test_fast_mode.py -k cuda
run_step tests_cuda_trainer 120 tests_cuda_trainer.txt \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_train.py -k cuda_graphs

run_step profile 90 profile.log "$PY" - "$OUT_DIR" <<'EOF'
"""torch.profiler over 3 steps of the fast step (resnet101, paper size): top GPU kernels."""
import json, os, sys
import torch
from torch.profiler import ProfilerActivity, profile
from dast.benchmarking.modes import TrainingSetup, build_nets, resolve_mode
from dast.benchmarking.timing import synchronize
from dast.benchmarking.workloads import SIZES, random_images, random_labels

out_dir = sys.argv[1]
dev = torch.device(os.environ["SUITE_DEVICE"])
arch = os.environ["SUITE_ARCH"]
torch.backends.cudnn.benchmark = True
sizes = SIZES[os.environ["SUITE_SIZE"]]
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])


def self_device_us(evt):
    names = ("self_device_time_total", "self_cuda_time_total") if dev.type == "cuda" else ("self_cpu_time_total",)
    for name in names:
        v = getattr(evt, name, None)
        if v is not None:
            return float(v)
    return 0.0


for mode in ("fast-nograph", "fast"):
    setup = TrainingSetup(resolve_mode(mode, dev), build_nets(arch, 19, "reference", 0), dev)
    g = torch.Generator().manual_seed(1)
    xs = setup.prepare_images(random_images(1, sizes.source, g))
    ys = random_labels(1, sizes.source, 19, g).to(dev)
    xt = setup.prepare_images(random_images(1, sizes.target, g))
    for i in range(6):
        setup.step(i, xs, ys, xt, None)
    synchronize(dev)
    steps = 3
    with profile(activities=activities) as prof:
        for i in range(6, 6 + steps):
            setup.step(i, xs, ys, xt, None)
        synchronize(dev)
    events = [e for e in prof.key_averages() if self_device_us(e) > 0]
    events.sort(key=self_device_us, reverse=True)
    busy_ms = sum(self_device_us(e) for e in events) / 1000.0 / steps
    top = [{"name": e.key[:120], "calls_per_step": e.count / steps, "ms_per_step": round(self_device_us(e) / 1000.0 / steps, 3)}
           for e in events[:25]]
    summary = {"mode": mode, "arch": arch, "size": os.environ["SUITE_SIZE"], "device": dev.type, "torch": torch.__version__,
               "steps": steps, "device_self_time_ms_per_step": round(busy_ms, 2), "top": top}
    with open(f"{out_dir}/profile_{mode}.json", "w") as f:
        json.dump(summary, f, indent=1)
    table = ""
    for key in (("self_device_time_total", "self_cuda_time_total") if dev.type == "cuda" else ("self_cpu_time_total",)):
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=30)
            break
        except Exception:  # noqa: BLE001 - the column name differs between torch versions
            continue
    with open(f"{out_dir}/profile_{mode}.txt", "w") as f:
        f.write(table)
    print(json.dumps({"mode": mode, "device_self_time_ms_per_step": summary["device_self_time_ms_per_step"],
                      "top5": [t["name"] for t in top[:5]]}), flush=True)
    del setup
    if dev.type == "cuda":
        torch.cuda.empty_cache()
EOF

run_step compile_resnet101 150 compile_resnet101.jsonl \
  "${BENCH[@]}" --arch "$ARCH" --what step --modes eager-fp32,fast-compile

"$PY" - "$OUT_DIR" > "$OUT_DIR/summary.txt" 2>&1 <<'EOF'
import glob, json, sys
out = sys.argv[1]
print(f"{'what':7} {'arch':10} {'mode':13} {'batch':>5} {'ms_median':>10} {'speedup':>8} {'img/s':>8} {'peak GiB':>9}")
for path in sorted(glob.glob(f"{out}/*.jsonl")):
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "error" in r:
            print(f"{r['what']:7} {r['arch']:10} {r['mode']:13} {r.get('batch', 1):>5} ERROR {r['error'][:80]}")
            continue
        print(f"{r['what']:7} {r['arch']:10} {r['mode']:13} {r['batch']:>5} {r['ms_median']:>10.2f} "
              f"{r.get('speedup_vs_eager_fp32', 1.0):>8.2f} {str(r.get('images_per_s', '')):>8} {str(r['peak_mem_gib']):>9}")
try:
    fve = json.load(open(f"{out}/fast_vs_eager.json"))
    print("fast_vs_eager pass:", fve["pass"], "training:", fve["pass_training"], "inference:", fve["pass_inference"],
          {m: v["agreement"] for m, v in fve["inference"].items()},
          {k: (v.get("max_window_rel_diff"), v.get("allowed_window_rel_diff")) for k, v in fve["losses"].items()})
except Exception as exc:  # noqa: BLE001
    print("fast_vs_eager: no result", type(exc).__name__)
EOF
cat "$OUT_DIR/summary.txt"
echo "== status"; cat "$OUT_DIR/status.tsv"
echo "total $(( $(date +%s) - START )) s; results in $OUT_DIR"
