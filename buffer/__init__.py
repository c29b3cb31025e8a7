"""The Redis replay buffer: offline anchor pairs beside fresh online pairs, mixed per batch.

`buffer/connection.py` is the only module in the project that imports `redis`. Beside it:
`store.py` the pairs (with `scripts.py`, their Lua scripts, and `mixing.py`, the pure sampling
plan), `pointers.py` small JSON records, `lock.py` the cycle lock, `records.py` the stored types,
`export.py` snapshots, `server.py` a local redis-server, `config.py` the config section,
`requirements.py` what the buffer requires of a Redis (noeviction, persistence), `layout.py` the
one-time rename of keys written under the pre-hash-tag names.
"""
