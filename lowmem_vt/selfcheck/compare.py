"""One comparison primitive for every numeric check: the exact answer in float64 from the same inputs, the
relative error of each candidate against it, and a bound derived from the reference path's own error there.

Why not constants: in 16-bit the torch reference itself is off from the exact answer by the rounding of its
outputs (dh is rounded to bf16: ~2e-3 relative), and a bound written down "with margin" sat ~100x above that
noise, so a head with a 1 % gradient error or without its KL term passed (issue 26). Here every quantity is
judged as ``error(ours) <= MULTIPLE * max(error(torch), minimum)``, both errors measured against float64 on the
same 16-bit inputs, in relative norm (``rel_err``). ``minimum`` keeps the bound above zero where the torch path is
exact to within float32's own rounding (loss, log-probs and KL are computed in fp32 from exact 16-bit products);
it is a few float32 ulps scaled by the terms summed, never a tolerance on 16-bit rounding.

``exact_head`` is the loss head in float64, streamed over the vocabulary (no [rows, V] buffer beyond one block,
no float64 copy of W): loss, KL, per-token log-probs, dh and the rows of dW for a given set of vocabulary ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The bound is MULTIPLE x the torch path's own error. Chosen from measurements (docs/selfcheck.md, "fault table"):
# a correct 16-bit head is within 1.0-1.6x of the torch path (its dlogits are rounded to 16 bits as well as its
# output), a 1 % fault is >= 4.5x in bf16 and >= 30x in fp16.
MULTIPLE = 3.0
# float32's unit roundoff: the smallest error the fp32 parts (logits, log-softmax, loss) can be asked for
FP32_EPS = 2.0**-24


def rel_err(x: torch.Tensor, exact: torch.Tensor) -> float:
    """||x - exact|| / ||exact|| in float64 (Frobenius). An exact zero: ||x|| itself."""
    x, exact = x.detach().double(), exact.detach().double()
    if x.shape != exact.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(exact.shape)}")
    diff = float(torch.linalg.vector_norm(x - exact))
    ref = float(torch.linalg.vector_norm(exact))
    if not math.isfinite(diff):
        return math.inf
    return diff / ref if ref > 0 else diff


def fp32_minimum(terms: int) -> float:
    """The error below which no fp32 computation summing ``terms`` values can be held: 4 eps sqrt(terms)."""
    return 4.0 * FP32_EPS * math.sqrt(max(1, terms))


@dataclass
class Judged:
    """One quantity's verdict: our error, the torch path's (the noise floor), the bound drawn from it."""

    quantity: str
    error: float
    floor: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    @property
    def margin(self) -> float:
        """bound / error: > 1 passes; how far a clean path is from failing."""
        return math.inf if self.error == 0 else self.bound / self.error

    def describe(self) -> str:
        return f"{self.quantity} error {self.error:.2e} > {self.bound:.1e} ({MULTIPLE:g}x the torch path's {self.floor:.1e})"

    def as_dict(self) -> dict:
        return {"error": self.error, "floor": self.floor, "bound": self.bound, "margin": self.margin}


def judge(errors: dict[str, float], floors: dict[str, float], minimums: dict[str, float], multiple: float = MULTIPLE) -> list[Judged]:
    """Each quantity of ``errors`` against ``multiple`` x max(its floor, its minimum)."""
    return [Judged(k, v, floors[k], multiple * max(floors[k], minimums.get(k, 0.0))) for k, v in errors.items()]


# ------------------------------------------------------------------------------------------ the exact head


def dw_rows(vocab: int, targets: torch.Tensor, extra: int = 1024, seed: int = 0) -> torch.Tensor:
    """The vocabulary ids whose dW rows a check compares: every target id (the rows with the large entries) and
    ``extra`` others drawn at random (the softmax part); all of them when the vocabulary is small. Sorted, long."""
    device = targets.device
    if vocab <= 2 * extra + targets.numel():
        return torch.arange(vocab, device=device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    picks = torch.randint(0, vocab, (extra,), generator=g).to(device)
    return torch.unique(torch.cat([targets.reshape(-1), picks]))


def exact_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
               advantages: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, *,
               temperature: float, loss_fn, rows: torch.Tensor | None = None, block_v: int = 8192) -> dict:
    """The loss head in float64 on the given (16-bit or fp32) inputs, as ``fused_grpo_loss`` defines it.

    hidden: [B, T, H]; weight: [V, H]; targets, mask: [B, T]; advantages: [B]; old_logp, ref_logp: [B, T] or None.
    ``loss_fn(logp, mask, advantages, old_logp, ref_logp, entropy) -> (loss, stats)``: the per-token loss and its
    aggregation (``lowmem_vt.grpo.grpo_loss`` with the recipe's settings), run in float64 on [B, T] tensors;
    ``entropy``: each token's entropy (detached, as the entropy mask takes it).
    ``rows``: vocabulary ids of dW to return (``dw_rows``); None: no dW.
    Returns float64 tensors: loss (0-dim), kl (0-dim, ``kl_sum``), logp [B, T], entropy [B, T], dh [B, T, H],
    dw [len(rows), H].

    Two streams over W in blocks of ``block_v`` rows: log-sum-exp and the target logits; then, with
    g = d loss / d logp from autograd on the [B, T] loss, dlogits = g (onehot - softmax) / temperature per block,
    dh += dlogits @ W_block and dW[rows in block] = dlogits[:, rows].T @ h.
    """
    B, T, H = hidden.shape
    V = weight.shape[0]
    h = hidden.detach().reshape(B * T, H).double()
    tgt = targets.reshape(B * T)
    inv_t = 1.0 / float(temperature)
    running_max = torch.full((B * T,), -math.inf, dtype=torch.float64, device=h.device)
    running_sum = torch.zeros(B * T, dtype=torch.float64, device=h.device)
    running_dot = torch.zeros(B * T, dtype=torch.float64, device=h.device)  # sum of exp(l - max) * l: the entropy
    target_logit = torch.zeros(B * T, dtype=torch.float64, device=h.device)
    for v0 in range(0, V, block_v):
        logits = (h @ weight[v0 : v0 + block_v].detach().double().T) * inv_t
        block_max = logits.max(dim=1).values
        new_max = torch.maximum(running_max, block_max)
        rescale = torch.exp(running_max - new_max)
        weights = torch.exp(logits - new_max[:, None])
        running_sum = running_sum * rescale + weights.sum(1)
        running_dot = running_dot * rescale + (weights * logits).sum(1)
        running_max = new_max
        inside = (tgt >= v0) & (tgt < v0 + logits.shape[1])
        picked = logits.gather(1, (tgt - v0).clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
        target_logit = torch.where(inside, picked, target_logit)
    lse = running_max + torch.log(running_sum)
    entropy = (lse - running_dot / running_sum).view(B, T)
    logp = (target_logit - lse).view(B, T).requires_grad_(True)

    def d(x):
        return None if x is None else x.detach().double()

    with torch.enable_grad():
        loss, stats = loss_fn(logp, mask.double(), advantages.detach().double(), d(old_logp), d(ref_logp), entropy)
        (g,) = torch.autograd.grad(loss, logp, allow_unused=True)
    g = torch.zeros(B * T, dtype=torch.float64, device=h.device) if g is None else g.reshape(B * T)
    dh = torch.zeros(B * T, H, dtype=torch.float64, device=h.device)
    dw = None if rows is None else torch.zeros(rows.numel(), H, dtype=torch.float64, device=h.device)
    for v0 in range(0, V, block_v):
        w = weight[v0 : v0 + block_v].detach().double()
        probs = torch.exp(h @ w.T * inv_t - lse[:, None])
        dlogits = -probs * (g * inv_t)[:, None]
        inside = (tgt >= v0) & (tgt < v0 + w.shape[0])
        dlogits[inside, tgt[inside] - v0] += g[inside] * inv_t
        dh += dlogits @ w
        if dw is not None:
            sel = (rows >= v0) & (rows < v0 + w.shape[0])
            if bool(sel.any()):
                dw[sel] = dlogits[:, rows[sel] - v0].T @ h
    return {"loss": loss.detach(), "kl": stats["kl_sum"].detach().double(), "logp": logp.detach(), "entropy": entropy,
            "dh": dh.view(B, T, H), "dw": dw}
