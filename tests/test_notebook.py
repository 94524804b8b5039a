"""The Colab notebook runs headless, top to bottom, in its tiny offline mode (tiny model, CPU, two steps,
a generated CV-Bench-schema set): every cell of the real flow executes, the install cell skips itself."""

import json
import os
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "sat_qlora_colab.ipynb"


def test_notebook_runs_in_tiny_mode(tiny_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    # the notebook runs in a fresh folder that holds what a checkout provides: recipes/ and the tiny model
    (tmp_path / "recipes").symlink_to(NOTEBOOK.parents[1] / "recipes")
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "tiny-qwen2vl").symlink_to(tiny_dir)
    monkeypatch.setenv("LOWMEM_VT_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # kernel "python3" with argv "python": jupyter_client starts it with this interpreter (sys.executable)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    out = tmp_path / "out" / "colab"
    assert (out / "checkpoint-2" / "adapter" / "adapter_config.json").is_file()
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["n"] == 4 and results["settings"]["checkpoint"].endswith("checkpoint-2")
    assert (out / "plots" / "overview.png").stat().st_size > 0
    assert (out / "merged" / "model.safetensors").is_file() and not (out / "merged" / "adapter_config.json").exists()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot is shown
    assert any("text/markdown" in o.get("data", {}) for o in outputs)  # the results table is shown
