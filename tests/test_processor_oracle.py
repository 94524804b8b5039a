"""Our input builder against transformers' processor (issue #26): ``bench/processor.py``, the GPU check's
``processor`` stage, run in every suite on the versions at hand, and shown to fail on a builder that is wrong.

Here (no torchvision) transformers' processor class runs around the PIL image processor, so the ids, image-token
mask, grid and M-RoPE positions are compared with transformers' own expansion and ``get_rope_index``; the
fast (torchvision) image processor is compared on the GPU machine, where ``AutoProcessor`` builds it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import processor as processor_stage  # noqa: E402

from lowmem_vt.families import FAMILIES, family_named  # noqa: E402
from lowmem_vt.inputs import InputBuilder  # noqa: E402


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_our_inputs_equal_transformers_processor(tmp_path, model_type):
    fam = processor_stage.compare_family(model_type, tmp_path, smoke=True, fault=False)
    assert len(fam["rows"]) == 3 and all(not r["failed"] for r in fam["rows"]), fam["rows"]
    assert fam["ours"] == "Qwen2VLImageProcessorPil" and fam["theirs"]  # each side's class, named
    if importlib.util.find_spec("torchvision") is None:
        assert "NOT compared" in fam["note"]  # the torchvision path: said, not implied


def _swap_height_width(right):
    def positions(self, types, grid, config):
        pos, nxt = right(self, types, grid, config)
        return pos[[0, 2, 1]], nxt

    return positions


def _off_by_one(right):
    def positions(self, types, grid, config):
        pos, nxt = right(self, types, grid, config)
        return pos, nxt + 1

    return positions


def _grid_height_width_swapped(right):
    def encode_image(self, images):
        pixel_values, grid = right(self, images)
        return pixel_values, grid[:, [0, 2, 1]]

    return encode_image


@pytest.mark.parametrize("fault, differs", [
    ("height and width axes of the image positions swapped", {"M-RoPE positions"}),
    ("first completion position off by one", {"next position"}),
    ("image grid read as (t, w, h)", {"image_grid_thw", "M-RoPE positions"}),
])
def test_a_wrong_builder_fails_the_comparison(tmp_path, monkeypatch, fault, differs):
    family = type(family_named("qwen2_vl"))
    if fault.startswith("height"):
        monkeypatch.setattr(family, "positions", _swap_height_width(family.positions))
    elif fault.startswith("first"):
        monkeypatch.setattr(family, "positions", _off_by_one(family.positions))
    else:
        monkeypatch.setattr(InputBuilder, "encode_image", _grid_height_width_swapped(InputBuilder.encode_image))
    fam = processor_stage.compare_family("qwen2_vl", tmp_path, smoke=True, fault=False)
    for row in fam["rows"]:
        assert set(row["failed"]) >= differs, (fault, row)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_without_torchvision_the_stage_fails_unless_rehearsing(tmp_path):
    """On the GPU machine (no --smoke) AutoProcessor must build: a machine without torchvision fails the stage."""
    run = subprocess.run([sys.executable, "bench/processor.py", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT / "bench")})
    assert run.returncode == 1 and "Torchvision" in run.stderr, run.stderr[-2000:]
