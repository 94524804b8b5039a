"""In-process rollout on the training weights: one prefill per prompt, a static KV cache, CUDA-graph decode.

Decoding a few rows is bound by reading the weights once per token, so the work per step must be just
that: no allocation, no host sync, no Python per kernel. The engine drives the model's own modules (the
decoder layers' projections, norms and MLPs, the rotary embedding, the head), so the peft-injected LoRA
layers apply the adapter in the matmul: the sampler is exactly the policy the trainer scores, and the
base weights are neither copied nor modified. Image features come in from the trainer (computed once
per step); the vision tower is never called here.

Cache layout: rows are ``p * G + g``; every prompt is end-aligned at slot ``prompt_end`` (the longest
prompt's length), so decode step j writes slot ``prompt_end + j`` for every row and one scalar cursor
serves the whole batch; slots before a shorter prompt's start are masked out. M-RoPE positions are per
row: completion token j of prompt p sits at ``next_position_p + j`` on all three axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

from .base import RolloutBackend, RolloutResult, SamplingParams, finish

# Cache slots are rounded up to a multiple of this, so steps whose longest prompts differ by a few tokens
# get the same shapes (cheap for the masked attention: the weights, not the cache, dominate a decode step).
CACHE_BUCKET = 256
# Checking "every row has ended" is a host sync; on the GPU do it every few steps, not between every replay.
STOP_CHECK_EVERY = 16


@dataclass
class DecodeState:
    """Every tensor a decode step reads or writes, at fixed addresses so one CUDA graph replays them all.

    B = prompts x num_generations rows, C = cache slots, T = max_new_tokens.
    """

    kv: torch.Tensor  # [layers, 2, B, kv_heads, C, head_dim] model dtype: keys, values
    token: torch.Tensor  # [B] long: the token this step feeds
    offset: torch.Tensor  # [1] long: its completion index j
    cursor: torch.Tensor  # [1] long: the cache slot it writes, prompt_end + j
    start: torch.Tensor  # [B] long: first cache slot of the row's prompt
    next_position: torch.Tensor  # [B] long: M-RoPE position of completion token 0
    slots: torch.Tensor  # [C] long: 0 .. C-1
    done: torch.Tensor  # [B] bool: the row has sampled EOS
    ids: torch.Tensor  # [B, T] long: sampled tokens (pad after EOS)
    logprobs: torch.Tensor  # [B, T] float32: their log-probs (0 after EOS)
    generators: list[torch.Generator] | None  # one per prompt (SamplingParams.seeds), else the global RNG

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if f.name != "generators"]


def sample_tokens(logits: torch.Tensor, params: SamplingParams,
                  generators: list[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] long and their log-probs [B] float32, from logits [B, V].

    ``generators``: one per prompt, drawing for its B / len(generators) consecutive rows, so a prompt's
    samples depend on its seed alone; None draws from the global RNG (``torch.manual_seed``).

    The log-prob is under softmax(logits / temperature) before top-k/top-p truncation: the distribution the
    trainer's log-probs use (equal to the sampling distribution when top_k = 0 and top_p = 1). Sampling uses
    the exponential race, argmax_i p_i / E_i with E_i ~ Exp(1), which picks i with probability p_i: static
    shapes, no host sync, safe inside a CUDA graph.
    """
    scaled = logits.float() / params.temperature
    logp = torch.log_softmax(scaled, dim=-1)
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
        race = torch.empty_like(probs)
        if generators is None:
            race.exponential_()
        else:
            for rows, gen in zip(race.chunk(len(generators)), generators):
                rows.exponential_(generator=gen)
        race.clamp_min_(torch.finfo(probs.dtype).tiny)
        token = (probs / race).argmax(dim=-1)
    return token, logp.gather(-1, token[:, None])[:, 0]


class EngineRollout(RolloutBackend):
    """``rollout.backend: engine``. Needs ``lm`` (model.LoadedModel) with a Qwen2-VL language model."""

    def __init__(self, lm):
        self.lm = lm
        self.eos_token_id, self.pad_token_id = lm.eos_token_id, lm.pad_token_id
        model = lm.hf_model
        self.text = model.model.language_model  # Qwen2VLTextModel: embed_tokens, layers, norm, rotary_emb
        self.lm_head = model.lm_head
        cfg = self.text.config
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("rollout.backend: engine has no sliding-window attention; the model's config sets use_sliding_window")
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads

    @torch.no_grad()
    def generate(self, prompts, image_embeds, params: SamplingParams) -> RolloutResult:
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        model = self.lm.hf_model
        was_training = model.training
        model.eval()  # LoRA dropout off: the sampler must be the policy the trainer scores
        try:
            state = self._prefill(prompts, image_embeds, params)
            filled = self._decode(state, params)
        finally:
            model.train(was_training)
        out = finish(state.ids[:, :filled], self.eos_token_id, self.pad_token_id, len(prompts), params.num_generations)
        # like HF generate: as long as the longest completion (all rows ended) or max_new_tokens
        T = int(out.completion_mask.sum(dim=1).max())
        mask = out.completion_mask[:, :T]
        return RolloutResult(out.completion_ids[:, :T], mask, out.prompt_rows, state.logprobs[:, :T] * mask)

    # ------------------------------------------------------------------------------------- prefill

    def _prefill(self, prompts, image_embeds, params: SamplingParams) -> DecodeState:
        """Allocate the static state, run each prompt once, copy its K/V to its G rows, sample token 0."""
        G, T = params.num_generations, params.max_new_tokens
        if params.seeds is not None and len(params.seeds) != len(prompts):
            raise ValueError(f"{len(params.seeds)} sampling seeds for {len(prompts)} prompts: give one seed per prompt")
        B = len(prompts) * G
        prompt_end = max(p.length for p in prompts)
        C = math.ceil((prompt_end + T) / CACHE_BUCKET) * CACHE_BUCKET
        dev = self.lm.device
        dtype = self.text.embed_tokens.weight.dtype
        long = dict(dtype=torch.long, device=dev)
        lengths = torch.tensor([p.length for p in prompts], **long).repeat_interleave(G)
        s = DecodeState(
            kv=torch.zeros(len(self.text.layers), 2, B, self.num_kv_heads, C, self.head_dim, dtype=dtype, device=dev),
            token=torch.zeros(B, **long),
            offset=torch.zeros(1, **long),
            cursor=torch.full((1,), prompt_end, **long),
            start=prompt_end - lengths,
            next_position=torch.tensor([p.next_position for p in prompts], **long).repeat_interleave(G),
            slots=torch.arange(C, **long),
            done=torch.zeros(B, dtype=torch.bool, device=dev),
            ids=torch.full((B, T), self.pad_token_id, **long),
            logprobs=torch.zeros(B, T, dtype=torch.float32, device=dev),
            generators=None if params.seeds is None else [torch.Generator(dev).manual_seed(x) for x in params.seeds],
        )
        last = []
        for i, (prompt, feats) in enumerate(zip(prompts, image_embeds)):
            rows, begin = slice(i * G, (i + 1) * G), prompt_end - prompt.length
            h = self._prompt_embeds(prompt, feats, i)
            cos, sin = self.text.rotary_emb(h, prompt.position_ids.to(dev)[:, None])
            for layer, kv in zip(self.text.layers, s.kv):
                q, k, v = self._qkv(layer, h, cos, sin)
                kv[0, rows, :, begin:prompt_end] = k  # one prefill, broadcast to the prompt's G rows
                kv[1, rows, :, begin:prompt_end] = v
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.self_attn.scaling, enable_gqa=True)
                h = self._attention_out_and_mlp(layer, h, o.transpose(1, 2).reshape(1, prompt.length, -1))
            last.append(self.lm_head(self.text.norm(h[:, -1])))
        token, logp = sample_tokens(torch.cat(last).repeat_interleave(G, dim=0), params, s.generators)
        s.ids[:, 0], s.logprobs[:, 0] = token, logp
        s.token.copy_(token)
        s.done.copy_(token == self.eos_token_id)
        return s

    def _prompt_embeds(self, prompt, feats: torch.Tensor, index: int) -> torch.Tensor:
        """Token embeddings [1, L, H] with the image features scattered into the <|image_pad|> slots."""
        dev = self.lm.device
        h = self.text.embed_tokens(prompt.input_ids.to(dev)[None])
        image = prompt.mm_token_type_ids.to(dev).bool()[None, :, None]
        if int(image.sum()) != feats.shape[0]:
            raise RuntimeError(f"prompt {index} has {int(image.sum())} image tokens but {feats.shape[0]} image features")
        return h.masked_scatter(image, feats.to(device=dev, dtype=h.dtype))

    # -------------------------------------------------------------------------------------- decode

    def _qkv(self, layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated q [B, heads, S, d], k and v [B, kv_heads, S, d] of one decoder layer (LoRA in the matmul)."""
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        B, S, _ = x.shape
        q = attn.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    @staticmethod
    def _attention_out_and_mlp(layer, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        h = h + layer.self_attn.o_proj(o)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _decode_step(self, s: DecodeState, params: SamplingParams) -> None:
        """Feed ``s.token`` of every row, sample the next one, advance. Only in-place writes to ``s``."""
        B = s.token.shape[0]
        group = self.num_heads // self.num_kv_heads
        positions = (s.next_position + s.offset).view(1, B, 1).expand(3, B, 1)
        visible = ((s.slots >= s.start[:, None]) & (s.slots <= s.cursor)).view(B, 1, 1, -1)
        h = self.text.embed_tokens(s.token[:, None])
        cos, sin = self.text.rotary_emb(h, positions)
        for layer, kv in zip(self.text.layers, s.kv):
            q, k, v = self._qkv(layer, h, cos, sin)
            kv[0].index_copy_(2, s.cursor, k)
            kv[1].index_copy_(2, s.cursor, v)
            # GQA without repeating the cache: a kv head's query heads act as its query "positions"
            o = F.scaled_dot_product_attention(q.reshape(B, self.num_kv_heads, group, self.head_dim), kv[0], kv[1],
                                               attn_mask=visible, scale=layer.self_attn.scaling)
            h = self._attention_out_and_mlp(layer, h, o.reshape(B, 1, -1))
        token, logp = sample_tokens(self.lm_head(self.text.norm(h[:, -1])), params, s.generators)
        token = token.masked_fill(s.done, self.pad_token_id)
        s.ids.index_copy_(1, s.offset + 1, token[:, None])
        s.logprobs.index_copy_(1, s.offset + 1, logp.masked_fill(s.done, 0.0)[:, None])
        s.done.logical_or_(token == self.eos_token_id)
        s.token.copy_(token)
        s.offset.add_(1)
        s.cursor.add_(1)

    def _decode(self, s: DecodeState, params: SamplingParams) -> int:
        """Run decode steps until every row has ended or T tokens exist; returns how many columns are filled."""
        T = params.max_new_tokens
        step = self._capture(s, params) if self.lm.device.type == "cuda" and T > 2 else (lambda: self._decode_step(s, params))
        check_every = STOP_CHECK_EVERY if self.lm.device.type == "cuda" else 1
        filled = 1
        while filled < T:
            if (filled - 1) % check_every == 0 and bool(s.done.all()):
                break
            step()
            filled += 1
        return filled

    def _capture(self, s: DecodeState, params: SamplingParams):
        """One decode step recorded as a CUDA graph over ``s``; returns its replay.

        Captured per rollout (a few ms), not kept: a kept graph would pin the KV cache and the graph's
        memory pool through the policy update, which needs that memory.
        """
        saved = [t.clone() for t in (s.token, s.offset, s.cursor, s.done)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._decode_step(s, params)  # warm-up: cuBLAS handles, lazy inits, the allocator's blocks
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        for gen in s.generators or []:
            graph.register_generator_state(gen)  # else each replay would redraw the captured random numbers
        with torch.cuda.graph(graph):
            self._decode_step(s, params)
        # undo the warm-up step; what it wrote to the cache slot and ids column 1 is overwritten by step 0
        for t, v in zip((s.token, s.offset, s.cursor, s.done), saved):
            t.copy_(v)
        return graph.replay
