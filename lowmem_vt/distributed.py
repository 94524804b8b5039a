"""Data-parallel training through torch.distributed as torchrun / ``accelerate launch`` set it up.

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; we initialise the default process
group from them (NCCL on GPUs, gloo on CPU) and wrap the policy forward in DistributedDataParallel, which
all-reduces (averages) the LoRA gradients. Nothing else crosses ranks but a few metric sums and flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # init_from_env created the process group (and so destroys it: close)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64 on CPU: exact for counts)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().tolist()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate small per-rank tensors along dim 0, in rank order. Lengths may differ between ranks
        (a rank that rejected a prompt holds fewer completions), hence objects rather than all_gather."""
        if not self.enabled:
            return t
        out: list = [None] * self.world_size
        dist.all_gather_object(out, t.detach().cpu())
        return torch.cat(out)

    def any(self, flag: bool) -> bool:
        return self.sum([float(flag)])[0] > 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group this process created. One left to interpreter exit can abort the process
        after a finished run ("terminate called without an active exception", SIGABRT: its threads are torn down
        unjoined), and the launcher then reports the run as failed."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def init_from_env(device_type: str) -> Dist:
    """The process group from torchrun/accelerate environment variables; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Dist(rank, world, local, owns)


class PolicyForward(torch.nn.Module):
    """The policy pass as one module, so DDP sees a forward and can all-reduce the LoRA gradients."""

    def __init__(self, lm):
        super().__init__()
        self.peft_model = lm.peft_model  # registered: DDP hooks the trainable LoRA parameters
        self._lm = [lm]  # not a submodule
        # frozen weights are the same on every rank and may live in host memory (model.offload_vision): DDP
        # neither broadcasts nor checks them
        self._ddp_params_and_buffers_to_ignore = [n for n, p in self.named_parameters() if not p.requires_grad]

    def forward(self, seqs, image_embeds):
        from .model import sequence_hidden

        return sequence_hidden(self._lm[0], seqs, image_embeds)


def wrap_policy(lm, d: Dist) -> torch.nn.Module:
    module = PolicyForward(lm)
    if not d.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [lm.device.index] if lm.device.type == "cuda" else None
    # the vision tower and the frozen base never get gradients; only LoRA parameters are synchronised
    return DDP(module, device_ids=ids, find_unused_parameters=False)
