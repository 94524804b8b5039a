"""The loss head's check: each Triton head against the torch reference on the run's own head.

Inputs: the model's LM head weight (its real vocabulary, hidden size and dtype, on its device), random hidden
states scaled so the logits have a std of ~3 (a softmax neither flat nor one-hot), random sampled tokens, a
ragged completion mask, advantages, reference log-probs near the policy's (so the KL term acts) and, with
``grpo.num_iterations`` > 1, old log-probs. Rows are capped (``check_rows``) to keep it short and within the
memory plan. For every head: per-token log-probs, the loss, the KL sum and the gradient w.r.t. the hidden
states against the reference's (``TOLERANCES``), the no-grad log-prob pass of the reference model too; the
forward and the backward timed apart (CUDA events after a warm-up on a GPU, ``time.perf_counter`` on CPU);
the peak memory beyond the inputs (CUDA only); three repeats compared bit for bit (a race shows there).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..grpo import PAPER, LossCounts, LossVariant
from ..kernels.fused_linear import rows_per_chunk
from ..kernels.head import fused_grpo_loss, token_logprobs
from .report import PathResult


@dataclass(frozen=True)
class HeadTolerance:
    """Bounds of a fast head against the torch reference on the same inputs.

    logp: max |logp - ref| over completion tokens (nats, absolute); loss: |loss - ref| / max(1, |ref|);
    kl: |kl_sum - ref| / max(|ref|, 1e-3); grad: max |dh - ref| / max |ref| (relative to the largest entry).
    """

    logp: float
    loss: float
    kl: float
    grad: float


# Written down from tests/test_kernels.py, which bounds the heads against the reference at fp32 (CPU
# interpreter: log-probs 1e-5 relative = ~1e-4 nats at |logp| ~ 10, gradient 1e-4) and at bf16 / fp16 (GPU:
# log-probs 1e-4 relative: products of 16-bit values are exact in fp32, so they differ only by summation order;
# loss 1e-3; gradient 2e-2, the dlogits being rounded to 16 bits before the second matmul). Here with a 2-3x
# margin for other GPUs' summation orders. A head off by 1e-2 in its log-probs fails every one of them.
TOLERANCES = {
    "float32": HeadTolerance(logp=2e-4, loss=1e-4, kl=1e-3, grad=1e-3),
    "bfloat16": HeadTolerance(logp=2e-3, loss=2e-3, kl=1e-2, grad=3e-2),
    "float16": HeadTolerance(logp=2e-3, loss=2e-3, kl=1e-2, grad=3e-2),
}
# Heads whose gradient is reproducible only to rounding, by design (their forward must still be bit-identical)
REPRODUCIBLE_TO_ROUNDING = {"triton_streaming": "dh is summed with atomic adds (kernels/chunked_logprobs.py)"}
REPEATS = 3
# memory the head check may take on a GPU: the torch reference holds ~3 fp32 [rows, V] buffers (logits,
# log-softmax kept for backward, its gradient): 12 * rows * V bytes
CHECK_BYTES = 1 << 30


def check_rows(vocab: int, device: torch.device) -> int:
    """Rows (tokens) the check runs: on a GPU enough for the fused-linear head's second row chunk
    (``rows_per_chunk(V) + 64``, 496 at V = 151,936) within CHECK_BYTES for the reference; 32 on CPU."""
    if torch.device(device).type != "cuda":
        return 32
    rows = min(rows_per_chunk(vocab) + 64, CHECK_BYTES // (12 * vocab))
    return max(32, rows // 16 * 16)


def check_bytes(vocab: int, hidden: int, rows: int, dtype_bytes: int) -> int:
    """Peak bytes the head check allocates beyond the model (an estimate): the reference's three fp32 [rows, V]
    buffers or the fused-linear head's fp32 logits chunk, whichever is larger, plus [rows, H] inputs and gradients."""
    fused = min(rows, rows_per_chunk(vocab)) * vocab * 4
    return max(12 * rows * vocab, fused) + rows * hidden * (3 * dtype_bytes + 8)


@dataclass
class HeadSettings:
    """The recipe's loss settings the check runs with (beta > 0 always, so the KL path is exercised)."""

    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "grpo"
    temperature: float = 1.0
    with_old: bool = False
    variant: LossVariant = PAPER  # the recipe's loss beyond loss_type (level, delta, masks; lowmem_vt.grpo)

    @classmethod
    def from_recipe(cls, cfg) -> "HeadSettings":
        g = cfg.grpo
        return cls(beta=g.beta if g.beta > 0 else 0.04, epsilon_low=g.epsilon,
                   epsilon_high=g.epsilon if g.epsilon_high is None else g.epsilon_high, loss_type=g.loss_type,
                   temperature=g.temperature, with_old=g.num_iterations > 1, variant=LossVariant.of(g))


def fast_path_device(device: torch.device | str) -> bool:
    """Whether a Triton head on ``device`` is a fast path ``kernels: auto`` may pick: on CUDA. Elsewhere it runs in
    Triton's interpreter, a test tool: checked when named, never picked (tests patch this to exercise the
    decisions on CPU)."""
    return torch.device(device).type == "cuda"


def available_heads(device: torch.device, dtype: torch.dtype) -> tuple[list[str], str]:
    """The Triton heads that can run here, and why none can when the list is empty."""
    from ..kernels.head import TRITON_BACKENDS

    heads = [h for h in TRITON_BACKENDS if h != "triton"]
    if torch.device(device).type == "cuda":
        return heads, ""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return [], "the Triton heads need a CUDA GPU (TRITON_INTERPRET=1 runs them in Triton's interpreter, for tests)"
    if dtype == torch.bfloat16:
        return [], "Triton's interpreter misreads bf16 tensors with CPU torch: the heads are checked in fp32 / fp16 here"
    return heads, ""


def make_inputs(weight: torch.Tensor, rows: int, settings: HeadSettings, seed: int = 0) -> dict:
    """The check's inputs on the weight's device, from a private generator (the global RNG is not touched)."""
    V, H = weight.shape
    dev = weight.device
    B = 2
    T = max(1, rows // B)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        sample = weight[torch.randint(0, V, (min(V, 2048),), device=dev, generator=g)].float()
        scale = 3.0 / float(sample.pow(2).sum(1).mean().sqrt().clamp(min=1e-6))  # logits of std ~3
        hidden = (torch.randn(B, T, H, device=dev, generator=g) * scale).to(weight.dtype)
        targets = torch.randint(0, V, (B, T), device=dev, generator=g)
        lengths = torch.tensor([T, max(1, T - max(1, T // 8))], device=dev)
        mask = (torch.arange(T, device=dev)[None, :] < lengths[:, None]).float()
        from ..kernels.chunked_logprobs import chunked_logprobs_reference

        logp = chunked_logprobs_reference(hidden.view(B * T, H), weight, targets.view(-1), settings.temperature).view(B, T).float()
        ref_logp = logp + 0.1 * torch.randn(B, T, device=dev, generator=g)
        old_logp = logp + 0.05 * torch.randn(B, T, device=dev, generator=g) if settings.with_old else None
        advantages = torch.randn(B, device=dev, generator=g)
    counts = LossCounts(num_sequences=float(B), num_tokens=float(mask.sum()), max_completion_length=T)
    return dict(hidden=hidden, weight=weight, targets=targets, mask=mask, advantages=advantages, old_logp=old_logp,
                ref_logp=ref_logp, counts=counts)


class _Timer:
    """Marks on the device's timeline: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _run_once(name: str, x: dict, settings: HeadSettings, device: torch.device) -> dict:
    """One forward + backward and one no-grad log-prob pass of head ``name``; outputs and their times."""
    h = x["hidden"].detach().clone().requires_grad_(True)
    timer = _Timer(device)
    timer.mark()
    loss, stats, logp = fused_grpo_loss(
        h, x["weight"], x["targets"], x["mask"], x["advantages"], x["old_logp"], x["ref_logp"],
        beta=settings.beta, epsilon_low=settings.epsilon_low, epsilon_high=settings.epsilon_high,
        loss_type=settings.loss_type, counts=x["counts"], temperature=settings.temperature, backend=name,
        variant=settings.variant)
    timer.mark()
    loss.backward()
    timer.mark()
    ref_pass = token_logprobs(x["hidden"], x["weight"], x["targets"], settings.temperature, name)
    timer.mark()
    fwd, bwd, lp = timer.intervals()
    return {"loss": loss.detach().float(), "kl": stats["kl_sum"].detach().float(), "logp": logp.detach().float(),
            "dh": h.grad.detach(), "ref_pass": ref_pass.detach().float(), "times": (fwd, bwd, lp)}


def _errors(run: dict, ref: dict, active: torch.Tensor) -> dict:
    def max_abs(a, b):
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0

    dh, dh_ref = run["dh"].double(), ref["dh"].double()
    return {
        "logp": max(max_abs(run["logp"][active], ref["logp"][active]), max_abs(run["ref_pass"], ref["ref_pass"])),
        "loss": abs(float(run["loss"]) - float(ref["loss"])) / max(1.0, abs(float(ref["loss"]))),
        "kl": abs(float(run["kl"]) - float(ref["kl"])) / max(abs(float(ref["kl"])), 1e-3),
        "grad": float((dh - dh_ref).abs().max() / dh_ref.abs().max().clamp(min=1e-30)),
    }


def _same(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


def _finite(run: dict) -> bool:
    return all(bool(torch.isfinite(run[k]).all()) for k in ("loss", "kl", "logp", "dh", "ref_pass"))


def measure_head(name: str, x: dict, settings: HeadSettings, device: torch.device, repeats: int = REPEATS) -> tuple[dict | None, dict, str]:
    """Warm-up, then ``repeats`` timed runs of one head. Returns (the first timed run's outputs or None if it
    raised, figures, the exception text or "")."""
    figures: dict = {}
    cuda = device.type == "cuda"
    try:
        _run_once(name, x, settings, device)  # warm-up: Triton compiles, cuBLAS picks its kernels
        runs = []
        for i in range(repeats):
            if cuda and i == 0:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            runs.append(_run_once(name, x, settings, device))
            if cuda and i == 0:
                figures["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except Exception as exc:  # noqa: BLE001 -- any failure of a fast path is a verdict, not a crash
        return None, figures, f"raised {type(exc).__name__}: {_one_line(exc)}"
    fwd, bwd, lp = (statistics.median(r["times"][i] for r in runs) for i in range(3))
    figures.update(fwd_ms=fwd * 1e3, bwd_ms=bwd * 1e3, logprobs_ms=lp * 1e3, repeats=repeats)
    if not cuda:
        figures["peak_extra_mib"] = None  # not measurable on CPU
    forward_keys = ("loss", "kl", "logp", "ref_pass")
    forward_same = all(_same(r, runs[0], forward_keys) for r in runs[1:])
    grad_same = all(torch.equal(r["dh"], runs[0]["dh"]) for r in runs[1:])
    figures["bit_identical"] = forward_same and grad_same
    figures["forward_bit_identical"] = forward_same
    figures["finite"] = all(_finite(r) for r in runs)
    first = dict(runs[0])
    first["repeat_runs"] = runs
    return first, figures, ""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def check_heads(weight: torch.Tensor, heads: list[str], settings: HeadSettings, *, rows: int | None = None,
                repeats: int = REPEATS, interpreted: bool | None = None) -> list[PathResult]:
    """The torch reference and each head in ``heads`` on the same inputs; one PathResult each (reference first).

    A head passes when it does not raise, every output is finite, each error is within ``TOLERANCES`` of the
    weight's dtype, and its repeats are bit-identical (the gradient of a head in ``REPRODUCIBLE_TO_ROUNDING``:
    within the gradient tolerance). Speed is not part of passing: ``report.decide`` compares the costs.
    ``interpreted`` (default: off CUDA, i.e. Triton's interpreter) marks the heads as never to be picked by auto.
    """
    device = weight.device
    dtype_name = str(weight.dtype).replace("torch.", "")
    tol = TOLERANCES.get(dtype_name, TOLERANCES["float32"])
    rows = rows or check_rows(weight.shape[0], device)
    x = make_inputs(weight, rows, settings)
    active = x["mask"] != 0
    common = {"rows": int(x["targets"].numel()), "vocab": int(weight.shape[0]), "hidden": int(weight.shape[1]),
              "dtype": dtype_name, "tolerances": asdict(tol)}
    if interpreted is None:  # Triton's interpreter (tests): correctness checked, never a fast path
        interpreted = not fast_path_device(device)

    ref_run, ref_fig, ref_err = measure_head("torch", x, settings, device, repeats)
    reference = PathResult("kernels", "torch", reference=True, figures={**common, **ref_fig})
    if ref_run is None:
        reference.ok, reference.reason = False, ref_err
        return [reference] + [PathResult("kernels", h, ok=None, reason="the torch reference itself failed: " + ref_err)
                              for h in heads]
    reference.ok = True
    reference.cost = (ref_fig["fwd_ms"] + ref_fig["bwd_ms"] + ref_fig["logprobs_ms"]) / 1e3
    if not ref_fig["bit_identical"]:
        reference.figures["repeat_note"] = "the reference's own repeats differ (recorded, not a verdict)"
    results = [reference]
    for name in heads:
        run, fig, err = measure_head(name, x, settings, device, repeats)
        p = PathResult("kernels", name, figures={**common, **fig, "interpreted": interpreted})
        if run is None:
            p.ok, p.reason = False, err
            results.append(p)
            continue
        p.cost = (fig["fwd_ms"] + fig["bwd_ms"] + fig["logprobs_ms"]) / 1e3
        errors = _errors(run, ref_run, active)
        p.figures["errors"] = errors
        problems = [f"{k} error {v:.2e} > {getattr(tol, k):.0e}" for k, v in errors.items() if not v <= getattr(tol, k)]
        if not fig["finite"]:
            problems.insert(0, "non-finite outputs")
        if not fig["forward_bit_identical"]:
            problems.append(f"not bit-identical over {repeats} repeats (forward: loss / log-probs)")
        elif not fig["bit_identical"]:
            if name in REPRODUCIBLE_TO_ROUNDING:
                spread = max(float((r["dh"].double() - run["dh"].double()).abs().max()) for r in run["repeat_runs"])
                spread /= float(run["dh"].double().abs().max().clamp(min=1e-30))
                p.figures["repeat_note"] = f"gradient to rounding ({REPRODUCIBLE_TO_ROUNDING[name]}): spread {spread:.1e}"
                if not spread <= tol.grad:
                    problems.append(f"gradient repeats spread {spread:.2e} > {tol.grad:.0e}")
            else:
                problems.append(f"not bit-identical over {repeats} repeats (gradient): a race")
        p.ok = not problems
        p.reason = "; ".join(problems)
        results.append(p)
    return results


def recheck(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
            old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, counts: LossCounts, settings: HeadSettings,
            backend: str, max_rows: int | None = None) -> dict:
    """During training: head ``backend`` against the torch reference on (the first rows of) one real micro-batch.

    ``hidden``: [B, T, H] (detached here); the others as ``fused_grpo_loss`` takes them. At most ``max_rows``
    tokens (``check_rows``) are compared, whole completions first. Returns {"ok", "grad", "loss", "logp"}.
    """
    B, T, _ = hidden.shape
    rows = max_rows or check_rows(weight.shape[0], hidden.device)
    t = min(T, rows)
    b = max(1, min(B, rows // t))

    def cut(v):
        return None if v is None else v[:b, :t]

    x = dict(hidden=hidden.detach()[:b, :t], weight=weight, targets=targets[:b, :t], mask=mask[:b, :t],
             advantages=advantages[:b], old_logp=cut(old_logp), ref_logp=cut(ref_logp), counts=counts)
    runs = {name: _run_once(name, x, settings, hidden.device) for name in (backend, "torch")}
    errors = _errors(runs[backend], runs["torch"], x["mask"] != 0)
    tol = TOLERANCES.get(str(weight.dtype).replace("torch.", ""), TOLERANCES["float32"])
    ok = _finite(runs[backend]) and all(v <= getattr(tol, k) for k, v in errors.items())
    return {"ok": ok, **errors, "tolerance": asdict(tol)}
