"""The loss head's check: each Triton head against the exact answer, bounded by the torch reference's own error.

Inputs: the model's LM head weight (its real vocabulary, hidden size and dtype, on its device), random hidden
states scaled so the logits have a std of ~3 (a softmax neither flat nor one-hot), random sampled tokens, a
ragged completion mask, advantages, reference log-probs near the policy's and, with ``grpo.num_iterations`` > 1,
old log-probs. Rows are capped (``check_rows``) to keep it short and within the memory plan.

Cases (``cases``): the recipe's settings; KL only (advantages 0: the whole gradient is the KL term's, so a head
that drops it is 100 % off); advantage only (beta 0); and, when the recipe samples at temperature 1, the same at
temperature 0.7 (a head that ignores the temperature is exact at 1); dW: the recipe's on W[:DW_VOCAB] with W
trained (the other cases keep W frozen, as under LoRA). In each case the float64 head (``compare.exact_head``) on
the same 16-bit inputs gives the exact loss, KL, log-probs, dh and (dW case) the rows of dW for the sampled ids and
1,024 others; the torch reference's relative error there is the noise floor, and each head
passes when every error is within ``compare.MULTIPLE`` x that floor (``compare.judge``). The no-grad log-prob
pass of the reference model is judged the same way. The recipe's case also times the forward and the backward
apart (CUDA events after a warm-up on a GPU, ``time.perf_counter`` on CPU), measures the peak memory beyond the
inputs (CUDA only) and compares three repeats bit for bit (a race shows there).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Collection
from dataclasses import dataclass, replace

import torch

from ..grpo import NO_CORRECTION, PAPER, LossCounts, LossVariant, SamplerCorrection, grpo_loss
from ..kernels.fused_linear import rows_per_chunk
from ..kernels.head import fused_grpo_loss, token_logprobs
from .compare import MULTIPLE, dw_rows, exact_head, fp32_minimum, judge, rel_err
from .report import PathResult


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
    buffers, or the fused-linear head's fp32 logits chunk, whichever is larger; the dW case's gradient of
    W[:DW_VOCAB] (its dtype, and the fused-linear head's fp32 copy); [rows, H] inputs and gradients."""
    fused = min(rows, rows_per_chunk(vocab)) * vocab * 4
    weight_side = min(vocab, DW_VOCAB) * hidden * (4 + dtype_bytes)
    return max(12 * rows * vocab, fused) + weight_side + rows * hidden * (3 * dtype_bytes + 8)


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
    correction: SamplerCorrection = NO_CORRECTION  # the recipe's sampler correction (``from_recipe`` resolves auto)
    # rollout auto with correction auto: the engine's correction, or none when the run falls back to hf (the engine
    # failed its check): both loss graphs can run, so both are judged (the case "without the correction")
    also_uncorrected: bool = False

    @classmethod
    def from_recipe(cls, cfg) -> "HeadSettings":
        g = cfg.grpo
        # auto is token_truncate with the engine, none with hf or vllm (Trainer.sampler_correction); rollout auto on a
        # GPU is the engine when it passes its check: the correction's graph is the one checked then
        mode = g.sampler_correction
        if mode == "auto":
            mode = "token_truncate" if cfg.rollout.backend in ("auto", "engine") else "none"
        return cls(beta=g.beta if g.beta > 0 else 0.04, epsilon_low=g.epsilon,
                   epsilon_high=g.epsilon if g.epsilon_high is None else g.epsilon_high, loss_type=g.loss_type,
                   temperature=g.temperature, with_old=g.num_iterations > 1, variant=LossVariant.of(g),
                   correction=SamplerCorrection(mode, g.sampler_correction_clip_min, g.sampler_correction_clip_max),
                   also_uncorrected=g.sampler_correction == "auto" and cfg.rollout.backend == "auto")

    def loss_kwargs(self) -> dict:
        """What ``grpo_loss`` / ``fused_grpo_loss`` take of these settings (counts and temperature apart)."""
        return dict(beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, loss_type=self.loss_type,
                    variant=self.variant, correction=self.correction)


# the temperature of the extra case when the recipe samples at 1 (where a head ignoring it is exact)
CHECK_TEMPERATURE = 0.7
# the vocabulary slice of the dW case: W's gradient (in its dtype, and the fused-linear head's fp32 copy) at the
# full vocabulary would take V x H x 6 bytes, 1.3 GiB at Qwen2-VL-2B, more than a QLoRA plan leaves; the same
# kernels on W[:DW_VOCAB] check the same code at 0.14 GiB
DW_VOCAB = 16384


@dataclass
class Case:
    """One set of inputs the heads are judged on; ``dw_rows``: the vocabulary ids of dW compared (None: W frozen,
    as under LoRA, and dW not formed)."""

    name: str
    x: dict
    settings: HeadSettings
    dw_rows: torch.Tensor | None = None


UNCORRECTED = "without the correction"


def case_names(settings: HeadSettings) -> list[str]:
    """The cases, in order: the recipe's (timed and repeated); KL only; advantage only; at temperature 1, the
    recipe's at CHECK_TEMPERATURE; with ``also_uncorrected``, the recipe's without the sampler correction (the loss
    of an hf fallback); and dW: the recipe's on the first DW_VOCAB rows of W, W trained."""
    hot = [f"temperature {CHECK_TEMPERATURE:g}"] if settings.temperature == 1.0 else []
    fallback = [UNCORRECTED] if settings.also_uncorrected and settings.correction.on else []
    return ["recipe", "KL only", "advantage only", *hot, *fallback, "dW"]


def cases(x: dict, settings: HeadSettings, only: Collection[str] | None = None) -> list[Case]:
    """The cases of ``case_names`` (those in ``only``, when given) on the recipe's inputs ``x``."""
    out = []
    recipe_logp = None  # what each case on another head is rebased from: computed once, when one is wanted
    for name in case_names(settings):
        if only is not None and name not in only:
            continue
        if name == "recipe":
            out.append(Case(name, x, settings))
        elif name == "KL only":
            out.append(Case(name, {**x, "advantages": torch.zeros_like(x["advantages"])}, settings))
        elif name == "advantage only":
            out.append(Case(name, x, replace(settings, beta=0.0)))
        elif name == UNCORRECTED:
            out.append(Case(name, x, replace(settings, correction=NO_CORRECTION)))
        else:
            if recipe_logp is None:
                recipe_logp = _logprobs(x, x["weight"], x["targets"], settings.temperature)
            if name == "dW":
                vs = min(x["weight"].shape[0], DW_VOCAB)
                sliced = _rebased(x, recipe_logp, x["weight"][:vs], x["targets"] % vs, settings.temperature)
                out.append(Case(name, sliced, settings, dw_rows(vs, sliced["targets"])))
            else:
                hot = replace(settings, temperature=CHECK_TEMPERATURE)
                out.append(Case(name, _rebased(x, recipe_logp, x["weight"], x["targets"], hot.temperature), hot))
    return out


def _logprobs(x: dict, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """The reference head's log-probs [B, T] float32 of ``x``'s hidden states on ``weight``, no grad."""
    from ..kernels.chunked_logprobs import chunked_logprobs_reference

    B, T, H = x["hidden"].shape
    with torch.no_grad():
        return chunked_logprobs_reference(x["hidden"].reshape(B * T, H), weight, targets.reshape(-1), temperature).view(B, T).float()


def _rebased(x: dict, recipe_logp: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict:
    """The inputs on another head (``weight``, ``targets``, ``temperature``), with reference (and old) log-probs as
    near the policy's there as they were to the recipe's log-probs ``recipe_logp`` [B, T] (the KL term then acts as
    in training, instead of exploding on log-ratios of several nats)."""
    shift = _logprobs(x, weight, targets, temperature) - recipe_logp
    return {**x, "weight": weight, "targets": targets,
            "ref_logp": None if x["ref_logp"] is None else x["ref_logp"] + shift,
            "old_logp": None if x["old_logp"] is None else x["old_logp"] + shift,
            "sampling_logp": None if x.get("sampling_logp") is None else x["sampling_logp"] + shift}


def minimums(hidden: int, vocab: int, rows: int) -> dict[str, float]:
    """The smallest floor of each quantity: float32's rounding over the terms it sums (``compare.fp32_minimum``):
    H for log-probs, loss and KL (fp32 logits of exact 16-bit products), V for dh, the rows for dW."""
    small = fp32_minimum(hidden)
    return {"loss": small, "kl": small, "logp": small, "ref_pass": small, "dh": fp32_minimum(vocab), "dw": fp32_minimum(rows)}


def exact(x: dict, settings: HeadSettings, rows: torch.Tensor | None = None) -> dict:
    """The float64 head on the case's inputs (``compare.exact_head``), with the no-grad pass's log-probs."""
    def loss_fn(logp, mask, advantages, old_logp, ref_logp, entropy=None):
        entropy = entropy if settings.variant.needs_entropy else None
        sampling = x.get("sampling_logp")
        sampling = None if sampling is None else sampling.to(logp.dtype)
        return grpo_loss(logp, mask, advantages, old_logp, ref_logp, counts=x["counts"], entropy=entropy,
                         sampling_logp=sampling, **settings.loss_kwargs())

    out = exact_head(x["hidden"], x["weight"], x["targets"], x["mask"], x["advantages"], x["old_logp"], x["ref_logp"],
                     temperature=settings.temperature, loss_fn=loss_fn, rows=rows)
    out["ref_pass"] = out["logp"]
    out["sensitivity"] = _scalar_sensitivity({**x, "entropy": out["entropy"]}, loss_fn, out["logp"])
    return out


def _scalar_sensitivity(x: dict, loss_fn, logp: torch.Tensor, step: float = 1e-7) -> dict[str, float]:
    """How much the loss and the KL sum move, relatively, per unit of relative error in the completion log-probs
    (float64; the worst of four directions: the loss's gradient, its signs, all ones, a random one).

    A scalar's error is one sample of rounding noise, and the torch path's may happen to be tiny; a head whose
    log-probs are as good as the torch path's can move the loss by up to this factor times their error, so that is
    the scalar's floor too (``judge_cases``). The KL's factor is large (k3 ~ d^2 / 2 for log-ratios d ~ 0.1)."""
    active = x["mask"] != 0

    def d(v):
        return None if v is None else v.detach().double()

    entropy = x.get("entropy")

    def f(lp):
        loss, stats = loss_fn(lp, x["mask"].double(), x["advantages"].detach().double(), d(x["old_logp"]), d(x["ref_logp"]),
                              entropy)
        return loss, stats["kl_sum"].double()

    lp = logp.detach().double().clone().requires_grad_(True)
    with torch.enable_grad():
        loss, kl = f(lp)
        grad = torch.autograd.grad(loss, lp, allow_unused=True)[0] if loss.requires_grad else None
    mask = active.double()
    g = torch.zeros_like(lp) if grad is None else grad.detach() * mask
    gen = torch.Generator(device="cpu").manual_seed(0)
    directions = [g, torch.sign(g), mask, torch.randn(lp.shape, generator=gen, dtype=torch.float64).to(lp.device) * mask]
    size = float(torch.linalg.vector_norm(lp.detach()[active])) * step
    out = {"loss": 0.0, "kl": 0.0}
    with torch.no_grad():
        for direction in directions:
            n = float(torch.linalg.vector_norm(direction))
            if n == 0:
                continue
            loss2, kl2 = f(lp.detach() + direction * (size / n))
            for key, a, b in (("loss", loss, loss2), ("kl", kl, kl2)):
                ref = abs(float(a))
                if ref > 0:
                    out[key] = max(out[key], abs(float(b) - float(a)) / ref / step)
    return out


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


def sampler_noise(settings: HeadSettings, seq_len: int) -> float:
    """The std (nats) of the check's sampler log-probs around the policy's: 0.3 per token, so that a token correction
    truncates or masks some tokens; 0.3 per sequence for a sequence correction (whose ratio sums the tokens'), so
    that not every completion is masked."""
    return 0.3 if settings.correction.mode.startswith("token") else 0.3 / max(seq_len, 1) ** 0.5


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
        sampling_logp = ((old_logp if settings.with_old else logp) + sampler_noise(settings, T) * torch.randn(B, T, device=dev, generator=g)
                         if settings.correction.on else None)
    counts = LossCounts(num_sequences=float(B), num_tokens=float(mask.sum()), max_completion_length=T)
    return dict(hidden=hidden, weight=weight, targets=targets, mask=mask, advantages=advantages, old_logp=old_logp,
                sampling_logp=sampling_logp,
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


def _run_once(name: str, x: dict, settings: HeadSettings, device: torch.device, rows: torch.Tensor | None = None) -> dict:
    """One forward + backward and one no-grad log-prob pass of head ``name``; outputs and their times.
    ``rows``: the vocabulary ids whose dW rows are kept (W gets a gradient, as when the head is trained); None:
    W frozen, as under LoRA."""
    h = x["hidden"].detach().clone().requires_grad_(True)
    w = x["weight"].detach().requires_grad_(rows is not None)  # shares the weight's storage: only its gradient is new
    timer = _Timer(device)
    timer.mark()
    loss, stats, logp = fused_grpo_loss(
        h, w, x["targets"], x["mask"], x["advantages"], x["old_logp"], x["ref_logp"],
        counts=x["counts"], temperature=settings.temperature, backend=name, sampling_logp=x.get("sampling_logp"),
        **settings.loss_kwargs())
    timer.mark()
    loss.backward()
    timer.mark()
    dw = None if rows is None else w.grad[rows].detach().clone()
    w.grad = None
    ref_pass = token_logprobs(x["hidden"], x["weight"], x["targets"], settings.temperature, name)
    timer.mark()
    fwd, bwd, lp = timer.intervals()
    return {"loss": loss.detach().float(), "kl": stats["kl_sum"].detach().float(), "logp": logp.detach().float(),
            "dh": h.grad.detach(), "dw": dw, "ref_pass": ref_pass.detach().float(), "times": (fwd, bwd, lp)}


QUANTITIES = ("loss", "kl", "logp", "ref_pass", "dh", "dw")


def _errors(run: dict, exact_run: dict, active: torch.Tensor) -> dict[str, float]:
    """Relative errors (``compare.rel_err``) of one run against the float64 head, for the quantities the run has:
    log-probs over the completion tokens (both passes), the loss, the KL sum, dh and the checked rows of dW."""
    out = {}
    for key in QUANTITIES:
        if run.get(key) is None or exact_run.get(key) is None:
            continue
        mine, ref = run[key], exact_run[key]
        if key == "logp":
            mine, ref = mine[active], ref[active]
        out[key] = rel_err(mine, ref)
    return out


def judge_run(run: dict, ref_run: dict, exact_run: dict, active: torch.Tensor, floor_min: dict[str, float]):
    """``compare.judge`` of one run: each quantity's error against the float64 head, bounded by the torch run's
    (``ref_run``) error, scalars' floors raised to what the log-probs' floor moves them by (``_scalar_sensitivity``)."""
    floors = _errors(ref_run, exact_run, active)
    logp_floor = max(floors.get("logp", 0.0), floor_min["logp"])
    for key, factor in exact_run["sensitivity"].items():
        if key in floors:
            floors[key] = max(floors[key], factor * logp_floor)
    errors = _errors(run, exact_run, active)
    return judge(errors, {k: floors[k] for k in errors}, floor_min)


def _same(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


def _finite(run: dict) -> bool:
    return all(bool(torch.isfinite(run[k]).all()) for k in ("loss", "kl", "logp", "dh", "dw", "ref_pass") if run.get(k) is not None)


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


def judge_cases(x: dict, settings: HeadSettings, name: str, first_run: dict, device: torch.device,
                torch_runs: dict | None = None, only: Collection[str] | None = None) -> tuple[dict, list[str], dict]:
    """Head ``name`` on every case (``cases``; those in ``only``, when given) against the float64 head, bounded by
    the torch reference's error.

    ``first_run``: the head's run on the recipe's case (already measured); ``torch_runs``: the float64 head's and
    the reference's runs by case, computed here when missing (added to the dict given, and returned, for the next
    head). Returns (figures by case, problems, torch_runs): figures[case][quantity] = {error, floor, bound, margin}.
    """
    torch_runs = {} if torch_runs is None else torch_runs
    figures, problems = {}, []
    for case in cases(x, settings, only):
        xc = case.x
        active = xc["mask"] != 0
        rows = case.dw_rows
        floor_min = minimums(xc["weight"].shape[1], xc["weight"].shape[0], int(xc["targets"].numel()))
        if case.name not in torch_runs:
            torch_runs[case.name] = (exact(xc, case.settings, rows), _run_once("torch", xc, case.settings, device, rows))
        exact_run, ref_run = torch_runs[case.name]
        run = first_run if case.name == "recipe" else _run_once(name, xc, case.settings, device, rows)
        if not _finite(run):
            problems.append(f"{case.name}: non-finite outputs")
            continue
        verdicts = judge_run(run, ref_run, exact_run, active, floor_min)
        figures[case.name] = {v.quantity: v.as_dict() for v in verdicts}
        problems += [f"{case.name}: {v.describe()}" for v in verdicts if not v.ok]
    return figures, problems, torch_runs


def worst_margin(figures: dict) -> float:
    """The smallest bound / error over every case and quantity: how close a passing head came to failing."""
    margins = [q["margin"] for case in figures.values() for q in case.values()]
    return min(margins) if margins else float("inf")


def check_heads(weight: torch.Tensor, heads: list[str], settings: HeadSettings, *, rows: int | None = None,
                repeats: int = REPEATS, interpreted: bool | None = None) -> list[PathResult]:
    """The torch reference and each head in ``heads`` on the same inputs; one PathResult each (reference first).

    A head passes when it does not raise, every output is finite, every error against the float64 head in every
    case is within ``compare.MULTIPLE`` x the torch reference's own error (``judge_cases``), and its repeats are
    bit-identical (the gradient of a head in ``REPRODUCIBLE_TO_ROUNDING``: within the recipe case's dh bound).
    Speed is not part of passing: ``report.decide`` compares the costs. ``interpreted`` (default: off CUDA, i.e.
    Triton's interpreter) marks the heads as never to be picked by auto.
    """
    device = weight.device
    dtype_name = str(weight.dtype).replace("torch.", "")
    rows = rows or check_rows(weight.shape[0], device)
    x = make_inputs(weight, rows, settings)
    common = {"rows": int(x["targets"].numel()), "vocab": int(weight.shape[0]), "hidden": int(weight.shape[1]),
              "dtype": dtype_name, "dw_vocab": min(int(weight.shape[0]), DW_VOCAB), "cases": case_names(settings),
              "bound": f"{MULTIPLE:g} x the torch reference's error against float64"}
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
    torch_runs = {"recipe": (exact(x, settings), ref_run)}
    reference.figures["floor"] = {q: e for q, e in _errors(ref_run, torch_runs["recipe"][0], x["mask"] != 0).items()}
    for name in heads:
        run, fig, err = measure_head(name, x, settings, device, repeats)
        p = PathResult("kernels", name, figures={**common, **fig, "interpreted": interpreted})
        if run is None:
            p.ok, p.reason = False, err
            results.append(p)
            continue
        p.cost = (fig["fwd_ms"] + fig["bwd_ms"] + fig["logprobs_ms"]) / 1e3
        try:
            figures, problems, torch_runs = judge_cases(x, settings, name, run, device, torch_runs)
        except Exception as exc:  # noqa: BLE001 -- a head that raises on another case fails, it does not crash the run
            p.ok, p.reason = False, f"raised {type(exc).__name__}: {_one_line(exc)}"
            results.append(p)
            continue
        p.figures["errors"] = figures
        p.figures["worst_margin"] = worst_margin(figures)
        if not fig["finite"]:
            problems.insert(0, "non-finite outputs")
        if not fig["forward_bit_identical"]:
            problems.append(f"not bit-identical over {repeats} repeats (forward: loss / log-probs)")
        elif not fig["bit_identical"]:
            if name in REPRODUCIBLE_TO_ROUNDING:
                spread = max(rel_err(r["dh"], run["dh"]) for r in run["repeat_runs"])
                p.figures["repeat_note"] = f"gradient to rounding ({REPRODUCIBLE_TO_ROUNDING[name]}): spread {spread:.1e}"
                bound = figures.get("recipe", {}).get("dh", {}).get("bound", 0.0)
                if not spread <= bound:
                    problems.append(f"gradient repeats spread {spread:.2e} > {bound:.1e}")
            else:
                problems.append(f"not bit-identical over {repeats} repeats (gradient): a race")
        p.ok = not problems
        p.reason = "; ".join(problems)
        results.append(p)
    return results


def recheck(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
            old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, counts: LossCounts, settings: HeadSettings,
            backend: str, max_rows: int | None = None, sampling_logp: torch.Tensor | None = None) -> dict:
    """During training: head ``backend`` against the float64 head on (the first rows of) one real micro-batch,
    every case of ``cases``, bounded by the torch reference's error as in the pre-run check (``judge_cases``).

    ``hidden``: [B, T, H] (detached here); the others as ``fused_grpo_loss`` takes them (with the recipe's sampler
    correction and no ``sampling_logp`` given, the policy's own fp32 log-probs ``sampler_noise`` apart stand for the sampler's:
    the check judges the head's arithmetic, not the sampler). At most ``max_rows``
    tokens (``check_rows``) are compared, whole completions first. Returns {"ok", "problems", "worst_margin",
    "errors": figures by case} and, for the metrics, the recipe case's "grad" (dh), "loss" and "logp" errors.
    """
    B, T, _ = hidden.shape
    rows = max_rows or check_rows(weight.shape[0], hidden.device)
    t = min(T, rows)
    b = max(1, min(B, rows // t))

    def cut(v):
        return None if v is None else v[:b, :t]

    x = dict(hidden=hidden.detach()[:b, :t], weight=weight, targets=targets[:b, :t], mask=mask[:b, :t],
             advantages=advantages[:b], old_logp=cut(old_logp), ref_logp=cut(ref_logp), counts=counts,
             sampling_logp=cut(sampling_logp))
    if settings.correction.on and x["sampling_logp"] is None:
        from ..kernels.chunked_logprobs import chunked_logprobs_reference

        with torch.no_grad():
            h = x["hidden"]
            own = chunked_logprobs_reference(h.reshape(-1, h.shape[-1]), weight, x["targets"].reshape(-1), settings.temperature)
            g = torch.Generator(device=h.device).manual_seed(0)
            x["sampling_logp"] = own.float().view(b, t) + sampler_noise(settings, t) * torch.randn(b, t, device=h.device, generator=g)
    first = _run_once(backend, x, settings, hidden.device)
    figures, problems, _ = judge_cases(x, settings, backend, first, hidden.device)
    recipe = figures.get("recipe", {})
    return {"ok": not problems, "problems": problems, "worst_margin": worst_margin(figures), "errors": figures,
            "grad": recipe.get("dh", {}).get("error", float("inf")), "loss": recipe.get("loss", {}).get("error", float("inf")),
            "logp": recipe.get("logp", {}).get("error", float("inf"))}
