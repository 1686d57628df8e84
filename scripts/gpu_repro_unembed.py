"""Reproduces the open CUDA hang (see the CUDA issue's notes): on an H200, repeated
``model.unembed(x)`` calls with a bert-sized vocabulary stopped returning, while a small
vocabulary was fine. Prints each step before running it, so the last line shows where it hung.

    PYTHONPATH=<unpacked CUDA wheel> timeout 120 python3 scripts/gpu_repro_unembed.py
"""

import time

import torch

from hooked_encoder import HookedEncoder

for vocab in (1000, 28992):
    model = HookedEncoder(
        {
            "d_model": 768,
            "d_head": 64,
            "n_layers": 1,
            "n_ctx": 512,
            "d_vocab": vocab,
            "d_mlp": 3072,
            "seed": 0,
            "device": "cuda",
        }
    )
    x = torch.randn(1, 16, 768, device="cuda")
    for call in range(3):
        print(f"vocab {vocab}: unembed call {call} ...", flush=True)
        start = time.perf_counter()
        model.unembed(x)
        torch.cuda.synchronize()
        print(f"  done in {(time.perf_counter() - start) * 1e3:.1f} ms", flush=True)
