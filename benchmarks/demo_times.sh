#!/usr/bin/env bash
# Wall and CPU time of `dast demo --quick` and of the single-seed demo, the figures the
# README ("The demo") and `dast demo --help` quote. Prints one JSON line per command, with
# the load average before and after (other jobs on the machine slow the wall time, not the
# CPU time much). Each run writes into a fresh folder under WORK (default: a temporary one).
#
#   bash benchmarks/demo_times.sh [WORK]          # about 1 + 10 min on 2 idle cores (more when other jobs share them)
set -euo pipefail
work=${1:-$(mktemp -d /tmp/dast-demo-times.XXXXXX)}
mkdir -p "$work"
measure() {  # name, then the dast arguments
  local name=$1 out=$work/$1
  shift
  rm -rf "$out"
  local load0 start end load1 times
  load0=$(cut -d' ' -f1 /proc/loadavg)
  start=$(date +%s.%N)
  /usr/bin/time -o "$work/$name.time" -f "%U %S" dast demo --out "$out" --no-progress "$@" > "$work/$name.log" 2>&1
  times=$(tail -1 "$work/$name.time")
  end=$(date +%s.%N)
  load1=$(cut -d' ' -f1 /proc/loadavg)
  python3 - "$name" "$start" "$end" "$times" "$load0" "$load1" "$(nproc)" <<'EOF'
import json, sys
name, start, end, times, load0, load1, cores = sys.argv[1:]
user, system = (float(t) for t in times.split())
print(json.dumps({
    "command": name, "wall_s": round(float(end) - float(start), 1), "cpu_s": round(user + system, 1),
    "load_before": float(load0), "load_after": float(load1), "cores": int(cores),
}))
EOF
}
measure demo_quick --quick
measure demo_out
