"""Evaluation metrics, threshold calibration and the thresholds file - on data where the answer is known."""

from __future__ import annotations

import json
import pickle

import pytest

from slmbatch import Classify, ConfigError, Extract, Job, Model, ParquetSink, ParquetSource, load_thresholds
from slmbatch.calibrate import build_curve, calibrate_stage, calibration_file, choose, parse_target, rows_needed
from slmbatch.evaluate import StageRows, evaluate_stage
from slmbatch.html_report import render_html
from slmbatch.report import RunSummary, StageStats
from slmbatch.scoring import accuracy, exact_match, field_prf, macro_f1, rouge_l


def test_classification_metrics_match_hand_computed_values():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", None]
    assert accuracy(pred, gold) == 3 / 5
    # a: tp1 fp0 fn1 -> 2/3; b: tp2 fp1 fn0 -> 4/5; c: tp0 fn1 -> 0 (a failed row is no class of its own)
    assert macro_f1(pred, gold) == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)


def test_extraction_metrics_match_hand_computed_values():
    gold = [{"people": 2, "time": "7pm", "name": None}, {"people": 4, "time": "8pm", "name": "Ana"}]
    pred = [{"people": 2.0, "time": " 7PM ", "name": None}, {"people": 3, "time": "8pm", "name": None}]
    # row 1: people, time match (2 == 2.0; case/space-insensitive) -> tp 2; row 2: time tp, people fp+fn, name fn
    assert field_prf(pred, gold) == pytest.approx(
        {"field_precision": 3 / 4, "field_recall": 3 / 5, "field_f1": 2 * 0.75 * 0.6 / 1.35}
    )
    assert exact_match(pred[0], gold[0]) and not exact_match(pred[1], gold[1]) and not exact_match(None, gold[0])
    # JSON strings (a labels file written as text) are read as objects
    assert Extract.metrics(pred, [json.dumps(g) for g in gold])["exact_match"] == 0.5


def test_rouge_l_matches_hand_computed_lcs():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 of 6 tokens each side
    assert rouge_l("the cat is on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    assert rouge_l(None, "anything") == 0.0


def synthetic(n=1000, wrong_below=300, frontier_wrong=()):
    """Row i has confidence (i + .5)/n; the small model is right iff i >= wrong_below; the frontier is right
    except on rows ``frontier_wrong``; the small model is free, the frontier costs $0.001 a row ($1,000 per 1M)."""
    confidence = [(i + 0.5) / n for i in range(n)]
    small = [float(i >= wrong_below) for i in range(n)]
    frontier = [0.0 if i in frontier_wrong else 1.0 for i in range(n)]
    return small, frontier, confidence, [0.0] * n, [1e-3] * n


def test_calibration_picks_the_threshold_that_meets_the_target_where_the_answer_is_known():
    curve = build_curve(*synthetic(), bootstrap=300)
    # escalating the k least confident rows gives accuracy (k + 700) / 1000 for k <= 300
    j = choose(curve, parse_target("accuracy>=0.95"))
    assert curve.escalated[j] == 250 and curve.quality[j] == pytest.approx(0.95)
    assert curve.thresholds[j] == pytest.approx(0.25)  # between the 250th and 251st confidence
    assert curve.quality_lo[j] <= 0.95 <= curve.quality_hi[j] and curve.quality_hi[j] - curve.quality_lo[j] < 0.05
    j = choose(curve, parse_target("usd_per_1m<=100"))  # 1,000 rows: each escalated row adds $1 per 1M rows
    assert curve.escalated[j] == 100 and curve.quality[j] == pytest.approx(0.8)
    j = choose(curve, parse_target("frontier_gap<=2pt"))  # frontier alone is perfect here
    assert curve.escalated[j] == 280
    # conservative: the interval's lower end must clear the target, so it escalates more
    assert curve.escalated[choose(curve, parse_target("accuracy>=0.95"), conservative=True)] > 250
    assert (
        choose(build_curve(*synthetic(frontier_wrong=range(100)), bootstrap=50), parse_target("accuracy>=0.95")) is None
    )


def stage_rows_from(small, frontier, confidence, small_usd, frontier_usd) -> StageRows:
    n = len(small)
    return StageRows(
        name="intent",
        kind="classify",
        gold=["x"] * n,
        small=["x" if s else "y" for s in small],
        confidence=confidence,
        cascade=["x"] * n,
        frontier=["x" if f else "y" for f in frontier],
        escalated=[True] * n,
        escalatable=[True] * n,
        small_cost=small_usd,
        frontier_cost=frontier_usd,
    )


def test_calibration_says_how_sure_it_is_and_when_the_validation_set_is_too_small():
    big = calibrate_stage(stage_rows_from(*synthetic()), parse_target("accuracy>=0.95"), bootstrap=300)
    assert big["met"] and big["chosen"]["escalation_rate"] == pytest.approx(0.25)
    assert big["chosen"]["saving_vs_frontier"] == pytest.approx(0.75)  # free small model, 25% sent up
    # the lowest escalation meeting the target sits at the target: a coin flip whether it holds
    assert 0.2 < big["chosen"]["probability_target_met"] < 0.8
    sure = next(w for w in big["warnings"] if "at the 95% level (--conservative) escalate" in w)
    assert "escalate 2" in sure  # being sure costs a few more points of escalation, stated
    few = calibrate_stage(
        stage_rows_from(*synthetic(n=60, wrong_below=18)), parse_target("accuracy>=0.95"), bootstrap=300
    )
    assert "only 60 labelled rows" in " ".join(few["warnings"])
    # the frontier alone is exactly at the target: nothing clears it at the 95% level
    edge = calibrate_stage(
        stage_rows_from(*synthetic(frontier_wrong=range(50))), parse_target("accuracy>=0.95"), bootstrap=300
    )
    assert edge["met"] and "too small for this target" in " ".join(edge["warnings"])
    assert rows_needed(100, 0.96, 0.92, 0.95) == 1600  # half-width 0.04 must shrink to the 0.01 margin
    missed = calibrate_stage(
        stage_rows_from(*synthetic(frontier_wrong=range(100))), parse_target("accuracy>=0.95"), bootstrap=50
    )
    assert not missed["met"] and "not reachable" in missed["warnings"][0]


def test_targets_are_checked_and_name_the_option():
    assert parse_target("intent: accuracy >= 0.9").stage == "intent"
    assert parse_target("frontier_gap<=1pt").value == pytest.approx(0.01)
    for bad in ("accuracy<=0.9", "accuracy>=1.5", "speed>=3", "nonsense"):
        with pytest.raises(ConfigError, match="--target"):
            parse_target(bad)


def test_thresholds_file_round_trips_into_a_job_and_its_run_report(tmp_path, tiny_classifier):
    record = calibrate_stage(
        stage_rows_from(*synthetic()),
        parse_target("accuracy>=0.95"),
        bootstrap=100,
        gold_source="labels",
        frontier_model="big",
    )
    path = tmp_path / "job.thresholds.json"
    path.write_text(json.dumps(calibration_file("j", [record], {"source": "val"})))
    thresholds = load_thresholds(str(path))
    assert thresholds == {"intent": pytest.approx(0.25)}
    model = Model(tiny_classifier)
    job = Job(
        name="j",
        source=ParquetSource(str(tmp_path / "in")),
        sink=ParquetSink(str(tmp_path / "out")),
        stages=[Classify("intent", model=model, input="text", labels=["ham", "spam"], threshold=thresholds["intent"])],
    )
    stage = pickle.loads(pickle.dumps(job)).stages[0]  # as Ray ships it to the actors
    assert stage.threshold == thresholds["intent"] and stage.threshold.calibration["target"] == "accuracy>=0.95"
    assert "threshold=0.25" in job.describe()
    stats = StageStats(
        "intent",
        "classify",
        threshold=0.25,
        rows=100,
        ran=100,
        answered=100,
        escalation_wanted=27,
        calibration=stage.threshold.calibration,
    )
    summary = RunSummary(job="j", run_id="r", sink="s", started="t", stages=[stats])
    assert "calibrated for accuracy>=0.95 on 1,000 rows: predicted escalation 25.0%" in summary.render()
    again = RunSummary.from_dict(json.loads(summary.to_json()))
    assert "cost-quality curve of intent" in render_html(json.loads(again.to_json()))
    # a plain thresholds file works too, and a bad value names the stage
    path.write_text(json.dumps({"intent": 0.4}))
    assert load_thresholds(str(path)) == {"intent": 0.4}
    path.write_text(json.dumps({"thresholds": {"intent": 4}}))
    with pytest.raises(ConfigError, match="intent"):
        load_thresholds(str(path))


def test_eval_table_counts_the_cascade_from_the_row_format():
    rows = StageRows(
        name="intent",
        kind="classify",
        gold=["a", "b", "c", "a"],
        small=["a", "a", "a", "a"],
        confidence=[0.9, 0.2, 0.3, 0.8],
        cascade=["a", "b", "a", "a"],
        frontier=[None, "b", None, None],
        escalated=[False, True, False, False],
        escalatable=[True] * 4,
        small_cost=[1e-6] * 4,
        frontier_cost=[0.0, 1e-4, 0.0, 0.0],
    )
    table = {s["system"]: s for s in evaluate_stage(rows)["systems"]}
    assert table["small model"]["accuracy"] == 0.5 and table["cascade"]["accuracy"] == 0.75
    assert table["cascade"]["escalation_rate"] == 0.25
    assert table["frontier, escalated rows"]["accuracy"] == 1.0 and table["frontier, escalated rows"]["rows"] == 1
    assert table["cascade"]["usd_per_1k_rows"] == pytest.approx((4e-6 + 1e-4) / 4 * 1000)


def test_gold_comes_from_a_labels_file_or_the_output_and_may_be_a_record_of_columns():
    import polars as pl

    from slmbatch import Extract
    from slmbatch.evaluate import with_gold

    model = Model("some/model")
    job = Job(
        name="j",
        source=ParquetSource("in"),
        sink=ParquetSink("out"),
        stages=[
            Classify("intent", model=model, input="text", labels=["a", "b"]),
            Extract(
                "booking",
                model=model,
                input="text",
                schema={"type": "object", "properties": {"people": {"type": "string"}, "time": {"type": "string"}}},
            ),
        ],
    )
    output = pl.DataFrame(
        {"id": [1, 2], "text": ["x", "y"], "label": ["a", "b"], "people": ["2", None], "time": ["7pm", "8pm"]}
    )
    frame, found = with_gold(job, output, None, None, {"intent": "label", "booking": "people,time"})
    assert frame["_gold_intent"].to_list() == ["a", "b"]
    assert frame["_gold_booking"].to_list() == [{"people": "2", "time": "7pm"}, {"people": None, "time": "8pm"}]
    assert found == {"intent": "output column 'label'", "booking": "output columns 'people,time'"}
    labels = pl.DataFrame({"id": [2, 1], "intent": ["b", "b"]})
    frame, found = with_gold(job, output, labels, "id", {})
    assert frame.sort("id")["_gold_intent"].to_list() == ["b", "b"] and list(found) == ["intent"]
    with pytest.raises(ConfigError, match="--key"):
        with_gold(job, output, labels, None, {})
    with pytest.raises(ConfigError, match="--gold: column 'nope'"):
        with_gold(job, output, None, None, {"intent": "nope"})


def test_error_kinds_group_numbers_but_keep_those_in_names():
    from slmbatch.report import error_kind

    assert error_kind("prompt is 1102 tokens, max 512") == error_kind("prompt is 990 tokens, max 512")
    assert error_kind("prompt is 1102 tokens, max 512") == "prompt is N tokens, max N"
    assert error_kind("input column 'text' is not valid UTF-8") == "input column 'text' is not valid UTF-8"
    assert error_kind("gpt-4 said 3 things about Qwen2.5-0.5B") == "gpt-4 said N things about Qwen2.5-0.5B"
    assert error_kind("HTTP 429: slow down after 3 tries") == "HTTP 429: slow down after N tries"  # statuses stay


def test_a_run_degraded_only_by_an_unanswering_frontier_is_told_to_check_it_not_to_recalibrate():
    from slmbatch.report import degraded_advice

    outage = "stage s: 20 of the 20 rows sent to the frontier got no answer from it; they keep ..."
    drift = "stage s: escalation 40.0% [30.0%, 50.0%] is outside the calibrated band"
    assert degraded_advice([outage]).startswith("the frontier did not answer: check it")
    assert "recalibrate" in degraded_advice([outage, drift]) and "recalibrate" in degraded_advice([drift])


def test_long_error_kinds_are_cut_at_a_word():
    from slmbatch.report import error_kind

    reason = "batch slm-9bd04a85 ended refused (Batch API POST /batches: HTTP 400: file too large) without answering it"
    kind = error_kind(reason)
    assert len(kind) <= 80 and kind.endswith("...") and reason.startswith(kind[:-3])
    assert kind[:-3].endswith(("HTTP 400:", "file", "too"))  # a whole word before the "..."


def test_a_derived_sink_is_beside_the_jobs_never_inside_it():
    from slmbatch import Frontier
    from slmbatch.evaluate import escalate_all, sibling_sink

    job = Job(
        name="j",
        source=ParquetSource("s3://acme/in/"),
        sink=ParquetSink("s3://acme/out/"),
        stages=[Classify("c", model=Model("m"), input="text", labels=["a", "b"], threshold=0.5)],
        frontier=Frontier(base_url="http://127.0.0.1:9/v1", model="f", api_key_env=None),
    )
    assert sibling_sink(job, "-calibration") == "s3://acme/out-calibration"
    assert escalate_all(job, sibling_sink(job, "-frontier-all")).sink.path == "s3://acme/out-frontier-all"
    for inside in ("s3://acme/out/-frontier-all", "s3://acme/out", "s3://acme/out/x/"):
        with pytest.raises(ConfigError, match="inside the job's sink"):
            escalate_all(job, inside)


def test_the_all_frontier_estimate_prices_every_billed_reply_an_unusable_one_included():
    import pyarrow as pa

    from slmbatch.columns import ROW_ID

    stage = Classify("c", model=Model("m"), input="t", labels=["a", "b"], threshold=0.5)
    c, n = stage.columns, 10
    columns = {f.name: pa.nulls(n, f.type) for f in stage.output_schema()}
    columns[c.model] = pa.array(["m"] * n)
    columns[c.tokens_in], columns[c.tokens_out] = pa.array([0] * n), pa.array([0] * n)
    columns[c.confidence] = pa.array([0.1] * 4 + [0.9] * 6)
    columns[c.escalation] = pa.array(["confidence 0.100 < threshold 0.5"] * 4 + [None] * 6)
    columns[c.routed_to] = pa.array(["frontier", "frontier", "small", "small"] + ["small"] * 6)
    bad = "frontier answered 'zzz', which is not one of the labels"
    columns[c.frontier_error] = pa.array([None, None, bad, bad] + [None] * 6)
    columns[c.frontier_tokens_in] = pa.array([40] * 4 + [None] * 6, pa.int64())
    columns[c.frontier_cost_usd] = pa.array([1.0] * 4 + [None] * 6)
    stats = StageStats("c", "classify")
    stats.add(pa.table({ROW_ID: [f"f:{i}" for i in range(n)], **columns}), stage)
    assert (stats.frontier_paid, stats.frontier_failed, stats.escalated) == (4, 2, 2)
    assert stats.all_frontier_cost_usd == pytest.approx(10.0)  # $1 a reply, 10 rows


def test_the_bootstrap_keeps_its_resamples_on_many_rows_and_its_interval_holds_the_estimate():
    import numpy as np

    from slmbatch.calibrate import MAX_CANDIDATES, MIN_RESAMPLES

    rng = np.random.default_rng(1)
    n = 300_000  # 16 resamples would fit the old memory bound
    confidence = rng.random(n)
    small = (rng.random(n) < 0.5 + 0.4 * confidence).astype(float)
    curve = build_curve(small, np.ones(n), confidence, np.zeros(n), np.full(n, 1e-5), bootstrap=MIN_RESAMPLES)
    assert curve.resamples == MIN_RESAMPLES and len(curve.thresholds) <= MAX_CANDIDATES
    inside = (curve.quality_lo <= curve.quality + 1e-12) & (curve.quality <= curve.quality_hi + 1e-12)
    assert inside.all() and (curve.quality_hi - curve.quality_lo)[1:-1].min() > 0


def test_outputs_of_nights_whose_input_types_differ_read_as_one_frame():
    import pyarrow as pa

    from slmbatch.errors import InputError
    from slmbatch.evaluate import one_frame

    night1 = pa.table({"id": pa.array([1, 2], pa.int64()), "spam": ["ham", "spam"]})
    night2 = pa.table({"id": pa.array([3], pa.int32()), "spam": ["ham"]})
    frame = one_frame([night1, night2], "out/")
    assert frame["id"].to_list() == [1, 2, 3] and frame.height == 3
    with pytest.raises(InputError, match="the output files in out/ cannot be read as one table"):
        one_frame([night1, pa.table({"id": ["x"], "spam": ["ham"]})], "out/")


def test_evaluating_output_that_is_not_the_stages_says_so():
    import polars as pl

    from slmbatch.errors import InputError
    from slmbatch.evaluate import stage_rows

    job = Job(
        name="j",
        source=ParquetSource("in/"),
        sink=ParquetSink("out/"),
        stages=[Classify("intent", model=Model("m"), input="text", labels=["a", "b"])],
    )
    other = pl.DataFrame({"text": ["x"], "spam": ["ham"], "spam_model": ["m"]})  # another job's sink
    with pytest.raises(InputError, match="no column 'intent': it holds no output of stage 'intent' of job 'j'"):
        stage_rows(job, other, "intent")
