"""Rollout: G completions per prompt behind one small interface (``RolloutBackend.generate``).

Backends: ``hf`` (Hugging Face ``generate``; the reference and fallback), ``engine`` (the in-process
engine), ``vllm``; chosen by ``make_rollout``. ``engine_allocation_bytes`` (``engine_memory``) is what the engine
allocates for a rollout (the planner's rollout phase).
"""

from __future__ import annotations

from .base import RolloutBackend, RolloutResult, SamplingParams
from ..engine_memory import EngineBytes, engine_allocation_bytes


def make_rollout(backend: str, lm) -> RolloutBackend:
    """The rollout backend named by the recipe's ``rollout.backend``."""
    if backend == "hf":
        from .hf import HFRollout

        return HFRollout(lm)
    if backend == "engine":
        from .engine import EngineRollout

        return EngineRollout(lm)
    if backend == "vllm":
        from .vllm import VLLMRollout

        return VLLMRollout(lm)
    raise ValueError(f"unknown rollout.backend {backend!r}")


__all__ = ["EngineBytes", "RolloutBackend", "RolloutResult", "SamplingParams", "engine_allocation_bytes", "make_rollout"]
