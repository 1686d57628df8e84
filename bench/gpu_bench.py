"""GPU benchmark: hooked_encoder's CUDA build against Hugging Face ``transformers`` on the same
GPU, on the same seeded random bert-base weights (run by ``scripts/gpu_check.sh``).

    python3 bench/gpu_bench.py [--shapes 32x128,128x128] [--repeats 20] [--json OUT.json]

Workloads: forward to logits (ours ``m(tokens)`` with torch CUDA tokens, so results stay on the
GPU; HF ``m(input_ids=ids).logits``), and a cache of every hook (ours ``run_with_cache``; HF
``output_hidden_states + output_attentions``, fewer tensors). Each in float32 with TF32 off on
both sides, against HF eager and HF sdpa, and in bfloat16 (ours ``dtype="bfloat16"`` against HF
sdpa and eager in bfloat16); a cache of every hook in float32 only. Times are medians of
``--repeats`` calls after warm-up, each ended by ``torch.cuda.synchronize()``; the ratio is HF's
best time over ours (above 1: we are faster). Also reports the max abs difference of the logits
against HF eager in the same dtype.
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


def load_hf(directory: str, attention: str, dtype: torch.dtype):
    return (
        transformers.BertForMaskedLM.from_pretrained(
            directory, attn_implementation=attention, dtype=dtype
        )
        .to("cuda")
        .eval()
    )


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
        config = transformers.BertConfig(**BERT_BASE)
        transformers.BertForMaskedLM(config).eval().save_pretrained(directory)
        hf = {
            (dtype_name, attention): load_hf(directory, attention, dtype)
            for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
            for attention in ("eager", "sdpa")
        }
        ours = {
            dtype: HookedEncoder.from_pretrained(directory, device="cuda", dtype=dtype)
            for dtype in ("float32", "bfloat16")
        }

    rows = []
    device = torch.cuda.get_device_name()
    print(f"# {device}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(
        "| workload | dtype | shape | ours ms median (min) | HF eager ms | HF sdpa ms "
        "| HF best/ours | max abs diff vs HF eager |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        batch, pos = map(int, shape.split("x"))
        generator = torch.Generator().manual_seed(batch * 1000 + pos)
        ids = torch.randint(1, BERT_BASE["vocab_size"], (batch, pos), generator=generator)
        ids = ids.to("cuda")
        for dtype in ("float32", "bfloat16"):
            model, eager, sdpa = ours[dtype], hf[dtype, "eager"], hf[dtype, "sdpa"]
            with torch.inference_mode():
                expected = eager(input_ids=ids).logits.float()
                diff = (model(ids).float() - expected).abs().max().item()
            workloads = {
                "logits": (
                    lambda ids=ids, m=model: m(ids),
                    {
                        attention: lambda ids=ids, h=h: h(input_ids=ids).logits
                        for attention, h in (("eager", eager), ("sdpa", sdpa))
                    },
                )
            }
            if dtype == "float32":
                # sdpa cannot return attention patterns (transformers falls back to eager).
                workloads["cache_all"] = (
                    lambda ids=ids, m=model: m.run_with_cache(ids),
                    {
                        "eager": lambda ids=ids, h=eager: h(
                            input_ids=ids, output_hidden_states=True, output_attentions=True
                        )
                    },
                )
            for workload, (run_ours, run_hf) in workloads.items():
                with torch.inference_mode():
                    ours_ms = timed(run_ours, args.repeats)
                    hf_ms = {name: timed(call, args.repeats) for name, call in run_hf.items()}
                best = min(ms[0] for ms in hf_ms.values())
                row = dict(
                    workload=workload,
                    dtype=dtype,
                    shape=shape,
                    ours_ms=ours_ms,
                    hf_ms=hf_ms,
                    ratio_best=best / ours_ms[0],
                    max_abs_diff=diff if workload == "logits" else None,
                )
                rows.append(row)
                eager_ms = hf_ms["eager"][0]
                sdpa_ms = f"{hf_ms['sdpa'][0]:.2f}" if "sdpa" in hf_ms else "n/a"
                shown_diff = f"{diff:.2e}" if workload == "logits" else ""
                print(
                    f"| {workload} | {dtype} | {shape} | {ours_ms[0]:.2f} ({ours_ms[1]:.2f}) | "
                    f"{eager_ms:.2f} | {sdpa_ms} | {row['ratio_best']:.2f} | {shown_diff} |",
                    flush=True,
                )
    if args.json:
        info = dict(device=device, torch=torch.__version__, transformers=transformers.__version__)
        args.json.write_text(json.dumps({**info, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
