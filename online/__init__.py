"""Online refresh: generation, judging, KL measurement, the mix/beta controller and the promotion gate.

Depends on `offline` (pair type, training loop, checkpoints) only; never imports `prefect`,
`redis` or `orchestrator`.
"""
