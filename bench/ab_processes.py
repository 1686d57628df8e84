"""Two builds of the package, each in its own process, alternated: for changes that one process
cannot hold twice (the allocator, anything process-wide). ``bench/README.md`` says how to install
a build under another name; in-process alternation is finer where it works.

    python3 bench/ab_processes.py --old /tmp/ab/he_old --new /tmp/ab/he_new \\
        --shapes 1x16,1x128,8x128,32x128 --workloads no_head,cache_all --rounds 3

Each process loads the bert-base-shaped checkpoint that ``compare.py`` writes
(``bench/.cache/bert-base-seed0``), runs one warm-up call and times ``--calls`` calls (fewer at
larger shapes). Prints, per shape and workload, both medians, the median over rounds of new/old,
and the memory: resident after loading, peak during the load, peak overall.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / ".cache" / "bert-base-seed0"

# Runs in the child: the package directory's parent goes first on sys.path, so the directory's
# name is the module to import.
CHILD = r"""
import importlib, json, resource, sys, time
import numpy as np
package_dir, checkpoint, shape, workload, calls = sys.argv[1:6]
sys.path.insert(0, str(__import__("pathlib").Path(package_dir).parent))
he = importlib.import_module(__import__("pathlib").Path(package_dir).name)
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
model = he.HookedEncoder.from_pretrained(checkpoint)
after_load = resident_mb()
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
batch, pos = map(int, shape.split("x"))
tokens = np.random.default_rng(0).integers(1000, 20000, size=(batch, pos))
run = {
    "no_head": lambda: model(tokens, return_type=None),
    "logits": lambda: model(tokens, return_type="logits"),
    "cache_all": lambda: model.run_with_cache(tokens),
}[workload]
run()
times = []
for _ in range(int(calls)):
    start = time.perf_counter()
    out = run()
    times.append(time.perf_counter() - start)
    del out
print(json.dumps({
    "ms": 1e3 * sorted(times)[len(times) // 2],
    "after_load_mb": after_load,
    "load_peak_mb": load_peak,
    "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def run_child(package_dir: str, shape: str, workload: str, calls: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, package_dir, str(CHECKPOINT), shape, workload, str(calls)],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the baseline build's package directory")
    parser.add_argument("--new", required=True, help="the changed build's package directory")
    parser.add_argument("--shapes", default="1x16,1x128,8x128,32x128")
    parser.add_argument("--workloads", default="no_head")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=30, help="timed calls at 1x128")
    args = parser.parse_args()
    if not (CHECKPOINT / "config.json").exists():
        sys.exit(f"{CHECKPOINT} is missing: run bench/compare.py once to write it")
    for workload in args.workloads.split(","):
        for shape in args.shapes.split(","):
            batch, pos = map(int, shape.split("x"))
            calls = max(3, min(200, args.calls * 128 // (batch * pos)))
            results: dict[str, list[dict]] = {"old": [], "new": []}
            for _ in range(args.rounds):
                for name in ("old", "new"):
                    results[name].append(run_child(getattr(args, name), shape, workload, calls))
            ratios = [
                n["ms"] / o["ms"] for o, n in zip(results["old"], results["new"], strict=True)
            ]

            def summary(runs: list[dict]) -> str:
                return (
                    f"{statistics.median(r['ms'] for r in runs):8.1f} ms, after load "
                    f"{max(r['after_load_mb'] for r in runs):.0f} MB, load peak "
                    f"{max(r['load_peak_mb'] for r in runs):.0f}, peak "
                    f"{max(r['peak_mb'] for r in runs):.0f}"
                )

            print(
                f"{workload} {shape}: new/old {statistics.median(ratios):.3f} "
                f"(rounds {', '.join(f'{r:.3f}' for r in ratios)})"
            )
            print(f"  old {summary(results['old'])}")
            print(f"  new {summary(results['new'])}")


if __name__ == "__main__":
    main()
