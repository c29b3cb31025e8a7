"""The Redis replay buffer: offline anchor pairs beside fresh online pairs, mixed per batch.

`buffer/store.py` is the only module in the project that imports `redis`.
"""
