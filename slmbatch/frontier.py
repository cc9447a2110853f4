"""The frontier model: an OpenAI-compatible chat-completions endpoint, called politely.

Two pieces, each usable alone, for the driver-side spec
:class:`~slmbatch.config.Frontier` (where, which model, how hard to push it,
what it costs):

* :class:`FrontierClient` — an async client (``httpx.AsyncClient``) that never
  raises for one request's failure: every call comes back as a
  :class:`FrontierReply`, answered or with a reason. It retries a named set of
  transient failures with exponential backoff and full jitter, honours
  ``Retry-After`` (and ``retry-after-ms``) before its own retry, bounds each
  attempt with a timeout and bounds in-flight requests with a semaphore.
* :class:`RateLimiter` — a Ray actor shared by every frontier actor of a job
  (see :func:`shared_rate_limiter`). The client asks it before every attempt,
  retries included, and tells it of every 429 and 503. It holds token buckets
  for requests and tokens per minute (when configured) and two kinds of
  back-pressure that are about the API key, not one request:

  - *pause*: a 429 or 503 with ``Retry-After`` stops every grant, to every
    actor, for that long (measured on the limiter's own clock from when it
    hears of it, so clocks of different nodes never meet);
  - *AIMD*: a 429 cuts the allowed rate to :data:`THROTTLE_DECREASE` of what it
    was (one cut per congestion event: 429s of requests granted before the
    last cut were already in flight and do not cut again), never below
    :data:`THROTTLE_FLOOR` of the configured rate; it grows back by
    :data:`THROTTLE_RECOVERY_PER_S` of the configured rate per second once the
    pause is over. With no configured rate, the first cut is taken from the
    grant rate observed over the last :data:`OBSERVE_S` seconds, and the
    limit goes away again once fully recovered.

The API key is read from the environment variable *named* by
``Frontier.api_key_env`` inside the client, at call time, for each attempt. It
is never stored on an object, logged, or put in a reason string; response
excerpts are scrubbed of it in case a server echoes it back.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import email.utils
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .config import Frontier
from .errors import FrontierError
from .spec import check_optional_rate

if TYPE_CHECKING:
    import httpx

__all__ = [
    "FrontierClient",
    "FrontierReply",
    "FrontierRequest",
    "RateLimiter",  # noqa: F822 - built on first access by the module __getattr__
    "shared_rate_limiter",
]

log = logging.getLogger(__name__)

#: HTTP statuses worth another attempt: timeout, conflict, rate limit, and the
#: server-side errors that are transient at a load balancer or an overloaded
#: backend. Everything else (400, 401, 403, 404, 422, 501...) fails at once:
#: repeating the same request cannot change the answer.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})

#: Statuses the client reports to the shared limiter (:meth:`_RateLimiter.throttled`):
#: with ``Retry-After`` either pauses every actor; a 429 also cuts the allowed rate.
THROTTLE_STATUSES = frozenset({429, 503})

#: A ``Retry-After`` longer than this is clamped, so that a bogus header
#: (``Retry-After: 86400``) cannot park a job for a day. Shorter values are
#: honoured even when above ``Frontier.max_backoff_s``: the server knows its limits.
MAX_RETRY_AFTER_S = 900.0

#: Characters of a response body kept in a reason string.
EXCERPT_CHARS = 200


@dataclasses.dataclass(frozen=True)
class FrontierRequest:
    """One chat-completions request for :meth:`FrontierClient.complete_many`.

    A plain mapping with the same keys is accepted too.
    """

    messages: Sequence[Mapping[str, Any]]
    max_tokens: int
    response_format: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class FrontierReply:
    """The outcome of one request: answered (``error is None``) or failed with a reason.

    Attributes:
        text: ``choices[0].message.content`` of the answered attempt; None if failed.
        prompt_tokens, completion_tokens: the server's ``usage`` for the
            answered attempt (failed attempts are not counted: most providers
            do not bill them, and their usage is not reported). When the
            response has no usable ``usage`` they are estimated as characters / 4
            and ``usage_estimated`` is True. Both 0 for a failed request.
        attempts: attempts made, the first included.
        error: why the request failed (the last attempt's cause and whether
            it was retryable), None when answered. Never contains the API key.
        cost_usd: ``prompt_tokens`` and ``completion_tokens`` at the
            :class:`Frontier` prices.
        finish_reason: ``choices[0].finish_reason`` (``"length"`` means the
            answer was cut at ``max_tokens``).
        usage_estimated: True when the token counts are estimates.
    """

    text: str | None
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    error: str | None = None
    cost_usd: float = 0.0
    finish_reason: str | None = None
    usage_estimated: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """One attempt's result: a reply, or a reason with whether to try again."""

    reply: FrontierReply | None = None
    reason: str = ""
    retryable: bool = False
    retry_after_s: float | None = None
    status: int | None = None


def _content_chars(messages: Sequence[Mapping[str, Any]]) -> int:
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, Sequence):
            total += sum(len(part.get("text") or "") for part in content if isinstance(part, Mapping))
    return total


def estimate_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens estimated as the messages' characters / 4: the usual rule of thumb for English
    with BPE tokenizers, used where the server's count is not known (yet)."""
    return math.ceil(_content_chars(messages) / 4)


def estimate_tokens(messages: Sequence[Mapping[str, Any]], max_tokens: int) -> int:
    """What one attempt counts against ``tokens_per_minute``: :func:`estimate_prompt_tokens` +
    ``max_tokens``, added because providers reserve it when the request arrives."""
    return estimate_prompt_tokens(messages) + max_tokens


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date.

    None when absent or unparseable; never negative; at most :data:`MAX_RETRY_AFTER_S`.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _scrub(text: str, secret: str | None) -> str:
    """A short, single-line excerpt with the key (and anything that looks like one) masked."""
    if secret:
        text = text.replace(secret, "***")
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    text = re.sub(r"\bsk-[A-Za-z0-9_\-]{6,}", "sk-***", text)
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


def _error_excerpt(body: bytes, secret: str | None) -> str:
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, Mapping):
        err = data.get("error")
        if isinstance(err, Mapping) and isinstance(err.get("message"), str):
            text = err["message"]
        elif isinstance(err, str):
            text = err
        elif isinstance(data.get("message"), str):
            text = data["message"]
    return _scrub(text, secret) or "(empty body)"


def _usage_count(usage: Any, name: str) -> int | None:
    if isinstance(usage, Mapping):
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


class FrontierClient:
    """Async client for one :class:`Frontier`; one per frontier actor.

    ``complete`` and ``complete_many`` never raise for one request's failure;
    they raise :class:`~slmbatch.errors.FrontierError` only when the shared
    rate limiter cannot be reached (the job cannot go on politely).

    Args:
        frontier: the spec.
        limiter: a :class:`RateLimiter` actor handle (see
            :func:`shared_rate_limiter`), or anything with the same two remote
            methods: ``acquire.remote(tokens)`` (an awaitable grant) and
            ``throttled.remote(status, retry_after_s, grant)``. None: no rate
            limit, and a ``Retry-After`` delays only the request that got it.
        transport: an ``httpx.AsyncBaseTransport`` for tests or custom
            networking; None: httpx's default.

    At most ``frontier.concurrency`` attempts are in flight per client,
    whichever of ``complete``/``complete_many`` starts them; a slot is held
    from the rate-limiter grant to the end of the response (not during a
    backoff), so grants turn into requests at once and never pile up into a
    burst. A 429 or 503 is reported to the limiter (its ``Retry-After`` too)
    before the slot is let go, so the pause reaches every actor as early as
    it can; the request itself then backs off as without a limiter. The
    underlying ``httpx.AsyncClient`` is created on first use in the running
    event loop; close it with ``await client.aclose()`` or
    ``async with FrontierClient(...)``.
    """

    def __init__(self, frontier: Frontier, limiter: Any = None, transport: httpx.AsyncBaseTransport | None = None):
        if not isinstance(frontier, Frontier):
            raise TypeError(f"frontier must be a Frontier, got {type(frontier).__name__}")
        self.frontier = frontier
        self.limiter = limiter
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._random = random.Random()

    def __repr__(self) -> str:
        limited = "shared rate limiter" if self.limiter is not None else "no rate limiter"
        return f"FrontierClient({self.frontier.describe()}, {limited})"

    async def __aenter__(self) -> FrontierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    def _ensure_started(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        if self._closed:
            raise FrontierError("FrontierClient used after aclose()")
        loop = asyncio.get_running_loop()
        if self._http is None or self._loop is not loop:
            # A client is bound to the loop it first ran in; a new loop (a new
            # asyncio.run) gets fresh connections rather than dead ones.
            import httpx

            f = self.frontier
            self._http = httpx.AsyncClient(
                transport=self._transport,
                timeout=httpx.Timeout(f.timeout_s),
                limits=httpx.Limits(max_connections=f.concurrency, max_keepalive_connections=f.concurrency),
                follow_redirects=False,
            )
            self._slots = asyncio.Semaphore(f.concurrency)
            self._loop = loop
        assert self._slots is not None
        return self._http, self._slots

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int,
        response_format: Mapping[str, Any] | None = None,
    ) -> FrontierReply:
        """Send one chat completion (``temperature`` 0) and return its reply or the reason it failed.

        ``response_format`` is passed through, e.g. ``{"type": "json_schema",
        "json_schema": {"name": "answer", "schema": {...}, "strict": True}}``.
        Token usage comes from the response's ``usage``; when it is missing,
        prompt characters / 4 and answer characters / 4 are reported instead,
        with ``usage_estimated=True``.
        """
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        f = self.frontier
        http, slots = self._ensure_started()
        body = request_body(f, messages, max_tokens, response_format)
        estimate = estimate_tokens(messages, max_tokens)
        outcome = _Outcome()
        attempt = 0
        for attempt in range(1, f.max_attempts + 1):
            async with slots:
                grant = await self._acquire(estimate)
                outcome = await self._attempt(http, body, messages)
                if outcome.status in THROTTLE_STATUSES:
                    # Told before this request backs off (and on its last
                    # attempt too): the pause is for every actor on the key.
                    await self._throttled(outcome, grant)
            if outcome.reply is not None:
                return dataclasses.replace(outcome.reply, attempts=attempt)
            if not outcome.retryable or attempt == f.max_attempts:
                break
            delay = self._backoff(attempt, outcome.retry_after_s)
            log.debug(
                "frontier attempt %d/%d failed (%s); retrying in %.2f s", attempt, f.max_attempts, outcome.reason, delay
            )
            await asyncio.sleep(delay)
        if outcome.retryable:
            error = f"{outcome.reason} (gave up after {attempt} attempt(s))"
        else:
            error = f"{outcome.reason} (not retryable; {attempt} attempt(s))"
        log.debug("frontier request failed: %s", error)
        return FrontierReply(text=None, prompt_tokens=0, completion_tokens=0, attempts=attempt, error=error)

    async def complete_many(self, requests: Sequence[FrontierRequest | Mapping[str, Any]]) -> list[FrontierReply]:
        """Run ``requests`` concurrently (at most ``concurrency`` in flight); replies in input order."""
        calls = []
        for i, request in enumerate(requests):
            if isinstance(request, FrontierRequest):
                request = dataclasses.asdict(request)
            if not isinstance(request, Mapping) or "messages" not in request or "max_tokens" not in request:
                raise TypeError(
                    f"requests[{i}] must be a FrontierRequest or a mapping with "
                    f"'messages' and 'max_tokens', got {type(request).__name__}"
                )
            unknown = set(request) - {"messages", "max_tokens", "response_format"}
            if unknown:
                raise TypeError(f"requests[{i}] has unknown key(s) {sorted(unknown)}")
            calls.append(
                self.complete(
                    request["messages"],
                    max_tokens=request["max_tokens"],
                    response_format=request.get("response_format"),
                )
            )
        return list(await asyncio.gather(*calls))

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        f = self.frontier
        ceiling = min(f.max_backoff_s, f.backoff_s * 2 ** (attempt - 1))
        delay = self._random.uniform(0.0, ceiling)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        return delay

    async def _acquire(self, tokens: int) -> Any:
        if self.limiter is None:
            return None
        try:
            return await self.limiter.acquire.remote(tokens)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the actor died or was never reachable: a job-level failure
            raise FrontierError(f"the shared frontier rate limiter is unavailable: {type(e).__name__}") from e

    async def _throttled(self, outcome: _Outcome, grant: Any) -> None:
        if self.limiter is None:
            return
        try:
            await self.limiter.throttled.remote(outcome.status, outcome.retry_after_s, grant)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise FrontierError(f"the shared frontier rate limiter is unavailable: {type(e).__name__}") from e

    async def _attempt(
        self, http: httpx.AsyncClient, body: dict[str, Any], messages: Sequence[Mapping[str, Any]]
    ) -> _Outcome:
        import httpx

        f = self.frontier
        key = os.environ.get(f.api_key_env) if f.api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            response = await asyncio.wait_for(http.post(f.chat_url, json=body, headers=headers), f.timeout_s)
        except (TimeoutError, httpx.TimeoutException) as e:
            return _Outcome(
                reason=f"timeout: no complete response within {f.timeout_s:g} s ({type(e).__name__})", retryable=True
            )
        except (httpx.NetworkError, httpx.RemoteProtocolError) as e:
            return _Outcome(
                reason=f"connection error: {type(e).__name__}: {_scrub(str(e), key) or 'no detail'}", retryable=True
            )
        except httpx.HTTPError as e:
            return _Outcome(reason=f"request failed: {type(e).__name__}: {_scrub(str(e), key) or 'no detail'}")

        status = response.status_code
        if status in RETRYABLE_STATUSES:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            retry_after_ms = response.headers.get("retry-after-ms")  # OpenAI's finer-grained variant
            if retry_after_ms is not None:
                ms = parse_retry_after(retry_after_ms)
                if ms is not None:  # finer than Retry-After's whole seconds: use it, as OpenAI's SDK does
                    retry_after = ms / 1000
            return _Outcome(
                reason=f"HTTP {status}: {_error_excerpt(response.content, key)}",
                retryable=True,
                retry_after_s=retry_after,
                status=status,
            )
        if not 200 <= status < 300:
            hint = ""
            if status == 401 and f.api_key_env and not key:
                hint = f" (environment variable {f.api_key_env} is not set)"
            return _Outcome(reason=f"HTTP {status}{hint}: {_error_excerpt(response.content, key)}")

        try:
            data = json.loads(response.content)
        except ValueError:
            return _Outcome(
                reason=f"malformed response: HTTP {status} body is not valid JSON: "
                f"{_scrub(response.content.decode('utf-8', 'replace'), key) or '(empty body)'}",
                retryable=True,
            )
        return completion_outcome(data, messages, f, key)


def completion_outcome(
    data: Any, messages: Sequence[Mapping[str, Any]], frontier: Frontier, key: str | None, *, batch: bool = False
) -> _Outcome:
    """A chat-completions response body (decoded JSON) as a reply, or the reason it is not one.

    One reading of a completion for both ways of asking: an online response and
    a line of a Batch API output file (``batch``: priced at the batch prices)."""
    message, finish_reason = _first_message(data)
    content = message.get("content") if message is not None else None
    if not isinstance(content, str):
        refusal = message.get("refusal") if message is not None else None
        if isinstance(refusal, str) and refusal:
            return _Outcome(reason=f"refused by the model: {_scrub(refusal, key)}")
        return _Outcome(reason="malformed response: no string choices[0].message.content", retryable=True)

    usage = data.get("usage")
    prompt_tokens = _usage_count(usage, "prompt_tokens")
    completion_tokens = _usage_count(usage, "completion_tokens")
    estimated = prompt_tokens is None or completion_tokens is None
    if prompt_tokens is None:
        prompt_tokens = estimate_prompt_tokens(messages)
    if completion_tokens is None:
        completion_tokens = math.ceil(len(content) / 4)
    return _Outcome(
        reply=FrontierReply(
            text=content,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            attempts=0,
            cost_usd=frontier.cost_usd(prompt_tokens, completion_tokens, batch=batch),
            finish_reason=finish_reason,
            usage_estimated=estimated,
        )
    )


def request_body(
    frontier: Frontier,
    messages: Sequence[Mapping[str, Any]],
    max_tokens: int,
    response_format: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The chat-completions body of one request (``temperature`` 0): the same online and in a Batch API line."""
    body: dict[str, Any] = {
        "model": frontier.model,
        "messages": [dict(m) for m in messages],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if response_format is not None:
        body["response_format"] = _plain(response_format)
    return body


def _first_message(data: Any) -> tuple[Mapping[str, Any] | None, str | None]:
    if not isinstance(data, Mapping):
        return None, None
    choices = data.get("choices")
    if not isinstance(choices, Sequence) or isinstance(choices, str) or not choices:
        return None, None
    choice = choices[0]
    if not isinstance(choice, Mapping):
        return None, None
    message = choice.get("message")
    finish = choice.get("finish_reason")
    return (message if isinstance(message, Mapping) else None), (finish if isinstance(finish, str) else None)


def _plain(value: Any) -> Any:
    """JSON-ready copy of a (possibly frozen) mapping/sequence."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- rate limit

#: Bucket capacity, in seconds of allowance. Not a full minute: providers
#: enforce per-minute limits over shorter windows too (OpenAI documents that
#: 60,000 req/min may be enforced as 1,000 req/s), so a fresh job firing a
#: whole minute's allowance at once would draw a wave of 429s. One second's
#: worth still lets every actor start without waiting in lockstep.
BURST_S = 1.0

#: AIMD, multiplicative decrease: a congestion event (a 429) multiplies the
#: allowed rate by this. 0.7 (CUBIC's factor) rather than TCP Reno's 0.5: the
#: ``Retry-After`` pause already takes the load off at once, so the cut only
#: has to find a provider limit somewhat below the configured one, and a 429
#: that had nothing to do with the rate (a provider hiccup) costs less.
THROTTLE_DECREASE = 0.7

#: The allowed rate never falls below this share of the configured (or
#: observed) rate: a run of 429s slows a job down but cannot stall it.
THROTTLE_FLOOR = 0.05

#: AIMD, additive increase: once a cut's pause is over, the allowed rate grows
#: back by this share of the configured rate per second; one 0.7 cut is undone
#: in 15 s. Measured against a provider whose real limit is 2/3 of the
#: configured one (``benchmarks/frontier_rate_limit.py --arms over --window-s 1``):
#: 12 429s a minute at 0.85 of the real limit, where the limiter without AIMD
#: drew 316; 0.05 per second gave the same throughput for 21.
THROTTLE_RECOVERY_PER_S = 0.02

#: Seconds of grants over which a limiter with no configured rate measures the
#: rate it has been granting, which its first cut then starts from.
OBSERVE_S = 10.0


class _TokenBucket:
    """Continuous refill at ``rate`` per second up to ``capacity``; may go into debt.

    A cost above the capacity waits for a full bucket, then drives the level
    negative, so an oversized request is admitted (never deadlocks) and the
    long-run rate still holds. ``stamp`` may lie in the future: the bucket
    does not refill before it (a pause).
    """

    def __init__(self, per_minute: float, burst_s: float, minimum: float, now: float):
        self.burst_s = burst_s
        self.minimum = minimum
        self._tune(per_minute)
        self.level = self.capacity
        self.stamp = now

    def _tune(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self.capacity = max(per_minute / 60.0 * self.burst_s, self.minimum)
        # Refill so that a full bucket plus one minute of refill is the limit:
        # no 60 s window ever sees more than ``per_minute`` (measured by
        # benchmarks/frontier_rate_limit.py: refilling at per_minute/60 let
        # the opening burst push a strict sliding window over by one bucket).
        self.rate = max((per_minute - self.capacity) / 60.0, per_minute / 120.0)

    def retune(self, per_minute: float, now: float) -> None:
        """Refill at the old rate up to ``now``, then at ``per_minute``; the level stays within the new capacity."""
        if per_minute != self.per_minute:
            self.refill(now)
            self._tune(per_minute)
            self.level = min(self.level, self.capacity)

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def hold(self, until: float) -> None:
        """No refill before ``until`` (call :meth:`refill` first to bank what accrued so far)."""
        self.stamp = max(self.stamp, until)

    def wait_s(self, cost: float) -> float:
        need = min(cost, self.capacity) - self.level
        return max(0.0, need / self.rate)


class _RateLimiter:
    """The body of :class:`RateLimiter`: token buckets, a ``Retry-After`` pause and AIMD.

    ``acquire`` is served first-come first-served (one waiter at a time holds
    the lock while it sleeps), so a big request is not starved by small ones.
    While a pause is on, it grants nothing; it looks again after every sleep,
    so a pause that arrives while a waiter sleeps on a bucket still holds it.

    ``throttled`` is how clients report a 429 or 503 (see the module docstring
    for what it does). The allowed rate is the configured one times a factor
    in ``[THROTTLE_FLOOR, 1]``, applied to every configured bucket; with no
    configured rate, a request bucket at the observed grant rate times the
    factor exists from the first cut until the factor is back at 1.

    ``clock`` (seconds, monotonic) is for tests; the limiter measures every
    pause and rate on it alone.
    """

    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        burst_s: float = BURST_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._limits = (requests_per_minute, tokens_per_minute, burst_s)
        self._clock = clock
        now = clock()
        self._requests = _TokenBucket(requests_per_minute, burst_s, 1.0, now) if requests_per_minute else None
        self._tokens = _TokenBucket(tokens_per_minute, burst_s, 1.0, now) if tokens_per_minute else None
        self._observed: _TokenBucket | None = None  # with no configured rate: from the first cut to full recovery
        self._observed_rpm = 0.0
        self._lock = asyncio.Lock()
        self._recent: collections.deque[float] = collections.deque()  # grant times, the last OBSERVE_S seconds
        self._first_grant: float | None = None
        self._factor = 1.0
        self._factor_stamp = now
        self._paused_until = -math.inf
        self._cut_after = 0  # grants up to this number were made before the last cut
        self._granted = 0
        self._granted_tokens = 0
        self._waited_s = 0.0
        self._throttled = 0
        self._pauses = 0
        self._paused_s = 0.0
        self._cuts = 0
        self._min_factor = 1.0

    def _costs(self, tokens: int) -> list[tuple[_TokenBucket, float]]:
        requests = self._requests or self._observed
        return [(b, c) for b, c in ((requests, 1.0), (self._tokens, float(tokens))) if b is not None]

    async def acquire(self, tokens: int = 0) -> int:
        """Wait until one request of ``tokens`` estimated tokens may go; return its grant number (1, 2, ...).

        Hand the number back to :meth:`throttled` if the request is throttled.
        """
        start = self._clock()
        async with self._lock:
            while True:
                now = self._clock()
                if now < self._paused_until:
                    await asyncio.sleep(self._paused_until - now)
                    continue
                self._recover(now)
                wait = max((bucket.wait_s(cost) for bucket, cost in self._refilled(tokens, now)), default=0.0)
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            for bucket, cost in self._costs(tokens):
                bucket.level -= cost
            self._granted += 1
            grant = self._granted
            if self._first_grant is None:
                self._first_grant = now
            self._recent.append(now)
            while self._recent[0] < now - OBSERVE_S:
                self._recent.popleft()
        self._granted_tokens += tokens
        self._waited_s += self._clock() - start
        return grant

    def _refilled(self, tokens: int, now: float) -> list[tuple[_TokenBucket, float]]:
        costs = self._costs(tokens)
        for bucket, _ in costs:
            bucket.refill(now)
        return costs

    async def throttled(self, status: int, retry_after_s: float | None = None, grant: int | None = None) -> None:
        """Hear that a request was answered ``status`` (429 or 503), ``retry_after_s`` the server's ``Retry-After``.

        A positive ``retry_after_s`` pauses every grant until that many seconds
        from now, on this limiter's clock (a longer pause already on stays;
        the buckets do not refill while paused, so no burst builds up during
        it). A 429 also cuts the allowed rate,
        unless ``grant`` (the number :meth:`acquire` returned for that
        request) was given before the last cut: that request was already in
        flight, so its 429 belongs to the congestion event already counted.
        An unknown ``grant`` (None) always cuts.
        """
        now = self._clock()
        self._throttled += 1
        self._recover(now)
        if retry_after_s is not None and retry_after_s > 0:
            until = now + min(float(retry_after_s), MAX_RETRY_AFTER_S)
            if until > self._paused_until:
                self._paused_s += until - max(now, self._paused_until)
                self._paused_until = until
                self._pauses += 1
        if status == 429 and not (isinstance(grant, int) and grant <= self._cut_after):
            self._cut(now)
        for bucket in (self._requests, self._tokens, self._observed):
            if bucket is not None:
                bucket.refill(now)
                bucket.hold(self._paused_until)

    def _cut(self, now: float) -> None:
        self._cuts += 1
        self._cut_after = self._granted
        if self._requests is None and self._tokens is None and self._observed is None:
            self._observed_rpm = self._observed_rate(now)
            self._observed = _TokenBucket(self._observed_rpm, self._limits[2], 1.0, now)
        self._factor = max(THROTTLE_FLOOR, self._factor * THROTTLE_DECREASE)
        self._min_factor = min(self._min_factor, self._factor)
        self._factor_stamp = max(now, self._paused_until)  # recovery starts when the pause ends
        self._retune(now)

    def _observed_rate(self, now: float) -> float:
        """Requests per minute granted over the last :data:`OBSERVE_S` seconds (at least one request in them)."""
        while self._recent and self._recent[0] < now - OBSERVE_S:
            self._recent.popleft()
        since = now - self._first_grant if self._first_grant is not None else 0.0
        span = min(OBSERVE_S, max(since, BURST_S))
        return max(len(self._recent), 1) / span * 60.0

    def _factor_at(self, now: float) -> float:
        if self._factor >= 1.0 or now <= self._factor_stamp:
            return self._factor
        return min(1.0, self._factor + THROTTLE_RECOVERY_PER_S * (now - self._factor_stamp))

    def _recover(self, now: float) -> None:
        if self._factor < 1.0 and now > self._factor_stamp:
            self._factor = self._factor_at(now)
            self._factor_stamp = now
            self._retune(now)

    def _retune(self, now: float) -> None:
        requests_per_minute, tokens_per_minute, _ = self._limits
        if self._requests is not None and requests_per_minute:
            self._requests.retune(requests_per_minute * self._factor, now)
        if self._tokens is not None and tokens_per_minute:
            self._tokens.retune(tokens_per_minute * self._factor, now)
        if self._observed is not None:
            if self._factor >= 1.0:
                self._observed = None  # fully recovered: unlimited again, as configured
            else:
                self._observed.retune(self._observed_rpm * self._factor, now)

    def limits(self) -> tuple[float | None, float | None, float]:
        """``(requests_per_minute, tokens_per_minute, burst_s)`` this limiter was made with."""
        return self._limits

    def capacity(self) -> tuple[float | None, float | None]:
        """Bucket capacities (requests, tokens): the most that may go in a burst at the allowed rate now."""
        requests = self._requests or self._observed
        return (requests.capacity if requests else None, self._tokens.capacity if self._tokens else None)

    def allowed(self) -> tuple[float | None, float | None]:
        """``(requests_per_minute, tokens_per_minute)`` allowed now, after cuts and recovery; None: no limit."""
        factor = self._factor_at(self._clock())
        requests_per_minute, tokens_per_minute, _ = self._limits
        if requests_per_minute:
            requests: float | None = requests_per_minute * factor
        elif self._observed is not None and factor < 1.0:
            requests = self._observed_rpm * factor
        else:
            requests = None
        return requests, (tokens_per_minute * factor if tokens_per_minute else None)

    def stats(self) -> dict[str, Any]:
        """Counters since the limiter was made.

        ``granted``, ``granted_tokens``, ``waited_s`` (summed over grants);
        ``throttled`` (429/503 reports), ``pauses`` (reports that started or
        lengthened a pause), ``paused_s`` (seconds covered by pauses, overlaps
        counted once), ``paused_for_s`` (left of the pause now on), ``rate_cuts``
        (congestion events), ``rate_factor`` (allowed / configured rate now)
        and ``min_rate_factor``.
        """
        now = self._clock()
        return {
            "granted": self._granted,
            "granted_tokens": self._granted_tokens,
            "waited_s": self._waited_s,
            "throttled": self._throttled,
            "pauses": self._pauses,
            "paused_s": self._paused_s,
            "paused_for_s": max(0.0, self._paused_until - now),
            "rate_cuts": self._cuts,
            "rate_factor": self._factor_at(now),
            "min_rate_factor": self._min_factor,
        }


_ray_rate_limiter: Any = None


def _rate_limiter_actor_class() -> Any:
    global _ray_rate_limiter
    if _ray_rate_limiter is None:
        import ray

        # num_cpus=0: it only sleeps and does arithmetic, and must never wait
        # for a CPU behind the model replicas. max_concurrency: every in-flight
        # attempt of every actor may be waiting in acquire() at once.
        _ray_rate_limiter = ray.remote(num_cpus=0, max_concurrency=10_000)(_RateLimiter)
    return _ray_rate_limiter


def __getattr__(name: str) -> Any:
    # RateLimiter is a Ray actor class, built on first access so that importing
    # this module (and defining a job) does not import Ray.
    if name == "RateLimiter":
        return _rate_limiter_actor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def shared_rate_limiter(
    name: str,
    requests_per_minute: float | None,
    tokens_per_minute: float | None,
    *,
    burst_s: float = BURST_S,
    namespace: str | None = None,
    actor_options: Mapping[str, Any] | None = None,
) -> Any:
    """The job's one :class:`RateLimiter` actor named ``name``: created, or fetched if it exists.

    Call it on the driver and pass the handle to the frontier actors: the
    actor is not detached, so it is owned by the caller and goes away with
    the job (a limiter created by a frontier actor would die with that
    actor). ``namespace`` None means the current job's namespace, so two jobs
    never share a limiter by accident; give an explicit namespace to share
    one API key's limits between concurrently running jobs. ``actor_options``:
    more Ray actor options for a limiter it creates (the run passes its
    placement, :func:`slmbatch.runner.on_driver_node`).

    Both limits None still makes a limiter: no buckets until a 429 arrives,
    but a ``Retry-After`` pauses every actor and 429s cut the rate (from the
    observed one; see the module docstring), so every job that escalates
    should have one. Raises :class:`~slmbatch.errors.FrontierError` if a
    limiter of that name exists with different limits.
    """
    import ray

    check_optional_rate(requests_per_minute, "Frontier.requests_per_minute")
    check_optional_rate(tokens_per_minute, "Frontier.tokens_per_minute")
    options: dict[str, Any] = {**(actor_options or {}), "name": name, "get_if_exists": True}
    if namespace is not None:
        options["namespace"] = namespace
    handle = _rate_limiter_actor_class().options(**options).remote(requests_per_minute, tokens_per_minute, burst_s)
    want = (requests_per_minute, tokens_per_minute, burst_s)
    have = tuple(ray.get(handle.limits.remote()))
    if have != want:
        raise FrontierError(
            f"rate limiter {name!r} already exists with limits {have} (requests/min, tokens/min, burst s), not {want}"
        )
    return handle
