"""The input builder against Hugging Face's own path: image-token expansion, M-RoPE positions, padding
and truncation. Every batched result is checked against the unpadded, single-prompt forward."""

import pytest
import torch

from lowmem_vt.data import OPTIONS_SENTENCE, DataError, examples_from_records, generate_sat_records
from lowmem_vt.inputs import InputBuilder, build_sequences, collate_prompts_left
from lowmem_vt.model import image_embeddings, sequence_hidden


@pytest.fixture(scope="module")
def builder(tiny_lm):
    return InputBuilder(tiny_lm.tokenizer, tiny_lm.image_processor, tiny_lm.config, max_prompt_length=1024,
                        min_pixels=3136, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def examples():
    # different image sizes (-> different numbers of image tokens) and different question lengths
    recs = generate_sat_records(3, size=112, seed=0) + generate_sat_records(2, size=56, seed=1, tasks=["count", "closer"])
    ex, _ = examples_from_records(recs, max_samples=5, shuffle_options=True, max_pixels=112 * 112, seed=0)
    return ex


def test_image_tokens_expanded_once(builder, examples, tiny_lm):
    for e in examples:
        p = builder.encode(e.image, e.question)
        t, h, w = p.image_grid_thw[0].tolist()
        assert p.num_image_tokens == t * h * w // 4
        assert int((p.input_ids == tiny_lm.config.image_token_id).sum()) == p.num_image_tokens
        assert p.pixel_values.shape[0] == t * h * w


def test_positions_equal_hf_rope_index(builder, examples, tiny_lm):
    for e in examples:
        p = builder.encode(e.image, e.question)
        hf_pos, delta = tiny_lm.hf_model.model.get_rope_index(
            p.input_ids[None], mm_token_type_ids=p.mm_token_type_ids[None], image_grid_thw=p.image_grid_thw)
        assert torch.equal(hf_pos[:, 0], p.position_ids)
        assert p.next_position == p.length + int(delta)


def hf_single_logprobs(lm, prompt, completion):
    """Log-probs of ``completion`` after one unpadded prompt through HF's own forward (pixels in)."""
    T = completion.numel()
    ids = torch.cat([prompt.input_ids, completion])[None]
    types = torch.cat([prompt.mm_token_type_ids, torch.zeros(T, dtype=torch.int)])[None]
    out = lm.hf_model(input_ids=ids, pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                      mm_token_type_ids=types)
    logits = out.logits[0, prompt.length - 1 : prompt.length - 1 + T].float()
    return torch.log_softmax(logits, -1).gather(-1, completion[:, None])[:, 0]


@torch.no_grad()
def test_batched_padded_logprobs_equal_single_unpadded(builder, examples, tiny_lm):
    lm = tiny_lm
    lm.peft_model.eval()
    prompts = [builder.encode(e.image, e.question) for e in examples]
    assert len({p.length for p in prompts}) > 1  # really different lengths
    torch.manual_seed(0)
    T = 7
    comp = torch.randint(10, 90, (len(prompts), T))
    lengths = torch.tensor([7, 3, 5, 1, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    embeds = image_embeddings(lm, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts])
    seqs = build_sequences(prompts, list(range(len(prompts))), comp, mask, lm.pad_token_id)
    hidden = sequence_hidden(lm, seqs, embeds)
    lp = torch.log_softmax(lm.hf_model.lm_head(hidden).float(), -1).gather(-1, comp[..., None])[..., 0]
    for i, p in enumerate(prompts):
        n = int(lengths[i])
        ref = hf_single_logprobs(lm, p, comp[i, :n])
        torch.testing.assert_close(lp[i, :n], ref, rtol=1e-4, atol=1e-5)
    lm.peft_model.train()


@torch.no_grad()
def test_left_padded_generation_batch_matches_single(builder, examples, tiny_lm):
    """Greedy HF generate over a left-padded batch gives each prompt's single-prompt result."""
    from lowmem_vt.rollout import SamplingParams, make_rollout

    lm = tiny_lm
    prompts = [builder.encode(e.image, e.question) for e in examples[:3]] + [builder.encode(examples[3].image, examples[3].question)]
    embeds = image_embeddings(lm, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts])
    ro = make_rollout("hf", lm)
    params = SamplingParams(num_generations=1, max_new_tokens=5, greedy=True)
    batched = ro.generate(prompts, embeds, params)
    for i, p in enumerate(prompts):
        single = ro.generate([p], [embeds[i]], params)
        n = int(single.completion_mask[0].sum())
        assert torch.equal(batched.completion_ids[i, :n], single.completion_ids[0, :n])
    collated = collate_prompts_left(prompts, lm.pad_token_id)
    assert (collated["mm_token_type_ids"].sum(1) == torch.tensor([p.num_image_tokens for p in prompts])).all()


@pytest.mark.parametrize("seeds, temperature", [(None, 0.7), ([1, 2, 3, 4], 1.0)], ids=["left-padded-batch", "per-prompt"])
def test_hf_sampling_logprobs_equal_the_trainers(builder, examples, tiny_lm, seeds, temperature):
    """HF generate's own sampling log-probs (recorded before its warpers) against the trainer's unpadded forward
    of the same tokens: equal to float32 rounding, also for 4 prompts of different lengths and image sizes
    sampled in one left-padded batch (padding shifting M-RoPE positions or token types would show here)."""
    from lowmem_vt.rollout import SamplingParams, make_rollout

    lm = tiny_lm
    prompts = [builder.encode(e.image, e.question) for e in examples[1:5]]
    assert len({p.length for p in prompts}) > 1 and len({p.num_image_tokens for p in prompts}) > 1
    embeds = image_embeddings(lm, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts])
    torch.manual_seed(0)
    roll = make_rollout("hf", lm).generate(prompts, embeds, SamplingParams(2, 10, temperature=temperature, seeds=seeds))
    seqs = build_sequences(prompts, roll.prompt_rows, roll.completion_ids, roll.completion_mask, lm.pad_token_id)
    with torch.no_grad():
        logits = lm.hf_model.lm_head(sequence_hidden(lm, seqs, embeds)).float() / temperature
    trainer = torch.log_softmax(logits, -1).gather(-1, roll.completion_ids[..., None])[..., 0]
    mask = roll.completion_mask.bool()
    assert roll.sampling_logprobs.shape == roll.completion_ids.shape
    torch.testing.assert_close(roll.sampling_logprobs[mask], trainer[mask], atol=1e-4, rtol=0)
    assert bool((roll.sampling_logprobs[~mask] == 0).all())


def test_hf_rollout_samples_the_recipe_distribution_whatever_the_models_generation_config(builder, examples, tiny_lm):
    """generate fills the settings a call leaves unset from the model's generation_config. With a hub-style config
    (top_k 2, top_p 0.5, min_p 0.3, repetition_penalty 1.5, temperature 0.1) the rollout still samples
    softmax(logits / T) untruncated, as the recipe says: log-probs equal the trainer's, and sampled tokens rank
    beyond the top 50 of their step's distribution (vocabulary 96). Before, repetition_penalty and min_p came
    from the config: the rollout's log-probs were off the trainer's by up to 1.12."""
    from lowmem_vt.rollout import SamplingParams, make_rollout

    lm = tiny_lm
    prompts = [builder.encode(e.image, e.question) for e in examples[:2]]
    embeds = image_embeddings(lm, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts])
    config = lm.hf_model.generation_config
    hostile = dict(do_sample=True, top_k=2, top_p=0.5, min_p=0.3, repetition_penalty=1.5, temperature=0.1)
    saved = {k: getattr(config, k) for k in hostile}
    try:
        for k, v in hostile.items():
            setattr(config, k, v)
        roll = make_rollout("hf", lm).generate(prompts, embeds, SamplingParams(8, 12, seeds=[3, 4]))
    finally:
        for k, v in saved.items():
            setattr(config, k, v)
    seqs = build_sequences(prompts, roll.prompt_rows, roll.completion_ids, roll.completion_mask, lm.pad_token_id)
    with torch.no_grad():
        logp = torch.log_softmax(lm.hf_model.lm_head(sequence_hidden(lm, seqs, embeds)).float(), -1)
    chosen = logp.gather(-1, roll.completion_ids[..., None])
    mask = roll.completion_mask.bool()
    torch.testing.assert_close(roll.sampling_logprobs[mask], chosen[..., 0][mask], atol=1e-4, rtol=0)
    rank = (logp > chosen).sum(-1)  # 0: the most likely token
    assert int(rank[mask].max()) >= 50, int(rank[mask].max())


def test_truncation_cuts_question_text_never_image_tokens(builder, examples, tiny_lm):
    e = examples[0]
    full = builder.encode(e.image, e.question)
    long_q = e.question.replace(OPTIONS_SENTENCE, " left right" * 200 + OPTIONS_SENTENCE)  # a long question, short options
    short = InputBuilder(tiny_lm.tokenizer, tiny_lm.image_processor, tiny_lm.config, max_prompt_length=full.length + 10,
                         min_pixels=3136, max_pixels=112 * 112)
    p = short.encode(e.image, long_q)
    assert p.truncated and p.length <= full.length + 10
    assert p.num_image_tokens == full.num_image_tokens
    # the template's end survives: the prompt still ends with "... step by step.\n<think>"
    assert tiny_lm.tokenizer.decode(p.input_ids[-3:]).strip().endswith("<think>")
    tiny = InputBuilder(tiny_lm.tokenizer, tiny_lm.image_processor, tiny_lm.config, max_prompt_length=20,
                        min_pixels=3136, max_pixels=112 * 112)
    with pytest.raises(DataError, match="max_prompt_length"):
        tiny.encode(e.image, e.question)


def test_sampled_image_pad_token_is_text_not_image(builder, examples, tiny_lm):
    """A completion that samples <|image_pad|> must not be taken for an image slot."""
    lm = tiny_lm
    p = builder.encode(examples[0].image, examples[0].question)
    comp = torch.tensor([[lm.config.image_token_id, 11, 12]])
    seqs = build_sequences([p], [0], comp, torch.ones(1, 3), lm.pad_token_id)
    embeds = image_embeddings(lm, [p.pixel_values], [p.image_grid_thw])
    hidden = sequence_hidden(lm, seqs, embeds)  # would raise on a count mismatch
    assert hidden.shape[:2] == (1, 3)
