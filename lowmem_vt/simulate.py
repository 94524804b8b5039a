"""GPU memory of a recipe step measured without a GPU: the step's own code on fake tensors.

The model is built from its config alone (``planner.config_for``: a local ``config.json`` or a published
model's config carried by its family, ``families``) with ``FakeTensorMode`` parameters: tensors with shapes, dtypes and storage sizes but
no data. The trainer's phases then run through the project's real functions (``model.image_embeddings``,
``model.sequence_hidden``, ``kernels.token_logprobs`` / ``fused_grpo_loss``, the optimizer of
``trainer.make_optimizer``) while a dispatch mode counts the bytes of every live storage, rounded up to the
CUDA caching allocator's 512 B blocks. The peak of each phase is what ``torch.cuda.max_memory_allocated``
would report on the GPU for the same shapes (it does not see the CUDA context either).

The rollout phase: with ``rollout.backend: engine`` the engine's own code runs (its state, every prompt's
prefill, and the decode step with the most to hold: every row still decoding, attention over the last
bucket's span), so its peak is simulated too; HF generate's (``hf``) stays analytic
(``planner.rollout_bytes``): its control flow depends on values.

What the simulation does not see, and the GPU adds (see ``UNMODELLED``): the CUDA context, allocator
fragmentation and cuBLAS workspaces, flash-attention's fp32 ``dq_accum`` in the backward (sdpa on CPU has
none), and bitsandbytes' paged optimizer state, which lives in managed memory outside the allocator.

    lowmem-vt plan recipes/sat_lora.yaml --simulate
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from .config import RecipeConfig
from .planner import (GIB, NF4_BYTES_PER_PARAM, Plan, config_for, model_shape, plan, prompt_tokens, rollout_bytes,
                      vision_activation_bytes)

BLOCK = 512  # the CUDA caching allocator rounds every allocation up to 512 bytes

UNMODELLED = (
    "not simulated, add on a GPU: CUDA context ~0.5 GiB (the planner counts it), allocator fragmentation and "
    "cuBLAS workspaces (typically 0.1-0.5 GiB), flash-attention's fp32 dq_accum in the backward when "
    "flash-attn is installed (~tokens x heads x head_dim x 4 B), and bitsandbytes' paged optimizer state (managed memory)"
)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every live tensor storage created by an op inside it; tracks the peak.

    A storage is counted once however many views share it and uncounted when it is freed (weakref
    callback). Storages marked with ``exclude`` (host copies) are never counted.
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()
        self._host = WeakIdKeyDictionary()

    def _free(self, nbytes: int, _ref) -> None:
        self.current -= nbytes

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._seen or st in self._host:
            return
        nbytes = math.ceil(st.nbytes() / BLOCK) * BLOCK
        self._seen[st] = weakref.ref(st, lambda ref, n=nbytes: self._free(n, ref))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def exclude(self, t: torch.Tensor) -> None:
        """Never count ``t``'s storage (it stands for host memory)."""
        st = t.untyped_storage()
        if st in self._seen:
            self.current -= math.ceil(st.nbytes() / BLOCK) * BLOCK
            self._seen.pop(st)
        self._host[st] = True

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        workspace = op_workspace_bytes(func, args)
        if workspace:  # allocated and freed inside the op, beside its outputs
            self.peak = max(self.peak, self.current + math.ceil(workspace / BLOCK) * BLOCK)
        return out


def op_workspace_bytes(func, args) -> int:
    """Bytes a custom op allocates and frees inside itself, which its fake implementation does not: the
    fused-linear loss head's fp32 logits scratch (``min(chunk_rows, N)`` rows of V) and, where the op forms dh (the
    GRPO op; the log-prob op with ``compute_dh``), one chunk's gathered hidden rows and ``dlogits @ W`` in fp32; the
    streaming backward's fp32 accumulators of dh [N, H] (and dW [V, H]), which it returns cast to the inputs' dtype."""
    return sum(_op_workspace_parts(func, args))


def _op_workspace_parts(func, args) -> tuple[int, int]:
    """``op_workspace_bytes`` as (its vocabulary-sized part: the [rows, V] logits scratch or dW's [V, H]; the rest)."""
    name = getattr(func, "name", lambda: "")()
    if name == "lowmem_vt::streaming_logprobs_backward":
        hidden, weight, compute_dh, compute_dw = args[0], args[1], args[7], args[8]
        return (weight.numel() * 4 if compute_dw else 0), (hidden.numel() * 4 if compute_dh else 0)
    if name not in ("lowmem_vt::fused_linear_logprobs", "lowmem_vt::fused_linear_grpo_loss"):
        return 0, 0
    hidden, weight = args[0], args[1]
    logprobs_op = name == "lowmem_vt::fused_linear_logprobs"
    chunk_rows = args[4] if logprobs_op else args[12]
    rows = min(chunk_rows, hidden.shape[0])
    scratch = rows * weight.shape[0] * 4
    if logprobs_op and not (len(args) > 8 and args[8]):  # compute_dh
        return scratch, 0
    return scratch, rows * hidden.shape[1] * (hidden.element_size() + 4)


class _HeadBytes(LiveBytes):
    """LiveBytes that also keeps the peak of the vocabulary-sized part: storages of tensors with a dimension of
    ``vocab`` and the fused-linear head's logits scratch."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.vocab_current = 0
        self.vocab_peak = 0

    def _free_vocab(self, nbytes: int, _ref) -> None:
        self.vocab_current -= nbytes

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        fresh = st not in self._seen and st not in self._host
        super().track(t)
        if fresh and self.vocab in t.shape:
            nbytes = math.ceil(st.nbytes() / BLOCK) * BLOCK
            weakref.finalize(st, self._free_vocab, nbytes, None)
            self.vocab_current += nbytes
            self.vocab_peak = max(self.vocab_peak, self.vocab_current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        scratch, _ = _op_workspace_parts(func, args)
        self.vocab_peak = max(self.vocab_peak, self.vocab_current + math.ceil(scratch / BLOCK) * BLOCK)
        return out


# the loss head's paths, as ``kernels/head.py`` dispatches them
HEAD_PATHS = ("paper loss, fused", "log-prob head (rest of the menu)", "log-prob head + entropy", "reference pass")


@dataclass(frozen=True)
class HeadMemory:
    held: int  # peak bytes above the inputs (hidden, weight, targets, ...), forward and backward
    vocab: int  # peak of its vocabulary-sized part: the [rows, V] logits scratch and any tensor with a V dimension


def head_memory(path: str, backend: str, vocab: int, hidden_size: int, B: int = 8, T: int = 1024,
                dtype: torch.dtype = torch.bfloat16) -> HeadMemory:
    """Simulated memory of one loss-head path (``HEAD_PATHS``) of ``backend`` on a [B, T] micro-batch, on fake tensors
    (no Triton launch; the custom ops' workspace by ``op_workspace_bytes``): the LM head frozen, as under LoRA, every
    token active. "paper loss, fused": grpo with beta 0.04; "log-prob head": the sequence-level ratio (GSPO), whose
    loss runs on the [B, T] log-probs; "+ entropy": the entropy mask (``top_entropy_quantile`` 0.2), each token's
    entropy from the head; "reference pass": ``token_logprobs``, no gradient."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .grpo import LossCounts, LossVariant
    from .kernels.head import fused_grpo_loss, token_logprobs

    if path not in HEAD_PATHS:
        raise ValueError(f"unknown head path {path!r}; expected one of {HEAD_PATHS}")
    N = B * T
    variant = {"log-prob head (rest of the menu)": LossVariant(importance_sampling_level="sequence"),
               "log-prob head + entropy": LossVariant(top_entropy_quantile=0.2)}.get(path, LossVariant())
    loss_args = dict(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo",
                     counts=LossCounts(num_sequences=B, num_tokens=float(N), max_completion_length=T))
    with FakeTensorMode():
        hidden = torch.empty(B, T, hidden_size, dtype=dtype, requires_grad=path != "reference pass")
        weight = torch.empty(vocab, hidden_size, dtype=dtype)
        targets = torch.zeros(B, T, dtype=torch.long)
        mask, old, ref, advantages = torch.ones(B, T), torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B)
        tracker = _HeadBytes(vocab)
        for t in (hidden, weight, targets, mask, old, ref, advantages):
            tracker.exclude(t)  # the inputs: views of them (hidden.view(N, H)) are not new memory
        with tracker:
            if path == "reference pass":
                token_logprobs(hidden, weight, targets, backend=backend)
            else:
                loss, _, _ = fused_grpo_loss(hidden, weight, targets, mask, advantages, old, ref, backend=backend,
                                             variant=variant, **loss_args)
                loss.backward()
    return HeadMemory(tracker.peak, tracker.vocab_peak)


@dataclass
class Simulation:
    peaks: dict[str, float] = field(default_factory=dict)  # GiB per phase, whole-process live bytes
    resident: float = 0.0  # GiB live before the step: weights, adapter, optimizer state
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.peaks.values())


LEVERS = ("adapter in base dtype", "vision tower off the GPU", "checkpointed inputs offloaded")


def simulate(cfg: RecipeConfig, config=None, *, prompt_len: int | None = None, without: tuple[str, ...] = ()) -> Simulation:
    """Run one step of ``cfg`` on fake tensors (device ``cpu``; no data, no weights); peaks per phase.

    Every completion has the full ``max_completion_length`` (the worst case the planner also sizes for);
    the prompt is the planner's worst case unless ``prompt_len`` is given. ``without``: levers of
    ``LEVERS`` to turn off, to measure what each saves.
    """
    unknown = set(without) - set(LEVERS)
    if unknown:
        raise ValueError(f"unknown levers {sorted(unknown)}; expected some of {LEVERS}")
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = config if config is not None else config_for(cfg)
    shape = model_shape(config, cfg.lora.r, cfg.lora.target_modules)
    L = prompt_len if prompt_len is not None else prompt_tokens(cfg, shape)
    T = cfg.grpo.max_completion_length
    sim = Simulation()
    tracker = LiveBytes()
    with FakeTensorMode(allow_non_fake_inputs=True), tracker, _fake_friendly():
        lm = _fake_model(cfg, config, tracker, without)
        optimizer = _optimizer(cfg, lm, tracker)
        with _outside_modes():  # real-valued inputs, built as the trainer builds them on the host
            prompt = _prompt(cfg, config, shape, L)
            n_image = int(prompt.mm_token_type_ids.sum())
        sim.resident = tracker.current / GIB
        _run_step(cfg, lm, optimizer, prompt, n_image, T, tracker, sim)
    sim.notes.append(f"prompt {L} tokens, completion {T} (every completion full length), micro-batch "
                     f"{cfg.train.micro_batch_size}, G {cfg.grpo.num_generations}, kernels {_kernel_backend(cfg)}")
    return sim


def _kernel_backend(cfg: RecipeConfig) -> str:
    return "triton" if cfg.kernels == "auto" else cfg.kernels  # "auto" is triton on the GPU being simulated


@contextlib.contextmanager
def _fake_friendly():
    """AdamW's bias correction reads the step count (a host scalar, no GPU memory): step 1 on fake tensors."""
    import importlib

    from torch._subclasses.fake_tensor import is_fake

    adam = importlib.import_module("torch.optim.adam")
    get_value = adam._get_value
    with mock.patch.object(adam, "_get_value", lambda x: 1.0 if is_fake(x) else get_value(x)):
        yield


def _fake_model(cfg: RecipeConfig, config, tracker: LiveBytes, without: tuple[str, ...]):
    """The recipe's model (NF4 stand-ins for QLoRA, LoRA attached as ``model.load_model`` does) with fake
    weights: built on the meta device, then every tensor made a fake one on ``cpu`` (call inside the mode)."""
    from .families import family_for
    from .model import DTYPES, LoadedModel, attach_adapter, offload_checkpointed_inputs, offload_vision

    dtype = DTYPES[cfg.model.dtype]
    config = copy.deepcopy(config)
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "sdpa"
    family = family_for(config)
    with _outside_modes(), torch.device("meta"):
        model = family.model_class()._from_config(config, dtype=dtype)
        family.prepare_for_fake_tensors(model)
        if cfg.model.quantization == "nf4":
            _nf4_stand_ins(family.text_model(model).layers, dtype)
        model.requires_grad_(False)
        peft_model = attach_adapter(model, cfg.model, cfg.lora, trainable=True)
        if "adapter in base dtype" in without:
            _adapter_in_fp32(peft_model)
    _materialize_fake(peft_model)
    lm = LoadedModel(peft_model, None, None, torch.device("cpu"), [0])
    # load_model does these on CUDA
    if "vision tower off the GPU" not in without:
        offload_vision(lm, host_copy=lambda t: _host_copy(t, tracker))
    if "checkpointed inputs offloaded" not in without and cfg.model.gradient_checkpointing:
        offload_checkpointed_inputs(lm.hf_model, host_copy=lambda t: (_host_copy(t, tracker), None))
    return lm


@contextlib.contextmanager
def _outside_modes():
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def _adapter_in_fp32(peft_model) -> None:
    """peft's own behaviour: LoRA inputs cast to the adapter's fp32 (what compute_adapter_in_input_dtype undoes)."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = True
            for linear in (*module.lora_A.values(), *module.lora_B.values()):
                linear.__class__ = torch.nn.Linear


def _materialize_fake(model: torch.nn.Module) -> None:
    """Meta parameters and buffers -> fake ones on ``cpu`` (inside FakeTensorMode), tied ones kept tied."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(module, kind).items():
                if t is None:
                    continue
                if id(t) not in done:
                    new = torch.empty_like(t, device="cpu")
                    done[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if kind == "_parameters" else new
                getattr(module, kind)[name] = done[id(t)]


def _host_copy(t: torch.Tensor, tracker: LiveBytes) -> torch.Tensor:
    host = t.clone()
    tracker.exclude(host)
    return host


class NF4StandIn(torch.nn.Linear):
    """bitsandbytes' Linear4bit as far as memory goes: packed 4-bit weight + absmax storage, and a forward
    and backward that dequantize the whole weight to the compute dtype for one matmul (as ``MatMul4Bit``)."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        n = linear.weight.numel()
        nbytes = math.ceil(n * NF4_BYTES_PER_PARAM)
        self.weight = torch.nn.Parameter(torch.empty(nbytes, 1, dtype=torch.uint8), requires_grad=False)
        self.bias = linear.bias
        self.compute_dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantMatmul.apply(x, self.weight, self.out_features, self.in_features, self.compute_dtype)
        if self.bias is not None:
            out = out + self.bias
        # peft's Linear4bit LoRA layer clones the base output ("defensively", for 4-bit backends)
        return out.clone()


class _DequantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, out_features, in_features, dtype):
        ctx.save_for_backward(packed)
        ctx.shape = (out_features, in_features, dtype)
        w = torch.empty(out_features, in_features, dtype=dtype)  # dequantize_4bit's output
        return torch.nn.functional.linear(x, w)

    @staticmethod
    def backward(ctx, grad):
        out_features, in_features, dtype = ctx.shape
        w = torch.empty(out_features, in_features, dtype=dtype)
        return grad @ w, None, None, None, None


def _nf4_stand_ins(layers: torch.nn.Module, dtype: torch.dtype) -> None:
    """Replace the language model's linears (its decoder ``layers``; not the vision tower, not the head) as
    load_model's NF4 does."""
    for mod in list(layers.modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(mod, cname, NF4StandIn(child, dtype))


def _optimizer(cfg: RecipeConfig, lm, tracker: LiveBytes):
    """The recipe's optimizer; bitsandbytes' 8-bit AdamW by a stand-in with its state sizes (paged: host)."""
    from .model import trainable_parameters
    from .trainer import make_optimizer

    params = trainable_parameters(lm.peft_model)
    if cfg.train.optimizer == "adamw":
        opt = make_optimizer(params, cfg)
        for group in opt.param_groups:
            group["foreach"] = True  # torch's default for CUDA parameters (and its temporaries)
    else:
        opt = _Adam8bitStandIn(params, paged=cfg.train.optimizer == "paged_adamw_8bit", tracker=tracker)
    # a step in the steady state: the optimizer's state exists from the previous step
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


class _Adam8bitStandIn:
    """bitsandbytes' blockwise 8-bit AdamW as far as memory goes: two uint8 states and an fp32 absmax per
    256-value block for each parameter, updated in place. Paged states live in managed memory (host here)."""

    def __init__(self, params, *, paged: bool, tracker: LiveBytes):
        self.params = list(params)
        self.paged = paged
        self.tracker = tracker
        self.state: list[tuple[torch.Tensor, ...]] = []

    @torch.no_grad()
    def step(self) -> None:
        if not self.state:
            for p in self.params:
                n = p.numel()
                st = (torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8),
                      torch.empty(2 * math.ceil(n / 256), dtype=torch.float32))
                if self.paged:
                    for s in st:
                        self.tracker.exclude(s)
                self.state.append(st)
        for p in self.params:
            p.add_(p.grad)  # the fused kernel updates in place; no temporaries

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def _prompt(cfg: RecipeConfig, config, shape, L: int):
    """A real-valued prompt of L tokens: for each of ``data.max_images_per_question`` images, vision_start, the
    image tokens of the largest image max_pixels allows (as the planner counts them), vision_end; then text."""
    from .families import family_for
    from .inputs import PromptInputs

    merge, patch = shape.merge, shape.patch
    k = cfg.data.max_images_per_question
    n_img = max(1, min(cfg.data.max_pixels // (patch * merge) ** 2, (L - 2 * k) // k))
    rows = next(d for d in range(math.isqrt(n_img), 0, -1) if n_img % d == 0)
    h, w = rows * merge, (n_img // rows) * merge  # the grid in patches
    ids = ([config.vision_start_token_id] + [config.image_token_id] * n_img + [config.vision_end_token_id]) * k
    ids += [1000 % config.text_config.vocab_size] * (L - len(ids))
    ids = torch.tensor(ids)
    types = (ids == config.image_token_id).int()
    grid = torch.tensor([[1, h, w]] * k)
    pos, nxt = family_for(config).positions(types, grid, config)
    channels = config.vision_config.in_channels * config.vision_config.temporal_patch_size * patch * patch
    pixels = torch.zeros(k * h * w, channels)
    return PromptInputs(ids, types, pos, pixels, grid, nxt)


def _phase(sim: Simulation, tracker: LiveBytes, name: str, fn):
    tracker.reset_peak()
    out = fn()
    sim.peaks[name] = tracker.peak / GIB
    return out


def _run_step(cfg: RecipeConfig, lm, optimizer, prompt, n_image: int, T: int, tracker: LiveBytes, sim: Simulation) -> None:
    """Trainer.step's phases in its order; every prompt of the step is ``prompt`` (every micro-batch the same)."""
    from .grpo import LossCounts, LossVariant, SamplerCorrection
    from .inputs import build_sequences
    from .kernels.head import fused_grpo_loss, token_logprobs
    from .model import sequence_hidden, vision_on_device

    g, t = cfg.grpo, cfg.train
    backend = _kernel_backend(cfg)
    G, mb, n_prompts = g.num_generations, t.micro_batch_size, t.prompts_per_step
    shape = model_shape(lm.config, cfg.lora.r, cfg.lora.target_modules)

    def vision():
        # the tower's weights come in through the real offload code; its activations are analytic (its
        # index arithmetic reads grid values, which fake tensors do not have). One call for every prompt.
        with vision_on_device(lm):
            patches = prompt.pixel_values.shape[0] * n_prompts
            workspace = torch.empty(vision_activation_bytes(shape, patches, cfg), dtype=torch.uint8)
            embeds = [torch.empty(shape.feature_levels, n_image, shape.hidden, dtype=lm.lm_head_weight.dtype)
                      for _ in range(n_prompts)]
            del workspace
        return embeds

    embeds = _phase(sim, tracker, "vision", vision)
    if cfg.rollout.backend in ("engine", "auto"):  # auto: the engine when it passes its self-check (hf holds less)
        _phase(sim, tracker, "rollout", lambda: _engine_rollout(cfg, lm, prompt, embeds, T))
        sim.notes.append("rollout simulated: the engine's state, prefill of every prompt and its largest decode step")
    else:
        sim.peaks["rollout"] = (tracker.current + rollout_bytes(cfg, shape, prompt.length, T)) / GIB  # analytic
        sim.notes.append(f"rollout analytic (planner.rollout_bytes): {cfg.rollout.backend} is not simulated")

    B = min(mb, G * n_prompts)  # one micro-batch; every micro-batch of the step has the same shape
    with _outside_modes():
        completion = torch.full((B, T), 1000 % shape.vocab, dtype=torch.long)
        mask = torch.ones(B, T)
        seqs = build_sequences([prompt] * n_prompts, [i // G for i in range(B)], completion, mask, 0)
        advantages = torch.zeros(B)
    # the padding mask as a fake tensor: a model that tests it for padding (Qwen3.5's linear-attention layers zero
    # padded positions unless every value is 1) takes its padded path, the worst case, without reading values
    seqs.attention_mask = seqs.attention_mask.clone()
    head = lm.lm_head_weight
    micro_steps = math.ceil(G * n_prompts / B)

    def reference():
        with torch.no_grad(), lm.peft_model.disable_adapter():
            return token_logprobs(sequence_hidden(lm, seqs, embeds), head, completion, g.temperature, backend)

    ref = _phase(sim, tracker, "reference pass", reference)
    counts = LossCounts(float(G * n_prompts), float(G * n_prompts * T), T)
    # the recipe's loss as the trainer runs it (auto: the correction of the engine, the larger graph)
    correction = SamplerCorrection("token_truncate" if g.sampler_correction == "auto" else g.sampler_correction,
                                   g.sampler_correction_clip_min, g.sampler_correction_clip_max)

    def ref_like():
        return torch.zeros(completion.shape, dtype=torch.float32, device=completion.device)

    def update():
        # two micro-steps: the second runs with the first's gradients resident, as every later one does
        for _ in range(min(2, micro_steps)):
            hidden = sequence_hidden(lm, seqs, embeds)
            loss, _, _ = fused_grpo_loss(hidden, head, completion, mask, advantages, None,
                                         ref if g.beta > 0 else None, beta=g.beta, epsilon_low=g.epsilon,
                                         epsilon_high=g.epsilon if g.epsilon_high is None else g.epsilon_high,
                                         loss_type=g.loss_type, counts=counts, temperature=g.temperature, backend=backend,
                                         variant=LossVariant.of(g), correction=correction,
                                         sampling_logp=ref_like() if correction.on else None)
            loss.backward()
            del hidden, loss

    _phase(sim, tracker, "policy update", update)
    _phase(sim, tracker, "optimizer step", optimizer.step)
    optimizer.zero_grad(set_to_none=True)


def _engine_rollout(cfg: RecipeConfig, lm, prompt, embeds, T: int) -> None:
    """``rollout.backend: engine`` as far as memory goes: the rollout's state, every prompt's prefill, then the
    decode step that holds the most (every row decoding, attention over the last bucket's span). The steps
    before it hold the same state and read less; which rows end is value-dependent and only shrinks the batch."""
    import dataclasses
    from types import SimpleNamespace

    from .rollout import SamplingParams
    from .rollout.engine import EngineRollout

    g = cfg.grpo
    engine = EngineRollout(dataclasses.replace(lm, tokenizer=SimpleNamespace(eos_token_id=0, pad_token_id=0)), graphs=None)
    params = SamplingParams(g.num_generations, T, g.temperature, cfg.rollout.top_p, cfg.rollout.top_k)
    with torch.no_grad():
        state = engine._prefill([prompt] * cfg.train.prompts_per_step, embeds, params)
        weights = engine.decode_weights()
        engine._decode_step(state, weights, params, state.active, state.layout.span(T - 1))
    del state, weights


def compare(cfg: RecipeConfig, config=None, sim: Simulation | None = None) -> tuple[Plan, Simulation, str]:
    """The planner's prediction beside the simulation, per phase, as a markdown table."""
    config = config if config is not None else config_for(cfg)
    sim = sim or simulate(cfg, config)
    p = plan(cfg, config)
    lines = ["| phase | simulated peak GiB | planner GiB | planner / simulated |", "|---|---:|---:|---:|"]
    for name, s in sim.peaks.items():
        pred = p.peaks[name]
        lines.append(f"| {name} | {s:.2f} | {pred:.2f} | {pred / s:.3f} |")
    lines.append(f"| **whole step** | **{sim.peak:.2f}** | {p.allocated:.2f} | {p.allocated / sim.peak:.3f} |")
    lines += [""] + [f"- {n}" for n in sim.notes]
    lines.append(f"- {UNMODELLED}")
    return p, sim, "\n".join(lines)


def register_cli(sub) -> None:
    p = sub.add_parser("plan", help="predicted GPU memory of a recipe, per phase, and what fits (--simulate: measured "
                                    "on fake tensors)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--gpu-gib", type=float, default=None, help="GPU memory to plan for (default: this GPU's, if any)")
    p.add_argument("--simulate", action="store_true",
                   help="also run the step's phases on fake tensors (CPU, no weights; ~20 s for the 2B model) and "
                        "print each phase's simulated peak beside the prediction")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args) -> int:
    from .config import load_config
    from .planner import PlanError, check_fits, detected_gpu_gib, largest_fitting

    import math

    from .preflight import PreflightError, check_model_source

    if args.gpu_gib is not None and not (math.isfinite(args.gpu_gib) and 0 < args.gpu_gib <= 1 << 20):
        raise PreflightError(f"--gpu-gib must be a positive number of GiB (e.g. 24), got {args.gpu_gib}")
    cfg = load_config(args.recipe, args.overrides)
    config = check_model_source(cfg.model.name_or_path, f"{cfg.source_file}: key 'model.name_or_path'")
    p = plan(cfg, config)
    print(p.table())
    if args.simulate:
        _, sim, table = compare(cfg, config)
        print("\n" + table)
        print(f"\nsimulated whole-step peak: {sim.peak:.2f} GiB allocated (+ the unmodelled margin above)")
    print(f"\npredicted peak: {p.peak:.2f} GiB (allocated {p.allocated:.2f} + CUDA context {p.overhead:.2f})")
    gib = args.gpu_gib if args.gpu_gib is not None else detected_gpu_gib()
    if gib is not None:
        try:
            check_fits(cfg, config, gib)
            print(f"fits in {gib:.1f} GiB; largest that fit: {largest_fitting(cfg, config, gib)}")
        except PlanError as exc:
            print(f"does NOT fit: {str(exc).splitlines()[0]}")
            return 1
    return 0
