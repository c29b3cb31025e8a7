"""Checkpoints: an atomic Hugging Face model directory plus the lineage that explains it.

Contract:
- A checkpoint is a plain HF directory (safetensors weights, config.json, generation config,
  tokenizer files) that `AutoModelForCausalLM.from_pretrained` and vLLM load as-is. A peft model
  is merged into a copy for those weights (the live model is untouched), and its adapter alone
  is saved too, under `adapter/`: the next cycle continues that adapter on pi_0, so its
  adapter-disabled base is still the reference (`offline.models.load_policy`).
- Beside the weights, `lineage.json` records where the weights came from (dataset fingerprint,
  resolved config, parent checkpoint, code version, seed, pair ids per step, final metrics,
  created_at, kind), and `tether-complete.json` is written last: a directory is a checkpoint
  iff that marker exists (`is_complete`). The marker carries the content id, so reading a
  `CheckpointRef` back never re-hashes the weights.
- Everything is written into a temp dir in the same parent, fsynced, and renamed into place: a
  crash leaves no directory under the final name, and an overwrite swaps old and new in one
  atomic `renameat2(RENAME_EXCHANGE)` on Linux (two renames elsewhere). `lineage.json` and the
  marker are written with `offline.atomic`, like every other metadata file.
- Secrets are never written: the config arrives already redacted, and `save_checkpoint` refuses
  a lineage in which `offline.secrets.find_secrets` still finds one (a secret-named key with a
  value, a URL password, a credential-shaped string).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import datetime as dt
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from offline.atomic import atomic_write, fsync_dir, fsync_tree
from offline.secrets import find_secrets

LINEAGE_FILE = "lineage.json"
COMPLETE_MARKER = "tether-complete.json"
_REPO_ROOT = Path(__file__).resolve().parents[1]


class CheckpointRef(BaseModel):
    """Where a checkpoint lives and what it is: the type that flows from trainer to generator."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    """Absolute path of the checkpoint directory."""
    id: str
    """Short content hash of the weight files: equal ids mean equal weights."""
    name: str
    """The directory name given at save time (e.g. `offline`, `cycle-0003`)."""


class Lineage(BaseModel):
    """What `lineage.json` holds. Extra keys (e.g. `cycle`, `kl`) are kept as given."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["offline", "cycle"]
    """Which job wrote the checkpoint."""
    dataset_fingerprint: str | None = None
    """Fingerprint of the preference data trained on (`offline.data.dataset_fingerprint`)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """The resolved config, already redacted (secrets replaced by the caller)."""
    parent: CheckpointRef | dict[str, Any] | None = None
    """The checkpoint this one was trained from (a `CheckpointRef` or a dict with at least
    'id' and 'path'); None when training started from a base model."""
    seed: int | None = None
    """Seed of the run."""
    pair_ids_per_step: list[list[str]] = Field(default_factory=list)
    """For each optimizer step, the ids of the pairs it consumed."""
    metrics: dict[str, Any] = Field(default_factory=dict)
    """Final metrics, namespaced (`rewards/margins`, `kl/policy_ref`, ...)."""
    code_version: str = Field(default_factory=lambda: code_version())
    """Git sha of the code (`+dirty` when uncommitted changes), else the package version."""
    created_at: str = Field(
        default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    )
    """UTC ISO-8601 time of the save."""


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Git sha of the tether checkout (with `+dirty` if it has uncommitted changes), else the
    package version (installed, else from pyproject.toml), else 'unknown'."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout, no commits yet, or no git binary
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"tether-{version('tether')}"
    except PackageNotFoundError:
        pass  # a source tree that was never pip-installed: read its pyproject instead
    try:
        import tomllib  # Python >= 3.11

        project = tomllib.loads((_REPO_ROOT / "pyproject.toml").read_text())["project"]
        return f"tether-{project['version']}"
    except (ImportError, OSError, KeyError, ValueError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Atomic directories (shared with offline.models, offline.demo_task and offline.train's snapshots)


@functools.lru_cache(maxsize=1)
def _renameat2():
    """libc's renameat2 (Linux), or None; looked up once (find_library runs ldconfig)."""
    libc_name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False if unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` unless `dst` exists, as one step; False (nothing renamed) if it does.

    Linux renameat2(RENAME_NOREPLACE) decides in the kernel; elsewhere a plain rename, which
    fails with EEXIST / ENOTEMPTY onto a non-empty directory (every published one has files)."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL/ENOSYS: this filesystem lacks the flag
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True


def _clear_stale(final: Path) -> None:
    """Remove temp dirs a crashed writer of `final` left behind (same parent, same name).

    A live writer holds an exclusive flock on its temp dir until it is done (`_locked_temp_dir`),
    and the kernel drops that lock when the writer dies, SIGKILL included. So a temp dir whose
    lock this process can take is abandoned and removed (under the lock); one whose lock is held
    belongs to a writer still at work, maybe building the same entry, and is left alone."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:
            continue  # already gone (its writer finished or another cleaner took it)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: a live writer's
        else:
            shutil.rmtree(stale, ignore_errors=True)
        finally:
            os.close(fd)


def _locked_temp_dir(final: Path) -> tuple[Path, int]:
    """A new empty temp dir beside `final` and an fd holding its exclusive flock.

    Between its mkdir and its lock a cleaner may have taken the dir for abandoned and removed
    it: the lock then comes on a deleted inode, which the stat check sees, and we make another."""
    while True:
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a cleaner is removing it
        try:
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp dir beside `final`; on clean exit it becomes `final` in one rename.

    Before the rename every file in it is fsynced, after it the parent directory: the same
    guarantees `offline.atomic` gives single files. On an exception the temp dir is removed and
    `final` is left as it was. With `overwrite`, an existing `final` is swapped out atomically
    and then deleted; without it, an existing `final` is a FileExistsError (raised after the
    body ran, in case another writer won the race).

    Concurrent writers of one `final` (two processes building the same cache entry) do not
    clash: each writes its own locked temp dir, which no other writer's stale-dir sweep removes
    while it lives, and the publishing rename refuses to replace (RENAME_NOREPLACE), so exactly
    one wins and every loser gets FileExistsError with its temp dir removed, never a half entry.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(final)
    tmp, lock = _locked_temp_dir(final)
    try:
        yield tmp
        fsync_tree(tmp)  # a power cut must not publish a directory whose files are holes
        if _rename_noreplace(tmp, final):
            pass  # atomic on POSIX within one filesystem
        elif not overwrite:
            raise FileExistsError(f"{final} already exists (pass overwrite=True to replace it)")
        elif _exchange(tmp, final):
            pass  # tmp now holds the old directory; removed below
        else:
            old = final.parent / f".{final.name}.tmp-old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            tmp = old
        fsync_dir(final.parent)  # make the rename itself durable
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)


# ---------------------------------------------------------------------------------------------
# Checkpoints


ADAPTER_DIR = "adapter"
"""Subdirectory of a LoRA checkpoint holding its adapter (peft layout), beside the merged weights."""


def _weights_id(directory: Path) -> str:
    """16-hex sha256 over the weight files' names and bytes, in name order."""
    h = hashlib.sha256()
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _plain_model(model):
    """The model to serialise: a peft model is merged into a deep copy, never in place."""
    from peft import PeftModel  # lazy: peft's import is slow and only needed for adapters

    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model


def save_checkpoint(
    model,
    tokenizer,
    root: Path,
    name: str,
    lineage: Lineage | dict[str, Any],
    overwrite: bool = False,
) -> CheckpointRef:
    """Write `root/name` atomically as a plain HF model dir with lineage; return its reference.

    Raises FileExistsError if a complete checkpoint `name` exists and `overwrite` is False, and
    ValueError if the lineage still contains a secret.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"checkpoint name must be a plain, non-hidden directory name, got {name!r}")
    record = lineage if isinstance(lineage, Lineage) else Lineage.model_validate(lineage)
    payload = record.model_dump(mode="json")
    leaks = find_secrets(payload)
    if leaks:
        raise ValueError(
            f"refusing to write secrets into {LINEAGE_FILE}: redact {', '.join(leaks)} first"
        )
    final = Path(root) / name
    if is_complete(final) and not overwrite:
        raise FileExistsError(f"checkpoint {final} exists (pass overwrite=True to replace it)")
    # An incomplete dir under the final name cannot come from us (we rename only complete dirs);
    # treat it as garbage to replace rather than as a checkpoint to protect.
    with atomic_dir(final, overwrite=True) as tmp:
        _plain_model(model).save_pretrained(tmp, safe_serialization=True)
        if hasattr(model, "peft_config"):
            model.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)  # the adapter only
        tokenizer.save_pretrained(tmp)
        atomic_write(tmp / LINEAGE_FILE, json.dumps(payload, indent=2, sort_keys=True) + "\n")
        ref = CheckpointRef(path=str(final.resolve()), id=_weights_id(tmp), name=name)
        # The marker goes last: its presence means every file above is fully written.
        atomic_write(tmp / COMPLETE_MARKER, ref.model_dump_json(exclude={"path"}) + "\n")
    return ref


def model_id(path: Path | str) -> str:
    """Identity of the weights in a model dir: its checkpoint id when it is a tether checkpoint
    (read from the marker, no hashing), else the hash of its safetensors files (a converted or
    built base model). Reference log-probs are cached under this id."""
    path = Path(path)
    return checkpoint_ref(path).id if is_complete(path) else _weights_id(path)


def is_complete(path: Path | str) -> bool:
    """True iff `path` is a checkpoint whose writer finished (the marker is written last)."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def checkpoint_ref(path: Path | str) -> CheckpointRef:
    """The `CheckpointRef` of a complete checkpoint directory (read from its marker)."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete tether checkpoint (no {COMPLETE_MARKER})")
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    return CheckpointRef(path=str(path.resolve()), id=marker["id"], name=marker["name"])


def read_lineage(path: Path | str) -> dict[str, Any]:
    """The lineage dict of a checkpoint directory."""
    file = Path(path) / LINEAGE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} missing: {path} is not a tether checkpoint")
    return json.loads(file.read_text())
