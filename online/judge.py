"""Judges: turn generations (k samples per prompt) into labelled preference pairs.

One interface, three kinds. Every judge has a `name` and
`judge_generations(generations) -> (judgments, stats)`; `build_judge(cfg)` makes one from a
`JudgeConfig`. Ties, unparseable verdicts and failed requests are dropped and counted in
`JudgeStats`, never turned into labels. Empty and duplicate responses are never paired.

1. `LLMJudge` (kind "llm"): an OpenAI-compatible chat API (`POST {base_url}/chat/completions`).
   Pairs come from `judge_prompt.select_pairs` (disjoint consecutive pairs of distinct
   responses); each pair is asked in both orders (A/B, then swapped) and labelled only when
   both orders name the same response, with confidence 1.0; otherwise it is a tie. Requests
   run concurrently, at most `concurrency` at once, through `online.http.apost_json` under a
   `RetryPolicy` of `max_retries`, `backoff_base_s`, `backoff_max_s` and `timeout_s`: 408,
   409, 425, 429, 5xx, timeouts, connection errors and malformed bodies are retried with
   exponential backoff and jitter, or after exactly the server's `Retry-After` (plus up to 10%
   jitter; a Retry-After over the policy's cap gives the request up instead of stalling the
   cycle). 401/403/404 mean the configuration is wrong and raise `JudgeAPIError`; other 4xx
   fail that pair only (counted in `errors`). The API key is read from the environment
   variable `api_key_env` at each pass (`online.http.auth_headers`) and only ever placed in the
   Authorization header: it is not stored on the judge, logged, or put in any message or stat.
   Parsed verdicts are cached per ordered call (`judge_prompt.verdict_cache_key`) in memory
   and, with `cache_dir`, in a JSON file written atomically after each pass. The budget
   (`max_calls`, `max_cost_usd`; see `online.cost`) stops a pass cleanly: a pair reserves its
   requests when its first request is about to start; a refused pair is not started, requests
   in flight finish, and the partial judgments are returned with `budget_exhausted=True`.
   `judge_generations` is a sync wrapper (`asyncio.run`) for callers without an event loop;
   inside a running loop, `await ajudge_generations(...)`.
   Reward-hacking guards (`online.judge_prompt`): the template's delimiters inside a prompt or
   reply are escaped before they are sent, so a reply cannot close `<reply_a>` and forge a
   verdict request of its own. A reply that is only a "master key" (":", ".", "Thought
   process:", "Solution", ...; arXiv 2507.08794) is never shown to the judge: against a reply
   with substance it is labelled the loser without a request; two of them are a tie. Labelled
   the loser rather than judged as empty, because an empty reply is never paired, so the
   policy would get no signal against the hack, while the judge could still be fooled by it
   anywhere else; as the rejected side of a pair it trains the hack away. (A prompt whose right
   answer really is "." is the price; such tasks should use a rule judge.) Every sample that
   needed either guard is counted in `JudgeStats.neutralised`; a cycle flags a high share.
2. `RewardModelJudge` (kind "reward_model", in `online.judge_local`): a sequence-classification
   model with one label scores prompt+response; the pair is the best vs the worst distinct
   response of each generation when their score margin is > 0 and >= `min_margin`;
   confidence = sigmoid(margin).
3. `RuleJudge` (kind "rule", in `online.judge_local`): a callable
   `module:function(prompt, response) -> float` (e.g. in [0, 1]) scores each response; same
   best-vs-worst rule; confidence = margin clipped to [0, 1].

The local judges make no API calls (stats.calls == 0) and so are never limited by the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx

from offline.atomic import atomic_write_json
from offline.secrets import redact_url
from online.config import JudgeConfig, LLMJudgeConfig
from online.cost import Budget, CostMeter
from online.http import RequestFailed, RetryPolicy, apost_json, auth_headers
from online.replies import chat_reply
from online.judge_prompt import (
    TEMPLATE_VERSION,
    Verdict,
    build_pairwise_messages,
    combine_orders,
    is_master_key,
    needs_neutralising,
    parse_verdict,
    position_conflict,
    select_pairs,
    verdict_cache_key,
)
from online.types import Generation, Judgment, JudgeStats

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Config


class Judge(Protocol):
    """Anything that turns generations into judgments."""

    name: str

    def judge_generations(self, generations: list[Generation]) -> tuple[list[Judgment], JudgeStats]:
        """Label pairs from `generations`; returns the judgments (input order) and the pass's stats."""
        ...


def build_judge(cfg: JudgeConfig) -> Judge:
    """The judge `cfg.kind` names (reward models are loaded and rule functions imported now)."""
    if cfg.kind == "llm":
        assert cfg.llm is not None
        return LLMJudge(cfg.llm, Budget(cfg.max_calls, cfg.max_cost_usd))
    from online.judge_local import RewardModelJudge, RuleJudge  # they import this module's configs

    if cfg.kind == "reward_model":
        assert cfg.reward_model is not None
        return RewardModelJudge(cfg.reward_model)
    assert cfg.rule is not None
    return RuleJudge(cfg.rule)


class JudgeAPIError(RuntimeError):
    """The judge API refused in a way retrying cannot fix (wrong key, model or URL)."""


# ---------------------------------------------------------------------------------------------
# Verdict cache


class VerdictCache:
    """Parsed verdicts by `verdict_cache_key`: a dict, mirrored to `<cache_dir>/llm_judge_verdicts.json`.

    `flush` merges with whatever is on disk (another process may have added entries) and
    replaces the file atomically (`offline.atomic`), so a crash never leaves a torn
    file. Only parsed verdicts are stored: unparseable replies and failures are retried next time.
    """

    FILE_NAME = "llm_judge_verdicts.json"

    def __init__(self, cache_dir: str | Path | None) -> None:
        self.path = Path(cache_dir) / self.FILE_NAME if cache_dir is not None else None
        self._verdicts: dict[str, Verdict] = self._read() if self.path is not None else {}
        self._unsaved: dict[str, Verdict] = {}

    def get(self, key: str) -> Verdict | None:
        return self._verdicts.get(key)

    def put(self, key: str, verdict: Verdict) -> None:
        self._verdicts[key] = verdict
        self._unsaved[key] = verdict

    def __len__(self) -> int:
        return len(self._verdicts)

    def flush(self) -> None:
        """Write new verdicts to the cache file (no-op without a cache dir or new entries)."""
        if self.path is None or not self._unsaved:
            return
        merged = {**self._read(), **self._unsaved}
        atomic_write_json(self.path, merged, separators=(",", ":"))
        self._verdicts.update(merged)
        self._unsaved.clear()

    def _read(self) -> dict[str, Verdict]:
        assert self.path is not None
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            # The cache only saves money; a damaged one is rebuilt rather than failing the cycle.
            log.warning("ignoring unreadable judge cache %s (%s); it will be rewritten", self.path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if v in ("A", "B", "tie")}


# ---------------------------------------------------------------------------------------------
# LLM judge

_ERROR = "error"  # a request failed for good
_BUDGET = "budget"  # a request was not sent because the budget ran out


class _Ticket:
    """A pair's request reservation, taken by whichever of its two calls starts first."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.granted: bool | None = None

    def claim(self, meter: CostMeter) -> bool:
        if self.granted is None:
            self.granted = meter.reserve(self.n)
        return self.granted


class LLMJudge:
    """Pairwise judge over an OpenAI-compatible chat API (see module docstring)."""

    def __init__(self, cfg: LLMJudgeConfig, budget: Budget = Budget()) -> None:
        self.cfg = cfg
        self.budget = budget
        self.name = f"llm:{cfg.model}"
        self.cache = VerdictCache(cfg.cache_dir)
        # Parsed once: httpx re-parses a str URL on every request.
        self._url = httpx.URL(cfg.base_url.rstrip("/") + "/chat/completions")
        self._policy = RetryPolicy(
            max_retries=cfg.max_retries,
            backoff_base_s=cfg.backoff_base_s,
            backoff_max_s=cfg.backoff_max_s,
            timeout_s=cfg.timeout_s,
        )
        self._rng = random.Random()
        self._ssl_context: ssl.SSLContext | None = None
        self._refused = self._answered = 0

    def __repr__(self) -> str:
        return f"LLMJudge(model={self.cfg.model!r}, base_url={redact_url(self.cfg.base_url)!r})"

    def judge_generations(self, generations: list[Generation]) -> tuple[list[Judgment], JudgeStats]:
        """Sync wrapper: runs `ajudge_generations` with `asyncio.run` (no loop may be running)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.ajudge_generations(generations))
        raise RuntimeError(
            "LLMJudge.judge_generations called inside a running event loop; "
            "use `await judge.ajudge_generations(...)` there"
        )

    async def ajudge_generations(self, generations: list[Generation]) -> tuple[list[Judgment], JudgeStats]:
        """Judge every selected pair of every generation; judgments come back in input order."""
        cfg = self.cfg
        meter = CostMeter(self.budget, cfg.price_prompt_per_mtok, cfg.price_completion_per_mtok)
        headers = auth_headers(cfg.api_key_env)
        if not headers:
            log.warning("%s is not set: calling the judge API without an Authorization header", cfg.api_key_env)
        started = time.perf_counter()
        # One single-connection client per concurrency slot; the queue of idle clients is the
        # semaphore. httpcore's pool rescans every pooled connection (with a socket-readability
        # syscall each) whenever a request enters or leaves it, so one shared pool of N
        # connections costs O(N) per request; N pools of one keep it O(1) (about half the CPU
        # per call at N=16, measured). All clients share one SSL context.
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()  # loads the CA bundle: once per judge
        slots: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        self._refused = self._answered = 0  # connection refusals vs HTTP answers, this pass
        meter.neutralised = sum(needs_neutralising(r) for gen in generations for r in gen.responses)
        try:
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(cfg.concurrency):
                    client = httpx.AsyncClient(
                        headers=headers,
                        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                        verify=self._ssl_context,
                    )
                    slots.put_nowait(await stack.enter_async_context(client))
                jobs = [
                    self._judge_pair(slots, meter, gen, i, j)
                    for gen in generations
                    for i, j in select_pairs(gen.responses)
                ]
                results = await _gather_or_cancel(jobs)
        finally:
            self.cache.flush()  # verdicts already paid for are kept even if the pass failed
        judgments = [r for r in results if r is not None]
        stats = meter.snapshot()
        if results and stats.errors == len(results) and self._answered == 0 and self._refused > 0:
            # Not one connection was accepted: a wrong URL or a dead server, not bad luck.
            # Training on anchor pairs alone while reporting success would hide it.
            raise JudgeAPIError(
                f"the judge at {redact_url(self.cfg.base_url)} is unreachable or failing: every one of {len(results)} pairs "
                f"failed ({stats.calls} requests, retries included); check judge.llm.base_url and that the server is up"
            )
        log.info(
            "%s: %d pairs -> %d judgments, %d ties (%d position conflicts), %d unparseable, %d errors, "
            "%d samples neutralised; %d calls (%d retries, %d cache hits), $%.4f%s in %.1fs",
            self.name, len(results), stats.judgments, stats.ties, stats.position_conflicts, stats.unparseable,
            stats.errors, stats.neutralised,
            stats.calls, stats.retries, stats.cache_hits, stats.cost_usd,
            " [budget exhausted]" if stats.budget_exhausted else "", time.perf_counter() - started,
        )
        return judgments, stats

    async def _judge_pair(
        self, slots: asyncio.Queue[httpx.AsyncClient], meter: CostMeter, gen: Generation, i: int, j: int
    ) -> Judgment | None:
        first, second = gen.responses[i], gen.responses[j]
        keys_only = is_master_key(first), is_master_key(second)
        if any(keys_only):
            return self._master_key_outcome(meter, gen, first, second, *keys_only)
        model = self.cfg.model
        keys = (
            verdict_cache_key(model, gen.prompt, first, second),
            verdict_cache_key(model, gen.prompt, second, first),
        )
        cached = [self.cache.get(k) for k in keys]
        ticket = _Ticket(sum(v is None for v in cached))
        results: list[Any] = list(
            await asyncio.gather(
                *(
                    _done(v) if v is not None else self._ask(slots, meter, ticket, key, gen.prompt, a, b)
                    for v, key, (a, b) in zip(cached, keys, ((first, second), (second, first)))
                )
            )
        )
        meter.cache_hits += sum(v is not None for v in cached)
        if _BUDGET in results:
            return None  # not (fully) started: belongs to no outcome count
        if _ERROR in results:
            meter.errors += 1
            return None
        verdict_ab, verdict_ba = results
        outcome = combine_orders(verdict_ab, verdict_ba)
        if outcome == "unparseable":
            meter.unparseable += 1
            return None
        if outcome == "tie":
            meter.ties += 1
            meter.position_conflicts += position_conflict(verdict_ab, verdict_ba)
            return None
        meter.judgments += 1
        chosen, rejected = (first, second) if outcome == "first" else (second, first)
        return Judgment(
            prompt=gen.prompt,
            category=gen.category,
            chosen=chosen,
            rejected=rejected,
            judge=self.name,
            confidence=1.0,
            details={
                "verdicts": [verdict_ab, verdict_ba],
                "cached": [v is not None for v in cached],
                "template": TEMPLATE_VERSION,
                "policy_version": gen.policy_version,
            },
        )

    def _master_key_outcome(
        self, meter: CostMeter, gen: Generation, first: str, second: str, first_key: bool, second_key: bool
    ) -> Judgment | None:
        """A pair with a master-key-only reply, decided without a request (see module docstring)."""
        if first_key and second_key:
            meter.ties += 1
            return None
        meter.judgments += 1
        chosen, rejected = (second, first) if first_key else (first, second)
        return Judgment(
            prompt=gen.prompt, category=gen.category, chosen=chosen, rejected=rejected, judge=self.name,
            confidence=1.0,
            details={"neutralised": "master_key", "template": TEMPLATE_VERSION, "policy_version": gen.policy_version},
        )

    def _payload(self, prompt: str, response_a: str, response_b: str) -> dict[str, Any]:
        return {
            "model": self.cfg.model,
            "messages": build_pairwise_messages(prompt, response_a, response_b),
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }

    async def _ask(
        self,
        slots: asyncio.Queue[httpx.AsyncClient],
        meter: CostMeter,
        ticket: _Ticket,
        key: str,
        prompt: str,
        response_a: str,
        response_b: str,
    ) -> Verdict | None | str:
        """One ordered call with retries: a verdict (None if unparseable), `_ERROR` or `_BUDGET`."""

        def before_send(attempt: int) -> None:
            # Budget is checked only now, when the request would start (see online.cost).
            if not (ticket.claim(meter) if attempt == 0 else meter.reserve(1)):
                raise _OverBudget
            meter.record_request(retry=attempt > 0)

        try:
            text, usage = await apost_json(
                lambda: _slot(slots),
                self._url,
                # Built once a slot is free, so the first requests go out at once.
                lambda: self._payload(prompt, response_a, response_b),
                self._policy,
                rng=self._rng,
                parse=functools.partial(
                    _chat_reply, need_usage=bool(self.cfg.price_prompt_per_mtok or self.cfg.price_completion_per_mtok)
                ),
                on_send=before_send,
                on_reply=self._count_reply,
            )
        except _OverBudget:
            return _BUDGET
        except RequestFailed as exc:
            if exc.status in (401, 403, 404):
                raise JudgeAPIError(
                    f"judge API {redact_url(str(self._url))} answered HTTP {exc.status} for model {self.cfg.model!r}: "
                    f"check base_url, model and the key in ${self.cfg.api_key_env}"
                ) from None
            log.warning("judge request failed for good; dropping this pair: %s", exc)
            return _ERROR
        meter.record_usage(usage if isinstance(usage, dict) else None)
        verdict = parse_verdict(text) if isinstance(text, str) else None
        if verdict is not None:
            self.cache.put(key, verdict)
        return verdict

    def _count_reply(self, result: httpx.Response | httpx.RequestError) -> None:
        """Connection refusals vs HTTP answers: tells a dead server from a failing one."""
        if isinstance(result, httpx.Response):
            self._answered += 1
        elif isinstance(result, httpx.ConnectError):
            self._refused += 1


class _OverBudget(Exception):
    """Raised before a send when the budget refuses it: the request is not sent."""


def _chat_reply(body: Any, need_usage: bool = False) -> tuple[Any, Any]:
    """(message content, usage) of a chat completion (`online.replies.chat_reply`).

    A wrong `object`, missing or empty `choices` or a choice without a `message` raises
    `ReplyError` saying so (retried, then the pair's error names the redacted endpoint and
    what was wrong); `need_usage` (the judge prices tokens) makes a reply without token
    counts malformed too, since the budget could not meter it.
    """
    return chat_reply(body, need_usage=need_usage)


@contextlib.asynccontextmanager
async def _slot(slots: asyncio.Queue[httpx.AsyncClient]) -> AsyncIterator[httpx.AsyncClient]:
    """Hold a free concurrency slot (an idle client) for one attempt."""
    client = await slots.get()
    try:
        yield client
    finally:
        slots.put_nowait(client)  # freed before any backoff sleep


async def _done(value: Any) -> Any:
    return value


async def _gather_or_cancel(coros: Sequence[Coroutine[Any, Any, Any]]) -> list[Any]:
    """gather() that cancels the other tasks when one raises, so none outlives the HTTP client."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
