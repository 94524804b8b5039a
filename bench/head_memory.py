"""Memory of every loss-head path at B 8 x T 1024, simulated on fake tensors (CPU, no GPU, seconds): the markdown
table of kernels/README.md and README.md.

    python bench/head_memory.py

Each cell is ``lowmem_vt.simulate.head_memory``: the peak above the inputs over forward and backward (the LM head
frozen, as under LoRA), and in brackets its vocabulary-sized part, which the 0.25 GiB scratch budget
(``fused_linear.SCRATCH_BYTES``) bounds; tests/test_head_scratch.py checks both.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # nothing is launched; the kernels' modules import without CUDA

from lowmem_vt.simulate import HEAD_PATHS, head_memory  # noqa: E402

# a model of each vocabulary: Qwen2-VL-2B (the paper's), Qwen3.5-4B, Gemma 3 4B
MODELS = ((151_936, 1536), (248_320, 2560), (262_144, 2560))
HEADS = ("triton_fused_linear", "triton_streaming")


def main() -> int:
    gib = 2**30
    print("| head | path | " + " | ".join(f"V {v:,} (H {h})" for v, h in MODELS) + " |")
    print("|---|---|" + "---:|" * len(MODELS))
    for head in HEADS:
        for path in HEAD_PATHS:
            cells = [head_memory(path, head, v, h) for v, h in MODELS]
            print(f"| `{head}` | {path} | " + " | ".join(f"{m.held / gib:.3f} ({m.vocab / gib:.3f})" for m in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
