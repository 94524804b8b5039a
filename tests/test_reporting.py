"""log.report_to: the same per-step metrics and the sample completions reach TensorBoard (read back from the
event files) and W&B (offline mode, read back from its run files); a resumed run does not duplicate steps."""

import json

import pytest

from lowmem_vt.config import ConfigError
from lowmem_vt.metrics import read_metrics
from lowmem_vt.preflight import PreflightError
from lowmem_vt.reporting import check_reporters
from lowmem_vt.trainer import Trainer

SMALL = {"train.max_steps": 3, "train.prompts_per_step": 2, "grpo.num_generations": 4, "train.micro_batch_size": 8,
         "grpo.max_completion_length": 4, "data.generated_samples": 8, "log.sample_every": 1, "log.save_steps": 2}


def _tensorboard_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_every_step_and_the_samples(recipe_factory):
    pytest.importorskip("tensorboard")
    cfg = recipe_factory(**SMALL, **{"log.report_to": "[tensorboard]"})
    tr = Trainer(cfg)
    tr.train()
    rows = read_metrics(tr.out / "metrics.jsonl")
    acc = _tensorboard_events(tr.out)
    tags = acc.Tags()
    for key in ("reward", "kl", "loss", "completion_length_mean", "format_rate", "accuracy", "rewards/format", "lr"):
        assert key in tags["scalars"], (key, tags["scalars"])
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["step"] for r in rows]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)
    texts = acc.Tensors("samples/text_summary")
    samples = read_metrics(tr.out / "samples.jsonl")
    assert [t.step for t in texts] == [s["step"] for s in samples] == [1, 2, 3]
    body = texts[-1].tensor_proto.string_val[0].decode()
    assert samples[-1]["completion"][:20] in body and f"reward {samples[-1]['reward']:.2f}" in body


def test_tensorboard_after_resume_has_each_step_once(recipe_factory):
    pytest.importorskip("tensorboard")
    over = {**SMALL, "train.max_steps": 4, "log.report_to": "[tensorboard]", "train.lr_scheduler": "constant"}
    tr = Trainer(recipe_factory(**over))
    tr.train(until_step=3)  # saves at 2 (save_steps) and 3 (until_step)
    ckpt2 = tr.out / "checkpoint-2"
    assert ckpt2.is_dir()
    # resume from step 2: step 3 is replayed, and the events of the first step 3 must be dropped
    tr2 = Trainer(recipe_factory(**over), resume=str(ckpt2))
    tr2.train()
    steps = [e.step for e in _tensorboard_events(tr.out).Scalars("reward")]
    assert steps == [1, 2, 3, 4]


def test_missing_reporter_is_one_clear_error_before_loading(recipe_factory, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install wandb"):
        check_reporters(["tensorboard", "wandb"])
    with pytest.raises(PreflightError, match="log.report_to.*pip install wandb"):  # before the model loads
        Trainer(recipe_factory(**{"log.report_to": "[wandb]"}))
    with pytest.raises(ConfigError, match="log.report_to"):
        recipe_factory(**{"log.report_to": "[mlflow]"})


def _wandb_history(run_dir) -> list[dict]:
    """The history rows of an offline W&B run, read from its transaction log (``run-<id>.wandb``: a 7-byte
    header, then LevelDB-log records in 32 KiB blocks, each a protobuf ``Record``), as {key: decoded value}.
    W&B's service process may still be writing the log when ``finish`` returns: read until its exit record."""
    import time

    for _ in range(120):
        rows, done = _read_wandb_log(next(run_dir.glob("run-*.wandb")).read_bytes())
        if done:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"no exit record in {run_dir} after 60 s")


def _read_wandb_log(data: bytes) -> tuple[list[dict], bool]:
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    block, pos, buf, rows, done = 32768, 7, b"", [], False
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            kind_name = rec.WhichOneof("record_type")
            if kind_name == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            done = done or kind_name == "exit"
    return rows, done


def test_wandb_offline_gets_the_metrics_and_samples(recipe_factory, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    tr = Trainer(recipe_factory(**SMALL, **{"log.report_to": "[wandb]"}))
    tr.train()
    run_id = (tr.out / "wandb_run_id").read_text().strip()
    runs = list((tr.out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, list((tr.out / "wandb").iterdir())  # offline: nothing left the machine
    history = _wandb_history(runs[0])
    rows = read_metrics(tr.out / "metrics.jsonl")
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    for key in ("reward", "kl", "loss", "accuracy", "format_rate", "rewards/format"):
        assert [h[key] for h in history] == pytest.approx([r[key] for r in rows], rel=1e-6)
    assert all(h["samples/_type"] == "table-file" and h["samples/nrows"] == h["_step"] for h in history)
    table = json.loads((runs[0] / "files" / history[-1]["samples/path"]).read_text())
    samples = read_metrics(tr.out / "samples.jsonl")
    assert table["columns"] == ["step", "answer", "reward", "completion"]
    assert [r[0] for r in table["data"]] == [1, 2, 3] and table["data"][-1][3] == samples[-1]["completion"]
