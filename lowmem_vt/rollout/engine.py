"""In-process rollout on the training weights: one prefill per prompt, a shared-prefix KV cache, CUDA-graph decode.

Decoding a few rows is bound by reading the weights once per token and by the number of kernels launched, so
a decode step does only that: no allocation, no host sync, no Python per kernel, and few, larger kernels.
The engine reads the model's own weights (the decoder layers' projections and norms, the rotary embedding, the
head) and the adapter's A and B of every peft LoRA layer, so the sampler is exactly the policy the trainer
scores; the base weights are neither copied nor modified. Image features come in from the trainer (computed
once per step); the vision tower is never called here.

Per decode step and layer (``DecodeWeights``; the layer's parts as its family names them,
``families.base.QwenVLFamily.engine_layer``): one RMSNorm kernel; the LoRA A matrices of q/k/v in one matmul
and their B matrices in another (block-diagonal, bias and scaling folded in), then one base matmul over q/k/v
adding onto them (the engine lays the three weights out in one storage once, ``lay_out_adjacent``: no copy is
held); the per-head q/k RMSNorms where the family has them (Qwen3-VL); one kernel for rotary + cache write +
the queries' layout; one attention call; o_proj with its adapter
and the residual in three matmuls; the same for gate/up (one base matmul) and down. The adapter runs in the base
dtype (copies made once per rollout; ``tests/test_rollout_engine.py`` bounds the difference to the fp32
adapter peft computes).

Cache layout (``CacheLayout``), per prompt p: ``[prompt slots | completion slots]``. The prompt's K/V is held
once, end-aligned at ``prompt_slots``, and shared by its G samples; completion token j of sample g sits at slot
``prompt_slots + j * G + g``, so what has been written is always a prefix, and attention at step j reads only
the slots up to the end of j's bucket (``decode_bucket`` steps), not the whole cache. Attention runs per prompt:
the queries of its G samples (x the query heads of a kv head) are the query "positions" of one SDPA call over
the shared prefix and the completions, with a mask letting each sample see only its own completion slots.
One CUDA graph is captured per bucket. At each bucket boundary finished rows leave the batch (``_compact``):
prompts whose samples have all ended leave the cache, and each remaining prompt keeps ``width`` rows, the
largest number of samples any prompt still decodes (a prompt with fewer fills its rows with finished samples,
which decode padding into slots nobody else reads). The batch is then ``prompts x width`` rows, so the next
bucket's graph is captured at that batch size, and a long tail costs only the rows still decoding and the
rows padding their prompts. M-RoPE positions are per row: completion token j of prompt p sits at
``next_position_p + j`` on all three axes. DeepStack image features (Qwen3-VL) are added to the prompt's image
positions after the first decoder layers in the prefill; decoding never sees an image token.

One CUDA graph per bucket: the bucket's first step runs eagerly on the capture stream (the warm-up a capture
needs, and a real step), then the step is captured (recorded, not run) and replayed for the bucket's other steps.

Hybrid models (Qwen3.5: three of every four layers Gated DeltaNet linear attention). Full-attention layers hold
K/V as above, with the family's extras: q_proj also carries a sigmoid gate on the attention output, the rotary
embedding covers the first quarter of each head, RMSNorms scale by 1 + weight. A linear-attention layer holds,
per decoding row, a conv state (the last ``kernel - 1`` inputs of its causal conv) and a recurrent state
[value heads, key dim, value dim] in float32, at fixed addresses beside the KV cache (``DecodeState``). The
prefill computes a prompt's states once (the model's own chunked delta rule, flash-linear-attention's kernel
where transformers finds it) and copies them to the prompt's G rows, the analogue of the shared prompt K/V; each
decode step updates them in place (conv window, then the delta rule as batched matmuls, ``delta_rule_step``), so
the same graphs capture them; rows that leave the batch take their states along (``_compact``). A row's state
depends only on its prompt and its own tokens, so nothing pads it: prompts are never left-padded here.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
from ..engine_memory import DECODE_BUCKET, RECURRENT_STATE_DTYPE, CacheLayout, check_engine_memory, linear_attention_dims
from ..families import family_for
from ..inputs import check_image_features
from .base import RolloutBackend, RolloutResult, SamplingParams, finish
from .fused import rms_norm, rope_into_cache, rotate
from .linears import DecodeWeights, lay_out_projections
from .sampling import sample_tokens

LINEAR = "linear_attention"  # a layer kind (families' layer_types): Gated DeltaNet, a conv and a recurrent state
# Checking "every row has ended" is a host sync; on the GPU do it every few steps, not between every replay.
STOP_CHECK_EVERY = 16

@dataclass
class DecodeState:
    """Every tensor a decode step reads or writes, at fixed addresses so CUDA graphs replay them.

    P prompts, G samples each, B = P * G rows, C = layout.slots, T = max_new_tokens. The first ``active``
    prompts of the cache are decoding, with ``width`` rows each (row p * width + i decodes sample ``sample[row]``
    of cache prompt p); ``_compact`` moves the others out. The per-row tensors below are read up to
    ``active * width``. A linear-attention layer's states are per row (a row's state is its sample's alone).
    """

    kv: torch.Tensor  # [attention layers, 2, P, kv_heads, C, head_dim] model dtype: keys, values
    conv: torch.Tensor  # [linear layers, B, conv channels, kernel - 1] model dtype: the conv's last inputs
    recurrent: torch.Tensor  # [linear layers, B, value heads, key dim, value dim] float32: the delta rule's state
    token: torch.Tensor  # [B] long: the token this step feeds
    offset: torch.Tensor  # [1] long: its completion index j
    slot: torch.Tensor  # [1] long: the cache slot sample 0 writes, prompt_slots + j * G
    start: torch.Tensor  # [P] long: first cache slot of the prompt
    next_position: torch.Tensor  # [B] long: M-RoPE position of completion token 0
    rows: torch.Tensor  # [B] long: the output row (p * G + g in the caller's order) of each cache row
    sample: torch.Tensor  # [B] long: the sample g a row decodes (its completion slots are prompt_slots + j * G + g)
    draw: torch.Tensor  # [B] long: p * G + g, the row of its prompt's random draws it samples with
    done: torch.Tensor  # [B] bool: the row has sampled EOS
    slot_step: torch.Tensor  # [C] long: completion index of each slot (-1 for prompt slots)
    slot_sample: torch.Tensor  # [G, C] bool: the slot is a prompt slot or one of sample g's completion slots
    ids: torch.Tensor  # [B, T] long: sampled tokens (pad after EOS), rows in the caller's order
    logprobs: torch.Tensor  # [B, T] float32: their log-probs (0 after EOS)
    layout: CacheLayout
    generators: list[torch.Generator] | None  # one per active prompt (SamplingParams.seeds), else the global RNG
    active: int  # prompts still decoding
    width: int  # rows per active prompt: G until samples have ended in every prompt

    def tensors(self) -> list[torch.Tensor]:
        return [v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)]

    def advancing(self) -> list[torch.Tensor]:
        """What a step changes besides the cache slots it writes, the linear-attention states included (what a
        benchmark restores to time the same step again)."""
        return [self.token, self.offset, self.slot, self.done, self.conv, self.recurrent]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / |x| over the last dim (Gated DeltaNet's q and k normalisation, the eps inside the root as fla's)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def delta_rule_step(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                    beta: torch.Tensor) -> torch.Tensor:
    """One token of the gated delta rule, in place on ``state`` [N, dk, dv] float32 (N = rows x value heads).

    q, k [N, dk] float32 (l2-normalised, q scaled by dk^-0.5), v [N, dv], decay [N] (exp of the gate), beta [N].
    S <- decay * S;  S <- S + k (beta (v - k^T S))^T;  out = q^T S. The state is read and updated by batched
    matmuls with no state-sized temporary (baddbmm_ accumulates the outer product in place). Returns out [N, dv].
    """
    state.mul_(decay[:, None, None])
    remembered = torch.bmm(k[:, None], state)  # [N, 1, dv]
    delta = (v[:, None] - remembered) * beta[:, None, None]
    state.baddbmm_(k[:, :, None], delta)
    return torch.bmm(q[:, None], state)[:, 0]


class CudaGraphs:
    """The CUDA side of decode-step capture. One side stream for the engine's life; a memory pool per rollout
    shared by its graphs (they replay one after another). ``tests/test_rollout_engine.py`` emulates this class
    on CPU (recording the step's operators and replaying them) to test the capture logic around it."""

    def __init__(self):
        self.stream = torch.cuda.Stream()

    def new_pool(self):
        return torch.cuda.graph_pool_handle()

    def get_rng_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.cuda.set_rng_state(state)

    def warm_up(self, step) -> None:
        """One eager run on the side stream: cuBLAS handles, lazy inits, the allocator's blocks."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            step()
        torch.cuda.current_stream().wait_stream(self.stream)

    def synchronize(self) -> None:
        """Before the rollout's last graph is freed: its pool's memory must not be reused while it still runs."""
        torch.cuda.synchronize()

    def capture(self, step, generators, pool):
        graph = torch.cuda.CUDAGraph()
        for gen in generators:
            graph.register_generator_state(gen)  # else each replay would redraw the captured random numbers
        with torch.cuda.graph(graph, pool=pool, stream=self.stream):
            step()
        return graph


class EngineRollout(RolloutBackend):
    """``rollout.backend: engine``. Needs ``lm`` (model.LoadedModel) of a family the engine decodes.

    ``graphs``: how decode steps are captured: "auto" (CUDA graphs on a CUDA device, eager elsewhere), None
    (eager), or a ``CudaGraphs``-like object (the tests' CPU emulation).
    """

    def __init__(self, lm, decode_bucket: int = DECODE_BUCKET, graphs="auto"):
        self.lm = lm
        self.eos_token_id, self.pad_token_id = lm.eos_token_id, lm.pad_token_id
        model = lm.hf_model
        self.family = family_for(model.config)
        self.text = self.family.text_model(model)  # embed_tokens, layers, norm, rotary_emb
        self.layers = [self.family.engine_layer(layer) for layer in self.text.layers]
        self.lm_head = self.family.lm_head(model)
        cfg = self.text.config
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("rollout.backend: engine has no sliding-window attention; the model's config sets use_sliding_window")
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # each layer's index among the layers of its kind: into the KV cache, or into the linear-attention states
        kinds = [layer.kind for layer in self.layers]
        self.state_index = [kinds[:i].count(kind) for i, kind in enumerate(kinds)]
        self.linear = linear_attention_dims(cfg) if LINEAR in kinds else None
        # the model's own delta rules, from the module that defines its layers: the chunked one for the prefill;
        # on a GPU with flash-linear-attention installed, the one-token one for decoding too (transformers runs
        # fla's fused recurrent kernel there). Elsewhere decoding runs delta_rule_step: the torch reference.
        self.chunk_rule = self.recurrent_rule = None
        if self.linear is not None:
            gated_norm = next(p.gated_norm for p in self.layers if p.kind == LINEAR)
            modeling = sys.modules[type(gated_norm).__module__]  # loaded: the layer's own class lives there
            self.chunk_rule = modeling.torch_chunk_gated_delta_rule
            if lm.device.type == "cuda" and importlib.util.find_spec("fla") is not None:
                self.recurrent_rule = modeling.torch_recurrent_gated_delta_rule
        self.decode_bucket = decode_bucket
        # once, for the engine's life: q/k/v and gate/up each become one matmul per decode step
        self.fused_groups = lay_out_projections(self.layers)
        if graphs == "auto":
            graphs = CudaGraphs() if lm.device.type == "cuda" else None
        self.graphs = graphs

    @torch.no_grad()
    def generate(self, prompts, image_embeds, params: SamplingParams) -> RolloutResult:
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        model = self.lm.hf_model
        was_training = model.training
        model.eval()  # LoRA dropout off: the sampler must be the policy the trainer scores
        try:
            state = self._prefill(prompts, image_embeds, params)
            filled = self._decode(state, self.decode_weights(), params)
        finally:
            model.train(was_training)
        out = finish(state.ids[:, :filled], self.eos_token_id, self.pad_token_id, len(prompts), params.num_generations)
        # like HF generate: as long as the longest completion (all rows ended) or max_new_tokens
        T = int(out.completion_mask.sum(dim=1).max())
        mask = out.completion_mask[:, :T]
        return RolloutResult(out.completion_ids[:, :T], mask, out.prompt_rows, state.logprobs[:, :T] * mask)

    def decode_weights(self) -> DecodeWeights:
        """The decode step's view of the weights (the adapter's copies in the base dtype): made per rollout."""
        return DecodeWeights(self.layers, self.text.embed_tokens.weight.dtype)

    # ------------------------------------------------------------------------------------- prefill

    def new_state(self, prompt_lengths: list[int], next_positions: list[int], params: SamplingParams) -> DecodeState:
        """The rollout's static state (what ``engine_allocation_bytes`` accounts for), before any prompt ran."""
        G, T, P = params.num_generations, params.max_new_tokens, len(prompt_lengths)
        if params.seeds is not None and len(params.seeds) != P:
            raise ValueError(f"{len(params.seeds)} sampling seeds for {P} prompts: give one seed per prompt")
        dev = self.lm.device
        dtype = self.text.embed_tokens.weight.dtype
        # checked before anything is allocated: a completion budget far beyond memory is one error line, not an
        # allocation failure (or the host's OOM killer) after the model has loaded
        from torch._subclasses.fake_tensor import FakeTensor

        if not isinstance(self.text.embed_tokens.weight, FakeTensor):  # the memory simulation measures, not allocates
            check_engine_memory(self.text.config, dtype, P, max(prompt_lengths), G, T, dev, "rollout (engine)",
                                shapes=self.family.decoder_linear_shapes(self.text.config))
        lay = CacheLayout.of(P, max(prompt_lengths), G, T, self.decode_bucket)
        B, C = P * G, lay.slots
        long = dict(dtype=torch.long, device=dev)
        slots = torch.arange(C, **long)
        completion = (slots - lay.prompt_slots).clamp_min(0)
        is_prompt = slots < lay.prompt_slots
        linear_layers = sum(layer.kind == LINEAR for layer in self.layers)
        lin = self.linear or dict(conv_channels=0, kernel=1, v_heads=0, k_dim=0, v_dim=0)
        return DecodeState(
            kv=torch.zeros(len(self.layers) - linear_layers, 2, P, self.num_kv_heads, C, self.head_dim, dtype=dtype, device=dev),
            conv=torch.zeros(linear_layers, B, lin["conv_channels"], lin["kernel"] - 1, dtype=dtype, device=dev),
            recurrent=torch.zeros(linear_layers, B, lin["v_heads"], lin["k_dim"], lin["v_dim"], dtype=RECURRENT_STATE_DTYPE,
                                  device=dev),
            token=torch.zeros(B, **long),
            offset=torch.zeros(1, **long),
            slot=torch.full((1,), lay.prompt_slots, **long),
            start=lay.prompt_slots - torch.tensor(prompt_lengths, **long),
            next_position=torch.tensor(next_positions, **long).repeat_interleave(G),
            rows=torch.arange(B, **long),
            sample=torch.arange(G, **long).repeat(P),
            draw=torch.arange(B, **long),
            done=torch.zeros(B, dtype=torch.bool, device=dev),
            slot_step=torch.where(is_prompt, -1, completion // G),
            slot_sample=is_prompt | (completion % G == torch.arange(G, **long)[:, None]),
            ids=torch.full((B, T), self.pad_token_id, **long),
            logprobs=torch.zeros(B, T, dtype=torch.float32, device=dev),
            layout=lay,
            generators=None if params.seeds is None else [torch.Generator(dev).manual_seed(x) for x in params.seeds],
            active=P,
            width=G,
        )

    def _prefill(self, prompts, image_embeds, params: SamplingParams) -> DecodeState:
        """Allocate the state, run each prompt once into its cache slots and its rows' linear-attention states,
        sample token 0 of every row."""
        G = params.num_generations
        s = self.new_state([p.length for p in prompts], [p.next_position for p in prompts], params)
        dev, end = self.lm.device, s.layout.prompt_slots
        last = []
        for i, (prompt, feats) in enumerate(zip(prompts, image_embeds)):
            image = prompt.mm_token_type_ids.to(dev).bool()[None, :, None]
            h = self._prompt_embeds(prompt, image, feats, i)
            cos, sin = self.text.rotary_emb(h, prompt.position_ids.to(dev)[:, None])
            rows = slice(i * G, (i + 1) * G)
            for j, (layer, at) in enumerate(zip(self.layers, self.state_index)):
                x = layer.norm1(h)
                if layer.kind == LINEAR:
                    # the prompt's state once, copied to its G rows (the analogue of the shared prompt KV)
                    o, conv, recurrent = self._linear_attention_prefill(layer, x)
                    s.conv[at, rows] = conv
                    s.recurrent[at, rows] = recurrent
                else:
                    q, k, v, gate = self._qkv(layer, x, cos, sin)
                    kv = s.kv[at]
                    kv[0, i, :, end - prompt.length : end] = k[0]  # held once, read by the prompt's G samples
                    kv[1, i, :, end - prompt.length : end] = v[0]
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.scaling, enable_gqa=True)
                    o = o.transpose(1, 2).reshape(1, prompt.length, -1)
                    if gate is not None:
                        o = o * torch.sigmoid(gate)
                    o = layer.o(o)
                h = h + o
                x = layer.norm2(h)
                h = h + layer.down(layer.act(layer.gate(x)) * layer.up(x))
                if j + 1 < feats.shape[0]:  # DeepStack: level j + 1 joins the image positions after layer j
                    h = h + torch.zeros_like(h).masked_scatter(image, feats[j + 1].to(device=dev, dtype=h.dtype))
            last.append(self.lm_head(self.text.norm(h[:, -1])))
        token, logp = sample_tokens(torch.cat(last).repeat_interleave(G, dim=0), params, s.generators)
        s.ids[:, 0], s.logprobs[:, 0] = token, logp
        s.token.copy_(token)
        s.done.copy_(token == self.eos_token_id)
        return s

    def _prompt_embeds(self, prompt, image: torch.Tensor, feats: torch.Tensor, index: int) -> torch.Tensor:
        """Token embeddings [1, L, H] with the image features (level 0) scattered into the image-token slots
        ``image`` [1, L, 1]."""
        h = self.text.embed_tokens(prompt.input_ids.to(self.lm.device)[None])
        check_image_features(image, feats[0], f"prompt {index}")
        return h.masked_scatter(image, feats[0].to(device=h.device, dtype=h.dtype))

    def _qkv(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Prefill: rotated q [1, heads, L, d], k and v [1, kv_heads, L, d] of the normed hidden states x through the
        model's own modules, and the output gate [1, L, heads * d] (None where the family has none)."""
        B, S, _ = x.shape
        gate = None
        if layer.output_gate:  # q_proj's output: per head, the query then its gate
            q, gate = layer.q(x).view(B, S, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
            gate = gate.reshape(B, S, -1)
        else:
            q = layer.q(x).view(B, S, self.num_heads, self.head_dim)
        k = layer.k(x).view(B, S, self.num_kv_heads, self.head_dim)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = layer.v(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        return rotate(q, cos, sin), rotate(k, cos, sin), v, gate

    def _linear_attention_prefill(self, layer, x: torch.Tensor):
        """Prefill of a Gated DeltaNet layer over one prompt's normed hidden states x [1, L, H]: its output
        [1, L, H], the conv state [conv channels, kernel - 1] (the last inputs, zeros before the prompt) and the
        recurrent state [value heads, key dim, value dim] float32 after the prompt.

        The projections are the model's modules; the chunked delta rule is the model's own
        (``self.chunk_rule``: transformers runs flash-linear-attention's kernel there when it is installed and
        the tensors are on a GPU, its torch implementation otherwise), so the prompt's state is the trainer's.
        """
        lin, L = self.linear, x.shape[1]
        mixed = layer.in_qkv(x).transpose(1, 2)  # [1, channels, L]
        K = lin["kernel"]
        conv_state = F.pad(mixed, (K - 1, 0))[0, :, -(K - 1):]
        weight = layer.conv.weight  # [channels, 1, K]
        mixed = F.silu(F.conv1d(mixed.to(weight.dtype), weight, None, padding=K - 1, groups=weight.shape[0])[..., :L])
        mixed = mixed.to(x.dtype).transpose(1, 2)
        kd, vd = lin["k_heads"] * lin["k_dim"], lin["v_heads"] * lin["v_dim"]
        q, k, v = mixed.split([kd, kd, vd], dim=-1)
        # q / k repeated to the value heads here: transformers >= 5.18's rules repeat them inside, 5.17's expect it done
        rep = lin["v_heads"] // lin["k_heads"]
        q = q.reshape(1, L, lin["k_heads"], lin["k_dim"]).repeat_interleave(rep, dim=2)
        k = k.reshape(1, L, lin["k_heads"], lin["k_dim"]).repeat_interleave(rep, dim=2)
        v = v.reshape(1, L, lin["v_heads"], lin["v_dim"])
        beta = layer.in_b(x).sigmoid()
        g = -layer.A_log.float().exp() * F.softplus(layer.in_a(x).float() + layer.dt_bias)
        o, recurrent = self.chunk_rule(q, k, v, g=g, beta=beta, initial_state=None, output_final_state=True,
                                        use_qk_l2norm_in_kernel=True)
        z = layer.in_z(x)
        o = layer.gated_norm(o.reshape(-1, lin["v_dim"]), z.reshape(-1, lin["v_dim"])).reshape(1, L, -1)
        return layer.out(o), conv_state, recurrent[0]

    # -------------------------------------------------------------------------------------- decode

    def _decode_step(self, s: DecodeState, w: DecodeWeights, params: SamplingParams, prompts: int, span: int) -> None:
        """Feed ``s.token`` of the first ``prompts`` prompts' rows (``s.width`` each), sample the next tokens, advance.

        Attention reads the first ``span`` cache slots. Only in-place writes to ``s``; shapes fixed by
        (prompts, width, span), so one CUDA graph per bucket replays it.
        """
        G, W = s.layout.samples, s.width
        B, group = prompts * W, self.num_heads // self.num_kv_heads
        token, done, rows, sample = s.token[:B], s.done[:B], s.rows[:B], s.sample[:B]
        x = self.text.embed_tokens(token)  # [B, H]
        positions = (s.next_position[:B] + s.offset).view(1, B, 1).expand(3, B, 1)
        cos, sin = self.text.rotary_emb(x[:, None], positions)
        cos, sin = cos[:, 0], sin[:, 0]
        # [prompts, 1, W * group, span]: each row's queries see the prompt and its own sample's completion slots so far
        visible = s.slot_sample[:, :span][sample] & (s.slot_step[:span] <= s.offset)  # [B, span]
        visible = visible.view(prompts, W, span) & (torch.arange(span, device=x.device) >= s.start[:prompts, None])[:, None]
        visible = visible[:, None, :, None].expand(prompts, 1, W, group, span).reshape(prompts, 1, W * group, span)
        mask = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill_(~visible, float("-inf"))
        h = x
        for lw, at in zip(w.layers, self.state_index):
            x = rms_norm(h, lw.norm1.weight, _eps(lw.norm1), lw.norm_offset != 0)
            if lw.kind == LINEAR:
                o = self._linear_attention_step(lw, x, s.conv[at, :B], s.recurrent[at, :B])
                (h,) = lw.out(o, residual=h)
            else:
                kv = s.kv[at]
                q, k, v = lw.qkv(x)
                gate = None
                if lw.output_gate:
                    q, gate = q.view(B, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
                    q, gate = q.reshape(B, -1), gate.reshape(B, -1)
                if lw.q_norm is not None:  # per head, as one [rows x heads, d] RMSNorm each
                    q = rms_norm(q.reshape(-1, self.head_dim), lw.q_norm.weight, _eps(lw.q_norm), lw.norm_offset != 0).view(B, -1)
                    k = rms_norm(k.reshape(-1, self.head_dim), lw.k_norm.weight, _eps(lw.k_norm), lw.norm_offset != 0).view(B, -1)
                q = rope_into_cache(q, k, v, cos, sin, kv[0, :prompts], kv[1, :prompts], s.slot, sample, W)
                o = F.scaled_dot_product_attention(q, kv[0, :prompts, :, :span], kv[1, :prompts, :, :span], attn_mask=mask,
                                                   scale=lw.scaling)
                o = o.unflatten(2, (W, group)).transpose(1, 2).reshape(B, -1)
                if gate is not None:
                    o = o * torch.sigmoid(gate)
                (h,) = lw.o(o, residual=h)
            gate_, up = lw.gate_up(rms_norm(h, lw.norm2.weight, _eps(lw.norm2), lw.norm_offset != 0))
            (h,) = lw.down(lw.act(gate_) * up, residual=h)
        norm = self.text.norm
        logits = self.lm_head(rms_norm(h, norm.weight, _eps(norm), self.layers[0].norm_offset != 0))
        # with rows gone from some prompt, each prompt's generator still draws for all G samples (see sample_tokens)
        picks = s.draw[:B] if s.generators is not None and W < G else None
        token_next, logp = sample_tokens(logits, params, s.generators, picks, G)
        token_next = token_next.masked_fill(done, self.pad_token_id)
        column = (s.offset + 1).expand(B)
        # a padding row (a finished sample) writes padding and 0 where its completion already has them
        s.ids.index_put_((rows, column), token_next)
        s.logprobs.index_put_((rows, column), logp.masked_fill(done, 0.0))
        done.logical_or_(token_next == self.eos_token_id)
        token.copy_(token_next)
        s.offset.add_(1)
        s.slot.add_(G)

    def _linear_attention_step(self, lw, x: torch.Tensor, conv: torch.Tensor, recurrent: torch.Tensor) -> torch.Tensor:
        """One token of a Gated DeltaNet layer for rows x [B, H] (normed): updates the rows' conv state
        [B, channels, kernel - 1] and recurrent state [B, value heads, key dim, value dim] in place and returns
        the gated-normed output [B, value heads * value dim], before out_proj."""
        lin, B = self.linear, x.shape[0]
        qkv, z, b, a = lw.in_proj(x)
        window = torch.cat((conv, qkv[:, :, None].to(conv.dtype)), dim=-1)  # [B, channels, kernel]
        conv.copy_(window[:, :, 1:])
        weight = lw.conv.weight
        mixed = F.silu(F.conv1d(window.to(weight.dtype), weight, None, groups=weight.shape[0]))[:, :, 0].to(x.dtype)
        Hk, Hv, dk, dv = lin["k_heads"], lin["v_heads"], lin["k_dim"], lin["v_dim"]
        q, k, v = mixed.split([Hk * dk, Hk * dk, Hv * dv], dim=-1)
        g = -lw.A_log.float().exp() * F.softplus(a.float() + lw.dt_bias)  # the log of the decay, [B, Hv]
        if self.recurrent_rule is not None:  # flash-linear-attention's fused kernel (GPU): a new state, copied in
            rep = Hv // Hk  # repeated here for transformers 5.17's rule (5.18+ repeats inside: then a no-op)
            o, new_state = self.recurrent_rule(q.view(B, 1, Hk, dk).repeat_interleave(rep, dim=2),
                                               k.view(B, 1, Hk, dk).repeat_interleave(rep, dim=2), v.view(B, 1, Hv, dv),
                                               g=g[:, None], beta=b.sigmoid()[:, None], initial_state=recurrent,
                                               output_final_state=True, use_qk_l2norm_in_kernel=True)
            recurrent.copy_(new_state)
            o = o.reshape(B * Hv, dv)
        else:
            q, k = (l2norm(t.reshape(B, Hk, dk).float()).repeat_interleave(Hv // Hk, dim=1) for t in (q, k))
            o = delta_rule_step(recurrent.view(B * Hv, dk, dv), q.reshape(-1, dk) * dk**-0.5, k.reshape(-1, dk),
                                v.reshape(B * Hv, dv).float(), g.exp().reshape(-1), b.sigmoid().float().reshape(-1))
        o = lw.gated_norm(o.to(x.dtype), z.reshape(B * Hv, dv))
        return o.view(B, Hv * dv)

    def _compact(self, s: DecodeState) -> None:
        """Let finished rows leave the batch (a host sync): prompts whose samples have all ended move out of the
        first ``s.active``, and the others keep ``s.width`` = the most samples any of them still decodes.

        A prompt decoding fewer samples than the width fills its other rows with its finished samples (done, so
        they write padding, into slots only they read). Rows keep their prompt's order and their samples'
        order, so the step's results do not depend on when rows left (``tests/test_rollout_engine.py``).
        """
        G, W, n = s.layout.samples, s.width, s.active
        B = n * W
        done, sample = s.done[:B].view(n, W).tolist(), s.sample[:B].view(n, W).tolist()
        decoding = [sorted(g for g, ended in zip(samples, row) if not ended) for samples, row in zip(sample, done)]
        keep = [p for p in range(n) if decoding[p]]
        width = max((len(decoding[p]) for p in keep), default=0)
        if len(keep) == n and width == W:
            return
        for new, old in enumerate(keep):
            if new != old:  # keep is increasing, so nothing is overwritten before it moves
                s.kv[:, :, new].copy_(s.kv[:, :, old])
                s.start[new] = s.start[old]
        # the new rows: each kept prompt's decoding samples, then finished ones; src = an old row of the prompt
        src, samples, padding = [], [], []
        for old in keep:
            by_sample = {g: old * W + i for i, g in enumerate(sample[old])}
            finished = [g for g in range(G) if g not in decoding[old]]
            # at full width rows keep their samples' order: a prompt's generator then draws for its rows in order
            chosen = list(range(G)) if width == G else decoding[old] + finished[: width - len(decoding[old])]
            samples += chosen
            src += [by_sample.get(g, old * W) for g in chosen]
            padding += [g not in decoding[old] for g in chosen]
        dev, B_new = s.token.device, len(src)
        src_t = torch.tensor(src, dtype=torch.long, device=dev)
        prompt_of = s.rows[:B].index_select(0, src_t) // G  # the caller's prompt index of each new row
        sample_t = torch.tensor(samples, dtype=torch.long, device=dev)
        for t in (s.token, s.next_position):
            t[:B_new] = t[:B].index_select(0, src_t)
        for t in (s.conv, s.recurrent):  # a row's linear-attention state moves with it
            t[:, :B_new] = t[:, :B].index_select(1, src_t)
        s.done[:B_new] = torch.tensor(padding, dtype=torch.bool, device=dev)
        s.rows[:B_new] = prompt_of * G + sample_t
        s.sample[:B_new] = sample_t
        s.draw[:B_new] = torch.arange(len(keep), device=dev).repeat_interleave(width) * G + sample_t
        if s.generators is not None:
            s.generators = [s.generators[p] for p in keep]
        s.active, s.width = len(keep), width

    def _decode(self, s: DecodeState, w: DecodeWeights, params: SamplingParams) -> int:
        """Run decode steps until every row has ended or T tokens exist; returns how many columns are filled."""
        T, lay = params.max_new_tokens, s.layout
        check_every = STOP_CHECK_EVERY if self.graphs is not None else 1
        pool = self.graphs.new_pool() if self.graphs is not None else None
        filled = 1  # column 0 came from the prefill; step j feeds column j and fills column j + 1
        try:
            while filled < T:
                self._compact(s)  # a host sync: the previous bucket's graph has finished before it is dropped
                if s.active == 0:
                    break
                j = filled - 1
                steps = min((j // lay.bucket + 1) * lay.bucket, T - 1) - j
                step = partial(self._decode_step, s, w, params, s.active, lay.span(j))
                if self.graphs is not None and steps > 2:
                    # the bucket's first step runs eagerly on the capture stream (cuBLAS handles, lazy inits, the
                    # allocator's blocks), then the graph records the step without running it
                    self.graphs.warm_up(step)
                    filled += 1
                    steps -= 1
                    step = self.graphs.capture(step, s.generators or [], pool).replay
                for i in range(steps):
                    if i and i % check_every == 0 and bool(s.done[: s.active * s.width].all()):
                        return filled
                    step()
                    filled += 1
            return filled
        finally:
            if self.graphs is not None:
                self.graphs.synchronize()


def _eps(norm) -> float:
    """An RMSNorm module's epsilon (Qwen2RMSNorm names it variance_epsilon, Qwen3.5's RMSNorm eps)."""
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
