"""Benchmark ``hooked_encoder`` against Hugging Face ``transformers`` (and TransformerLens, when
it is installed) on the same seeded random BERT weights, on the CPU.

Run from the repository root:

    python3 bench/compare.py                                         # bert-base, default shapes
    python3 bench/compare.py --small --shapes 1x16,2x32 --repeats 3  # smoke test, tiny model
    python3 bench/compare.py --shapes 1x16 --repeats 3               # bert-base, one shape
    python3 bench/compare.py --threads 4 --systems ours,hf --workloads logits,no_head
    python3 bench/compare.py --compare bench/results/compare-bert-base-<timestamp>.json

The default run (bert-base, shapes 1x16, 1x128, 8x128, 32x128, every workload, 2 threads) is
meant to finish in about 15 minutes on 2 cores.

What it does:

* Builds, once, a seeded random ``BertForMaskedLM`` checkpoint (``torch.manual_seed(0)``,
  Hugging Face's own initialisation, eager attention) and saves it with ``save_pretrained`` under
  ``bench/.cache/`` (bert-base shape: 12 layers, hidden 768, 12 heads, intermediate 3072, vocab
  28996, 512 positions; ``--small``: 2 layers, hidden 64). ``--model-shape roberta-base``,
  ``mpnet-base``, ``distilbert-base`` or ``modernbert-base`` build that family's
  ``...ForMaskedLM`` at its base shape instead (``AutoModelForMaskedLM``); those run against HF
  eager and sdpa only (the ONNX export and TransformerLens here are BERT's).
* Measures every (system, workload, shape) cell in a separate process (this script re-invoked
  with ``--worker``), so that peak RSS (``ru_maxrss``) belongs to one system and one workload.
  Each worker also records its RSS after loading the model (weights paged in), before the first
  call ("baseline"), then resets the peak; the table shows ``peak (+run)`` in MiB, where
  ``peak`` is the whole process's (imports and loading included) and ``+run`` is the peak during
  the calls minus the baseline. Peaks are ``VmHWM`` from ``/proc/self/status``: on Linux
  ``ru_maxrss`` also counts the peak of the process that forked the worker (it survives
  ``exec``) and cannot be reset, so it is only kept in the JSON (``ru_maxrss_mib``).
  ``--interleave`` runs a cell's systems side by side instead: every worker loads and warms up,
  then each makes one timed call in turn (see ``run_interleaved``); ratios are then medians of
  per-round ratios, which hold on machines whose speed drifts.
* Thread counts: ``RAYON_NUM_THREADS`` (hooked_encoder), ``OMP_NUM_THREADS``,
  ``MKL_NUM_THREADS`` and ``torch.set_num_threads`` (torch) are all set to ``--threads``.
* Timing: warm-up calls (at least one, up to ``--warmup`` while they take under a second), then
  timed calls until ``--repeats`` calls are done, or, earlier, once at least ``--min-repeats``
  calls are done and ``--budget`` seconds have passed (so large shapes get fewer repeats). The
  table shows the median and the minimum in ms.
* Correctness: the ``logits`` workers save their logits; the parent reports the max abs
  difference of ours (and TransformerLens's) against Hugging Face on the same tokens (seeded
  random ids in ``[1, vocab)``, the same for every system).

Workloads, as each system runs them (``L`` below is 3, or the last layer of smaller models):

* ``logits``: ours ``m(tokens)``; HF ``m(input_ids=ids).logits``; TL ``m(tokens)``.
* ``no_head``: ours and TL ``m(tokens, return_type=None)`` (TL computes the head anyway); HF
  ``m.bert(input_ids=ids)``, the encoder without the MLM head.
* ``cache_all``: ours and TL ``m.run_with_cache(tokens)``, every hook point; HF
  ``output_hidden_states=True, output_attentions=True``, the nearest equivalent (fewer tensors).
* ``cache_resid_post``: ours and TL ``run_with_cache`` with a ``names_filter`` keeping
  ``*hook_resid_post``; HF ``output_hidden_states=True``.
* ``hook_pattern``: ours and TL ``run_with_hooks`` with one Python hook returning its input on
  ``blocks.L.attn.hook_pattern``; HF a forward hook returning its output unchanged on
  ``bert.encoder.layer[L].attention.self`` (whose output holds the eager attention
  probabilities).

* ``grad_all``: forward + backward from the same ``d metric / d logits`` (a fixed random
  projection of all logits, seeded): ours ``m.grad(tokens, grad_output=g)``, the gradient at
  every hook point; HF ``(m(input_ids=ids, output_hidden_states=True,
  output_attentions=True).logits * g).sum().backward()`` with ``retain_grad`` on every hidden
  state and attention probability (weight gradients included: that is what ``backward()``
  costs); TL the same metric with ``add_caching_hooks(incl_bwd=True)``, every hook point's
  gradient.

All torch calls run under ``torch.inference_mode()``, except ``grad_all``'s.

TransformerLens is optional and never installed by this script: it is skipped, with a note, when
the interpreter running the script (whose workers run ``sys.executable``) cannot import
``transformer_lens``; a worker fails if it has no ``HookedEncoder``. Tested with
transformer-lens 3.5.1, best installed in its own environment that still sees the system's
torch, transformers and hooked_encoder:

    python3 -m venv --system-site-packages /tmp/tlvenv
    /tmp/tlvenv/bin/pip install transformer-lens==3.5.1
    /tmp/tlvenv/bin/python bench/compare.py --shapes 1x16 --repeats 3

It is loaded offline (``HookedEncoder.from_pretrained`` would fetch a hub model's config and
tokenizer), for either model shape: the ``HookedEncoder`` is built from a config dict made from
the checkpoint's own config as TransformerLens makes it for ``BertForMaskedLM`` (no tokenizer:
``d_vocab`` is given), and the weights are those of the checkpoint loaded into a
``BertForPreTraining`` (its pooler and NSP head, absent from the checkpoint, are random and
unused), converted by TransformerLens's ``convert_bert_weights`` and loaded with
``load_state_dict(strict=False)``, as ``from_pretrained`` does. Its peak RSS therefore includes
that Hugging Face model, held during the conversion, and importing transformer_lens (about
300 MiB).

Results: a Markdown table on stdout (progress goes to stderr), and every raw number in JSON
(``--json``, default ``bench/results/compare-<model>-<timestamp>.json``). ``--compare OLD.json``
also prints the new/old ratio of the medians of every cell present in both runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"
RESULTS_DIR = BENCH_DIR / "results"

# Hugging Face config arguments (BERT's names) of the model shapes.
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "bert-base": dict(
        vocab_size=28996,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        type_vocab_size=2,
    ),
    # Other families at their base shapes (the model_type key picks the family).
    "roberta-base": dict(
        model_type="roberta",
        vocab_size=50265,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=514,
        type_vocab_size=1,
    ),
    "mpnet-base": dict(
        model_type="mpnet",
        vocab_size=30527,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=514,
    ),
    # ModernBERT-base: 22 pre-LN layers, gated MLP, every third layer global, the others
    # within 64 positions (transformers' defaults for local_attention and the rest).
    "modernbert-base": dict(
        model_type="modernbert",
        vocab_size=50368,
        hidden_size=768,
        num_hidden_layers=22,
        num_attention_heads=12,
        intermediate_size=1152,
        max_position_embeddings=8192,
    ),
    "distilbert-base": dict(
        model_type="distilbert",
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
    ),
    "tiny": dict(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=512,
        type_vocab_size=2,
    ),
}
SYSTEMS = ("ours", "hf", "hf_sdpa", "ort", "ort_fused", "tl")
SYSTEM_LABELS = {
    "ours": "ours",
    "hf": "HF",
    "hf_sdpa": "HF sdpa",
    "ort": "ORT",
    "ort_fused": "ORT fused",
    "tl": "TL",
}
# Systems that only run some workloads: HF with sdpa attention and ONNX Runtime have no
# hook points and no attention probabilities to return.
SYSTEM_WORKLOADS = {
    "hf_sdpa": ("logits", "no_head"),
    "ort": ("logits", "no_head"),
    "ort_fused": ("logits", "no_head"),
}
TORCH_SYSTEMS = ("hf", "hf_sdpa", "tl")
WORKLOADS = ("logits", "no_head", "cache_all", "cache_resid_post", "hook_pattern", "grad_all")
DEFAULT_SHAPES = "1x16,1x128,8x128,32x128"
RESULT_MARKER = "BENCH-RESULT "
# --interleave: a worker prints READY_MARKER once loaded and warmed up, then one TIME_MARKER line
# per "run" line it reads on stdin, until "done".
READY_MARKER = "BENCH-READY"
TIME_MARKER = "BENCH-TIME "
SPIN_DOWN_SECONDS = 0.05
WARMUP_SECONDS = 1.0


# ---------------------------------------------------------------------------------------- worker


def _proc_status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB; None without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _ru_maxrss_mib() -> float:
    """``ru_maxrss`` in MiB (Linux reports KiB). On Linux it also counts the peak of the process
    that forked this one (it survives ``exec``), so the table uses ``VmHWM`` where it can."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mib() -> float:
    """Peak RSS of this process's own address space (``VmHWM``; ``ru_maxrss`` without /proc)."""
    peak = _proc_status_mib("VmHWM")
    return _ru_maxrss_mib() if peak is None else peak


def _reset_peak() -> bool:
    """Resets ``VmHWM`` to the current RSS (Linux 4.0+), so that the next reading is the peak of
    the runs alone rather than of loading. False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _touch_weights(model) -> None:
    """Reads every weight once: transformers memory-maps safetensors, so the pages would
    otherwise first count in the RSS during the first call instead of in the baseline."""
    import torch

    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.sum()


def _tokens(seed: int, batch: int, pos: int, vocab: int) -> np.ndarray:
    """The benchmark's token ids for one shape: the same for every system."""
    rng = np.random.default_rng([seed, batch, pos])
    return rng.integers(1, vocab, size=(batch, pos), dtype=np.int64)


def _identity_hook(x, hook):
    return x


def _is_resid_post(name: str) -> bool:
    return name.endswith("hook_resid_post")


def _grad_output(spec: dict, tokens: np.ndarray) -> np.ndarray:
    """d metric / d logits of ``grad_all``: a seeded random projection of all logits."""
    rng = np.random.default_rng(spec["seed"] + 1)
    return rng.standard_normal((*tokens.shape, spec["vocab"])).astype(np.float32)


def _torch_grad_call(model, forward, grad_output: np.ndarray):
    """A call running ``forward()`` (returning ``(logits, tensors to keep the gradient of)``)
    then the backward from ``grad_output``, with autograd on (the worker's inference mode off)."""
    import torch

    g = torch.from_numpy(grad_output)

    def call():
        with torch.inference_mode(False), torch.enable_grad():
            model.zero_grad(set_to_none=True)
            logits, kept = forward()
            for tensor in kept:
                tensor.retain_grad()
            (logits * g).sum().backward()
            return [tensor.grad for tensor in kept]

    return call


def _setup_ours(spec: dict, tokens: np.ndarray):
    """Loads hooked_encoder; returns ``(call, to_logits, version)``. Imports no torch."""
    import hooked_encoder
    from hooked_encoder import HookedEncoder

    model = HookedEncoder.from_pretrained(spec["checkpoint"])
    hook = f"blocks.{spec['hook_layer']}.attn.hook_pattern"
    calls = {
        "logits": lambda: model(tokens),
        "no_head": lambda: model(tokens, return_type=None),
        "cache_all": lambda: model.run_with_cache(tokens),
        "cache_resid_post": lambda: model.run_with_cache(tokens, names_filter=_is_resid_post),
        "hook_pattern": lambda: model.run_with_hooks(tokens, fwd_hooks=[(hook, _identity_hook)]),
        "grad_all": lambda: model.grad(tokens, grad_output=_grad_output(spec, tokens)),
    }
    return calls[spec["workload"]], np.asarray, hooked_encoder.__version__


def _hf_attention_module(model, layer: int):
    """The self-attention module of a layer, whose output holds the pattern."""
    base = model.base_model
    if hasattr(base, "transformer"):  # DistilBERT
        return base.transformer.layer[layer].attention
    if hasattr(base, "layers"):  # ModernBERT
        return base.layers[layer].attn
    attention = base.encoder.layer[layer].attention
    return attention.self if hasattr(attention, "self") else attention.attn  # BERT / MPNet


def _setup_hf(spec: dict, tokens: np.ndarray, attention: str = "eager"):
    """Loads transformers' ``...ForMaskedLM`` of the checkpoint's family; returns ``(call,
    to_logits, version)``."""
    import torch
    import transformers

    model = transformers.AutoModelForMaskedLM.from_pretrained(
        spec["checkpoint"], attn_implementation=attention, dtype=torch.float32
    ).eval()
    _touch_weights(model)
    ids = torch.from_numpy(tokens)
    if spec["workload"] == "hook_pattern":
        module = _hf_attention_module(model, spec["hook_layer"])
        module.register_forward_hook(lambda module, args, output: output)
    calls = {
        "logits": lambda: model(input_ids=ids),
        "no_head": lambda: model.base_model(input_ids=ids),
        "cache_all": lambda: model(
            input_ids=ids, output_hidden_states=True, output_attentions=True
        ),
        "cache_resid_post": lambda: model(input_ids=ids, output_hidden_states=True),
        "hook_pattern": lambda: model(input_ids=ids),
    }
    if spec["workload"] == "grad_all":

        def forward():
            out = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
            return out.logits, [*out.hidden_states, *out.attentions]

        return (
            _torch_grad_call(model, forward, _grad_output(spec, tokens)),
            None,
            (transformers.__version__),
        )
    return calls[spec["workload"]], lambda out: out.logits.numpy(), transformers.__version__


def load_tl_model(checkpoint: str | Path):
    """TransformerLens's HookedEncoder with the weights of a BERT checkpoint directory.

    Offline, without ``HookedEncoder.from_pretrained`` (which fetches the config and the
    tokenizer of a hub model): the config is built from the checkpoint's own, as TransformerLens
    does for ``BertForMaskedLM``, and the weights are converted by TransformerLens's
    ``convert_bert_weights``, then loaded as ``from_pretrained`` loads them.
    """
    import torch
    import transformer_lens
    import transformers
    from transformer_lens.pretrained.weight_conversions.bert import convert_bert_weights

    version = importlib.metadata.version("transformer-lens")
    if not hasattr(transformer_lens, "HookedEncoder"):
        raise ImportError(f"transformer_lens {version} has no HookedEncoder")
    # The converter reads a BertForPreTraining. The checkpoint is a BertForMaskedLM: HF
    # initialises the missing pooler and NSP head randomly; the MLM forward does not use them.
    hf_model = transformers.BertForPreTraining.from_pretrained(
        checkpoint, attn_implementation="eager", dtype=torch.float32
    ).eval()
    hf = hf_model.config
    cfg = {
        "d_model": hf.hidden_size,
        "d_head": hf.hidden_size // hf.num_attention_heads,
        "n_heads": hf.num_attention_heads,
        "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers,
        "n_ctx": hf.max_position_embeddings,
        "eps": hf.layer_norm_eps,
        "d_vocab": hf.vocab_size,  # so that no tokenizer is needed
        "act_fn": "gelu",
        "attention_dir": "bidirectional",
        "original_architecture": "BertForMaskedLM",
        "init_weights": False,
        "device": "cpu",
        "dtype": torch.float32,
    }
    model = transformer_lens.HookedEncoder(cfg, tokenizer=None, move_to_device=False)
    loaded = model.load_state_dict(convert_bert_weights(hf_model, model.cfg), strict=False)
    # strict=False, as from_pretrained: only buffers (the attention masks) may be missing.
    parameters = dict(model.named_parameters())
    missing = [name for name in loaded.missing_keys if name in parameters]
    if missing or loaded.unexpected_keys:
        raise RuntimeError(f"weights missing: {missing}; unexpected: {loaded.unexpected_keys}")
    del hf_model
    model.to(model.cfg.device)
    model.eval()
    _touch_weights(model)
    return model, version


def _setup_tl(spec: dict, tokens: np.ndarray):
    """Loads TransformerLens's HookedEncoder (:func:`load_tl_model`); returns ``(call,
    to_logits, version)``."""
    import torch

    model, version = load_tl_model(spec["checkpoint"])
    ids = torch.from_numpy(tokens)
    hook = f"blocks.{spec['hook_layer']}.attn.hook_pattern"
    calls = {
        "logits": lambda: model(ids),
        "no_head": lambda: model(ids, return_type=None),
        "cache_all": lambda: model.run_with_cache(ids),
        "cache_resid_post": lambda: model.run_with_cache(ids, names_filter=_is_resid_post),
        "hook_pattern": lambda: model.run_with_hooks(ids, fwd_hooks=[(hook, _identity_hook)]),
    }
    if spec["workload"] == "grad_all":

        def forward():
            model.reset_hooks()
            cache = model.add_caching_hooks(incl_bwd=True)
            forward.cache = cache
            return model(ids), []

        grad_call = _torch_grad_call(model, forward, _grad_output(spec, tokens))

        def call():
            grad_call()
            cache = forward.cache
            model.reset_hooks()
            return cache

        return call, None, version
    return calls[spec["workload"]], lambda out: out.numpy(), version


def _setup_hf_sdpa(spec: dict, tokens: np.ndarray):
    """transformers' ``...ForMaskedLM`` with PyTorch's scaled_dot_product_attention."""
    return _setup_hf(spec, tokens, attention="sdpa")


def _setup_ort(spec: dict, tokens: np.ndarray, fused: bool = False):
    """An ONNX Runtime session (CPU provider, every graph optimisation, ``threads`` intra-op
    threads, one inter-op thread) on the model exported by ``build_onnx``; ``fused``: the
    export after ``onnxruntime.transformers``' BERT fusions. Returns ``(call, to_logits,
    version)``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    path = onnx_paths(Path(spec["checkpoint"]))[(spec["workload"], fused)]
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {
        "input_ids": tokens,
        "attention_mask": np.ones_like(tokens),
        "token_type_ids": np.zeros_like(tokens),
    }
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    return (lambda: session.run(None, feeds)), (lambda out: out[0]), ort.__version__


def _setup_ort_fused(spec: dict, tokens: np.ndarray):
    return _setup_ort(spec, tokens, fused=True)


SETUPS = {
    "ours": _setup_ours,
    "hf": _setup_hf,
    "hf_sdpa": _setup_hf_sdpa,
    "ort": _setup_ort,
    "ort_fused": _setup_ort_fused,
    "tl": _setup_tl,
}


def _output_size(obj: Any) -> tuple[int, int]:
    """(number of arrays or tensors, their total bytes) in a call's output, caches included.
    Entries that alias the same memory (one array under two hook names) count once."""
    buffers: set[tuple[int, int]] = set()
    count, pending = 0, [obj]
    while pending:
        item = pending.pop()
        if isinstance(item, np.ndarray):
            count += 1
            buffers.add((item.__array_interface__["data"][0], item.nbytes))
        elif type(item).__module__.startswith("torch") and hasattr(item, "data_ptr"):
            count += 1
            buffers.add((item.data_ptr(), item.numel() * item.element_size()))
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif callable(getattr(item, "values", None)):  # caches, ModelOutput, dicts
            pending.extend(item.values())
    return count, sum(nbytes for _, nbytes in buffers)


def _warm_up(call, spec: dict) -> tuple[int, Any]:
    """Warm-up calls (see the module docstring): (how many, output of the last)."""
    warmups, started = 0, time.perf_counter()
    while warmups < 1 or (
        warmups < spec["warmup"] and time.perf_counter() - started < WARMUP_SECONDS
    ):
        output = None
        output = call()
        warmups += 1
    return warmups, output


def _timed_call(call) -> tuple[float, Any]:
    t0 = time.perf_counter()
    output = call()
    return (time.perf_counter() - t0) * 1000, output


def _serve_calls(call, spec: dict) -> tuple[list[float], int, Any]:
    """``--interleave``: warm-up, then one timed call per ``run`` line on stdin, each answered
    on stdout, until ``done``; returns what ``_time_calls`` returns."""
    warmups, output = _warm_up(call, spec)
    print(READY_MARKER, flush=True)
    times: list[float] = []
    while sys.stdin.readline().strip() == "run":
        output = None
        ms, output = _timed_call(call)
        times.append(ms)
        print(f"{TIME_MARKER}{ms}", flush=True)
    return times, warmups, output


def _time_calls(call, spec: dict) -> tuple[list[float], int, Any]:
    """Warm-up then timed calls (see the module docstring); returns (times in ms, number of
    warm-up calls, output of the last call). The previous output is dropped before each call,
    so the peak RSS is that of one call."""
    if spec.get("serve"):
        return _serve_calls(call, spec)
    warmups, output = _warm_up(call, spec)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < spec["repeats"] and (
        len(times) < spec["min_repeats"] or time.perf_counter() - started < spec["budget"]
    ):
        output = None
        ms, output = _timed_call(call)
        times.append(ms)
    return times, warmups, output


def worker(spec: dict) -> dict:
    """Measures one (system, workload, shape) cell; runs in its own process."""
    result: dict[str, Any] = {key: spec[key] for key in ("system", "workload", "batch", "pos")}
    phase = "load"
    try:
        tokens = _tokens(spec["seed"], spec["batch"], spec["pos"], spec["vocab"])
        if spec["system"] in TORCH_SYSTEMS:
            import torch

            torch.set_num_threads(spec["threads"])
        started = time.perf_counter()
        call, to_logits, version = SETUPS[spec["system"]](spec, tokens)
        result.update(
            version=version,
            load_s=time.perf_counter() - started,
            baseline_rss_mib=_proc_status_mib("VmRSS"),
            load_peak_mib=_peak_mib(),
            torch_imported="torch" in sys.modules,
            peak_reset=_reset_peak(),
        )
        # Which instruction set the system's own kernels used: HOOKED_ENCODER_MAX_SIMD caps
        # ours, ATEN_CPU_CAPABILITY PyTorch's (ONNX Runtime has no such switch).
        if spec["system"] == "ours":
            import hooked_encoder

            result["cpu_kernels"] = hooked_encoder.cpu_kernels()
        elif "torch" in sys.modules:
            import torch

            result["cpu_kernels"] = torch.backends.cpu.get_cpu_capability()
        phase = "run"
        if "torch" in sys.modules:
            import torch

            with torch.inference_mode():
                times, warmups, output = _time_calls(call, spec)
        else:
            times, warmups, output = _time_calls(call, spec)
        result.update(
            ok=True,
            times_ms=times,
            warmups=warmups,
            median_ms=statistics.median(times),
            min_ms=min(times),
            run_peak_mib=_peak_mib(),
            ru_maxrss_mib=_ru_maxrss_mib(),
        )
        # Without the reset, the "run" peak is that of the whole process.
        result["peak_rss_mib"] = max(result["load_peak_mib"], result["run_peak_mib"])
        count, nbytes = _output_size(output)
        result.update(output_arrays=count, output_mib=nbytes / 2**20)
        if spec.get("save_logits"):
            np.save(spec["save_logits"], np.ascontiguousarray(to_logits(output), np.float32))
    except Exception as error:
        lines = traceback.format_exception_only(type(error), error)
        result.update(ok=False, phase=phase, error="".join(lines).strip())
        traceback.print_exc()
    return result


# ---------------------------------------------------------------------------------------- parent


def checkpoint_spec(model_shape: str, seed: int) -> tuple[Path, dict]:
    """Where the checkpoint of a model shape and seed is cached, and what it must hold."""
    path = CACHE_DIR / f"{model_shape}-seed{seed}"
    return path, {"model_shape": model_shape, "seed": seed, "config": MODEL_SHAPES[model_shape]}


def ensure_checkpoint(model_shape: str, seed: int) -> Path:
    """The cached checkpoint, built when missing or stale. The build runs in its own process:
    importing torch here would raise the parent's RSS, which its workers' ``ru_maxrss`` would
    inherit."""
    path, spec = checkpoint_spec(model_shape, seed)
    marker = path / "bench_spec.json"
    weights = path / "model.safetensors"
    if not (weights.is_file() and marker.is_file() and json.loads(marker.read_text()) == spec):
        log(f"building the {model_shape} checkpoint (seed {seed}) in {path}")
        command = [sys.executable, str(Path(__file__).resolve()), "--build-checkpoint"]
        subprocess.run([*command, f"--model-shape={model_shape}", f"--seed={seed}"], check=True)
    return path


# DistilBERT's names for BERT's config keys.
DISTILBERT_KEYS = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "intermediate_size": "hidden_dim",
}


def model_type_of(model_shape: str) -> str:
    return MODEL_SHAPES[model_shape].get("model_type", "bert")


def build_checkpoint(model_shape: str, seed: int) -> None:
    """Saves a seeded random ``...ForMaskedLM`` of the shape's family (Hugging Face's
    initialisation)."""
    import torch
    import transformers

    path, spec = checkpoint_spec(model_shape, seed)
    settings = dict(MODEL_SHAPES[model_shape])
    model_type = settings.pop("model_type", "bert")
    if model_type == "distilbert":
        settings = {DISTILBERT_KEYS.get(key, key): value for key, value in settings.items()}
    config = transformers.AutoConfig.for_model(model_type, **settings, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.AutoModelForMaskedLM.from_config(config).eval()
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    (partial / "bench_spec.json").write_text(json.dumps(spec, indent=1) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)


def onnx_paths(checkpoint: Path) -> dict[tuple[str, bool], Path]:
    """Where the ONNX exports of a checkpoint live: (workload, fused) -> path."""
    return {
        (workload, fused): checkpoint / "onnx" / f"{workload}{'-fused' if fused else ''}.onnx"
        for workload in ("logits", "no_head")
        for fused in (False, True)
    }


def ensure_onnx(checkpoint: Path) -> None:
    """The ONNX exports of the checkpoint, built (in their own process) when missing."""
    if not all(path.is_file() for path in onnx_paths(checkpoint).values()):
        log(f"exporting {checkpoint} to ONNX")
        command = [sys.executable, str(Path(__file__).resolve()), "--build-onnx", str(checkpoint)]
        subprocess.run(command, check=True)


def build_onnx(checkpoint: Path) -> None:
    """Exports the checkpoint to ONNX, offline: ``logits`` (the MLM logits) and ``no_head``
    (the encoder's last hidden state), with inputs ``input_ids``, ``attention_mask`` and
    ``token_type_ids`` and dynamic batch and sequence axes, by torch's TorchScript exporter
    (opset 17; its graphs are the ones ``onnxruntime.transformers``' BERT fusions recognise:
    EmbedLayerNormalization, Attention, BiasGelu, SkipLayerNormalization). Then writes each
    again after those fusions (``-fused``)."""
    import torch
    import transformers
    from onnxruntime.transformers import optimizer

    model = transformers.BertForMaskedLM.from_pretrained(
        checkpoint, attn_implementation="eager", dtype=torch.float32
    ).eval()

    class Export(torch.nn.Module):
        def __init__(self, workload: str):
            super().__init__()
            self.model, self.workload = model, workload

        def forward(self, input_ids, attention_mask, token_type_ids):
            inputs = dict(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            if self.workload == "logits":
                return self.model(**inputs).logits
            return self.model.bert(**inputs).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.ones((2, 8), dtype=torch.int64)
    paths = onnx_paths(checkpoint)
    paths[("logits", False)].parent.mkdir(exist_ok=True)
    for workload in ("logits", "no_head"):
        plain, fused = paths[(workload, False)], paths[(workload, True)]
        # eval() on the wrapper too: the exporter restores the wrapper's mode recursively.
        torch.onnx.export(
            Export(workload).eval(),
            (ids, ids, torch.zeros_like(ids)),
            str(plain),
            input_names=names,
            output_names=["output"],
            dynamic_axes={name: {0: "batch", 1: "pos"} for name in [*names, "output"]},
            opset_version=17,
            dynamo=False,
        )
        config = model.config
        optimized = optimizer.optimize_model(
            str(plain),
            model_type="bert",
            num_heads=config.num_attention_heads,
            hidden_size=config.hidden_size,
        )
        fusions = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        log(f"{fused.name}: fusions {fusions}")
        optimized.save_model_to_file(str(fused))


def ort_unavailable() -> str | None:
    """Why ONNX Runtime cannot run here, or None (checked without importing anything)."""
    missing = [name for name in ("onnxruntime", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed for {sys.executable}"
    return None


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_worker(spec: dict, threads: int, timeout: float) -> dict:
    """Runs one cell in a fresh process and returns its result."""
    env = _worker_env(threads)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    base = {key: spec[key] for key in ("system", "workload", "batch", "pos")}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "ok": False, "phase": "run", "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    # Killed or crashed (e.g. out of memory): only this cell fails.
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {**base, "ok": False, "phase": "crash", "error": f"exit {done.returncode}: {tail}"}


def _worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return env


def _read_until(process: subprocess.Popen, *markers: str) -> tuple[str, str] | None:
    """(marker, rest of the line) of the first stdout line of ``process`` that starts with one
    of ``markers`` (other lines are libraries' output), or None if the process ended first."""
    for line in process.stdout:
        for marker in markers:
            if line.startswith(marker):
                return marker, line[len(marker) :].strip()
    return None


def run_interleaved(specs: list[dict], threads: int, timeout: float) -> list[dict]:
    """Runs one cell per spec, each in its own process as ``run_worker`` does, but all at once
    and call by call: every worker loads and warms up, then the parent asks each in turn for
    one timed call (rotating who goes first), so that every system meets the same machine.
    Shared machines' speed can swing by 10-40% between minutes; ratios from calls alternated
    this way hold where ratios of separate runs do not. Stops after ``repeats`` rounds, or
    once ``min_repeats`` are done and ``budget`` seconds per system have passed."""
    if not specs:  # every system of the cell was skipped
        return []
    command = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    processes = [
        subprocess.Popen(
            [*command, json.dumps({**spec, "serve": True})],
            env=_worker_env(threads),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        for spec in specs
    ]
    # A worker that cannot load reports its error at once, instead of READY.
    first = [_read_until(process, READY_MARKER, RESULT_MARKER) for process in processes]
    spec = specs[0]
    live = [i for i, line in enumerate(first) if line and line[0] == READY_MARKER]
    started, rounds = time.perf_counter(), 0
    while (
        live
        and rounds < spec["repeats"]
        and (
            rounds < spec["min_repeats"]
            or time.perf_counter() - started < spec["budget"] * len(live)
        )
    ):
        order = live[rounds % len(live) :] + live[: rounds % len(live)]
        for i in order:
            # Let the previous worker's threads stop spinning (OpenMP, ONNX Runtime's pool and
            # rayon spin a little after each parallel section) before the next call starts.
            time.sleep(SPIN_DOWN_SECONDS)
            try:
                processes[i].stdin.write("run\n")
                processes[i].stdin.flush()
                answered = _read_until(processes[i], TIME_MARKER) is not None
            except OSError:
                answered = False
            if not answered:
                live.remove(i)  # crashed: its result says so below
                first[i] = None
        rounds += 1
    results = []
    for spec, process, line in zip(specs, processes, first, strict=True):
        base = {key: spec[key] for key in ("system", "workload", "batch", "pos")}
        try:
            if line is not None and line[0] == READY_MARKER:
                process.stdin.write("done\n")
                process.stdin.flush()
                line = _read_until(process, RESULT_MARKER)
            process.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
            process.kill()
            line = None
        if line is None:
            error = f"exit {process.poll()}: crashed or killed (its stderr is above)"
            results.append({**base, "ok": False, "phase": "crash", "error": error})
        else:
            results.append({**json.loads(line[1]), "interleaved": True})
    return results


def _npy_rows(path: Path):
    """Yields the rows (first axis) of a saved array one at a time, reading the file in chunks:
    neither loading nor memory-mapping it, so that the parent's RSS stays small."""
    with open(path, "rb") as file:
        fmt = np.lib.format
        version = fmt.read_magic(file)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran_order, dtype = read_header(file)
        if fortran_order:
            raise ValueError(f"{path} is not C-ordered")
        row = int(np.prod(shape[1:], dtype=np.int64))
        for _ in range(shape[0]):
            yield np.fromfile(file, dtype=dtype, count=row).reshape(shape[1:])


def max_abs_diff(path_a: Path, path_b: Path) -> tuple[float, float]:
    """(max |a - b|, max |b|) of two saved logit arrays of the same shape."""
    diff = scale = 0.0
    for row_a, row_b in zip(_npy_rows(path_a), _npy_rows(path_b), strict=True):
        diff = max(diff, float(np.max(np.abs(row_a - row_b))))
        scale = max(scale, float(np.max(np.abs(row_b))))
    return diff, scale


def version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average (None where /proc is missing)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        batch, _, pos = item.strip().lower().partition("x")
        if not (batch.isdigit() and pos.isdigit()) or int(batch) < 1 or int(pos) < 1:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not BATCHxPOS, e.g. 8x128")
        shapes.append((int(batch), int(pos)))
    return shapes


def parse_choices(text: str, choices: tuple[str, ...]) -> list[str]:
    picked = [item.strip() for item in text.split(",") if item.strip()]
    unknown = sorted(set(picked) - set(choices))
    if unknown or not picked:
        raise argparse.ArgumentTypeError(f"pick from {', '.join(choices)} (got {text!r})")
    return [choice for choice in choices if choice in picked]


def tl_unavailable() -> str | None:
    """Why TransformerLens cannot run here, or None (checked without importing it)."""
    if importlib.util.find_spec("transformer_lens") is None:
        return f"transformer_lens is not installed for {sys.executable}"
    return None


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _cell(result: dict | None) -> dict | None:
    return result if result and result.get("ok") else None


def _ratio(cell: dict, ours: dict) -> float:
    """``cell``'s time over ours: the median of the ratios of calls made in the same round when
    both ran interleaved (equal numbers of calls), else the ratio of the medians."""
    times, our_times = cell["times_ms"], ours["times_ms"]
    if cell.get("interleaved") and ours.get("interleaved") and len(times) == len(our_times):
        return statistics.median(t / o for t, o in zip(times, our_times, strict=True))
    return cell["median_ms"] / ours["median_ms"]


def markdown_table(report: dict) -> str:
    systems = [s for s in report["systems"] if any(_cell(r) for r in report["cells"][s].values())]
    header = ["workload", "shape"]
    for system in systems:
        header.append(f"{SYSTEM_LABELS[system]} ms median (min)")
        if system != "ours" and "ours" in systems:
            header.append(f"{SYSTEM_LABELS[system]}/ours")
    header += [f"{SYSTEM_LABELS[s]} peak RSS MiB (+run)" for s in systems]
    diff_columns = [s for s in systems if s != "hf" and "hf" in systems]
    header += [f"max abs diff {SYSTEM_LABELS[s]} vs HF" for s in diff_columns]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for workload in report["workloads"]:
        for batch, pos in report["shapes"]:
            key = f"{workload}/{batch}x{pos}"
            cells = {s: _cell(report["cells"][s].get(key)) for s in systems}
            row = [workload, f"{batch}x{pos}"]
            ours = cells.get("ours")
            for system in systems:
                cell = cells[system]
                row.append(f"{_ms(cell['median_ms'])} ({_ms(cell['min_ms'])})" if cell else "")
                if system != "ours" and "ours" in systems:
                    ratio = cell and ours and _ratio(cell, ours)
                    row.append(f"{ratio:.2f}" if ratio else "")
            for system in systems:
                cell = cells[system]
                if cell:
                    extra = cell["run_peak_mib"] - (cell["baseline_rss_mib"] or 0)
                    row.append(f"{cell['peak_rss_mib']:.0f} ({extra:+.0f})")
                else:
                    row.append("")
            for system in diff_columns:
                diff = report["logit_diffs"].get(f"{system}/{batch}x{pos}")
                row.append(f"{diff['max_abs_diff']:.2e}" if workload == "logits" and diff else "")
            rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


ISA_CAP_VARIABLES = (
    "HOOKED_ENCODER_MAX_SIMD",
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
)


def header_lines(report: dict) -> list[str]:
    meta = report["meta"]
    versions = ", ".join(f"{name} {version}" for name, version in meta["versions"].items())
    kernels = {
        system: sorted({cell["cpu_kernels"] for cell in cells.values() if "cpu_kernels" in cell})
        for system, cells in report["cells"].items()
    }
    caps = "".join(f", {name}={value}" for name, value in meta.get("isa_caps", {}).items())
    kernels_used = ", ".join(
        f"{system} {'/'.join(levels)}" for system, levels in kernels.items() if levels
    )
    return [
        f"# hooked_encoder vs peers: {meta['model_shape']} ({meta['model']}), "
        f"seeded random weights (seed {meta['seed']})",
        "",
        f"{meta['date']} | threads: {meta['threads']} | CPU: {meta['cpu']} "
        f"({meta['cpu_count']} logical CPUs, AVX2 {meta.get('avx2', '?')}, AVX-512 "
        f"{meta.get('avx512', '?')}, load average {meta['load_average_at_start']} at start, "
        f"{meta.get('load_average_at_end')} at the end) | kernels: {kernels_used or '?'}{caps} "
        f"| {versions} | python {meta['python']} | commit {meta['commit']}",
        "",
    ]


def notes(report: dict) -> list[str]:
    meta = report["meta"]
    layers = meta["config"]["num_hidden_layers"]
    lines = [
        "",
        "Notes:",
        f"- times: median (min) over the timed calls after warm-up (at most {meta['repeats']} "
        f"calls; at least {meta['min_repeats']}, stopping after {meta['budget']} s); "
        "ratio = peer median / our median (> 1: ours is faster)"
        + (
            "; interleaved run (every system's calls alternated one by one, see --interleave):"
            " ratio = median over rounds of peer time / our time in the same round."
            if meta.get("interleaved")
            else "."
        ),
        "- RSS: peak RSS (VmHWM) of the cell's own process, imports and loading included; (+run) "
        "= peak during the calls minus the RSS after loading the model (weights resident), "
        "before the first call.",
        f"- cache_all: HF = output_hidden_states + output_attentions ({layers + 1} + {layers} "
        "tensors), far fewer than every hook point of ours; see output_arrays and output_mib in "
        "the JSON.",
        f"- hook_pattern: ours/TL hook blocks.{meta['hook_layer']}.attn.hook_pattern; HF: forward "
        f"hook on bert.encoder.layer[{meta['hook_layer']}].attention.self returning its output "
        "(which holds the eager attention probabilities).",
        "- no_head: HF runs model.bert (encoder only); TransformerLens computes the head anyway.",
        "- max abs diff: logits of the same tokens against HF eager float32.",
    ]
    if any(s in report["systems"] for s in SYSTEM_WORKLOADS):
        lines.append(
            "- HF sdpa and ONNX Runtime (ORT) run logits and no_head only. ORT: the same "
            "checkpoint exported by torch.onnx (TorchScript exporter, opset 17), CPU provider, "
            "ORT_ENABLE_ALL, intra-op threads = threads, 1 inter-op thread; ORT fused: that "
            "export after onnxruntime.transformers' BERT fusions (optimize_model, model_type "
            "bert)."
        )
    if any(_cell(cell) for cell in report["cells"].get("tl", {}).values()):
        lines.append(
            "- TL: HookedEncoder built offline from the checkpoint's config, with weights "
            "converted from a BertForPreTraining by TransformerLens's convert_bert_weights; its "
            "peak RSS includes that HF model, held while converting."
        )
    load = meta["load_average_at_start"]
    if load is not None and load >= 0.5:
        lines.append(
            f"- warning: the load average was {load} at the start: other processes compete for "
            "the CPUs, and torch's OpenMP threads slow down badly when they do."
        )
    cells = [cell for system in report["cells"].values() for cell in system.values()]
    if any(cell.get("ok") and not cell.get("peak_reset") for cell in cells):
        lines.append("- warning: VmHWM could not be reset; (+run) includes loading's peak.")
    if any(cell.get("torch_imported") for cell in report["cells"].get("ours", {}).values()):
        lines.append("- warning: torch was imported in our workers; it counts in our RSS.")
    for system, reason in report["skipped"].items():
        lines.append(f"- {SYSTEM_LABELS[system]} skipped: {reason}")
    failed = [
        f"- {SYSTEM_LABELS[system]} {key} failed: {result.get('error')}"
        for system in report["systems"]
        for key, result in report["cells"][system].items()
        if result and not result.get("ok")
    ]
    return lines + failed


def compare_lines(report: dict, old: dict) -> list[str]:
    """new/old median per cell present in both runs."""
    lines = ["", f"## Compared with {old['meta'].get('date')} (new/old median; < 1: faster now)"]
    for field in ("model_shape", "threads", "cpu"):
        if old["meta"].get(field) != report["meta"][field]:
            lines.append(
                f"- warning: {field} differs: old {old['meta'].get(field)!r}, "
                f"new {report['meta'][field]!r}"
            )
    lines += [
        "",
        "| system | workload | shape | old ms | new ms | new/old |",
        "|---|---|---|---|---|---|",
    ]
    for system in report["systems"]:
        for key, cell in report["cells"][system].items():
            before = old.get("cells", {}).get(system, {}).get(key)
            if _cell(cell) and _cell(before):
                workload, shape = key.split("/")
                new, was = cell["median_ms"], before["median_ms"]
                lines.append(
                    f"| {SYSTEM_LABELS[system]} | {workload} | {shape} | {_ms(was)} | {_ms(new)} "
                    f"| {new / was:.2f} |"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--small", action="store_true", help="tiny model (same as --model-shape tiny)"
    )
    parser.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default="bert-base")
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=parse_shapes(DEFAULT_SHAPES),
        help=f"BATCHxPOS list (default {DEFAULT_SHAPES})",
    )
    parser.add_argument("--threads", type=int, default=2, help="threads of every system (2)")
    parser.add_argument(
        "--systems",
        type=lambda text: parse_choices(text, SYSTEMS),
        default=list(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (all)",
    )
    parser.add_argument(
        "--workloads",
        type=lambda text: parse_choices(text, WORKLOADS),
        default=list(WORKLOADS),
        help=f"comma-separated subset of {','.join(WORKLOADS)} (all)",
    )
    parser.add_argument("--repeats", type=int, default=20, help="most timed calls per cell (20)")
    parser.add_argument(
        "--min-repeats", type=int, default=3, help="fewest timed calls per cell (3)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=3.0,
        help="seconds of timed calls per cell after which it stops once --min-repeats are done (3)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="most warm-up calls per cell (3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and tokens (0)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per cell (1200)")
    parser.add_argument("--json", type=Path, help="where to write the raw results")
    parser.add_argument("--compare", type=Path, metavar="OLD.json", help="an earlier --json")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="run a cell's systems at once, one call each in turn (ratios robust to the "
        "machine's speed changing; see run_interleaved)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--build-checkpoint", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build-onnx", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.build_checkpoint:
        build_checkpoint(args.model_shape, args.seed)
        return 0
    if args.build_onnx:
        build_onnx(args.build_onnx)
        return 0
    if args.worker:
        result = worker(json.loads(args.worker))
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return 0

    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    model_shape = "tiny" if args.small else args.model_shape
    config = MODEL_SHAPES[model_shape]
    for _, pos in args.shapes:
        if pos > config["max_position_embeddings"]:
            parser.error(f"positions {pos} exceed {config['max_position_embeddings']}")
    old = json.loads(args.compare.read_text()) if args.compare else None
    checkpoint = ensure_checkpoint(model_shape, args.seed)
    hook_layer = min(3, config["num_hidden_layers"] - 1)
    now = dt.datetime.now()

    skipped: dict[str, str] = {}
    if model_type_of(model_shape) != "bert":
        for system in ("ort", "ort_fused", "tl"):
            if system in args.systems:
                skipped[system] = "its setup here is BERT's (ONNX export, TransformerLens)"
    if "tl" in args.systems and "tl" not in skipped and (reason := tl_unavailable()):
        skipped["tl"] = reason
    for system in ("ort", "ort_fused"):
        if system in args.systems and system not in skipped and (reason := ort_unavailable()):
            skipped[system] = reason
    if any(s in args.systems and s not in skipped for s in ("ort", "ort_fused")):
        ensure_onnx(checkpoint)
    for system, reason in skipped.items():
        log(f"skipping {SYSTEM_LABELS[system]}: {reason}")
    flags = cpu_flags()
    report: dict[str, Any] = {
        "meta": {
            "date": now.isoformat(timespec="seconds"),
            "model_shape": model_shape,
            "model": ", ".join(f"{k}={v}" for k, v in config.items()),
            "config": config,
            "checkpoint": str(checkpoint),
            "seed": args.seed,
            "threads": args.threads,
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "avx2": "yes" if "avx2" in flags else "no",
            "avx512": "yes" if "avx512f" in flags else "no",
            # Variables that cap an instruction set (ours, PyTorch, MKL, oneDNN), as set.
            "isa_caps": {
                name: os.environ[name] for name in ISA_CAP_VARIABLES if name in os.environ
            },
            "load_average_at_start": load_average(),
            "python": platform.python_version(),
            "commit": git_commit(),
            "versions": {
                name: version
                for name in (
                    "hooked-encoder",
                    "torch",
                    "transformers",
                    "transformer-lens",
                    "onnxruntime",
                    "onnx",
                    "numpy",
                )
                if (version := version_of(name))
            },
            "repeats": args.repeats,
            "min_repeats": min(args.min_repeats, args.repeats),
            "budget": args.budget,
            "warmup": args.warmup,
            "hook_layer": hook_layer,
            "interleaved": args.interleave,
        },
        "systems": args.systems,
        "workloads": args.workloads,
        "shapes": args.shapes,
        "skipped": skipped,
        "cells": {system: {} for system in args.systems},
        "logit_diffs": {},
    }

    run_started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hooked-encoder-bench-") as scratch:
        for batch, pos in args.shapes:
            saved: dict[str, Path] = {}
            for workload in args.workloads:
                specs = []
                for system in args.systems:
                    if system in skipped or workload not in SYSTEM_WORKLOADS.get(system, WORKLOADS):
                        continue
                    spec = {
                        "system": system,
                        "workload": workload,
                        "batch": batch,
                        "pos": pos,
                        "checkpoint": str(checkpoint),
                        "vocab": config["vocab_size"],
                        "seed": args.seed,
                        "threads": args.threads,
                        "hook_layer": hook_layer,
                        "repeats": args.repeats,
                        "min_repeats": min(args.min_repeats, args.repeats),
                        "budget": args.budget,
                        "warmup": args.warmup,
                    }
                    if workload == "logits":
                        spec["save_logits"] = str(Path(scratch) / f"{system}-{batch}x{pos}.npy")
                    specs.append(spec)
                started = time.perf_counter()
                if args.interleave:
                    results = run_interleaved(specs, args.threads, args.timeout)
                    tooks = [time.perf_counter() - started] * len(specs)
                else:
                    results, tooks = [], []
                    for spec in specs:
                        started = time.perf_counter()
                        results.append(run_worker(spec, args.threads, args.timeout))
                        tooks.append(time.perf_counter() - started)
                for spec, result, took in zip(specs, results, tooks, strict=True):
                    system, key = spec["system"], f"{workload}/{batch}x{pos}"
                    report["cells"][system][key] = result
                    if result.get("ok"):
                        log(
                            f"{system:>4} {key:<24} median {_ms(result['median_ms']):>7} ms "
                            f"over {len(result['times_ms']):>2} calls, peak "
                            f"{result['peak_rss_mib']:.0f} MiB ({took:.1f} s)"
                        )
                        if spec.get("save_logits"):
                            saved[system] = Path(spec["save_logits"])
                    else:
                        log(f"{system:>4} {key:<24} FAILED: {result.get('error')}")
                        if result.get("phase") == "load":
                            # It cannot load: its other cells would fail the same way.
                            skipped[system] = "could not load; its remaining cells were not run"
            if "hf" in saved:
                for system in saved:
                    if system != "hf":
                        diff, scale = max_abs_diff(saved[system], saved["hf"])
                        report["logit_diffs"][f"{system}/{batch}x{pos}"] = {
                            "max_abs_diff": diff,
                            "max_abs_hf_logit": scale,
                        }
            for path in saved.values():
                path.unlink(missing_ok=True)
    report["meta"]["total_s"] = time.perf_counter() - run_started
    report["meta"]["load_average_at_end"] = load_average()

    output = [*header_lines(report), markdown_table(report), *notes(report)]
    if old is not None:
        output += compare_lines(report, old)
    print("\n".join(output))

    json_path = args.json or RESULTS_DIR / f"compare-{model_shape}-{now:%Y%m%d-%H%M%S}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    log(f"raw results: {json_path} (total {report['meta']['total_s']:.0f} s)")
    # TransformerLens is optional: only failures of ours or HF make the exit status non-zero.
    return int(
        any(
            not result.get("ok")
            for system in ("ours", "hf")
            for result in report["cells"].get(system, {}).values()
        )
    )


if __name__ == "__main__":
    sys.exit(main())
