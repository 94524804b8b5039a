"""Training plots: ``lowmem-vt plot`` writes a non-empty PNG per panel and an overview from a metrics.jsonl."""

import json
import math
import random

import numpy as np
import pytest
from PIL import Image

from lowmem_vt.metrics import MetricsWriter
from lowmem_vt.plot import PANELS, plot_metrics, smooth


@pytest.fixture
def metrics(tmp_path):
    """40 steps of a run that learns: rewards rise, KL grows; one step with a non-finite KL (logged as null)."""
    rng = random.Random(0)
    writer = MetricsWriter(tmp_path / "run" / "metrics.jsonl")
    for s in range(1, 41):
        acc = min(1.0, 0.2 + 0.6 * s / 40 + rng.gauss(0, 0.05))
        fmt = min(1.0, 1 - 0.9 * math.exp(-s / 8))
        writer.write({"step": s, "reward": acc + fmt, "rewards/accuracy": acc, "rewards/format": fmt, "accuracy": acc,
                      "completion_length_mean": 60 + 2 * s, "reflection_rate": 0.01 * s,
                      "kl": float("nan") if s == 7 else 0.001 * s,
                      "peak_gpu_mem_gib": 14.2 + rng.gauss(0, 0.1), "mem_held_gib": 6.1})
    writer.close()
    return writer.path


def test_plot_writes_nonempty_pngs(metrics, tmp_path):
    from lowmem_vt.cli import main

    assert main(["plot", str(metrics)]) == 0
    out = metrics.parent / "plots"
    expected = {f"{key.strip('/').replace('/', '_')}.png" for key, _ in PANELS} | {"overview.png"}
    assert {p.name for p in out.iterdir()} == expected
    for name in expected:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 300
            pixels = np.asarray(img.convert("RGB"))
        # something drawn: many distinct colors (lines, labels), not a blank canvas
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, name


def test_plot_marks_panels_without_data(metrics, tmp_path):
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    for r in rows:  # no reflection rate; GPU memory null, as on CPU
        r["other"] = r.pop("reflection_rate")
        r["peak_gpu_mem_gib"] = r["mem_held_gib"] = None
    stripped = tmp_path / "metrics.jsonl"
    stripped.write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot_metrics(stripped, tmp_path / "plots")
    assert len(written) == len(PANELS) + 1 and all(p.stat().st_size > 0 for p in written)


def test_plot_rejects_an_empty_log(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no metrics"):
        plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots")


def test_smooth_skips_missing_values():
    assert smooth([None, 1.0, None, 3.0], 0.5) == [None, 1.0, 1.0, 2.0]
