"""The in-process rollout engine against HF ``generate`` and against the trainer's own log-probs, on the
tiny model in float32. CPU: the eager decode path, and the capture logic with CUDA graphs emulated
(tests/helpers/graph_emulation.py); the real graphs are tested by tests/test_rollout_engine_gpu.py."""

import collections
import importlib.util
import json
import os
import subprocess
import sys
import types
from functools import partial
from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from lowmem_vt.inputs import build_sequences
from lowmem_vt.model import image_embeddings, sequence_hidden
from lowmem_vt.rollout import SamplingParams, make_rollout
from lowmem_vt.engine_memory import CacheLayout, engine_allocation_bytes
from lowmem_vt.rollout.engine import EngineRollout
from lowmem_vt.rollout.sampling import sample_tokens
from lowmem_vt.rollout.fused import rms_norm_reference
from lowmem_vt.families.qwen2_vl import qwen2_vl_2b_config

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from graph_emulation import EmulatedGraphs  # noqa: E402
from nf4 import nf4_on_cpu  # noqa: E402
from helpers.engine_checks import check_rope_into_cache, rollout_storages  # noqa: E402
from helpers.tiny_models import prompt_embeddings, sat_prompts, with_eos  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tiny_lm):
    tiny_lm.peft_model.eval()
    return tiny_lm


@pytest.fixture(scope="module")
def prompts(lm):
    # different image sizes (16 and 4 image tokens) and different question lengths
    return sat_prompts(lm, 112 * 112)


@pytest.fixture(scope="module")
def embeds(lm, prompts):
    return prompt_embeddings(lm, prompts)


@pytest.mark.parametrize("bucket", [128, 4], ids=["one-bucket", "bucket-4"])
@pytest.mark.parametrize("which", [[1], [0, 1, 2]], ids=["single", "batched"])
def test_greedy_equals_hf_generate(lm, prompts, embeds, which, bucket):
    """bucket 4: attention over 6 growing spans of the cache, one per 4 steps."""
    ps, es = [prompts[i] for i in which], [embeds[i] for i in which]
    params = SamplingParams(num_generations=1, max_new_tokens=24, greedy=True)
    vision_before = lm.vision_calls[0]
    ours = EngineRollout(lm, decode_bucket=bucket).generate(ps, es, params)
    assert lm.vision_calls[0] == vision_before  # the engine reuses the step's image features
    ref = make_rollout("hf", lm).generate(ps, es, params)
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    assert torch.equal(ours.completion_mask, ref.completion_mask)
    assert ours.prompt_rows == ref.prompt_rows


def test_lora_applied_in_the_matmul_leaves_base_weights_untouched(lm, prompts, embeds):
    base = {n: p.clone() for n, p in lm.hf_model.named_parameters() if "lora_" not in n}
    make_rollout("engine", lm).generate(prompts[:1], embeds[:1], SamplingParams(2, 4))
    for n, p in lm.hf_model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    # the adapter is live in the engine's decode: with it off, greedy completions change
    params = SamplingParams(1, 12, greedy=True)
    on = make_rollout("engine", lm).generate(prompts, embeds, params)
    with lm.peft_model.disable_adapter():
        off = make_rollout("engine", lm).generate(prompts, embeds, params)
        ref_off = make_rollout("hf", lm).generate(prompts, embeds, params)
    assert torch.equal(off.completion_ids, ref_off.completion_ids)
    assert not torch.equal(on.completion_ids, off.completion_ids)


def test_sampling_reproducible_from_the_seed(lm, prompts, embeds):
    engine = make_rollout("engine", lm)
    params = SamplingParams(num_generations=3, max_new_tokens=12)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(engine.generate(prompts, embeds, params))
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    assert torch.equal(runs[0].sampling_logprobs, runs[1].sampling_logprobs)
    assert not torch.equal(runs[0].completion_ids, runs[2].completion_ids)
    # a prompt's G samples differ from each other
    assert len({tuple(r) for r in runs[0].completion_ids[:3].tolist()}) > 1


def test_per_prompt_seeds_do_not_depend_on_the_batch(lm, prompts, embeds):
    engine = make_rollout("engine", lm)
    G = 2
    batch = engine.generate(prompts, embeds, SamplingParams(G, 12, seeds=[11, 22, 33]))
    torch.manual_seed(123)  # the global RNG plays no part
    alone = engine.generate(prompts[1:2], embeds[1:2], SamplingParams(G, 12, seeds=[22]))
    T = alone.completion_ids.shape[1]
    assert torch.equal(batch.completion_ids[G : 2 * G, :T], alone.completion_ids)
    assert torch.equal(batch.completion_mask[G : 2 * G, :T], alone.completion_mask)
    other = engine.generate(prompts[1:2], embeds[1:2], SamplingParams(G, 12, seeds=[23]))
    assert not torch.equal(other.completion_ids, alone.completion_ids)


def test_eos_stops_a_row_and_masks_what_follows(lm, prompts, embeds):
    params = SamplingParams(num_generations=4, max_new_tokens=16)
    torch.manual_seed(5)
    free = make_rollout("engine", with_eos(lm, -1)).generate(prompts, embeds, params)
    assert free.completion_ids.shape[1] == 16 and bool(free.completion_mask.all())
    eos = int(free.completion_ids[0, 2])  # a token that really is sampled early
    torch.manual_seed(5)
    stopped = make_rollout("engine", with_eos(lm, eos)).generate(prompts, embeds, params)

    ends = []
    for r in range(free.completion_ids.shape[0]):
        hits = (free.completion_ids[r] == eos).nonzero()
        ends.append(int(hits[0]) + 1 if len(hits) else 16)  # length up to and including the first EOS
    assert ends[0] <= 3
    assert stopped.completion_ids.shape[1] == max(ends)  # stops once every row has ended
    for r, n in enumerate(ends):
        # identical up to the EOS (EOS does not change the random draws), then pad and masked
        assert torch.equal(stopped.completion_ids[r, :n], free.completion_ids[r, :n])
        assert torch.equal(stopped.sampling_logprobs[r, :n], free.sampling_logprobs[r, :n])
        assert bool((stopped.completion_ids[r, n:] == lm.pad_token_id).all())
        assert stopped.completion_mask[r, :n].sum() == n and stopped.completion_mask[r, n:].sum() == 0
        assert bool((stopped.sampling_logprobs[r, n:] == 0).all())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_the_trainers(lm, prompts, embeds, temperature):
    """The log-probs the trainer computes for the rollout's tokens (same weights) are the engine's own."""
    roll = make_rollout("engine", lm).generate(prompts, embeds, SamplingParams(2, 12, temperature=temperature, seeds=[1, 2, 3]))
    seqs = build_sequences(prompts, roll.prompt_rows, roll.completion_ids, roll.completion_mask, lm.pad_token_id).to(lm.device)
    with torch.no_grad():
        hidden = sequence_hidden(lm, seqs, embeds)
        logits = lm.hf_model.lm_head(hidden).float() / temperature
    trainer = torch.log_softmax(logits, -1).gather(-1, roll.completion_ids[..., None])[..., 0]
    mask = roll.completion_mask.bool()
    assert roll.sampling_logprobs.shape == roll.completion_ids.shape and roll.sampling_logprobs.dtype == torch.float32
    torch.testing.assert_close(roll.sampling_logprobs[mask], trainer[mask], atol=1e-4, rtol=0)
    assert bool((roll.sampling_logprobs[~mask] == 0).all())


def test_nf4_base_sampling_logprobs_match_the_trainers(tiny_dir, prompts):
    """QLoRA: the engine applies the 4-bit base layers through bitsandbytes and the adapter in bf16. q/k/v get
    non-zero biases (a random tiny model has none) so a bias applied twice would show: before the fix the
    engine added each 4-bit layer's bias again, and its log-probs were off by far more than bf16 rounding."""
    from lowmem_vt.config import LoraConfig, ModelConfig
    from lowmem_vt.model import load_model

    if not nf4_on_cpu():
        pytest.skip("bitsandbytes NF4 has no CPU backend here")
    torch.manual_seed(0)
    qlm = load_model(ModelConfig(name_or_path=str(tiny_dir), dtype="bfloat16", quantization="nf4"), LoraConfig(r=4, alpha=8),
                     torch.device("cpu"), min_pixels=3136, max_pixels=112 * 112)
    with torch.no_grad():
        for name, p in qlm.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
            elif name.endswith("base_layer.bias"):
                p.normal_(0.0, 2.0)
    qlm.peft_model.eval()
    embeds = image_embeddings(qlm, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts])
    roll = make_rollout("engine", qlm).generate(prompts, embeds, SamplingParams(2, 12, seeds=[1, 2, 3]))
    seqs = build_sequences(prompts, roll.prompt_rows, roll.completion_ids, roll.completion_mask, qlm.pad_token_id)
    with torch.no_grad():
        logits = qlm.hf_model.lm_head(sequence_hidden(qlm, seqs, embeds)).float()
    trainer = torch.log_softmax(logits, -1).gather(-1, roll.completion_ids[..., None])[..., 0]
    mask = roll.completion_mask.bool()
    diff = (roll.sampling_logprobs[mask] - trainer[mask]).abs()
    print(f"engine vs trainer log-probs, NF4 + bf16: max {diff.max():.4f}, mean {diff.mean():.4f}")
    assert float(diff.max()) < 0.1


def test_top_k_top_p_sample_hf_truncated_distribution():
    """The exponential race draws from exactly HF's top-k then top-p truncated, renormalised distribution."""
    torch.manual_seed(0)
    logits = torch.randn(1, 40) * 2
    params = SamplingParams(temperature=0.8, top_k=12, top_p=0.7)
    ref = TopPLogitsWarper(0.7)(None, TopKLogitsWarper(12)(None, logits / 0.8))
    expected = torch.softmax(ref, -1)[0]
    tokens, logp = sample_tokens(logits.expand(20000, -1), params)
    freq = torch.bincount(tokens, minlength=40).float() / tokens.numel()
    assert bool((freq[expected == 0] == 0).all())
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    # the reported log-prob is the untruncated one at the temperature (what the trainer computes)
    torch.testing.assert_close(logp, torch.log_softmax(logits / 0.8, -1)[0, tokens])
    greedy, _ = sample_tokens(logits, SamplingParams(greedy=True))
    assert int(greedy) == int(logits.argmax())


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_backend_without_vllm_says_what_to_do(lm):
    with pytest.raises(RuntimeError, match="pip install vllm.*rollout.backend: engine"):
        make_rollout("vllm", lm)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason="vLLM is not installed here (it needs CUDA): rollout.backend vllm is untested in this project")
def test_vllm_backend_generates(tiny_dir, prompts):  # pragma: no cover - needs vLLM and a GPU
    from lowmem_vt.config import LoraConfig, ModelConfig
    from lowmem_vt.model import load_model

    gpu = load_model(ModelConfig(name_or_path=str(tiny_dir), dtype="bfloat16"), LoraConfig(r=4, alpha=8), torch.device("cuda"),
                     min_pixels=3136, max_pixels=112 * 112)
    feats = image_embeddings(gpu, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts])
    roll = make_rollout("vllm", gpu).generate(prompts, feats, SamplingParams(2, 8, seeds=[1, 2, 3]))
    assert roll.completion_ids.shape[0] == 6 and roll.prompt_rows == [0, 0, 1, 1, 2, 2]
    assert roll.completion_ids.shape[1] <= 8 and bool(roll.completion_mask[:, 0].all())


# ------------------------------------------------------------------ capture, buckets, compaction (issue 16)


@pytest.mark.parametrize("seeds", [[11, 22, 33], None], ids=["per-prompt-seeds", "global-rng"])
def test_emulated_graph_capture_samples_what_eager_samples(lm, prompts, embeds, seeds):
    """The capture path (a bucket's first step eager on the capture stream, capture, replay; one graph per
    bucket) on CPU with the CUDA calls emulated: same tokens and log-probs as the eager path for the same seeds.
    (When the warm-up was an extra step undone afterwards, its draws once shifted every replay's.)"""
    params = SamplingParams(3, 14, seeds=seeds)
    torch.manual_seed(7)
    eager = EngineRollout(lm, decode_bucket=4).generate(prompts, embeds, params)
    graphs = EmulatedGraphs()
    torch.manual_seed(7)
    replayed = EngineRollout(lm, decode_bucket=4, graphs=graphs).generate(prompts, embeds, params)
    # 13 decode steps: 0-3, 4-7, 8-11 are captured buckets (the first step of each the warm-up, 3 replays);
    # step 12 alone runs eagerly
    assert [g.replays for g in graphs.captured] == [3, 3, 3] and graphs.warm_ups == 3
    assert torch.equal(replayed.completion_ids, eager.completion_ids)
    assert torch.equal(replayed.sampling_logprobs, eager.sampling_logprobs)


def test_finished_prompts_leave_the_batch_without_changing_any_sample(lm, prompts, embeds):
    """A forced EOS ends prompts at different times; with bucket 2 they leave the batch early (the cache rows of
    the others move down), with bucket 128 they stay. Per-prompt seeds: identical tokens either way."""
    params = SamplingParams(num_generations=2, max_new_tokens=16, seeds=[5, 6, 7])
    free = EngineRollout(with_eos(lm, -1)).generate(prompts, embeds, params)
    ids = free.completion_ids[:, :10]
    # a token that ends every sample of some prompts (within 10 tokens) but not of all of them
    ended = {int(t): [all(bool((ids[r] == t).any()) for r in (2 * p, 2 * p + 1)) for p in range(3)] for t in ids.unique()}
    eos = next(t for t, e in sorted(ended.items()) if 0 < sum(e) < 3)
    kept = EngineRollout(with_eos(lm, eos)).generate(prompts, embeds, params)
    engine = EngineRollout(with_eos(lm, eos), decode_bucket=2)
    active = []
    compact = engine._compact
    engine._compact = lambda s: (compact(s), active.append(s.active))
    dropped = engine.generate(prompts, embeds, params)
    assert torch.equal(dropped.completion_ids, kept.completion_ids)
    # other batch and span sizes sum in another order: log-probs agree to float32 rounding
    torch.testing.assert_close(dropped.sampling_logprobs, kept.sampling_logprobs, atol=1e-5, rtol=0)
    assert active == sorted(active, reverse=True) and active[-1] < 3, active  # prompts did leave


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "emulated-graphs"])
def test_finished_rows_leave_the_batch_without_changing_any_sample(lm, prompts, embeds, graphs):
    """Rows leave one by one, not only whole prompts: with a forced EOS that ends some samples of every prompt,
    bucket 3 shrinks the batch to prompts x width (width: the most samples a prompt still decodes; finished
    samples pad the others) while bucket 128 decodes all G rows to the end. Per-prompt seeds: identical tokens.
    With (emulated) graphs, each bucket's graph is captured at its own batch size and replayed."""
    G = 4
    params = SamplingParams(num_generations=G, max_new_tokens=16, seeds=[5, 6, 7])
    free = EngineRollout(with_eos(lm, -1)).generate(prompts, embeds, params)
    first = free.completion_ids[:, :8].view(3, G, 8)

    def ends(t, p):  # how many of prompt p's samples sample token t within 8 tokens
        return sum(bool((first[p, g] == t).any()) for g in range(G))

    # a token ending at least one sample of every prompt but not all of any prompt, the most samples in all
    eos = max((t for t in first.unique().tolist() if all(0 < ends(t, p) < G for p in range(3))),
              key=lambda t: sum(ends(t, p) for p in range(3)))
    kept = EngineRollout(with_eos(lm, eos)).generate(prompts, embeds, params)
    emulated = EmulatedGraphs() if graphs else None
    engine = EngineRollout(with_eos(lm, eos), decode_bucket=3, graphs=emulated)
    shapes = []
    compact = engine._compact

    def recording(s):
        compact(s)
        shapes.append((s.active, s.width, int((~s.done[: s.active * s.width]).sum())))
        # every decoding row is some prompt's live sample; rows of a prompt decode distinct samples
        rows = s.rows[: s.active * s.width].view(s.active, s.width)
        assert all(len(set(r.tolist())) == s.width for r in rows)
        assert torch.equal(rows % G, s.sample[: s.active * s.width].view(s.active, s.width))

    engine._compact = recording
    dropped = engine.generate(prompts, embeds, params)
    assert torch.equal(dropped.completion_ids, kept.completion_ids)
    torch.testing.assert_close(dropped.sampling_logprobs, kept.sampling_logprobs, atol=1e-5, rtol=0)
    assert any(width < G for _, width, _ in shapes), shapes  # rows left the batch, not only whole prompts
    batch = [active * width for active, width, _ in shapes]
    assert batch == sorted(batch, reverse=True)
    assert all(live <= active * width for active, width, live in shapes)
    if graphs:  # 15 decode steps: 5 buckets of 3, each a warm-up step then a graph captured at its batch size
        assert [g.replays for g in emulated.captured] == [2] * len(shapes)  # and replayed twice


def test_cache_holds_each_prompt_once_and_attention_reads_the_filled_part(lm, prompts, embeds):
    params = SamplingParams(num_generations=4, max_new_tokens=300)
    s = EngineRollout(lm).new_state([p.length for p in prompts], [p.next_position for p in prompts], params)
    P, lay = len(prompts), s.layout
    assert s.kv.shape[2] == P  # not P * G
    longest = max(p.length for p in prompts)
    assert lay.prompt_slots == -(-longest // 64) * 64 and lay == CacheLayout.of(P, longest, 4, 300)
    assert s.kv.shape[4] == lay.prompt_slots + 4 * 384  # 300 steps rounded up to 3 buckets of 128
    spans = [lay.prompt_slots + 4 * n for n in (128, 128, 256, 384)]
    assert [lay.span(j) for j in (0, 127, 128, 299)] == spans


# ------------------------------------------------------------------------- allocation (for the planner)


def test_allocation_function_equals_what_the_engine_allocates(lm, prompts):
    """engine_allocation_bytes (what the planner calls) against the storages of the state and the adapter
    copies the engine allocates for a rollout, on the tiny model (fp32, LoRA r 4 on every linear)."""
    s, storages = rollout_storages(lm, prompts, num_generations=3, max_new_tokens=40)
    longest = max(p.length for p in prompts)
    predicted = engine_allocation_bytes(lm.config.text_config, torch.float32, len(prompts), longest, 3, 40, lora_r=4,
                                        lora_targets=_targets(lm))
    assert sum(storages.values()) == predicted.allocated
    assert s.kv.untyped_storage().nbytes() == predicted.kv_cache


def _targets(lm):
    """The adapted linears' names, as the recipe lists them."""
    return sorted({n.rsplit(".", 2)[-2] for n, _ in lm.hf_model.named_modules() if n.endswith(".lora_A")})


# ------------------------------------------------------------------------- kernels per decode step


class OperatorCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Operators that launch work: views, metadata queries and _unsafe_view (a view) are left out."""

    FREE = {"prim.device.default", "aten._unsafe_view.default"}

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if not func.is_view and str(func) not in self.FREE:
            self.counts[str(func)] += 1
        if func is torch.ops.aten.exponential_.default:
            kwargs.pop("generator", None)  # fake tensors draw nothing; the operator is counted all the same
        return func(*args, **kwargs)


def fake_2b_lm(lora_r: int = 64):
    """The real Qwen2-VL-2B architecture in bf16 with LoRA on every language-model linear, as fake tensors
    (shapes and dtypes, no memory): built on the meta device, peft applied there, then made fake CPU tensors."""
    from peft import LoraConfig, get_peft_model
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import Qwen2VLForConditionalGeneration

    from lowmem_vt.families import family_named
    from lowmem_vt.model import LoadedModel

    lora_target_regex = family_named("qwen2_vl").lora_target_regex

    cfg = qwen2_vl_2b_config()
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
        model.requires_grad_(False)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        peft_model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=lora_target_regex(targets)))
    mode = FakeTensorMode()
    to_fake = partial(mode.fake_tensor_converter.from_meta_and_device, mode, device=torch.device("cpu"))
    for module in peft_model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(to_fake(p), requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = to_fake(b)
    tokenizer = types.SimpleNamespace(eos_token_id=cfg.text_config.eos_token_id or 0, pad_token_id=cfg.text_config.pad_token_id or 0)
    return LoadedModel(peft_model, tokenizer, None, torch.device("cpu"), [0]), mode


def test_decode_step_of_the_2b_model_is_at_most_800_operators():
    """One decode step of the 28-layer model (8 seeded prompts of different lengths x 8 samples, LoRA r 64 on
    every linear, bf16), run on fake tensors under a dispatch counter: each counted operator is one kernel on
    CUDA (the two fused ops are one Triton kernel each; SDPA one attention kernel)."""
    lm, mode = fake_2b_lm()
    engine = EngineRollout(lm)
    assert engine.fused_groups == 28 * 2  # q/k/v and gate/up of every layer are one matmul each
    params = SamplingParams(8, 1024, seeds=list(range(8)))
    with mode:
        s = engine.new_state([300 + 41 * i for i in range(8)], [90 + 41 * i for i in range(8)], params)
        weights = engine.decode_weights()
        counter = OperatorCounter()
        with counter:
            engine._decode_step(s, weights, params, 8, s.layout.span(0))
    total = sum(counter.counts.values())
    per_layer = {k: v // 28 for k, v in counter.counts.items() if v >= 28}
    print(f"{total} operators per decode step; per layer: {per_layer}")
    # base matmuls: q/k/v as one, o, gate/up as one, down; + the B matmuls of q/k/v, o and down (bias or residual)
    assert counter.counts["aten.addmm.default"] == 28 * 7
    assert counter.counts["aten.mm.default"] == 28 * 5 + 1  # 4 A matmuls + gate/up's B; the head
    assert counter.counts["lowmem_vt.rms_norm.default"] == 28 * 2 + 1
    assert total <= 800, counter.counts


# ---------------------------------------------------------------------------------- fused operators


def test_fused_triton_kernels_equal_their_references_in_the_interpreter():
    """The Triton kernels of rms_norm and rope_into_cache, float32 under TRITON_INTERPRET=1 (a subprocess: the
    interpreter is chosen when triton.jit runs), against the PyTorch references the CPU path uses."""
    code = """
import torch
from lowmem_vt.rollout import fused
torch.manual_seed(0)
x, w = torch.randn(6, 40), torch.randn(40)
assert (fused.rms_norm_triton(x, w, 1e-6) - fused.rms_norm_reference(x, w, 1e-6)).abs().max() < 1e-5
# zero-centred (Qwen3.5): 1 + w
z = fused.rms_norm_triton(x, w, 1e-6, True)
assert (z - fused.rms_norm_reference(x, w, 1e-6, True)).abs().max() < 1e-5
assert (z - fused.rms_norm_reference(x, w, 1e-6)).abs().max() > 0.1
P, G, kvh, heads, d, C = 3, 4, 2, 6, 16, 60
# all samples in order, then two rows per prompt decoding samples out of order (after rows left the batch); then
# partial rotary (Qwen3.5: a quarter of the head rotates, the rest passes)
for W, sample, rot in ((G, torch.arange(G).repeat(P), d), (2, torch.tensor([3, 1, 0, 2, 2, 3]), d), (2, torch.tensor([3, 1, 0, 2, 2, 3]), d // 4)):
    q, k, v = torch.randn(P * W, heads * d), torch.randn(P * W, kvh * d), torch.randn(P * W, kvh * d)
    cos, sin = torch.randn(P * W, rot), torch.randn(P * W, rot)
    kv = torch.randn(2, P + 1, kvh, C, d)  # a cache prompt more than the rows use
    kv_ref = kv.clone()
    slot = torch.tensor([7])
    out = fused.rope_into_cache_triton(q, k, v, cos, sin, kv[0], kv[1], slot, sample, W)
    ref = fused.rope_into_cache_reference(q, k, v, cos, sin, kv_ref[0], kv_ref[1], slot, sample, W)
    assert out.shape == ref.shape == (P, kvh, W * heads // kvh, d)
    assert (out - ref).abs().max() < 1e-5 and (kv - kv_ref).abs().max() < 1e-5
    written = 7 + sample.view(P, W)
    for p in range(P):
        assert not torch.equal(kv_ref[:, p, :, written[p]], kv[:, p, :, written[p]].clone().zero_())
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_fused_triton_kernels_compile_for_gpu_targets():
    """rms_norm and rope_into_cache compiled for sm_75 (T4, fp16) and sm_80/86/89/90 (bf16) on this CPU
    (kernels.resources.compile_jit: Triton's toolchain and ptxas, no GPU) at the 2B model's shapes (H 1536,
    12 query / 2 kv heads of 128), the rope kernel at width 8 and 1 (rows leaving the batch recompile it per
    width), and at Qwen3.5-4B's (H 2560 zero-centred; 16 / 4 heads of 256, 64 of them rotating): no spills, shared memory within the 48 KiB every target gives a block by default. A subprocess:
    under TRITON_INTERPRET=1 (set by the kernel tests) triton.jit only interprets."""
    code = """
import json
from lowmem_vt.kernels.resources import compile_jit
from lowmem_vt.rollout.fused import _rms_norm_kernel, _rope_into_cache_kernel
out = []
for cap, dt in ((75, "fp16"), (80, "bf16"), (86, "bf16"), (89, "bf16"), (90, "bf16")):
    t = "*" + dt
    r = compile_jit(_rms_norm_kernel, dict(x_ptr=t, w_ptr=t, out_ptr=t, x_stride="i32", out_stride="i32", eps="fp32"),
                    dict(H=1536, BLOCK=2048, ZERO_CENTRED=False), cap)
    out.append((cap, "rms_norm", r.registers, r.spill_bytes, r.shared_bytes))
    sig = dict(q_ptr=t, k_ptr=t, v_ptr=t, cos_ptr=t, sin_ptr=t, kc_ptr=t, vc_ptr=t, slot_ptr="*i64", sample_ptr="*i64",
               qo_ptr=t, **{n: "i32" for n in ("q_stride", "k_stride", "v_stride", "cs_stride", "kc_s0", "kc_s1", "kc_s2",
                                               "vc_s0", "vc_s1", "vc_s2")})
    for width in (8, 1):
        r = compile_jit(_rope_into_cache_kernel, sig, dict(HEADS=12, KV_HEADS=2, W=width, D=128, ROT=128, PASS_BLOCK=0), cap)
        out.append((cap, f"rope_into_cache W{width}", r.registers, r.spill_bytes, r.shared_bytes))
    # Qwen3.5-4B's full-attention layers: 16 query / 4 kv heads of 256, a quarter rotating; zero-centred norms
    r = compile_jit(_rope_into_cache_kernel, sig, dict(HEADS=16, KV_HEADS=4, W=8, D=256, ROT=64, PASS_BLOCK=256), cap)
    out.append((cap, "rope_into_cache Qwen3.5 W8", r.registers, r.spill_bytes, r.shared_bytes))
    r = compile_jit(_rms_norm_kernel, dict(x_ptr=t, w_ptr=t, out_ptr=t, x_stride="i32", out_stride="i32", eps="fp32"),
                    dict(H=2560, BLOCK=4096, ZERO_CENTRED=True), cap)
    out.append((cap, "rms_norm zero-centred", r.registers, r.spill_bytes, r.shared_bytes))
print("RESOURCES " + json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("RESOURCES "))[len("RESOURCES "):])
    print(rows)
    assert len(rows) == 25
    for cap, kernel, registers, spills, shared in rows:
        assert spills == 0 and shared <= 48 * 1024 and registers <= 255, (cap, kernel, registers, spills, shared)


def test_fused_references_equal_the_models_modules(lm):
    """rms_norm's reference is Qwen2RMSNorm; rope_into_cache's queries and cache writes are HF's rotary."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    text = lm.hf_model.model.language_model
    norm = text.layers[0].input_layernorm
    x = torch.randn(5, text.config.hidden_size)
    assert torch.equal(rms_norm_reference(x, norm.weight, norm.variance_epsilon), norm(x))
    # rows decoding samples 0, 4, 2 of prompt 0 and 3, 1, 0 of prompt 1
    check_rope_into_cache(text, apply_rotary_pos_emb, P=2, W=3, d=text.config.hidden_size // text.config.num_attention_heads,
                          sample=[0, 4, 2, 3, 1, 0], start=4, slots=20, stride=7)


def test_adapter_in_bf16_is_as_close_as_the_fp32_adapter():
    """Decode runs the adapter in the base dtype (bf16); peft runs it in fp32 and rounds once. On a 2B-shaped
    up_proj (1536 -> 8960, W ~ N(0, 0.02), r 64, x ~ N(0, 1)), both against the float64 truth: the bf16 adapter
    adds at most about one bf16 rounding of the output (here: its max error <= 1.5x peft's, mean <= 1.25x)."""
    from peft import LoraConfig, get_peft_model

    from lowmem_vt.rollout.linears import FusedLinears

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("up_proj", torch.nn.Linear(1536, 8960, bias=False))
    with torch.no_grad():
        model.up_proj.weight.copy_(torch.randn(8960, 1536, generator=g) * 0.02)
    model = model.to(torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, target_modules=["up_proj"]))
    layer = peft_model.base_model.model.up_proj
    for b_std in (1e-4, 1e-2):
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.randn(64, 1536, generator=g) / 40)
            layer.lora_B["default"].weight.copy_(torch.randn(8960, 64, generator=g) * b_std)
        for p in layer.lora_A.parameters():
            p.data = p.data.float()
        for p in layer.lora_B.parameters():
            p.data = p.data.float()  # load_model keeps the adapter in fp32
        x = torch.randn(64, 1536, generator=g).to(torch.bfloat16)
        with torch.no_grad():
            ours = FusedLinears([layer], torch.bfloat16)(x)[0].double()
            theirs = layer(x).double()
            a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
            truth = x.double() @ layer.base_layer.weight.double().t() + 2.0 * (x.double() @ a.t()) @ b.t()
        err_ours, err_peft = (ours - truth).abs(), (theirs - truth).abs()
        assert float(err_ours.max()) <= 1.5 * float(err_peft.max()), (b_std, float(err_ours.max()), float(err_peft.max()))
        assert float(err_ours.mean()) <= 1.25 * float(err_peft.mean()), (b_std, float(err_ours.mean()), float(err_peft.mean()))


def test_bench_rollout_smoke(tmp_path):
    """bench/rollout.py --smoke: the GPU benchmark's every stage at tiny sizes on CPU, checks passing."""
    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, str(root / "bench" / "rollout.py"), "--out", str(tmp_path), "--smoke"], cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    tables = json.loads((tmp_path / "rollout.json").read_text())["tables"]
    assert {r["rows"] for r in tables["rollout"] if r["backend"] == "engine"} == {2, 6}
    assert all(r["ok"] for r in tables["checks"]) and len(tables["checks"]) == 5
    step = tables["decode step, first bucket"]  # 3 prompts at width 2 (all rows) and 1 (after the others left)
    assert {(r["width"], r["rows"]) for r in step} == {(2, 6), (1, 3)} and all(r["ms"] > 0 for r in step)
    assert (tmp_path / "rollout.md").read_text().startswith("# bench/rollout.py")


@pytest.mark.parametrize("layout", ["separate", "adjacent", "nf4"])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["k_proj"], []], ids=["q+v", "k", "none"])
def test_fused_linears_equal_peft_layers_for_any_target_set(targets, layout):
    """q/k/v with biases, LoRA on some of them (two adapters' A in one matmul, B block-diagonal with the biases
    folded in), and o_proj with the residual added: equal to the peft layers' outputs. ``adjacent``: the engine
    laid q/k/v out in one storage, one base matmul over a view (parameters keep their identity and values);
    ``nf4``: bitsandbytes 4-bit base layers, which add their own bias (it must not be added twice)."""
    from peft import LoraConfig, get_peft_model

    from lowmem_vt.rollout.linears import FusedLinears, lay_out_adjacent

    torch.manual_seed(0)
    model = torch.nn.Module()
    dtype = torch.bfloat16 if layout == "nf4" else torch.float32
    for name, (i, o, bias) in {"q_proj": (64, 64, True), "k_proj": (64, 32, True), "v_proj": (64, 32, True),
                               "o_proj": (64, 64, False)}.items():
        linear = torch.nn.Linear(i, o, bias=bias)
        torch.nn.init.normal_(linear.bias, std=0.5) if bias else None
        if layout == "nf4":
            if not nf4_on_cpu():
                pytest.skip("bitsandbytes NF4 has no CPU backend here")
            import bitsandbytes as bnb

            q = bnb.nn.Linear4bit(i, o, bias=bias, compute_dtype=dtype, quant_type="nf4")
            q.load_state_dict(linear.state_dict())
            linear = q.to("cpu")
        model.add_module(name, linear)
    if targets:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets + ["o_proj"])).base_model.model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    qkv = [model.q_proj, model.k_proj, model.v_proj]
    params = [id(p) for p in model.parameters()]
    before = [m(torch.eye(64, dtype=dtype)).detach() for m in qkv]
    if layout != "separate":
        assert lay_out_adjacent(qkv) == (layout == "adjacent")  # NF4 weights stay as they are
    if layout == "adjacent":
        assert [id(p) for p in model.parameters()] == params  # the same Parameters, now in one storage
        assert all(torch.equal(m(torch.eye(64)), b) for m, b in zip(qkv, before))
    x, h = torch.randn(5, 64, dtype=dtype), torch.randn(5, 64, dtype=dtype)
    with torch.no_grad():
        fused = FusedLinears(qkv, dtype)
        if layout == "separate":  # made before any lay-out: separate storages
            assert fused.weight is None
        else:
            assert (fused.weight is not None) == (layout == "adjacent")
        q, k, v = fused(x)
        (o,) = FusedLinears([model.o_proj], dtype)(x, residual=h)
        tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
        for ours, ref in ((q, model.q_proj(x)), (k, model.k_proj(x)), (v, model.v_proj(x)), (o, h + model.o_proj(x))):
            torch.testing.assert_close(ours, ref, **tol)
