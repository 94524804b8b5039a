"""What the self-check costs on a GPU: an ESTIMATE from FLOPs and bytes, computed on CPU, not a measurement.

No GPU has run the self-check yet. This module counts the work it does for a recipe (the matmul FLOPs of the
loss-head runs, the decode steps and forwards of the rollout check, the bytes of the offload round trips) and
divides by a card's published peak rates at an assumed efficiency, plus assumed fixed costs (HF generate's Python
and launch overhead per decode step, Triton's first compile of each kernel). ``estimate_seconds`` returns every
term with its assumption; ``check_memory`` compares the check's own allocations with the recipe's memory plan.
``docs/selfcheck.md`` prints the figures for sat_lora on the 24 GB cards; replace them with measured ones
(``lowmem-vt doctor recipes/sat_lora.yaml`` prints the time it took) when a GPU is at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..planner import DTYPE_BYTES, GIB, NF4_BYTES_PER_PARAM, config_for, layer_bytes_per_token, model_shape, plan, prompt_tokens
from .head import DW_VOCAB, REPEATS, check_bytes, check_rows
from .rollout import LOGPROB_CHUNK


@dataclass(frozen=True)
class Card:
    """Published peak rates: dense 16-bit tensor TFLOPS with fp32 accumulation, memory GB/s, host link GB/s, fp64
    TFLOPS (the loss-head check's float64 head)."""

    name: str
    tflops: float
    mem_gbps: float
    pcie_gbps: float
    fp64_tflops: float


# 24 GB cards (vendor datasheets; PCIe 4.0 x16 ~ 25 GB/s in practice, pinned memory; fp64 at 1/64 or 1/32 of fp32)
CARDS_24GB = (
    Card("NVIDIA L4", 121.0, 300.0, 25.0, 0.49),
    Card("NVIDIA A10", 125.0, 600.0, 25.0, 0.98),
    Card("RTX 3090", 71.0, 936.0, 25.0, 0.56),
    Card("RTX 4090", 165.0, 1008.0, 25.0, 1.29),
)
MATMUL_EFFICIENCY = 0.4  # assumed fraction of peak for the check's ~0.2 TFLOP matmuls and its forwards
BANDWIDTH_EFFICIENCY = 0.7  # assumed fraction of peak memory bandwidth a decode step reaches
HF_STEP_OVERHEAD_S = 0.025  # assumed: HF generate's Python + ~2,400 small kernels per decode step of the 28-layer model
ENGINE_EAGER_STEP_S = 0.008  # assumed: one eager engine step (585 operators) for its warm-up and its capture
TRITON_COMPILE_S = 2.0  # assumed per Triton kernel on its first use on a machine (then cached in ~/.triton/cache)
TRITON_KERNELS = 9  # fused-linear rows (loss, log-probs), streaming (lse, finish, backward, GRPO finish), engine (norm, rope x2)
HOST_COMPARE_GBPS = 5.0  # assumed: torch.equal of host tensors


def _units_per_run() -> dict[str, int]:
    """Matmuls of 2·N·V·H FLOP per run (forward, backward, no-grad log-prob pass) of each head, the LM head frozen."""
    return {"torch": 1 + 1 + 1, "triton_fused_linear": 2 + 0 + 1, "triton_streaming": 1 + 2 + 1}


def estimate_seconds(cfg, card: Card, config=None) -> dict:
    """Seconds the self-check of ``cfg`` would take on ``card`` (an estimate, see the module docstring): one
    entry per term, ``total`` and ``assumptions``. Counts what a run with nothing cached measures."""
    config = config if config is not None else config_for(cfg)
    s = model_shape(config, cfg.lora.r, cfg.lora.target_modules)
    b = DTYPE_BYTES[cfg.model.dtype if cfg.model.dtype in DTYPE_BYTES else "bfloat16"]
    flops = card.tflops * 1e12 * MATMUL_EFFICIENCY
    bandwidth = card.mem_gbps * 1e9 * BANDWIDTH_EFFICIENCY
    out: dict = {}

    # loss heads: warm-up + REPEATS runs each, every head, on the recipe case; one run of each on the other cases
    # (KL only, advantage only, temperature 0.7 at temperature 1; dW on W[:DW_VOCAB]); the float64 head: two
    # streams over W per case, at the card's fp64 rate; the check's inputs take one reference pass
    rows = check_rows(s.vocab, "cuda")
    unit = 2 * rows * s.vocab * s.hidden
    heads = _units_per_run() if cfg.kernels != "torch" else {}
    extra_cases = 2 + (1 if cfg.grpo.temperature == 1.0 else 0)
    dw_share = min(s.vocab, DW_VOCAB) / s.vocab
    matmul_units = (REPEATS + 1 + extra_cases + dw_share) * sum(heads.values()) + (1 if heads else 0)
    softmax_bytes = (REPEATS + 1 + extra_cases) * len(heads) * 6 * rows * s.vocab * 4  # fp32 [rows, V] passes
    exact_units = 2 * (1 + extra_cases + dw_share) if heads else 0
    out["loss heads"] = matmul_units * unit / flops + softmax_bytes / bandwidth
    out["loss heads: the float64 head"] = exact_units * unit / (card.fp64_tflops * 1e12 * MATMUL_EFFICIENCY)

    # rollout: hf greedy (one batched call) and sampling (one call per prompt, G rows), the candidate's greedy and
    # sampling calls, the trainer's forward over both sampled batches
    if cfg.rollout.backend != "hf":
        from .rollout import check_length

        P, G = 2, cfg.grpo.num_generations
        L = prompt_tokens(cfg, s)
        T = check_length(cfg.grpo.max_completion_length, "cuda")
        text_params = s.params_text_linear + (s.params_other - s.params_vision)
        weight_bytes = s.params_text_linear * (NF4_BYTES_PER_PARAM if cfg.model.quantization == "nf4" else b) + \
            (s.params_other - s.params_vision) * b
        step_read = weight_bytes / bandwidth
        prefill = 2 * text_params * L / flops  # one prompt
        hf = (P * prefill + T * max(step_read, HF_STEP_OVERHEAD_S)) + P * (G * prefill + T * max(step_read, HF_STEP_OVERHEAD_S))
        engine = 2 * (P * prefill + 2 * ENGINE_EAGER_STEP_S + T * step_read)
        trainer = 2 * 2 * text_params * P * G * (L + T) / flops
        out["rollout: hf (greedy + sampling)"] = hf
        out["rollout: engine (greedy + sampling, one graph)"] = engine
        out["rollout: trainer log-probs of both samples"] = trainer
    # levers: the vision tower's weights copied in and compared on the host; a layer input's round trip
    vision_bytes = s.params_vision * b
    out["levers (vision round trip)"] = vision_bytes / (card.pcie_gbps * 1e9) * 2 + vision_bytes / (HOST_COMPARE_GBPS * 1e9)
    kernels = (6 if heads else 0) + (3 if cfg.rollout.backend != "hf" else 0)
    out["Triton compiles (first run on a machine only)"] = min(kernels, TRITON_KERNELS) * TRITON_COMPILE_S
    out["total"] = sum(out.values())
    out["assumptions"] = (f"{card.name}: {card.tflops:g} TFLOPS x {MATMUL_EFFICIENCY}, {card.mem_gbps:g} GB/s x "
                          f"{BANDWIDTH_EFFICIENCY}, host link {card.pcie_gbps:g} GB/s; HF decode step >= {HF_STEP_OVERHEAD_S * 1e3:g} ms; "
                          f"{TRITON_COMPILE_S:g} s per Triton compile; head rows {rows}; model loading not counted (a run pays it anyway)")
    return out


def check_memory(cfg, config=None) -> dict:
    """GiB the self-check allocates at its peak on top of what is resident when it runs (the model, the LoRA
    weights; the optimizer's state is allocated at the first step, after it), against the plan's peak."""
    config = config if config is not None else config_for(cfg)
    s = model_shape(config, cfg.lora.r, cfg.lora.target_modules)
    p = plan(cfg, config)
    b = DTYPE_BYTES[cfg.model.dtype if cfg.model.dtype in DTYPE_BYTES else "bfloat16"]
    resident = (p.phases["weights"] - p.phases["vision tower (host memory between its calls)"] + p.phases["LoRA weights (fp32)"])
    rows = check_rows(s.vocab, "cuda")
    head_gib = check_bytes(s.vocab, s.hidden, rows, b) / GIB
    rollout_gib = 0.0
    if cfg.rollout.backend != "hf":
        import dataclasses

        from ..planner import rollout_bytes
        from .rollout import check_length

        P, G = 2, cfg.grpo.num_generations
        L = prompt_tokens(cfg, s)
        T = check_length(cfg.grpo.max_completion_length, "cuda")
        small = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, prompts_per_step=P),
                                    rollout=dataclasses.replace(cfg.rollout, backend="auto"))
        generation = rollout_bytes(small, s, L, T)
        rows_fwd = P * G
        forward = rows_fwd * (L + T) * layer_bytes_per_token(s, cfg, backward=False) + rows_fwd * (L + T) ** 2 * (b + 1) \
            + rows_fwd * T * s.hidden * b + 2 * LOGPROB_CHUNK * s.vocab * 4
        rollout_gib = max(generation, forward) / GIB
    check = max(head_gib, rollout_gib)
    return {"resident_gib": resident, "head_check_gib": head_gib, "rollout_check_gib": rollout_gib,
            "peak_gib": resident + check, "plan_allocated_gib": p.allocated, "fits": resident + check <= p.allocated}
