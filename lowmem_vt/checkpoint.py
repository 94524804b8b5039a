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

from .errors import UserError
from .metrics import write_problem

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
DONE_FILE = "COMPLETE"
LOCK_FILE = ".lock"
BASE_FILE = "base.json"  # the base model's identity: name and fingerprint
_NAME = re.compile(r"^checkpoint-(\d+)$")
# logs whose lines make a folder hold a run (with checkpoints); a recipe.yaml alone (a run that failed before its
# first step) holds nothing to lose
RUN_LOGS = ("metrics.jsonl", "samples.jsonl")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names it and what is wrong."""


class RunFolderError(UserError, RuntimeError):
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
        self.created: list[Path] = []  # folders claim_run_folder made (deepest first)

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

    def release(self, cleanup: bool = False) -> None:
        """Unlock; with ``cleanup`` (a run refused before its first write), remove the folders the claim created
        if they are still empty."""
        if self._fd is None:
            return
        try:
            (self.folder / LOCK_FILE).unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if cleanup:
            for d in self.created:
                try:
                    d.rmdir()
                except OSError:
                    break

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


# what a run writes into its folder (trainer, reporting, plots, checkpoints): a folder holding anything else is
# not a run folder, and a run neither writes into it nor moves it aside
OWN_NAMES = {"metrics.jsonl", "samples.jsonl", "metrics.tmp", "samples.tmp", "recipe.yaml", "plots", "tensorboard",
             "wandb", "wandb_run_id", "selfcheck.json", LOCK_FILE, ".DS_Store"}
_OWN_PATTERN = re.compile(r"^(\.tmp-|\.old-)?checkpoint-\d+$|^superseded-[\w.-]+$")


def foreign_contents(folder: str | Path) -> list[str]:
    """What in ``folder`` a run did not write (empty for a fresh folder or a run folder)."""
    p = Path(folder)
    if not p.is_dir():
        return []
    return sorted(x.name for x in p.iterdir() if x.name not in OWN_NAMES and not _OWN_PATTERN.match(x.name))


def _listed(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def check_output_dir(folder: str | Path, *, overwrite: bool = False) -> None:
    """The folder can take a run: a fresh folder (absent, empty, or holding only what a run writes) or a folder holding
    a run, reachable (no dangling or looping link on the way), creatable and writable; with ``overwrite``, one that
    can be moved aside. Raises RunFolderError; reads only."""
    if str(folder).strip() == "":
        raise RunFolderError("log.output_dir is empty; give a folder for the run, e.g. log.output_dir=out/my_run")
    p = Path(folder)
    existing = p
    while True:
        try:
            if existing.is_symlink() and not existing.exists():
                try:
                    target = os.readlink(existing)
                except OSError:
                    target = "?"
                why = "loops" if _loops(existing) else f"points to {target}, which does not exist"
                raise RunFolderError(f"log.output_dir {p}: {existing} is a symbolic link that {why}; fix the link or "
                                     "choose another log.output_dir")
            if existing.exists():
                break
        except OSError as exc:
            raise RunFolderError(f"log.output_dir {p}: {existing} cannot be reached ({exc.strerror or exc}); choose another "
                                 "log.output_dir") from None
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing == p and not p.is_dir():
        raise RunFolderError(f"log.output_dir {p} is a file, not a folder; choose another log.output_dir")
    if not existing.is_dir():
        raise RunFolderError(f"log.output_dir {p}: {existing} is a file, not a folder; choose another log.output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"log.output_dir {p}: {existing} is not writable; choose another log.output_dir")
    # a folder holding a run is a run folder (what was added beside the run, an evaluation or a merged model, stays);
    # any other folder must be fresh: a new run never spreads its files among someone else's
    foreign = foreign_contents(p) if not run_contents(p) else []
    if foreign:
        raise RunFolderError(
            f"log.output_dir {p} holds files no run wrote ({_listed(foreign)}): a run writes only into a fresh folder or "
            "its own run folder; choose another log.output_dir (e.g. a new subfolder)"
        )
    escaped = links_out_of(p) if not overwrite else []  # --overwrite moves the links aside, never follows them
    if escaped:
        name, target = escaped[0]
        raise RunFolderError(f"log.output_dir {p}: {name} is a symbolic link to {target}, outside the run folder; a run never "
                             "follows a link out of its folder (it would resume, write over or delete another run's files): "
                             "remove the link (or copy what it points to into the folder)")
    if overwrite and run_contents(p):
        real, cwd = Path(os.path.realpath(p)), Path(os.path.realpath(os.getcwd()))
        if real == cwd or real in cwd.parents:
            raise RunFolderError(f"--overwrite: log.output_dir {p} is (or holds) the current directory and cannot be moved "
                                 "aside; run from another directory or choose another log.output_dir")


def _is_run_name(name: str) -> bool:
    """A name a run writes, reads or resumes from in its folder."""
    return (name in OWN_NAMES or name in RUN_LOGS or bool(_NAME.match(name))
            or name.startswith((".tmp-checkpoint-", ".old-checkpoint-", "superseded-")))


def links_out_of(folder: str | Path) -> list[tuple[str, str]]:
    """(name, where it leads) of each entry of a run folder (a log, a checkpoint...) that resolves, through symbolic
    links, outside the folder: a run would write into or resume from another run's files through it."""
    p = Path(folder)
    if not p.is_dir():
        return []
    real = Path(os.path.realpath(p))
    try:
        entries = [x for x in p.iterdir() if _is_run_name(x.name) and x.is_symlink()]
    except OSError:
        return []
    out = []
    for x in sorted(entries):
        target = Path(os.path.realpath(x))
        if real not in target.parents:
            out.append((x.name, str(target)))
    return out


def _loops(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def claim_run_folder(folder: str | Path, *, resume: bool, overwrite: bool = False) -> RunLock:
    """Lock ``folder`` for this run. A folder already holding a run is refused unless ``resume`` (continue
    it) or ``overwrite`` (move the old run aside to ``<folder>.old-<time>``, never deleted; through a link, the
    folder it points to is moved and the link is kept). Folders it creates are listed in the lock's ``created``
    (``release(cleanup=True)`` removes them again if still empty: a run refused later leaves nothing)."""
    folder = Path(folder)
    check_output_dir(folder, overwrite=overwrite and not resume)
    created = []
    q = folder
    while not q.exists() and q.parent != q:
        created.append(q)
        q = q.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a folder that refuses new entries though writable to access(2): /proc, /sys
        for d in created:
            try:
                d.rmdir()
            except OSError:
                pass
        raise RunFolderError(f"log.output_dir {folder} cannot be created ({exc.strerror or exc}); choose another "
                             "log.output_dir") from None
    lock = RunLock.acquire(folder)
    lock.created = created
    found = run_contents(folder)
    if found and not resume:
        if not overwrite:
            lock.release()
            raise RunFolderError(
                f"log.output_dir {folder} already holds a run ({_listed(found)}); continue it with --resume latest, choose "
                "another log.output_dir, or pass --overwrite to move the old run aside (it is not deleted)"
            )
        real = Path(os.path.realpath(folder))  # through a link: the run is moved, the link stays
        aside = _aside_name(real)
        os.rename(real, aside)  # the lock moves with the folder: nobody can start in it meanwhile
        lock.folder = aside
        lock.release()
        log.warning("moved the previous run in %s aside to %s", folder, aside)
        real.mkdir(parents=True)
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


def save_checkpoint(output_dir: str | Path, step: int, *, peft_model, state: dict, recipe_text: str, keep: int,
                    base: dict | None = None) -> Path:
    """Write checkpoint-``step`` atomically and verifiably; keep the newest ``keep`` checkpoints. ``base``: the
    base model's identity (``base_identity``), written as base.json so that a resume can check it. A write that
    fails (no space left, a file-size limit) raises CheckpointError naming the folder and the step; the
    temporary folder is removed and the previous checkpoints are untouched."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    for leftover in [*out.glob(".tmp-checkpoint-*"), *out.glob(".old-checkpoint-*")]:  # of a killed save or delete
        shutil.rmtree(leftover, ignore_errors=True)  # (the folder's lock makes this process its only writer)
    try:
        tmp.mkdir()
        peft_model.save_pretrained(str(tmp / "adapter"))
        with open(tmp / STATE_FILE, "wb") as f:  # through a Python file: a failed write keeps its errno
            torch.save(state, f)
        (tmp / "recipe.yaml").write_text(recipe_text)
        if base is not None:
            (tmp / BASE_FILE).write_text(json.dumps(base, indent=1))
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
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(out)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no checkpoint of this run was saved before"
        why = write_problem(exc, out)
        raise CheckpointError(f"cannot save checkpoint-{step} at step {step}: {why}; {kept}. Free space (or raise the limit), "
                              "then continue with --resume latest") from exc
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
    real = Path(os.path.realpath(p))
    for name, want in files.items():
        f = p / name
        if real not in Path(os.path.realpath(f)).parents:  # a link (or a "../" name) out of the checkpoint
            raise CheckpointError(f"{f} leads outside the checkpoint (to {os.path.realpath(f)}); a checkpoint holds its own "
                                  "files, and links out of it are not followed: use another checkpoint")
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        size = f.stat().st_size
        if size != want["size"]:
            raise CheckpointError(f"{f} has {size} bytes, {want['size']} were written: the file is damaged")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{f} does not match the checksum written with it: the file is damaged")
    check_finite_adapter(p / "adapter")


def check_finite_adapter(adapter: str | Path) -> None:
    """CheckpointError when the adapter's weights (safetensors) are unreadable or hold a non-finite value."""
    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        return
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights} cannot be read ({type(exc).__name__}: {str(exc)[:160]}): the file is damaged") from None
    bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors.values() if t.is_floating_point())
    if bad:
        raise CheckpointError(f"{weights} holds {bad} non-finite values (inf/nan): the run had diverged when it was saved")


def unfinished_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders without ``COMPLETE`` (their save did not finish), newest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name)) and not (p / DONE_FILE).is_file()]
    return [p for _, p in sorted(found, reverse=True)]


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """``latest`` -> the newest checkpoint in output_dir that verifies (damaged or unfinished ones are skipped with
    a warning); else the given checkpoint folder, which must verify. Raises CheckpointError."""
    if resume == "latest":
        escaped = [(name, target) for name, target in links_out_of(output_dir) if _NAME.match(name)]
        if escaped:
            raise CheckpointError(f"--resume latest: {escaped[0][0]} in {output_dir} is a symbolic link to {escaped[0][1]}, "
                                  "outside the run folder; links out of a run folder are not followed: remove it")
        complete = list_checkpoints(output_dir)
        newest = int(complete[-1].name.split("-")[1]) if complete else -1
        for p in unfinished_checkpoints(output_dir):
            if int(p.name.split("-")[1]) > newest:
                log.warning("skipping checkpoint %s: it has no %s marker (its save did not finish)", p.name, DONE_FILE)
        for p in reversed(complete):
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


def check_resume_source(resume: str, output_dir: str | Path) -> None:
    """``--resume PATH`` of a checkpoint outside ``output_dir`` continues that run only into a fresh folder: into
    a folder holding a run of its own it would mix the two runs' logs and checkpoints. Raises RunFolderError."""
    if resume == "latest":
        return
    source = Path(os.path.realpath(resume)).parent
    if source == Path(os.path.realpath(output_dir)):
        return
    found = run_contents(output_dir)
    if found:
        raise RunFolderError(
            f"--resume {resume} is a checkpoint of the run in {source}, but log.output_dir {output_dir} holds another run "
            f"({_listed(found)}): resuming would mix the two. Continue that run in its own folder (log.output_dir={source}) "
            f"or in a fresh log.output_dir, or continue the run in {output_dir} with --resume latest"
        )


def set_aside_later_checkpoints(output_dir: str | Path, step: int) -> Path | None:
    """Resuming from step ``step`` replays the steps after it: the checkpoints of those steps belong to the run's
    abandoned future (``--resume latest`` would pick them). They are moved into ``superseded-<time>/`` in the run
    folder (not deleted); returns that folder, or None when there were none."""
    out = Path(output_dir)
    later = [p for p in [*list_checkpoints(out), *unfinished_checkpoints(out)] if int(p.name.split("-")[1]) > step]
    if not later:
        return None
    aside = out / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while aside.exists():
        aside = out / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    aside.mkdir()
    for p in later:
        os.rename(p, aside / p.name)
    log.warning("resuming from step %d: the later checkpoints (%s) belong to the steps being replayed; moved to %s",
                step, ", ".join(sorted(p.name for p in later)), aside)
    return aside


# ------------------------------------------------------------------------------------ base identity


def model_folder(name_or_path: str) -> Path | None:
    """The local folder holding a model's config.json: a local path, a tiny model's folder, or a hub id's cached
    snapshot; None when there is none (yet)."""
    for prefix in ("tiny-base:", "tiny:"):
        if name_or_path.startswith(prefix):
            name_or_path = name_or_path[len(prefix):]
    p = Path(os.path.expanduser(name_or_path))
    if (p / "config.json").is_file():
        return p
    if p.exists() or name_or_path.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # noqa: BLE001 -- an id the hub library rejects has no cache
        return None
    return Path(found).parent if isinstance(found, str) else None


def base_identity(name_or_path: str) -> dict | None:
    """``{"name": ..., "fingerprint": ...}`` of a base model, or None when it is not on disk. The fingerprint
    hashes its config.json (less its own name and the writing library's version), the names and sizes of its
    weight files and 64 blocks of 4 KiB spread over each (two bases of one architecture differ there); a few ms."""
    folder = model_folder(name_or_path)
    if folder is None:
        return None
    h = hashlib.sha256()
    try:
        config = json.loads((folder / "config.json").read_text())
        if isinstance(config, dict):
            for volatile in ("_name_or_path", "transformers_version"):
                config.pop(volatile, None)
        h.update(json.dumps(config, sort_keys=True).encode())
        for f in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")]):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                for i in range(64):
                    fh.seek(size * i // 64)
                    h.update(fh.read(4096))
    except (OSError, ValueError):
        return None
    return {"name": name_or_path, "fingerprint": h.hexdigest()[:32]}


def checkpoint_base(path: str | Path) -> dict | None:
    """The base identity a checkpoint recorded (None for checkpoints written before it was recorded)."""
    f = Path(path) / BASE_FILE
    try:
        found = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and isinstance(found.get("fingerprint"), str) else None


def load_state(path: str | Path) -> dict:
    """The trainer state of a checkpoint; only tensors and plain types are accepted (no code can run)."""
    f = Path(path) / STATE_FILE
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- unpickling fails in many ways; all mean "not a usable state"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{f} cannot be loaded safely ({type(exc).__name__}: {first[:200]})") from exc


_write_problem = write_problem  # (merge and eval name it so)
