"""Qwen2.5-VL and Qwen3-VL behind the family seam, on tiny random models built locally (``tiny.build_tiny_model``),
each checked against the model's own forward: M-RoPE positions against ``get_rope_index``; image features
(Qwen2.5-VL's window attention, Qwen3-VL's DeepStack levels) against ``get_image_features`` of each image
alone; the trainer's right-padded batch of prompts with different image sizes against the model's forward of
each prompt alone with its pixels; the sampling log-probs of both rollout backends (a left-padded batch for
``hf``) against the trainer's; then the whole recipe (train, resume, eval, merge, plot) and a learning run."""

import json

import pytest
import torch

from lowmem_vt.config import LoraConfig, load_config
from lowmem_vt.data import examples_from_records, generate_sat_records
from lowmem_vt.families import family_named
from lowmem_vt.inputs import InputBuilder, build_sequences
from lowmem_vt.model import image_embeddings, sequence_hidden
from lowmem_vt.rollout import SamplingParams, make_rollout
from helpers.tiny_models import lora_model, prompt_embeddings, sat_prompts
from test_inputs import hf_single_logprobs  # the model's own unpadded forward, pixels in

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen3_5"]
MAX_PIXELS = 128 * 128  # 8x8 patches of 16 px (Qwen3-VL) or 9x9 of 14 px (Qwen2.5-VL): several windows


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tiny_family_dir):
    """(family, the folder of its tiny model: conftest's, built once per session)."""
    return family_named(request.param), tiny_family_dir(request.param)


@pytest.fixture(scope="module")
def lm(family_dir):
    """The tiny model with a LoRA adapter whose B is non-zero (policy != reference), in eval mode."""
    lm = lora_model(family_dir[1], LoraConfig(r=4, alpha=8), MAX_PIXELS)
    lm.peft_model.eval()
    return lm


@pytest.fixture(scope="module")
def prompts(lm):
    # different image sizes (-> different numbers of image tokens) and different question lengths
    return sat_prompts(lm, MAX_PIXELS)


@pytest.fixture(scope="module")
def embeds(lm, prompts):
    return prompt_embeddings(lm, prompts)


def test_positions_and_image_tokens_equal_the_models(lm, prompts):
    inner = lm.hf_model.model
    merge = lm.family.merge_size(lm.config)
    for p in prompts:
        assert p.num_image_tokens == int(p.image_grid_thw.prod()) // merge**2
        pos, delta = inner.get_rope_index(p.input_ids[None], mm_token_type_ids=p.mm_token_type_ids[None],
                                          image_grid_thw=p.image_grid_thw)
        assert torch.equal(pos[:, 0], p.position_ids)
        assert p.next_position == p.length + int(delta)


@torch.no_grad()
def test_image_features_of_one_tower_call_equal_each_image_alone(lm, prompts, embeds):
    """One vision call for the step's images of different sizes (window attention, interpolated position
    embeddings) gives each image what the model computes for it alone; Qwen3-VL carries its DeepStack levels."""
    levels = lm.family.feature_levels(lm.config)
    assert levels == (1 + len(lm.config.vision_config.deepstack_visual_indexes) if lm.family.model_type == "qwen3_vl" else 1)
    for p, e in zip(prompts, embeds):
        out = lm.hf_model.model.get_image_features(p.pixel_values, p.image_grid_thw, return_dict=True)
        assert e.shape == (levels, p.num_image_tokens, lm.config.text_config.hidden_size)
        torch.testing.assert_close(e[0], out.pooler_output[0], rtol=1e-5, atol=1e-6)
        for k, deep in enumerate(getattr(out, "deepstack_features", None) or []):
            torch.testing.assert_close(e[k + 1], deep[0] if isinstance(deep, (list, tuple)) else deep, rtol=1e-5, atol=1e-6)


def _trainer_logprobs(lm, prompts, embeds, rows, completion, mask, temperature=1.0):
    seqs = build_sequences(prompts, rows, completion, mask, lm.pad_token_id)
    logits = lm.hf_model.lm_head(sequence_hidden(lm, seqs, embeds)).float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, completion[..., None])[..., 0]


@torch.no_grad()
def test_batched_padded_logprobs_equal_the_models_forward_of_each_prompt(lm, prompts, embeds):
    torch.manual_seed(0)
    T = 6
    comp = torch.randint(10, 60, (3, T))
    lengths = torch.tensor([6, 2, 4])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    ours = _trainer_logprobs(lm, prompts, embeds, [0, 1, 2], comp, mask)
    for i, p in enumerate(prompts):
        n = int(lengths[i])
        torch.testing.assert_close(ours[i, :n], hf_single_logprobs(lm, p, comp[i, :n]), rtol=1e-4, atol=1e-5)
    if embeds[0].shape[0] > 1:  # the check sees DeepStack: without its levels the log-probs move
        flat = [e[:1] for e in embeds]
        off = _trainer_logprobs(lm, prompts, flat, [0, 1, 2], comp, mask)
        assert float((off[0] - ours[0]).abs().max()) > 1e-3


def hf_takes_the_features(lm) -> bool:
    """transformers < 5.18 (the GPU machine's 5.17) cannot hand DeepStack levels to generate: hf is refused there
    for Qwen3-VL (``test_hf_with_deepstack_on_old_transformers_is_refused``), the engine runs it."""
    from lowmem_vt.rollout.hf import hf_takes_features

    return hf_takes_features(lm.family, lm.config)


def every_linear(family) -> str:
    """The override putting LoRA on every linear the family's decoder layers have (Qwen3.5: linear attention too)."""
    return f"lora.target_modules=[{','.join(family.linear_names)}]"


def test_hf_with_deepstack_on_old_transformers_is_refused(lm, prompts, embeds, family_dir, tmp_path):
    if hf_takes_the_features(lm):
        pytest.skip("this transformers takes precomputed DeepStack features (mm_encoder_outputs), or no DeepStack")
    from lowmem_vt.preflight import PreflightError, check_recipe

    with pytest.raises(RuntimeError, match="DeepStack image features cannot be handed to generate before transformers 5.18"):
        make_rollout("hf", lm).generate(prompts, embeds, SamplingParams(2, 4, temperature=0.7))
    over = [f"model.name_or_path={family_dir[1]}", f"log.output_dir={tmp_path / 'out'}", "rollout.backend=hf"]
    with pytest.raises(PreflightError, match="key 'rollout.backend'.*DeepStack.*use rollout.backend=engine"):
        check_recipe(load_config("recipes/demo_tiny.yaml", over))


@pytest.mark.parametrize("backend", ["hf", "engine"])
def test_sampling_logprobs_equal_the_trainers(lm, prompts, embeds, backend):
    """fp32: the rollout's log-probs of what it sampled equal the trainer's (hf: one left-padded batch of
    prompts with different lengths and image sizes; engine: its own prefill and decode); greedy decoding of both
    backends agrees token for token."""
    if backend == "hf" and not hf_takes_the_features(lm):
        pytest.skip("hf with DeepStack needs transformers >= 5.18 (refused below: see the test above)")
    torch.manual_seed(0)
    roll = make_rollout(backend, lm).generate(prompts, embeds, SamplingParams(2, 10, temperature=0.7))
    with torch.no_grad():
        trainer = _trainer_logprobs(lm, prompts, embeds, roll.prompt_rows, roll.completion_ids, roll.completion_mask, 0.7)
    mask = roll.completion_mask.bool()
    assert float((roll.sampling_logprobs[mask] - trainer[mask]).abs().max()) <= 1e-4
    if backend == "engine" and hf_takes_the_features(lm):
        params = SamplingParams(1, 10, greedy=True)
        ours, ref = (make_rollout(b, lm).generate(prompts, embeds, params) for b in ("engine", "hf"))
        assert torch.equal(ours.completion_ids, ref.completion_ids)


@pytest.fixture(scope="module")
def two_image_prompt(lm):
    """A question with two images of different sizes (data.max_images_per_question: 2)."""
    first, second = generate_sat_records(1, size=112, seed=5)[0], generate_sat_records(1, size=56, seed=6)[0]
    record = dict(first, image_bytes=first["image_bytes"] + second["image_bytes"])
    kept, report = examples_from_records([record], max_samples=1, shuffle_options=False, max_pixels=MAX_PIXELS, seed=0,
                                         max_images=2)
    builder = InputBuilder(lm.tokenizer, lm.image_processor, lm.config, max_prompt_length=1024, min_pixels=3136,
                           max_pixels=MAX_PIXELS)
    prompt = builder.encode(kept[0].images, kept[0].question)
    assert prompt.image_grid_thw.shape[0] == 2 and prompt.image_grid_thw[0].prod() != prompt.image_grid_thw[1].prod()
    return prompt


def test_multi_image_questions_are_the_papers_filter_by_default(tmp_path):
    first, second = generate_sat_records(2, size=56, seed=7)
    record = dict(first, image_bytes=first["image_bytes"] + second["image_bytes"])
    kept, report = examples_from_records([record, second], max_samples=2, shuffle_options=False, max_pixels=MAX_PIXELS, seed=0)
    assert len(kept) == 1 and report.as_metrics()["data_skipped"] == 1  # default 1: single-image rows only
    kept, _ = examples_from_records([record], max_samples=1, shuffle_options=False, max_pixels=MAX_PIXELS, seed=0, max_images=2)
    assert len(kept[0].images) == 2
    assert load_config(None, []).data.max_images_per_question == 1


@torch.no_grad()
def test_multi_image_question_equals_the_models_forward(lm, prompts, two_image_prompt):
    """Two image blocks in one prompt, batched with a one-image prompt: positions, image features (each image
    encoded once), the trainer's log-probs and both rollout backends' sampling log-probs against the model."""
    p = two_image_prompt
    pos, delta = lm.hf_model.model.get_rope_index(p.input_ids[None], mm_token_type_ids=p.mm_token_type_ids[None],
                                                  image_grid_thw=p.image_grid_thw)
    assert torch.equal(pos[:, 0], p.position_ids) and p.next_position == p.length + int(delta)
    batch = [p, prompts[2]]
    before = lm.vision_calls[0]
    embeds = image_embeddings(lm, [q.pixel_values for q in batch], [q.image_grid_thw for q in batch])
    assert lm.vision_calls[0] - before == 3  # one tower call, three images
    assert [e.shape[1] for e in embeds] == [q.num_image_tokens for q in batch]
    torch.manual_seed(0)
    comp = torch.randint(10, 60, (2, 5))
    ours = _trainer_logprobs(lm, batch, embeds, [0, 1], comp, torch.ones(2, 5))
    for i, q in enumerate(batch):
        torch.testing.assert_close(ours[i], hf_single_logprobs(lm, q, comp[i]), rtol=1e-4, atol=1e-5)
    backends = [b for b, runs in (("hf", hf_takes_the_features(lm)), ("engine", True)) if runs]
    assert backends
    for backend in backends:
        torch.manual_seed(1)
        roll = make_rollout(backend, lm).generate(batch, embeds, SamplingParams(2, 8, temperature=0.7))
        trainer = _trainer_logprobs(lm, batch, embeds, roll.prompt_rows, roll.completion_ids, roll.completion_mask, 0.7)
        mask = roll.completion_mask.bool()
        assert float((roll.sampling_logprobs[mask] - trainer[mask]).abs().max()) <= 1e-4, backend


def test_whole_recipe_train_resume_eval_merge_plot(family_dir, tmp_path):
    """The recipe on the family's tiny model: 2 steps with the engine (hf where the engine does not decode the family
    yet), LoRA on every linear, resumed to 3, evaluated as a checkpoint and merged (the merged model answers alike),
    plotted."""
    from lowmem_vt.cli import main
    from lowmem_vt.cvbench import generate_cvbench_records, record_to_item
    from lowmem_vt.eval import ModelResponder, evaluate, load_eval_model
    from lowmem_vt.metrics import read_metrics
    from lowmem_vt.trainer import Trainer

    family, path = family_dir
    over = [f"model.name_or_path={path}", f"log.output_dir={tmp_path / 'run'}", "log.progress_bar=false",
            "data.generated_samples=16", "grpo.num_generations=2", "grpo.max_completion_length=4", "train.prompts_per_step=2",
            "train.micro_batch_size=4", "train.max_steps=3", "log.save_steps=1",
            "rollout.backend=engine", f"data.max_pixels={MAX_PIXELS}",
            every_linear(family)]
    cfg = load_config("recipes/demo_tiny.yaml", over)
    Trainer(cfg).train(until_step=2)
    tr = Trainer(load_config("recipes/demo_tiny.yaml", over), resume="latest")
    assert tr.step_count == 2
    tr.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["sampler_logprob_diff_max"] <= 1e-4 and r["vision_forward_calls"] == 2 for r in rows)
    assert (tmp_path / "run" / "plots" / "overview.png").is_file()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    merged = tmp_path / "merged"
    assert main(["merge", "--checkpoint", str(checkpoint), "--out", str(merged)]) == 0
    assert json.loads((merged / "config.json").read_text())["model_type"] == family.model_type
    items = [record_to_item(r, i) for i, r in enumerate(generate_cvbench_records(3, size=112, seed=3))]
    answers = []
    for kw in ({"checkpoint": str(checkpoint), "model": None}, {"checkpoint": None, "model": str(merged)}):
        lm, min_px, max_px = load_eval_model(**kw, device=torch.device("cpu"), dtype="float32", min_pixels=None,
                                             max_pixels=MAX_PIXELS)
        rows, _ = evaluate(items, ModelResponder(lm, max_new_tokens=5, min_pixels=min_px, max_pixels=max_px),
                           batch_size=3, progress=False)
        answers.append([r.response for r in rows])
    assert answers[0] == answers[1]


@pytest.mark.parametrize("model_type", [f if f != "qwen3_5" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_demo_recipe_learns_format_and_accuracy(model_type, tmp_path):
    """The R1-Zero story of ``make demo`` on the family's tiny base model: the format and answers read from the
    image become a habit (format rate and accuracy from < 0.3 at step 1 to >= 0.8, mean of the last 5 steps)."""
    from lowmem_vt.metrics import run_summary
    from lowmem_vt.tiny import build_tiny_base_model
    from lowmem_vt.trainer import Trainer

    family = family_named(model_type)
    base = build_tiny_base_model(tmp_path / "base", family=family)
    config = _config(base)
    side = family.patch_size(config) * family.merge_size(config) * 2  # 2x2 image tokens, as the base model saw
    from lowmem_vt.rollout.hf import hf_takes_features

    # the recipe's hf rollout, except for DeepStack on transformers < 5.18, where only the engine runs it
    hf_ok = hf_takes_features(family, config)
    cfg = load_config("recipes/demo_tiny.yaml", [f"model.name_or_path={base}", f"log.output_dir={tmp_path / 'demo'}",
                                                 "log.progress_bar=false", "log.plot=false", "log.save_steps=1000",
                                                 f"data.generated_image_size={side}", f"data.max_pixels={side * side}",
                                                 f"data.min_pixels={side * side}", every_linear(family),
                                                 *([] if hf_ok else ["rollout.backend=engine"])])
    tr = Trainer(cfg)
    tr.train()
    s = run_summary(tr.out)
    start, last = s["start"], s["last"]
    assert start["format_rate"] < 0.3 and start["accuracy"] < 0.3, s
    assert last["format_rate"] >= 0.8 and last["accuracy"] >= 0.8, s


def _config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def test_tiny_model_names_choose_the_family():
    from lowmem_vt.preflight import PreflightError, check_model_source
    from lowmem_vt.tiny import parse_tiny_name

    assert parse_tiny_name("tiny:artifacts/t")[0].model_type == "qwen2_vl"  # the demo's names keep their meaning
    family, base, folder = parse_tiny_name("tiny-base:artifacts/tiny-base-qwen2vl")
    assert (family.model_type, base, folder) == ("qwen2_vl", True, "artifacts/tiny-base-qwen2vl")
    family, base, folder = parse_tiny_name("tiny-base-qwen3_vl:x/y")
    assert (family.model_type, base, folder) == ("qwen3_vl", True, "x/y")
    assert parse_tiny_name("tiny-qwen2_5_vl:z")[:2] == (family_named("qwen2_5_vl"), False)
    assert parse_tiny_name("Qwen/Qwen3-VL-8B-Instruct") is None
    with pytest.raises(PreflightError, match="'llama' is not a model family.*Qwen2.5-VL"):
        check_model_source("tiny-llama:x", "key 'model.name_or_path'")
