"""In the repository root the name ``kernels`` is the pip package's, in any import order (issue #20).

A notebook or script in a clone that imports transformers before anything of ours must work, and our Triton head
must still import and agree with its reference afterwards. Run in a subprocess from the repository root, as a
user's ``python`` there would be.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.util, pathlib, sys
root = pathlib.Path.cwd().resolve()
assert sys.path[0] in ("", str(root)), sys.path[0]  # the repository root is searched first, as in a notebook there

from transformers import Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration  # before anything of ours
import transformers.activations  # transformers >= 5.25 imports pip's `kernels` here

spec = importlib.util.find_spec("kernels")
if spec is not None and spec.origin is not None:  # a regular package answers: it must be pip's, not our folder
    assert pathlib.Path(spec.origin).resolve().parent != root / "kernels", spec.origin
    import kernels
    assert pathlib.Path(kernels.__file__).resolve().parent != root / "kernels"

import torch
import lowmem_vt
from lowmem_vt.kernels.chunked_logprobs import chunked_logprobs_reference
from lowmem_vt.kernels.head import token_logprobs

g = torch.Generator().manual_seed(0)
hidden = torch.randn(7, 16, generator=g)
weight = torch.randn(40, 16, generator=g)
targets = torch.randint(0, 40, (7,), generator=g)
ref = chunked_logprobs_reference(hidden, weight, targets)
for backend in ("triton_fused_linear", "triton_streaming"):
    got = token_logprobs(hidden[None], weight, targets[None], backend=backend)[0]
    err = (got - ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref.abs().max().item()), (backend, err)
config = Qwen2VLForConditionalGeneration.config_class(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=64, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
    vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, in_chans=3, patch_size=14),
)
model = Qwen2VLForConditionalGeneration(config).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
print("OK")
"""


def test_transformers_first_then_our_triton_head_in_the_repository_root():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


def test_the_kernels_folder_is_not_a_regular_package():
    # the whole fix: a regular package `kernels` in the root would shadow pip's in every import order
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "lowmem_vt" / "kernels").resolve() == (ROOT / "kernels").resolve()
