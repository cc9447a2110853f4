"""Run one arm in a child process and watch every process it starts.

The sampler walks the arm's process tree (the arm, and below it Ray's GCS,
raylet, workers and actors, which a local ``ray.init`` starts as descendants)
every ``interval`` seconds with psutil and records:

- ``peak_rss_bytes``: the largest sum of RSS over the tree at one sample.
  RSS counts shared pages (libraries, Ray's shared-memory object store) once
  per process that maps them, so the sum overstates physical memory; it is
  the same yardstick for every arm and size.
- per process kind (driver, replica actor, raylet, ...): RSS at the peak,
  CPU seconds (user + system) - where the CPU went - and the peak CPU rate
  over any 1 s window (``peak_cores_by_kind``: 1.0 = one core busy), which
  shows how many threads an engine really kept busy.

Only processes seen in the tree are ever signalled, and only if they are
still the same process (same creation time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent


def own_rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``), or its peak since the last
    :func:`reset_own_peak_rss` (``VmHWM``), in MiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_own_peak_rss() -> None:
    """Start this process's ``VmHWM`` afresh (``5`` to ``/proc/self/clear_refs``), so that a peak
    measured afterwards is the measured work's, not an import's or a connection's transient."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def process_kind(proc: psutil.Process, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "arm process (driver)"
    try:
        title = " ".join(proc.cmdline()[:1]) or proc.name()
    except (psutil.Error, OSError):
        return "other"
    if "StageActor" in title:
        return "slmbatch replica actor"
    if "vLLMEngineStageUDF" in title:
        return "Ray Data LLM engine actor"
    if "EngineCore" in title:
        return "vLLM engine core process"
    if "MapWorker" in title:
        return "Ray Data actor (other)"
    if "raylet" in title:
        return "raylet"
    if "gcs_server" in title:
        return "gcs_server"
    if title.startswith("ray::IDLE"):
        return "idle Ray workers"
    if title.startswith("ray::"):
        return "Ray tasks/actors (reads, stats, ...)"
    return "Ray daemons (agents, monitors)"


class TreeSampler(threading.Thread):
    def __init__(self, root_pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root_pid, self.interval = root_pid, interval
        self.stop_event = threading.Event()
        self.seen: dict[int, dict[str, Any]] = {}  # pid -> kind, create_time, max_rss, cpu_s
        self.peak_rss = 0
        self.peak_by_kind: dict[str, int] = {}
        self.peak_at_s = 0.0
        self.samples = 0
        self.started = time.monotonic()
        self.cpu_by_kind: dict[str, float] = {}
        self.series: list[tuple[float, dict[str, float]]] = []  # (seconds, cumulative CPU s by kind)
        self.series_unix: list[float] = []  # wall-clock time of each entry of series
        self.rss_series: list[tuple[float, int]] = []  # (unix time, RSS summed over the tree)

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.root_pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def sample(self) -> None:
        now = time.monotonic() - self.started
        total, by_kind = 0, {}
        for proc in self.tree():
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_times()
                    created = proc.create_time()
            except psutil.Error:
                continue
            info = self.seen.get(proc.pid)
            if info is None or info["create_time"] != created:
                info = self.seen[proc.pid] = {
                    "kind": process_kind(proc, self.root_pid),
                    "create_time": created,
                    "max_rss": 0,
                    "cpu_s": 0.0,
                }
            elif info["kind"] != "slmbatch replica actor":
                info["kind"] = process_kind(proc, self.root_pid)  # a worker's title changes with its task
            info["max_rss"] = max(info["max_rss"], rss)
            cpu_s = cpu.user + cpu.system
            # CPU used since the last sample goes to the kind the process has now,
            # so a worker that becomes an actor does not carry its past into it.
            delta = max(cpu_s - info["cpu_s"], 0.0)
            info["cpu_s"] = cpu_s
            self.cpu_by_kind[info["kind"]] = self.cpu_by_kind.get(info["kind"], 0.0) + delta
            total += rss
            by_kind[info["kind"]] = by_kind.get(info["kind"], 0) + rss
        self.samples += 1
        self.series.append((now, dict(self.cpu_by_kind)))
        self.series_unix.append(time.time())
        self.rss_series.append((time.time(), total))
        if total > self.peak_rss:
            self.peak_rss, self.peak_by_kind = total, by_kind
            self.peak_at_s = now

    def peak_cores(self, window_s: float = 1.0) -> dict[str, float]:
        """Per kind, the most CPU seconds per second over any window of >= ``window_s``."""
        peaks: dict[str, float] = {}
        j = 0
        for i, (t0, c0) in enumerate(self.series):
            j = max(j, i + 1)
            while j < len(self.series) and self.series[j][0] - t0 < window_s:
                j += 1
            if j >= len(self.series):
                break
            t1, c1 = self.series[j]
            for kind, cpu in c1.items():
                rate = (cpu - c0.get(kind, 0.0)) / (t1 - t0)
                peaks[kind] = max(peaks.get(kind, 0.0), rate)
        return {k: round(v, 2) for k, v in sorted(peaks.items(), key=lambda kv: -kv[1])}

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)

    def cpu_between(self, start_unix: float, end_unix: float) -> dict[str, Any] | None:
        """CPU seconds per process kind between two wall-clock times (nearest samples
        inside), and the cores each kept busy on average over that span."""
        inside = [i for i, t in enumerate(self.series_unix) if start_unix <= t <= end_unix]
        if len(inside) < 2:
            return None
        i, j = inside[0], inside[-1]
        span = self.series_unix[j] - self.series_unix[i]
        c0, c1 = self.series[i][1], self.series[j][1]
        cpu = {k: round(v - c0.get(k, 0.0), 2) for k, v in sorted(c1.items(), key=lambda kv: -kv[1])}
        return {
            "span_s": round(span, 2),
            "cpu_s_by_kind": {k: v for k, v in cpu.items() if v > 0},
            "cores_by_kind": {k: round(v / span, 2) for k, v in cpu.items() if v > 0} if span > 0 else {},
        }

    def peak_between(self, start_unix: float, end_unix: float) -> int | None:
        """Largest summed RSS among samples taken between two wall-clock times."""
        inside = [rss for t, rss in self.rss_series if start_unix <= t <= end_unix]
        return max(inside) if inside else None

    def report(self) -> dict[str, Any]:
        count: dict[str, int] = {}
        max_rss: dict[str, int] = {}
        for info in self.seen.values():
            count[info["kind"]] = count.get(info["kind"], 0) + 1
            max_rss[info["kind"]] = max_rss.get(info["kind"], 0) + info["max_rss"]
        return {
            # Per kind, each process's own peak, summed (they need not coincide).
            "max_rss_by_kind_bytes": dict(sorted(max_rss.items(), key=lambda kv: -kv[1])),
            "peak_rss_bytes": self.peak_rss,
            "peak_at_s": round(self.peak_at_s, 1),
            "peak_rss_by_kind_bytes": dict(sorted(self.peak_by_kind.items(), key=lambda kv: -kv[1])),
            "cpu_s_by_kind": {k: round(v, 2) for k, v in sorted(self.cpu_by_kind.items(), key=lambda kv: -kv[1])},
            "peak_cores_by_kind": self.peak_cores(),
            "processes_by_kind": count,
            "samples": self.samples,
        }

    def leftovers(self) -> list[psutil.Process]:
        """Processes this arm started that are still alive (same pid and creation time)."""
        alive = []
        for pid, info in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == info["create_time"] and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        return alive


def terminate(procs: list[psutil.Process], grace: float = 10.0) -> int:
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(procs)


def run_arm(
    spec: dict[str, Any],
    work: Path,
    name: str,
    timeout_s: float,
    env: dict[str, str] | None = None,
    sample_interval: float = 0.2,
) -> dict[str, Any]:
    """Run ``python -m benchmarks.arms`` on ``spec`` in a child process; its result plus the sampler's."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = work / f"{name}.spec.json", work / f"{name}.result.json", work / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    child_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env or {})}
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.arms", str(spec_path), str(out_path)],
            cwd=ROOT,
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        sampler = TreeSampler(proc.pid, sample_interval)
        sampler.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            sampler.sample()
            terminate([p for p in sampler.leftovers() if p.pid != proc.pid] + [psutil.Process(proc.pid)])
            proc.wait()
        except BaseException:
            sampler.sample()
            terminate(sampler.leftovers())
            raise
        finally:
            sampler.stop()
    process_s = time.monotonic() - started
    # Ray's workers may still be exiting after ray.shutdown(): give them a moment.
    deadline = time.monotonic() + 10
    while (left := sampler.leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    left_kinds = [sampler.seen[p.pid]["kind"] for p in left]
    if left:
        terminate(left)
    if out_path.exists():
        result = json.loads(out_path.read_text())
    else:
        result = {
            "arm": spec["arm"],
            "stage": spec.get("stage"),
            "ok": False,
            "error": "timed out" if timed_out else f"arm process exited {proc.returncode} without a result",
        }
    if timed_out:
        result.update(ok=False, error=f"timed out after {timeout_s:.0f} s")
    result["memory"] = sampler.report()
    # The slmbatch arm says when its rows were flowing (first rows back -> run
    # returned): the peak then is the pipeline's, without start-up transients
    # (workers importing side by side while the replica loads).
    window = result.get("processing_window_unix")
    if window:
        result["memory"]["peak_rss_processing_bytes"] = sampler.peak_between(*window)
        result["memory"]["cpu_processing"] = sampler.cpu_between(*window)
    busy = result.get("first_rows_busy_window_unix")
    if busy:
        # Which processes had the CPU while the replica computed the first rows.
        result["memory"]["cpu_first_rows_busy"] = sampler.cpu_between(*busy)
    result["process_wall_s"] = process_s
    result["leftover_processes_terminated"] = left_kinds
    result["log"] = str(log_path.relative_to(ROOT))
    return result
