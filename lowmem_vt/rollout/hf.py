"""Rollout through Hugging Face ``generate`` on the training weights (LoRA active)."""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..inputs import check_image_features, collate_prompts_left
from .base import RolloutBackend, RolloutResult, SamplingParams, finish


class SamplingLogprobs(LogitsProcessor):
    """Records the log-prob of each sampled token under softmax(logits / temperature), before top-k / top-p:
    the quantity the trainer computes for the same tokens (``RolloutResult.sampling_logprobs``).

    ``generate`` runs the processors it is given before its warpers (temperature, top-k, top-p), so the scores
    seen here are the model's logits after any default processor. A step's token is known only at the next
    call (the last column of ``input_ids``), so one step's log-softmax [rows, vocab] is kept until then.
    Comparing these with the trainer's log-probs checks the whole generate path (left padding, M-RoPE
    positions of padded rows, the KV cache) against the unpadded forward the trainer runs.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None
        self.columns: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self._take(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, token: torch.Tensor) -> None:
        self.columns.append(self.previous.gather(-1, token[:, None])[:, 0])

    def logprobs(self, completion: torch.Tensor) -> torch.Tensor:
        """[rows, T] float32 for the generated ``completion`` [rows, T] (its last column: the last step's token)."""
        if self.previous is not None and len(self.columns) < completion.shape[1]:
            self._take(completion[:, len(self.columns)].to(self.previous.device))
        self.previous = None
        if not self.columns:
            return torch.zeros(completion.shape, dtype=torch.float32, device=completion.device)
        out = torch.stack(self.columns, dim=1)
        return torch.nn.functional.pad(out, (0, completion.shape[1] - out.shape[1])).to(completion.device)


@contextlib.contextmanager
def only_these_generation_settings(model):
    """``model.generation_config`` emptied for the call. ``generate`` fills every setting the call leaves unset
    from it: a hub model's generation_config.json (repetition_penalty, min_p, typical_p, ...) would silently
    change what a rollout samples, so the recipe's settings, passed explicitly, are the only ones that apply."""
    saved = model.generation_config
    model.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id)
    try:
        yield
    finally:
        model.generation_config = saved


def accepts_encoder_outputs(model) -> bool:
    """Whether this transformers' generate takes precomputed image features (``mm_encoder_outputs``, 5.18+);
    ``model``: the model or its class."""
    cls = model if isinstance(model, type) else type(model)
    return "mm_encoder_outputs" in inspect.signature(cls.forward).parameters


def hf_takes_features(family, config) -> bool:
    """Whether HF generate can take this family's precomputed image features here: always from transformers 5.18
    (``mm_encoder_outputs``); before, only without DeepStack levels (Qwen3-VL has them)."""
    return family.feature_levels(config) == 1 or accepts_encoder_outputs(family.model_class())


def generate_inputs(lm, prompts, image_embeds: list[torch.Tensor], samples: int) -> dict:
    """generate's keyword arguments for ``samples`` completions of each prompt, left-padded, with the step's image
    features already encoded (the vision tower runs once per step, in the trainer): [levels, tokens, H] per prompt.

    transformers >= 5.18 takes the features as ``mm_encoder_outputs`` (the family builds them, DeepStack levels
    included) and expands everything to the samples itself. Older releases (5.17, the GPU machine's) have no such
    argument; there the prompts' embeddings with the features scattered into their image tokens go in as
    ``inputs_embeds`` beside ``input_ids``: generate still computes the M-RoPE positions from ``input_ids``,
    ``mm_token_type_ids`` and ``image_grid_thw``, runs the embeddings through the prompt's forward only, and returns
    ``input_ids`` followed by the new tokens. Its expansion to the samples would count each row's images from the
    embeddings (none match the image token's once features are in), so the rows are repeated here, in generate's
    order (each prompt's samples adjacent): the same sampled batch. A family with DeepStack levels (Qwen3-VL) cannot
    hand those to an older generate: refused (pre-flight says so first, ``preflight.check_rollout_backend``).
    """
    model = lm.hf_model
    batch = collate_prompts_left(prompts, lm.pad_token_id)
    batch = {k: v.to(model.device) for k, v in batch.items() if k != "pixel_values"}
    if accepts_encoder_outputs(model):
        return {**batch, "mm_encoder_outputs": {"image": lm.family.encoder_outputs(image_embeds)},
                "num_return_sequences": samples}
    if any(e.shape[0] > 1 for e in image_embeds):
        raise RuntimeError(f"{lm.family.label}'s DeepStack image features cannot be handed to generate before transformers "
                           "5.18; use rollout.backend=engine, or a newer transformers")
    grids = [p.image_grid_thw for p in prompts]
    batch["image_grid_thw"] = torch.cat([g for g in grids for _ in range(samples)]).to(model.device)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        batch[key] = batch[key].repeat_interleave(samples, dim=0)
    input_ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    image_mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    feats = torch.cat([e[0] for e in image_embeds for _ in range(samples)]).to(embeds.device, embeds.dtype)
    check_image_features(image_mask, feats, "the prompts")
    return {**batch, "inputs_embeds": embeds.masked_scatter(image_mask, feats), "num_return_sequences": 1}


def sampling_settings(params: SamplingParams) -> dict:
    """generate's sampling keywords for ``params``, all of them explicit (top_k 0 and top_p 1.0 are "off"): the one
    place the recipe's sampling reaches generate, for rollouts and for the distribution check alike."""
    if params.greedy:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}


class FixedScores(LogitsProcessor):
    """Replaces every row's scores with one logits row [V] (the distribution check's: see HFRollout.draw_next)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.logits.to(scores.device, scores.dtype).expand_as(scores).clone()


class HFRollout(RolloutBackend):
    def __init__(self, lm):
        self.lm = lm

    @torch.no_grad()
    def draw_next(self, logits: torch.Tensor, params: SamplingParams, seed: int) -> torch.Tensor:
        """``params.num_generations`` draws [n] long of one next token from ``logits`` [V] (the policy's, at some
        prefix) through generate's own sampling: the warpers ``sampling_settings`` builds, then its multinomial.

        For the rollout's distribution check (``selfcheck/distribution.py``): generate runs on n one-token rows whose
        scores are replaced by ``logits`` before its warpers, so the check costs n one-token forwards instead of n
        prefills of the prompt (the prompt path itself is checked by the sampling log-probs)."""
        lm, model = self.lm, self.lm.hf_model
        n = params.num_generations
        start = torch.full((n, 1), lm.eos_token_id, dtype=torch.long, device=model.device)
        was_training = model.training
        model.eval()
        torch.manual_seed(seed)
        try:
            with only_these_generation_settings(model):
                out = model.generate(input_ids=start, attention_mask=torch.ones_like(start), **sampling_settings(params),
                                     max_new_tokens=1, eos_token_id=lm.eos_token_id,
                                     pad_token_id=lm.pad_token_id, use_cache=False,
                                     logits_processor=LogitsProcessorList([FixedScores(logits)]))
        finally:
            model.train(was_training)
        return out[:, -1].cpu()

    @torch.no_grad()
    def generate(self, prompts, image_embeds, params: SamplingParams) -> RolloutResult:
        if params.seeds is None or params.greedy:
            return self._generate(prompts, image_embeds, params)
        # per-prompt seeds: one generate call per prompt, its RNG seeded from that prompt's seed
        parts = []
        for p, e, seed in zip(prompts, image_embeds, params.seeds):
            torch.manual_seed(seed)
            parts.append(self._generate([p], [e], params))
        T = max(r.completion_ids.shape[1] for r in parts)
        pad = self.lm.pad_token_id
        ids = torch.cat([torch.nn.functional.pad(r.completion_ids, (0, T - r.completion_ids.shape[1]), value=pad) for r in parts])
        mask = torch.cat([torch.nn.functional.pad(r.completion_mask, (0, T - r.completion_mask.shape[1])) for r in parts])
        logp = torch.cat([torch.nn.functional.pad(r.sampling_logprobs, (0, T - r.sampling_logprobs.shape[1])) for r in parts])
        rows = [i for i in range(len(prompts)) for _ in range(params.num_generations)]
        return RolloutResult(ids, mask, rows, logp)

    def _generate(self, prompts, image_embeds, params: SamplingParams) -> RolloutResult:
        lm = self.lm
        model = lm.hf_model
        inputs = generate_inputs(lm, prompts, image_embeds, params.num_generations)
        was_training = model.training
        model.eval()  # gradient checkpointing in train mode would turn the KV cache off
        recorder = SamplingLogprobs(params.temperature) if not params.greedy else None
        try:
            with only_these_generation_settings(model):
                out = model.generate(
                    **inputs,
                    **sampling_settings(params),
                    max_new_tokens=params.max_new_tokens,
                    eos_token_id=lm.eos_token_id,
                    pad_token_id=lm.pad_token_id,
                    use_cache=True,
                    logits_processor=LogitsProcessorList([recorder] if recorder else []),
                )
        finally:
            model.train(was_training)
        completion = out[:, inputs["input_ids"].shape[1] :]
        if completion.shape[1] == 0:
            completion = torch.full((out.shape[0], 1), lm.pad_token_id, dtype=torch.long, device=out.device)
        result = finish(completion, lm.eos_token_id, lm.pad_token_id, len(prompts), params.num_generations)
        if recorder is not None:
            result.sampling_logprobs = recorder.logprobs(completion) * result.completion_mask
        return result
