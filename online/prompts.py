"""The prompt pool: where online cycles get the prompts they generate for.

Contract: `load_prompt_pool(cfg, tokenizer=None) -> PromptPool(train, heldout, source)`, each
side a tuple of `(prompt, category)` pairs; `sample_prompts(prompts, n, seed, balanced=False)`
draws a cycle's prompts from one side.

Sources (exactly one per config):
- a JSONL file, one object per line: `{"prompt": str, "category": str?}`, or MT-Bench's
  `{"question_id", "category", "turns": [str, ...]}` (the first turn is the prompt);
- a python callable `module:function`, called with `function_kwargs`, returning `(prompt,
  category)` tuples (or bare strings), or `(prompt, category, heldout)` triples whose bool
  decides the prompt's side itself (e.g. a split by the question a templated prompt is built
  on, so no held-out question appears in any training prompt).

The held-out split is decided by a hash of the raw prompt text (before any chat template), so a
prompt stays on the same side whatever file order, seed or template is used; categories named
in `heldout_categories` are held out whole (an out-of-distribution check). With
`chat_template`, each prompt is rendered as a single user turn with the tokenizer's template
and a generation prompt, so generation and training see the same text. A bad line fails with
the file, line and field to fix.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


from online.config import PromptPoolConfig

Prompt = tuple[str, str | None]
"""A prompt (rendered text) and its category, if any."""


class PromptError(ValueError):
    """A prompt source that cannot be used; says which file/line/field to fix."""

    def __init__(self, source: str, line: int | None, field: str | None, reason: str):
        self.source, self.line, self.field, self.reason = source, line, field, reason
        where = source if line is None else f"{source}:{line}"
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {reason}")


@dataclass(frozen=True)
class PromptPool:
    """A loaded pool: prompts to generate for (`train`) and prompts to evaluate on (`heldout`)."""

    train: tuple[Prompt, ...]
    heldout: tuple[Prompt, ...]
    source: str

    @property
    def categories(self) -> list[str]:
        """Every category on either side, sorted (None excluded)."""
        return sorted({c for _, c in self.train + self.heldout if c is not None})


def load_prompt_pool(cfg: PromptPoolConfig, tokenizer=None) -> PromptPool:
    """Read the configured source, split it (hash-deterministic) and render the chat template."""
    if cfg.path is not None:
        source = str(cfg.path)
        raw: list[Prompt | tuple[str, str | None, bool]] = list(read_prompt_file(cfg.path))
    else:
        source = str(cfg.function)
        raw = call_prompt_function(str(cfg.function), cfg.function_kwargs)
    if not raw:
        raise PromptError(source, None, None, "no prompts found")
    if cfg.chat_template and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        raise ValueError(
            "prompts.chat_template is set but the tokenizer has no chat template: "
            "set chat_template: false or use a chat model's tokenizer"
        )
    train: list[Prompt] = []
    heldout: list[Prompt] = []
    held_cats = set(cfg.heldout_categories)
    for text, category, *split in raw:
        held = split[0] if split else is_heldout(text, cfg.heldout_fraction)
        side = heldout if category in held_cats or held else train
        side.append((render(text, tokenizer) if cfg.chat_template else text, category))
    return PromptPool(train=tuple(train), heldout=tuple(heldout), source=source)


def is_heldout(prompt: str, fraction: float) -> bool:
    """Deterministic split: the prompt's sha256, read as a number in [0, 1), is below `fraction`."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def render(prompt: str, tokenizer) -> str:
    """One user turn in the tokenizer's chat template, ending with the assistant's cue."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def read_prompt_file(path: Path) -> list[Prompt]:
    """Parse a JSONL prompt file (plain or MT-Bench lines); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(str(path), None, None, "prompt file not found")
    out: list[Prompt] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PromptError(str(path), lineno, None, f"invalid UTF-8 at byte {exc.start}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptError(str(path), lineno, None, f"not valid JSON ({exc.msg})") from None
            out.append(_parse_record(record, str(path), lineno))
    return out


def _parse_record(record: object, source: str, line: int) -> Prompt:
    if not isinstance(record, dict):
        raise PromptError(source, line, None, f"expected a JSON object, got {type(record).__name__}")
    category = record.get("category")
    if category is not None and not isinstance(category, str):
        raise PromptError(source, line, "category", f"expected a string, got {type(category).__name__}")
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(source, line, "prompt", "expected a non-empty string")
    elif "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns:
            raise PromptError(source, line, "turns", "expected a non-empty list of strings")
        prompt = turns[0]
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError(source, line, "turns[0]", "expected a non-empty string")
    else:
        raise PromptError(source, line, "prompt", "missing: expected 'prompt' or MT-Bench 'turns'")
    return prompt, category


def call_prompt_function(spec: str, kwargs: dict | None = None) -> list[Prompt | tuple[str, str | None, bool]]:
    """Import `module:function`, call it with `kwargs`, validate what it returns."""
    module_name, _, attr = spec.partition(":")
    try:
        fn: Callable[[], Iterable[object]] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PromptError(spec, None, None, f"cannot import the prompt function ({exc})") from None
    try:
        items = fn(**(kwargs or {}))
    except TypeError as exc:  # a kwarg the function does not take, or a required one missing
        raise PromptError(spec, None, "function_kwargs", str(exc)) from None
    out: list[Prompt | tuple[str, str | None, bool]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = (item, None)
        if (
            not isinstance(item, tuple | list)
            or len(item) not in (2, 3)
            or not isinstance(item[0], str)
            or not item[0].strip()
            or not (item[1] is None or isinstance(item[1], str))
            or (len(item) == 3 and not isinstance(item[2], bool))
        ):
            raise PromptError(
                spec, None, f"item {i}",
                f"expected (prompt: str, category: str | None[, heldout: bool]), got {item!r:.80}",
            )
        out.append(tuple(item))  # type: ignore[arg-type]
    return out


def sample_prompts(prompts: Sequence[Prompt], n: int, seed: int, balanced: bool = False) -> list[Prompt]:
    """Draw `n` prompts, seeded: without replacement until the pool (or a category) runs out.

    `balanced` deals categories round-robin (in a seeded order), so each category gets n/C
    draws (±1) however unevenly the pool is spread; otherwise draws follow the pool's mix. A
    group that runs out is reshuffled and drawn again, so `n` may exceed the pool size.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n and not prompts:
        raise ValueError("cannot sample from an empty prompt pool")
    rng = random.Random(seed)
    if not balanced:
        return _draw_group(list(prompts), n, rng)
    groups: dict[str | None, list[Prompt]] = {}
    for p in prompts:
        groups.setdefault(p[1], []).append(p)
    keys = sorted(groups, key=lambda c: (c is None, c or ""))
    rng.shuffle(keys)  # which categories get the extra draw when n % C != 0
    counts = {k: n // len(keys) + (i < n % len(keys)) for i, k in enumerate(keys)}
    drawn = {k: _draw_group(groups[k], counts[k], rng) for k in keys}
    # Interleave so any prefix of the result is balanced too.
    return [drawn[k][i] for i in range(max(counts.values(), default=0)) for k in keys if i < counts[k]]


def _draw_group(group: list[Prompt], n: int, rng: random.Random) -> list[Prompt]:
    out: list[Prompt] = []
    while len(out) < n:
        order = group[:]
        rng.shuffle(order)
        out.extend(order[: n - len(out)])
    return out
