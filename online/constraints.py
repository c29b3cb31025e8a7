"""Verifiable instruction constraints (IFEval-style): prompt families and their rule checkers.

Contract:
- A prompt is a question plus ONE constraint instruction from a family in `FAMILIES`; the
  family is the prompt's category. Each family's instruction is a fixed sentence with one
  parameter (a word count, a keyword, a phrase, ...), written by `instruction(family, param)`
  and read back from any text that contains it by `parse_constraint(prompt)`, so a checker
  needs nothing but the (rendered) prompt and the response: it plugs in as the rule judge
  (`online.constraints:constraint_score`) and as the evaluation scorer
  (`online.constraints:constraint_pass`).
- `constraint_score(prompt, response)` is in [0, 1] and is 1.0 exactly when the constraint is
  met; below 1 it gives partial credit where the family has a natural "closer" (fewer words
  over the limit, the phrase present but not at the end, ...), so the judge can still prefer
  the nearer of two failures. `constraint_pass` is 1.0 or 0.0: the pass rate's unit.
- An empty (or whitespace-only) response satisfies no constraint: "no commas" and "all
  lowercase" must not be won by saying nothing.
- `constraint_prompt_pool(...)` builds the online prompt pool: base questions (MT-Bench first
  turns, short ones only, and tether's own templated questions) x families x parameter
  variants, split into train and held-out by QUESTION (own questions: by topic), so an
  evaluation prompt's question never appears in any training prompt.

Everything here is pure (no torch, no I/O beyond reading the question file).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

_KEYWORDS = ("river", "garden", "bright", "simple", "journey", "balance", "window", "silver")
_PHRASES = ("That is all.", "Hope this helps!", "Thank you for reading.", "Any other questions?")
_START_WORDS = ("Yes", "Well", "Today", "Honestly", "First", "Imagine")
_MAX_WORDS = (8, 12, 16, 20)
_BULLETS = (2, 3, 4)


@dataclass(frozen=True)
class Family:
    """One constraint family: how its instruction reads, its parameter values, its checker."""

    name: str
    template: str
    """The instruction with `{p}` where the parameter goes (no parameter: no `{p}`)."""
    params: tuple[str, ...]
    """Parameter values prompts draw from (one empty string when the family has none)."""
    check: Callable[[str, str], float]
    """(response, param) -> score in [0, 1], 1.0 iff the constraint is met."""

    def pattern(self) -> re.Pattern[str]:
        """A regex that finds this family's instruction in a text and captures its parameter."""
        head, _, tail = self.template.partition("{p}")
        if not _:
            return re.compile(re.escape(head) + "()")
        return re.compile(re.escape(head) + r"(.+?)" + re.escape(tail))


def _words(text: str) -> list[str]:
    """Whitespace-separated tokens that carry a letter or digit (a lone '-' or '*' is no word)."""
    return [w for w in text.split() if any(c.isalnum() for c in w)]


def _check_lowercase(response: str, _: str) -> float:
    """Pass: at least one letter and no uppercase letter. Else 0.5 halved for every capital
    after the first (1 capital: 0.5, 2: 0.25, 3: 0.125, ...), so two ordinary answers (a few
    sentence-initial capitals each) are still ranked by how close they came."""
    letters = [c for c in response if c.isalpha()]
    if not letters:
        return 0.0
    upper = sum(c.isupper() for c in letters)
    return 1.0 if upper == 0 else 0.5 ** upper


def _check_max_words(response: str, param: str) -> float:
    """Pass: 1 to N words. Else N / words / 2 (half credit, shrinking the further over)."""
    n, words = int(param), len(_words(response))
    if words == 0:
        return 0.0
    return 1.0 if words <= n else 0.5 * n / words


def _check_keyword(response: str, param: str) -> float:
    """Pass: the keyword appears as a whole word, any case (plural 's' allowed). No partial credit."""
    return 1.0 if re.search(rf"\b{re.escape(param)}s?\b", response, flags=re.IGNORECASE) else 0.0


def _check_end_phrase(response: str, param: str) -> float:
    """Pass: the response, stripped of trailing whitespace and quotes, ends with the exact
    phrase. Half credit when the phrase is there but not at the end; else 0."""
    text = response.strip().strip("\"'").rstrip()
    if not text:
        return 0.0
    if text.endswith(param):
        return 1.0
    return 0.5 if param in text else 0.0


def _check_no_commas(response: str, _: str) -> float:
    """Pass: at least one word and no comma (ASCII or full-width). Else 0.5 / commas."""
    if not _words(response):
        return 0.0
    commas = response.count(",") + response.count("，")
    return 1.0 if commas == 0 else 0.5 / commas


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def _check_json(response: str, _: str) -> float:
    """Pass: the response is one JSON object (optionally in a ``` / ```json fence, as IFEval
    accepts). Half credit when a `{...}` span inside it parses as an object; else 0."""
    text = response.strip()
    fence = re.fullmatch(r"```(?:json|JSON)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fence:
        text = fence.group(1)
    if _json_object(text):
        return 1.0
    start, end = text.find("{"), text.rfind("}")
    return 0.5 if 0 <= start < end and _json_object(text[start : end + 1]) else 0.0


_BULLET_LINE = re.compile(r"^\s*[*\-•]\s+\S")


def _check_bullets(response: str, param: str) -> float:
    """Pass: exactly N lines that are markdown bullets (`* `, `- ` or `• `). Else half credit
    scaled by how close the count is: 0.5 * (1 - |count - N| / N), floored at 0."""
    n = int(param)
    count = sum(bool(_BULLET_LINE.match(line)) for line in response.splitlines())
    if count == n:
        return 1.0
    return max(0.0, 0.5 * (1.0 - abs(count - n) / n))


def _check_start_word(response: str, param: str) -> float:
    """Pass: the first word, stripped of punctuation and markdown, is the given word (any case).
    No partial credit."""
    words = response.split()
    if not words:
        return 0.0
    first = words[0].strip("*_#\"'`“”‘’.,;:!?()[]")
    return 1.0 if first.lower() == param.lower() else 0.0


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("lowercase", "Your entire answer must be in lowercase letters, with no capital letters at all.", ("",),
           _check_lowercase),
    Family("max_words", "Answer in at most {p} words.", tuple(map(str, _MAX_WORDS)), _check_max_words),
    Family("include_keyword", "Include the word \"{p}\" in your answer.", _KEYWORDS, _check_keyword),
    Family("end_phrase", "End your answer with the exact phrase \"{p}\"", _PHRASES, _check_end_phrase),
    Family("no_commas", "Do not use any commas in your answer.", ("",), _check_no_commas),
    Family("json", "Format your entire answer as a JSON object.", ("",), _check_json),
    Family("bullets", "Answer with exactly {p} bullet points, each on its own line starting with \"* \".",
           tuple(map(str, _BULLETS)), _check_bullets),
    Family("start_word", "Start your answer with the word \"{p}\".", _START_WORDS, _check_start_word),
)}
"""The eight families, by name (a prompt's category)."""


def instruction(family: str, param: str = "") -> str:
    """The instruction sentence of `family` with `param` filled in."""
    fam = _family(family)
    if "{p}" in fam.template and not param:
        raise ValueError(f"constraint family {family!r} needs a parameter (e.g. {fam.params[0]!r})")
    return fam.template.replace("{p}", param)


def _family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown constraint family {name!r}; expected one of {sorted(FAMILIES)}") from None


def parse_constraint(prompt: str) -> tuple[str, str]:
    """(family, param) of the constraint instruction in `prompt` (the last one, if several).

    Works on the raw or the chat-rendered prompt. ValueError when no family's instruction is in it.
    """
    found: tuple[int, str, str] | None = None
    for fam in FAMILIES.values():
        for m in fam.pattern().finditer(prompt):
            if found is None or m.start() > found[0]:
                found = (m.start(), fam.name, m.group(1))
    if found is None:
        raise ValueError(f"no constraint instruction found in prompt {prompt[-120:]!r}")
    return found[1], found[2]


def constraint_score(prompt: str, response: str) -> float:
    """The rule judge: the response's score on its prompt's constraint, in [0, 1] (1 = met)."""
    family, param = parse_constraint(prompt)
    return FAMILIES[family].check(response, param)


def constraint_pass(prompt: str, response: str) -> float:
    """The evaluation scorer: 1.0 when the response meets its prompt's constraint, else 0.0."""
    return 1.0 if constraint_score(prompt, response) >= 1.0 else 0.0


# -- prompts ----------------------------------------------------------------------------------


def read_questions(path: str | Path, max_words: int = 25, exclude_categories: Sequence[str] = ("coding",)) -> list[str]:
    """First turns of an MT-Bench question file with at most `max_words` words, in file order,
    skipping `exclude_categories` (code answers cannot be lowercase or comma-free sensibly) and
    questions that already carry a format instruction of their own ("words", "paragraph")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: question file not found (MT-Bench question.jsonl)")
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["turns"][0]
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: field 'turns': expected an MT-Bench record ({exc})") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field 'turns[0]': expected a string")
            if record.get("category") in exclude_categories or len(text.split()) > max_words:
                continue
            if re.search(r"\b(words?|paragraphs?|sentences?)\b", text, flags=re.IGNORECASE):
                continue
            out.append(" ".join(text.split()))
    if not out:
        raise ValueError(f"{path}: no question of at most {max_words} words")
    return out


TOPICS: tuple[str, ...] = (
    "the ocean", "coffee", "learning a new language", "city parks", "bicycles", "the moon", "rainy days",
    "public libraries", "volcanoes", "friendship", "chess", "gardening", "practising music", "winter",
    "trains", "honeybees", "recycling", "museums", "mountains", "sleep", "baking bread", "deserts",
    "electric cars", "birds", "board games", "lighthouses", "maps", "forests", "the internet", "tea",
)
"""Topics of tether's own short questions (beside MT-Bench's): everyday, answerable in a few lines."""
QUESTION_TEMPLATES: tuple[str, ...] = (
    "Tell me about {t}.", "Why do people like {t}?", "Give me some advice about {t}.", "What is interesting about {t}?",
)
"""Templates of tether's own questions: each topic in each template."""


def own_questions() -> list[tuple[str, str]]:
    """(question, topic) for every topic in every template (`TOPICS` x `QUESTION_TEMPLATES`),
    topic-major. The topic is the question's split group: a held-out topic is held out in
    every template, so no evaluation prompt shares its topic with a training prompt."""
    return [(tpl.format(t=t), t) for t in TOPICS for tpl in QUESTION_TEMPLATES]


def question_heldout(group: str, fraction: float) -> bool:
    """Deterministic question-level split: the sha256 of the question's group (the question
    itself, or its topic) read as a number in [0, 1), below `fraction`."""
    digest = hashlib.sha256(("constraints:" + group).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def constraint_prompts(
    questions: Sequence[str], families: Sequence[str], variants: int, seed: int = 0,
) -> list[tuple[str, str, str]]:
    """(question, prompt, family) for every question x family x `variants` parameter values.

    Each (question, family) draws `variants` distinct parameter values (fewer when the family
    has fewer), seeded by the question and family so adding a family changes no other prompt.
    Rows are interleaved family by family, so any prefix is balanced across families.
    """
    rows: dict[str, list[tuple[str, str, str]]] = {f: [] for f in families}
    for fam_name in families:
        fam = _family(fam_name)
        for q in questions:
            rng = random.Random(f"{seed}:{fam_name}:{q}")
            params = rng.sample(fam.params, k=min(variants, len(fam.params)))
            rows[fam_name].extend((q, f"{q} {instruction(fam_name, p)}", fam_name) for p in params)
    width = max((len(v) for v in rows.values()), default=0)
    return [rows[f][i] for i in range(width) for f in families if i < len(rows[f])]


def constraint_prompt_pool(
    questions: str | None, families: Sequence[str] = tuple(FAMILIES), variants: int = 1,
    heldout_fraction: float = 0.3, max_words: int = 25, own: bool = True, seed: int = 0,
) -> list[tuple[str, str, bool]]:
    """The online prompt pool (`prompts.function` with `function_kwargs`): (prompt, family,
    held out) for each question x family x variant; a question is held out in every family or
    in none (`question_heldout`). Questions: the short first turns of the MT-Bench file
    `questions` (None: none), then, with `own`, tether's templated ones (`own_questions`)."""
    grouped = [(q, q) for q in read_questions(questions, max_words=max_words)] if questions is not None else []
    grouped += own_questions() if own else []
    if not grouped:
        raise ValueError("no questions: give an MT-Bench question file or set own: true")
    group = dict(grouped)
    return [(prompt, fam, question_heldout(group[q], heldout_fraction))
            for q, prompt, fam in constraint_prompts([q for q, _ in grouped], families, variants, seed)]
