"""Rollout: G completions per prompt behind one small interface (``RolloutBackend.generate``).

Backends: ``hf`` (Hugging Face ``generate``; the reference and fallback). Other backends plug in
through ``make_rollout``.
"""

from __future__ import annotations

from .base import RolloutBackend, RolloutResult, SamplingParams


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


__all__ = ["RolloutBackend", "RolloutResult", "SamplingParams", "make_rollout"]
