"""How long `dast --help` (and a few other light commands) take to start, and whether they
import torch. Each command runs ``--runs`` times in a fresh interpreter (the way a user
starts it); prints one JSON object per command::

    python benchmarks/cli_startup.py [--runs 10]

The target (issue 21): `dast --help` under 0.5 s, with torch imported only by the commands
that need it. Not a timed test: a loaded machine would make such a test flaky.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import dast

COMMANDS = (["--help"], ["--version"], ["configs"], ["train", "--help"], ["predict", "--help"])
# the same command in-process, then the modules it left imported
PROBE = (
    "import sys\n"
    "from dast.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    "sys.stderr.write('\\nTORCH=' + str('torch' in sys.modules) + '\\n')\n"
)


def measure(argv: list[str], runs: int) -> dict[str, object]:
    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dast", *argv], capture_output=True, check=False)
        seconds.append(time.perf_counter() - t0)
    probe = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=False)
    torch_imported = probe.stderr.strip().splitlines()[-1] == "TORCH=True"
    return {
        "command": " ".join(["dast", *argv]),
        "runs": runs,
        "seconds_median": round(statistics.median(seconds), 3),
        "seconds_min": round(min(seconds), 3),
        "seconds_max": round(max(seconds), 3),
        "imports_torch": torch_imported,
        "python": sys.version.split()[0],
        "dast": dast.__version__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="starts per command (default 10)")
    args = parser.parse_args()
    for argv in COMMANDS:
        print(json.dumps(measure(list(argv), args.runs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
