"""Where a GPU forward spends its time: the CUDA kernels of one bert-base forward to logits at
32x128, ours and Hugging Face's, from torch's profiler (CUPTI sees every kernel in the process,
Candle's included), in float32 (TF32 off) and in each dtype named. For the CUDA issue's notes on
why ours is slower than HF's on a GPU.

    PYTHONPATH=<unpacked CUDA wheel> python3 scripts/gpu_profile.py [float32 bfloat16 ...]
"""

import sys
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from compare import MODEL_SHAPES

from hooked_encoder import HookedEncoder

torch.backends.cuda.matmul.allow_tf32 = False
shape = MODEL_SHAPES["bert-base"]
config = transformers.BertConfig(**shape, attn_implementation="eager")
tokens = torch.randint(1, shape["vocab_size"], (32, 128), device="cuda")
for dtype in sys.argv[1:] or ["float32"]:
    hf = transformers.BertForMaskedLM(config).eval().to("cuda", getattr(torch, dtype))
    ours = HookedEncoder.from_pretrained("unused", hf_model=hf, device="cuda", dtype=dtype)
    for name, run in (
        ("ours", lambda m=ours: m(tokens)),
        ("hf", lambda m=hf: m(input_ids=tokens).logits),
    ):
        with torch.inference_mode():
            for _ in range(3):
                run()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                run()
                torch.cuda.synchronize()
        print(f"## {name}, {dtype}")
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=18, max_name_column_width=70
            )
        )
