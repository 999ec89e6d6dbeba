"""Crash-safe training checkpoints, config fingerprints and RNG capture for bit-identical resumes.

Layout under `out_dir`:

    checkpoints/step_00001000/state.pt   torch.save of the caller's dict (data position, RNG, step, ...)
    checkpoints/step_00001000/shards/    the model and optimizer by torch.distributed.checkpoint (format 2)
    checkpoints/step_00001000/meta.json  {"step", "time", "unix_time", "fingerprint", "format"}
    checkpoints/latest                   "step_00001000": the committed checkpoint

The shards hold each tensor under its global name and shape, so a checkpoint saved by one layout of ranks
loads into another (resharding), a single process included. Format 1 (no shards/: the model and optimizer
inside state.pt) is what single-process runs wrote before; it still loads.

A checkpoint is written into a hidden temporary sibling directory (by every rank, for the shards), fsynced,
renamed into place by rank 0 once all ranks wrote, and only then committed by atomically replacing `latest`.
A crash or a full disk at any point leaves the previously committed checkpoint whole; `save` removes its
partial directory on an exception and the next `save` sweeps what a hard kill left behind.

State files are loaded with `torch.load(weights_only=True)`: store tensors and plain Python values
(dicts, lists, tuples, numbers, strings) only. `rng_state()` returns such values.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import tempfile
import time
import warnings
import zipfile
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from seekforge.configio import atomic_write_text, fsync_dir, to_dict
from seekforge.errors import CheckpointError
from seekforge.parallel.mesh import is_main, on_main

__all__ = ["CheckpointManager", "config_fingerprint", "rng_state", "set_rng_state"]

STATE_FILE = "state.pt"
META_FILE = "meta.json"
SHARDS_DIR = "shards"
LATEST_FILE = "latest"
FORMAT = 1  # state.pt holds everything
FORMAT_SHARDED = 2  # model and optimizer in shards/ (torch.distributed.checkpoint), the rest in state.pt
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TEMP_PREFIX = ".tmp-"
_ASIDE_PREFIX = ".old-"


def config_fingerprint(config: Mapping | Any) -> str:
    """A stable 16-hex-digit hash of a config (dict or dataclass): sha256 of its canonical JSON."""
    data = to_dict(config) if is_dataclass(config) else config
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict:
    """The global generators of Python `random`, numpy (`np.random`) and torch (CPU, and CUDA if present: every
    visible device's, or in a distributed run the rank's own device's, so that no rank touches another's GPU).

    numpy `Generator` objects made by `default_rng` are not global and are not captured: a data
    pipeline using one must checkpoint it itself.
    """
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "key": key.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [torch.cuda.get_rng_state()] if dist.is_initialized() else torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore what `rng_state()` captured, so the following random draws repeat exactly."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if dist.is_initialized() or len(cuda) == 1:  # one device's: the current one's
            torch.cuda.set_rng_state(cuda[0])
            return
        if len(cuda) != torch.cuda.device_count():
            raise CheckpointError(
                f"the checkpoint holds CUDA RNG states for {len(cuda)} devices but {torch.cuda.device_count()} "
                "are visible; resume with the same number of GPUs per process"
            )
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def _write_state(path: Path, state: Mapping) -> None:
    with open(path, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, data: Mapping) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _is_complete(path: Path) -> bool:
    shards = path / SHARDS_DIR
    return ((path / STATE_FILE).is_file() and (path / META_FILE).is_file()
            and (not shards.exists() or (shards / ".metadata").is_file()))


@contextlib.contextmanager
def _single_process_quiet():
    """Silences torch.distributed.checkpoint's warning that it serves a single process (no process group): here
    that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class CheckpointManager:
    """Saves and finds checkpoints under `out_dir/checkpoints`, keeping the newest `keep_last`.

    `fingerprint` (from `config_fingerprint`) is recorded in each checkpoint's meta.json so that
    `verify_fingerprint` can refuse to resume a run into a directory made by another config.
    `keep_last=None` keeps every checkpoint. In a distributed run (torch.distributed initialised) every
    rank calls `save` and `load_shards`; rank 0 alone manages the directories. The directory must be one
    file system that every rank sees.
    """

    def __init__(self, out_dir: str | os.PathLike, keep_last: int | None = 3, fingerprint: str | None = None):
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
            raise CheckpointError(f"keep_last must be a whole number >= 1 (or None to keep all), got {keep_last!r}")
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / "checkpoints"
        self.keep_last = keep_last
        self.fingerprint = fingerprint

    # -- reading ------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of the complete checkpoint directories present, ascending (committed or not)."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and _is_complete(p):
                found.append(int(m.group(1)))
        return sorted(found)

    def _pointer(self) -> str | None:
        try:
            return (self.dir / LATEST_FILE).read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def latest_dir(self) -> Path | None:
        """The committed checkpoint's directory, or None when there is none.

        Falls back, in order, to the aside copy of a step whose re-save was interrupted, then to the
        newest complete directory, should `latest` name a directory that is gone.
        """
        name = self._pointer()
        if name is not None:
            target = self.dir / name
            if _is_complete(target):
                return target
            asides = sorted(p for p in self.dir.glob(f"{_ASIDE_PREFIX}{name}-*") if _is_complete(p))
            if asides:
                return asides[-1]
        steps = self.steps()
        return self.dir / _step_name(steps[-1]) if steps else None

    def latest_meta(self) -> dict | None:
        path = self.latest_dir()
        if path is None:
            return None
        try:
            return json.loads((path / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"{path / META_FILE}: unreadable checkpoint metadata ({err}); delete {path} to fall back to an "
                "older checkpoint"
            ) from err

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[int, dict] | None:
        """(step, state) of the committed checkpoint, or None when the directory has none."""
        path = self.latest_dir()
        if path is None:
            return None
        meta = self.latest_meta()
        file = path / STATE_FILE
        damaged = (f"{file}: cannot be read, the file is damaged; delete {path} to resume from the previous "
                   "checkpoint")
        if not zipfile.is_zipfile(file):  # torch.save always writes a zip archive
            raise CheckpointError(damaged)
        try:
            state = torch.load(file, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            detail = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line), "")
            raise CheckpointError(
                f"{file}: holds objects other than tensors and plain Python values ({detail}); "
                "save only state_dict()s, numbers, strings, lists, tuples and dicts"
            ) from err
        except (OSError, RuntimeError, EOFError) as err:
            raise CheckpointError(f"{damaged} ({err})") from err
        return int(meta["step"]), state

    def verify_fingerprint(self, expected: str) -> None:
        """Raise CheckpointError if the latest checkpoint was saved under a config other than `expected`."""
        meta = self.latest_meta()
        if meta is None or meta.get("fingerprint") in (None, expected):
            return
        raise CheckpointError(
            f"{self.out_dir} holds a checkpoint (step {meta['step']}) of config fingerprint {meta['fingerprint']}, "
            f"but this run's config has fingerprint {expected}; to resume, use the same config as that run; "
            "to start a new run, pass a new --out directory"
        )

    # -- writing ------------------------------------------------------------------------------------

    def save(self, step: int, state: Mapping, shards: Mapping | None = None) -> Path:
        """Write `state` (and `shards`) as the checkpoint of `step` and commit it; returns its directory.

        `shards`: a state dict of (possibly sharded) tensors, model and optimizer, written with
        torch.distributed.checkpoint by every rank into the checkpoint's `shards/`; `state`, the rest, is rank
        0's. In a distributed run every rank calls save; rank 0 makes the directory, commits it once all ranks
        wrote their shards, and prunes. On any failure the previous checkpoint stays committed and the partial
        directory is removed; an OSError (a full disk, say) is raised as CheckpointError.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a whole number >= 0, got {step!r}")
        final = self.dir / _step_name(step)
        tmp = None
        try:
            tmp = Path(on_main(lambda: self._begin(final), CheckpointError))
            if shards is not None:
                with _single_process_quiet():
                    dcp.save(dict(shards), checkpoint_id=tmp / SHARDS_DIR, no_dist=not dist.is_initialized())
            on_main(lambda: self._commit(step, state, tmp, final, sharded=shards is not None), CheckpointError)
        except BaseException as err:
            if tmp is not None and is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, (OSError, dcp.CheckpointException)):
                reason = "the disk is full" if getattr(err, "errno", None) == errno.ENOSPC else (
                    getattr(err, "strerror", None) or str(err))
                try:
                    newest = self.latest_dir()
                except OSError:
                    newest = None
                kept = f"the newest whole checkpoint is {newest.name}" if newest else "there is no checkpoint yet"
                raise CheckpointError(
                    f"could not save checkpoint step {step} in {self.dir}: {reason}; {kept}; "
                    "free space (or lower keep_last) and resume, or pass another --out"
                ) from err
            raise
        if is_main():
            self._prune(step)
        return final

    def _begin(self, final: Path) -> str:
        """Sweep what an interrupted save left and make the temporary directory `final` is written into."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._sweep()
        return tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{final.name}-", dir=self.dir)

    def _commit(self, step: int, state: Mapping, tmp: Path, final: Path, sharded: bool) -> None:
        """Write the state and meta beside the shards, rename `tmp` into place and point `latest` at it."""
        aside = None
        try:
            _write_state(tmp / STATE_FILE, state)
            now = time.time()
            _write_json(tmp / META_FILE, {
                "step": step,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                "unix_time": now,
                "fingerprint": self.fingerprint,
                "format": FORMAT_SHARDED if sharded else FORMAT,
            })
            fsync_dir(tmp)
            if final.exists():
                if final.name == self._pointer():
                    # Re-saving the committed step: keep the old copy until the new one is in place.
                    aside = self.dir / f"{_ASIDE_PREFIX}{final.name}-{os.getpid()}-{time.time_ns()}"
                    os.rename(final, aside)
                else:  # an uncommitted leftover of a crashed run
                    shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.dir)
            atomic_write_text(self.dir / LATEST_FILE, final.name + "\n")
        except BaseException:
            if aside is not None:
                with contextlib.suppress(OSError):
                    if _is_complete(final):
                        shutil.rmtree(aside)
                    else:
                        shutil.rmtree(final, ignore_errors=True)
                        os.rename(aside, final)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def shard_keys(self) -> set[str]:
        """The keys the committed checkpoint's shards hold, flattened as torch.distributed.checkpoint stores them
        ("model.embed.weight", "optimizer.state.embed.weight.exp_avg", ...)."""
        path = self.latest_dir()
        if path is None or not (path / SHARDS_DIR).is_dir():
            raise CheckpointError(f"{self.dir}: the latest checkpoint holds no sharded state to load")
        return set(dcp.FileSystemReader(path / SHARDS_DIR).read_metadata().state_dict_metadata)

    def load_shards(self, target: dict) -> None:
        """Read the committed checkpoint's `shards/` into `target` in place (torch.distributed.checkpoint: any
        layout saved, any layout loading, one process included). Every rank calls it."""
        path = self.latest_dir()
        if path is None or not (path / SHARDS_DIR).is_dir():
            raise CheckpointError(f"{self.dir}: the latest checkpoint holds no sharded state to load")
        try:
            with _single_process_quiet():
                dcp.load(target, checkpoint_id=path / SHARDS_DIR, no_dist=not dist.is_initialized())
        except dcp.CheckpointException as err:
            raise CheckpointError(f"{path / SHARDS_DIR}: cannot be read ({err}); delete {path} to resume from the "
                                  f"previous checkpoint") from err

    def _sweep(self) -> None:
        """Remove what an interrupted save left: temp dirs, and aside copies no longer needed."""
        for p in self.dir.iterdir():
            if p.name.startswith(_TEMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.startswith(_ASIDE_PREFIX):
                original = self.dir / p.name[len(_ASIDE_PREFIX):].rsplit("-", 2)[0]
                if not _is_complete(original) and _is_complete(p):
                    shutil.rmtree(original, ignore_errors=True)
                    os.rename(p, original)
                else:
                    shutil.rmtree(p, ignore_errors=True)

    def _prune(self, committed: int) -> None:
        # Steps after the committed one belong to an abandoned timeline (a crash before a resume).
        steps = self.steps()
        keep = [s for s in steps if s <= committed]
        if self.keep_last is not None:
            keep = keep[-self.keep_last:]
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.dir / _step_name(s), ignore_errors=True)
