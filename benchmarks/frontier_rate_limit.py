"""Frontier pool throughput against a server that enforces a requests-per-minute limit, and injects faults.

A benchmark, not a test: it measures and reports, it asserts nothing.

One run, arms side by side on the same load (``--actors`` Ray actors, each a
:class:`~slmbatch.worker.FrontierActor` driving its
:class:`~slmbatch.frontier.FrontierClient` with ``--concurrency`` requests in
flight, for ``--duration`` seconds):

* ``shared limiter`` (``limited``): every actor asks ONE
  :func:`~slmbatch.frontier.shared_rate_limiter` created on the driver
  (``requests_per_minute=--rpm``), as a job does;
* ``limiter + faults`` (``faults``): the same, against a server that also
  injects faults into ``--fault-rate`` of the requests within the limit: a
  share ``--fault-429-share`` of them 429 with ``Retry-After:
  --fault-retry-after``, the rest 500 or 503;
* ``no limiter`` (``unlimited``): the same load with no limiter, for contrast;
* ``limiter told more`` (``over``, not run by default): the limiter is told
  ``--over`` x ``--rpm``, so only its reaction to 429s (pause, AIMD) keeps the
  pool near the server's real limit.

Each arm gets a fresh local OpenAI-compatible server (:class:`RpmServer`) that
enforces the limit over a sliding window: it accepts a request only if fewer
than ``rpm * window_s / 60`` requests were accepted in the last ``window_s``
seconds (default 60 s, i.e. the literal "``rpm`` per minute", at any instant);
otherwise it answers 429 with ``Retry-After`` (and ``retry-after-ms``) saying
when the oldest accepted request leaves the window, and counts a violation.
Rejected and faulted requests do not count against the window. Every 429
(over the limit or injected) announces a window for the API key, from its
arrival until its ``Retry-After``; the server counts the requests that
arrive inside one.

Reported per arm (table on stdout, JSON in ``benchmarks/results/``):

* achieved rate / limit: requests the server ACCEPTED (HTTP 200), by arrival
  time, per minute, divided by ``--rpm``. "steady" counts arrivals in
  ``[start + 1 s, start + duration)``, leaving out the first second, where the
  limiter's bucket (1 s of allowance, ``frontier.BURST_S``) lets a burst go;
  "whole run" counts ``[start, start + duration)``. ``start`` is the instant
  all actors were told to begin (they wait for it, so actor start-up is not
  measured); requests that drain after the deadline are reported apart.
* violations: 429s the server answered for being over the limit (all of
  them, drain included), and when the first and last happened;
* injected faults by status, Retry-After windows announced, and arrivals
  inside an announced window, split by how long after the latest
  announcement they came (under 10 ms is mostly requests already on their
  way when the 429 was sent);
* peak 1 s: the most requests accepted in any 1 s interval, over ``rpm / 60``
  (how bursty the pool is, whatever window the server enforces);
* client side: requests sent, answered, failed, retries (attempts beyond the
  first), requests cancelled at the end of the grace period; the limiter's
  own stats (pauses, rate cuts).

Run from the repository root: ``.venv/bin/python benchmarks/frontier_rate_limit.py``
(``--help`` for the knobs). Nothing is left running: servers are stopped,
actors killed and Ray shut down on the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import os
import platform
import random
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


@dataclasses.dataclass(frozen=True)
class Arrival:
    """One request as the server saw it, at arrival (``time.monotonic()``).

    ``kind``: ``"ok"`` (accepted), ``"rate"`` (429: over the sliding window)
    or ``"fault"`` (an injected 429, 500 or 503). ``in_window``: it arrived
    inside a ``Retry-After`` window this server had announced for the same
    API key, ``since_announced_s`` after the latest announcement.
    """

    t: float
    status: int
    kind: str
    in_window: bool
    since_announced_s: float | None


class RpmServer:
    """An OpenAI-compatible chat-completions server that enforces ``rpm`` over a sliding window.

    ``with RpmServer(600, window_s=60) as server: server.base_url ...``. At
    most ``floor(rpm * window_s / 60)`` requests are accepted in any
    ``window_s`` seconds; the rest get 429 at once, with ``Retry-After`` (and
    ``retry-after-ms``) saying when a slot frees. Of the requests within the
    limit, a share ``fault_rate`` (drawn from ``random.Random(seed)`` in
    arrival order) gets an injected fault at once instead: a share
    ``fault_429_share`` of those a 429 with ``Retry-After: fault_retry_after_s``,
    the rest a 500 or a 503 (half each, no ``Retry-After``). Faulted requests
    are not accepted, so they do not count against the window. An accepted
    request is answered after ``latency_s`` (a fixed, valid completion with
    ``usage``).

    Every 429 announces a window, per API key (the ``Authorization`` header):
    from its arrival until ``Retry-After`` later (the millisecond value when
    both are sent, as clients use it). Every request is recorded as an
    :class:`Arrival`, flagged if it arrived inside such a window: a request
    the provider had asked the key not to send yet.
    """

    def __init__(
        self,
        rpm: float,
        *,
        window_s: float = 60.0,
        latency_s: float = 0.1,
        fault_rate: float = 0.0,
        fault_429_share: float = 0.2,
        fault_retry_after_s: int = 1,
        seed: int = 0,
    ):
        self.rpm = rpm
        self.window_s = window_s
        self.allowance = max(1, math.floor(rpm * window_s / 60.0 + 1e-9))
        self.latency_s = latency_s
        self.fault_rate = fault_rate
        self.fault_429_share = fault_429_share
        self.fault_retry_after_s = fault_retry_after_s
        self._random = random.Random(seed)
        self._accepted: collections.deque[float] = collections.deque()
        self._window_end: dict[str, float] = {}
        self._announced_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self.log: list[Arrival] = []
        self.windows_announced = 0
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

    def admit(self, key: str) -> tuple[int, str, float | None]:
        """Record one arrival for API key ``key``: ``(status, kind, retry_after_s)``."""
        with self._lock:
            now = time.monotonic()
            in_window = now < self._window_end.get(key, -math.inf)
            since = now - self._announced_at[key] if in_window else None
            while self._accepted and self._accepted[0] <= now - self.window_s:
                self._accepted.popleft()
            retry_after: float | None = None
            if len(self._accepted) >= self.allowance:
                status, kind = 429, "rate"
                # What retry-after-ms says (clients prefer it to the whole seconds of Retry-After).
                retry_after = max(1, round((self._accepted[0] + self.window_s - now) * 1000)) / 1000
            elif self.fault_rate > 0 and self._random.random() < self.fault_rate:
                kind, draw = "fault", self._random.random()
                if draw < self.fault_429_share:
                    status, retry_after = 429, float(self.fault_retry_after_s)
                else:
                    status = 500 if draw < (1 + self.fault_429_share) / 2 else 503
            else:
                status, kind = 200, "ok"
                self._accepted.append(now)
            if retry_after is not None:
                self._window_end[key] = max(self._window_end.get(key, -math.inf), now + retry_after)
                self._announced_at[key] = now
                self.windows_announced += 1
            self.log.append(Arrival(now, status, kind, in_window, since))
            return status, kind, retry_after


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
        status, kind, retry_after = server.admit(self.headers.get("Authorization") or "(no key)")
        try:
            if kind == "rate":
                assert retry_after is not None
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
                    {
                        "Retry-After": str(max(1, math.ceil(retry_after))),
                        "retry-after-ms": str(round(retry_after * 1000)),
                    },
                )
                return
            if kind == "fault":
                headers = {"Retry-After": str(server.fault_retry_after_s)} if status == 429 else {}
                self._send(
                    status, {"error": {"message": f"injected fault ({status})", "type": "server_error"}}, headers
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


#: The arms: label, whether the actors share a limiter, whether the server injects faults.
ARMS = {
    "limited": ("shared limiter", True, False),
    "faults": ("limiter + faults", True, True),
    "unlimited": ("no limiter", False, False),
    "over": ("limiter told more", True, False),
}


def limiter_rpm_of(arm: str, args: argparse.Namespace) -> float:
    """What the shared limiter is told: ``--limiter-rpm`` (or ``--rpm``); in the ``over`` arm ``--over`` x ``--rpm``."""
    return args.over * args.rpm if arm == "over" else (args.limiter_rpm or args.rpm)


def run_arm(ray: Any, arm: str, args: argparse.Namespace) -> dict[str, Any]:
    label, limited, faults = ARMS[arm]
    rpm, duration = args.rpm, args.duration
    server_options: dict[str, Any] = {"window_s": args.window_s, "latency_s": args.latency_s}
    if faults:
        server_options.update(
            fault_rate=args.fault_rate,
            fault_429_share=args.fault_429_share,
            fault_retry_after_s=args.fault_retry_after,
            seed=args.seed,
        )
    limiter_rpm = limiter_rpm_of(arm, args)
    with RpmServer(rpm, **server_options) as server:
        frontier = Frontier(
            base_url=server.base_url,
            model="bench",
            api_key_env=None,
            actors=args.actors,
            concurrency=args.concurrency,
            requests_per_minute=limiter_rpm if limited else None,
            timeout_s=10.0,
        )
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
        log = sorted(server.log, key=lambda a: a.t)
        windows = server.windows_announced

    ok = [a.t - start_mono for a in log if a.kind == "ok"]
    violations = [a.t - start_mono for a in log if a.kind == "rate"]
    injected = collections.Counter(str(a.status) for a in log if a.kind == "fault")
    inside = [a for a in log if a.in_window]
    since = [a.since_announced_s or 0.0 for a in inside]
    steady = _count(ok, BURST_S, duration) / (duration - BURST_S) * 60.0
    whole = _count(ok, 0.0, duration) / duration * 60.0
    total = {k: sum(c[k] for c in clients) for k in ("sent", "answered", "failed", "retries", "cancelled")}
    reasons: collections.Counter[str] = collections.Counter()
    for c in clients:
        reasons.update(c["failure_reasons"])
    return {
        "arm": label,
        "key": arm,
        "limited": limited,
        "limiter_rpm": limiter_rpm if limited else None,
        "faults": faults,
        "server": {
            "requests": len(log),
            "accepted": len(ok),
            "accepted_after_deadline": _count(ok, duration, math.inf),
            "violations": len(violations),
            "violations_before_deadline": _count(violations, -math.inf, duration),
            "first_violation_s": round(violations[0], 3) if violations else None,
            "last_violation_s": round(violations[-1], 3) if violations else None,
            "peak_accepted_1s": _peak(ok, 1.0),
            "injected_faults": dict(sorted(injected.items())),
            "retry_after_windows_announced": windows,
            "in_window_arrivals": len(inside),
            "in_window_arrivals_by_delay": {
                "under_10ms": sum(s < 0.01 for s in since),
                "10ms_to_100ms": sum(0.01 <= s < 0.1 for s in since),
                "100ms_or_more": sum(s >= 0.1 for s in since),
            },
        },
        "achieved_rpm_steady": round(steady, 2),
        "achieved_rpm_whole": round(whole, 2),
        "achieved_over_limit_steady": round(steady / rpm, 4),
        "achieved_over_limit_whole": round(whole / rpm, 4),
        "peak_1s_over_limit": round(_peak(ok, 1.0) / (rpm / 60.0), 3),
        "in_window_share": round(len(inside) / len(log), 4) if log else 0.0,
        "client": {
            **total,
            "failure_reasons": dict(reasons),
            "hit_max_requests": any(c["hit_max_requests"] for c in clients),
            "drain_s": round(max(c["drain_s"] for c in clients), 3),
        },
        "limiter": limiter_stats,
    }


def _limiter_cell(a: dict[str, Any], name: str, fmt: str = "{}") -> str:
    stats = a["limiter"]
    if stats is None or name not in stats:  # no limiter, or one from before the stat existed
        return "-"
    return fmt.format(stats[name])


def print_table(args: argparse.Namespace, arms: list[dict[str, Any]]) -> None:
    allowance = max(1, math.floor(args.rpm * args.window_s / 60.0 + 1e-9))
    print(
        f"\nfrontier rate limit: {args.rpm:g} req/min, server accepts {allowance} per any {args.window_s:g} s "
        f"(sliding window); {args.actors} actor(s) x {args.concurrency} in flight; {args.duration:g} s per arm; "
        f"server latency {args.latency_s:g} s"
        + (f"; shared limiter set to {args.limiter_rpm:g} req/min" if args.limiter_rpm else "")
    )
    if any(a["faults"] for a in arms):
        print(
            f"faults arm: {args.fault_rate:.0%} of requests within the limit get a fault, "
            f"{args.fault_429_share:.0%} of them 429 with Retry-After: {args.fault_retry_after}, "
            f"the rest 500 / 503 (seed {args.seed})"
        )
    rows = [
        ("limiter told, req/min", lambda a: "-" if a["limiter_rpm"] is None else f"{a['limiter_rpm']:g}"),
        ("achieved / limit, steady (1 s on)", lambda a: f"{a['achieved_over_limit_steady']:.3f}"),
        ("achieved / limit, whole run", lambda a: f"{a['achieved_over_limit_whole']:.3f}"),
        ("achieved req/min, steady", lambda a: f"{a['achieved_rpm_steady']:.1f}"),
        ("violations (429, over the limit)", lambda a: str(a["server"]["violations"])),
        (
            "  first .. last violation, s",
            lambda a: (
                "-"
                if a["server"]["first_violation_s"] is None
                else f"{a['server']['first_violation_s']:.1f} .. {a['server']['last_violation_s']:.1f}"
            ),
        ),
        (
            "injected faults 429/500/503",
            lambda a: "/".join(str(a["server"]["injected_faults"].get(k, 0)) for k in ("429", "500", "503")),
        ),
        ("Retry-After windows announced", lambda a: str(a["server"]["retry_after_windows_announced"])),
        ("arrivals inside such a window", lambda a: str(a["server"]["in_window_arrivals"])),
        (
            "  of which <10 ms/<100 ms/later",
            lambda a: "/".join(str(v) for v in a["server"]["in_window_arrivals_by_delay"].values()),
        ),
        ("peak 1 s / (limit / 60)", lambda a: f"{a['peak_1s_over_limit']:.2f}"),
        ("client retries", lambda a: str(a["client"]["retries"])),
        ("requests sent / answered", lambda a: f"{a['client']['sent']} / {a['client']['answered']}"),
        ("requests failed / cancelled", lambda a: f"{a['client']['failed']} / {a['client']['cancelled']}"),
        ("accepted after the deadline", lambda a: str(a["server"]["accepted_after_deadline"])),
        (
            "limiter pauses / paused s",
            lambda a: _limiter_cell(a, "pauses") + " / " + _limiter_cell(a, "paused_s", "{:.1f}"),
        ),
        (
            "limiter rate cuts / min factor",
            lambda a: _limiter_cell(a, "rate_cuts") + " / " + _limiter_cell(a, "min_rate_factor", "{:.2f}"),
        ),
    ]
    width = max(len(name) for name, _ in rows) + 2
    print("".ljust(width) + "".join(a["arm"].rjust(18) for a in arms))
    for name, cell in rows:
        print(name.ljust(width) + "".join(cell(a).rjust(18) for a in arms))
    print(
        "targets: shared limiter, achieved / limit steady >= 0.95 and violations 0; "
        "limiter + faults, arrivals inside a Retry-After window 0"
    )


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
    p.add_argument(
        "--fault-rate", type=float, default=0.1, help="faults arm: share of requests within the limit given a fault"
    )
    p.add_argument(
        "--fault-429-share",
        type=float,
        default=0.2,
        help="faults arm: share of faults that are 429 with Retry-After (the rest: 500 and 503, half each)",
    )
    p.add_argument(
        "--fault-retry-after", type=int, default=1, help="faults arm: the injected 429s' Retry-After, whole seconds"
    )
    p.add_argument("--seed", type=int, default=0, help="faults arm: seed of the fault draws (in arrival order)")
    p.add_argument(
        "--over",
        type=float,
        default=1.5,
        help="'over' arm: the shared limiter is told --over x --rpm (AIMD finds the real one)",
    )
    p.add_argument(
        "--arms",
        default="limited,faults,unlimited",
        help=f"which arms to run, comma-separated, of {', '.join(ARMS)}",
    )
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
    if not 0 <= args.fault_rate <= 1 or not 0 <= args.fault_429_share <= 1:
        p.error("--fault-rate and --fault-429-share must be in [0, 1]")
    if args.fault_retry_after < 1 or args.over <= 0:
        p.error("--fault-retry-after must be >= 1 and --over positive")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - set(ARMS):
        p.error(f"--arms must name some of {', '.join(ARMS)}, got {args.arms!r}")
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
        arms = []
        for arm in args.arms:
            print(f"running arm '{ARMS[arm][0]}' ({args.duration:g} s) ...", flush=True)
            arms.append(run_arm(ray, arm, args))
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
            "faults": {
                "rate": args.fault_rate,
                "share_429": args.fault_429_share,
                "retry_after_s": args.fault_retry_after,
                "others": "500 and 503, half each, no Retry-After",
                "seed": args.seed,
            },
            "in_window": "arrival before the end of a Retry-After window announced earlier for the same API key",
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
