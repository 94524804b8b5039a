"""The rollout engine on a hybrid model: the tiny random Qwen3.5 (a Gated DeltaNet linear-attention layer, then a
gated full-attention layer; zero-centred norms; partial rotary; LoRA on every linear of both kinds), float32 on
CPU, against HF ``generate``, the trainer's log-probs and the model's own cache after a prompt. The capture logic
runs with CUDA graphs emulated (tests/helpers/graph_emulation.py); the graphs themselves need a GPU."""

import sys
from pathlib import Path

import pytest
import torch

from lowmem_vt.config import LoraConfig, ModelConfig
from lowmem_vt.engine_memory import engine_allocation_bytes
from lowmem_vt.families import family_named
from lowmem_vt.inputs import build_sequences
from lowmem_vt.model import load_model, sequence_hidden
from lowmem_vt.rollout import SamplingParams, make_rollout
from lowmem_vt.rollout.engine import EngineRollout
from lowmem_vt.rollout.fused import rms_norm_reference

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from graph_emulation import EmulatedGraphs  # noqa: E402
from helpers.engine_checks import check_rope_into_cache, rollout_storages  # noqa: E402
from helpers.tiny_models import QWEN35_TARGETS as TARGETS, prompt_embeddings, sat_prompts, with_eos  # noqa: E402

MAX_PIXELS = 128 * 128  # tiny35_lm's (conftest)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tiny35_lm):
    """conftest's tiny Qwen3.5 (LoRA on every linear of both layer kinds, B non-zero, eval mode)."""
    kinds = [lay.kind for lay in EngineRollout(tiny35_lm).layers]
    assert kinds == ["linear_attention", "full_attention"]
    return tiny35_lm


@pytest.fixture(scope="module")
def prompts(lm):
    return sat_prompts(lm, MAX_PIXELS, sizes=(128, 64))


@pytest.fixture(scope="module")
def embeds(lm, prompts):
    return prompt_embeddings(lm, prompts)


@pytest.mark.parametrize("bucket", [128, 4], ids=["one-bucket", "bucket-4"])
def test_greedy_equals_hf_generate(lm, prompts, embeds, bucket):
    params = SamplingParams(num_generations=1, max_new_tokens=20, greedy=True)
    ours = EngineRollout(lm, decode_bucket=bucket).generate(prompts, embeds, params)
    ref = make_rollout("hf", lm).generate(prompts, embeds, params)
    assert torch.equal(ours.completion_ids, ref.completion_ids)
    assert torch.equal(ours.completion_mask, ref.completion_mask)


def test_the_fused_recurrent_branch_decodes_what_the_torch_step_decodes(lm, prompts, embeds):
    """On a GPU with flash-linear-attention the decode step calls the model's one-token delta rule (transformers
    runs fla's fused kernel there) and copies the new state in. Its arguments, run here through transformers'
    torch implementation of the same interface: the tokens and log-probs of the in-place torch step."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    params = SamplingParams(2, 10, seeds=[3, 4, 5])
    torch_step = EngineRollout(lm, decode_bucket=4).generate(prompts, embeds, params)
    engine = EngineRollout(lm, decode_bucket=4)
    assert engine.recurrent_rule is None  # on CPU: the in-place torch step
    engine.recurrent_rule = torch_recurrent_gated_delta_rule
    fused = engine.generate(prompts, embeds, params)
    assert torch.equal(fused.completion_ids, torch_step.completion_ids)
    torch.testing.assert_close(fused.sampling_logprobs, torch_step.sampling_logprobs, atol=1e-5, rtol=0)


def test_prompt_state_is_computed_once_and_is_the_models_own(lm, prompts, embeds):
    """After the prefill, each prompt's G rows hold the same conv and recurrent state, the state the model's own
    forward leaves in its cache after that prompt alone (fp32, to float rounding)."""
    G = 3
    engine = EngineRollout(lm)
    with torch.no_grad():
        s = engine._prefill(prompts, embeds, SamplingParams(G, 8, seeds=[1, 2, 3]))
    inner = lm.hf_model.model
    for i, (prompt, feats) in enumerate(zip(prompts, embeds)):
        rows = slice(i * G, (i + 1) * G)
        assert torch.equal(s.conv[:, rows], s.conv[:, i * G : i * G + 1].expand_as(s.conv[:, rows]))
        assert torch.equal(s.recurrent[:, rows], s.recurrent[:, i * G : i * G + 1].expand_as(s.recurrent[:, rows]))
        h = engine._prompt_embeds(prompt, prompt.mm_token_type_ids.bool()[None, :, None], feats, i)
        with torch.no_grad():
            out = inner.language_model(inputs_embeds=h, position_ids=prompt.position_ids[:, None], use_cache=True)
        cache = out.past_key_values if hasattr(out, "past_key_values") and out.past_key_values is not None else out.cache
        K = s.conv.shape[-1]
        conv, recurrent = _linear_states(cache, 0)
        torch.testing.assert_close(s.conv[0, i * G], conv[0, :, -K:], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s.recurrent[0, i * G], recurrent[0].float(), atol=1e-5, rtol=1e-4)


def _linear_states(cache, layer: int):
    """(conv, recurrent) state of a linear-attention layer in transformers' cache: get_conv_state /
    get_recurrent_state from 5.18 on; the layer's conv_states / recurrent_states on 5.17."""
    if hasattr(cache, "get_conv_state"):
        return cache.get_conv_state(layer), cache.get_recurrent_state(layer)
    return cache.layers[layer].conv_states[0], cache.layers[layer].recurrent_states[0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_the_trainers(lm, prompts, embeds, temperature):
    """The log-probs the trainer computes for the engine's tokens (same weights, right-padded batch) are the
    engine's own, within 1e-4 in float32."""
    roll = make_rollout("engine", lm).generate(prompts, embeds, SamplingParams(2, 12, temperature=temperature, seeds=[1, 2, 3]))
    seqs = build_sequences(prompts, roll.prompt_rows, roll.completion_ids, roll.completion_mask, lm.pad_token_id)
    with torch.no_grad():
        logits = lm.hf_model.lm_head(sequence_hidden(lm, seqs, embeds)).float() / temperature
    trainer = torch.log_softmax(logits, -1).gather(-1, roll.completion_ids[..., None])[..., 0]
    mask = roll.completion_mask.bool()
    torch.testing.assert_close(roll.sampling_logprobs[mask], trainer[mask], atol=1e-4, rtol=0)


def test_emulated_graphs_and_rows_leaving_change_no_sample(lm, prompts, embeds):
    """A forced EOS ends some samples of every prompt; bucket 3 with (emulated) graphs shrinks the batch (the
    rows' linear-attention states move with them) and captures a graph per bucket, bucket 128 eager decodes all
    rows to the end: identical tokens for the same per-prompt seeds."""
    G = 4
    params = SamplingParams(num_generations=G, max_new_tokens=16, seeds=[5, 6, 7])
    free = EngineRollout(with_eos(lm, -1)).generate(prompts, embeds, params)
    first = free.completion_ids[:, :8].view(3, G, 8)

    def ends(t, p):
        return sum(bool((first[p, g] == t).any()) for g in range(G))

    eos = max((t for t in first.unique().tolist() if all(0 < ends(t, p) < G for p in range(3))),
              key=lambda t: sum(ends(t, p) for p in range(3)))
    kept = EngineRollout(with_eos(lm, eos)).generate(prompts, embeds, params)
    graphs = EmulatedGraphs()
    engine = EngineRollout(with_eos(lm, eos), decode_bucket=3, graphs=graphs)
    widths = []
    compact = engine._compact
    engine._compact = lambda s: (compact(s), widths.append(s.active * s.width))
    dropped = engine.generate(prompts, embeds, params)
    assert torch.equal(dropped.completion_ids, kept.completion_ids)
    torch.testing.assert_close(dropped.sampling_logprobs, kept.sampling_logprobs, atol=1e-5, rtol=0)
    assert min(widths) < 3 * G, widths  # rows did leave
    assert graphs.captured and all(g.replays == 2 for g in graphs.captured)


def test_allocation_function_equals_what_the_engine_allocates(lm, prompts):
    """engine_allocation_bytes with the family's shapes (q_proj twice as wide, the linear-attention projections)
    against the storages the engine allocates: the full-attention layer's KV, the linear layer's states per row,
    the adapter's decode copies of both kinds."""
    s, storages = rollout_storages(lm, prompts, num_generations=3, max_new_tokens=40)
    text = lm.config.text_config
    longest = max(p.length for p in prompts)
    predicted = engine_allocation_bytes(text, torch.float32, len(prompts), longest, 3, 40, lora_r=4,
                                        lora_targets=TARGETS, qkv_bias=False,
                                        shapes=family_named("qwen3_5").decoder_linear_shapes(text))
    assert sum(storages.values()) == predicted.allocated
    assert s.kv.untyped_storage().nbytes() == predicted.kv_cache
    assert s.conv.untyped_storage().nbytes() + s.recurrent.untyped_storage().nbytes() == predicted.linear_state > 0
    assert s.recurrent.dtype == torch.float32 and s.recurrent.shape[1] == 3 * len(prompts)


def test_fused_references_equal_the_models_modules(lm):
    """Zero-centred rms_norm is Qwen3.5's RMSNorm; rope_into_cache with a partial rotary rotates HF's way."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb

    text = lm.hf_model.model.language_model
    norm = text.layers[1].input_layernorm
    assert float(norm.weight.abs().max()) > 0  # tiny_init moved it off zero: 1 + w differs from w
    x = torch.randn(5, text.config.hidden_size)
    assert torch.equal(rms_norm_reference(x, norm.weight, norm.eps, zero_centred=True), norm(x))
    cos = check_rope_into_cache(text, apply_rotary_pos_emb, P=2, W=2, d=text.config.head_dim, sample=[0, 2, 1, 0], start=3,
                                slots=10, stride=5)
    assert cos.shape[-1] < text.config.head_dim  # a partial rotary


class LosesTheRecurrentState(EngineRollout):
    """A fault the check must catch: the prompt's recurrent states never reach the rows (zeros after the prefill)."""

    def _prefill(self, prompts, image_embeds, params):
        s = super()._prefill(prompts, image_embeds, params)
        s.recurrent.zero_()
        return s


@pytest.mark.parametrize("fault", [None, "state"], ids=["engine", "engine-losing-the-state"])
def test_selfcheck_rollout_check_covers_the_linear_attention_path(lm, prompts, embeds, fault):
    """The self-check's rollout check (engine against hf: greedy tokens, sampling log-probs against the trainer's)
    on the hybrid model, the engine's graphs emulated: it passes, and fails an engine that loses the state."""
    from lowmem_vt.selfcheck.rollout import check_rollout

    def make(name, lm):
        if name != "engine":
            return make_rollout(name, lm)
        return (LosesTheRecurrentState if fault else EngineRollout)(lm, decode_bucket=4, graphs=EmulatedGraphs())

    results, _ = check_rollout(lm, prompts[:2], embeds[:2], ["engine"], num_generations=3, length=10, temperature=1.0,
                               make=make)
    ref, engine = results
    assert ref.ok, ref.reason
    if fault is None:
        assert engine.ok, engine.reason
        assert engine.figures["greedy"] == "2/2 rows identical" and engine.figures["logprob_diff_max"] < 1e-4
        assert engine.figures["captures"] == 4  # greedy and sampling calls, 9 decode steps: 2 graphs each
    else:
        assert engine.ok is False and "sampling log-probs differ" in engine.reason, engine.reason


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-linear-attention's kernels and the CUDA graphs need a GPU")
def test_engine_on_the_gpu_equals_its_cpu_path(lm, prompts, embeds):  # pragma: no cover - needs a GPU
    """On a GPU (CUDA graphs capturing the in-place states; with flash-linear-attention where installed, its
    chunked prefill and fused recurrent decode kernels through transformers) the engine samples the CPU path's
    greedy tokens, fp32, and its sampling log-probs within 1e-4 of the CPU path's."""
    gpu = load_model(ModelConfig(name_or_path=lm.hf_model.name_or_path, dtype="float32"),
                     LoraConfig(r=4, alpha=8, target_modules=TARGETS), torch.device("cuda"), min_pixels=3136,
                     max_pixels=MAX_PIXELS)
    gpu.peft_model.load_state_dict(lm.peft_model.state_dict())
    gpu.peft_model.eval()
    feats = [e.cuda() for e in embeds]
    greedy = SamplingParams(num_generations=2, max_new_tokens=40, greedy=True)
    assert torch.equal(EngineRollout(gpu).generate(prompts, feats, greedy).completion_ids,
                       EngineRollout(lm).generate(prompts, embeds, greedy).completion_ids)
    sample = SamplingParams(2, 40, seeds=[1, 2, 3])
    got = EngineRollout(gpu).generate(prompts, feats, sample)
    seqs = build_sequences(prompts, got.prompt_rows, got.completion_ids.cpu(), got.completion_mask.cpu(), lm.pad_token_id)
    with torch.no_grad():
        logits = lm.hf_model.lm_head(sequence_hidden(lm, seqs, embeds)).float()
    trainer = torch.log_softmax(logits, -1).gather(-1, got.completion_ids.cpu()[..., None])[..., 0]
    mask = got.completion_mask.cpu().bool()
    torch.testing.assert_close(got.sampling_logprobs.cpu()[mask], trainer[mask], atol=1e-4, rtol=0)
