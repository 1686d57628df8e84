"""Patching sweeps and declarative interventions against the alternatives, each in its own
process (issue 16's benchmark).

    python3 bench/patching_speed.py                      # bert-base shape, 2 threads
    /tmp/tlvenv/bin/python bench/patching_speed.py       # with TransformerLens 3.x's columns
                                                         # (see bench/compare.py for the venv)

Sweeps, at 1x16 (the corrupted and clean inputs are random token ids of one batch shape; the
metric is a logit difference at the last position):

* ``ours``: ``hooked_encoder.patching.get_act_patch_resid_pre`` and
  ``get_act_patch_attn_head_out_by_pos`` (batched forwards from each layer's corrupted
  residual, the patch applied by the Rust pass), with the metric as ``patching.logit_diff``
  (the same value; the sweep then computes the MLM head at the metric's position only);
* ``loop``: the same sweep as one ``run_with_hooks`` per patch with TransformerLens's setter as
  a Python hook (what TransformerLens's functions do, on our model);
* ``tl``: ``transformer_lens.patching``'s functions on TransformerLens's ``HookedEncoder``
  with the same weights (skipped where transformer_lens is not installed).

Memory against chunk size: ``get_act_patch_resid_pre`` at ``--chunk-shape`` (4x32) with
``rows_per_chunk`` each of ``--chunk-rows`` (4, 32, 256), full logits (a plain metric), and the
peak RSS of the sweep over the loaded model's.

Head ablation, at 8x128: a plain forward, the forward with ``iv.zero("blocks.3.attn.hook_z",
heads=5)``, and the same edit as a Python hook.

Each cell reports the median (and min) time over its calls (sweeps: ``--repeats`` calls, no
warm-up call, as one is hundreds of forwards; the ablation: one warm-up call first) and the
process's peak RSS; the sweeps also report the largest difference from ``loop``'s results.
Results go to ``bench/results/patching-*.json`` when ``--json`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare

MARKER = "PATCHING-RESULT "
SWEEPS = ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_by_pos")
SETTERS = {
    "get_act_patch_resid_pre": ("layer_pos_patch_setter", "hook_resid_pre", ("layer", "pos")),
    "get_act_patch_attn_head_out_by_pos": (
        "layer_pos_head_vector_patch_setter",
        "attn.hook_z",
        ("layer", "pos", "head"),
    ),
}


def _metric(logits):
    return logits[:, -1, 1000].mean() - logits[:, -1, 2000].mean()


def _time(call, repeats: int, warmup: bool = True):
    if warmup:
        call()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return times, result


def _loop(model, corrupted, cache, sweep):
    import itertools

    from hooked_encoder import patching

    setter_name, suffix, axes = SETTERS[sweep]
    setter = getattr(patching, setter_name)
    ranges = {"layer": model.cfg.n_layers, "pos": corrupted.shape[1], "head": model.cfg.n_heads}
    shape = tuple(ranges[axis] for axis in axes)
    out = np.zeros(shape, np.float32)
    for index in itertools.product(*(range(n) for n in shape)):
        name = f"blocks.{index[0]}.{suffix}"
        clean = np.asarray(cache[name])

        def hook(activation, hook, index=index, clean=clean):
            return setter(activation, list(index), clean)

        out[index] = _metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]))
    return out


def worker(spec: dict) -> dict:
    checkpoint, cell = spec["checkpoint"], spec["cell"]
    batch, pos = spec["batch"], spec["pos"]
    corrupted = compare._tokens(1, batch, pos, 28996)
    clean = compare._tokens(2, batch, pos, 28996)
    result = None
    if cell.startswith("tl:"):
        import torch
        from transformer_lens import patching as tl_patching

        model, _ = compare.load_tl_model(checkpoint)
        ids, clean_ids = torch.from_numpy(corrupted), torch.from_numpy(clean)
        with torch.no_grad():
            _, cache = model.run_with_cache(clean_ids)
            fn = getattr(tl_patching, cell[3:])
            # A sweep is hundreds of forwards: no warm-up call.
            times, result = _time(lambda: fn(model, ids, cache, _metric), spec["repeats"], False)
        result = result.numpy()
    else:
        from hooked_encoder import HookedEncoder, patching
        from hooked_encoder import interventions as iv

        model = HookedEncoder.from_pretrained(checkpoint)
        if cell.startswith("chunk:"):
            _, cache = model.run_with_cache(clean)
            rows = int(cell.split(":", 1)[1])
            loaded = compare._proc_status_mib("VmRSS")
            compare._reset_peak()  # the peak of the sweep alone, over the loaded model
            call = lambda: patching.get_act_patch_resid_pre(  # noqa: E731
                model, corrupted, cache, _metric, rows_per_chunk=rows
            )
            times, result = _time(call, spec["repeats"], False)
        elif cell.startswith(("ours:", "loop:")):
            _, cache = model.run_with_cache(clean)
            sweep = cell.split(":", 1)[1]
            if cell.startswith("ours:"):
                # The same logit difference as _metric, as the helper that lets a sweep skip
                # the full MLM head.
                fn, metric = getattr(patching, sweep), patching.logit_diff(pos - 1, 1000, 2000)
                call = lambda: fn(model, corrupted, cache, metric)  # noqa: E731
            else:
                call = lambda: _loop(model, corrupted, cache, sweep)  # noqa: E731
            times, result = _time(call, spec["repeats"], False)
        else:  # ablation:{plain,declarative,hook}
            kind = cell.split(":", 1)[1]
            name = "blocks.3.attn.hook_z"

            def zero_head(z, hook):
                z[:, :, 5] = 0
                return z

            calls = {
                "plain": lambda: model(corrupted),
                "declarative": lambda: model.run_with_interventions(
                    corrupted, [iv.zero(name, heads=5)]
                ),
                "hook": lambda: model.run_with_hooks(corrupted, fwd_hooks=[(name, zero_head)]),
            }
            times, _ = _time(calls[kind], spec["repeats"])
    out = {
        **(
            {"run_peak_over_loaded_mib": compare._peak_mib() - loaded}
            if cell.startswith("chunk:")
            else {}
        ),
        "cell": cell,
        "median_ms": 1000 * statistics.median(times),
        "min_ms": 1000 * min(times),
        "calls": len(times),
        "peak_rss_mib": compare._peak_mib(),
    }
    if result is not None:
        np.save(spec["result_path"], np.asarray(result, np.float32))
    return out


def run(spec: dict, threads: int) -> dict:
    env = dict(os.environ)
    for var in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"cell": spec["cell"], "error": f"exit {done.returncode}: {tail}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="calls per sweep cell (1)")
    parser.add_argument("--ablation-repeats", type=int, default=5, help="calls per ablation cell")
    parser.add_argument("--sweep-shape", default="1x16", help="BATCHxPOS of the sweeps")
    parser.add_argument("--ablation-shape", default="8x128", help="BATCHxPOS of the ablation")
    parser.add_argument("--chunk-shape", default="4x32", help="BATCHxPOS of the chunk cells")
    parser.add_argument("--chunk-rows", default="4,32,256", help="rows_per_chunk values")
    parser.add_argument(
        "--only", choices=("sweeps", "chunks", "ablation"), help="run one group of cells"
    )
    parser.add_argument(
        "--systems", default="ours,loop,tl", help="sweep columns to run (ours,loop,tl)"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(MARKER + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    checkpoint = str(compare.ensure_checkpoint("bert-base", 0))
    scratch = compare.CACHE_DIR / "patching"
    scratch.mkdir(parents=True, exist_ok=True)
    (sb, sp), (ab, ap) = (
        compare.parse_shapes(args.sweep_shape)[0],
        compare.parse_shapes(args.ablation_shape)[0],
    )
    cb, cp = compare.parse_shapes(args.chunk_shape)[0]
    tl_missing = compare.tl_unavailable()
    systems = set(args.systems.split(","))
    groups = {
        "sweeps": [
            (f"{system}:{sweep}", sb, sp)
            for sweep in SWEEPS
            for system in ("ours", "loop")
            if system in systems
        ]
        + (
            [(f"tl:{sweep}", sb, sp) for sweep in SWEEPS]
            if tl_missing is None and "tl" in systems
            else []
        ),
        "chunks": [(f"chunk:{int(rows)}", cb, cp) for rows in args.chunk_rows.split(",")],
        "ablation": [(f"ablation:{kind}", ab, ap) for kind in ("plain", "declarative", "hook")],
    }
    cells = [cell for name, group in groups.items() if args.only in (None, name) for cell in group]
    results = []
    for cell, batch, pos in cells:
        spec = {
            "checkpoint": checkpoint,
            "cell": cell,
            "batch": batch,
            "pos": pos,
            "repeats": args.ablation_repeats if cell.startswith("ablation") else args.repeats,
            "result_path": str(scratch / f"{cell.replace(':', '-')}.npy"),
        }
        result = run(spec, args.threads)
        print(json.dumps(result), flush=True)
        results.append(result)
    for result in results:
        system, _, sweep = result["cell"].partition(":")
        if "error" not in result and system in ("ours", "tl"):
            reference = scratch / f"loop-{sweep}.npy"
            if reference.is_file():
                mine = np.load(scratch / f"{system}-{sweep}.npy")
                result["max_abs_diff_vs_loop"] = float(np.abs(mine - np.load(reference)).max())
                print(
                    f"# {result['cell']}: max abs diff vs loop {result['max_abs_diff_vs_loop']:.2e}"
                )
    report = {
        "cpu": compare.cpu_model(),
        "avx512": any(flag.startswith("avx512") for flag in compare.cpu_flags()),
        "threads": args.threads,
        "python": platform.python_version(),
        "commit": compare.git_commit(),
        "transformer_lens": (
            None if tl_missing or "tl" not in systems else compare.version_of("transformer-lens")
        ),
        "results": results,
    }
    if tl_missing:
        print(f"# TransformerLens columns skipped: {tl_missing}")
    by_cell = {r["cell"]: r for r in results if "median_ms" in r}
    for sweep in SWEEPS:
        ours, loop, tl = (by_cell.get(f"{s}:{sweep}") for s in ("ours", "loop", "tl"))
        if ours and loop:
            line = f"{sweep}: ours {ours['median_ms']:.0f} ms, loop {loop['median_ms']:.0f} ms "
            line += f"({loop['median_ms'] / ours['median_ms']:.1f}x)"
            if tl:
                line += f", TransformerLens {tl['median_ms']:.0f} ms "
                line += f"({tl['median_ms'] / ours['median_ms']:.1f}x)"
            print(line)
    plain, declared, hooked = (
        by_cell.get(f"ablation:{k}") for k in ("plain", "declarative", "hook")
    )
    if plain and declared and hooked:
        print(
            f"head ablation at {args.ablation_shape}: plain {plain['median_ms']:.0f} ms, "
            f"declarative {declared['median_ms']:.0f} ms "
            f"({declared['median_ms'] / plain['median_ms'] - 1:+.1%}), Python hook "
            f"{hooked['median_ms']:.0f} ms ({hooked['median_ms'] / plain['median_ms'] - 1:+.1%})"
        )
    for result in results:
        if result["cell"].startswith("chunk:") and "median_ms" in result:
            print(
                f"get_act_patch_resid_pre at {args.chunk_shape}, rows_per_chunk "
                f"{result['cell'][6:]}: {result['median_ms']:.0f} ms, peak RSS "
                f"{result['run_peak_over_loaded_mib']:.0f} MiB over the loaded model"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
