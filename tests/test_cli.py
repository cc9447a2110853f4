"""The `slmbatch` command as a user runs it: a subprocess on job files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import banking_texts, write_shards

SLMBATCH = [sys.executable, "-m", "slmbatch.cli"]


def job_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return path


def slmbatch_cmd(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*SLMBATCH, *args], capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture
def data_dir(tmp_path):
    write_shards(tmp_path / "in", banking_texts(40), shards=2)
    return tmp_path / "in"


GOOD = """
from slmbatch import Classify, Job, Model, ParquetSink, ParquetSource
clf = Model({model!r}, num_cpus=0.5, engine={{"max_model_len": 256, "dtype": "float32"}})
job = Job(name="cli-test", source=ParquetSource({src!r}, columns={columns}),
          stages=[Classify("spam", model=clf, input={input!r}, labels={labels}{extra})],
          sink=ParquetSink({out!r}))
"""


def render(tmp_path, data_dir, model, **over):
    values = dict(
        model=model,
        src=str(data_dir),
        columns=["text", "n"],
        input="text",
        labels=["ham", "spam"],
        extra="",
        out=str(tmp_path / "out"),
    )
    values.update(over)
    return job_file(tmp_path, GOOD.format(**values))


def test_help_explains_the_commands():
    out = slmbatch_cmd("--help")
    assert out.returncode == 0
    assert "slmbatch validate" in out.stdout and "ray job submit" in out.stdout
    assert "RAY_ADDRESS" in slmbatch_cmd("run", "--help").stdout


def test_validate_accepts_a_good_job_and_reads_the_input(tmp_path, data_dir, tiny_classifier):
    out = slmbatch_cmd("validate", str(render(tmp_path, data_dir, tiny_classifier)))
    assert out.returncode == 0, out.stderr
    assert "ok: job is valid" in out.stdout and "2 files, 40 rows" in out.stdout


@pytest.mark.parametrize(
    "override, field, value",
    [
        (dict(extra=", treshold=0.5"), "Classify.treshold", "treshold"),
        (dict(labels=["ham", "spam", "ham"]), "Classify.labels", "'ham'"),
        (dict(input="body"), "Job.stages[0]", "'body'"),
        (dict(extra=", threshold=2"), "Classify.threshold", "2"),
    ],
)
def test_validate_rejects_a_bad_job_naming_the_field(tmp_path, data_dir, tiny_classifier, override, field, value):
    out = slmbatch_cmd("validate", str(render(tmp_path, data_dir, tiny_classifier, **override)))
    assert out.returncode == 2
    assert f"invalid job: {field}:" in out.stderr and value in out.stderr


def test_validate_rejects_a_stage_column_the_input_files_lack(tmp_path, data_dir, tiny_classifier):
    path = render(tmp_path, data_dir, tiny_classifier, columns=None, input="body")
    out = slmbatch_cmd("validate", str(path))
    assert out.returncode == 2
    assert "Job.stages[0] ('spam')" in out.stderr and "'body'" in out.stderr


def test_validate_says_which_files_a_run_would_set_aside_and_that_the_run_would_fail(tmp_path, tiny_classifier):
    # Like a run: a file without a column a stage reads is set aside (not a job error), here half the rows.
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "in"
    write_shards(data, banking_texts(40), shards=1)
    pq.write_table(pa.table({"body": banking_texts(40)}), data / "zz-other.parquet")
    out = slmbatch_cmd("validate", "--skip-engine", str(render(tmp_path, data, tiny_classifier, columns=None)))
    assert out.returncode == 0, out.stderr
    assert "input: 2 files, 80 rows" in out.stdout
    assert f"will set aside {data / 'zz-other.parquet'}: missing column 'text'" in out.stdout
    assert "hold 50.00% of the input's rows, over the failure budget of 1.00%: a run would fail (exit 3)" in out.stdout


def test_a_job_file_that_cannot_load_is_one_line_naming_the_file_and_line(tmp_path):
    broken = job_file(tmp_path, "from slmbatch import Job\n\njob = Job(name=\n")
    out = slmbatch_cmd("validate", str(broken))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"invalid job: JOB: {broken}, line 3 fails to load: SyntaxError" in out.stderr
    raising = job_file(tmp_path, "import os\n\nlabels = load_labels()\n")
    out = slmbatch_cmd("run", str(raising))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{raising}, line 3 fails to load: NameError: name 'load_labels' is not defined" in out.stderr
    out = slmbatch_cmd("validate", str(tmp_path))
    assert out.returncode == 2 and "is a directory; give the job's Python file" in out.stderr


def test_a_job_file_imports_the_modules_beside_it_and_cannot_pass_for_done_by_exiting(
    tmp_path, data_dir, tiny_classifier
):
    """Run from another directory (`python -m` would put only the working directory on sys.path): the
    job file's helper module is found. A job file calling sys.exit() while loading is an invalid job, not
    a success; a syntax error in a helper names the helper's file."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "helpers.py").write_text("LABELS = ['ham', 'spam']\n")
    body = render(tmp_path, data_dir, tiny_classifier).read_text()
    job = jobs / "job.py"
    job.write_text("from helpers import LABELS\n" + body.replace("labels=['ham', 'spam']", "labels=LABELS"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = slmbatch_cmd("validate", "--skip-input", "--skip-engine", str(job), cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert "labels=[ham, spam]" in out.stdout
    (jobs / "helpers.py").write_text("LABELS = [\n")
    out = slmbatch_cmd("validate", "--skip-input", "--skip-engine", str(job), cwd=elsewhere)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{job} ({jobs / 'helpers.py'}, line 1) fails to load: SyntaxError" in out.stderr
    exiting = job_file(tmp_path, "import sys\n\nsys.exit(0)\n")
    for command in ("validate", "run"):
        out = slmbatch_cmd(command, str(exiting))
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        assert f"invalid job: JOB: {exiting} called sys.exit(0) while it was loaded" in out.stderr


def test_validate_exits_2_on_input_a_run_cannot_read_and_takes_v_after_the_command(tmp_path, tiny_classifier):
    job = render(tmp_path, tmp_path / "no-such-input", tiny_classifier)
    out = slmbatch_cmd("validate", "--skip-engine", str(job), "-v")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "slmbatch: invalid input: source path" in out.stderr and "does not exist" in out.stderr
    out = slmbatch_cmd("feedback", str(tmp_path), "--holdout", "1.5")
    assert out.returncode == 2 and "argument --holdout: must be a fraction >= 0 and < 1, got '1.5'" in out.stderr
    out = slmbatch_cmd("feedback", str(tmp_path), "--out", "s3://bucket/feedback")
    assert out.returncode == 2 and "--out: must be a local directory" in out.stderr, out.stderr
    assert not (tmp_path / "s3:").exists()


def test_a_closed_output_pipe_and_an_unexpected_error_end_in_one_line_not_a_traceback(
    tmp_path, data_dir, tiny_classifier, monkeypatch, capsys
):
    from slmbatch import cli

    job = render(tmp_path, data_dir, tiny_classifier)
    reader_gone = subprocess.Popen(
        [*SLMBATCH, "validate", "--skip-input", "--skip-engine", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reader_gone.stdout.close()  # `| head` that has read all it wanted
    assert reader_gone.wait(timeout=120) == 141
    with reader_gone.stderr:
        assert "Traceback" not in reader_gone.stderr.read()

    def fails(args):
        raise RuntimeError("the disk went away\nsecond line")

    monkeypatch.setattr(cli, "_status", fails)
    assert cli.main(["status", str(tmp_path)]) == 1
    said = capsys.readouterr().err.splitlines()
    assert said == ["slmbatch: unexpected error: RuntimeError: the disk went away", "slmbatch: -v shows the traceback"]
    with pytest.raises(RuntimeError):
        cli.main(["status", str(tmp_path), "-v"])

    def socket_broke(args):  # a broken pipe that is not the output's (a connection's) is an error
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_status", socket_broke)
    assert cli.main(["status", str(tmp_path)]) == 1
    assert "slmbatch: unexpected error: BrokenPipeError" in capsys.readouterr().err


def test_a_wait_that_is_not_a_number_of_seconds_is_refused_naming_the_option(tmp_path):
    for command, value in (("run", "-5"), ("collect", "nan"), ("run", "soon")):
        out = slmbatch_cmd(command, "--wait", value, str(tmp_path / "job.py"))
        assert out.returncode == 2, out.stderr
        assert f"argument --wait: must be a number of seconds >= 0, got {value!r}" in out.stderr


def test_status_and_report_of_a_path_without_slmbatch_output_exit_2_saying_what_it_is(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    for command in ("status", "report", "feedback"):
        out = slmbatch_cmd(command, str(tmp_path / "nothing"))
        assert out.returncode == 2 and f"slmbatch: {tmp_path / 'nothing'} does not exist" in out.stderr, out.stderr
        out = slmbatch_cmd(command, str(tmp_path / "a-file"))
        assert out.returncode == 2 and "is a file, not a job's output directory" in out.stderr, out.stderr
    out = slmbatch_cmd("status", str(tmp_path / "empty"))
    assert out.returncode == 2 and "no slmbatch output here" in out.stderr
    out = slmbatch_cmd("report", str(tmp_path / "empty"))
    assert out.returncode == 2 and f"no finished run in {tmp_path / 'empty'}" in out.stderr, out.stderr


@pytest.mark.vllm
def test_engine_options_read_from_vllms_source_are_exactly_the_fields_of_its_engine_args():
    """`slmbatch validate` checks `Model.engine` keys against vLLM's source, not an import of vLLM (~8 s)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    from slmbatch.engine import engine_option_names

    assert engine_option_names() == {f.name for f in dataclasses.fields(EngineArgs)}


def test_validate_rejects_unknown_engine_options(tmp_path, data_dir, tiny_classifier):
    path = job_file(
        tmp_path,
        GOOD.format(
            model=tiny_classifier,
            src=str(data_dir),
            columns=None,
            input="text",
            labels=["ham", "spam"],
            extra="",
            out=str(tmp_path / "out"),
        ).replace('"dtype": "float32"', '"max_num_seq": 4'),
    )
    out = slmbatch_cmd("validate", "--skip-input", str(path))
    assert out.returncode == 2
    assert "Job.stages[0].model.engine.max_num_seq" in out.stderr


@pytest.mark.parametrize(
    "option, field",
    [
        ('"max_model_len": 100000', "Job.stages[0].model.engine.max_model_len: 100000 is more than model "),
        ('"dtype": "float17"', "Job.stages[0].model.engine.dtype: vLLM knows no dtype 'float17'"),
    ],
)
def test_validate_refuses_engine_options_vllm_would_refuse_naming_the_field(
    tmp_path, data_dir, tiny_classifier, option, field
):
    """What the model's own config.json (max_position_embeddings 4096) and vLLM's source tell, without an engine."""
    path = render(tmp_path, data_dir, tiny_classifier)
    replaced = '"max_model_len": 256' if "max_model_len" in option else '"dtype": "float32"'
    path.write_text(path.read_text().replace(replaced, option))
    out = slmbatch_cmd("validate", "--skip-input", str(path))
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"invalid job: {field}" in out.stderr
    if "max_model_len" in option:
        assert "max_position_embeddings=4096 in its config.json" in out.stderr


@pytest.mark.parametrize("max_model_len", ['"max_model_len": 256, ', ""])
def test_validate_refuses_an_answer_budget_that_fills_the_context(tmp_path, data_dir, tiny_lm, max_model_len):
    """The context is the job's max_model_len, else the model's config.json's (tiny-lm: 4096)."""
    budget = 300 if max_model_len else 5000
    path = job_file(
        tmp_path,
        f"""
        from slmbatch import Job, Model, ParquetSink, ParquetSource, Summarize
        lm = Model({tiny_lm!r}, engine={{{max_model_len}"dtype": "float32"}})
        job = Job(name="cli-test", source=ParquetSource({str(data_dir)!r}),
                  stages=[Summarize("gist", model=lm, input="text", max_output_tokens={budget})],
                  sink=ParquetSink({str(tmp_path / "out")!r}))
        """,
    )
    out = slmbatch_cmd("validate", "--skip-input", str(path))
    assert out.returncode == 2, out.stdout + out.stderr
    length = 256 if max_model_len else 4096
    assert f"invalid job: Job.stages[0].max_output_tokens: {budget} tokens for the answer leave no room" in out.stderr
    assert f"max_model_len of {length}" in out.stderr


@pytest.mark.parametrize("cause", ["options", "weights"])
def test_a_replica_that_cannot_start_stops_the_run_with_one_line_and_the_traceback_in_the_log(
    tmp_path, data_dir, tiny_classifier, ray_local, cause
):
    """The replica's EngineError reaches the driver inside Ray's ActorDiedError (its __init__ failed in
    Ray Data's actor pool): the terminal gets slmbatch's one line, exit 2 when vLLM refused the job's
    engine options, 1 for any other reason; Ray's traceback goes to the run's log."""
    import shutil

    model = tiny_classifier
    if cause == "weights":  # a model whose weights file was cut short
        model = str(tmp_path / "model")
        shutil.copytree(tiny_classifier, model)
        weights = Path(model) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    path = render(tmp_path, data_dir, model)
    if cause == "options":  # over the model's max_position_embeddings (4096): `slmbatch validate` says so
        path.write_text(path.read_text().replace('"max_model_len": 256', '"max_model_len": 100000'))
    address = ray_local.get_runtime_context().gcs_address
    out = slmbatch_cmd("run", "--address", address, "--no-progress", str(path))
    seen = out.stdout + out.stderr
    assert "Traceback" not in seen, seen[-3000:]
    said = [line for line in out.stderr.splitlines() if line.startswith("slmbatch: ")]
    assert len(said) == 2, out.stderr[-3000:]
    if cause == "options":
        assert out.returncode == 2, seen[-3000:]
        assert said[0].startswith(f"slmbatch: invalid job: Model.engine: could not start vLLM for model {model!r}: ")
        assert "max_model_len (100000) is greater than" in said[0]
    else:
        assert out.returncode == 1, seen[-3000:]
        assert said[0].startswith(f"slmbatch: EngineError: could not start vLLM for model {model!r}: ")
    log = said[1].removeprefix("slmbatch: traceback in ")
    assert log.endswith("/run.log") and str(tmp_path / "out" / "_slmbatch" / "logs") in log
    logged = Path(log).read_text()
    assert "Traceback" in logged and "ActorDiedError" in logged and said[0].split(": ", 2)[2] in logged
    status = slmbatch_cmd("status", str(tmp_path / "out"))  # says what stopped the run, and where its log is
    assert status.returncode == 0, status.stderr[-3000:]
    assert "STOPPED after" in status.stdout and said[0].split(": ", 2)[2] in status.stdout, status.stdout
    assert f"log: {log}" in status.stdout


@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_run_stopped_by_ctrl_c_or_sigterm_says_so_in_one_line_and_a_rerun_resumes(
    tmp_path, tiny_classifier, signame, code
):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM, here after the first of two files is recorded: one line (no
    traceback), the shells' exit status, the lock released, ``status`` says STOPPED; a rerun does the rest.
    (Empty input files: they are written without Ray, so the signal arrives at an exact point.)"""
    write_shards(tmp_path / "in", [], shards=2)
    job = render(tmp_path, tmp_path / "in", tiny_classifier)
    env = {**os.environ, "SLMBATCH_OBSERVERS": "tests.support.crash:install"}
    env |= {"SLMBATCH_CRASH_AT": "marked:1", "SLMBATCH_CRASH_SIGNAL": signame}
    out = slmbatch_cmd("run", "--no-progress", str(job), env=env)
    assert out.returncode == code, out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    said = [line for line in out.stderr.splitlines() if line.startswith("slmbatch: ")]
    name = "Ctrl-C (SIGINT)" if signame == "SIGINT" else "SIGTERM"
    assert said == [
        f"slmbatch: stopped by {name} after recording 1 output file(s); a rerun does the rest (log: {said[0].split('(log: ')[1]}"
    ], out.stderr[-3000:]
    log = Path(said[0].split("(log: ")[1].removesuffix(")"))
    assert (
        "slmbatch: the run stopped:" in log.read_text()
        and ("KeyboardInterrupt" if code == 130 else "SystemExit") in log.read_text()
    )
    sink = tmp_path / "out"
    assert not (sink / "_slmbatch" / "active.json").exists()  # the lock went with the run
    status = slmbatch_cmd("status", str(sink))
    assert status.returncode == 0, status.stderr[-3000:]
    assert "STOPPED after" in status.stdout and f": stopped by {signame}" in status.stdout, status.stdout
    assert "incomplete (run " in status.stdout and "stopped: rerun this date to resume)" in status.stdout
    again = slmbatch_cmd("run", "--no-progress", str(job))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already done by earlier runs: 0 rows (1 files)" in again.stdout, again.stdout
    assert sorted(p.name for p in sink.glob("*.parquet")) == ["part-00.parquet", "part-01.parquet"]


def test_run_writes_every_row_and_prints_the_summary(tmp_path, data_dir, tiny_classifier, ray_local):
    address = ray_local.get_runtime_context().gcs_address
    out = slmbatch_cmd("run", "--address", address, str(render(tmp_path, data_dir, tiny_classifier)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rows in 40 (2 files) -> rows out 40 (2 files)" in out.stdout
    assert "stage spam (classify)" in out.stdout
    # Quiet: only slmbatch's own lines; Ray, vLLM and torch output is in the run's log file.
    seen = out.stdout + out.stderr
    for noise in ("Warning", "warning:", "Traceback", "pid=", "core_worker", "NUMA", "Triton", "INFO worker"):
        assert noise not in seen, f"{noise!r} on the terminal:\n{seen[-3000:]}"
    assert all(line.split(" ", 2)[1] == "slmbatch" for line in out.stderr.splitlines() if line.strip()), out.stderr
    log = next(line.split(": ", 1)[1] for line in out.stdout.splitlines() if "engine, Ray and torch output:" in line)
    assert log.endswith("/run.log") and "/_slmbatch/logs/" in log
    logged = Path(log).read_text()
    assert "StageActor" in logged  # the replica's own output went there,
    assert "slmbatch INFO replica of " in logged and " ready (float32, CPU" in logged  # with its start-up lines
    assert "replicas ran float32, CPU" in out.stdout  # the job says float32; the summary says what ran
    import polars as pl

    df = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert df.height == 40 and df["_row_id"].n_unique() == 40

    # A file that cannot be read arrives: this run processed none of its input -> exit 3, loudly.
    (data_dir / "zz-truncated.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    failed = slmbatch_cmd("run", "--address", address, str(render(tmp_path, data_dir, tiny_classifier)))
    assert failed.returncode == 3, failed.stderr[-3000:]
    assert "OVER the failure budget of 1.00%: the run FAILED (exit 3)" in failed.stdout
    assert "zz-truncated.parquet: unreadable Parquet" in failed.stdout
    assert "slmbatch: run failed: " in failed.stderr
    # The budget is the job's (ParquetSource.max_failed_fraction) unless the command line says otherwise.
    tolerated = slmbatch_cmd(
        "run", "--address", address, "--max-failed-fraction", "1", str(render(tmp_path, data_dir, tiny_classifier))
    )
    assert tolerated.returncode == 0, tolerated.stderr[-3000:]
    assert "within the failure budget of 100.00%" in tolerated.stdout


def test_run_help_documents_the_exit_codes():
    text = slmbatch_cmd("run", "--help").stdout
    for line in ("0  finished", "1  could not finish", "2  the job or the command line is invalid", "3  finished, but"):
        assert line in text


def test_actor_output_ray_delivers_after_a_quiet_run_goes_to_its_log_not_the_terminal(tmp_path, monkeypatch):
    """Ray streams actors' lines to the driver with a delay: a replica's last line can arrive after the run
    gave the terminal back. It is appended to the run's log for a while, then Ray's own printer returns."""
    import time

    import ray
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from slmbatch import console

    printed = []
    ray_printer = printed.append  # one bound method, to recognise it when it is handed back
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    # Long enough that the first line below arrives within it even if a loaded machine stalls this process.
    monkeypatch.setattr(console, "LATE_OUTPUT_S", 3.0)
    dispatcher.add_handler("ray_print_logs", ray_printer)  # stands for Ray's printer (log_to_driver)
    try:
        log = tmp_path / "run.log"
        with console.quiet(str(log)):
            pass
        dispatcher.emit({"lines": ["replica ready"], "pid": 7, "actor_name": "StageActor"})
        assert "(StageActor pid=7) replica ready" in log.read_text() and printed == []
        # The window ends on a timer thread: wait for Ray's printer to be back (not a guessed sleep).
        deadline = time.monotonic() + 60
        while not any(handler is ray_printer for _, handler in dispatcher.handlers):
            assert time.monotonic() < deadline, "Ray's printer was not handed back"
            time.sleep(0.05)
        dispatcher.emit({"lines": ["later"], "pid": 7})
        assert [d["lines"] for d in printed] == [["later"]]  # Ray's printer is back
    finally:
        dispatcher.remove_handler("ray_print_logs")


def test_a_line_ray_held_back_as_repeated_goes_to_the_runs_log_not_the_terminal_at_exit(tmp_path):
    """Two replicas print the same torch warning: Ray prints it once and holds the repeat back, to print it
    as ``[repeated 2x across cluster]`` when Ray shuts down - after the summary, on the terminal. A quiet
    run ends by writing such held lines to its log."""
    from ray._private.ray_logging import stdout_deduplicator

    from slmbatch import console

    warning = "dispatcher.py:139: FutureWarning: `torch.distributed.reduce_op` is deprecated"
    log = tmp_path / "run.log"
    with console.quiet(str(log)):
        for pid in (101, 102):  # what Ray's log thread does with each replica's line
            stdout_deduplicator.deduplicate({"lines": [warning], "pid": pid, "ip": "127.0.0.1", "actor_name": "A"})
            # (Ray's printer would write the first at once; the second is held back)
    assert stdout_deduplicator.flush() == []  # nothing left for Ray to print at shutdown,
    assert f"(A pid=102) {warning}" in log.read_text()  # the held line is in the log
