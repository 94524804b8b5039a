"""A loss head with the fused-linear head's rounding, in plain torch, and the faults the checks must catch.

The Triton heads cannot run in bf16 on CPU (Triton's interpreter misreads bf16), so the bf16 (and fp16) fault
tests run this stand-in instead: fp32 logits of the 16-bit inputs (products exact, as cuBLAS with fp32 output),
``(onehot - softmax) / temperature`` rounded to the weight's dtype (as the row kernel writes it), dh = dlogp *
(dlogits @ W) in fp32 rounded to the hidden states' dtype, dW = dlogits.T @ (h * dlogp) with the 16-bit rounding
of h * dlogp (``kernels/fused_linear.py``). Its clean errors are what a correct 16-bit head has.

Faults (``FAULTS``): ``grad`` dh x 1.01; ``dw`` dW x 1.01; ``kl`` the KL term dropped from the loss and the
gradient (the reported KL unchanged); ``temperature`` the temperature ignored (logits not divided).
"""

from __future__ import annotations

import torch

from lowmem_vt.grpo import grpo_loss

FAULTS = ("grad", "dw", "kl", "temperature")


class _ContractHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, advantages, old_logp, ref_logp, temperature, kwargs, fault):
        B, T, H = hidden.shape
        h = hidden.detach().reshape(B * T, H)
        t = 1.0 if fault == "temperature" else float(temperature)
        logits = (h.float() @ weight.detach().float().T) / t
        lse = torch.logsumexp(logits, dim=1)
        flat_targets = targets.reshape(B * T)
        logp = (logits.gather(1, flat_targets[:, None]).squeeze(1) - lse).view(B, T)
        with torch.enable_grad():
            lp = logp.detach().requires_grad_(True)
            loss, stats = grpo_loss(lp, mask, advantages, old_logp, ref_logp, **kwargs)
            if fault == "kl":
                loss, _ = grpo_loss(lp, mask, advantages, old_logp, ref_logp, **{**kwargs, "beta": 0.0})
            dlogp = torch.autograd.grad(loss, lp, allow_unused=True)[0]
        dlogp = torch.zeros_like(logp) if dlogp is None else dlogp.reshape(B * T)
        probs = torch.softmax(logits, dim=1)
        onehot = torch.zeros_like(probs).scatter_(1, flat_targets[:, None], 1.0)
        dlogits = ((onehot - probs) / t).to(weight.dtype)
        dh = (dlogits.float() @ weight.detach().float()) * dlogp[:, None]
        peak = dlogp.abs().max().clamp(min=1e-30)
        dw = (dlogits.float().T @ (h.float() * (dlogp / peak)[:, None]).to(h.dtype).float()) * peak
        if fault == "grad":
            dh = dh * 1.01
        if fault == "dw":
            dw = dw * 1.01
        ctx.save_for_backward(dh.view(B, T, H), dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss.detach(), stats["kl_sum"], logp.detach()

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_logp):
        dh, dw = ctx.saved_tensors
        return (dh * grad_loss).to(ctx.dtypes[0]), (dw * grad_loss).to(ctx.dtypes[1]), *([None] * 8)


def contract_head(hidden, weight, targets, mask, advantages, old_logp, ref_logp, *, counts, temperature=1.0,
                  fault: str | None = None, **loss_kwargs):
    """``fused_grpo_loss``'s contract (loss, stats, logp) computed as described above, with ``fault``."""
    if fault not in (None, *FAULTS):
        raise ValueError(f"unknown fault {fault!r}")
    kwargs = dict(loss_kwargs, counts=counts)
    loss, kl, logp = _ContractHead.apply(hidden, weight, targets, mask, advantages, old_logp, ref_logp, temperature, kwargs, fault)
    return loss, {"kl_sum": kl.detach()}, logp


def contract_logprobs(hidden, weight, targets, temperature=1.0, fault: str | None = None):
    """The no-grad log-prob pass under the same contract (the temperature fault applies here too)."""
    t = 1.0 if fault == "temperature" else float(temperature)
    B, T, H = hidden.shape
    logits = (hidden.reshape(B * T, H).float() @ weight.float().T) / t
    return (logits.gather(1, targets.reshape(B * T, 1)).squeeze(1) - torch.logsumexp(logits, dim=1)).view(B, T)


def install(monkeypatch, module, faults: dict[str, str | None]) -> None:
    """Make ``module``'s ``fused_grpo_loss`` and ``token_logprobs`` (e.g. ``lowmem_vt.selfcheck.head``) run the
    contract head for the backends in ``faults`` (value: the fault, or None for a clean head); torch stays real."""
    real_loss, real_logprobs = module.fused_grpo_loss, module.token_logprobs

    def loss_impl(hidden, weight, targets, mask, advantages, old_logp, ref_logp, *, backend, **kwargs):
        if backend not in faults:
            return real_loss(hidden, weight, targets, mask, advantages, old_logp, ref_logp, backend=backend, **kwargs)
        return contract_head(hidden, weight, targets, mask, advantages, old_logp, ref_logp, fault=faults[backend], **kwargs)

    def logprobs_impl(hidden, weight, targets, temperature=1.0, backend="triton", **kwargs):
        if backend not in faults:
            return real_logprobs(hidden, weight, targets, temperature, backend, **kwargs)
        return contract_logprobs(hidden, weight, targets, temperature, faults[backend])

    monkeypatch.setattr(module, "fused_grpo_loss", loss_impl)
    monkeypatch.setattr(module, "token_logprobs", logprobs_impl)
