"""The frontier client against a real, misbehaving HTTP server: retries, Retry-After, rate limits, secrets."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from slmbatch import Frontier
from slmbatch.errors import ConfigError
from slmbatch.frontier import (
    BURST_S,
    MAX_RETRY_AFTER_S,
    THROTTLE_DECREASE,
    THROTTLE_RECOVERY_PER_S,
    FrontierClient,
    FrontierReply,
    FrontierRequest,
    _RateLimiter,
    parse_retry_after,
    shared_rate_limiter,
)
from tests.faultserver import FaultServer

# Slack between a rate-limiter grant and the request's arrival at the server
# (connection set-up, scheduling). Idle, it is milliseconds; with both CPUs of
# a 2-CPU machine busy, up to ~0.8 s was measured, and `make test` runs vLLM
# engines beside these tests, so twice that is allowed. The limits are set low
# enough that they still bite: unlimited, all requests of a test arrive within
# ~50 ms, and each lower bound below stays seconds above what an unshared or
# unlimited run would show.
JITTER_S = 2.0

# Fast retries for tests; Retry-After from the server still applies in full.
FAST = dict(api_key_env=None, backoff_s=0.01, max_backoff_s=0.05, timeout_s=5.0)


def frontier(server: FaultServer, **overrides) -> Frontier:
    return Frontier(**{"base_url": server.base_url, "model": "test-frontier", **FAST, **overrides})


def prompts(n: int, prefix: str = "row") -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "Label the text."},
                {"role": "user", "content": f"{prefix} {i}"},
            ],
            "max_tokens": 8,
        }
        for i in range(n)
    ]


def run_many(f: Frontier, requests: list, **client_kwargs) -> list[FrontierReply]:
    async def go():
        async with FrontierClient(f, **client_kwargs) as client:
            return await client.complete_many(requests)

    return asyncio.run(go())


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("option", "value", "field"),
    [
        ("base_url", "ftp://example.com/v1", "Frontier.base_url"),
        ("base_url", "api.openai.com/v1", "Frontier.base_url"),
        ("base_url", "https://api.example.com/v1?key=1", "Frontier.base_url"),
        ("base_url", "http://host:notaport/v1", "Frontier.base_url"),
        ("model", "", "Frontier.model"),
        ("api_key_env", "MY-KEY", "Frontier.api_key_env"),
        ("actors", 0, "Frontier.actors"),
        ("concurrency", 2.5, "Frontier.concurrency"),
        ("requests_per_minute", 0, "Frontier.requests_per_minute"),
        ("tokens_per_minute", -5, "Frontier.tokens_per_minute"),
        ("timeout_s", 0, "Frontier.timeout_s"),
        ("max_attempts", 0, "Frontier.max_attempts"),
        ("backoff_s", -1, "Frontier.backoff_s"),
        ("max_backoff_s", 0.1, "Frontier.max_backoff_s"),
        ("price_out_per_mtok", -1, "Frontier.price_out_per_mtok"),
        ("retries", 3, "Frontier.retries"),
    ],
)
def test_invalid_frontier_option_is_rejected_naming_the_field(option, value, field):
    with pytest.raises(ConfigError) as err:
        Frontier(**{"base_url": "https://api.example.com/v1", "model": "m", option: value})
    assert err.value.field == field


def test_config_errors_never_echo_a_key_or_url_credentials():
    with pytest.raises(ConfigError, match=r"Frontier\.api_key_env") as err:
        Frontier("https://api.example.com/v1", "m", api_key_env="sk-live-abcdef123456")
    assert "sk-live-abcdef123456" not in str(err.value)
    with pytest.raises(ConfigError, match=r"Frontier\.base_url") as err:
        Frontier("https://user:hunter2secret@api.example.com/v1", "m")
    assert "hunter2secret" not in str(err.value)


def test_frontier_normalises_url_and_describes_itself_in_one_line():
    f = Frontier("https://api.example.com/v1/", "gpt-x", requests_per_minute=500, tokens_per_minute=30_000)
    assert f.base_url == "https://api.example.com/v1"
    assert f.chat_url == "https://api.example.com/v1/chat/completions"
    text = f.describe()
    assert "\n" not in text and "gpt-x" in text and "500 req/min" in text and "$OPENAI_API_KEY" in text


def test_retry_after_parses_seconds_and_http_dates():
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert parse_retry_after("99999999") == MAX_RETRY_AFTER_S
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# ---------------------------------------------------------------- answers and failures


def test_answer_carries_text_usage_and_cost():
    with FaultServer() as server:
        f = frontier(server, price_in_per_mtok=1.0, price_out_per_mtok=4.0)
        schema = {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": {"type": "object"}}}
        [reply] = run_many(f, [{**prompts(1)[0], "response_format": schema}])
        [seen] = server.seen
    assert reply.ok and reply.text == "answer to: row 0" and reply.attempts == 1
    assert reply.finish_reason == "stop" and not reply.usage_estimated
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0
    assert reply.cost_usd == pytest.approx((reply.prompt_tokens * 1.0 + reply.completion_tokens * 4.0) / 1e6)
    assert seen.body["model"] == "test-frontier" and seen.body["temperature"] == 0
    assert seen.body["max_tokens"] == 8 and seen.body["response_format"] == schema
    assert seen.authorization is None  # api_key_env=None sends no header


def test_missing_usage_is_estimated_from_characters():
    with FaultServer(script=["ok-nousage"]) as server:
        [reply] = run_many(frontier(server), prompts(1))
    assert reply.ok and reply.usage_estimated
    assert reply.completion_tokens == -(-len(reply.text) // 4)
    assert reply.prompt_tokens == -(-len("Label the text.row 0") // 4)


def test_every_request_is_answered_despite_injected_faults():
    # 30% of attempts fail (429 with Retry-After: 1, 500, a hang past the timeout,
    # truncated JSON), at most 3 per prompt. The timeout and the spare attempts
    # leave room for a loaded machine: CI once stalled an answered request past
    # a 0.5 s timeout on 3 attempts of one prompt.
    with FaultServer(rate=0.3, max_faults_per_key=3, seed=1) as server:
        f = frontier(server, timeout_s=2.0, max_attempts=10)
        requests = prompts(40)
        replies = run_many(f, requests)
        seen = server.seen
    assert [r.error for r in replies] == [None] * 40
    assert [r.text for r in replies] == [f"answer to: row {i}" for i in range(40)]  # input order
    faulted = {s.outcome for s in seen} - {"ok"}
    assert faulted == {"429", "500", "hang", "malformed"}
    for i, reply in enumerate(replies):
        assert reply.attempts == len([s for s in seen if s.key == f"row {i}"])
    assert sum(r.attempts > 1 for r in replies) >= 8


def test_with_one_attempt_each_failure_names_what_happened():
    # One attempt each: an answered request that stalls past the timeout on a loaded machine
    # would fail the test, so the timeout is far above any stall (a "hang" still outlasts it).
    with FaultServer(rate=0.3, faults=("429", "500", "hang", "malformed", "nocontent", "drop"), seed=2) as server:
        replies = run_many(frontier(server, timeout_s=10.0, max_attempts=1), prompts(40))
        outcome = {s.key: s.outcome for s in server.seen}
    expected = {
        "429": "HTTP 429",
        "500": "HTTP 500",
        "hang": "timeout",
        "malformed": "not valid JSON",
        "nocontent": "malformed response",
        "drop": "connection error",
    }
    assert set(outcome.values()) == {"ok", *expected}
    for i, reply in enumerate(replies):
        happened = outcome[f"row {i}"]
        assert reply.attempts == 1
        if happened == "ok":
            assert reply.ok, reply.error
        else:
            assert reply.text is None and reply.cost_usd == 0
            assert expected[happened] in reply.error and "gave up after 1 attempt" in reply.error, reply.error


def test_retry_after_is_honoured_before_the_retry():
    with FaultServer(script=["429", "ok"], retry_after="1") as server:
        [reply] = run_many(frontier(server, max_attempts=3), prompts(1))
        first, second = server.seen
    assert reply.ok and reply.attempts == 2
    assert (first.outcome, second.outcome) == ("429", "ok")
    # The client waits >= 1 s after it has the 429 response, which is after its arrival.
    assert second.t - first.t >= 0.99


def test_non_retryable_400_fails_on_the_first_attempt_with_status_and_excerpt():
    with FaultServer(script=["400"]) as server:
        [reply] = run_many(frontier(server, max_attempts=5), prompts(1))
        assert len(server.seen) == 1
    assert reply.attempts == 1 and reply.text is None
    assert reply.error.startswith("HTTP 400") and "not retryable" in reply.error
    assert "max_tokens" in reply.error  # the server's own message, excerpted


def test_in_flight_requests_never_exceed_concurrency():
    # Each answer takes 1 s, far longer than the spread of the requests' arrivals on a loaded
    # machine, so the three slots are seen full at once (== 3) as well as never exceeded.
    with FaultServer(delay_s=1.0) as server:
        replies = run_many(frontier(server, concurrency=3), prompts(9))
        assert server.max_in_flight == 3
    assert all(r.ok for r in replies)


# ---------------------------------------------------------------- the API key


def test_api_key_reaches_the_server_and_nothing_else(monkeypatch, caplog):
    secret = "sk-test-secret-123"
    monkeypatch.setenv("SLMBATCH_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    echo = lambda body: "fine"  # noqa: E731

    # Sequential calls, so the script maps onto requests: answered after a
    # 429, failed after two 500s, failed on a 400.
    with FaultServer(script=["429", "ok", "500", "500", "400"], retry_after="0", reply=echo) as server:
        f = frontier(server, api_key_env="SLMBATCH_TEST_KEY", max_attempts=2)

        async def go():
            client = FrontierClient(f)
            replies = [await client.complete(r["messages"], max_tokens=r["max_tokens"]) for r in prompts(3)]
            await client.aclose()
            return client, replies

        client, replies = asyncio.run(go())
        auth = [s.authorization for s in server.seen]
    assert auth == [f"Bearer {secret}"] * 5
    assert replies[0].ok and replies[0].attempts == 2
    assert "HTTP 500" in replies[1].error and "HTTP 400" in replies[2].error
    exposed = [
        repr(f),
        str(f),
        f.describe(),
        repr(client),
        str(client),
        *(repr(r) for r in replies),
        *(str(r) for r in replies),
        *(r.error or "" for r in replies),
        *(rec.getMessage() for rec in caplog.records),
        caplog.text,
    ]
    assert caplog.records, "expected retry/failure log records to check"
    assert not [text for text in exposed if secret in text]


def test_a_key_echoed_back_by_the_server_is_scrubbed_from_the_reason(monkeypatch):
    secret = "sk-test-secret-123"
    monkeypatch.setenv("SLMBATCH_TEST_KEY", secret)
    with FaultServer(script=["500-auth"]) as server:
        [reply] = run_many(frontier(server, api_key_env="SLMBATCH_TEST_KEY", max_attempts=1), prompts(1))
    assert "HTTP 500" in reply.error and "***" in reply.error and secret not in reply.error


# ---------------------------------------------------------------- shared rate limit (Ray)


class _FrontierWorker:
    """A frontier actor's client, as the pipeline will run it."""

    def __init__(self, f: Frontier, limiter):
        self.client = FrontierClient(f, limiter=limiter)

    async def run(self, requests: list) -> list[FrontierReply]:
        return await self.client.complete_many(requests)


def test_rate_limit_is_shared_by_clients_in_two_ray_actors(ray_local):
    ray = ray_local
    # 1 request/s; bucket capacity 1 s of allowance = 1 request. Shared, the 8 requests span
    # ~7 s; a limiter per actor would let them through in ~3 s.
    rpm = 60.0
    limiter = shared_rate_limiter("test-frontier-rpm", rpm, None)
    assert shared_rate_limiter("test-frontier-rpm", rpm, None)._actor_id == limiter._actor_id
    capacity, _ = ray.get(limiter.capacity.remote())
    rate = rpm / 60
    with FaultServer() as server:
        f = frontier(server, concurrency=4)
        worker = ray.remote(num_cpus=0)(_FrontierWorker)
        actors = [worker.remote(f, limiter) for _ in range(2)]
        # Started first: on a loaded 2-CPU machine actor start-up alone can take ~40 s.
        ray.get([a.__ray_ready__.remote() for a in actors], timeout=120)
        refs = [a.run.remote(prompts(4, prefix=f"actor{i}")) for i, a in enumerate(actors)]
        replies = [r for batch in ray.get(refs, timeout=60) for r in batch]
        times = server.times()
    assert all(r.ok for r in replies) and len(times) == 8
    # In every window [t_i, t_j] the server saw at most one bucket plus the
    # window's allowance (widened by the grant-to-arrival jitter).
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= capacity + rate * (times[j] - times[i] + JITTER_S), (i, j, times)
    # Without the limiter these 8 would arrive within milliseconds.
    assert times[-1] - times[0] >= (8 - capacity) / rate - JITTER_S
    assert ray.get(limiter.stats.remote())["granted"] == 8
    for a in actors:
        ray.kill(a)
    ray.kill(limiter)


def test_token_rate_limit_paces_requests_by_estimated_tokens(ray_local):
    ray = ray_local
    tpm = 1200.0  # 20 tokens/s, bucket 20 tokens
    limiter = shared_rate_limiter("test-frontier-tpm", None, tpm)
    # Each request: system 15 + user ~5 characters -> 5 tokens, plus max_tokens 15 = 20 tokens.
    requests = [{**r, "max_tokens": 15} for r in prompts(6)]
    with FaultServer() as server:
        replies = run_many(frontier(server, concurrency=6), requests, limiter=limiter)
        times = server.times()
    assert all(r.ok for r in replies)
    stats = ray.get(limiter.stats.remote())
    assert stats["granted"] == 6 and stats["granted_tokens"] == 120
    # 20 tokens at once, then 20 tokens/s: the 6th request can go at (120 - 20) / 20 = 5 s
    # (less the first request's connection set-up, which delays only its arrival).
    assert times[-1] - times[0] >= 5.0 - JITTER_S  # unlimited, all 6 arrive within ~50 ms

    # A request bigger than the bucket is admitted (no deadlock) and puts the bucket in debt.
    big = shared_rate_limiter("test-frontier-big", None, 12_000.0)  # 200 tokens/s, bucket 200
    start = time.monotonic()
    ray.get(big.acquire.remote(300))
    ray.get(big.acquire.remote(1))
    assert 0.4 <= time.monotonic() - start < 30  # the upper bound only says "no deadlock"
    for actor in (limiter, big):
        ray.kill(actor)


def test_reusing_a_limiter_name_with_other_limits_is_an_error(ray_local):
    from slmbatch.errors import FrontierError

    limiter = shared_rate_limiter("test-frontier-clash", 60.0, None)
    with pytest.raises(FrontierError, match="already exists"):
        shared_rate_limiter("test-frontier-clash", 120.0, None)
    # No configured rate still makes a limiter: Retry-After pauses and AIMD need one.
    unlimited = shared_rate_limiter("test-frontier-none", None, None)
    assert tuple(ray_local.get(unlimited.limits.remote())) == (None, None, BURST_S)
    for actor in (limiter, unlimited):
        ray_local.kill(actor)


def _wait_for(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.mark.parametrize(("status", "rpm"), [("429", 6000.0), ("503", None)])
def test_a_retry_after_pauses_every_client_that_shares_the_limiter(ray_local, status, rpm):
    # 503 on a limiter with no configured rate: the pause needs no rate to apply.
    # The pause is long enough that the other client is started inside it even when the
    # report of the 429/503 and the polling below stall for seconds on a loaded machine.
    ray = ray_local
    pause_s = 6
    limiter = shared_rate_limiter(f"test-frontier-pause-{status}", rpm, None)
    with FaultServer(script=[status], retry_after=str(pause_s)) as server:
        f = frontier(server, concurrency=4)
        worker = ray.remote(num_cpus=0)(_FrontierWorker)
        first, other = worker.remote(f, limiter), worker.remote(f, limiter)
        # on a loaded 2-CPU machine actor start-up alone can take ~40 s
        ray.get([first.__ray_ready__.remote(), other.__ray_ready__.remote()], timeout=120)
        throttled_ref = first.run.remote(prompts(1, prefix="first"))
        _wait_for(lambda: ray.get(limiter.stats.remote())["throttled"] == 1)
        other_started = time.monotonic()
        other_ref = other.run.remote(prompts(8, prefix="other"))
        replies = [r for batch in ray.get([throttled_ref, other_ref], timeout=60) for r in batch]
        seen = server.seen
    stats = ray.get(limiter.stats.remote())
    for actor in (first, other, limiter):
        ray.kill(actor)
    assert all(r.ok for r in replies) and len(replies) == 9
    [announced] = [s for s in seen if s.outcome == status]
    window_end = announced.t + pause_s
    assert other_started < window_end  # the other client asked inside the window ...
    # ... yet none of its requests arrived there: the limiter's pause started when
    # it heard of the Retry-After, after the server sent it, on the same machine's clock.
    others = [s.t for s in seen if s.key.startswith("other")]
    assert len(others) == 8 and min(others) >= window_end
    assert [s.t >= window_end for s in seen if s.key == "first 0"] == [False, True]
    assert stats["throttled"] == 1 and stats["pauses"] == 1 and stats["paused_s"] == pytest.approx(pause_s)
    assert stats["rate_cuts"] == (1 if status == "429" else 0)  # a 503 pauses; only a 429 says "slower"


def test_429s_of_requests_in_flight_together_cut_the_rate_once(ray_local):
    ray = ray_local
    limiter = shared_rate_limiter("test-frontier-cut-once", 6000.0, None)
    # Seven 429s: the first six answer the six first attempts, sent together; the
    # seventh answers a retry, granted after the cut, which is a new congestion event.
    # Each answer takes 3 s, well above the spread of the six arrivals on a loaded
    # machine (up to ~1 s), so all six are in flight together and arrive before any retry.
    with FaultServer(script=["429"] * 7, retry_after="1", delay_s=3.0) as server:
        replies = run_many(frontier(server, concurrency=6), prompts(6), limiter=limiter)
        in_flight = server.max_in_flight
        seen = server.seen
    stats = ray.get(limiter.stats.remote())
    ray.kill(limiter)
    assert all(r.ok for r in replies)
    assert in_flight == 6  # all six first attempts were granted before any 429 came back
    assert [s.outcome for s in seen].count("429") == 7
    assert stats["throttled"] == 7 and stats["rate_cuts"] == 2
    # Two cuts, with whatever recovery happened between them (it runs after the first pause).
    assert THROTTLE_DECREASE**2 - 1e-9 <= stats["min_rate_factor"] < THROTTLE_DECREASE


class _Clock:
    """The monotonic clock plus a jump the test controls, so recovery over minutes takes no time.
    ``frozen``: real time stands still (only the jumps move it), so a stall of a loaded machine
    between two steps of a test cannot let the rate recover between them."""

    def __init__(self, frozen: bool = False):
        self.offset = 0.0
        self.frozen_at: float | None = time.monotonic() if frozen else None

    def freeze(self) -> None:
        self.frozen_at = time.monotonic()

    def thaw(self) -> None:
        self.frozen_at = None  # real time runs on from now (the clock jumps forward, never back)

    def __call__(self) -> float:
        return (time.monotonic() if self.frozen_at is None else self.frozen_at) + self.offset


def test_repeated_429s_lower_the_granted_rate_which_recovers_over_time():
    clock = _Clock(frozen=True)  # until the cuts are measured: no grant below waits on a bucket
    limiter = _RateLimiter(600.0, 60_000.0, clock=clock)

    async def go():
        assert limiter.allowed() == (600.0, 60_000.0) and limiter.capacity()[0] == 10.0
        grant = await limiter.acquire(10)
        await limiter.throttled(429, None, grant)
        after_one = limiter.allowed()
        await limiter.throttled(429, None, grant)  # the same request's congestion event again: no second cut
        assert limiter.allowed()[0] == pytest.approx(after_one[0], rel=0.01)
        await limiter.throttled(429, None, await limiter.acquire(10))  # granted after the cut: cuts again
        after_two = limiter.allowed()
        clock.thaw()  # the grants below wait on the bucket in real time
        # The lower rate is what acquire grants: 16 grants from a bucket of
        # 4.9 refilling at 4.8/s take (16 - 4.9) / 4.8 = 2.3 s; uncut (a bucket
        # of 10 at 9.8/s), 0.6 s. Under 1.5 s only if the box stalled so long
        # (over 7 s) that the rate had recovered to 0.64 of the limit.
        capacity = limiter.capacity()[0]
        start = time.monotonic()
        for _ in range(16):
            await limiter.acquire(10)
        granting_16 = time.monotonic() - start
        clock.freeze()  # from here only the jumps move time: the bucket is full after them
        before_10s = limiter.allowed()
        clock.offset += 10.0
        gained_10s = limiter.allowed()[0] - before_10s[0]
        clock.offset += 60.0
        await limiter.acquire(10)
        return after_one, after_two, capacity, granting_16, gained_10s, limiter.allowed(), limiter.stats()

    after_one, after_two, capacity, granting_16, gained_10s, recovered, stats = asyncio.run(go())
    assert after_one == pytest.approx((600.0 * THROTTLE_DECREASE, 60_000.0 * THROTTLE_DECREASE), rel=0.01)
    assert after_two[0] == pytest.approx(600.0 * THROTTLE_DECREASE**2, rel=0.02)
    assert capacity == pytest.approx(10.0 * THROTTLE_DECREASE**2, rel=0.02)
    assert granting_16 >= 1.5
    # Additive increase: 2% of the configured rate per second.
    assert gained_10s == pytest.approx(600.0 * THROTTLE_RECOVERY_PER_S * 10.0, rel=0.01)
    assert recovered == (600.0, 60_000.0)
    assert stats["rate_cuts"] == 2 and stats["throttled"] == 3 and stats["pauses"] == 0
    assert stats["rate_factor"] == 1.0


def test_without_a_configured_rate_a_429_caps_the_observed_rate_until_recovered():
    clock = _Clock(frozen=True)  # no bucket until the cut, so nothing waits: only the jumps move time
    limiter = _RateLimiter(None, None, clock=clock)

    async def go():
        for i in range(21):  # one every 0.5 s
            if i:
                clock.offset += 0.5
            await limiter.acquire()
        assert limiter.allowed() == (None, None)
        clock.offset += 0.25  # the last 10 s saw 20 of them (not the first), 120 req/min
        await limiter.throttled(429, None, None)
        capped = limiter.allowed()
        clock.offset += 1.0 / THROTTLE_RECOVERY_PER_S  # more than enough to recover
        await limiter.acquire()
        return capped, limiter.allowed(), limiter.capacity()

    capped, recovered, capacity = asyncio.run(go())
    # 20 grants in the last 10 s, on a clock that only the test moves.
    assert capped[0] == pytest.approx(120.0 * THROTTLE_DECREASE, rel=1e-6) and capped[1] is None
    assert recovered == (None, None) and capacity == (None, None)


def test_a_pause_holds_every_grant_even_one_already_waiting_on_a_bucket():
    async def go():
        limiter = _RateLimiter(60.0, None)  # 1 request/s, bucket of 1
        await limiter.acquire()
        waiting = asyncio.ensure_future(limiter.acquire())  # sleeps on the empty bucket
        await asyncio.sleep(0.1)
        start = time.monotonic()
        await limiter.throttled(503, 1.5, None)
        await waiting
        return time.monotonic() - start, limiter.stats()

    elapsed, stats = asyncio.run(go())
    assert elapsed >= 1.5
    assert stats["granted"] == 2 and stats["throttled"] == 1 and stats["pauses"] == 1 and stats["rate_cuts"] == 0


def test_frontier_request_objects_are_accepted_by_complete_many():
    with FaultServer() as server:
        replies = run_many(
            frontier(server), [FrontierRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=4)]
        )
    assert replies[0].text == "answer to: hi"
