"""Start-up cost of `dmtjepa`: wall time and peak RSS of `--help` and of each command's wrong-path error.

Each case runs in a fresh child (`python -m dmt_jepa.cli.main ...`) inside an empty scratch folder,
so every path it names is missing; the peak RSS is the child's, from getrusage(RUSAGE_CHILDREN)
read after each run (on Linux the largest child so far, hence one child process per case, each
measured by a fresh helper). Prints one JSON object: per case, the median wall seconds of --repeats
runs, the peak RSS in MiB, the exit code and the first line the command printed.

    python benchmarks/cli_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "--help": "--help",
    "version": "version",
    "data pack": "data pack NOPE out",
    "data scenes": "data scenes out --train 0 --test 0",
    "convert": "convert NOPE out.safetensors",
    "pretrain --resume": "pretrain --resume runs/nope",
    "pretrain data.train": "pretrain data.train=NOPE.tar",
    "export": "export NOPE --out x",
    "export --format triton": "export NOPE --out x --format triton",
    "info": "info NOPE",
    "embed": "embed NOPE.txt out --model NOPE.safetensors",
    "eval knn": "eval knn NOPE DATA",
    "eval all": "eval all NOPE DATA",
    "eval detect": "eval detect NOPE DATA",
    "viz pca": "viz pca NOPE image.png --out x.png",
    "viz curves": "viz curves NOPE",
}

# Runs one command as its own child and reports its wall time and peak RSS (ru_maxrss: KiB on Linux).
MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
run = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
lines = (run.stderr.strip() or run.stdout.strip()).splitlines()
print(json.dumps({"wall_s": wall, "peak_kib": peak, "code": run.returncode, "first_line": lines[0] if lines else ""}))
"""


def measure(args: str, cwd: Path) -> dict:
    command = [sys.executable, "-c", MEASURE, sys.executable, "-m", "dmt_jepa.cli.main", *args.split()]
    out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the median wall time is reported")
    repeats = parser.parse_args().repeats
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, args in CASES.items():
            runs = [measure(args, Path(scratch)) for _ in range(repeats)]
            results[name] = {
                "wall_s": round(statistics.median(r["wall_s"] for r in runs), 3),
                "peak_rss_mib": round(max(r["peak_kib"] for r in runs) / 1024, 1),
                "exit_code": runs[0]["code"],
                "says": runs[0]["first_line"][:120],
            }
    print(json.dumps({"cpu": cpu_model(), "python": platform.python_version(), "repeats": repeats, "cases": results}, indent=2))


if __name__ == "__main__":
    main()
