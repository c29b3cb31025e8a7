"""Mirror tether's promoted-policy pointer into the `current` link that the vllm service serves.

Contract:
- Source of truth: `<state_dir>/pointers/<name>.json`, replaced atomically by
  `offline.registry.PolicyRegistry.promote`; its `checkpoint.path` is a complete tether checkpoint, a plain HF
  directory that vLLM loads as-is (`offline/checkpoint.py`).
- Output: `<root>/current`, a *relative* symlink to that checkpoint. `<root>` is the shared
  `checkpoints` volume, mounted at `<state_dir>/checkpoints` in the worker and at `/checkpoints`
  in vllm; a relative link resolves in both. It is flipped atomically (a new link under a temp
  name, then `os.replace`), so vLLM's supervisor (`docker/vllm-serve.sh`) sees the old target
  or the new one, never a missing link.
- A pointer whose checkpoint is incomplete (no `tether-complete.json`) or lies outside `<root>`
  is refused: the old link stays and the reason is logged.
- `--once` syncs and exits (status 1 if the pointer could not be mirrored); otherwise it polls
  every `--interval` seconds and touches `--heartbeat` after each good pass (the healthcheck).

Stdlib + PyYAML only: it never imports tether, so it starts in a second and can run anywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

COMPLETE_MARKER = "tether-complete.json"  # offline/checkpoint.py writes it last
LINK_NAME = "current"
DEFAULT_NAME = "tether"  # TetherConfig.name's default

log = logging.getLogger("weights-sync")


class SyncError(RuntimeError):
    """The pointer names a checkpoint that cannot be published; the message says why."""


def run_family(config: Path | None, name: str | None) -> str:
    """The run family whose pointer to follow, resolved as the worker's config loader does.

    `--name` wins; else `$TETHER_NAME` (env beats YAML in `orchestrator.config`); else the
    config file's `name`; else tether's default.
    """
    if name:
        return name
    if os.environ.get("TETHER_NAME"):
        return os.environ["TETHER_NAME"]
    if config is not None:
        raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        if isinstance(raw, dict) and raw.get("name"):
            return str(raw["name"])
    return DEFAULT_NAME


def pointed_checkpoint(state_dir: Path, name: str) -> Path | None:
    """The checkpoint directory the pointer of `name` names, or None before any promotion."""
    pointer = state_dir / "pointers" / f"{name}.json"
    if not pointer.is_file():
        return None
    record = json.loads(pointer.read_text(encoding="utf-8"))
    try:
        return Path(record["checkpoint"]["path"])
    except (KeyError, TypeError):
        raise SyncError(f"{pointer}: no checkpoint.path in the pointer record") from None


def link_target(checkpoint: Path, root: Path) -> str:
    """`checkpoint` relative to `root`: what the `current` link should hold."""
    checkpoint, root = Path(os.path.abspath(checkpoint)), Path(os.path.abspath(root))
    if not checkpoint.is_relative_to(root) or checkpoint == root:
        raise SyncError(
            f"checkpoint {checkpoint} is not under {root}: mount the checkpoints volume at "
            "<state_dir>/checkpoints in the worker so vLLM can see what it writes"
        )
    if not (checkpoint / COMPLETE_MARKER).is_file():
        raise SyncError(f"checkpoint {checkpoint} is incomplete (no {COMPLETE_MARKER}); not serving it")
    return str(checkpoint.relative_to(root))


def flip_link(root: Path, target: str, link_name: str = LINK_NAME) -> bool:
    """Point `root/link_name` at `target` atomically; True if it changed."""
    # Not `offline.atomic`, tether's one home for atomic writes, although the image has tether
    # installed: this swaps a symlink, which has no content to write or fsync (only the rename
    # and the directory fsync below are shared), and this script promises to run on the stdlib
    # and PyYAML alone (see the module docstring; tests load it by file path).
    link = root / link_name
    if link.is_symlink() and os.readlink(link) == target:
        return False
    tmp = root / f".{link_name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    try:
        # rename(2) over the old link: readers see the old or the new target, never neither.
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Persist the rename itself, so a power cut cannot roll vLLM back to an older policy.
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def sync_once(state_dir: Path, root: Path, name: str) -> str | None:
    """Mirror the pointer of `name` into `root/current`; the link target, None if not promoted yet."""
    checkpoint = pointed_checkpoint(state_dir, name)
    if checkpoint is None:
        return None
    target = link_target(checkpoint, root)
    if flip_link(root, target):
        log.info("current -> %s (promoted policy of %r)", target, name)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="the worker's YAML config (for the run family name)")
    parser.add_argument("--name", help="run family name (overrides --config and $TETHER_NAME)")
    parser.add_argument(
        "--state-dir", type=Path, default=Path(os.environ.get("TETHER_STATE_DIR", ".tether")),
        help="tether's state dir (default $TETHER_STATE_DIR or .tether)",
    )
    parser.add_argument("--root", type=Path, help="the checkpoints volume (default <state-dir>/checkpoints)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between polls")
    parser.add_argument("--heartbeat", type=Path, help="file touched after each good pass")
    parser.add_argument("--once", action="store_true", help="sync once and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")

    name = run_family(args.config, args.name)
    root = args.root or args.state_dir / "checkpoints"
    log.info("following %s for run family %r into %s/%s", args.state_dir / "pointers", name, root, LINK_NAME)
    waiting_logged = False
    while True:
        try:
            target = sync_once(args.state_dir, root, name)
        except (SyncError, OSError, ValueError) as exc:
            # Recoverable here: the next promotion may be fine, and the old link keeps serving.
            log.error("%s", exc)
            if args.once:
                return 1
        else:
            if target is None and not waiting_logged:
                log.info("no promoted policy yet (run `tether offline` or wait for the first cycle)")
                waiting_logged = True
            if args.heartbeat is not None:
                args.heartbeat.touch()
            if args.once:
                return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
