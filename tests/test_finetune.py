"""The flywheel on tiny models, end to end: run -> finetune -> eval -> promote -> the next night's run.

A random tiny classifier is the small model; the frontier (over HTTP) labels
by a rule. Fine-tuning on the rows the frontier answered must make the
candidate agree with the rule more than the random start on the held-out
rows; promotion must then change the model new input gets - the ledger
accepting it like a new threshold - while rows already written keep theirs.
A diverged candidate is refused unless forced.
"""

from __future__ import annotations

import json
import os
import shutil

import polars as pl
import pytest

from slmbatch.errors import ConfigError
from slmbatch.ledger import Change
from slmbatch.lines import current, lineage, promoted, read_card

from .conftest import banking_texts, write_shards
from .faultserver import FaultServer, frontier_reply, rule

pytestmark = pytest.mark.slow

JOB = """
import os
from pathlib import Path
from slmbatch import Classify, Frontier, Job, Model, ParquetSink, ParquetSource, promoted
LINE = {line!r}
name = promoted(LINE) if (Path(LINE) / "current.json").exists() else {start!r}
clf = Model(name, num_cpus=0.5, batch_size=32, engine={{"max_model_len": 256, "dtype": "float32"}})
job = Job(name="flywheel", source=ParquetSource({source!r}), sink=ParquetSink({sink!r}),
          stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"], threshold=1.0)],
          frontier=Frontier(base_url={url!r}, model="rule-frontier", api_key_env=None, actors=1, concurrency=4))
"""


@pytest.fixture(scope="module")
def flywheel(tmp_path_factory, ray_local, tiny_classifier):
    from slmbatch.cli import main

    base = tmp_path_factory.mktemp("flywheel")
    start = base / "start"
    shutil.copytree(tiny_classifier, start)
    texts = banking_texts(400)
    write_shards(base / "in", texts[:300], shards=2, row_group_size=50)
    line = base / "models" / "spam"
    with FaultServer(reply=frontier_reply) as server:
        job_file = base / "job.py"
        job_file.write_text(
            JOB.format(
                line=str(line), start=str(start), source=str(base / "in"), sink=str(base / "out"), url=server.base_url
            )
        )
        assert main(["run", str(job_file), "--no-progress", "--run-date", "2026-12-01"]) == 0
        yield {"base": base, "job": job_file, "line": line, "start": start, "texts": texts, "main": main}


def test_finetune_learns_the_frontiers_answers_and_writes_a_model_card(flywheel, capsys):
    main, line = flywheel["main"], flywheel["line"]
    code = main(
        ["finetune", str(flywheel["job"]), "--line", str(line), "--holdout", "0.3", "--epochs", "6", "--lr", "1e-3"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "frontier answers" in out and f"{line}/v1" in out
    card = read_card(line / "v1")
    data = card["data"]
    assert data["feedback_rows"] == data["rows"] > 200  # every distinct text was escalated (threshold 1.0)
    assert data["train_rows"] + data["heldout_rows"] == data["rows"] and data["heldout_rows"] > 50
    assert len(data["content_sha256"]) == 16 and len(data["run_ids"]) == 1
    runs = os.listdir(flywheel["base"] / "out" / "_slmbatch" / "runs")
    assert any(r.startswith(data["run_ids"][0]) for r in runs)
    assert card["trained_from"] == str(flywheel["start"]) and card["hyperparameters"]["lr"] == 1e-3
    held = card["scores"]["splits"]["feedback"]
    assert held["rows"] == data["heldout_rows"]
    # the held-out gold is the frontier's answer, which is the rule
    heldout = [json.loads(x) for x in (line / "v1" / "heldout.jsonl").read_text().splitlines()]
    assert all(r["label"] == rule(r["text"]) for r in heldout)
    assert held["candidate"] > held["current"] and held["candidate"] >= 0.85
    assert (line / "v1" / "README.md").read_text().startswith("# spam v1")
    assert (line / "v1" / "config.json").is_file() and not (line / "current.json").exists()

    assert main(["eval", str(flywheel["job"]), "--candidate", str(line / "v1")]) == 0
    assert f"{held['candidate']:.4f}" in capsys.readouterr().out


def test_promote_changes_the_model_new_input_gets_and_keeps_written_rows(flywheel, capsys):
    main, line, base = flywheel["main"], flywheel["line"], flywheel["base"]
    assert main(["promote", str(line), "v1"]) == 0
    assert "now serves v1" in capsys.readouterr().out
    assert promoted(line) == str((line / "v1").resolve())
    assert str(flywheel["start"].resolve()) in lineage(line)
    # the next night's input: the job file now reads the promoted version; the ledger accepts it
    write_shards(base / "in" / "night2", flywheel["texts"][300:], shards=1, row_group_size=50)
    assert main(["run", str(flywheel["job"]), "--no-progress", "--run-date", "2026-12-02"]) == 0
    rows = pl.read_parquet(base / "out" / "**" / "*.parquet")
    assert rows.height == 400 and rows["_row_id"].n_unique() == 400
    night2 = rows.filter(pl.col("_row_id").str.starts_with("night2/"))
    assert set(night2["spam_model"]) == {promoted(line)} and night2.height == 100
    assert set(rows.filter(~pl.col("_row_id").str.starts_with("night2/"))["spam_model"]) == {str(flywheel["start"])}
    # the promoted model agrees with the rule far more than the random start did
    small_right = (night2["spam_small"] == pl.Series([rule(t) for t in night2["text"]])).mean()
    assert small_right >= 0.85


def test_a_worse_candidate_is_refused_unless_forced(flywheel, capsys):
    main, line = flywheel["main"], flywheel["line"]
    # lr 5 makes the fine-tuning diverge: a candidate worse than the promoted v1
    assert (
        main(["finetune", str(flywheel["job"]), "--line", str(line), "--holdout", "0.3", "--epochs", "1", "--lr", "5"])
        == 0
    )
    card = read_card(line / "v2")
    assert card["trained_from"] == promoted(line)
    assert main(["promote", str(line), "v2"]) == 2
    assert "candidate is worse on the held-out split" in capsys.readouterr().err
    assert current(line)["version"] == "v1"
    assert main(["promote", str(line), "v2", "--force"]) == 0
    pointer = current(line)
    assert (
        pointer["version"] == "v2" and pointer["forced"] and [h["version"] for h in pointer["history"]] == ["v1", "v2"]
    )


def test_only_a_version_of_the_same_line_passes_as_a_promotion(tmp_path):
    line = tmp_path / "line"
    (line / "v1").mkdir(parents=True)
    (line / "v1" / "slmbatch_card.json").write_text("{}")
    (line / "current.json").write_text(json.dumps({"version": "v1", "history": [{"replaces": str(tmp_path / "orig")}]}))
    other = tmp_path / "other"
    path = "stages[0].model.name"
    assert Change(path, str(tmp_path / "orig"), str(line / "v1")).promotion
    assert not Change(path, str(other), str(line / "v1")).promotion
    assert not Change(path, str(line / "v1"), str(other)).promotion
    assert not Change("stages[0].labels", str(line / "v1"), str(line / "v1")).promotion
    with pytest.raises(ConfigError, match="no promoted version"):
        promoted(other)


def test_a_prompt_from_two_sources_is_one_row_in_one_split_and_bad_options_are_refused(flywheel, capsys, tmp_path):
    """The job's sink named again as --sink adds nothing; a --sink that cannot be read, or that holds another
    job's output, is an error, not a silent zero; a labelled row and a frontier answer of one text are one row
    (the label wins), held out or not by one hash."""
    from slmbatch.cli import load_job
    from slmbatch.finetune import feedback_rows, one_split, target_stage

    main, job_file = flywheel["main"], str(flywheel["job"])
    job = load_job(job_file)
    stage = target_stage(job, None)
    once, _ = feedback_rows(job, stage, 0.3)
    twice, _ = feedback_rows(job, stage, 0.3, [str(flywheel["base"] / "out") + "/"])
    assert len(once) == len(twice) > 0
    line = str(tmp_path / "line")
    for args, said in (
        (["--sink", str(tmp_path / "nowhere")], "invalid job: --sink: cannot read"),
        (["--sink", str(flywheel["base"] / "in")], "invalid job: --sink: "),
        (["--epochs", "0"], "invalid job: --epochs: must be a whole number >= 1, got 0"),
        (["--lr", "0"], "invalid job: --lr: must be a number > 0"),
    ):
        assert main(["finetune", job_file, "--line", line, *args]) == 2, args
        assert said in capsys.readouterr().err, args
    assert not (tmp_path / "line").exists() or not list((tmp_path / "line").glob("v*"))
    text = once[0]["text"]
    rows = [
        {"system": "", "text": text, "label": "frontier's", "heldout": False, "source": "feedback"},
        {"system": "", "text": text, "label": "gold", "heldout": True, "source": "labels"},
        *[{**r, "heldout": not r["heldout"]} for r in once],
    ]
    split = one_split(rows, 0.3)
    assert len(split) == len(once)
    [mine] = [r for r in split if r["text"] == text]
    assert mine["label"] == "gold" and mine["source"] == "labels"
    assert len({(r["text"], r["heldout"]) for r in split}) == len({r["text"] for r in split})
    assert one_split(rows, 0.3) == split  # the split is a function of the prompt


def test_a_labelled_file_the_stage_cannot_learn_from_is_refused_naming_why(flywheel, capsys, tmp_path):
    main, job_file = flywheel["main"], str(flywheel["job"])
    pl.DataFrame({"text": ["a", "b"], "spam": ["ham", "eggs"]}).write_parquet(tmp_path / "eggs.parquet")
    pl.DataFrame({"body": ["a", "b"], "spam": ["ham", "spam"]}).write_parquet(tmp_path / "body.parquet")
    for labelled, said in (
        ("eggs.parquet", "label 'eggs' in column 'spam' is not one of stage 'spam''s"),
        ("body.parquet", "has no column 'text', which stage 'spam' reads"),
        ("missing.parquet", "--labelled: cannot read labels file"),
    ):
        args = ["finetune", job_file, "--line", str(tmp_path / "line"), "--labelled", str(tmp_path / labelled)]
        assert main(args) == 2, labelled
        assert "invalid job: --labelled: " in (err := capsys.readouterr().err) and said in err, err


def test_promote_takes_only_a_version_name_of_the_line(tmp_path):
    from slmbatch.finetune import promote

    for name in ("line", "other"):
        (tmp_path / name / "v1").mkdir(parents=True)
        (tmp_path / name / "v1" / "slmbatch_card.json").write_text("{}")
    line = tmp_path / "line"
    for version in ("v1/", "../other/v1", str(tmp_path / "other" / "v1"), "v9"):
        with pytest.raises(ConfigError, match=r"VERSION: .* is not a version of .*line \(its versions: v1\)"):
            promote(line, version)
    with pytest.raises(ConfigError, match=r"LINE: .*nowhere is not a directory"):
        promote(tmp_path / "nowhere", "v1")


def test_a_relative_line_with_nothing_promoted_says_where_it_looked(tmp_path, monkeypatch, caplog):
    import logging

    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="slmbatch"):
        assert promoted("adapters/fields", default=None) is None
    [said] = [r.getMessage() for r in caplog.records]
    assert f"nothing promoted in {tmp_path / 'adapters' / 'fields'}" in said
    assert f"(read from the working directory, {tmp_path})" in said and "using the default, None" in said


# -- a generative stage: a LoRA adapter, served with multi-LoRA ------------------------------------------

GIST_JOB = """
from slmbatch import Frontier, Job, Model, ParquetSink, ParquetSource, Summarize, promoted
lm = Model({lm!r}, threads=2, batch_size=32, engine={{"max_model_len": 1024, "dtype": "float32"}})
job = Job(name="gist-flywheel", source=ParquetSource({source!r}), sink=ParquetSink({sink!r}),
          stages=[Summarize("gist", model=lm, input="text", max_output_tokens=12, threshold=1.0,
                            adapter=promoted({line!r}, default=None))],
          frontier=Frontier(base_url={url!r}, model="rule-frontier", api_key_env=None, actors=1, concurrency=4))
"""


def gist_rule(text: str) -> str:
    return "a card problem" if "card" in text.lower() else "another problem"


def gist_reply(body: dict) -> str:
    """The frontier's summary: one of two phrases, by whether the text mentions a card."""
    return gist_rule(body["messages"][-1]["content"])


def test_a_generative_stage_gets_a_lora_adapter_that_learns_the_frontiers_answers(tmp_path, ray_local, tiny_lm):
    from slmbatch.cli import main

    texts = banking_texts(260)
    write_shards(tmp_path / "in", texts[:200], shards=2, row_group_size=50)
    line = tmp_path / "adapters" / "gist"
    with FaultServer(reply=gist_reply) as server:
        job_file = tmp_path / "job.py"
        job_file.write_text(
            GIST_JOB.format(
                lm=tiny_lm, source=str(tmp_path / "in"), sink=str(tmp_path / "out"), line=str(line), url=server.base_url
            )
        )
        assert main(["run", str(job_file), "--no-progress", "--run-date", "2026-12-01"]) == 0
        args = ["finetune", str(job_file), "--line", str(line), "--holdout", "0.25", "--epochs", "8", "--lr", "5e-3"]
        assert main(args) == 0
        card = read_card(line / "v1")
        assert card["adapter"] and card["trained_from"] is None and card["base"] == tiny_lm
        assert (line / "v1" / "adapter_config.json").is_file() and (line / "v1" / "adapter_model.safetensors").is_file()
        assert card["hyperparameters"]["method"].startswith("LoRA adapter (PEFT)")
        heldout = [json.loads(x) for x in (line / "v1" / "heldout.jsonl").read_text().splitlines()]
        assert heldout and all(r["label"] == gist_rule(r["text"]) for r in heldout)
        assert all(r["system"] == "You write short, faithful summaries." for r in heldout)
        held = card["scores"]["splits"]["feedback"]  # ROUGE-L of greedy answers against the frontier's
        assert held["candidate"] >= 0.9 > 0.2 >= held["current"]
        assert main(["promote", str(line), "v1"]) == 0

        # The next night runs the promoted adapter (the ledger accepts it); rows written keep theirs.
        write_shards(tmp_path / "in" / "night2", texts[200:], shards=1, row_group_size=50)
        assert main(["run", str(job_file), "--no-progress", "--run-date", "2026-12-02"]) == 0
    rows = pl.read_parquet(tmp_path / "out" / "**" / "*.parquet")
    assert rows.height == 260 and rows["_row_id"].n_unique() == 260
    night2 = rows.filter(pl.col("_row_id").str.starts_with("night2/"))
    assert set(night2["gist_model"]) == {f"{tiny_lm} + adapter {promoted(line)}"}
    assert set(rows.filter(~pl.col("_row_id").str.starts_with("night2/"))["gist_model"]) == {tiny_lm}
    right = (night2["gist_small"] == pl.Series([gist_rule(t) for t in night2["text"]])).mean()
    assert right >= 0.9


def test_an_extract_answer_is_trained_without_the_nulls_of_fields_it_left_out():
    from slmbatch.feedback import answer_text

    assert answer_text({"topic": "card", "urgent": None, "items": [{"sku": "a", "qty": None}]}) == (
        '{"topic":"card","items":[{"sku":"a"}]}'
    )
    assert answer_text("a card problem") == "a card problem"
