"""Run by torchrun / accelerate launch in tests/test_distributed.py: train with the real Trainer (resuming the
newest checkpoint when LOWMEM_RESUME=latest), then dump this rank's adapter."""

import os
import sys

import torch

from lowmem_vt.config import load_config
from lowmem_vt.trainer import Trainer

recipe, out_dump, *overrides = sys.argv[1:]
torch.set_num_threads(1)
cfg = load_config(recipe, overrides)
tr = Trainer(cfg, resume=os.environ.get("LOWMEM_RESUME"))
tr.train()
state = {n: p.detach().cpu() for n, p in tr.lm.peft_model.named_parameters() if p.requires_grad}
torch.save({"adapter": state, "rank": tr.dist.rank, "world": tr.dist.world_size}, f"{out_dump}.rank{tr.dist.rank}.pt")
