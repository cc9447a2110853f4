"""Frontier pool throughput against a server that enforces a requests-per-minute limit.

A benchmark, not a test: it measures and reports, it asserts nothing.

One run, two arms on the same load (``--actors`` Ray actors, each a
:class:`~slmbatch.worker.FrontierActor` driving its
:class:`~slmbatch.frontier.FrontierClient` with ``--concurrency`` requests in
flight, for ``--duration`` seconds):

* ``shared limiter``: every actor asks ONE
  :func:`~slmbatch.frontier.shared_rate_limiter` created on the driver
  (``requests_per_minute=--rpm``), as a job does;
* ``no limiter``: the same load with no limiter, for contrast.

Each arm gets a fresh local OpenAI-compatible server (:class:`RpmServer`) that
enforces the limit over a sliding window: it accepts a request only if fewer
than ``rpm * window_s / 60`` requests were accepted in the last ``window_s``
seconds (default 60 s, i.e. the literal "``rpm`` per minute", at any instant);
otherwise it answers 429 with ``Retry-After`` (and ``retry-after-ms``) saying
when the oldest accepted request leaves the window, and counts a violation.
Rejected requests do not count against the window.

Reported per arm (table on stdout, JSON in ``benchmarks/results/``):

* achieved rate / limit: requests the server ACCEPTED (HTTP 200), by arrival
  time, per minute, divided by ``--rpm``. "steady" counts arrivals in
  ``[start + 1 s, start + duration)``, leaving out the first second, where the
  limiter's bucket (1 s of allowance, ``frontier.BURST_S``) lets a burst go;
  "whole run" counts ``[start, start + duration)``. ``start`` is the instant
  all actors were told to begin (they wait for it, so actor start-up is not
  measured); requests that drain after the deadline are reported apart.
* violations: 429s the server answered (all of them, drain included), and
  when the first and last happened;
* peak 1 s: the most requests accepted in any 1 s interval, over ``rpm / 60``
  (how bursty the pool is, whatever window the server enforces);
* client side: requests sent, answered, failed, retries (attempts beyond the
  first), requests cancelled at the end of the grace period.

Run from the repository root: ``.venv/bin/python benchmarks/frontier_rate_limit.py``
(``--help`` for the knobs). Nothing is left running: servers are stopped,
actors killed and Ray shut down on the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import platform
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slmbatch.config import Frontier  # noqa: E402
from slmbatch.frontier import BURST_S, shared_rate_limiter  # noqa: E402
from slmbatch.runner import FRONTIER_ACTOR_CPUS  # noqa: E402
from slmbatch.worker import FrontierActor  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "frontier_rate_limit.json"


# --------------------------------------------------------------------------- server


class RpmServer:
    """An OpenAI-compatible chat-completions server that enforces ``rpm`` over a sliding window.

    ``with RpmServer(600, window_s=60) as server: server.base_url ...``. At
    most ``floor(rpm * window_s / 60)`` requests are accepted in any
    ``window_s`` seconds; the rest get 429 at once. An accepted request is
    answered after ``latency_s`` (a fixed, valid completion with ``usage``).
    Every request is recorded as ``(time.monotonic(), status)`` at arrival.
    """

    def __init__(self, rpm: float, *, window_s: float = 60.0, latency_s: float = 0.1):
        self.rpm = rpm
        self.window_s = window_s
        self.allowance = max(1, math.floor(rpm * window_s / 60.0 + 1e-9))
        self.latency_s = latency_s
        self._accepted: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self.log: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RpmServer:
        server = self

        class Handler(_Handler):
            rpm_server = server

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="rpm-server", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def admit(self) -> float | None:
        """Record one arrival; None if accepted, else the seconds until a slot frees."""
        with self._lock:
            now = time.monotonic()
            while self._accepted and self._accepted[0] <= now - self.window_s:
                self._accepted.popleft()
            if len(self._accepted) < self.allowance:
                self._accepted.append(now)
                self.log.append((now, 200))
                return None
            self.log.append((now, 429))
            return self._accepted[0] + self.window_s - now


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The stdlib's backlog of 5 drops SYNs of a burst of new connections (see tests/faultserver.py).
    request_queue_size = 128


class _Handler(BaseHTTPRequestHandler):
    rpm_server: RpmServer
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end on their own

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        server = self.rpm_server
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(400, {"error": {"message": "request body is not JSON"}})
            return
        wait = server.admit()
        try:
            if wait is not None:
                # Both headers, as OpenAI sends them: whole seconds (rounded up) and milliseconds.
                self._send(
                    429,
                    {
                        "error": {
                            "message": "Rate limit reached for requests",
                            "type": "requests",
                            "code": "rate_limit_exceeded",
                        }
                    },
                    {"Retry-After": str(max(1, math.ceil(wait))), "retry-after-ms": str(max(1, round(wait * 1000)))},
                )
                return
            server._stop.wait(server.latency_s)
            self._send(
                200,
                {
                    "id": "chatcmpl-bench",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "bench"),
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
                    ],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
                },
            )
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


# --------------------------------------------------------------------------- load


class LoadActor(FrontierActor):
    """A production :class:`FrontierActor` (client on its own event loop, the
    job's limiter handle) fed a steady stream of requests instead of Ray Data batches."""

    def __init__(self, frontier: Frontier, limiter: Any):
        super().__init__(frontier, stages=(), limiter=limiter)
        import httpx  # noqa: F401 - imported now rather than on the clock

    def drive(
        self, start_at: float, duration_s: float, backlog: int, max_requests: int, grace_s: float, actor: int
    ) -> dict[str, Any]:
        return self._run(self._drive(start_at, duration_s, backlog, max_requests, grace_s, actor))

    async def _drive(
        self, start_at: float, duration_s: float, backlog: int, max_requests: int, grace_s: float, actor: int
    ) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = start_at + duration_s
        pending: set[asyncio.Future] = set()
        replies = []
        sent = 0
        while time.time() < deadline and sent < max_requests:
            while len(pending) < backlog and sent < max_requests:
                messages = [{"role": "user", "content": f"actor {actor} request {sent}: say ok"}]
                pending.add(asyncio.ensure_future(self.client.complete(messages, max_tokens=4)))
                sent += 1
            done, pending = await asyncio.wait(
                pending, timeout=max(0.0, deadline - time.time()), return_when=asyncio.FIRST_COMPLETED
            )
            replies += [task.result() for task in done]
        drained_at = time.time()
        if pending:
            done, pending = await asyncio.wait(pending, timeout=grace_s)
            replies += [task.result() for task in done]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self.client.aclose()
        reasons = collections.Counter(r.error.split(":")[0] for r in replies if r.error)
        return {
            "sent": sent,
            "answered": sum(r.ok for r in replies),
            "failed": sum(not r.ok for r in replies),
            "retries": sum(r.attempts - 1 for r in replies),
            "cancelled": len(pending),
            "hit_max_requests": sent >= max_requests,
            "drain_s": time.time() - drained_at,
            "failure_reasons": dict(reasons),
        }


# --------------------------------------------------------------------------- measure


def _count(times: list[float], lo: float, hi: float) -> int:
    return sum(lo <= t < hi for t in times)


def _peak(times: list[float], width: float) -> int:
    """The most of ``times`` (sorted) in any half-open interval of ``width`` seconds."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def run_arm(ray: Any, label: str, limited: bool, args: argparse.Namespace) -> dict[str, Any]:
    rpm, duration = args.rpm, args.duration
    with RpmServer(rpm, window_s=args.window_s, latency_s=args.latency_s) as server:
        frontier = Frontier(
            base_url=server.base_url,
            model="bench",
            api_key_env=None,
            actors=args.actors,
            concurrency=args.concurrency,
            requests_per_minute=(args.limiter_rpm or rpm) if limited else None,
            timeout_s=10.0,
        )
        limiter_rpm = args.limiter_rpm or rpm
        limiter = shared_rate_limiter(f"bench-frontier-rpm-{os.getpid()}", limiter_rpm, None) if limited else None
        remote = ray.remote(num_cpus=FRONTIER_ACTOR_CPUS)(LoadActor)
        actors = [remote.remote(frontier, limiter) for _ in range(args.actors)]
        try:
            ray.get([a.__ray_ready__.remote() for a in actors], timeout=120)
            # A common start, one second out, so actor start-up is not on the clock.
            start_at = time.time() + 1.0
            start_mono = time.monotonic() + (start_at - time.time())
            per_actor = math.ceil(args.max_requests / args.actors)
            backlog = args.backlog or args.concurrency
            clients = ray.get(
                [a.drive.remote(start_at, duration, backlog, per_actor, args.grace, i) for i, a in enumerate(actors)],
                timeout=duration + args.grace + 120,
            )
            limiter_stats = ray.get(limiter.stats.remote()) if limiter is not None else None
        finally:
            for a in actors:
                ray.kill(a)
            if limiter is not None:
                ray.kill(limiter)
        log = sorted(server.log)

    ok = [t - start_mono for t, status in log if status == 200]
    violations = [t - start_mono for t, status in log if status == 429]
    steady = _count(ok, BURST_S, duration) / (duration - BURST_S) * 60.0
    whole = _count(ok, 0.0, duration) / duration * 60.0
    total = {k: sum(c[k] for c in clients) for k in ("sent", "answered", "failed", "retries", "cancelled")}
    reasons: collections.Counter[str] = collections.Counter()
    for c in clients:
        reasons.update(c["failure_reasons"])
    return {
        "arm": label,
        "limited": limited,
        "server": {
            "requests": len(log),
            "accepted": len(ok),
            "accepted_after_deadline": _count(ok, duration, math.inf),
            "violations": len(violations),
            "violations_before_deadline": _count(violations, -math.inf, duration),
            "first_violation_s": round(violations[0], 3) if violations else None,
            "last_violation_s": round(violations[-1], 3) if violations else None,
            "peak_accepted_1s": _peak(ok, 1.0),
        },
        "achieved_rpm_steady": round(steady, 2),
        "achieved_rpm_whole": round(whole, 2),
        "achieved_over_limit_steady": round(steady / rpm, 4),
        "achieved_over_limit_whole": round(whole / rpm, 4),
        "peak_1s_over_limit": round(_peak(ok, 1.0) / (rpm / 60.0), 3),
        "client": {
            **total,
            "failure_reasons": dict(reasons),
            "hit_max_requests": any(c["hit_max_requests"] for c in clients),
            "drain_s": round(max(c["drain_s"] for c in clients), 3),
        },
        "limiter": limiter_stats,
    }


def print_table(args: argparse.Namespace, arms: list[dict[str, Any]]) -> None:
    allowance = max(1, math.floor(args.rpm * args.window_s / 60.0 + 1e-9))
    print(
        f"\nfrontier rate limit: {args.rpm:g} req/min, server accepts {allowance} per any {args.window_s:g} s "
        f"(sliding window); {args.actors} actor(s) x {args.concurrency} in flight; {args.duration:g} s per arm; "
        f"server latency {args.latency_s:g} s"
        + (f"; shared limiter set to {args.limiter_rpm:g} req/min" if args.limiter_rpm else "")
    )
    rows = [
        ("achieved / limit, steady (1 s on)", lambda a: f"{a['achieved_over_limit_steady']:.3f}"),
        ("achieved / limit, whole run", lambda a: f"{a['achieved_over_limit_whole']:.3f}"),
        ("achieved req/min, steady", lambda a: f"{a['achieved_rpm_steady']:.1f}"),
        ("violations (429) seen by server", lambda a: str(a["server"]["violations"])),
        (
            "  first .. last violation, s",
            lambda a: (
                "-"
                if a["server"]["first_violation_s"] is None
                else f"{a['server']['first_violation_s']:.1f} .. {a['server']['last_violation_s']:.1f}"
            ),
        ),
        ("peak 1 s / (limit / 60)", lambda a: f"{a['peak_1s_over_limit']:.2f}"),
        ("client retries", lambda a: str(a["client"]["retries"])),
        ("requests sent / answered", lambda a: f"{a['client']['sent']} / {a['client']['answered']}"),
        ("requests failed / cancelled", lambda a: f"{a['client']['failed']} / {a['client']['cancelled']}"),
        ("accepted after the deadline", lambda a: str(a["server"]["accepted_after_deadline"])),
    ]
    width = max(len(name) for name, _ in rows) + 2
    print("".ljust(width) + "".join(a["arm"].rjust(18) for a in arms))
    for name, cell in rows:
        print(name.ljust(width) + "".join(cell(a).rjust(18) for a in arms))
    print("targets (shared limiter): achieved / limit, steady >= 0.95; violations 0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--rpm", type=float, default=600.0, help="the limit: requests per minute")
    p.add_argument(
        "--limiter-rpm",
        type=float,
        default=0.0,
        help="requests per minute given to the shared limiter (headroom below --rpm); 0: = --rpm",
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load per arm")
    p.add_argument("--actors", type=int, default=2, help="frontier actors")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per actor")
    p.add_argument(
        "--backlog",
        type=int,
        default=0,
        help="requests outstanding per actor (waiting, in flight or backing off); 0: = concurrency",
    )
    p.add_argument(
        "--window-s",
        type=float,
        default=60.0,
        help="the server's sliding window, seconds; it accepts rpm * window_s / 60 per window "
        "(1: per-second quantisation)",
    )
    p.add_argument("--latency-s", type=float, default=0.1, help="server time to answer an accepted request")
    p.add_argument(
        "--grace",
        type=float,
        default=15.0,
        help="seconds after the deadline for outstanding requests to finish; then they are cancelled",
    )
    p.add_argument(
        "--max-requests", type=int, default=0, help="requests per arm, all actors together; 0: 4 x rpm x duration / 60"
    )
    p.add_argument("--arms", default="limited,unlimited", help="which arms to run, comma-separated")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = p.parse_args(argv)
    if args.limiter_rpm < 0:
        p.error("--limiter-rpm must be positive (or 0: the same as --rpm)")
    for name in ("rpm", "duration", "window_s"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.duration <= BURST_S:
        p.error(f"--duration must be longer than the {BURST_S:g} s burst left out of the steady rate")
    if args.actors < 1 or args.concurrency < 1 or args.backlog < 0 or args.latency_s < 0 or args.grace < 0:
        p.error("--actors and --concurrency must be >= 1; --backlog, --latency-s, --grace >= 0")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - {"limited", "unlimited"}:
        p.error(f"--arms must name 'limited' and/or 'unlimited', got {args.arms!r}")
    args.arms = arms
    args.max_requests = args.max_requests or max(args.actors, math.ceil(4 * args.rpm * args.duration / 60.0))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = "disabled"  # else Ray writes a token under $HOME
    import ray

    began = time.time()
    load_before = os.getloadavg()
    # address="local": always a Ray of our own, never one someone else started on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        labels = {"limited": "shared limiter", "unlimited": "no limiter"}
        arms = []
        for arm in args.arms:
            print(f"running arm '{labels[arm]}' ({args.duration:g} s) ...", flush=True)
            arms.append(run_arm(ray, labels[arm], arm == "limited", args))
    finally:
        ray.shutdown()
    print_table(args, arms)
    result = {
        "benchmark": "frontier_rate_limit",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(began)),
        "wall_s": round(time.time() - began, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "server_rule": {
            "window_s": args.window_s,
            "allowance_per_window": max(1, math.floor(args.rpm * args.window_s / 60.0 + 1e-9)),
            "kind": "sliding window over accepted requests; rejected requests do not count",
        },
        "limiter_burst_s": BURST_S,
        "environment": {
            "python": platform.python_version(),
            "ray": ray.__version__,
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "arms": arms,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out} (wall {result['wall_s']:g} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
