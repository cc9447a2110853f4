"""Quality in production: audit sampling, the weighted estimate, degraded runs, recalibration from runs.

The estimator and recalibration are checked on synthetic populations whose
answer is known in closed form; the audit itself on a real job (real Ray and
vLLM, a frontier over HTTP), including across a resume and through the CLI.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slmbatch.audit import (
    PSI_LIMIT,
    audit_sampled,
    confidence_histogram,
    drift_reasons,
    estimate,
    psi,
    rate_interval,
)
from slmbatch.calibrate import build_curve, calibrate_stage, parse_target
from slmbatch.errors import EXIT_CRASH, EXIT_DEGRADED
from slmbatch.evaluate import StageRows
from slmbatch.hooks import _observers, add_observer
from slmbatch.report import StageStats

from .conftest import banking_texts, write_shards
from .faultserver import FaultServer, frontier_reply, rule

# -- the sample ----------------------------------------------------------------------------


def test_the_audit_sample_is_a_function_of_row_stage_and_seed():
    ids = [f"part-{i // 1000}.parquet:{i % 1000}" for i in range(20_000)]
    picked = [audit_sampled(r, "intent", 0.05) for r in ids]
    assert picked == [audit_sampled(r, "intent", 0.05) for r in ids]  # same call, same answer
    assert abs(sum(picked) / len(ids) - 0.05) < 0.005
    other_seed = [audit_sampled(r, "intent", 0.05, seed=1) for r in ids]
    other_stage = [audit_sampled(r, "topic", 0.05) for r in ids]
    assert picked != other_seed and picked != other_stage
    # a higher rate audits a superset: raising audit_rate keeps every row audited before
    wider = [audit_sampled(r, "intent", 0.2) for r in ids]
    assert all(w for p, w in zip(picked, wider) if p)
    assert not any(audit_sampled(r, "intent", 0.0) for r in ids[:100])
    assert all(audit_sampled(r, "intent", 1.0) for r in ids[:100])


# -- the estimator, against a closed form ------------------------------------------------------


def _tally(values_sent, values_kept, rate, seed):
    """Sums of a two-stratum population: every sent row observed, kept rows by the audit sample."""
    kept_ids = [f"k:{i}" for i in range(len(values_kept))]
    sample = [v for r, v in zip(kept_ids, values_kept) if audit_sampled(r, "s", rate, seed)]
    sums = {
        "sent": [len(values_sent), float(sum(values_sent)), float(sum(v * v for v in values_sent))],
        "kept": [len(sample), float(sum(sample)), float(sum(v * v for v in sample))],
    }
    return {"sent": len(values_sent), "kept": len(values_kept)}, sums


def test_audit_settings_are_checked_when_the_job_is_defined():
    from slmbatch import Classify, ConfigError, Frontier, Job, Model, ParquetSink, ParquetSource

    m = Model("m")

    def stage(**kw):
        return Classify("c", model=m, input="text", labels=["a", "b"], **kw)

    with pytest.raises(ConfigError, match=r"Classify\.audit_rate"):
        stage(threshold=0.5, audit_rate=1.5)
    with pytest.raises(ConfigError, match=r"Classify\.audit_rate.*threshold"):
        stage(audit_rate=0.02)  # nothing is routed, so nothing to measure
    with pytest.raises(ConfigError, match=r"Job\.stages\[0\]\.audit_rate.*Job\.frontier"):
        Job(
            name="j",
            source=ParquetSource("in"),
            sink=ParquetSink("out"),
            stages=[stage(threshold=0.5, audit_rate=0.02)],
        )
    frontier = Frontier(base_url="http://127.0.0.1:1/v1", model="x")
    job = Job(
        name="j",
        source=ParquetSource("in", columns=["text", "gold"]),
        sink=ParquetSink("out"),
        stages=[stage(threshold=0.5, audit_rate=0.02, gold="gold")],
        frontier=frontier,
    )
    assert job.stages[0].audit_rate == 0.02
    with pytest.raises(ConfigError, match=r"reads column 'label'"):  # the gold column must exist
        Job(
            name="j",
            source=ParquetSource("in", columns=["text"]),
            sink=ParquetSink("out"),
            stages=[stage(threshold=0.5, gold="label")],
            frontier=frontier,
        )


def test_the_weighted_estimate_is_unbiased_and_its_interval_covers_the_truth():
    # 1,000 escalated rows agreeing 60%, 9,000 kept rows agreeing 90%: truth (600 + 8100) / 10000.
    sent = [1.0] * 600 + [0.0] * 400
    kept = ([1.0] * 9 + [0.0]) * 900
    truth = (600 + 8100) / 10_000
    estimates, covered = [], 0
    for seed in range(300):
        rows, sums = _tally(sent, kept, 0.05, seed)
        e = estimate(rows, sums)
        assert e is not None and e["rows"] == 10_000
        estimates.append(e["estimate"])
        covered += e["interval"][0] <= truth <= e["interval"][1]
    # The sample mean of 300 estimates: standard error ~ 0.0045 / sqrt(300) = 0.00026.
    assert abs(np.mean(estimates) - truth) < 0.001
    assert 0.90 <= covered / 300 <= 0.99
    # The naive mean over the rows with a frontier answer is badly biased (escalated rows over-represented).
    rows, sums = _tally(sent, kept, 0.05, 0)
    naive = (sums["sent"][1] + sums["kept"][1]) / (sums["sent"][0] + sums["kept"][0])
    assert naive < truth - 0.05


def test_a_census_is_exact_and_an_unaudited_stratum_has_no_estimate():
    sent, kept = [1.0, 0.0, 1.0], [1.0] * 7 + [0.0] * 3
    rows, sums = _tally(sent, kept, 1.0, 0)
    e = estimate(rows, sums)
    assert e["estimate"] == pytest.approx(9 / 13) and e["interval"] == pytest.approx([9 / 13, 9 / 13])
    rows, sums = _tally(sent, kept, 0.0, 0)
    assert estimate(rows, sums) is None


def test_rows_with_no_usable_input_are_out_of_the_estimate_as_calibration_leaves_them_out():
    """10 escalated rows agreeing half the time, 10 kept rows (all audited) agreeing always, and 80 rows
    whose input no model can answer (the stage's error, no escalation): the estimate is over the 20
    rows a cascade answers: the small model agrees on 0.75 of them, not 0.95 (the 80 weighed as kept rows)."""
    from slmbatch import Classify, Model
    from slmbatch.audit import QualityTally

    stage = Classify("c", model=Model("m"), input="text", labels=["a", "b"], threshold=0.5, audit_rate=1.0)
    c = stage.columns
    rows = (
        [("m", "frontier", "low confidence", None, "a", "a" if i % 2 else "b", None) for i in range(10)]
        + [("m", "small", None, 1.0, "a", "a", None)] * 10
        + [("m", "small", None, None, None, None, "input: empty text")] * 80
    )
    names = [c.model, c.routed_to, c.escalation, c.audit, c.small, c.frontier, c.error]
    table = pa.table(
        {n: pa.array(list(v), pa.float64() if n == c.audit else pa.string()) for n, v in zip(names, zip(*rows))}
    )
    tally = QualityTally()
    tally.add(table, stage)
    assert tally.rows == {"sent": 10, "kept": 10}
    assert tally.estimates()["small_agreement"]["estimate"] == pytest.approx(0.75)
    # A score's interval stays within [0, 1] (it printed "0.000 [-0.045, 0.045]"); a gap may go below 0.
    assert estimate({"sent": 100}, {"sent": [10, 0.0, 0.0]}, floor=0.0)["interval"][0] == 0.0
    assert estimate({"sent": 100}, {"sent": [10, 0.0, 0.0]})["interval"][0] < 0  # unclipped, it would be
    assert estimate({"sent": 10}, {"sent": [3, -0.9, 0.81]})["interval"][0] < 0


def test_weighted_curve_equals_the_curve_of_the_rows_it_stands_for():
    rng = np.random.default_rng(0)
    n = 300
    conf = rng.uniform(0, 1, n).round(3)
    small = (rng.uniform(0, 1, n) < conf).astype(float)
    frontier = np.ones(n)
    weights = rng.integers(1, 5, n)
    weighted = build_curve(small, frontier, conf, np.zeros(n), np.ones(n), weights=weights, bootstrap=10)
    expanded = build_curve(
        np.repeat(small, weights), np.repeat(frontier, weights), np.repeat(conf, weights), np.zeros(weights.sum()),
        np.ones(weights.sum()), bootstrap=10,
    )  # fmt: skip
    assert weighted.thresholds == pytest.approx(expanded.thresholds)
    assert weighted.quality == pytest.approx(expanded.quality)
    assert weighted.escalation_rate == pytest.approx(expanded.escalation_rate)
    assert weighted.usd_per_row == pytest.approx(expanded.usd_per_row)


def _population(n, rng, hard_share):
    """A synthetic cascade: easy rows are confident and right, hard rows unsure and often wrong;
    the frontier is always right. ``hard_share`` shifts the class prior."""
    hard = rng.uniform(0, 1, n) < hard_share
    conf = np.where(hard, rng.uniform(0.2, 0.8, n), rng.uniform(0.6, 1.0, n))
    right = rng.uniform(0, 1, n) < np.where(hard, conf * 0.8, 0.97 + 0.03 * conf)
    return conf, right.astype(float)


def _accuracy_at(threshold, conf, right):
    return float(np.where(conf < threshold, 1.0, right).mean())


def test_recalibration_from_weighted_production_rows_meets_the_target_on_the_shifted_population():
    rng = np.random.default_rng(7)
    target = parse_target("accuracy>=0.95")
    # Calibrated on a 20%-hard validation set...
    conf, right = _population(4000, rng, 0.2)
    labels = ["a" if r else "b" for r in right]
    validation = _stage_rows(conf, labels, ["a"] * len(conf))
    old = calibrate_stage(validation, target, bootstrap=200)["threshold"]
    # ... production shifted to 50% hard: the old threshold misses the target.
    conf, right = _population(20_000, rng, 0.5)
    assert _accuracy_at(old, conf, right) < target.value - 0.01
    # The production run: rows below the old threshold escalated (weight 1), 10% of the rest audited (weight 10).
    ids = [f"p:{i}" for i in range(len(conf))]
    keep = [c < old or audit_sampled(r, "intent", 0.1) for c, r in zip(conf, ids)]
    weight = [1.0 if c < old else 10.0 for c in conf]
    index = [i for i, k in enumerate(keep) if k]
    labels = ["a" if r else "b" for r in right]
    production = _stage_rows(conf[index], [labels[i] for i in index], ["a"] * len(index), [weight[i] for i in index])
    new = calibrate_stage(production, target, bootstrap=200)
    assert new["met"] and new["threshold"] > old
    # On a further slice of the shifted population, the new threshold meets the target within a point.
    conf, right = _population(20_000, rng, 0.5)
    assert _accuracy_at(new["threshold"], conf, right) >= target.value - 0.01
    assert new["chosen"]["escalation_rate"] == pytest.approx(float((conf < new["threshold"]).mean()), abs=0.03)


def _stage_rows(conf, small, frontier, weight=None) -> StageRows:
    n = len(conf)
    return StageRows(
        name="intent",
        kind="classify",
        gold=list(frontier),
        small=list(small),
        confidence=[float(c) for c in conf],
        cascade=list(small),
        frontier=list(frontier),
        escalated=[True] * n,
        escalatable=[True] * n,
        small_cost=[0.0] * n,
        frontier_cost=[1e-5] * n,
        weight=weight,
    )


# -- drift -----------------------------------------------------------------------------------------


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift():
    calm = confidence_histogram(np.linspace(0.05, 0.95, 1000))
    assert psi(calm, calm) == pytest.approx(0.0)
    assert psi(calm, confidence_histogram(np.linspace(0.0, 0.4, 1000))) > PSI_LIMIT


def _calibrated_stats(wanted: int, ran: int, agreement=None) -> StageStats:
    stats = StageStats("intent", "classify", threshold=0.5, ran=ran, answered=ran, escalation_wanted=wanted)
    stats.histogram = [ran // 10] * 10
    stats.calibration = {
        "target": "frontier_gap<=1pt",
        "target_kind": "frontier_gap",
        "target_value": 0.01,
        "metric": "accuracy",
        "confidence_histogram": [100] * 10,
        "chosen": {"escalation_interval": [0.2, 0.25], "agreement_interval": [0.96, 0.98]},
    }
    if agreement is not None:
        stats.quality = {"cascade_agreement": {"estimate": agreement, "interval": [agreement - 0.01, agreement + 0.01]}}
    return stats


def test_the_trend_compares_each_run_with_the_band_of_its_own_calibration_in_the_same_measure():
    from slmbatch.report import render_trend, trend

    def run(date, calibration_gold, quality):
        chosen = {
            "escalation_interval": [0.2, 0.3] if calibration_gold != "frontier" else [0.4, 0.5],
            "quality_interval": [0.89, 0.93] if calibration_gold != "frontier" else [0.97, 1.0],
            "agreement_interval": [0.96, 0.99] if calibration_gold != "frontier" else [0.97, 1.0],
        }
        stage = {"name": "intent", "threshold": 0.5, "ran": 100, "escalation_wanted": 30, "quality": quality}
        stage["calibration"] = {"gold": calibration_gold, "metric": "accuracy", "chosen": chosen}
        return {"run_date": date, "stages": [stage], "degraded": []}

    accuracy = {"cascade_quality": {"estimate": 0.9, "interval": [0.88, 0.92]}}
    agreement = {"cascade_agreement": {"estimate": 0.98, "interval": [0.97, 0.99]}}
    runs = {
        "a": run("2026-12-01", "output column 'label'", {**accuracy, **agreement}),  # labels: accuracy band
        "b": run("2026-12-02", "frontier", {**accuracy, **agreement}),  # recalibrated without labels
        "c": run("2026-12-03", "frontier", agreement),
        "d": run("2026-12-04", "frontier", {}),  # no audit: nothing to compare
    }
    points = trend(runs)["intent"]
    assert [p["quality_measure"] for p in points[:3]] == ["cascade_quality", "cascade_quality", "cascade_agreement"]
    assert [p["calibrated_quality"] for p in points] == [[0.89, 0.93], None, [0.97, 1.0], None]
    assert [p["calibrated_escalation"] for p in points] == [[0.2, 0.3], [0.4, 0.5], [0.4, 0.5], [0.4, 0.5]]
    assert "[0.890, 0.930]" in render_trend(runs)


def test_a_run_is_degraded_when_escalation_quality_or_confidences_leave_the_calibrated_band():
    assert drift_reasons(_calibrated_stats(225, 1000, agreement=0.97)) == []
    assert "escalation 30.8%" in drift_reasons(_calibrated_stats(308, 1000))[0]
    # a small run's own noise is allowed for: 3 of 10 is inside [20%, 25%] at the 95% level
    assert drift_reasons(_calibrated_stats(3, 10)) == []
    assert rate_interval(3, 10)[0] < 0.25
    assert "agrees with the frontier" in drift_reasons(_calibrated_stats(225, 1000, agreement=0.90))[0]
    shifted = _calibrated_stats(225, 1000)
    shifted.histogram = [500, 300, 200, 0, 0, 0, 0, 0, 0, 0]
    assert "PSI" in drift_reasons(shifted)[0]
    uncalibrated = _calibrated_stats(900, 1000)
    uncalibrated.calibration = None
    assert drift_reasons(uncalibrated) == []
    # the rate is over the rows that could go to the frontier, as calibration's: 250 empty inputs are not
    bad_input = _calibrated_stats(200, 1250, agreement=0.97)
    assert "escalation 16.0%" in drift_reasons(bad_input)[0]  # a record that does not count them
    bad_input.escalatable = 1000
    assert drift_reasons(bad_input) == [] and bad_input.escalation_rate == 0.2


def test_a_run_whose_frontier_left_rows_unanswered_is_degraded_calibrated_or_not():
    """A frontier outage, a wrong URL or key: the rows keep the small model's answer, and the run says so."""
    stats = _calibrated_stats(225, 1000, agreement=0.97)
    stats.calibration = None
    stats.escalated, stats.frontier_failed = 198, 2  # 1% of the rows sent: within the allowance
    stats.frontier_errors = {"HTTP N: content policy": 2}
    assert drift_reasons(stats) == []
    stats.escalated, stats.frontier_failed = 0, 200
    stats.frontier_errors = {"ConnectError: All connection attempts failed": 199, "HTTP N: content policy": 1}
    assert drift_reasons(stats) == [
        f"stage {stats.name}: 200 of the 200 rows sent to the frontier got no answer from it (most often: "
        f"ConnectError: All connection attempts failed); they keep the small model's answer, and "
        f"{stats.name}_frontier_error says why"
    ]


def test_the_html_report_gives_the_escalation_rate_of_rows_that_wanted_the_frontier_answered_or_not():
    """40 of 40 rows under the bar and the frontier answered none (an outage): 100%, as the summary says."""
    from slmbatch.html_report import render_html
    from slmbatch.report import RunSummary

    stats = _calibrated_stats(40, 40)
    stats.escalatable, stats.escalated, stats.frontier_failed = 40, 0, 40
    summary = RunSummary(job="j", run_id="r", sink="/tmp/x", started="2026-12-07T00:00:00+00:00", stages=[stats])
    html = render_html(json.loads(summary.to_json()))
    table = html[html.index("<h2>Escalation, tokens and cost</h2>") :]
    assert "<td>100.0%</td>" in table and "<td>0.0%</td>" not in table


# -- a real job ------------------------------------------------------------------------------------------

ROWS = 90
AUDIT_RATE = 0.3


JOB = """
import os
from slmbatch import Classify, Frontier, Job, Model, ParquetSink, ParquetSource, load_thresholds
thresholds = load_thresholds(os.environ["AUDIT_TEST_THRESHOLDS"]) if os.environ.get("AUDIT_TEST_THRESHOLDS") else {{}}
clf = Model({model!r}, num_cpus=0.5, batch_size=15, engine={{"max_model_len": 256, "dtype": "float32"}},
            price_in_per_mtok=0.01, price_out_per_mtok=0.01)
job = Job(name="audited", source=ParquetSource({source!r}), sink=ParquetSink(os.environ["AUDIT_TEST_SINK"]),
          stages=[Classify("spam", model=clf, input="text", labels=["ham", "spam"],
                           threshold=thresholds.get("spam", 0.55), audit_rate={rate}, gold="gold")],
          frontier=Frontier(base_url={url!r}, model="rule-frontier", api_key_env=None, actors=1, concurrency=4,
                            price_in_per_mtok=1.0, price_out_per_mtok=4.0))
"""


@pytest.fixture(scope="module")
def audited(tmp_path_factory, ray_local, tiny_classifier):
    import os

    from slmbatch.cli import main

    base = tmp_path_factory.mktemp("audit")
    texts = banking_texts(ROWS)
    write_shards(base / "in", texts, shards=3, row_group_size=15, extra={"gold": [rule(t) for t in texts]})
    with FaultServer(reply=frontier_reply) as server:
        job_file = base / "job.py"
        job_file.write_text(
            JOB.format(model=tiny_classifier, source=str(base / "in"), url=server.base_url, rate=AUDIT_RATE)
        )

        def run(sink, *extra):
            os.environ["AUDIT_TEST_SINK"] = str(base / sink)
            return main(["run", str(job_file), "--no-progress", *extra])

        codes = {"whole": run("whole")}

        # The same job, stopped after its first shard is recorded, then resumed.
        def stop_after_first_shard(point):
            if point == "marked":
                _observers.remove(stop_after_first_shard)
                raise RuntimeError("stopped after the first shard")

        add_observer(stop_after_first_shard)
        assert run("resumed") == EXIT_CRASH  # said on one line: "slmbatch: unexpected error: RuntimeError: ..."
        codes["resumed"] = run("resumed")
        yield base, job_file, codes, run, server
    os.environ.pop("AUDIT_TEST_SINK", None)


def _read(base, sink):
    return pl.read_parquet(base / sink / "*.parquet").sort("_row_id")


def _summary(base, sink):
    runs = sorted((base / sink / "_slmbatch" / "runs").glob("*.json"))
    return json.loads(runs[-1].read_text())


def test_audited_rows_keep_the_small_answer_and_record_the_frontiers(audited):
    base, _, codes, _, _ = audited
    assert codes["whole"] == 0
    df = _read(base, "whole")
    assert df.height == ROWS and df["_row_id"].n_unique() == ROWS  # no row lost or duplicated
    audit = df.filter(pl.col("spam_audit").is_not_null())
    kept = df.filter(pl.col("spam_escalation").is_null())
    assert audit.height > 0 and audit.height == kept.filter(pl.col("spam_audit") > 0).height
    assert (audit["spam_audit"] == AUDIT_RATE).all()
    assert (audit["spam_routed_to"] == "small").all() and (audit["spam"] == audit["spam_small"]).all()
    assert audit["spam_frontier"].to_list() == [rule(t) for t in audit["text"]]
    # exactly the rows the sample function picks, among the rows kept
    expected = {r for r in kept["_row_id"] if audit_sampled(r, "spam", AUDIT_RATE)}
    assert set(audit["_row_id"]) == expected
    # escalations are what they were: below the threshold, answered by the frontier
    escalated = df.filter(pl.col("spam_escalation").is_not_null())
    assert (escalated["spam_routed_to"] == "frontier").all() and escalated[
        "spam_audit"
    ].null_count() == escalated.height


def test_the_audit_sample_is_the_same_across_a_resume(audited):
    base, _, codes, _, _ = audited
    assert codes["resumed"] == 0
    whole, resumed = _read(base, "whole"), _read(base, "resumed")
    assert resumed.height == ROWS and resumed["_row_id"].n_unique() == ROWS
    columns = ["_row_id", "spam_audit", "spam_routed_to", "spam_frontier", "spam"]
    assert whole.select(columns).equals(resumed.select(columns))


def test_the_run_reports_audit_cost_and_a_quality_estimate_that_covers_the_truth(audited):
    base, _, _, _, _ = audited
    df = _read(base, "whole")
    stage = _summary(base, "whole")["stages"][0]
    audit = df.filter(pl.col("spam_audit").is_not_null())
    escalated = df.filter(pl.col("spam_routed_to") == "frontier")
    assert stage["audited"] == audit.height and stage["escalated"] == escalated.height
    assert stage["escalatable"] == stage["ran"] == df.height  # every input usable: every row could go
    assert stage["audit_cost_usd"] == pytest.approx(audit["spam_frontier_cost_usd"].sum())
    assert stage["frontier_cost_usd"] == pytest.approx(escalated["spam_frontier_cost_usd"].sum())
    quality = stage["quality"]
    true_accuracy = float((df["spam"] == df["gold"]).mean())
    lo, hi = quality["cascade_quality"]["interval"]
    assert lo <= true_accuracy <= hi
    # the frontier is the gold here, so agreement with it is accuracy
    assert quality["cascade_agreement"]["estimate"] == pytest.approx(quality["cascade_quality"]["estimate"])
    assert quality["cascade_quality"]["observed_rows"] == audit.height + escalated.height
    small_truth = float((df["spam_small"] == df["gold"]).mean())
    lo, hi = quality["small_quality"]["interval"]
    assert lo - 0.02 <= small_truth <= hi + 0.02 and not math.isnan(quality["small_quality"]["estimate"])


def test_failed_audit_calls_keep_every_row_and_the_accounting_whole(audited, tmp_path, tiny_classifier):
    """Audit calls share the frontier's faults: a failed one leaves its row as the small model
    answered it, is counted apart from escalation failures, and is not observed by the estimate."""
    import os

    from slmbatch.cli import main

    base, _, _, _, _ = audited
    whole = _read(base, "whole")
    audited_texts = whole.filter(pl.col("spam_audit") > 0)["text"].to_list()
    poisoned = set(audited_texts[::2])  # half the audit sample gets an answer outside the label set

    def reply(body: dict) -> str:
        text = body["messages"][-1]["content"].split("Text: ", 1)[1].rsplit("\n\nLabel:", 1)[0]
        return json.dumps({"label": "eggs"}) if text in poisoned else frontier_reply(body)

    with FaultServer(reply=reply, rate=0.3, faults=("429", "500"), max_faults_per_key=1, seed=5) as server:
        job_file = tmp_path / "job.py"
        job_file.write_text(
            JOB.format(model=tiny_classifier, source=str(base / "in"), url=server.base_url, rate=AUDIT_RATE)
        )
        os.environ["AUDIT_TEST_SINK"] = str(base / "faulty")
        assert main(["run", str(job_file), "--no-progress"]) == 0
    df = _read(base, "faulty")
    assert df.height == ROWS and df["_row_id"].n_unique() == ROWS
    audit = df.filter(pl.col("spam_audit") > 0)
    assert set(audit["_row_id"]) == set(whole.filter(pl.col("spam_audit") > 0)["_row_id"])  # the same sample
    failed = audit.filter(pl.col("spam_frontier_error").is_not_null())
    assert set(failed["text"]) == poisoned
    assert (failed["spam"] == failed["spam_small"]).all() and (failed["spam_routed_to"] == "small").all()
    assert failed["spam_frontier"].null_count() == failed.height and failed["spam_error"].null_count() == failed.height
    stage = _summary(base, "faulty")["stages"][0]
    assert (stage["audited"], stage["audit_failed"], stage["errored"]) == (audit.height, failed.height, 0)
    assert stage["frontier_failed"] == 0  # escalation failures are counted apart
    escalated = df.filter(pl.col("spam_escalation").is_not_null())
    observed = escalated.height + audit.height - failed.height
    assert stage["quality"]["cascade_quality"]["observed_rows"] == observed


def test_a_degraded_run_exits_with_its_code_after_writing_everything(audited, tmp_path, capsys):
    import os

    base, job_file, _, run, _ = audited
    # A calibration that promised far fewer escalations than the job makes: its threshold
    # escalates about half the rows.
    median = float(_read(base, "whole")["spam_confidence"].median())
    thresholds = tmp_path / "t.json"
    record = {
        "stage": "spam",
        "target": "frontier_gap<=1pt",
        "target_kind": "frontier_gap",
        "target_value": 0.01,
        "metric": "accuracy",
        "rows": 1000,
        "chosen": {
            "threshold": median,
            "escalation_rate": 0.001,
            "escalation_interval": [0.0, 0.002],
            "quality": 0.99,
            "quality_interval": [0.98, 1.0],
        },
    }
    thresholds.write_text(json.dumps({"thresholds": {"spam": median}, "stages": {"spam": record}}))
    os.environ["AUDIT_TEST_THRESHOLDS"] = str(thresholds)
    try:
        assert run("degraded-ok") == 0  # without the flag: a warning, exit 0
        assert "WARNING: run DEGRADED" in capsys.readouterr().out
        assert run("degraded", "--fail-on-degraded") == EXIT_DEGRADED
    finally:
        del os.environ["AUDIT_TEST_THRESHOLDS"]
    assert _read(base, "degraded").height == ROWS  # everything written
    summary = _summary(base, "degraded")
    assert summary["degraded"] and "outside the calibrated interval" in summary["degraded"][0]
    from slmbatch.cli import main

    assert main(["status", str(base / "degraded")]) == 0
    assert "DEGRADED" in capsys.readouterr().out


def test_calibrate_from_runs_learns_from_escalated_and_audited_rows(audited, tmp_path, capsys):
    from slmbatch.cli import main

    base, job_file, _, _, _ = audited
    out = tmp_path / "recal.json"
    code = main(
        [
            "calibrate",
            str(job_file),
            "--from-runs",
            str(base / "whole"),
            "--target",
            "frontier_gap<=5pt",
            "--bootstrap",
            "100",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr()
    record = json.loads(out.read_text())["stages"]["spam"]
    df = _read(base, "whole")
    observed = df.filter(pl.col("spam_frontier").is_not_null())
    weights = np.where(observed["spam_audit"].is_not_null(), 1 / AUDIT_RATE, 1.0)
    assert record["rows"] == observed.height
    # the weighted rows stand for the whole run
    t = record["threshold"]
    escalated = weights[(observed["spam_confidence"] < t).to_numpy()].sum() / weights.sum()
    assert record["chosen"]["escalation_rate"] == pytest.approx(escalated)
    assert record["gold"] == "frontier" and "agreement with the frontier" in " ".join(record["warnings"])
    assert "learning from" in capsys.readouterr().out


def test_calibrate_from_runs_refuses_runs_with_no_audited_row(audited, tmp_path, capsys):
    """Without an audit sample the runs hold only their escalated rows: a threshold learnt from those
    alone would stand for the wrong population."""
    from slmbatch.cli import main

    base, job_file, _, _, _ = audited
    unaudited = tmp_path / "unaudited"
    shutil.copytree(base / "whole", unaudited)
    for marker in (unaudited / "_slmbatch" / "done").glob("*.json"):  # the copy's markers name the copy's files
        marker.write_text(marker.read_text().replace(str(base / "whole"), str(unaudited)))
    for path in unaudited.glob("*.parquet"):
        table = pq.read_table(path)
        column = table.schema.get_field_index("spam_audit")
        pq.write_table(table.set_column(column, "spam_audit", pa.nulls(table.num_rows, pa.float64())), path)
    args = ["calibrate", str(job_file), "--from-runs", str(unaudited), "--target", "frontier_gap<=5pt"]
    assert main([*args, "--out", str(tmp_path / "t.json")]) == 2
    assert "no row of stage(s) spam in these runs was audited" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_report_shows_each_runs_escalation_and_estimate(audited, capsys):
    from slmbatch.cli import main

    base, _, _, _, _ = audited
    assert main(["report", str(base / "resumed")]) == 0
    out = capsys.readouterr().out
    assert "run by run" in out and "acc" in out
    html = next((base / "resumed" / "_slmbatch" / "runs").glob("*.html")).read_text()
    assert "Quality (estimated from escalated and audited rows)" in html
