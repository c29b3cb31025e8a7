"""Offline preference learning: data, loss, the training loop, evaluation and checkpoints.

Dependencies point one way (orchestrator -> online, buffer -> offline): nothing in here imports
`prefect`, `redis` or anything from `online`, `buffer` or `orchestrator`.
"""
