"""HTTP with retries: the one place tether decides what to re-send, when, and how a request fails.

Contract:
- Retryable: the statuses in `is_retryable_status` (408, 409, 425, 429 and every 5xx), the
  transport errors in `RETRYABLE_ERRORS` (timeouts, refused or dropped connections, a server
  breaking the protocol) and a 2xx whose body is not JSON or not the shape `parse` expects (a
  proxy's HTML hiccup page, a truncated body). Anything else fails at once: a 4xx such as
  400/401/403/404/422 means the request or the configuration is wrong, and re-sending the same
  bytes cannot fix it.
- `RetryPolicy.delay` (pure) says how long to wait before the next attempt, or None to give up:
  exponential backoff with jitter (`backoff_s`), or exactly the server's `Retry-After`
  (delta-seconds or HTTP-date, `retry_after_s`) plus up to 10% jitter. A Retry-After above
  `max_retry_after_s` gives up instead of stalling the caller for an hour.
- `post_json` (sync) and `apost_json` (asyncio) POST a JSON payload under a policy, with a
  per-request timeout of `policy.timeout_s`, and return `parse(body)` of the first good reply.
  A request that fails for good raises `RequestFailed`, whose message names the endpoint (its
  inline password, if any, redacted), the status (if any), the number of tries and what was
  wrong, in one line (no traceback chain).
  Optional callbacks see every attempt: `on_send(attempt)` just before it is sent (attempt > 0
  is a retry; it may raise to stop, e.g. a spent budget, and nothing is sent) and
  `on_reply(response_or_error)` after it.
- API keys: `auth_headers(api_key_env)` reads the key from the environment variable named
  `api_key_env` and places it only in the Authorization header. The key is never stored, logged
  or put in an error message; bodies of 401/403 answers are not quoted either (APIs quote
  part of the key they refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

import httpx

from offline.secrets import redact_url

log = logging.getLogger(__name__)

# Transient by nature: a timeout (408), a conflicting concurrent change (409), too early (425),
# rate limiting (429). Every other 4xx is a property of the request itself.
_RETRYABLE_4XX = frozenset({408, 409, 425, 429})

# Failures on the way to an answer that a fresh attempt may well avoid. Not retried: a local
# protocol error (our request is illegal), an unsupported scheme, a proxy refusing us.
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)

# Statuses whose bodies are not quoted in errors: APIs echo (part of) the key they refused.
_CREDENTIAL_STATUSES = frozenset({401, 403})


def is_retryable_status(status: int) -> bool:
    """True for 408, 409, 425, 429 and 5xx: an answer a later attempt may not repeat."""
    return status in _RETRYABLE_4XX or 500 <= status <= 599


# ---------------------------------------------------------------------------------------------
# Timing (pure)


def retry_after_s(header: str | None, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks us to wait (delta-seconds or HTTP-date), else None."""
    if header is None:
        return None
    header = header.strip()
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Wait before re-send number `attempt + 1`: min(max, base * 2**attempt), times U(0.5, 1).

    Jitter spreads out re-sends of requests that failed together; keeping at least half the
    exponential wait keeps the backoff meaningful.
    """
    return min(max_s, base_s * 2.0**attempt) * rng.uniform(0.5, 1.0)


class _Answer(Protocol):
    status_code: int
    headers: Any  # a case-insensitive mapping (httpx.Headers)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one request is re-sent, and how long each attempt may take."""

    max_retries: int = 3  # re-sends after the first attempt
    backoff_base_s: float = 0.5  # first backoff wait, doubled each retry
    backoff_max_s: float = 30.0  # cap on one backoff wait (a Retry-After is not capped by it)
    max_retry_after_s: float = 120.0  # a longer Retry-After gives up rather than stall the caller
    timeout_s: float = 60.0  # per attempt: connect, write, read and pool wait each

    def delay(
        self, attempt: int, response: _Answer | None, rng: random.Random, now: float | None = None
    ) -> float | None:
        """Seconds to wait after failed attempt `attempt` (0-based) before the next, or None to give up.

        `response` is the failed attempt's HTTP answer, or None when there was none to go by (a
        transport error, or a 2xx whose body was unreadable): then plain backoff. A Retry-After
        is honoured exactly, never early, plus up to 10% so a herd of 429s does not return as
        one; `now` (epoch seconds) pins the clock for an HTTP-date.
        """
        if attempt >= self.max_retries:
            return None
        if response is None:
            return backoff_s(attempt, self.backoff_base_s, self.backoff_max_s, rng)
        if not is_retryable_status(response.status_code):
            return None
        wait = retry_after_s(response.headers.get("retry-after"), now)
        if wait is None:
            return backoff_s(attempt, self.backoff_base_s, self.backoff_max_s, rng)
        if wait > self.max_retry_after_s:
            return None
        return wait * rng.uniform(1.0, 1.1)


# ---------------------------------------------------------------------------------------------
# Errors and bodies


class RequestFailed(RuntimeError):
    """A request failed for good: "<url>: <what>[ after N tries][: <detail>]".

    `url` is redacted (`offline.secrets.redact_url`: an inline password shows as `***`), so
    the message is safe to log. `status` is the last answer's HTTP status, None when no answer
    came back; `detail` alone is kept too (callers look into it, e.g. for a parameter's name).
    """

    def __init__(self, url: str, what: str, detail: str = "", *, status: int | None = None, attempts: int = 1):
        url = redact_url(str(url))
        tries = f" after {attempts} tries" if attempts > 1 else ""
        super().__init__(f"{url}: {what}{tries}" + (f": {detail}" if detail else ""))
        self.url, self.status, self.attempts, self.detail = url, status, attempts, detail


_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.I | re.S)
_TAG = re.compile(r"<[^>]+>")


def describe_body(content_type: str, text: str) -> str:
    """A short, readable account of an answer's body for an error message (pure).

    An HTML page (a proxy's or load balancer's error page) is named by its title or first text
    rather than quoted; a JSON error object by its message (OpenAI's `error.message`, FastAPI's
    `detail`); anything else is quoted, cut short.
    """
    stripped = text.strip()
    if not stripped:
        return "an empty body"
    if "html" in content_type.lower() or stripped.startswith("<"):
        title = _TITLE.search(stripped)
        words = " ".join(_TAG.sub(" ", title.group(1) if title else stripped).split())
        return f"an HTML page ({words[:100]!r})" if words else "an HTML page"
    try:
        data = json.loads(stripped)
    except ValueError:
        return repr(stripped[:200])
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    if not message and isinstance(data, dict) and isinstance(data.get("detail"), str):
        message = data["detail"]  # FastAPI's error body (`transformers serve`, many proxies)
    return repr(str(message)[:200]) if message else repr(stripped[:200])


def _about(resp: httpx.Response) -> str:
    if resp.status_code in _CREDENTIAL_STATUSES:
        return "body not shown: it may quote the key"
    return describe_body(resp.headers.get("content-type", ""), resp.text)


# ---------------------------------------------------------------------------------------------
# Headers


def auth_headers(api_key_env: str) -> dict[str, str]:
    """`{"Authorization": "Bearer <key>"}` from the env var named `api_key_env`; {} when it is unset.

    The only place a key enters a request: clients are made with these headers and nothing
    else holds the key. A key with whitespace or control characters is refused here, naming
    the variable only: httpx would echo the illegal header value in its exception.
    """
    key = os.environ.get(api_key_env, "").strip()
    if not key:
        return {}
    if not key.isprintable() or any(c.isspace() for c in key):
        raise ValueError(f"{api_key_env} contains whitespace or control characters; fix the key")
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------------------------------------
# Senders


_JSON = {"Content-Type": "application/json"}
_NOT_JSON = object()


def _as_is(body: Any) -> Any:
    return body


class _Call:
    """One logical POST's decisions across its attempts, shared by both senders (no I/O here)."""

    def __init__(self, url, payload, policy, rng, parse, on_send, on_reply) -> None:
        # The redacted URL, for messages only: the request goes to the URL as given.
        self.url, self.payload, self.policy, self.rng = redact_url(str(url)), payload, policy, rng
        self.parse, self.on_send, self.on_reply = parse, on_send, on_reply
        self.timeout = httpx.Timeout(policy.timeout_s)
        self.attempt = -1
        self.value: Any = None
        self.wait = 0.0
        self._content: bytes | None = None

    def content(self) -> bytes:
        """Start the next attempt: tell `on_send` (which may raise to stop) and return the body."""
        self.attempt += 1
        if self.on_send is not None:
            self.on_send(self.attempt)
        if self._content is None:  # encoded once, when the first attempt is about to go out
            payload = self.payload() if callable(self.payload) else self.payload
            self._content = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        return self._content

    def settle(self, result: httpx.Response | httpx.RequestError) -> bool:
        """True when `value` holds the parsed reply; False when `wait` says when to try again.

        Raises `RequestFailed` when the request is done for.
        """
        if self.on_reply is not None:
            self.on_reply(result)
        if isinstance(result, httpx.RequestError):
            what = type(result).__name__
            if not isinstance(result, RETRYABLE_ERRORS):
                raise RequestFailed(self.url, what, str(result), attempts=self.attempt + 1)
            return self._again(None, None, what, str(result))
        status = result.status_code
        if not 200 <= status <= 299:
            if not is_retryable_status(status):
                raise RequestFailed(
                    self.url, f"HTTP {status}", _about(result), status=status, attempts=self.attempt + 1
                )
            return self._again(result, status, f"HTTP {status}", _about(result))
        # Failures are settled after the `except` blocks, so a give-up is not chained to them.
        body = _NOT_JSON
        with contextlib.suppress(ValueError):  # not JSON, or not UTF-8
            body = result.json()
        if body is _NOT_JSON:
            return self._again(None, status, f"HTTP {status} reply is not JSON", _about(result))
        try:
            self.value = self.parse(body)
            return True
        except (ValueError, LookupError, TypeError, AttributeError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
        return self._again(None, status, f"HTTP {status} reply does not have the expected shape", detail)

    def _again(self, response: httpx.Response | None, status: int | None, what: str, detail: str) -> bool:
        """Schedule the next attempt (`wait`), or raise when the policy gives up."""
        wait = self.policy.delay(self.attempt, response, self.rng)
        if wait is None:
            if self.attempt < self.policy.max_retries:  # retries were left: the Retry-After is over the cap
                detail += f"; Retry-After over the {self.policy.max_retry_after_s:.0f} s cap, giving up"
            raise RequestFailed(self.url, what, detail, status=status, attempts=self.attempt + 1)
        log.debug("%s: %s (%s); retry %d/%d in %.2fs", self.url, what, detail, self.attempt + 1,
                  self.policy.max_retries, wait)
        self.wait = wait
        return False


Payload = Any  # a JSON-able value, or a function making it when the first attempt goes out
OnSend = Callable[[int], None]
OnReply = Callable[[httpx.Response | httpx.RequestError], None]
ClientLease = Callable[[], AbstractAsyncContextManager[httpx.AsyncClient]]


def post_json(
    client: httpx.Client,
    url: str | httpx.URL,
    payload: Payload,
    policy: RetryPolicy,
    *,
    rng: random.Random,
    parse: Callable[[Any], Any] = _as_is,
    on_send: OnSend | None = None,
    on_reply: OnReply | None = None,
) -> Any:
    """POST `payload` as JSON, retrying under `policy`; `parse(body)` of the first good reply.

    `parse` raising ValueError, LookupError, TypeError or AttributeError (what reading a JSON
    body of the wrong shape raises) marks the reply malformed: it is retried.
    Raises `RequestFailed`.
    """
    call = _Call(url, payload, policy, rng, parse, on_send, on_reply)
    while True:
        content = call.content()
        result: httpx.Response | httpx.RequestError
        try:
            result = client.post(url, content=content, headers=_JSON, timeout=call.timeout)
        except httpx.RequestError as exc:
            result = exc
        if call.settle(result):
            return call.value
        time.sleep(call.wait)


async def apost_json(
    client: httpx.AsyncClient | ClientLease,
    url: str | httpx.URL,
    payload: Payload,
    policy: RetryPolicy,
    *,
    rng: random.Random,
    parse: Callable[[Any], Any] = _as_is,
    on_send: OnSend | None = None,
    on_reply: OnReply | None = None,
) -> Any:
    """`post_json` on an event loop. `client` is a client, or a function lending one per attempt.

    A lent client (e.g. a concurrency slot) is held for one attempt only, never across a backoff
    sleep, and `on_send` runs while it is held: a budget checked there is checked when the
    request can really start. Cancellation propagates (no attempt is left running).
    """
    lease = _lend(client) if isinstance(client, httpx.AsyncClient) else client
    call = _Call(url, payload, policy, rng, parse, on_send, on_reply)
    while True:
        async with lease() as held:
            content = call.content()
            result: httpx.Response | httpx.RequestError
            try:
                result = await held.post(url, content=content, headers=_JSON, timeout=call.timeout)
            except httpx.RequestError as exc:
                result = exc
        if call.settle(result):
            return call.value
        await asyncio.sleep(call.wait)


def _lend(client: httpx.AsyncClient) -> ClientLease:
    @asynccontextmanager
    async def lease() -> AsyncIterator[httpx.AsyncClient]:
        yield client

    return lease
