"""A one-time rename of a namespace's keys from the old layout `<ns>:<name>` to `{<ns>}:<name>`.

Why: Redis Cluster runs a Lua script only when all its keys hash to one slot, so every key of a
namespace now carries the namespace as a hash tag (`buffer.connection.BufferConnection.key`).
A buffer written before that (the embedded demo's AOF under `<state_dir>/redis/`, or a Redis
of your own) still holds `<ns>:pairs`, `<ns>:idx:...`, and so on.

Contract. `migrate_legacy_keys(conn)` runs at every connect to a single Redis (never a
cluster: the old scripts could not run on one). One EXISTS on the old core keys (pairs,
groups, anchor, version, fresh order, group times) decides; when none exists it returns 0 at
once. Otherwise it lists the namespace's old keys (SCAN `<ns>:*`) and renames them all in one
Lua script, so a crash leaves every key old or every key new; TTLs (the cycle lock's) survive
RENAME. If the new layout already holds a key the rename would overwrite, nothing is renamed
and `ReplayBufferError` says how to keep one of the two. Stop processes running an older tether
on the same namespace first: they keep writing the old names. A namespace that held only
pointers (no pairs) is not renamed: the policy registry re-mirrors its pointers from its files.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from buffer.connection import BufferConnection

log = logging.getLogger(__name__)

LEGACY_CORE = ("pairs", "groups", "anchor", "version", "fresh:order", "group_times")

# KEYS: the n old keys, then the n new ones in the same order. ARGV: n.
# Checks every target first, so a conflict renames nothing.
RENAME_LUA = """
local n = tonumber(ARGV[1])
for i = 1, n do
  if redis.call('EXISTS', KEYS[n + i]) == 1 then return {-1, KEYS[n + i]} end
end
local renamed = 0
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[n + i])
    renamed = renamed + 1
  end
end
return {renamed}
"""


def legacy_key(namespace: str, name: str) -> str:
    """The key `name` had in the old layout."""
    return f"{namespace}:{name}"


def migrate_legacy_keys(conn: BufferConnection) -> int:
    """Rename the namespace's old-layout keys to the hash-tagged ones; returns how many (see above)."""
    ns, client = conn.namespace, conn.client
    if not client.exists(*(legacy_key(ns, name) for name in LEGACY_CORE)):
        return 0
    prefix = legacy_key(ns, "")
    old = sorted(client.scan_iter(match=f"{prefix}*", count=1_000))
    new = [conn.key(k[len(prefix) :]) for k in old]
    result = client.eval(RENAME_LUA, 2 * len(old), *old, *new, len(old))
    if int(result[0]) < 0:
        from buffer.connection import ReplayBufferError

        raise ReplayBufferError(
            f"Redis at {conn.url} holds buffer {ns!r} under both the old key names ({prefix}*) and the new "
            f"ones ({conn.key('*')}), e.g. {result[1]}: nothing was renamed. Keep one: delete the old keys "
            f"(`redis-cli --scan --pattern '{prefix}*' | xargs redis-cli unlink`), or delete the new ones "
            f"(pattern '{conn.key('*')}') and connect again to rename the old"
        )
    log.warning("renamed %d keys of replay buffer %r at %s to the hash-tagged layout %s",
                int(result[0]), ns, conn.url, conn.key("..."))  # fmt: skip
    return int(result[0])
