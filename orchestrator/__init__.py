"""Prefect flows, the config tree and the `tether` CLI: the only package that imports `prefect`."""
