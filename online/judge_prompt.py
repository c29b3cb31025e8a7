"""Pure pieces of the pairwise LLM judge: which pairs to ask, the prompt, and reading the answer.

Contract:
- `select_pairs(responses)`: the index pairs worth judging. Empty responses and exact
  duplicates (after stripping whitespace) are skipped; the remaining distinct responses are
  paired off in order, (1st, 2nd), (3rd, 4th), ..., so each sample is judged at most once and
  a prompt with k distinct samples costs floor(k/2) pairs (2 calls each). Disjoint pairs keep
  every label an independent comparison (no transitivity assumptions, no sequential rounds).
- `build_pairwise_messages(prompt, response_a, response_b)`: OpenAI chat messages asking for a
  one-token verdict, "A", "B" or "tie". Our own wording; `TEMPLATE_VERSION` names it and is
  part of every cache key, so editing the wording must bump it.
- `parse_verdict(text)`: "A" | "B" | "tie", or None when the reply is not exactly one of those
  (decorations such as quotes, bold, brackets, a trailing period or a "Verdict:" prefix are
  tolerated; anything that names both or neither is not).
- `combine_orders(verdict_ab, verdict_ba)`: the pair's outcome from the two orders. A label
  counts only when the A/B order and the swapped B/A order name the same response; position
  bias (the same letter both times) therefore becomes a tie, never a label.
- `position_conflict(verdict_ab, verdict_ba)`: True when both orders named the same letter
  (position bias): a subset of the ties `combine_orders` reports, counted on its own.
- `verdict_cache_key(...)`: hash of (template version, model, prompt, response shown as A,
  response shown as B) as sent (delimiters escaped), one per ordered call.

Reward-hacking guards (the judge side; arXiv 2507.08794, "One Token to Fool LLM-as-a-Judge"):
- `escape_delimiters(text)`: every tag of the template (`<conversation>`, `</reply_a>`, ... in
  any case, with any inner spacing) is written as `&lt;/reply_a&gt;`, so a reply cannot close
  its own block and open a forged one. `build_pairwise_messages` escapes the prompt and both
  replies; text without our tags passes unchanged (byte for byte: no cache entry moves).
- `is_master_key(text)`: the reply has no substance besides a known "master key": only
  punctuation/whitespace (":", "."), or reasoning openers such as "Thought process:",
  "Let's solve this problem step by step.", "Solution", "解", "かいせつ", "Respuesta" followed by
  nothing but punctuation. A reply that opens with one of them and then answers is not one.
- `needs_neutralising(text)`: either of the two; what `JudgeStats.neutralised` counts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Literal

Verdict = Literal["A", "B", "tie"]
Outcome = Literal["first", "second", "tie", "unparseable"]

TEMPLATE_VERSION = "pairwise-v1"

_SYSTEM = (
    "You compare two candidate replies to the same conversation and decide which one is "
    "better. Judge helpfulness, correctness and how well the reply follows the instructions; "
    "ignore length unless it hurts the answer, and ignore the order the replies are shown in. "
    'Answer with exactly one token: "A" if reply A is better, "B" if reply B is better, or '
    '"tie" if neither is clearly better. Do not explain.'
)

_USER = (
    "<conversation>\n{prompt}\n</conversation>\n\n"
    "<reply_a>\n{response_a}\n</reply_a>\n\n"
    "<reply_b>\n{response_b}\n</reply_b>\n\n"
    'Which reply is better? Answer "A", "B" or "tie".'
)


def build_pairwise_messages(prompt: str, response_a: str, response_b: str) -> list[dict[str, str]]:
    """Chat messages asking which of two replies to `prompt` is better (system + one user turn).

    The prompt and both replies are escaped (`escape_delimiters`): the policy writes the
    replies, and a reply must not be able to end `<reply_a>` early and forge the rest.
    """
    user = _USER.format(
        prompt=escape_delimiters(prompt),
        response_a=escape_delimiters(response_a),
        response_b=escape_delimiters(response_b),
    )
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


# The template's own tags, in any case and with any whitespace inside the brackets.
_TAG = re.compile(r"<\s*(/?)\s*(conversation|reply_a|reply_b)\s*>", re.I)


def escape_delimiters(text: str) -> str:
    """`text` with each of the template's tags written as `&lt;tag&gt;` (inert for the judge)."""
    return _TAG.sub(lambda m: f"&lt;{m.group(1)}{m.group(2)}&gt;", text)


# Master keys from arXiv 2507.08794 (Table 1): reasoning openers in several languages. Matched
# case-insensitively at the start of the stripped reply, possibly repeated.
MASTER_KEY_OPENERS = (
    "thought process",
    "let's solve this problem step by step",
    "let us solve this problem step by step",
    "solution",
    "answer",
    "解",
    "かいせつ",
    "respuesta",
)
_OPENER = re.compile(
    r"^(?:" + "|".join(re.escape(o).replace("'", "['’]") for o in MASTER_KEY_OPENERS) + r")",
    re.I,
)
_SUBSTANCE = re.compile(r"[^\W_]")  # a letter or digit of any script
_DECORATION = " \t\r\n:.,;!?-*#_`'\"()[]{}>"


def is_master_key(text: str) -> bool:
    """True when `text` carries nothing but a master key (see the module docstring).

    An empty reply is not one (it is never paired at all); a reply that only opens with an
    opener and then says something ("Solution: x = 3") is not one either.
    """
    s = text.strip()
    if not s:
        return False
    rest = s
    while True:
        rest = rest.lstrip(_DECORATION)  # markdown and punctuation around an opener: "**Solution**"
        m = _OPENER.match(rest)
        if m is None:
            break
        rest = rest[m.end():]
    return _SUBSTANCE.search(rest) is None


def needs_neutralising(text: str) -> bool:
    """The reply carries the template's delimiters or is a master key."""
    return is_master_key(text) or _TAG.search(text) is not None


# Decorations models put around a one-token answer: markdown emphasis, quotes, brackets
# ("[[A]]"), trailing punctuation.
_STRIP = " \t\r\n*_`'\"[](){}<>.,:;!"
_PREFIX = re.compile(r"^(?:final\s+)?(?:verdict|answer|winner|better(?:\s+reply)?)\s*(?:is)?\s*[:=\-]?\s*", re.I)
_REPLY = re.compile(r"^(?:reply|response|assistant)\s+", re.I)
_TIES = {"tie", "draw", "equal", "neither", "same"}


def parse_verdict(text: str) -> Verdict | None:
    """Read a one-token verdict; None when the reply is not unambiguously "A", "B" or "tie"."""
    s = text.strip(_STRIP)
    s = _PREFIX.sub("", s).strip(_STRIP)
    s = _REPLY.sub("", s).strip(_STRIP)
    low = s.lower()
    if low == "a":
        return "A"
    if low == "b":
        return "B"
    if low in _TIES:
        return "tie"
    return None


def combine_orders(verdict_ab: Verdict | None, verdict_ba: Verdict | None) -> Outcome:
    """Outcome of one pair from both orders.

    `verdict_ab` was asked with the first response shown as A, `verdict_ba` with it shown as B.
    "first"/"second" name the winning response; any tie or disagreement is "tie"; a missing
    verdict in either order is "unparseable" (reported before ties: the pair was never fully
    judged).
    """
    if verdict_ab is None or verdict_ba is None:
        return "unparseable"
    if verdict_ab == "tie" or verdict_ba == "tie":
        return "tie"
    winner_ab = "first" if verdict_ab == "A" else "second"
    winner_ba = "first" if verdict_ba == "B" else "second"
    return winner_ab if winner_ab == winner_ba else "tie"


def position_conflict(verdict_ab: Verdict | None, verdict_ba: Verdict | None) -> bool:
    """Both orders named the same letter: the judge followed the position, not the reply."""
    return verdict_ab is not None and verdict_ab == verdict_ba and verdict_ab in ("A", "B")


def distinct_indices(responses: Sequence[str]) -> list[int]:
    """Indices of the first occurrence of each distinct non-empty response (whitespace-stripped).

    Empty responses cannot be a `PreferencePair` side, and identical ones carry no preference.
    """
    seen: set[str] = set()
    distinct: list[int] = []
    for i, r in enumerate(responses):
        key = r.strip()
        if key and key not in seen:
            seen.add(key)
            distinct.append(i)
    return distinct


def select_pairs(responses: Sequence[str]) -> list[tuple[int, int]]:
    """Disjoint consecutive pairs of distinct, non-empty responses (indices into `responses`)."""
    distinct = distinct_indices(responses)
    return [(distinct[j], distinct[j + 1]) for j in range(0, len(distinct) - 1, 2)]


def verdict_cache_key(model: str, prompt: str, response_a: str, response_b: str) -> str:
    """Stable hex key of one ordered call (template version and judge model included).

    The texts are keyed as sent (escaped), so a verdict given to an unescaped reply before the
    guards existed is never served for it again; other texts keep their keys.
    """
    blob = json.dumps(
        [TEMPLATE_VERSION, model, escape_delimiters(prompt), escape_delimiters(response_a),
         escape_delimiters(response_b)],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
