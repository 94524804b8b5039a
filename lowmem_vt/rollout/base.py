"""The rollout interface the trainer and the evaluator use."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..grpo import completion_mask


@dataclass
class SamplingParams:
    num_generations: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    # One seed per prompt: a prompt's G samples then depend on its seed alone, not on which other prompts
    # share the batch or the rank, so resuming and data-parallel runs sample exactly what one process would.
    seeds: list[int] | None = None


@dataclass
class RolloutResult:
    """Completions of a batch of prompts; row ``p * G + g`` is sample g of prompt p."""

    completion_ids: torch.Tensor  # [P*G, T] long, padded with the pad token after EOS
    completion_mask: torch.Tensor  # [P*G, T] float: 1 up to and including the first EOS
    prompt_rows: list[int]  # [P*G]: index of each row's prompt
    sampling_logprobs: torch.Tensor | None = None  # [P*G, T] float32 when the backend reports them


def finish(completion_ids: torch.Tensor, eos_token_id: int, pad_token_id: int, num_prompts: int, g: int) -> RolloutResult:
    """Mask after the first EOS, overwrite what follows it with pad, and name each row's prompt."""
    mask = completion_mask(completion_ids, eos_token_id)
    ids = torch.where(mask.bool(), completion_ids, torch.full_like(completion_ids, pad_token_id))
    return RolloutResult(ids, mask, [p for p in range(num_prompts) for _ in range(g)])


class RolloutBackend(ABC):
    @abstractmethod
    def generate(self, prompts: list, image_embeds: list[torch.Tensor], params: SamplingParams) -> RolloutResult:
        """prompts: list of inputs.PromptInputs; image_embeds: each prompt's vision features [tokens, H]."""
