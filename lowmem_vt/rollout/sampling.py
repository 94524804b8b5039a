"""Sampling on the device: the next token of every row and its log-prob, with static shapes and no host sync
(safe inside a CUDA graph), optionally one random generator per prompt."""

from __future__ import annotations

import torch

from .base import SamplingParams


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None = None,
                  picks: torch.Tensor | None = None, draws: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] long and their log-probs [B] float32, from logits [B, V].

    ``generators``: one per prompt, drawing for its B / len(generators) consecutive rows, so a prompt's
    samples depend on its seed alone; None draws from the global RNG (``torch.manual_seed``). With ``picks``
    [B] long, each generator draws ``draws`` rows (its prompt's G samples) and row r uses draw ``picks[r]``
    of the concatenated draws: a prompt's random stream then advances by the same amount whichever of its
    samples are still decoding, so samples do not depend on which rows have left the batch.

    The log-prob is under softmax(logits / temperature) before top-k/top-p truncation: the distribution the
    trainer's log-probs use (equal to the sampling distribution when top_k = 0 and top_p = 1). Sampling uses
    the exponential race, argmax_i p_i / E_i with E_i ~ Exp(1), which picks i with probability p_i: static
    shapes, no host sync, safe inside a CUDA graph.
    """
    # few [B, V] float32 buffers at once (the logits, scaled, probabilities, the race): the log-prob of the chosen
    # token is scaled - logsumexp, not a gather from a whole log-softmax
    scaled = logits.float() if params.temperature == 1.0 else logits.float() / params.temperature
    lse = torch.logsumexp(scaled, dim=-1)
    if params.greedy:
        token = scaled.argmax(dim=-1)
    else:
        kept = scaled
        if 0 < params.top_k < scaled.shape[-1]:
            kth = torch.topk(kept, params.top_k, dim=-1).values[:, -1:]
            kept = kept.masked_fill(kept < kth, float("-inf"))
        if params.top_p < 1.0:
            # the smallest set of most likely tokens whose mass reaches top_p (as HF's TopPLogitsWarper)
            sorted_logits, order = kept.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            drop_sorted = probs.cumsum(dim=-1) - probs >= params.top_p
            kept = kept.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
        probs = kept.softmax(dim=-1)
        # clamp: an Exp(1) draw of exactly 0 would turn a dropped token's 0/0 into NaN, which argmax picks
        race = torch.empty_like(probs) if picks is None else probs.new_empty(len(generators or ()) * draws, probs.shape[-1])
        if generators is None:
            race.exponential_()
        else:
            for rows, gen in zip(race.chunk(len(generators)), generators):
                rows.exponential_(generator=gen)
        if picks is not None:
            race = race.index_select(0, picks)
        race.clamp_min_(torch.finfo(probs.dtype).tiny)
        token = torch.div(probs, race, out=race).argmax(dim=-1)
    return token, scaled.gather(-1, token[:, None])[:, 0] - lse
