"""online.http: the retry policy as pure functions, and both senders against the loopback fake
OpenAI server (tests/fake_openai_server.py), whose request log shows what was really sent."""

import asyncio
import contextlib
import email.utils
import random
from dataclasses import replace

import httpx
import pytest
from fake_openai_server import FakeOpenAIServer

from online.http import (
    RequestFailed,
    RetryPolicy,
    apost_json,
    auth_headers,
    backoff_s,
    describe_body,
    is_retryable_status,
    post_json,
    retry_after_s,
)

RETRYABLE = (408, 409, 425, 429, 500, 501, 502, 503, 504, 599)
FATAL = (400, 401, 403, 404, 405, 413, 422)


def answer(status: int, retry_after: str | None = None) -> httpx.Response:
    return httpx.Response(status, headers={"Retry-After": retry_after} if retry_after is not None else {})


# -- pure: timing and classification -----------------------------------------------------------


def test_retry_after_parsing():
    assert retry_after_s(None) is None
    assert retry_after_s("3") == 3.0
    assert retry_after_s(" 0.25 ") == 0.25
    assert retry_after_s("-4") == 0.0
    assert retry_after_s("soon") is None
    date = email.utils.formatdate(1_000_010, usegmt=True)
    assert retry_after_s(date, now=1_000_000) == pytest.approx(10.0)


def test_backoff_is_exponential_capped_and_jittered():
    rng = random.Random(0)
    for attempt in range(8):
        expected = min(4.0, 0.5 * 2**attempt)
        waits = [backoff_s(attempt, 0.5, 4.0, rng) for _ in range(50)]
        assert all(expected / 2 <= w <= expected for w in waits)
        assert len(set(waits)) > 1


def test_retryable_statuses_are_408_409_425_429_and_5xx_only():
    assert all(is_retryable_status(s) for s in RETRYABLE)
    assert not any(is_retryable_status(s) for s in (*FATAL, 200, 204, 301, 600))


def test_delay_honours_retry_after_in_seconds_never_early_at_most_10_percent_late():
    policy, rng = RetryPolicy(max_retries=3, backoff_base_s=0.01), random.Random(1)
    waits = [policy.delay(0, answer(429, "3"), rng) for _ in range(50)]
    assert all(3.0 <= w <= 3.3 for w in waits) and len(set(waits)) > 1
    assert policy.delay(1, answer(503, "0"), rng) == 0.0


def test_delay_honours_retry_after_as_an_http_date():
    policy, rng = RetryPolicy(max_retries=3), random.Random(2)
    date = email.utils.formatdate(1_000_010, usegmt=True)  # 10 s after `now`
    waits = [policy.delay(0, answer(503, date), rng, now=1_000_000) for _ in range(50)]
    assert all(10.0 <= w <= 11.0 for w in waits)
    past = email.utils.formatdate(999_000, usegmt=True)
    assert policy.delay(0, answer(429, past), rng, now=1_000_000) == 0.0  # already due: go now


def test_delay_without_retry_after_is_jittered_exponential_backoff():
    policy, rng = RetryPolicy(max_retries=10, backoff_base_s=0.5, backoff_max_s=4.0), random.Random(3)
    for attempt in range(6):
        full = min(4.0, 0.5 * 2**attempt)
        for response in (None, answer(500), answer(429, "soon")):  # no usable header: backoff
            waits = [policy.delay(attempt, response, rng) for _ in range(30)]
            assert all(full / 2 <= w <= full for w in waits) and len(set(waits)) > 1


def test_a_retry_after_over_the_cap_gives_up_instead_of_sleeping():
    policy, rng = RetryPolicy(max_retries=5, max_retry_after_s=120.0), random.Random(4)
    assert policy.delay(0, answer(429, "3600"), rng) is None
    hour = email.utils.formatdate(1_003_600, usegmt=True)
    assert policy.delay(0, answer(503, hour), rng, now=1_000_000) is None
    assert 120.0 <= policy.delay(0, answer(429, "120"), rng) <= 132.0  # at the cap: still honoured


def test_fatal_statuses_and_spent_retries_are_never_retried():
    policy, rng = RetryPolicy(max_retries=2), random.Random(5)
    for status in FATAL:
        assert policy.delay(0, answer(status, "1"), rng) is None, status
    for status in RETRYABLE:
        assert policy.delay(1, answer(status), rng) is not None, status
        assert policy.delay(2, answer(status), rng) is None, status  # the 3rd try was the last
    assert policy.delay(2, None, rng) is None
    assert RetryPolicy(max_retries=0).delay(0, None, rng) is None


def test_bodies_are_described_not_dumped():
    page = "<html><head><title>502 Bad Gateway</title></head><body><h1>nginx</h1></body></html>"
    assert describe_body("text/html", page) == "an HTML page ('502 Bad Gateway')"
    assert describe_body("text/html", "<html>upstream hiccup</html>") == "an HTML page ('upstream hiccup')"
    assert describe_body("application/json", '{"error": {"message": "model not found"}}') == "'model not found'"
    assert describe_body("application/json", '{"error": "overloaded"}') == "'overloaded'"
    assert describe_body("application/json", '{"detail": "prompt must be a string."}') == "'prompt must be a string.'"
    assert describe_body("text/plain", "x" * 500) == repr("x" * 200)
    assert describe_body("application/json", "  ") == "an empty body"


def test_auth_headers_carry_the_key_only_in_authorization(monkeypatch):
    monkeypatch.delenv("TEST_HTTP_KEY", raising=False)
    assert auth_headers("TEST_HTTP_KEY") == {}
    monkeypatch.setenv("TEST_HTTP_KEY", " sk-abc \n")
    assert auth_headers("TEST_HTTP_KEY") == {"Authorization": "Bearer sk-abc"}
    monkeypatch.setenv("TEST_HTTP_KEY", "sk-bad\nkey")
    with pytest.raises(ValueError, match="TEST_HTTP_KEY contains whitespace") as err:
        auth_headers("TEST_HTTP_KEY")
    assert "sk-bad" not in str(err.value)


# -- the senders against a real loopback server --------------------------------------------------

FAST = RetryPolicy(max_retries=3, backoff_base_s=0.01, backoff_max_s=0.02, timeout_s=2.0)


def texts(body):
    return [c["text"] for c in body["choices"]]


def some_texts(body):
    """`texts`, refusing an empty list: the malformed-reply signal a caller's parse gives."""
    if not body["choices"]:
        raise ValueError("no choices")
    return texts(body)


@pytest.fixture
def server():
    with FakeOpenAIServer(retry_after="0") as s:
        yield s


def test_post_json_retries_each_transient_failure_and_reports_every_attempt(server):
    server.script("503", "drop", "malformed", "no_choices")
    sent, replies = [], []
    with httpx.Client() as client:
        body = post_json(
            client, server.base_url + "/completions", {"prompt": "hi", "n": 2}, replace(FAST, max_retries=4),
            rng=random.Random(0),
            parse=some_texts, on_send=sent.append, on_reply=replies.append,
        )
    assert body == ["hi #0", "hi #1"]
    assert sent == [0, 1, 2, 3, 4] and server.n_requests == 5
    assert [r.status_code if isinstance(r, httpx.Response) else type(r) for r in replies] == [
        503, httpx.RemoteProtocolError, 200, 200, 200,
    ]


def test_post_json_fails_at_once_on_a_fatal_status_naming_endpoint_and_reason(server):
    url = server.base_url + "/completions"
    server.script("400")
    with httpx.Client() as client, pytest.raises(RequestFailed) as err:
        post_json(client, url, {"prompt": "hi"}, FAST, rng=random.Random(0))
    assert (err.value.status, err.value.attempts, server.n_requests) == (400, 1, 1)
    assert str(err.value) == f"{url}: HTTP 400: 'scripted 400'"


def test_post_json_gives_up_on_html_after_the_retries_with_a_clear_error(server):
    url = server.base_url + "/completions"
    server.script("malformed", "malformed", "malformed", "malformed")
    with httpx.Client() as client, pytest.raises(RequestFailed) as err:
        post_json(client, url, {"prompt": "hi"}, FAST, rng=random.Random(0))
    assert str(err.value) == f"{url}: HTTP 200 reply is not JSON after 4 tries: an HTML page ('upstream hiccup')"
    assert err.value.__cause__ is None and err.value.__context__ is None  # one line, no chain


def test_a_refused_key_is_fatal_and_its_body_is_not_quoted(monkeypatch):
    monkeypatch.setenv("TEST_HTTP_KEY", "sk-wrong")
    with FakeOpenAIServer(api_key="sk-right") as server:
        with httpx.Client(headers=auth_headers("TEST_HTTP_KEY")) as client, pytest.raises(RequestFailed) as err:
            post_json(client, server.base_url + "/completions", {"prompt": "hi"}, FAST, rng=random.Random(0))
        assert err.value.status == 401 and server.n_requests == 1
        assert str(err.value).endswith("HTTP 401: body not shown: it may quote the key")


def test_on_send_may_stop_a_request_before_it_is_sent(server):
    server.script("500")

    def budget(attempt: int) -> None:
        if attempt > 0:
            raise LookupError("budget spent")

    with httpx.Client() as client, pytest.raises(LookupError, match="budget spent"):
        post_json(client, server.base_url + "/completions", {"prompt": "hi"}, FAST, rng=random.Random(0),
                  on_send=budget)
    assert server.n_requests == 1


def test_apost_json_holds_a_lent_client_for_one_attempt_never_across_the_backoff(server):
    server.retry_after = "0.2"
    server.script("429")
    events: list[str] = []

    async def run():
        async with httpx.AsyncClient() as client:

            @contextlib.asynccontextmanager
            async def lease():
                events.append("lend")
                yield client
                events.append("return")

            return await apost_json(
                lease, server.base_url + "/completions", lambda: {"prompt": "hi", "n": 1}, FAST,
                rng=random.Random(0), parse=texts, on_send=lambda attempt: events.append(f"send {attempt}"),
            )

    assert asyncio.run(run()) == ["hi #0"]
    assert events == ["lend", "send 0", "return", "lend", "send 1", "return"]
    first, second = server.requests
    assert 0.2 <= second.t - first.t < 1.0  # the Retry-After, not the 10 ms backoff
