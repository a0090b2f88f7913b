#!/usr/bin/env bash
# Install torch + torchvision + timm the way docs/backbones.md says, in a fresh virtual
# environment, then run the timm tests with it. Prints one JSON line with what pip picked.
#
#   bash benchmarks/timm_install.sh VENV cpu     # torch 2.13.0+cpu and its CPU torchvision
#                                                # (needs download.pytorch.org)
#   bash benchmarks/timm_install.sh VENV cuda    # torch 2.14.1 + torchvision 0.29.1 from PyPI
#                                                # (about 2.7 GB of CUDA wheels; runs on a CPU too)
#
# VENV must not exist yet (it is created, never reused). On this project's machines the
# `cpu` pair cannot be installed (PyPI has no CPU torchvision for Linux and
# download.pytorch.org is not reachable): the script then stops at that step.
set -euo pipefail
venv=${1:?usage: timm_install.sh VENV cpu|cuda}
pair=${2:?usage: timm_install.sh VENV cpu|cuda}
repo=$(cd "$(dirname "$0")/.." && pwd)
[ -e "$venv" ] && { echo "error: $venv exists; give a new folder" >&2; exit 2; }
python3 -m venv "$venv"
. "$venv/bin/activate"
t0=$(date +%s)
case "$pair" in
  cpu)
    python -m pip install --quiet 'torch==2.13.0'
    python -m pip install --quiet 'torchvision==0.28.*' --index-url https://download.pytorch.org/whl/cpu
    ;;
  cuda)
    python -m pip install --quiet 'torch==2.14.1' 'torchvision==0.29.1'
    ;;
  *) echo "error: the pair is cpu or cuda, not $pair" >&2; exit 2 ;;
esac
# timm alone: the matching torchvision is already there, so torch stays as it is
python -m pip install --quiet -e "$repo[timm]" pytest
t1=$(date +%s)
python - <<'EOF'
import torch, torchvision, timm
print(f"imported: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}")
EOF
cd "$repo"
set +e
OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider tests/test_timm.py tests/test_timm_config.py
code=$?
set -e
t2=$(date +%s)
python - "$pair" "$code" "$((t1 - t0))" "$((t2 - t1))" "$(du -sm "$venv" | cut -f1)" <<'EOF'
import json, sys
import torch, torchvision, timm
pair, code, install_s, test_s, mib = sys.argv[1:]
print(json.dumps({
    "pair": pair, "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
    "install_seconds": int(install_s), "test_seconds": int(test_s), "tests_exit_code": int(code),
    "venv_mib": int(mib),
}))
EOF
exit "$code"
