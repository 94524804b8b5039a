"""One run per folder (refused without --resume, --overwrite moves the old run aside, an exclusive lock with
stale-lock takeover) and verified checkpoints (fsync order, sizes and checksums in COMPLETE, damaged ones
skipped by --resume latest, refused in one line by --resume PATH, trainer state loaded with weights_only)."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lowmem_vt import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


class FakeAdapter:
    def __init__(self, payload: bytes):
        self.payload = payload

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        from safetensors.torch import save_file

        save_file({"w": torch.frombuffer(bytearray(self.payload), dtype=torch.uint8).float()}, str(Path(path, "adapter_model.safetensors")))
        Path(path, "adapter_config.json").write_text("{}")


def _save(out, step, keep=5):
    return ckpt.save_checkpoint(out, step, peft_model=FakeAdapter(bytes([step]) * 5000), state={"step": step, "t": torch.ones(3)},
                                recipe_text="x", keep=keep)


# ------------------------------------------------------------------------------------------- run folder


def test_folder_holding_a_run_is_refused_without_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    _save(out, 1)
    with pytest.raises(ckpt.RunFolderError) as err:
        ckpt.claim_run_folder(out, resume=False)
    msg = str(err.value)
    assert "--resume latest" in msg and "--overwrite" in msg and "another log.output_dir" in msg and "\n" not in msg
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing touched
    assert not (out / ckpt.LOCK_FILE).exists()  # the refused run left no lock behind
    lock = ckpt.claim_run_folder(out, resume=True)  # resuming is allowed
    lock.release()


def test_overwrite_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    _save(out, 3)
    lock = ckpt.claim_run_folder(out, resume=False, overwrite=True)
    try:
        aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
        assert len(aside) == 1
        assert (aside[0] / "metrics.jsonl").read_text() == '{"step": 1}\n'
        ckpt.verify_checkpoint(aside[0] / "checkpoint-3")  # moved whole, still valid
        assert not ckpt.run_contents(out) and (out / ckpt.LOCK_FILE).is_file()
        assert not (aside[0] / ckpt.LOCK_FILE).exists()
    finally:
        lock.release()
    assert not (out / ckpt.LOCK_FILE).exists()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from lowmem_vt import checkpoint as ckpt
    lock = ckpt.claim_run_folder(sys.argv[1], resume=False)
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_lock_refuses_a_second_live_run_and_a_killed_runs_lock_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(ckpt.RunFolderError, match=f"in use by a live run \\(pid {proc.pid} "):
            ckpt.claim_run_folder(out, resume=True)
    finally:
        proc.kill()
        proc.wait()
    assert (out / ckpt.LOCK_FILE).is_file()  # a kill -9 leaves the file, but the kernel dropped the lock
    with caplog.at_level(logging.WARNING, logger="lowmem_vt.checkpoint"):
        lock = ckpt.claim_run_folder(out, resume=False)
    assert f"stale lock (pid {proc.pid} " in caplog.text
    assert str(os.getpid()) in (out / ckpt.LOCK_FILE).read_text()
    lock.release()


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(ckpt.RunFolderError, match="is a file"):
        ckpt.check_output_dir(f)


# ------------------------------------------------------------------------------------------ checkpoints


def test_complete_records_size_and_checksum_of_every_file(tmp_path):
    import hashlib

    cp = _save(tmp_path, 1)
    record = json.loads((cp / ckpt.DONE_FILE).read_text())
    files = {str(p.relative_to(cp)) for p in cp.rglob("*") if p.is_file() and p.name != ckpt.DONE_FILE}
    assert set(record["files"]) == files and ckpt.STATE_FILE in files
    for name, want in record["files"].items():
        data = (cp / name).read_bytes()
        assert want == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_every_file_then_the_folder_is_fsynced_before_complete(tmp_path, monkeypatch):
    events = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    real_open = open

    def recording_open(file, mode="r", *a, **k):
        if str(file).endswith(ckpt.DONE_FILE) and "w" in mode:
            events.append(("write COMPLETE", str(file)))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(ckpt.os, "fsync", recording_fsync)
    monkeypatch.setattr("builtins.open", recording_open)
    cp = _save(tmp_path, 1)
    tmp = str(tmp_path / ".tmp-checkpoint-1")
    done_at = events.index(("write COMPLETE", f"{tmp}/{ckpt.DONE_FILE}"))
    before = {p for kind, p in events[:done_at] if kind == "fsync"}
    for rel in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", ckpt.STATE_FILE, "recipe.yaml"):
        assert f"{tmp}/{rel}" in before, rel
    assert f"{tmp}/adapter" in before and tmp in before  # then the folders holding them
    after = [p for kind, p in events[done_at:] if kind == "fsync"]
    assert f"{tmp}/{ckpt.DONE_FILE}" in after and tmp in after  # COMPLETE itself, then its folder
    assert str(tmp_path) in after  # and the rename into checkpoint-1
    ckpt.verify_checkpoint(cp)


def test_resume_latest_skips_damaged_checkpoints_with_a_warning(tmp_path, caplog):
    for s in (1, 2, 3):
        _save(tmp_path, s)
    # 3: a truncated adapter (power cut after COMPLETE reached the disk, before the data did); 2: garbage state
    adapter = tmp_path / "checkpoint-3" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    (tmp_path / "checkpoint-2" / ckpt.STATE_FILE).write_bytes(b"\x00garbage" * 50)
    with caplog.at_level(logging.WARNING, logger="lowmem_vt.checkpoint"):
        assert ckpt.resolve_resume("latest", tmp_path).name == "checkpoint-1"
    assert "skipping checkpoint checkpoint-3" in caplog.text and "adapter_model.safetensors" in caplog.text
    assert "skipping checkpoint checkpoint-2" in caplog.text and ckpt.STATE_FILE in caplog.text


def test_resume_path_on_a_damaged_checkpoint_is_one_line(tmp_path):
    cp = _save(tmp_path, 1)
    (cp / ckpt.STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.resolve_resume(str(cp), tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and ckpt.STATE_FILE in msg and "damaged" in msg and "--resume latest" in msg


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_trainer_state_loads_without_running_code(tmp_path):
    """A checkpoint from someone else whose state pickles a callable: its COMPLETE is consistent (they wrote
    it), so only weights_only loading stands between it and running code."""
    marker = tmp_path / "code-ran"
    cp = _save(tmp_path, 1)
    torch.save({"step": 1, "evil": _RunsCode(str(marker))}, cp / ckpt.STATE_FILE)
    record = json.loads((cp / ckpt.DONE_FILE).read_text())
    import hashlib

    data = (cp / ckpt.STATE_FILE).read_bytes()
    record["files"][ckpt.STATE_FILE] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (cp / ckpt.DONE_FILE).write_text(json.dumps(record))
    ckpt.verify_checkpoint(cp)
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded safely"):
        ckpt.load_state(cp)
    assert not marker.exists()


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    torch.save(state, tmp_path / "s.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


# ------------------------------------------------------------------------------------------ end to end

SMALL = ["train.prompts_per_step=2", "grpo.num_generations=2", "train.micro_batch_size=4", "grpo.max_completion_length=2",
         "data.generated_samples=8", "train.max_steps=1", "log.sample_every=1"]


def test_training_twice_in_one_folder_needs_resume_or_overwrite(tiny_dir, tmp_path, capsys):
    """What `make demo` run twice does: the second run is refused, or (as the Makefile asks) replaces the first."""
    from lowmem_vt.cli import main

    out = tmp_path / "demo"
    args = ["train", "recipes/demo_tiny.yaml", f"model.name_or_path={tiny_dir}", f"log.output_dir={out}",
            "log.progress_bar=false", "log.plot=false", *SMALL]
    assert main(args) == 0
    first = (out / "metrics.jsonl").read_text()
    assert not (out / ckpt.LOCK_FILE).exists()  # released on exit
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "already holds a run" in err and len(err.splitlines()) == 1
    assert main(args + ["--overwrite"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("demo.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == first
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-1"]
    assert "--overwrite" in (ROOT / "Makefile").read_text().split("\ndemo:")[1].split("\n\n")[0]


def test_folder_of_a_run_that_failed_before_its_first_step_is_reusable(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("x: 1\n")
    (out / "metrics.jsonl").write_text("")
    ckpt.claim_run_folder(out, resume=False).release()
