"""Whether bitsandbytes' NF4 layers run on this machine's CPU (its CPU backend differs between CPUs)."""

import torch


def nf4_on_cpu() -> bool:
    try:
        import bitsandbytes as bnb

        w = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4")
        w.load_state_dict(torch.nn.Linear(64, 64).state_dict())
        w = w.to("cpu")
        return bool(torch.isfinite(w(torch.randn(2, 64, dtype=torch.bfloat16))).all())
    except Exception:  # noqa: BLE001 -- any failure means: no usable CPU NF4 here
        return False
