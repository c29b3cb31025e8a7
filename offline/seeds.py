"""Seeds derived by name: `derive_seed(seed, "generate", cycle)`.

Contract: a pure function of the run's seed and a path of names/indices, 31 bits (what every
RNG we feed accepts, torch's and the OpenAI API's `seed` alike). Two different paths never share
a stream by construction (sha256), unlike bare offsets (`seed + 7`, `seed * 1_000_003 + i`),
where cycle 8's generation seed could equal cycle 1's evaluation seed. `derive_seed(s, i)` is
the per-request seed of the openai backend, so its values are unchanged from before.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *path: str | int) -> int:
    """A seed for the stream named `path` under `seed` (same inputs, same seed; 0 <= s < 2**31)."""
    key = ":".join(str(part) for part in (seed, *path))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") & 0x7FFFFFFF
