"""Reading OpenAI-compatible completion replies: the one place that says what a good reply is.

The generator (`online.generate`, `/completions` and `/chat/completions`) and the LLM judge
(`online.judge`, `/chat/completions`) hand these functions to `online.http.post_json` /
`apost_json` as `parse`. A 2xx body that is not the completion asked for raises `ReplyError`
(a ValueError), whose message says what is wrong in words a user can act on:

- the body is not a JSON object (a list, a string);
- `object` names another kind of reply (`"chat.completion"` from a completions call, `"list"`
  from a models listing: base_url points at the wrong endpoint or server). A reply without
  `object` is accepted: several servers leave it out;
- `choices` is missing (an error object sent with status 200 is quoted), not a list, empty, or
  a choice lacks its text (`text`, or `message.content` for chat);
- `usage` is missing or has no token counts where the caller needs it (a judge that prices
  tokens would otherwise meter the call as free and never hit its budget).

`online.http` retries a malformed 2xx (a proxy's hiccup) and, when it persists, raises
`RequestFailed` naming the (redacted) endpoint, the number of tries and this message. An HTML
page or a body that is not JSON never reaches these functions: `online.http` reports it.
"""

from __future__ import annotations

from typing import Any

TEXT_COMPLETION = "text_completion"
CHAT_COMPLETION = "chat.completion"


class ReplyError(ValueError):
    """A 2xx reply that is not the completion asked for; the message says what is wrong."""


def choices(body: Any, kind: str) -> list[dict[str, Any]]:
    """The reply's choices in `index` order, after checking it is a `kind` reply with choices."""
    if not isinstance(body, dict):
        raise ReplyError(f"the body is a JSON {type(body).__name__}, not an object")
    obj = body.get("object")
    if obj is not None and obj != kind:
        raise ReplyError(f"`object` is {obj!r}, expected {kind!r}: is base_url the right server and API?")
    if "choices" not in body:
        error = body.get("error")
        said = error.get("message") if isinstance(error, dict) else error
        raise ReplyError("no `choices` in the reply" + (f" (the server says: {str(said)[:200]!r})" if said else ""))
    found = body["choices"]
    if not isinstance(found, list):
        raise ReplyError(f"`choices` is a {type(found).__name__}, not a list")
    if not found:
        raise ReplyError("`choices` is empty")
    for i, choice in enumerate(found):
        if not isinstance(choice, dict):
            raise ReplyError(f"choice {i} is a {type(choice).__name__}, not an object")
    return sorted(found, key=lambda c: c.get("index", 0) if isinstance(c.get("index", 0), int) else 0)


def completion_texts(body: Any) -> tuple[str, ...]:
    """The texts of a `/completions` reply, in choice-index order."""
    out = []
    for i, choice in enumerate(choices(body, TEXT_COMPLETION)):
        text = choice.get("text")
        if not isinstance(text, str):
            raise ReplyError(f"choice {i} has no `text` string (got {type(text).__name__})")
        out.append(text)
    return tuple(out)


def chat_texts(body: Any) -> tuple[str, ...]:
    """The assistant messages of a `/chat/completions` reply, in choice-index order."""
    out = []
    for i, choice in enumerate(choices(body, CHAT_COMPLETION)):
        content = _message(choice, i).get("content")
        if not isinstance(content, str):
            raise ReplyError(f"choice {i} has no `message.content` string (got {type(content).__name__})")
        out.append(content)
    return tuple(out)


def chat_reply(body: Any, need_usage: bool = False) -> tuple[Any, dict[str, Any] | None]:
    """(first choice's message content, usage) of a chat completion, for the judge.

    The content is returned as sent (None or a non-string is the judge's "unparseable", not a
    transport failure). `need_usage`: a reply without token counts is malformed.
    """
    content = _message(choices(body, CHAT_COMPLETION)[0], 0).get("content")
    usage = body.get("usage")
    if need_usage and not (
        isinstance(usage, dict) and any(isinstance(usage.get(k), int) for k in ("prompt_tokens", "completion_tokens"))
    ):
        raise ReplyError("no `usage` token counts in the reply, and the cost of this call must be metered")
    return content, usage if isinstance(usage, dict) else None


def _message(choice: dict[str, Any], i: int) -> dict[str, Any]:
    message = choice.get("message")
    if not isinstance(message, dict):
        raise ReplyError(f"choice {i} has no `message` object")
    return message
