"""Where a GPU forward spends its time: the CUDA kernels of one bert-base forward to logits at
32x128, ours and Hugging Face's, from torch's profiler (CUPTI sees every kernel in the process,
Candle's included). For the CUDA issue's notes on why ours is slower than HF's on a GPU.

    PYTHONPATH=<unpacked CUDA wheel> python3 scripts/gpu_profile.py
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
hf = transformers.BertForMaskedLM(config).eval().to("cuda")
ours = HookedEncoder.from_pretrained("unused", hf_model=hf, device="cuda")
tokens = torch.randint(1, shape["vocab_size"], (32, 128), device="cuda")
for name, run in (("ours", lambda: ours(tokens)), ("hf", lambda: hf(input_ids=tokens).logits)):
    with torch.inference_mode():
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            run()
            torch.cuda.synchronize()
    print(f"## {name}")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)
    )
