"""LoRA task adapters: checked when a stage is defined, served by one replica with vLLM multi-LoRA.

The adapters are real PEFT adapters of the tiny LM, trained (by
``slmbatch.finetune.train_lora``) to answer every prompt of the stage with one
fixed phrase each, so a row's answer says which adapter produced it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import slmbatch
from devkit.toymodels import build_tiny_lora
from slmbatch import ConfigError, Job, Model, ParquetSink, ParquetSource, Summarize
from slmbatch.adapters import lora_rank_for, same_model
from slmbatch.ledger import Change

from .conftest import CACHE, banking_texts, write_shards

ANSWER_A = "refund refund card balance"
ANSWER_B = "lost stolen pin blocked"


def lm(tiny_lm: str, **engine) -> Model:
    return Model(tiny_lm, threads=2, batch_size=32, engine={"max_model_len": 1024, "dtype": "float32", **engine})


def gist(name: str, model: Model, adapter: str | None = None) -> Summarize:
    return Summarize(name, model=model, input="text", adapter=adapter, max_output_tokens=16)


@pytest.fixture(scope="session")
def adapters(tiny_lm) -> tuple[str, str]:
    """Two adapters of the tiny LM, each trained on the exact prompts a Summarize stage sends."""
    stage = gist("probe", lm(tiny_lm))
    prompts = [(stage.default_system, stage.render_user({"text": t}, t, "generate")) for t in banking_texts(64)]
    a = build_tiny_lora(CACHE / "lora-a", tiny_lm, prompts, ANSWER_A)
    b = build_tiny_lora(CACHE / "lora-b", tiny_lm, prompts, ANSWER_B)
    return str(a), str(b)


# -- definition time -----------------------------------------------------------------------------


def copy_with_config(src: str, dst: Path, **changes) -> str:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return str(dst)


def test_a_local_adapter_is_checked_when_the_stage_is_defined(tiny_lm, tiny_classifier, adapters, tmp_path):
    a, _ = adapters
    assert gist("ok", lm(tiny_lm), a).adapter == a
    with pytest.raises(ConfigError, match=r"Summarize\.adapter.*does not exist"):
        gist("missing", lm(tiny_lm), str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"Summarize\.adapter.*no adapter_config\.json"):
        gist("not_lora", lm(tiny_lm), tiny_lm)  # a model directory, not an adapter
    big = copy_with_config(a, tmp_path / "big", r=64)
    with pytest.raises(ConfigError, match=r"rank 64, over the model's engine max_lora_rank 16"):
        gist("big", lm(tiny_lm, max_lora_rank=16), big)
    with pytest.raises(ConfigError, match=r"trained on .*tiny-lm.*not on this stage's model"):
        gist("other_base", lm(tiny_classifier), a)
    ia3 = copy_with_config(a, tmp_path / "ia3", peft_type="IA3")
    with pytest.raises(ConfigError, match=r"IA3 adapter; vLLM serves LoRA adapters only"):
        gist("ia3", lm(tiny_lm), ia3)
    # A hub id cannot be checked offline here: the replica downloads and checks it before its engine starts.
    assert gist("hub", lm(tiny_lm), "someone/extract-lora").adapter == "someone/extract-lora"


def test_a_hub_adapter_that_cannot_be_fetched_is_named_by_its_stage(tiny_lm, monkeypatch):
    """The replica fetches a hub id before its engine starts; the error names the stage that asked."""
    from slmbatch.engine import Replica

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a node with no route to the hub: fails at once
    where = "stage 'gist': Summarize.adapter"
    with pytest.raises(ConfigError, match=r"^stage 'gist': Summarize\.adapter: cannot fetch adapter 'someone/lora'"):
        Replica(lm(tiny_lm), {"someone/lora": where})


def test_lora_rank_and_base_model_matching(tmp_path):
    assert [lora_rank_for(r) for r in ([4], [8], [8, 12], [300], [])] == [8, 8, 16, 320, 1]
    # A hub id against a local copy: by name. Two local directories: by real path only.
    assert same_model("Qwen/Qwen2.5-0.5B-Instruct", "/models/qwen2.5-0.5b-instruct")
    (tmp_path / "a" / "v1").mkdir(parents=True)
    (tmp_path / "b" / "v1").mkdir(parents=True)
    assert not same_model(str(tmp_path / "a" / "v1"), str(tmp_path / "b" / "v1"))
    assert same_model(str(tmp_path / "a" / ".." / "a" / "v1"), str(tmp_path / "a" / "v1"))


def test_stages_with_different_adapters_share_one_replica_pool(tiny_lm, adapters):
    a, b = adapters
    model = lm(tiny_lm)
    job = Job(
        name="pools",
        source=ParquetSource("/tmp/in"),
        stages=[gist("a", model, a), gist("b", model, b), gist("plain", model)],
        sink=ParquetSink("/tmp/out"),
    )
    assert [[s.name for s in stages] for _, stages in job.model_groups()] == [["a", "b", "plain"]]
    assert f"model={tiny_lm} + adapter {a}" in job.describe()


def test_a_new_adapter_version_in_a_line_passes_as_a_promotion(tmp_path):
    line = tmp_path / "line"
    for v in ("v1", "v2"):
        (line / v).mkdir(parents=True)
        (line / v / "slmbatch_card.json").write_text("{}")
    (line / "current.json").write_text(json.dumps({"version": "v2", "history": []}))
    assert Change("stages[0].adapter", str(line / "v1"), str(line / "v2")).allowed
    assert not Change("stages[0].adapter", str(tmp_path / "elsewhere"), str(line / "v2")).allowed


# -- one replica, two adapters, on a real engine ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_each_stage_answers_with_its_own_adapter_from_one_replica(ray_local, tiny_lm, adapters, tmp_path):
    a, b = adapters
    model = lm(tiny_lm)
    texts = banking_texts(60)[20:]  # not the rows the adapters were trained on
    write_shards(tmp_path / "in", texts, shards=2)
    job = Job(
        name="multi-lora",
        source=ParquetSource(str(tmp_path / "in")),
        stages=[gist("a", model, a), gist("plain", model), gist("b", model, b)],
        sink=ParquetSink(str(tmp_path / "out")),
    )
    summary = slmbatch.run(job)
    assert summary.rows_out == len(texts)
    table = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["text"] for r in table) == sorted(texts)
    assert {r["a"] for r in table} == {ANSWER_A}
    assert {r["b"] for r in table} == {ANSWER_B}
    # The stage without an adapter gets the base model, even next to adapters in one engine (vLLM's CPU
    # kernels read "no adapter" from the last slot: slmbatch keeps that slot empty).
    assert not {r["plain"] for r in table} & {ANSWER_A, ANSWER_B}
    assert {r["a_model"] for r in table} == {f"{tiny_lm} + adapter {a}"}
    assert {r["plain_model"] for r in table} == {tiny_lm}
    # One pool, so one replica started (its summary line lists each stage's adapter).
    engines = {s.name: s.engines for s in summary.stages}
    assert len(engines["a"]) == 1 and engines["a"][0].endswith(f"adapter {a}")
    assert engines["plain"] and "adapter" not in engines["plain"][0]


def test_an_adapter_the_engine_cannot_load_stops_the_job_before_any_row_and_a_rerun_after_the_fix_runs(
    ray_local, tiny_lm, adapters, tmp_path
):
    """Its config passes the definition-time check, its weights are missing: every row would fail (and be
    recorded as done), so the replica's warm-up stops the job instead."""
    from slmbatch.errors import EngineError, slmbatch_error

    a, _ = adapters
    broken = Path(shutil.copytree(a, tmp_path / "adapter"))
    weights = next(broken.glob("adapter_model.*"))
    weights.rename(tmp_path / weights.name)
    texts = banking_texts(12)
    write_shards(tmp_path / "in", texts, shards=1)
    job = Job(
        name="broken-lora",
        source=ParquetSource(str(tmp_path / "in")),
        stages=[gist("a", lm(tiny_lm), str(broken))],
        sink=ParquetSink(str(tmp_path / "out")),
    )
    with pytest.raises(Exception) as stopped:
        slmbatch.run(job, progress=False)
    error = slmbatch_error(stopped.value)
    assert isinstance(error, EngineError) and f"stage 'a' cannot run on model {tiny_lm} with adapter" in str(error)
    assert not list((tmp_path / "out").glob("*.parquet"))  # no row written, none recorded as done
    (tmp_path / weights.name).rename(weights)
    summary = slmbatch.run(job, progress=False)
    assert summary.rows_out == len(texts) and summary.stages[0].errored == 0
