"""Memory held between steps: what a step leaves allocated once its own tensors are gone, watched for growth.

A step's own tensors (the rollout, the logits chunks, the activations, the graph) are freed when it returns; what
stays is the model, the adapter, the optimizer's state and the rollout engine's buffers, all allocated by the first
step a process runs. Held memory that keeps growing after that is a leak: a list that keeps each step's loss with
its graph, a cache keyed by prompt that never forgets. Peers lose long runs this way (EasyR1 PR#11002: vLLM's encoder
cache, ~0.25 GB a step, an OOM hundreds of steps in). The trainer logs ``mem_held_gib`` after every step (CUDA:
``torch.cuda.memory_allocated``; null on CPU) and warns once, at the step it is first seen, when the held memory grew
at each of the last ``window`` steps and by more than ``threshold`` bytes since the second step this process ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GIB = 2**30


def held_bytes(device: torch.device) -> int | None:
    """Bytes the caching allocator holds for live tensors on ``device`` (CUDA), None elsewhere."""
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device)


def device_capacity(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


@dataclass
class HeldMemoryWatch:
    """Feeds on (step, held bytes) after each step; ``add`` returns the warning's text once, when growth is seen."""

    window: int = 5  # steps in a row that each held more than the one before
    threshold: int = 256 * 2**20  # and the growth since the second step, bytes (allocator rounding is ~MiB)
    capacity: int | None = None  # the card's bytes, for the step the pace would fill it (None: not said)
    held: list[tuple[int, int]] = field(default_factory=list)
    warned: bool = False

    def add(self, step: int, held: int | None) -> str | None:
        if held is None:
            return None
        self.held.append((step, held))
        settled = self.held[1:]  # the first step allocated the optimizer's state and the engine's buffers
        if self.warned or len(settled) < self.window:
            return None
        last = settled[-self.window:]
        if not all(b > a for (_, a), (_, b) in zip(last, last[1:])):
            return None
        (first_step, first), (last_step, now) = settled[0], settled[-1]
        if now - first <= self.threshold:
            return None
        self.warned = True
        per_step = (last[-1][1] - last[0][1]) / (len(last) - 1)
        msg = (f"step {step}: the memory held between steps grew at each of the last {self.window} steps, from "
               f"{first / GIB:.2f} GiB after step {first_step} to {now / GIB:.2f} GiB after step {last_step} "
               f"({per_step / 2**20:.0f} MiB a step lately): something keeps tensors from one step to the next")
        if self.capacity:
            steps_left = max(int((self.capacity - now) // per_step), 0)
            msg += f"; at this pace the card's {self.capacity / GIB:.0f} GiB are reached around step {step + steps_left}"
        return msg + " (mem_held_gib in metrics.jsonl)"
