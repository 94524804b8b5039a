"""The in-process rollout engine against HF ``generate`` and against the trainer's own log-probs, on the
tiny model in float32 (CPU: the eager decode path; CUDA graphs are exercised by bench/rollout.py only)."""

import dataclasses
import importlib.util
import types

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from lowmem_vt.data import examples_from_records, generate_sat_records
from lowmem_vt.inputs import InputBuilder, build_sequences
from lowmem_vt.model import image_embeddings, sequence_hidden
from lowmem_vt.rollout import SamplingParams, make_rollout
from lowmem_vt.rollout.engine import sample_tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the tiny model's matmuls gain nothing from threads, and lose a lot when the cores are shared
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm(tiny_lm):
    tiny_lm.peft_model.eval()
    return tiny_lm


@pytest.fixture(scope="module")
def prompts(lm):
    builder = InputBuilder(lm.tokenizer, lm.image_processor, lm.config, max_prompt_length=1024, min_pixels=3136,
                           max_pixels=112 * 112)
    # different image sizes (16 and 4 image tokens) and different question lengths
    recs = generate_sat_records(2, size=112, seed=0) + generate_sat_records(1, size=56, seed=1, tasks=["count"])
    examples, _ = examples_from_records(recs, max_samples=3, shuffle_options=True, max_pixels=112 * 112, seed=0)
    out = [builder.encode(e.image, e.question) for e in examples]
    assert len({p.length for p in out}) == 3 and len({p.num_image_tokens for p in out}) == 2
    return out


@pytest.fixture(scope="module")
def embeds(lm, prompts):
    return image_embeddings(lm, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts])


def with_eos(lm, eos: int):
    """The same model with another token id playing EOS (-1: no token ends a completion)."""
    return dataclasses.replace(lm, tokenizer=types.SimpleNamespace(eos_token_id=eos, pad_token_id=lm.pad_token_id))


@pytest.mark.parametrize("which", [[1], [0, 1, 2]], ids=["single", "batched"])
def test_greedy_equals_hf_generate(lm, prompts, embeds, which):
    ps, es = [prompts[i] for i in which], [embeds[i] for i in which]
    params = SamplingParams(num_generations=1, max_new_tokens=24, greedy=True)
    vision_before = lm.vision_calls[0]
    ours = make_rollout("engine", lm).generate(ps, es, params)
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
