"""Small named JSON records in Redis, beside the replay buffer: the policy registry's mirror.

`offline.registry.PolicyRegistry` keeps the current policy and the cycle state in files (the
truth) and copies them here (`current:<name>`, `cycle-state:<name>`) for readers that only
reach Redis.

Contract. `Pointers(connection).set(name, value)` replaces the JSON object under
`{<ns>}:pointer:<name>` with one SET, so a reader sees the old object or the new one, never a
mix; `get(name)` returns it, or None if it was never set. Values are JSON objects (dicts);
NaN and infinities are refused rather than stored as something another JSON reader cannot parse.
"""

from __future__ import annotations

import json
from typing import Any, cast

from buffer.connection import BufferConnection, translating_errors


class Pointers:
    """The namespace's pointers (an `offline.registry.Mirror`); the buffer's is `ReplayBuffer.pointers`."""

    def __init__(self, connection: BufferConnection) -> None:
        self.connection = connection

    @translating_errors
    def set(self, name: str, value: dict[str, Any]) -> None:
        """Atomically replace the JSON object stored under `name`."""
        if not isinstance(value, dict):
            raise TypeError(f"a pointer holds a JSON object (dict), got {type(value).__name__}")
        self.connection.client.set(self._key(name), json.dumps(value, allow_nan=False, sort_keys=True))

    @translating_errors
    def get(self, name: str) -> dict[str, Any] | None:
        """The JSON object stored under `name`, or None if never set."""
        raw = self.connection.client.get(self._key(name))
        return None if raw is None else cast("dict[str, Any]", json.loads(raw))

    def _key(self, name: str) -> str:
        return self.connection.key(f"pointer:{name}")
