"""Texts/s of ``extract(out=...)`` in one process against ``extract_ray`` on a local Ray
cluster, on the same texts (all-MiniLM-L6-v2, mean-pooled ``blocks.*.hook_resid_post``).

    python3 bench/ray_speed.py                        # 2000 texts, shards of 128, 2 rounds
    python3 bench/ray_speed.py --texts 4000 --rounds 3

Variants, each in its own process and alternated round by round: ``single`` (one process, 2
threads), ``ray-1x2`` (1 actor with 2 CPUs and 2 threads), ``ray-2x1`` (2 actors with 1 CPU and
1 thread each) and ``ray-2x1-kill`` (as ``ray-2x1``, but one actor's process exits once in the
middle of a window and Ray restarts it). For Ray, ``ray.init`` is timed apart; the extraction
time includes starting the actors and loading the model in each (a single process's model load
is printed apart too). Peak RSS per actor is polled from ``/proc`` (VmRSS of the
``ray::MapWorker`` processes, every 50 ms). Every run's output is checked against the first
``single`` run's, byte for byte. Needs ``pip install "hooked-encoder[ray]"``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from extract_speed import corpus

HOOKS = "blocks.*.hook_resid_post"


def _worker_rss(peaks: dict[int, int], stop: threading.Event) -> None:
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"MapWorker" not in cmdline:
                    continue
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            rss = int(status.split("VmRSS:")[1].split()[0]) // 1024
            peaks[int(pid)] = max(peaks.get(int(pid), 0), rss)
        stop.wait(0.05)


def run(variant: str, texts: list[str], out: str, shard_rows: int) -> dict:
    from hooked_encoder import DEFAULT_MODEL, HookedEncoder, set_num_threads

    report: dict = {}
    if variant == "single":
        set_num_threads(2)
        start = time.perf_counter()
        model = HookedEncoder.from_pretrained(DEFAULT_MODEL)
        report["load_s"] = time.perf_counter() - start
        start = time.perf_counter()
        model.extract(texts, HOOKS, pooling="mean", out=out, shard_rows=shard_rows, progress=False)
        report["extract_s"] = time.perf_counter() - start
        return report
    import ray

    from hooked_encoder.ray import extract_ray

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    report["ray_init_s"] = time.perf_counter() - start
    actors, cpus = (1, 2) if variant == "ray-1x2" else (2, 1)
    peaks: dict[int, int] = {}
    stop = threading.Event()
    poller = threading.Thread(target=_worker_rss, args=(peaks, stop), daemon=True)
    poller.start()
    sentinel = os.path.join(tempfile.mkdtemp(), "died")
    start = time.perf_counter()
    extract_ray(
        texts,
        model=DEFAULT_MODEL,
        hooks=HOOKS,
        out=out,
        pooling="mean",
        shard_rows=shard_rows,
        concurrency=actors,
        num_cpus=cpus,
        _die_once=sentinel if variant.endswith("kill") else None,
    )
    report["extract_s"] = time.perf_counter() - start
    stop.set()
    poller.join()
    report["actor_peak_rss_mib"] = sorted(peaks.values())
    if variant.endswith("kill"):
        report["actor_starts"] = len(Path(sentinel + ".starts").read_text().split())
    ray.shutdown()
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--shard-rows", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    texts = corpus(args.texts, seed=2)
    if args.worker:
        print(json.dumps(run(args.worker, texts, args.out, args.shard_rows)))
        return
    variants = ["single", "ray-1x2", "ray-2x1", "ray-2x1-kill"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    reference = None
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for round_ in range(args.rounds):
        for variant in variants:
            with tempfile.TemporaryDirectory() as out:
                result = subprocess.run(
                    [sys.executable, __file__, "--worker", variant, "--out", out,
                     "--texts", str(args.texts), "--shard-rows", str(args.shard_rows)],
                    check=True, capture_output=True, text=True, env=env,
                )  # fmt: skip
                report = json.loads(result.stdout.strip().splitlines()[-1])
                files = {
                    p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in sorted(Path(out).iterdir())
                }
            reference = reference or files
            report["identical"] = files == reference
            runs[variant].append(report)
            print(f"round {round_ + 1}: {variant:13s} {json.dumps(report)}", flush=True)
    print(f"\n{args.texts} texts, shards of {args.shard_rows}, medians of {args.rounds}:")
    for variant, reports in runs.items():
        seconds = statistics.median(r["extract_s"] for r in reports)
        extra = ""
        if "ray_init_s" in reports[0]:
            init = statistics.median(r["ray_init_s"] for r in reports)
            rss = max(max(r["actor_peak_rss_mib"] or [0]) for r in reports)
            extra = f", ray.init {init:.1f} s, peak RSS per actor <= {rss} MiB"
        else:
            extra = f", model load {statistics.median(r['load_s'] for r in reports):.1f} s"
        print(
            f"  {variant:13s} {args.texts / seconds:7.1f} texts/s ({seconds:.1f} s){extra}, "
            f"identical bytes: {all(r['identical'] for r in reports)}"
        )
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
