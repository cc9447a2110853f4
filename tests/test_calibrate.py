"""`slmbatch calibrate`, `eval` and `feedback` end to end: a real job run on real Ray and vLLM, a frontier over HTTP."""

from __future__ import annotations

import json

import polars as pl
import pytest

import slmbatch
from slmbatch.cli import load_job, main

from .conftest import banking_texts, write_shards
from .faultserver import FaultServer, frontier_reply, rule

ROWS = 80


JOB = """
from slmbatch import Classify, Frontier, Job, Model, ParquetSink, ParquetSource, load_thresholds
clf = Model({model!r}, num_cpus=0.5, batch_size=20, engine={{"max_model_len": 256, "dtype": "float32"}},
            price_in_per_mtok=0.01, price_out_per_mtok=0.01)
job = Job(name="calibrated", source=ParquetSource({source!r}), sink=ParquetSink({sink!r}),
          stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"], threshold=0.5)],
          frontier=Frontier(base_url={url!r}, model="rule-frontier", api_key_env=None, actors=1, concurrency=4,
                            price_in_per_mtok=1.0, price_out_per_mtok=4.0))
"""


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, ray_local, tiny_classifier):
    base = tmp_path_factory.mktemp("calibrate")
    texts = banking_texts(ROWS)
    write_shards(base / "validation", texts, shards=2, row_group_size=20, extra={"gold": [rule(t) for t in texts]})
    with FaultServer(reply=frontier_reply) as server:
        job_file = base / "job.py"
        job_file.write_text(
            JOB.format(model=tiny_classifier, source=str(base / "in"), sink=str(base / "out"), url=server.base_url)
        )
        code = main(
            [
                "calibrate",
                str(job_file),
                "--source",
                str(base / "validation"),
                "--gold",
                "spam=gold",
                "--target",
                "accuracy>=0.9",
                "--bootstrap",
                "200",
                "--no-progress",
            ]
        )
    return base, job_file, code


def test_calibrate_writes_thresholds_that_meet_the_target_on_its_validation_rows(calibrated):
    base, job_file, code = calibrated
    assert code == 0
    out = json.loads((base / "job.thresholds.json").read_text())
    record = out["stages"]["spam"]
    df = pl.read_parquet(base / "out-calibration" / "*.parquet")
    assert df.height == ROWS and (df["spam_routed_to"] == "frontier").all()  # every row has both answers
    # recompute the chosen point from the rows themselves
    t = out["thresholds"]["spam"]
    cascade = df.select(
        pl.when(pl.col("spam_confidence") < t)
        .then(pl.col("spam_frontier"))
        .otherwise(pl.col("spam_small"))
        .alias("answer"),
        "gold",
    )
    accuracy = (cascade["answer"] == cascade["gold"]).mean()
    assert accuracy == pytest.approx(record["chosen"]["quality"]) and accuracy >= 0.9
    assert record["chosen"]["escalation_rate"] == pytest.approx((df["spam_confidence"] < t).mean())
    assert record["frontier_quality"] == 1.0 and record["small_quality"] == pytest.approx(
        (df["spam_small"] == df["gold"]).mean()
    )
    assert (base / "job.thresholds.spam.png").stat().st_size > 0
    assert "only 80 labelled rows" in " ".join(record["warnings"])
    # the job reads it back
    assert slmbatch.load_thresholds(str(base / "job.thresholds.json"))["spam"] == t


def test_eval_scores_the_output_against_gold(calibrated, capsys, tmp_path):
    base, job_file, _ = calibrated
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                str(job_file),
                "--sink",
                str(base / "out-calibration"),
                "--no-run",
                "--gold",
                "spam=gold",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    assert "cascade" in capsys.readouterr().out
    systems = {s["system"]: s for s in json.loads(report.read_text())["stages"][0]["systems"]}
    df = pl.read_parquet(base / "out-calibration" / "*.parquet")
    assert systems["small model"]["accuracy"] == pytest.approx((df["spam_small"] == df["gold"]).mean())
    assert systems["cascade"]["escalation_rate"] == 1.0 and systems["cascade"]["accuracy"] == 1.0
    # the same gold from a labels file joined on a key
    labels = tmp_path / "labels.csv"
    df.select("n", pl.col("gold").alias("spam")).write_csv(labels)
    assert (
        main(
            [
                "eval",
                str(job_file),
                "--sink",
                str(base / "out-calibration"),
                "--no-run",
                "--labels",
                str(labels),
                "--key",
                "n",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    assert {s["system"]: s for s in json.loads(report.read_text())["stages"][0]["systems"]} == systems


def test_feedback_exports_escalated_rows_as_chat_jsonl_that_chat_templates_accept(calibrated, tmp_path):
    from transformers import AutoTokenizer

    base, job_file, _ = calibrated
    out = tmp_path / "feedback"
    assert main(["feedback", str(base / "out-calibration"), "--out", str(out), "--holdout", "0.25"]) == 0
    lines = [
        json.loads(line)
        for split in ("train", "heldout")
        for line in (out / "spam" / f"{split}.jsonl").read_text().splitlines()
    ]
    df = pl.read_parquet(base / "out-calibration" / "*.parquet")
    assert len(lines) == df["text"].n_unique()  # one example per distinct prompt
    held = len((out / "spam" / "heldout.jsonl").read_text().splitlines())
    assert 0 < held < len(lines)
    stage = load_job(str(job_file)).stages[0]
    tokenizer = AutoTokenizer.from_pretrained(stage.model.name)
    by_row = {r["_row_id"]: r for r in df.to_dicts()}
    for record in lines:
        row = by_row[record["metadata"]["row_id"]]
        assert record["messages"][:-1] == stage.frontier_request(row)["messages"]  # the small model's prompt
        assert record["messages"][-1] == {"role": "assistant", "content": rule(row["text"])}
        rendered = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        assert rendered.endswith(f"<|im_start|>assistant\n{rule(row['text'])}<|im_end|>\n")
    manifest = json.loads((out / "manifest.json").read_text())["stages"]["spam"]
    assert manifest["frontier_rows"] == ROWS and manifest["train"] + manifest["heldout"] == len(lines)


def test_without_labels_calibration_measures_agreement_with_the_frontier(calibrated, tmp_path):
    base, job_file, _ = calibrated
    out = tmp_path / "agreement.json"
    assert (
        main(
            [
                "calibrate",
                str(job_file),
                "--sink-all",
                str(base / "out-calibration"),
                "--no-run",
                "--target",
                "accuracy>=0.9",
                "--bootstrap",
                "100",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())["stages"]["spam"]
    assert record["gold"] == "frontier" and record["frontier_quality"] == 1.0
    assert "quality is agreement with the frontier" in " ".join(record["warnings"])
