"""extract_ray() on a two-node Ray cluster (``ray.cluster_utils.Cluster``, both nodes on this
machine) that loses a node in the middle of the run and gets a replacement, as an autoscaled
cluster would: the output is still byte-identical to the single-process run."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import WORDS
from hooked_encoder import HookedEncoder, get_num_threads, set_num_threads

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'hooked-encoder[ray]'")
pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'ray[data]'")

from ray.cluster_utils import Cluster  # noqa: E402

from hooked_encoder.ray import extract_ray  # noqa: E402

_rng = np.random.default_rng(11)
TEXTS = [" ".join(_rng.choice(WORDS, size=_rng.integers(1, 10))) for _ in range(1500)]
SHARD_ROWS = 15  # 100 windows: the run is still going when the node goes


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_a_node_removed_mid_run_loses_and_duplicates_nothing(text_checkpoint, tmp_path):
    model = HookedEncoder.from_pretrained(text_checkpoint.path)
    threads = get_num_threads()
    set_num_threads(1)
    try:
        model.extract(
            TEXTS, "blocks.*.hook_resid_post", out=tmp_path / "ref", shard_rows=SHARD_ROWS
        )
    finally:
        set_num_threads(threads)
    # Fast failure detection, as Ray's own node-failure tests configure it.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": 80 * 2**20,
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3},
        },
    )
    doomed = cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        out = tmp_path / "out"
        failure: list[BaseException] = []

        def run():
            try:
                extract_ray(
                    TEXTS,
                    model=str(text_checkpoint.path),
                    hooks="blocks.*.hook_resid_post",
                    out=out,
                    shard_rows=SHARD_ROWS,
                    concurrency=2,
                    num_cpus=1,
                )
            except BaseException as e:
                failure.append(e)

        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + 120
        while not (out / "shard-00003.safetensors").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not (out / "manifest.json").exists() or not _complete(out), "finished too early"
        cluster.remove_node(doomed)
        cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        runner.join(timeout=240)
        assert not runner.is_alive(), "extract_ray did not finish after the node was replaced"
        assert not failure, failure
        assert digests(out) == digests(tmp_path / "ref")
    finally:
        ray.shutdown()
        cluster.shutdown()


def _complete(out: Path) -> bool:
    import json

    return json.loads((out / "manifest.json").read_text())["complete"]
