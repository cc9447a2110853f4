"""Session fixtures: one local Ray, tiny models built once, small Parquet inputs.

Models are cached under build/test-models (rebuilt only when missing), so a
second `make test` skips the build; CI's clean clone builds them once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from devkit.toymodels import build_tiny_causal_lm, build_tiny_classifier

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "test-models"
BANKING = ROOT / "examples" / "data" / "banking77"
SPAM_LABELS = ["ham", "spam"]


def banking_texts(n: int | None = None) -> list[str]:
    texts = pq.read_table(BANKING / "test" / "part-000.parquet", columns=["text"])["text"].to_pylist()
    return texts[:n] if n else texts


@pytest.fixture(scope="session")
def tiny_lm() -> str:
    return str(build_tiny_causal_lm(CACHE / "tiny-lm", banking_texts()))


@pytest.fixture(scope="session")
def tiny_classifier() -> str:
    return str(build_tiny_classifier(CACHE / "tiny-classifier", SPAM_LABELS, banking_texts()))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, like the CI machine)."""
    import ray

    from devkit.localserver import free_port
    from slmbatch.runner import LOCAL_RAY_CONFIG

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.metrics_port = free_port()  # Prometheus export of this node's metrics agent (tests read it)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        _metrics_export_port=ray.metrics_port,
        _system_config=LOCAL_RAY_CONFIG,
    )
    yield ray
    ray.shutdown()


def ray_workers_of_this_test(name: str) -> list:
    """Live Ray worker processes whose title names ``name`` (``ray::FrontierActor``, ``ray::MapWorker(...StageActor)``)
    among this test process's descendants: the Ray that ``ray_local`` started (its raylet is our child) and the
    drivers this test started. Never by name machine-wide: the other pytest worker's jobs, or a developer's own,
    run the same actors."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if name in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def write_shards(
    directory: Path, texts: list, *, shards: int, row_group_size: int = 16, extra: dict | None = None
) -> list[Path]:
    """Split ``texts`` (plus ``extra`` columns) into ``shards`` Parquet files with small row groups."""
    directory.mkdir(parents=True, exist_ok=True)
    columns = {"text": pa.array(texts, pa.string()), "n": pa.array(range(len(texts)), pa.int64())}
    for name, values in (extra or {}).items():
        columns[name] = pa.array(values)
    table = pa.table(columns)
    size = -(-len(texts) // shards)
    paths = []
    for i in range(shards):
        path = directory / f"part-{i:02d}.parquet"
        pq.write_table(table.slice(i * size, size), path, row_group_size=row_group_size)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3-compatible server (SeaweedFS on 127.0.0.1, signatures checked)
    for the whole session, with one bucket; stopped at the end (tests/s3server.py)."""
    from .s3server import running

    with running(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_prefix(s3_server, request) -> str:
    """A fresh ``s3://<bucket>/<test name>-<random>`` for one test, so tests never see each other's objects."""
    import re
    import secrets

    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60].strip("-")
    return s3_server.url(f"{name}-{secrets.token_hex(3)}")


FRONTIER_KEY = "sk-slmbatch-test-4f1c9e"  # the local server requires it; no output may ever show it


@pytest.fixture(scope="module")
def frontier_server(tiny_lm):
    """vLLM's own OpenAI-compatible server on 127.0.0.1 as a real frontier (requires an API key),
    stopped when the module that uses it ends."""
    from devkit.localserver import local_openai_server

    # The start-up bound only says "it did not hang": vLLM's server starts in tens of seconds
    # idle, but a replica alone took up to 130 s beside the other pytest worker's engines.
    with local_openai_server(
        tiny_lm, api_key=FRONTIER_KEY, max_model_len=1024, extra_args=("--dtype", "float32"), timeout_s=600
    ) as base_url:
        yield base_url


#: Fixtures whose use makes a test a Ray / vLLM / S3 / slow test (markers declared in pyproject.toml).
#: A job on ``ray_local`` or a ``ray start`` head runs real vLLM replicas, so those are both; such a
#: job takes 15-130 s on 2 cores (replica start-up), so those tests are also ``slow``.
_MARKERS_BY_FIXTURE = {
    "ray_local": ("ray", "vllm", "slow"),
    "ray_head": ("ray", "vllm", "slow"),
    "nightly_run": ("ray", "vllm", "slow"),
    "lm_replica": ("vllm",),
    "clf_replica": ("vllm",),
    "frontier_server": ("vllm",),
    "s3_server": ("s3",),
}


#: The test files that take longest (`--durations`, 2 cores), longest first. `make test` runs the files
#: in two pytest-xdist workers, each file whole in one of them, in collection order: the long ones
#: start first, so both workers finish about together. The other files follow in their usual order.
LONGEST_FIRST = [
    "test_multinode.py",
    "test_ledger.py",
    "test_batch.py",
    "test_audit.py",
    "test_routing.py",
    "test_ray_job_submit.py",
    "test_finetune.py",
    "test_reuse.py",
    "test_adapters.py",
    "test_nightly.py",
    "test_demo.py",
    "test_runner.py",
    "test_benchmark_smoke.py",
    "test_cli.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            for marker in _MARKERS_BY_FIXTURE.get(fixture, ()):
                item.add_marker(marker)
