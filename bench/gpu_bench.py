"""GPU benchmark: hooked_encoder's CUDA build against Hugging Face ``transformers`` on the same
GPU, on the same seeded random bert-base weights (run by ``scripts/gpu_check.sh``).

    python3 bench/gpu_bench.py [--shapes 32x128,128x128] [--repeats 20] [--json OUT.json]

Workloads: forward to logits (ours ``m(tokens)`` with torch CUDA tokens, so results stay on the
GPU; HF ``m(input_ids=ids).logits``), and a cache of every hook (ours ``run_with_cache``; HF
``output_hidden_states + output_attentions``, fewer tensors). fp32 with TF32 off on both. Times
are medians of ``--repeats`` calls after warm-up, each ended by ``torch.cuda.synchronize()``;
the ratio is HF's time over ours (above 1: we are faster). Also reports the max abs difference
of the logits and each system's peak GPU memory for the last workload it ran (torch's allocator
for HF; ``nvidia-smi``-free, so ours is left out, see the note printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from compare import MODEL_SHAPES  # bench/compare.py: the same bert-base shape as the CPU runs

from hooked_encoder import HookedEncoder

BERT_BASE = MODEL_SHAPES["bert-base"]


def timed(call, repeats: int) -> tuple[float, float]:
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, min(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="32x128,128x128")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        config = transformers.BertConfig(**BERT_BASE, attn_implementation="eager")
        transformers.BertForMaskedLM(config).eval().save_pretrained(directory)
        hf = (
            transformers.BertForMaskedLM.from_pretrained(directory, attn_implementation="eager")
            .to("cuda")
            .eval()
        )
        ours = HookedEncoder.from_pretrained(directory, device="cuda")

    rows = []
    device = torch.cuda.get_device_name()
    print(f"# {device}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(
        "| workload | shape | ours ms median (min) | HF ms median (min) | HF/ours | max abs diff |"
    )
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        batch, pos = map(int, shape.split("x"))
        generator = torch.Generator().manual_seed(batch * 1000 + pos)
        ids = torch.randint(1, BERT_BASE["vocab_size"], (batch, pos), generator=generator)
        ids = ids.to("cuda")
        with torch.inference_mode():
            diff = (ours(ids) - hf(input_ids=ids).logits).abs().max().item()
            workloads = {
                "logits": (lambda ids=ids: ours(ids), lambda ids=ids: hf(input_ids=ids).logits),
                "cache_all": (
                    lambda ids=ids: ours.run_with_cache(ids),
                    lambda ids=ids: hf(
                        input_ids=ids, output_hidden_states=True, output_attentions=True
                    ),
                ),
            }
            for workload, (run_ours, run_hf) in workloads.items():
                ours_ms = timed(run_ours, args.repeats)
                hf_ms = timed(run_hf, args.repeats)
                row = dict(
                    workload=workload,
                    shape=shape,
                    ours_ms=ours_ms,
                    hf_ms=hf_ms,
                    ratio=hf_ms[0] / ours_ms[0],
                    max_abs_diff=diff if workload == "logits" else None,
                )
                rows.append(row)
                shown_diff = f"{diff:.2e}" if workload == "logits" else ""
                print(
                    f"| {workload} | {shape} | {ours_ms[0]:.2f} ({ours_ms[1]:.2f}) | "
                    f"{hf_ms[0]:.2f} ({hf_ms[1]:.2f}) | {row['ratio']:.2f} | {shown_diff} |",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
