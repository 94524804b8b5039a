"""Checkpoints: adapter (peft format) + optimizer + scheduler + RNG + data cursor, written atomically.

A checkpoint is written into ``.tmp-checkpoint-N`` and renamed to ``checkpoint-N`` only once complete,
so a kill during a save leaves at worst a temporary folder (ignored and cleaned up) and the previous
checkpoints untouched. ``COMPLETE`` is the last file written inside it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
DONE_FILE = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, step: int, *, peft_model, state: dict, recipe_text: str, keep: int) -> Path:
    """Write checkpoint-``step`` atomically; keep the newest ``keep`` checkpoints."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    peft_model.save_pretrained(str(tmp / "adapter"))
    torch.save(state, tmp / STATE_FILE)
    (tmp / "recipe.yaml").write_text(recipe_text)
    with open(tmp / DONE_FILE, "w") as f:
        f.write(json.dumps({"step": step}))
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (e.g. interrupted right after a periodic save)
        old = out / f".old-checkpoint-{step}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    for stale in list_checkpoints(out)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and incomplete folders are ignored)."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NAME.match(p.name)
        if m and (p / DONE_FILE).is_file() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """``latest`` -> the newest complete checkpoint in output_dir; else the given checkpoint folder."""
    if resume == "latest":
        cps = list_checkpoints(output_dir)
        if not cps:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint in {output_dir}")
        return cps[-1]
    p = Path(resume)
    if not (p / DONE_FILE).is_file() or not (p / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {DONE_FILE} / {STATE_FILE})")
    return p


def load_state(path: str | Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
