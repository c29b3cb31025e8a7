"""Secret redaction: the one place that decides what looks like a secret and how it is masked.

Secrets reach tether only through the environment (config fields hold the *names* of
environment variables: `api_key_env`, `password_env`); this module is the second line of
defence for everything that is logged or written: resolved configs in lineage and Prefect
artifacts, URLs in log lines and error messages.

Contract:
- `redact(value)`: a copy of a JSON-like value (dicts, lists, tuples, strings, scalars) with
  * the value of every secret-named key (`is_secret_key`) replaced by `"***"`, unless it is
    already empty or masked (None, "", "***", "<redacted>", an empty list or dict);
  * every URL's inline password replaced by `***` (`redact_url`: `redis://user:***@host`);
  * every credential-looking string (an OpenAI-style `sk-...` key, a Hugging Face `hf_...`
    token, the token of `Bearer <token>`) replaced by `***`, wherever it stands in a string
    (`"Authorization: Bearer ***"`).
- `redact_url(url)`: `url` with its password replaced by `***`; an unparseable URL (e.g. a bad
  port) shows only its scheme, since where its password would be cannot be told.
- `find_secrets(obj)`: the dotted paths (`judge.api_key`, `headers[0]`) of the values `redact`
  would change, never the values; `save_checkpoint` refuses a lineage with any. So
  `find_secrets(redact(x)) == []` for every `x`.

Key names are matched on the whole key's ending, case-insensitive: `redis_password`,
`client_secret`, `x-api-key` are secret; `password_env`, `api_key_env` (variable names),
`pad_token`, `eos_token_id`, `max_tokens` (tokenizer settings) are not. A bare `token` key is
secret, a key merely ending in `_token` is not (only `auth_token`, `access_token`, `hf_token`).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

_SECRET_KEY = re.compile(
    r"(api[_-]?key|secret|password|passwd|auth[_-]?token|access[_-]?token|hf[_-]?token|bearer)$|^token$",
    re.IGNORECASE,
)
# Credentials recognisable by their shape, whatever key holds them. The look-behinds keep
# words that merely contain the prefix ("task-...", "graph_...") out.
_CREDENTIAL = re.compile(
    r"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_\-]{16,}"
    r"|(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{20,}"
    r"|\b(?P<scheme>Bearer\s+)[A-Za-z0-9._~+/\-]{8,}=*",  # RFC 6750's token characters
    re.IGNORECASE,
)
# A URL inside any text, up to whitespace or a quote (JSON, log lines, error messages).
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>]+")
_MASKS = {"<redacted>", "redacted", "[redacted]"}


def is_secret_key(key: object) -> bool:
    """True if a value stored under `key` must never be shown."""
    return _SECRET_KEY.search(str(key)) is not None


def _masked(value: Any) -> bool:
    """Nothing to hide: None, empty, or already a mask ('***', pydantic's '**********', ...)."""
    if value is None:
        return True
    if isinstance(value, (dict, list, tuple)):
        return not value
    if not isinstance(value, str):
        return False
    v = value.strip()
    return v == "" or set(v) <= {"*"} or v.lower() in _MASKS


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`, safe for logs and error messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
        port = parts.port
    except ValueError:  # unparseable (e.g. a bad port): show only the scheme
        return url.split("://", 1)[0] + "://<unparseable>"
    if password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:{MASK}@{host}" + (f":{port}" if port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _redact_text(text: str) -> str:
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    return _CREDENTIAL.sub(lambda m: (m["scheme"] or "") + MASK, text)  # "Bearer ***"


def redact(value: Any) -> Any:
    """A copy of `value` safe to log or write (see the module docstring for what is masked)."""
    if isinstance(value, dict):
        return {k: MASK if is_secret_key(k) and not _masked(v) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v) for v in value)
    if isinstance(value, str):
        return _redact_text(value)
    return value


def find_secrets(obj: Any, path: str = "") -> list[str]:
    """Dotted paths of values that look like unredacted secrets (the values themselves are not returned)."""
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            sub = f"{path}.{k}" if path else str(k)
            if is_secret_key(k) and not _masked(v):
                found.append(sub)
            else:
                found.extend(find_secrets(v, sub))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found.extend(find_secrets(v, f"{path}[{i}]"))
    elif isinstance(obj, str) and _redact_text(obj) != obj:
        found.append(path or "<root>")
    return found
