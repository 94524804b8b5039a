"""Run folders and checkpoints.

A run folder (``log.output_dir``) holds one run. ``claim_run_folder`` takes an exclusive lock on it (a
second live run on the same folder is refused; a lock left by a killed run is taken over) and refuses a
folder that already holds a run unless it is resumed, or replaced with ``overwrite`` (the old run is moved
aside to ``<folder>.old-<time>``, never deleted).

A checkpoint (adapter in peft format + optimizer + scheduler + RNG + data cursor) is written into
``.tmp-checkpoint-N``: every file is fsynced, then the folder, then ``COMPLETE`` records each file's size
and SHA-256; only then is it renamed to ``checkpoint-N``. A kill or power cut leaves at worst a temporary
folder (ignored, removed by the next save) and the previous checkpoints untouched; ``verify_checkpoint`` finds
any damage after the fact. ``trainer_state.pt`` holds only tensors and plain Python types and is loaded with
``weights_only=True``: loading a checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
DONE_FILE = "COMPLETE"
LOCK_FILE = ".lock"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# logs whose lines make a folder hold a run (with checkpoints); a recipe.yaml alone (a run that failed before its
# first step) holds nothing to lose
RUN_LOGS = ("metrics.jsonl", "samples.jsonl")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and what is wrong."""


class RunFolderError(RuntimeError):
    """The output folder cannot take this run (in use, or holding another run); the message says what to do."""


# --------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain types (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.asarray(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------- run folder


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, released by ``release()`` or when the process exits.

    The kernel drops a flock when its process dies, so a lock file whose lock nobody holds was left by a
    killed run: it is stale and taken over. The file records the holder's pid and host for the message.
    """

    def __init__(self, folder: Path, fd: int):
        self.folder = folder
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: str | Path) -> "RunLock":
        folder = Path(folder)
        path = folder / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunFolderError(f"cannot lock {path} ({exc.strerror}); use a log.output_dir on a local disk") from None
                raise RunFolderError(
                    f"log.output_dir {folder} is in use by a live run ({holder}); wait for it to finish, stop it, "
                    "or choose another log.output_dir"
                ) from None
            # the holder we waited on may have unlinked the file before we locked it: lock the file on disk
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:
            log.warning("%s: stale lock (%s, no longer running) taken over", path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        os.fsync(fd)
        return cls(folder, fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            (self.folder / LOCK_FILE).unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def run_contents(folder: str | Path) -> list[str]:
    """Names of what makes ``folder`` hold a run (logged steps, checkpoints); empty for a fresh folder."""
    p = Path(folder)
    if not p.is_dir():
        return []
    return sorted(x.name for x in p.iterdir() if (x.name in RUN_LOGS and x.stat().st_size > 0) or _NAME.match(x.name)
                  or x.name.startswith(".tmp-checkpoint-"))


def check_output_dir(folder: str | Path) -> None:
    """The folder is usable as a run folder: not a file, creatable and writable."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise RunFolderError(f"log.output_dir {p} is a file, not a folder; choose another log.output_dir")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"log.output_dir {p}: {existing} is not writable; choose another log.output_dir")


def claim_run_folder(folder: str | Path, *, resume: bool, overwrite: bool = False) -> RunLock:
    """Lock ``folder`` for this run. A folder already holding a run is refused unless ``resume`` (continue
    it) or ``overwrite`` (move the old run aside to ``<folder>.old-<time>``, never deleted)."""
    folder = Path(folder)
    check_output_dir(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(folder)
    found = run_contents(folder)
    if found and not resume:
        if not overwrite:
            lock.release()
            listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise RunFolderError(
                f"log.output_dir {folder} already holds a run ({listed}); continue it with --resume latest, choose "
                "another log.output_dir, or pass --overwrite to move the old run aside (it is not deleted)"
            )
        aside = _aside_name(folder)
        os.rename(folder, aside)  # the lock moves with the folder: nobody can start in it meanwhile
        lock.folder = aside
        lock.release()
        log.warning("moved the previous run in %s aside to %s", folder, aside)
        folder.mkdir(parents=True)
        lock = RunLock.acquire(folder)
    return lock


def _aside_name(folder: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = folder.with_name(f"{folder.name}.old-{stamp}")
    n = 1
    while candidate.exists():
        candidate = folder.with_name(f"{folder.name}.old-{stamp}-{n}")
        n += 1
    return candidate


# -------------------------------------------------------------------------------------- checkpoints


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != DONE_FILE)


def save_checkpoint(output_dir: str | Path, step: int, *, peft_model, state: dict, recipe_text: str, keep: int) -> Path:
    """Write checkpoint-``step`` atomically and verifiably; keep the newest ``keep`` checkpoints."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    for leftover in [*out.glob(".tmp-checkpoint-*"), *out.glob(".old-checkpoint-*")]:  # of a killed save or delete
        shutil.rmtree(leftover, ignore_errors=True)  # (the folder's lock makes this process its only writer)
    tmp.mkdir()
    peft_model.save_pretrained(str(tmp / "adapter"))
    torch.save(state, tmp / STATE_FILE)
    (tmp / "recipe.yaml").write_text(recipe_text)
    # data first, then the folders' entries, then the record of what was written: a power cut can lose
    # COMPLETE but never leave a COMPLETE that vouches for files still in the page cache
    files = _files(tmp)
    for f in files:
        _fsync_path(f)
    for d in sorted({f.parent for f in files}, key=lambda p: -len(p.parts)):
        _fsync_path(d)
    record = {"step": step, "files": {str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": _sha256(f)} for f in files}}
    with open(tmp / DONE_FILE, "w") as f:
        f.write(json.dumps(record, indent=1))
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(tmp)
    if final.exists():  # re-saving the same step (e.g. interrupted right after a periodic save)
        old = out / f".old-checkpoint-{step}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(out)
    for stale in list_checkpoints(out)[:-keep]:
        _remove(stale)
    return final


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint so that a kill midway never leaves a listed checkpoint with files missing: it is
    renamed out of the ``checkpoint-N`` namespace first (leftovers of a killed delete go at the next save)."""
    doomed = checkpoint.with_name(".old-" + checkpoint.name)
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints whose save finished (``COMPLETE`` present), oldest first; not yet verified."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NAME.match(p.name)
        if m and (p / DONE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError (one line: which file, what is wrong) unless every file matches ``COMPLETE``."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a checkpoint folder")
    done = p / DONE_FILE
    if not done.is_file():
        raise CheckpointError(f"{p} has no {DONE_FILE} marker: its save did not finish")
    try:
        record = json.loads(done.read_text())
        files = record["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{done} is unreadable or lists no files (damaged, or written by an older version)") from None
    if STATE_FILE not in files:
        raise CheckpointError(f"{done} does not list {STATE_FILE}")
    for name, want in files.items():
        f = p / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        size = f.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{f} has {size} bytes, {want['size']} were written: the file is damaged")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{f} does not match the checksum written with it: the file is damaged")


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """``latest`` -> the newest checkpoint in output_dir that verifies (damaged ones are skipped with a
    warning); else the given checkpoint folder, which must verify. Raises CheckpointError."""
    if resume == "latest":
        for p in reversed(list_checkpoints(output_dir)):
            try:
                verify_checkpoint(p)
                return p
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s: %s", p.name, exc)
        raise CheckpointError(
            f"--resume latest: no usable checkpoint in {output_dir}; start afresh in another log.output_dir "
            "or with --overwrite"
        )
    try:
        verify_checkpoint(resume)
    except CheckpointError as exc:
        raise CheckpointError(f"--resume {resume}: {exc}; use another checkpoint or --resume latest") from None
    return Path(resume)


def load_state(path: str | Path) -> dict:
    """The trainer state of a checkpoint; only tensors and plain types are accepted (no code can run)."""
    f = Path(path) / STATE_FILE
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- unpickling fails in many ways; all mean "not a usable state"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{f} cannot be loaded safely ({type(exc).__name__}: {first[:200]})") from exc
