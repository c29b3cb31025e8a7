"""Record shapes -> `PreferencePair`: one normaliser per preference-data format.

Contract: `detect_format(record)` names the shape a record's keys and types say it has;
`normaliser(fmt, tokenizer)` returns a function record -> PreferencePair that raises
`BadRecord(reason, field, detail)` for a record-level problem (the caller, `offline.data`, adds
file and line and decides error vs skip). Nothing here reads files. Formats (TRL's names in
brackets, https://huggingface.co/docs/trl/dataset_formats):

- `explicit` [standard]: `prompt`, `chosen`, `rejected` strings.
- `implicit` [standard, implicit prompt]: `chosen`, `rejected` strings; the prompt is their
  common prefix cut at a word boundary (`implicit_prompt_end`).
- `chat` [conversational]: `prompt` a list of messages; `chosen`/`rejected` an assistant
  message, a list of messages or a string.
- `chat_implicit` [conversational, implicit prompt]: `chosen`/`rejected` whole conversations
  (trl-lib/ultrafeedback_binarized); the prompt is the messages before the first that differs.
- `ultrafeedback`: a `prompt` string plus whole conversations
  (HuggingFaceH4/ultrafeedback_binarized); as chat_implicit, and `prompt` must be one of the
  prompt messages' user turns.
- `hh`: Anthropic HH-RLHF `chosen`/`rejected` dialogues; the prompt is their common prefix up
  to the last shared `\n\nAssistant:`, each response keeps its leading space.

Conversations (chat, chat_implicit, ultrafeedback) are rendered with the tokenizer's chat
template: prompt = render(prompt messages, add_generation_prompt=True), response = the rest of
render(prompt messages + response messages), so prompt + response == the render of the whole
conversation. Every format keeps optional `category`, `id` (-> source_id) and the score
columns `score_chosen`/`score_rejected` (together) and `margin` as pair metadata (they do not
enter the content id). Fields that are empty or only whitespace are empty fields, and so are
derived responses (implicit, conversations) except HH's, which keep their historical rule (a
lone " " after "Assistant:" is an empty reply that loads); chosen and rejected that differ
only in whitespace carry no preference (`identical_responses`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

from offline.pairs import PreferencePair

Format = Literal["explicit", "implicit", "chat", "chat_implicit", "ultrafeedback", "hh"]
CONVERSATIONAL = frozenset({"chat", "chat_implicit", "ultrafeedback"})
"""Formats whose records are rendered with the tokenizer's chat template."""

HH_ASSISTANT_TAG = "\n\nAssistant:"
"""Where an HH-RLHF prompt ends: the last one the two dialogues share."""

BAD_RECORD_REASONS = (
    "duplicate_id",  # two different records carry the same `id`
    "malformed_json",  # the line is not valid JSON
    "invalid_utf8",  # the line is not valid UTF-8
    "not_an_object",  # valid JSON but not an object
    "missing_field",  # a required field is absent or null
    "empty_field",  # a required string / message list is empty or only whitespace
    "wrong_type",  # a field has the wrong type (scores: not a finite number)
    "wrong_role",  # a response does not start (or a conversation does not end) with an assistant turn
    "identical_responses",  # chosen == rejected (or differ only in whitespace): no preference
    "no_common_prefix",  # hh/implicit/chat_implicit: chosen and rejected share no prompt
    "prompt_mismatch",  # ultrafeedback: `prompt` is not a user turn of the conversation
    "template_error",  # conversations: the tokenizer's chat template raised on this record
    "template_mismatch",  # conversations: the prompt render is not a prefix of the full render
)
"""Record-level problems: skippable with `on_bad_record: skip`, counted under these keys."""

LAYOUTS = (
    "explicit (prompt, chosen, rejected: strings); "
    "implicit (chosen, rejected: strings sharing a prompt prefix); "
    "chat (prompt: list of {role, content} messages; chosen, rejected: an assistant message, "
    "a list of messages or a string); "
    "chat_implicit (chosen, rejected: whole conversations sharing the prompt messages); "
    "ultrafeedback (prompt: string; chosen, rejected: whole conversations); "
    "hh (chosen, rejected: whole '\\n\\nHuman: ... \\n\\nAssistant: ...' dialogues)"
)
"""The accepted layouts, for the unknown-layout error."""


class BadRecord(Exception):
    """A record-level problem before it is located (the loader adds file and line)."""

    def __init__(self, reason: str, field: str | None, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


_JSON_TYPES = {dict: "object", list: "list", str: "str", bool: "bool", int: "int", float: "float"}


def type_name(value: Any) -> str:
    """The JSON name of a value's type, for messages like 'got int'."""
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _clip(text: str, n: int = 60) -> str:
    """A text short enough to quote in an error message."""
    return repr(text if len(text) <= n else text[: n - 3] + "...")


# ---------------------------------------------------------------- fields


def string(value: Any, field: str) -> str:
    """`value` if it is a string with a non-whitespace character; null counts as missing
    (Parquet has no absent keys). Whitespace is kept: it is part of the text."""
    if value is None:
        raise BadRecord("missing_field", field, "missing (expected a non-empty string)")
    if not isinstance(value, str):
        raise BadRecord("wrong_type", field, f"expected a non-empty string, got {type_name(value)}")
    if not value:
        raise BadRecord("empty_field", field, "expected a non-empty string, got an empty string")
    if value.isspace():
        raise BadRecord("empty_field", field, "expected a non-empty string, got only whitespace")
    return value


def _text(record: dict, key: str) -> str:
    return string(record.get(key), key)


def _provenance(record: dict) -> dict[str, str | None]:
    """Optional `category` and `id` (an int id becomes its decimal string; '' counts as absent)."""
    category, source_id = record.get("category"), record.get("id")
    if category is not None and not isinstance(category, str):
        got = type_name(category)
        raise BadRecord("wrong_type", "category", f"expected a string or null, got {got}")
    if source_id is not None and (
        isinstance(source_id, bool) or not isinstance(source_id, (str, int))
    ):
        got = type_name(source_id)
        raise BadRecord("wrong_type", "id", f"expected a string, int or null, got {got}")
    return {
        "category": category or None,
        "source_id": str(source_id) if source_id not in (None, "") else None,
    }


def _number(record: dict, key: str) -> float | None:
    """An optional finite number (JSON int or float; bool is not a number)."""
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        got = type_name(value)
        raise BadRecord("wrong_type", key, f"expected a finite number or null, got {got}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise BadRecord("wrong_type", key, f"expected a finite number or null, got {number}")
    return number


def _scores(record: dict) -> dict[str, float | None]:
    """`score_chosen`/`score_rejected` (both or neither) and `margin`, as pair metadata."""
    scores = {k: _number(record, k) for k in ("score_chosen", "score_rejected", "margin")}
    chosen, rejected = scores["score_chosen"], scores["score_rejected"]
    if (chosen is None) != (rejected is None):
        have, lack = ("score_chosen", "score_rejected") if rejected is None else (
            "score_rejected", "score_chosen"
        )
        raise BadRecord(
            "missing_field", lack, f"missing (expected a number: '{have}' is set and the two "
            "scores come together)"
        )
    return scores


def _differ_only_in_whitespace(a: str, b: str) -> bool:
    """True when `a` and `b` are equal once all whitespace is removed (like `diff -w`).

    Checked on every record, so it first compares the starts: removing whitespace from a
    string's first 64 characters gives a prefix of removing it from the whole string, so two
    starts that disagree on their common length settle it (most real pairs) without building
    two copies of both responses; only starts that agree go on to the whole comparison."""
    head_a, head_b = "".join(a[:64].split()), "".join(b[:64].split())
    common = min(len(head_a), len(head_b))
    if head_a[:common] != head_b[:common]:
        return False
    return "".join(a.split()) == "".join(b.split())


def _check_distinct(chosen: Any, rejected: Any) -> None:
    if chosen == rejected:
        raise BadRecord("identical_responses", "rejected", "identical to 'chosen': no preference")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if _differ_only_in_whitespace(chosen, rejected):
            raise BadRecord(
                "identical_responses", "rejected",
                "differs from 'chosen' only in whitespace: no preference",
            )


def make_pair(prompt: str, chosen: str, rejected: str, record: dict) -> PreferencePair:
    """The pair, with the record's provenance and scores; refuses responses without a preference."""
    string(prompt, "prompt")  # a derived prompt can still be only whitespace
    _check_distinct(chosen, rejected)
    return PreferencePair(
        prompt=prompt, chosen=chosen, rejected=rejected, **_provenance(record), **_scores(record)
    )


# ---------------------------------------------------------------- string formats


def _explicit(record: dict) -> PreferencePair:
    prompt, chosen, rejected = (_text(record, k) for k in ("prompt", "chosen", "rejected"))
    return make_pair(prompt, chosen, rejected, record)


def common_prefix_length(a: str, b: str) -> int:
    """len(os.path.commonprefix([a, b])), by binary search over slice comparisons (C speed)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def implicit_prompt_end(chosen: str, rejected: str) -> int:
    """Where the implicit prompt of two texts ends: the start of the last whitespace run in
    their common prefix, so the prompt ends on a word and each response keeps the whitespace
    before its first word (TRL's " blue." / " green.", HH's " Hello").

    TRL's `extract_prompt` cuts at the first differing character and moves back one character
    only when that is a space, so responses whose first words share letters are cut mid-word:
    "The sky is blue." / "The sky is black." gives TRL "The sky is bl" + "ue." / "ack.", which
    tokenises the shared letters into the prompt; here it gives "The sky is" + " blue." /
    " black.". A common prefix with no whitespace after its first character (e.g. CJK text) is
    cut where the texts differ, as TRL does. 0 when the texts share nothing.
    """
    n = common_prefix_length(chosen, rejected)
    i = n
    while i > 0 and not chosen[i - 1].isspace():  # back over the last (partial) word
        i -= 1
    while i > 0 and chosen[i - 1].isspace():  # ... and the whitespace before it
        i -= 1
    return i if i > 0 else n


def _implicit(record: dict) -> PreferencePair:
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    _check_distinct(chosen, rejected)
    end = implicit_prompt_end(chosen, rejected)
    if end == 0 or chosen[:end].isspace():
        raise BadRecord(
            "no_common_prefix", "rejected",
            "shares no prefix with 'chosen' (apart from whitespace), so there is no prompt",
        )
    for key, whole in (("chosen", chosen), ("rejected", rejected)):
        if whole[end:].strip() == "":
            raise BadRecord("empty_field", key, "empty response after the shared prompt")
    return make_pair(chosen[:end], chosen[end:], rejected[end:], record)


def _hh(record: dict) -> PreferencePair:
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    _check_distinct(chosen, rejected)
    # The prompt is the longest common prefix ending in the tag: walk the tags of `chosen` from
    # the end and keep the first prefix `rejected` shares (C-speed, unlike a per-char scan).
    end = len(chosen)
    while True:
        cut = chosen.rfind(HH_ASSISTANT_TAG, 0, end)
        if cut < 0:
            raise BadRecord(
                "no_common_prefix",
                "rejected",
                f"shares no prefix ending in {HH_ASSISTANT_TAG!r} with 'chosen', so there is "
                "no prompt",
            )
        prompt = chosen[: cut + len(HH_ASSISTANT_TAG)]
        if rejected.startswith(prompt):
            break
        end = cut + len(HH_ASSISTANT_TAG) - 1  # the next search must end before this tag
    for key, whole in (("chosen", chosen), ("rejected", rejected)):
        # Only a truly empty remainder is refused: a lone " " is HH's empty reply (the space
        # after "Assistant:" belongs to the response), loaded as it always was (4 records of
        # harmless-base test), so existing HH datasets keep their pairs and fingerprints.
        if len(whole) == len(prompt):
            raise BadRecord("empty_field", key, "empty response after the shared prompt")
    return make_pair(prompt, chosen[len(prompt) :], rejected[len(prompt) :], record)


# ---------------------------------------------------------------- conversations


def _message_list(value: Any, key: str, expected: str) -> list[dict]:
    """A non-empty list of {role, content} messages (other keys kept), each field checked."""
    if value is None:
        raise BadRecord("missing_field", key, f"missing (expected {expected})")
    if not isinstance(value, list):
        raise BadRecord("wrong_type", key, f"expected {expected}, got {type_name(value)}")
    if not value:
        raise BadRecord("empty_field", key, "expected at least one message, got an empty list")
    messages = []
    for i, message in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            got = type_name(message)
            raise BadRecord("wrong_type", where, f"expected a {{role, content}} message, got {got}")
        for part in ("role", "content"):
            string(message.get(part), f"{where}.{part}")
        messages.append(dict(message))
    return messages


def _response_messages(record: dict, key: str) -> list[dict]:
    """A chat response: an assistant message, a list of messages or a string."""
    value = record.get(key)
    if isinstance(value, str):
        return [{"role": "assistant", "content": string(value, key)}]
    if isinstance(value, dict):
        value = [value]
    expected = "an assistant message, a list of messages or a string"
    messages = _message_list(value, key, expected)
    if messages[0]["role"] != "assistant":
        got = messages[0]["role"]
        raise BadRecord("wrong_role", f"{key}[0].role", f"expected 'assistant', got {got!r}")
    return messages


def _conversation(record: dict, key: str) -> list[dict]:
    """A whole conversation with at least one assistant turn."""
    messages = _message_list(record.get(key), key, "a conversation: a list of {role, content} messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("wrong_role", key, "the conversation has no assistant turn")
    return messages


def split_conversations(
    chosen: list[dict], rejected: list[dict]
) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen rest, rejected rest): the prompt is every message before the first that
    differs (TRL's extract_prompt for conversations); each rest must be one or more turns that
    start and end with an assistant turn, or the record has no well-defined prompt."""
    _check_distinct(chosen, rejected)
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0:
        raise BadRecord(
            "no_common_prefix", "rejected",
            "shares no leading message with 'chosen' (their first messages differ), so there "
            "is no prompt",
        )
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) == k:
            raise BadRecord(
                "empty_field", key,
                f"no response after the {k} message(s) shared with the other conversation",
            )
        if messages[k]["role"] != "assistant":
            raise BadRecord(
                "wrong_role", f"{key}[{k}].role",
                f"expected 'assistant' (the first message where chosen and rejected differ "
                f"starts the response), got {messages[k]['role']!r}",
            )
        last = len(messages) - 1
        if messages[last]["role"] != "assistant":
            raise BadRecord(
                "wrong_role", f"{key}[{last}].role",
                f"expected the conversation to end with an assistant turn, got "
                f"{messages[last]['role']!r}",
            )
    return chosen[:k], chosen[k:], rejected[k:]


def _chat_normalisers(tokenizer: Any) -> dict[str, Callable[[dict], PreferencePair]]:
    """The conversational formats, rendered with `tokenizer`'s chat template (assumed present:
    `offline.data` checks it once per file)."""

    def render(messages: list[dict], field: str, **kwargs: Any) -> str:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as exc:  # jinja raises many types (incl. raise_exception): record-level
            raise BadRecord("template_error", field, f"the chat template failed: {exc}") from exc
        if not isinstance(text, str):
            raise BadRecord("template_error", field, f"the chat template returned {type_name(text)}")
        return text

    def rendered(prompt_messages: list[dict], responses: dict[str, list[dict]], record: dict):
        prompt = render(prompt_messages, "prompt", add_generation_prompt=True)
        texts = {}
        for key, messages in responses.items():
            full = render(prompt_messages + messages, key)
            if not full.startswith(prompt):
                raise BadRecord(
                    "template_mismatch",
                    key,
                    "the chat template's render of the prompt (add_generation_prompt=True) is "
                    "not a prefix of its render of the whole conversation",
                )
            texts[key] = full[len(prompt) :]
            if not texts[key].strip():
                raise BadRecord("empty_field", key, "the response renders to an empty string")
        return make_pair(prompt, texts["chosen"], texts["rejected"], record)

    def chat(record: dict) -> PreferencePair:
        prompt_messages = _message_list(
            record.get("prompt"), "prompt", "a list of {role, content} messages"
        )
        responses = {k: _response_messages(record, k) for k in ("chosen", "rejected")}
        return rendered(prompt_messages, responses, record)

    def chat_implicit(record: dict) -> PreferencePair:
        chosen, rejected = _conversation(record, "chosen"), _conversation(record, "rejected")
        prompt, chosen_rest, rejected_rest = split_conversations(chosen, rejected)
        return rendered(prompt, {"chosen": chosen_rest, "rejected": rejected_rest}, record)

    def ultrafeedback(record: dict) -> PreferencePair:
        text = _text(record, "prompt")
        chosen, rejected = _conversation(record, "chosen"), _conversation(record, "rejected")
        prompt, chosen_rest, rejected_rest = split_conversations(chosen, rejected)
        user_turns = [(i, m["content"]) for i, m in enumerate(prompt) if m["role"] == "user"]
        if not any(content == text for _, content in user_turns):
            where = (
                f"chosen[{user_turns[-1][0]}].content is {_clip(user_turns[-1][1])}"
                if user_turns else "the shared messages have no user turn"
            )
            raise BadRecord(
                "prompt_mismatch", "prompt",
                f"{_clip(text)} is not a user turn of the conversation: {where}",
            )
        return rendered(prompt, {"chosen": chosen_rest, "rejected": rejected_rest}, record)

    return {"chat": chat, "chat_implicit": chat_implicit, "ultrafeedback": ultrafeedback}


# ---------------------------------------------------------------- choosing a format


def detect_format(record: dict) -> str | None:
    """The format a record's keys and types say it has; None when no layout matches.

    With `prompt`: a message list -> chat; a string beside conversation lists -> ultrafeedback;
    else explicit. Without: conversation lists -> chat_implicit; texts holding HH's
    '\\n\\nAssistant:' tag -> hh; other texts -> implicit.
    """
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if "prompt" in record and ("chosen" in record or "rejected" in record):
        if isinstance(record["prompt"], list):
            return "chat"
        return "ultrafeedback" if isinstance(chosen, list) else "explicit"
    if "chosen" in record and "rejected" in record:
        if isinstance(chosen, list):
            return "chat_implicit"
        texts = [t for t in (chosen, rejected) if isinstance(t, str)]
        return "hh" if any(HH_ASSISTANT_TAG in t for t in texts) else "implicit"
    return None


def normaliser(fmt: str, tokenizer: Any = None) -> Callable[[dict], PreferencePair]:
    """record -> PreferencePair for `fmt` (a conversational format needs a chat tokenizer)."""
    if fmt in CONVERSATIONAL:
        return _chat_normalisers(tokenizer)[fmt]
    return {"explicit": _explicit, "implicit": _implicit, "hh": _hh}[fmt]
