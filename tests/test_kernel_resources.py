"""Every Triton kernel compiled for every target GPU on this CPU-only machine, at every tile configuration
and in every dtype the dispatch (``lowmem_vt.kernels.head``) can launch there, within that GPU's per-block
shared memory. Registers and spills are printed (``pytest -s``) and tabulated in bench/RESULTS.md.

Results are read from ``kernels/compiled_resources.json`` (keyed by Triton's version and each kernel's
source hash; ``python -m lowmem_vt.kernels.resources`` refreshes it): only launches whose kernel or Triton
changed are compiled here, in parallel processes (212 launches from scratch: about 10 minutes on 2 busy cores).
"""

import os
import re

import pytest
import torch

from lowmem_vt.kernels.head import ARCHS, launch_config
from lowmem_vt.kernels.chunked_logprobs import Tiles

resources = pytest.importorskip("lowmem_vt.kernels.resources")

WORKERS = max(1, min(4, os.cpu_count() or 1))


@pytest.mark.parametrize("cap", sorted(ARCHS))
def test_every_launch_compiles_within_shared_memory(cap):
    name, limit = ARCHS[cap]
    launches = resources.launches(cap)
    assert {launch.dtype for launch in launches} >= set(resources.dtypes_for(cap))
    results = resources.check_launches(cap, launches, workers=WORKERS, cache=resources.load_cache())
    too_big = []
    for launch, used in results:
        print(f"sm_{cap} {launch.label()} {launch.dtype}: {used.registers} registers, {used.spill_bytes} B spilled, "
              f"{used.shared_bytes / 1024:.1f} KB shared")
        if used.shared_bytes > limit:
            too_big.append(f"{launch.label()} {launch.dtype}: {used.shared_bytes} B > {limit} B")
        assert used.registers <= 255, launch.label()
    assert not too_big, f"sm_{cap} ({name}): shared memory past the {limit // 1024} KB per block: {too_big}"


def test_dtypes_per_architecture():
    assert torch.bfloat16 not in resources.dtypes_for(75)  # the T4 runs float16
    for cap in (80, 86, 89, 90):
        assert set(resources.dtypes_for(cap)) == {torch.bfloat16, torch.float16, torch.float32}
    # an unknown newer GPU gets the 99 KB tables; an older one Turing's
    assert launch_config(120, torch.bfloat16) == launch_config(86, torch.bfloat16)
    assert launch_config(70, torch.float16) == launch_config(75, torch.float16)


def test_tiles_that_cannot_fit_are_refused():
    """The tile issue 15 found in the bench (64 x 512 x 64, 272 KB of shared memory) is refused for every
    target, with the reason; the sm_90 table's own tiles are not."""
    huge = Tiles(block_n=64, block_v=512, block_h=64, num_warps=8, num_stages=3)
    problems = resources.tile_problems(huge, huge, 90, torch.bfloat16)
    assert problems and any("shared memory" in p or "does not compile" in p for p in problems), problems
    config = launch_config(90, torch.bfloat16)
    assert resources.tile_problems(config.forward, config.backward, 90, torch.bfloat16) == []


@pytest.mark.parametrize("flags", [dict(GRPO=True, DLOGITS=True, ENTROPY=False), dict(GRPO=False, DLOGITS=True, ENTROPY=True)],
                         ids=["paper loss", "log-prob head with entropy"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_kernel_loads_every_block_before_any_warp_overwrites_it(dtype, flags):
    """The fused-linear row kernel writes 16-bit dlogits over the fp32 logits of its own row, which other warps
    read (kernels/fused_linear.py). In the PTX of its dlogits loop (the block holding the vector store of
    dlogits), a bar.sync must lie between that block's last global load and its store; the interpreter cannot
    show a race, the generated code can. Both launches that write dlogits: the paper loss's and the log-prob head's."""
    (launch,) = [l for l in resources.launches(90) if l.kernel == "grpo_rows" and l.dtype == dtype
                 and dict(l.constexprs) == {"HAS_OLD": False, "HAS_KL": False, "BLOCK_V": 2048, **flags}]
    ptx = resources.launch_ptx(launch, 90)
    blocks = re.split(r"^\$L__BB\d+_\d+:.*$", ptx, flags=re.M)
    (loop,) = [b for b in blocks if re.search(r"st\.global\.v4", b)]  # the dlogits loop: 8 x 16 bits per thread
    lines = loop.splitlines()
    last_load = max(i for i, ln in enumerate(lines) if "ld.global" in ln)
    store = min(i for i, ln in enumerate(lines) if "st.global.v4" in ln)
    assert last_load < store
    assert any("bar.sync" in ln for ln in lines[last_load:store]), "no barrier between the loads and the aliasing store"
