"""Damaged and hostile checkpoints: every bad config.json or model.safetensors is refused with an
exception of a documented type whose message names the file and the problem, and fuzzed files
never crash the process or escape as another exception type (a Rust panic, an OverflowError...).

The safetensors layout: an 8-byte little-endian u64 header length N, N bytes of JSON header
``{"name": {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {...}}``, then the
data buffer that the offsets index."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import ATOL, RTOL
from hooked_encoder import CheckpointError, HookedEncoder, HookedEncoderError

# What loading an untrusted checkpoint may raise. Anything else (pyo3's PanicException, which
# derives from BaseException, an OverflowError, a RecursionError ...) is a bug.
ALLOWED = (CheckpointError, HookedEncoderError, ValueError, TypeError, KeyError)

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

WEIGHTS, CONFIG = "model.safetensors", "config.json"


# --------------------------------------------------------------------------- helpers


def split(raw: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and data buffer."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict | bytes, data: bytes) -> bytes:
    """A safetensors file from a header (a dict, or the JSON bytes as they are) and data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def tensor_names(header: dict) -> list[str]:
    """The tensor names of a header, in the order of their data."""
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"][0])


def pack(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A well-formed safetensors file from ``{name: (dtype, shape, raw bytes)}``."""
    header: dict = {"__metadata__": {"format": "pt"}}
    buffer = b""
    for name, (dtype, shape, payload) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(buffer), len(buffer) + len(payload)],
        }
        buffer += payload
    return join(header, buffer)


def unpack(raw: bytes) -> dict[str, tuple[str, list[int], bytes]]:
    header, data = split(raw)
    return {
        name: (
            header[name]["dtype"],
            header[name]["shape"],
            data[slice(*header[name]["data_offsets"])],
        )
        for name in tensor_names(header)
    }


def load(directory: Path):
    """``from_pretrained`` with the unused-tensor warning silenced (the suite turns warnings into
    errors, and a fuzzed file may well hold extra tensors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HookedEncoder.from_pretrained(directory)


def load_refused(directory: Path, error: type[BaseException], *patterns: str) -> str:
    """Loads ``directory``, expecting ``error`` whose message contains every regex in
    ``patterns``; returns the message."""
    with pytest.raises(error) as info:
        load(directory)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    return message


def check_untrusted_load(directory: Path, names_file: str) -> None:
    """The fuzz property: loading either works (and the model then runs) or raises one of
    ALLOWED; a CheckpointError names ``names_file`` (a file, or the checkpoint directory)."""
    try:
        model = load(directory)
    except BaseException as e:  # PanicException is a BaseException
        if not isinstance(e, ALLOWED):
            raise AssertionError(
                f"loading raised {type(e).__module__}.{type(e).__name__}: {e}"
            ) from e
        if isinstance(e, CheckpointError):
            assert names_file in str(e), f"the message does not name {names_file}: {e}"
        return
    tokens = np.arange(3, dtype=np.int64)[None, :] % model.cfg.d_vocab
    logits = model(tokens) if model.has_mlm_head else None
    if logits is not None:
        assert logits.shape == (1, 3, model.cfg.d_vocab)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def ckpt(checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint's config.json and model.safetensors."""
    target = tmp_path / "ckpt"
    target.mkdir()
    for name in (CONFIG, WEIGHTS):
        shutil.copy(checkpoint.path / name, target / name)
    return target


@pytest.fixture(scope="module")
def fuzz_dir(checkpoint, tmp_path_factory) -> Path:
    """A checkpoint directory that the fuzz tests overwrite one file of, example after example
    (hypothesis cannot use function-scoped fixtures such as tmp_path)."""
    target = tmp_path_factory.mktemp("fuzz")
    for name in (CONFIG, WEIGHTS):
        shutil.copy(checkpoint.path / name, target / name)
    return target


@pytest.fixture(scope="module")
def valid_weights(checkpoint) -> bytes:
    return (checkpoint.path / WEIGHTS).read_bytes()


def test_the_undamaged_copy_loads_and_matches_hugging_face(ckpt, checkpoint):
    """The baseline that every damaged variant below starts from."""
    tokens, types, mask = checkpoint.batch(seed=5)
    ours = load(ckpt)(tokens, token_type_ids=types, one_zero_attention_mask=mask)
    hf = checkpoint.hf_logits(tokens, types, mask)
    np.testing.assert_allclose(ours, hf, atol=ATOL, rtol=RTOL)
    # Rewriting the file through split/join (as the tests below do) changes nothing.
    header, data = split((ckpt / WEIGHTS).read_bytes())
    (ckpt / WEIGHTS).write_bytes(join(header, data))
    np.testing.assert_array_equal(
        load(ckpt)(tokens, token_type_ids=types, one_zero_attention_mask=mask), ours
    )


# --------------------------------------------------------------------------- model.safetensors


def damage_weights(ckpt: Path, make) -> str:
    """Replaces model.safetensors by ``make(raw, header, data)``; returns the file's path as the
    message must show it."""
    path = ckpt / WEIGHTS
    raw = path.read_bytes()
    header, data = split(raw)
    path.write_bytes(make(raw, header, data))
    return str(path)


def first_tensor(header: dict) -> str:
    return tensor_names(header)[0]


def edited(header: dict, name_of, field: str, value) -> dict:
    header = json.loads(json.dumps(header))
    header[name_of(header)][field] = value
    return header


NOT_VALID = r"is not a valid safetensors file: "

SAFETENSORS_DAMAGE = {
    "header length larger than the file": (
        lambda raw, h, d: struct.pack("<Q", len(raw)) + raw[8:],
        "invalid header length",
    ),
    "header length 2**63": (
        lambda raw, h, d: struct.pack("<Q", 2**63) + raw[8:],
        "header too large",
    ),
    "header length 2**64 - 1": (
        lambda raw, h, d: struct.pack("<Q", 2**64 - 1) + raw[8:],
        "header too large",
    ),
    "header length 0": (lambda raw, h, d: struct.pack("<Q", 0) + raw[8:], "invalid JSON in header"),
    "first tensor's offsets past the end of the data": (
        lambda raw, h, d: join(edited(h, first_tensor, "data_offsets", [len(d), len(d) + 64]), d),
        r"invalid offset for tensor `bert\.",
    ),
    "last tensor's end past the end of the file": (
        lambda raw, h, d: join(
            edited(
                h,
                lambda h: tensor_names(h)[-1],
                "data_offsets",
                [h[tensor_names(h)[-1]]["data_offsets"][0], len(d) + 64],
            ),
            d,
        ),
        "invalid shape, data type, or offset for tensor",
    ),
    "data offsets 2**64 - 1": (
        lambda raw, h, d: join(edited(h, first_tensor, "data_offsets", [0, 2**64 - 1]), d),
        "invalid offset|invalid shape, data type, or offset",
    ),
    "two tensors on the same bytes": (
        lambda raw, h, d: join(
            edited(
                h,
                lambda h: tensor_names(h)[1],
                "data_offsets",
                h[tensor_names(h)[0]]["data_offsets"],
            ),
            d,
        ),
        "invalid offset for tensor",
    ),
    "a tensor overlapping the previous one by 4 bytes": (
        lambda raw, h, d: join(
            edited(
                h,
                lambda h: tensor_names(h)[1],
                "data_offsets",
                [
                    h[tensor_names(h)[1]]["data_offsets"][0] - 4,
                    h[tensor_names(h)[1]]["data_offsets"][1],
                ],
            ),
            d,
        ),
        "invalid offset for tensor",
    ),
    "dtype F33": (
        lambda raw, h, d: join(edited(h, first_tensor, "dtype", "F33"), d),
        "unknown variant `F33`",
    ),
    "dtype that does not fit the bytes (F16 over F32 data)": (
        lambda raw, h, d: join(edited(h, first_tensor, "dtype", "F16"), d),
        "invalid shape, data type, or offset for tensor",
    ),
    "shape whose element count overflows 64 bits": (
        lambda raw, h, d: join(edited(h, first_tensor, "shape", [2**32, 2**32, 2]), d),
        "overflow computing buffer size",
    ),
    "shape [2**63, 4]": (
        lambda raw, h, d: join(edited(h, first_tensor, "shape", [2**63, 4]), d),
        "overflow computing buffer size",
    ),
    "negative shape": (
        lambda raw, h, d: join(edited(h, first_tensor, "shape", [-1]), d),
        "invalid JSON in header: invalid value: integer `-1`",
    ),
    "tensor entry without a dtype": (
        lambda raw, h, d: join(edited(h, first_tensor, "dtype", None), d),
        "invalid JSON in header",
    ),
    "truncated in the data": (lambda raw, h, d: raw[:-5], "incomplete metadata"),
    "truncated in the header": (lambda raw, h, d: raw[: len(raw) // 10], "invalid header length"),
    "truncated in the length prefix": (lambda raw, h, d: raw[:5], "header too small"),
    "non-JSON header": (lambda raw, h, d: join(b"{not json at all}", d), "invalid JSON in header"),
    "header that is a JSON array": (
        lambda raw, h, d: join(b"[1, 2, 3]", d),
        "invalid JSON in header: invalid type: sequence",
    ),
    "header that is not UTF-8": (
        lambda raw, h, d: join(json.dumps(h).encode().replace(b'"F32"', b'"F\xff32"', 1), d),
        "invalid UTF-8 in header",
    ),
    "__metadata__ with a non-string value": (
        lambda raw, h, d: join({**h, "__metadata__": {"format": 3}}, d),
        "invalid JSON in header: invalid type: integer `3`, expected a string",
    ),
    "empty file": (lambda raw, h, d: b"", "header too small"),
}


@pytest.mark.parametrize("damage", sorted(SAFETENSORS_DAMAGE))
def test_damaged_safetensors_are_refused_naming_the_file_and_problem(ckpt, damage):
    make, problem = SAFETENSORS_DAMAGE[damage]
    path = damage_weights(ckpt, make)
    message = load_refused(ckpt, CheckpointError, NOT_VALID + ".*(" + problem + ")")
    assert message.startswith(path), message


def test_an_empty_header_names_what_a_bert_checkpoint_needs(ckpt):
    path = damage_weights(ckpt, lambda raw, h, d: join({}, b""))
    load_refused(ckpt, CheckpointError, "holds no BERT weights", "word_embeddings", path)


def test_a_duplicated_tensor_name_in_the_header_is_refused(ckpt):
    """JSON allows a repeated key: a second entry for the first tensor that points at the second
    tensor's bytes must not make either copy readable. (Built as text, since a dict cannot hold
    a key twice.)"""

    def make(raw, header, data):
        first, second = tensor_names(header)[:2]
        duplicate = {**header[first], "data_offsets": header[second]["data_offsets"]}
        text = json.dumps(header).encode()
        return join(text[:-1] + b", " + json.dumps({first: duplicate}).encode()[1:], data)

    path = damage_weights(ckpt, make)
    load_refused(ckpt, CheckpointError, NOT_VALID, path)


@pytest.mark.parametrize("dtype, size", [("BOOL", 1), ("I8", 1), ("U64", 8), ("C64", 8)])
def test_unsupported_dtypes_name_the_tensor_and_file(ckpt, dtype, size):
    """Well-formed files whose tensor has a dtype the loader cannot convert to float32."""
    path = ckpt / WEIGHTS
    tensors = unpack(path.read_bytes())
    name = "bert.embeddings.LayerNorm.bias"
    tensors[name] = (dtype, [16], b"\x01" * (16 * size))
    path.write_bytes(pack(tensors))
    load_refused(
        ckpt, CheckpointError, f'tensor "{name}" in {path}', f"unsupported safetensor dtype {dtype}"
    )


@pytest.mark.parametrize(
    "dtype, nbytes", [("F4", 8), ("F6_E2M3", 12), ("F6_E3M2", 12), ("F8_E8M0", 16)]
)
def test_storage_only_float_dtypes_are_a_checkpoint_error_naming_the_tensor(ckpt, dtype, nbytes):
    path = ckpt / WEIGHTS
    tensors = unpack(path.read_bytes())
    name = "bert.embeddings.LayerNorm.bias"
    tensors[name] = (dtype, [16], b"\x3c" * nbytes)
    path.write_bytes(pack(tensors))
    message = load_refused(ckpt, CheckpointError, f'tensor "{name}" in {path}', dtype)
    assert "backtrace" not in message.lower() and "candle_core::" not in message


@pytest.mark.parametrize("dtype, itemsize", [("F16", 2), ("BF16", 2), ("F64", 8), ("F8_E4M3", 1)])
def test_other_float_dtypes_load(ckpt, dtype, itemsize):
    """The converting path is not an error path: a LayerNorm bias of 0.5s in another float
    type loads as float32 0.5s (0.5 is exact in all of them)."""
    import torch

    path = ckpt / WEIGHTS
    tensors = unpack(path.read_bytes())
    name = "bert.embeddings.LayerNorm.bias"
    torch_dtype = {
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F64": torch.float64,
        "F8_E4M3": torch.float8_e4m3fn,
    }[dtype]
    halves = torch.full((16,), 0.5).to(torch_dtype)
    tensors[name] = (dtype, [16], halves.view(torch.uint8).numpy().tobytes())
    assert len(tensors[name][2]) == 16 * itemsize
    path.write_bytes(pack(tensors))
    model = load(ckpt)
    np.testing.assert_array_equal(model.state_dict()["embed.ln.b"], np.full(16, 0.5, np.float32))


# --------------------------------------------------------------------------- config.json


def write_config(ckpt: Path, content) -> str:
    path = ckpt / CONFIG
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return str(path)


def edit_config(ckpt: Path, **changes) -> dict:
    config = json.loads((ckpt / CONFIG).read_text())
    for key, value in changes.items():
        if value is DROP:
            del config[key]
        else:
            config[key] = value
    write_config(ckpt, config)
    return config


DROP = object()

CONFIG_DAMAGE = [
    # (changes, exception, regexes the message must match)
    ({"hidden_size": "768"}, TypeError, ["config.json field hidden_size must be an int", "'768'"]),
    (
        {"num_hidden_layers": 2.5},
        TypeError,
        ["config.json field num_hidden_layers must be an int", "2.5"],
    ),
    ({"num_hidden_layers": 2.0}, TypeError, ["config.json field num_hidden_layers must be an int"]),
    ({"vocab_size": [50]}, TypeError, [r"config.json field vocab_size must be an int, got \[50\]"]),
    (
        {"intermediate_size": None},
        TypeError,
        ["config.json field intermediate_size must be an int"],
    ),
    ({"hidden_size": True}, TypeError, ["config.json field hidden_size must be an int, got True"]),
    ({"type_vocab_size": "2"}, TypeError, ["config.json field type_vocab_size must be an int"]),
    ({"layer_norm_eps": "1e-12"}, TypeError, ["config.json field layer_norm_eps must be a number"]),
    ({"architectures": 5}, TypeError, ["config.json field architectures must be a list"]),
    ({"architectures": {"a": 1}}, TypeError, ["config.json field architectures must be a list"]),
    ({"hidden_size": -16}, ValueError, ["config.json field hidden_size must be positive, got -16"]),
    (
        {"num_attention_heads": -2},
        ValueError,
        ["config.json field num_attention_heads must be positive"],
    ),
    ({"vocab_size": -1}, ValueError, ["config.json field vocab_size must be positive, got -1"]),
    (
        {"max_position_embeddings": -12},
        ValueError,
        ["config.json field max_position_embeddings must be positive"],
    ),
    (
        {"layer_norm_eps": -1e-12},
        ValueError,
        ["config.json field layer_norm_eps must be positive and finite"],
    ),
    ({"hidden_size": 0}, ValueError, ["config.json field hidden_size must be positive, got 0"]),
    (
        {"num_attention_heads": 0},
        ValueError,
        ["config.json field num_attention_heads must be positive"],
    ),
    (
        {"num_hidden_layers": 0},
        ValueError,
        ["config.json field num_hidden_layers must be positive"],
    ),
    (
        {"intermediate_size": 0},
        ValueError,
        ["config.json field intermediate_size must be positive"],
    ),
    ({"vocab_size": 0}, ValueError, ["config.json field vocab_size must be positive"]),
    ({"type_vocab_size": 0}, ValueError, ["config.json field type_vocab_size must be positive"]),
    ({"layer_norm_eps": 0}, ValueError, ["config.json field layer_norm_eps must be positive"]),
    (
        {"hidden_size": 10**12},
        ValueError,
        ["config.json field hidden_size = 1000000000000 is too large"],
    ),
    ({"vocab_size": 2**40}, ValueError, [f"config.json field vocab_size = {2**40} is too large"]),
    (
        {"num_hidden_layers": 2**64},
        ValueError,
        ["config.json field num_hidden_layers = .* is too large"],
    ),
    (
        {"intermediate_size": 10**400},
        ValueError,
        ["config.json field intermediate_size = .* is too large"],
    ),
    # A 400-digit integer cannot become a float: this was an OverflowError.
    (
        {"layer_norm_eps": 10**400},
        ValueError,
        ["config.json field layer_norm_eps must be positive and finite"],
    ),
    (
        {"num_attention_heads": 3},
        ValueError,
        [
            r"config.json field hidden_size \(16\) must be a positive multiple of "
            r"num_attention_heads \(3\)"
        ],
    ),
    ({"hidden_size": DROP}, ValueError, [r"config.json is missing \['hidden_size'\]"]),
    (
        {"vocab_size": DROP, "num_hidden_layers": DROP},
        ValueError,
        [r"config.json is missing \['num_hidden_layers', 'vocab_size'\]"],
    ),
]


@pytest.mark.parametrize(
    "changes, error, patterns", CONFIG_DAMAGE, ids=[repr(c)[:60] for c, *_ in CONFIG_DAMAGE]
)
def test_bad_config_values_name_the_file_field_and_problem(ckpt, changes, error, patterns):
    edit_config(ckpt, **changes)
    load_refused(ckpt, error, *patterns)


def test_sizes_at_the_limit_fail_on_the_weights_without_allocating(ckpt):
    """2**24 everywhere passes the config checks; the mismatch with the tiny tensors is found
    from the header shapes alone, before any [2**24, 2**24] tensor could be allocated."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    edit_config(
        ckpt,
        hidden_size=2**24,
        num_attention_heads=1,
        vocab_size=2**24,
        intermediate_size=2**24,
        max_position_embeddings=2**24,
        num_hidden_layers=2**24,
        type_vocab_size=2**24,
    )
    load_refused(
        ckpt,
        CheckpointError,
        r'tensor "bert.embeddings.word_embeddings.weight" in .*model.safetensors has shape '
        r"\[50, 16\], but the config needs \[16777216, 16777216\]",
    )
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200 * 1024, f"peak memory grew by {grown_kib} KiB"


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"[]", "does not hold a JSON object"),
        (b'[{"hidden_size": 16}]', "does not hold a JSON object"),
        (b'"bert"', "does not hold a JSON object"),
        (b"null", "does not hold a JSON object"),
        (b"", "cannot read .*: Expecting value"),
        (
            b'{"hidden_size": 16, "model_type": "b\xffrt"}',
            "cannot read .*'utf-8' codec can't decode",
        ),
        (b"\xff\xfe{\x00}\x00", "cannot read .*'utf-8' codec can't decode"),
        # json's C decoder raises RecursionError on deep nesting; it was not caught.
        (b"[" * 100_000 + b"]" * 100_000, "cannot read .*recursion"),
        (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "cannot read .*recursion"),
    ],
    ids=[
        "array",
        "array of object",
        "string",
        "null",
        "empty",
        "bad utf-8",
        "utf-16",
        "deep [",
        "deep {",
    ],
)
def test_config_files_that_are_not_a_json_object(ckpt, content, pattern):
    path = write_config(ckpt, content)
    message = load_refused(ckpt, CheckpointError, pattern)
    assert path in message


# --------------------------------------------------------------------------- fuzzing

REAL_NAMES = [
    "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight",
    "bert.embeddings.LayerNorm.weight",
    "bert.embeddings.LayerNorm.bias",
    "embeddings.word_embeddings.weight",
    "bert.encoder.layer.0.attention.self.query.weight",
    "cls.predictions.bias",
    "cls.predictions.transform.dense.weight",
    "__metadata__",
]
DTYPES = [
    "F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2", "F4", "F6_E2M3", "F6_E3M2", "F8_E8M0",
    "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL", "C64",
]  # fmt: skip
# Bytes per element (F4 and F6 pack several elements per byte).
ITEMSIZE = {
    "F32": 4, "F16": 2, "BF16": 2, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F4": 0.5,
    "F6_E2M3": 0.75, "F6_E3M2": 0.75, "F8_E8M0": 1, "I8": 1, "U8": 1, "I16": 2, "U16": 2,
    "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1, "C64": 8,
}  # fmt: skip

BIG = st.sampled_from([2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30])
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | BIG
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
sizes = st.integers(0, 80) | st.integers(-3, -1) | BIG
tensor_entry = (
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(DTYPES) | st.text(max_size=6),
            "shape": st.lists(sizes, max_size=4),
            "data_offsets": st.lists(
                st.integers(0, 30_000) | BIG | st.integers(-2, -1), max_size=3
            ),
        }
    )
    | json_values
)
random_headers = st.dictionaries(
    st.sampled_from(REAL_NAMES) | st.text(max_size=12), tensor_entry, max_size=6
)

# One mutation of the valid file; positions are taken modulo the relevant length, so that the
# strategies do not depend on the checkpoint's exact size.
mutations = st.one_of(
    # Bytes of the header (or length prefix) xor-ed with non-zero values.
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), min_size=1, max_size=6),
    ),
    st.tuples(st.just("truncate"), st.integers(0, 2**20)),
    # Any length prefix, and ones near the true length.
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1) | st.integers(-64, 64)),
    # A random header, with the data kept or dropped.
    st.tuples(st.just("header"), random_headers, st.booleans()),
    # One field of one real tensor entry replaced.
    st.tuples(
        st.just("field"),
        st.integers(0, 2**10),
        st.sampled_from(["dtype", "shape", "data_offsets"]),
        json_values | st.sampled_from(DTYPES) | st.lists(sizes, max_size=4),
    ),
    # One real tensor re-typed, its bytes cut or repeated to the new dtype's size, so that the
    # file stays well formed and the dtype conversion is what is tested.
    st.tuples(st.just("retype"), st.integers(0, 2**10), st.sampled_from(DTYPES)),
    # Tensors renamed (e.g. to an expected name at the wrong shape).
    st.tuples(
        st.just("rename"),
        st.lists(
            st.tuples(st.integers(0, 2**10), st.sampled_from(REAL_NAMES) | st.text(max_size=8)),
            min_size=1,
            max_size=3,
        ),
    ),
)


def mutate(raw: bytes, mutation) -> bytes:
    header, data = split(raw)
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    names = tensor_names(header)
    kind = mutation[0]
    if kind == "flip":
        out = bytearray(raw)
        for position, value in mutation[1]:
            out[position % header_end] ^= value
        return bytes(out)
    if kind == "truncate":
        return raw[: mutation[1] % len(raw)]
    if kind == "length":
        value = mutation[1]
        length = value if value > 64 else header_end - 8 + value
        return struct.pack("<Q", length % 2**64) + raw[8:]
    if kind == "header":
        _, new_header, keep_data = mutation
        return join(json.dumps(new_header, allow_nan=True).encode(), data if keep_data else b"")
    if kind == "field":
        _, index, field, value = mutation
        header[names[index % len(names)]][field] = value
        return join(json.dumps(header, allow_nan=True).encode(), data)
    if kind == "retype":
        _, index, dtype = mutation
        tensors = unpack(raw)
        name = names[index % len(names)]
        _, shape, payload = tensors[name]
        size = math.ceil(math.prod(shape) * ITEMSIZE[dtype])
        tensors[name] = (dtype, shape, (payload * 2)[:size])
        return pack(tensors)
    if kind == "rename":
        for index, new_name in mutation[1]:
            old = names[index % len(names)]
            if old in header:
                header[new_name] = header.pop(old)
        return join(json.dumps(header).encode(), data)
    raise AssertionError(kind)


@FUZZ
@given(mutation=mutations)
@example(mutation=("length", 2**63))
@example(mutation=("truncate", 0))
@example(mutation=("field", 0, "shape", [2**32, 2**32, 2]))
@example(mutation=("retype", 0, "F4"))  # the Rust bug above: HookedEncoderError, not a crash
@example(mutation=("header", {"__metadata__": None}, True))
def test_fuzzed_safetensors_never_crash_or_raise_another_type(fuzz_dir, valid_weights, mutation):
    path = fuzz_dir / WEIGHTS
    path.write_bytes(mutate(valid_weights, mutation))
    check_untrusted_load(fuzz_dir, str(path))


# Values for config fields: anything JSON, and sizes near, at and beyond the valid ones.
config_values = (
    json_values
    | st.integers(-3, 70)
    | st.sampled_from([0, 1, 2, 16, 40, 50, 12, 2**24, 2**24 + 1, 2**63, 2**64, 10**400])
    | st.sampled_from([1e-12, 1e-5, 0.0, -1.0, float("nan"), float("inf"), 1e308, 5e-324])
    | st.sampled_from(["gelu", "relu", "gelu_new", "swish", "bert", "absolute", "relative_key"])
)
CONFIG_FIELDS = [
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "max_position_embeddings",
    "vocab_size",
    "type_vocab_size",
    "layer_norm_eps",
    "hidden_act",
    "model_type",
    "position_embedding_type",
    "architectures",
]
config_documents = st.one_of(
    # The real config with some fields replaced and some dropped.
    st.tuples(
        st.just("edit"),
        st.dictionaries(st.sampled_from(CONFIG_FIELDS), config_values, max_size=4),
        st.sets(st.sampled_from(CONFIG_FIELDS), max_size=2),
    ),
    # Any JSON document.
    st.tuples(st.just("json"), json_values),
    # Any bytes.
    st.tuples(st.just("bytes"), st.binary(max_size=64)),
)


def config_bytes(original: dict, document) -> bytes:
    kind = document[0]
    if kind == "edit":
        _, changes, dropped = document
        config = {k: v for k, v in {**original, **changes}.items() if k not in dropped}
        return json.dumps(config, allow_nan=True).encode()
    if kind == "json":
        return json.dumps(document[1], allow_nan=True).encode()
    return document[1]


@FUZZ
@given(document=config_documents)
@example(document=("bytes", b"[" * 100_000))  # was RecursionError (fixed in loading.py)
@example(document=("edit", {"layer_norm_eps": 10**400}, set()))  # was OverflowError (config.py)
@example(document=("edit", {"architectures": 5}, set()))  # was "'int' object is not subscriptable"
@example(document=("edit", {"architectures": {"x": 1}}, set()))  # was "KeyError: 0"
@example(document=("edit", {"num_hidden_layers": 2**24}, set()))
@example(document=("edit", {}, {"hidden_size"}))
def test_fuzzed_config_json_never_crashes_or_raises_another_type(fuzz_dir, checkpoint, document):
    (fuzz_dir / WEIGHTS).write_bytes((checkpoint.path / WEIGHTS).read_bytes())
    original = json.loads((checkpoint.path / CONFIG).read_text())
    path = fuzz_dir / CONFIG
    path.write_bytes(config_bytes(original, document))
    try:
        # A config that loads but does not fit the weights is refused naming model.safetensors.
        check_untrusted_load(fuzz_dir, str(fuzz_dir))
    finally:
        shutil.copy(checkpoint.path / CONFIG, path)
