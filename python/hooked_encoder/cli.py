"""``hooked-encoder``: extract activations, inspect a model's hook points, fill masks, and draw
attention patterns, from the command line.

Mistakes (a bad path, an unknown hook pattern, a missing field) print one line saying what is
wrong and how to fix it, and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .corpus import CorpusError, open_lines, records
from .hook_points import describe_hook
from .loading import DEFAULT_MODEL


class UserError(Exception):
    """A mistake of the caller's, reported in one line."""


def _load(name: str):
    from . import CheckpointError, HookedEncoder

    try:
        return HookedEncoder.from_pretrained(name)
    except CheckpointError as e:
        raise UserError(str(e)) from None


def _read_texts(path: str, field: str | None) -> Iterator[str]:
    stream = sys.stdin if path == "-" else None
    if stream is None and not Path(path).is_file():
        raise UserError(f"input file {path} does not exist")
    suffix = Path(path).suffix.lower() if path != "-" else ""
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading Parquet needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path)
        if field not in table.column_names:
            raise UserError(
                f"--text-field {field!r} is not a column of {path}; columns: {table.column_names}"
            )
        yield from (str(v) for v in table.column(field).to_pylist())
        return
    handle = stream or open_lines(path)
    with handle:
        if suffix == ".csv":
            reader = csv.DictReader(handle)
            if field not in (reader.fieldnames or []):
                raise UserError(
                    f"--text-field {field!r} is not a column of {path}; columns: "
                    f"{reader.fieldnames}"
                )
            yield from (row[field] for row in reader)
            return
        try:
            yield from records(handle, suffix, field, path)
        except CorpusError as e:
            raise UserError(str(e)) from None


def _cmd_extract(args: argparse.Namespace) -> None:
    from . import set_num_threads

    start = time.perf_counter()
    if args.engine == "ray":
        out = _extract_on_ray(args)
    else:
        if args.workers is not None:
            raise UserError("--workers needs --engine ray")
        if args.threads:
            set_num_threads(args.threads)
        model = _load(args.model)
        try:
            out = model.extract(
                _read_texts(args.input, args.text_field),
                args.hooks,
                batch_size=args.batch_size,
                max_length=args.max_length,
                pooling=args.pooling,
                out=args.out,
                shard_rows=args.shard_rows,
                progress=False if args.no_progress else None,
            )
        except KeyError as e:
            raise UserError(str(e.args[0])) from None
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    texts = sum(s["rows"][1] - s["rows"][0] for s in manifest["shards"])
    tokens = sum(s["tokens"] for s in manifest["shards"])
    seconds = time.perf_counter() - start
    print(
        f"extracted {len(manifest['arguments']['hooks'])} hooks from {texts} texts "
        f"({tokens} tokens) in {seconds:.1f} s ({texts / max(seconds, 1e-9):.1f} texts/s) "
        f"into {out}"
    )


def _extract_on_ray(args: argparse.Namespace) -> Path:
    """``extract --engine ray``: a Ray cluster at ``RAY_ADDRESS`` when set, else a local one;
    ``--workers`` actors of ``--threads`` CPUs (and threads) each."""
    import os

    from .ray import extract_ray, require_ray

    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    try:
        # A Parquet, text or JSON-lines file is read by the actors, window by window; standard
        # input and CSV pass through the driver.
        described = args.input != "-" and Path(args.input).suffix.lower() != ".csv"
        return extract_ray(
            [Path(args.input)] if described else _read_texts(args.input, args.text_field),
            model=args.model,
            hooks=args.hooks,
            out=args.out,
            pooling=args.pooling,
            batch_size=args.batch_size,
            max_length=args.max_length,
            shard_rows=args.shard_rows,
            text_column=args.text_field,
            concurrency=args.workers or 1,
            num_cpus=args.threads or 1,
            progress=not args.no_progress,
        )
    except KeyError as e:
        raise UserError(str(e.args[0])) from None
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


def _cmd_encode(args: argparse.Namespace) -> None:
    import numpy as np

    from . import set_num_threads

    suffix = Path(args.out).suffix.lower()
    if suffix not in (".npy", ".parquet"):
        raise UserError(f"--out must end in .npy or .parquet, got {args.out}")
    if args.threads:
        set_num_threads(args.threads)
    model = _load(args.model)
    texts = list(_read_texts(args.input, args.text_field))
    start = time.perf_counter()
    embeddings = model.encode(
        texts,
        batch_size=args.batch_size,
        normalize_embeddings=args.normalize,
        show_progress_bar=False if args.no_progress else sys.stderr.isatty(),
    )
    seconds = time.perf_counter() - start
    if suffix == ".npy":
        np.save(args.out, embeddings)
    else:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("writing Parquet needs pyarrow: pip install pyarrow") from None
        column = pa.FixedSizeListArray.from_arrays(
            pa.array(embeddings.reshape(-1)), embeddings.shape[1]
        )
        pq.write_table(pa.table({"embedding": column}), args.out)
    print(
        f"encoded {len(texts)} texts into {embeddings.shape[1]}-dimensional embeddings in "
        f"{seconds:.1f} s ({len(texts) / max(seconds, 1e-9):.1f} texts/s) into {args.out}"
    )


def _cmd_info(args: argparse.Namespace) -> None:
    model = _load(args.model)
    print(f"model: {args.model}")
    for key, value in model.cfg.to_dict().items():
        print(f"  {key}: {value}")
    head = (
        "MLM head"
        if model.has_mlm_head
        else "ELECTRA discriminator (replaced-token logits, [batch, pos])"
        if model.has_discriminator
        else "none (an encoder: return_type=None)"
    )
    print(f"  head: {head}")
    print("\nhook points (firing order):")
    width = max(len(n) for n in model.hook_dict)
    for name in model.hook_dict:
        shape, meaning = describe_hook(name, model.cfg)
        print(f"  {name:<{width}}  {shape:<28}  {meaning}")


def _cmd_fill_mask(args: argparse.Namespace) -> None:
    import numpy as np

    model = _load(args.model)
    if not model.has_mlm_head:
        raise UserError(
            f"{args.model} has no MLM head, so it cannot fill masks; use a checkpoint with one "
            "(BertForMaskedLM, RobertaForMaskedLM, ...)"
        )
    tokens = model.to_tokens(args.text)[0]
    mask_id = model.tokenizer.mask_token_id
    positions = np.flatnonzero(tokens[0] == mask_id)
    if positions.size == 0:
        raise UserError("the text has no mask token ([MASK], or <mask> for RoBERTa)")
    logits = model(tokens)[0]
    mask_token = model.tokenizer.ids_to_tokens([mask_id])[0]
    for position in positions:
        row = logits[position].astype(np.float64)
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        best = np.argsort(-probs)[: args.top_k]
        words = model.tokenizer.ids_to_tokens(list(best))
        print(
            f"{mask_token} at {position}: "
            + ", ".join(f"{w} ({probs[i]:.3f})" for w, i in zip(words, best, strict=True))
        )


def _cmd_attention(args: argparse.Namespace) -> None:
    from .plot import plot_attention

    model = _load(args.model)
    if not 0 <= args.layer < model.cfg.n_layers:
        raise UserError(f"--layer must be between 0 and {model.cfg.n_layers - 1}")
    if args.head is not None and not 0 <= args.head < model.cfg.n_heads:
        raise UserError(f"--head must be between 0 and {model.cfg.n_heads - 1}")
    plot_attention(model, args.text, args.layer, args.head, args.out)
    print(f"wrote {args.out}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hooked-encoder", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def with_model(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--model",
            default=DEFAULT_MODEL,
            help=f"checkpoint directory or name (default: {DEFAULT_MODEL})",
        )
        return p

    def with_corpus(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--input",
            required=True,
            help="text file (one per line), .jsonl, .csv, .parquet, or - for standard input",
        )
        p.add_argument(
            "--text-field", default="text", help="field holding the text (JSONL/CSV/Parquet)"
        )

    p = with_model(commands.add_parser("extract", help="extract activations of many texts"))
    with_corpus(p)
    p.add_argument("--hooks", nargs="+", required=True, help="hook names or glob patterns")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--pooling", choices=["mean", "cls", "max"])
    p.add_argument("--threads", type=int, help="threads (with --engine ray: per worker)")
    p.add_argument("--max-length", type=int)
    p.add_argument("--shard-rows", type=int, default=1024, help="input rows per shard file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process; ray: Ray Data actors (RAY_ADDRESS when set, else a local "
        "cluster), same output",
    )
    p.add_argument("--workers", type=int, help="Ray actors (with --engine ray; default 1)")
    p.set_defaults(run=_cmd_extract)

    p = with_model(commands.add_parser("encode", help="sentence embeddings, as encode()"))
    with_corpus(p)
    p.add_argument("--out", required=True, help="embeddings.npy or embeddings.parquet")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--normalize", action="store_true", help="unit-length embeddings")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_encode)

    p = with_model(commands.add_parser("info", help="config and hook points of a model"))
    p.set_defaults(run=_cmd_info)

    p = with_model(commands.add_parser("fill-mask", help="top predictions for [MASK] tokens"))
    p.add_argument("text")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(run=_cmd_fill_mask)

    p = with_model(commands.add_parser("attention", help="draw an attention pattern"))
    p.add_argument("text")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--head", type=int, help="one head (default: the mean over heads)")
    p.add_argument("--out", required=True, help="image file, e.g. pattern.png")
    p.set_defaults(run=_cmd_attention)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"hooked-encoder: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"hooked-encoder: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
