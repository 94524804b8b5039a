"""Qwen3.5 (hybrid: Gated DeltaNet linear attention + gated full attention, zero-centred norms) on a tiny random
model built locally: the trainer's right-padded batches against the model's own forward of each prompt alone,
a left-padded batch whose pad tokens reach the conv and recurrent state (the failure the check must catch), the
LoRA targets of the linear-attention layers, merge = base + adapter (norms included), MoE refused in pre-flight.
The recipe end to end (train, resume, eval, merge, plot) and the learning run are ``test_families``' for every
family, Qwen3.5 among them."""

import json

import pytest
import torch
import yaml
from PIL import Image

from lowmem_vt.config import load_config, to_dict
from lowmem_vt.families import family_named
from lowmem_vt.inputs import build_sequences
from lowmem_vt.model import sequence_hidden
from helpers.tiny_models import QWEN35_LINEAR_TARGETS, QWEN35_TARGETS, prompt_embeddings, sat_prompts
from test_inputs import hf_single_logprobs  # the model's own unpadded forward, pixels in

MAX_PIXELS = 128 * 128  # tiny35_lm's (conftest)
TARGETS, LINEAR_TARGETS = QWEN35_TARGETS, QWEN35_LINEAR_TARGETS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tiny35_lm):
    """The tiny Qwen3.5 with LoRA on every linear of both layer kinds, B non-zero (policy != reference), eval mode."""
    return tiny35_lm


@pytest.fixture(scope="module")
def prompts(lm):
    return sat_prompts(lm, MAX_PIXELS)


@pytest.fixture(scope="module")
def embeds(lm, prompts):
    return prompt_embeddings(lm, prompts)


@pytest.fixture(scope="module")
def completions():
    torch.manual_seed(0)
    T = 7
    comp = torch.randint(10, 60, (3, T))
    lengths = torch.tensor([7, 2, 5])
    return comp, lengths, (torch.arange(T)[None] < lengths[:, None]).float()


def test_tiny_model_is_hybrid_with_zero_centred_norms_and_lora_on_both_kinds(lm, tiny35_dir):
    family = lm.family
    config = json.loads((tiny35_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and not config["tie_word_embeddings"]
    kinds = family.layer_types(lm.config.text_config)
    assert kinds == ["linear_attention", "full_attention"]
    layers = family.text_model(lm.hf_model).layers
    # q_proj is twice as wide (query and output gate of each head): the shapes pre-flight and the planner read
    shapes = family.decoder_linear_shapes(lm.config.text_config)
    assert layers[1].self_attn.q_proj.base_layer.weight.shape[::-1] == torch.Size(shapes["q_proj"])
    for name in LINEAR_TARGETS:
        module = getattr(layers[0].linear_attn, name)
        assert hasattr(module, "lora_A"), name  # LoRA reaches the linear-attention layers
        assert module.base_layer.weight.shape[::-1] == torch.Size(shapes[name]), name
    norms = [p for n, p in family.text_model(lm.hf_model).named_parameters() if n.endswith("norm.weight")]
    assert norms and all(float(p.abs().max()) > 0.01 for p in norms)  # away from 0: 1 + w is exercised
    parts = [family.engine_layer(layer) for layer in family.text_model(lm.hf_model).layers]
    assert [p.kind for p in parts] == kinds and parts[1].output_gate and parts[0].norm_offset == 1.0


@torch.no_grad()
def test_image_tokens_positions_and_features_equal_the_models(lm, prompts, embeds):
    inner = lm.family.inner_model(lm.hf_model)
    for p, e in zip(prompts, embeds):
        pos, delta = inner.get_rope_index(p.input_ids[None], mm_token_type_ids=p.mm_token_type_ids[None],
                                          image_grid_thw=p.image_grid_thw)
        assert torch.equal(pos[:, 0], p.position_ids) and p.next_position == p.length + int(delta)
        out = inner.get_image_features(p.pixel_values, p.image_grid_thw, return_dict=True)
        assert e.shape == (1, p.num_image_tokens, lm.config.text_config.hidden_size)
        torch.testing.assert_close(e[0], out.pooler_output[0], rtol=1e-5, atol=1e-6)
    # what pre-flight counts for an image is what the processor makes of it
    for width, height in ((56, 56), (112, 112), (200, 90)):
        tokens = lm.family.image_tokens(lm.config, height, width, 3136, MAX_PIXELS)
        grid = lm.image_processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"]
        assert tokens == int(grid.prod()) // 4


def _trainer_logprobs(lm, prompts, embeds, comp, mask):
    seqs = build_sequences(prompts, [0, 1, 2], comp, mask, lm.pad_token_id)
    logits = lm.family.lm_head(lm.hf_model)(sequence_hidden(lm, seqs, embeds)).float()
    return torch.log_softmax(logits, -1).gather(-1, comp[..., None])[..., 0]


def _single(lm, prompts, comp, lengths) -> list[torch.Tensor]:
    return [hf_single_logprobs(lm, p, comp[i, : int(lengths[i])]) for i, p in enumerate(prompts)]


def _max_diff(batched: torch.Tensor, single: list[torch.Tensor]) -> float:
    return max(float((batched[i, : len(s)] - s).abs().max()) for i, s in enumerate(single))


@torch.no_grad()
def test_trainer_logprobs_equal_the_models_forward_of_each_prompt_alone(lm, prompts, embeds, completions):
    """fp32, within 1e-5: one right-padded batch of prompts with different lengths and image sizes (and completions
    with different lengths: pad tokens after them) against the model's own forward of each prompt alone. A pad token
    in a row's conv window or recurrent state would move that row's log-probs (see the left-padding test)."""
    comp, lengths, mask = completions
    single = _single(lm, prompts, comp, lengths)
    assert _max_diff(_trainer_logprobs(lm, prompts, embeds, comp, mask), single) <= 1e-5
    with lm.peft_model.disable_adapter():  # the reference: the same path with the adapter off
        ref = _trainer_logprobs(lm, prompts, embeds, comp, mask)
        assert _max_diff(ref, _single(lm, prompts, comp, lengths)) <= 1e-5
    assert _max_diff(ref, single) > 1e-3  # the adapter (on both layer kinds) moves the log-probs


def _left_padded_logprobs(lm, prompts, embeds, comp, lengths, mask_linear_layers: bool) -> torch.Tensor:
    """The same rows left-padded (pad tokens first, each prompt's own positions), through the language model with a
    causal mask that hides the pad tokens from the full-attention layers; ``mask_linear_layers`` False gives the
    linear-attention layers no padding mask (as a port of a KV-cache engine's left padding would): the pad tokens'
    inputs then enter the conv window and the recurrent state of the real tokens after them."""
    rows = []
    for i, p in enumerate(prompts):
        n = int(lengths[i])
        rows.append((p, torch.cat([p.input_ids, comp[i, :n]]), n))
    S = max(len(ids) for _, ids, _ in rows)
    B = len(rows)
    pad = lm.pad_token_id
    input_ids = torch.full((B, S), pad)
    real = torch.zeros(B, S, dtype=torch.bool)
    positions = torch.zeros(3, B, S, dtype=torch.long)
    image_mask = torch.zeros(B, S, dtype=torch.bool)
    for i, (p, ids, n) in enumerate(rows):
        input_ids[i, S - len(ids):] = ids
        real[i, S - len(ids):] = True
        image_mask[i, S - len(ids): S - len(ids) + p.length] = p.mm_token_type_ids.bool()
        positions[:, i, S - len(ids):] = torch.cat([p.position_ids, (p.next_position + torch.arange(n)).view(1, -1).expand(3, -1)], 1)
    inner = lm.family.inner_model(lm.hf_model)
    x = inner.get_input_embeddings()(input_ids)
    x = x.masked_scatter(image_mask[..., None], torch.cat([e[0] for e in embeds]))
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    # a pad query attends to itself only (a row of nothing would be NaN in sdpa and spread through the values)
    attend = causal & (real[:, None, :] | torch.eye(S, dtype=torch.bool))
    masks = {"full_attention": attend[:, None], "linear_attention": real.long() if mask_linear_layers else None}
    hidden = lm.family.language_model(inner)(inputs_embeds=x, attention_mask=masks, position_ids=positions).last_hidden_state
    logp = torch.log_softmax(lm.family.lm_head(lm.hf_model)(hidden).float(), -1)
    out = torch.zeros(comp.shape)
    for i, (p, ids, n) in enumerate(rows):
        at = S - len(ids) + p.length - 1 + torch.arange(n)
        out[i, :n] = logp[i, at].gather(-1, comp[i, :n, None])[:, 0]
    return out


@torch.no_grad()
def test_left_padding_without_the_linear_layers_mask_leaks_pads_into_the_state(lm, prompts, embeds, completions):
    """The check above fails where pad tokens reach the conv or recurrent state: the same rows left-padded, the full
    attention masked but the linear-attention layers given no padding mask, are off by far more than 1e-5 for every
    padded row; with the model's own 2-D mask for them (it zeroes padded inputs) left padding is exact again. The
    unpadded (longest) row is exact either way."""
    comp, lengths, _ = completions
    single = _single(lm, prompts, comp, lengths)
    naive = _left_padded_logprobs(lm, prompts, embeds, comp, lengths, mask_linear_layers=False)
    masked = _left_padded_logprobs(lm, prompts, embeds, comp, lengths, mask_linear_layers=True)
    longest = max(range(3), key=lambda i: prompts[i].length + int(lengths[i]))
    for i, s in enumerate(single):
        n = len(s)
        assert float((masked[i, :n] - s).abs().max()) <= 1e-5
        leak = float((naive[i, :n] - s).abs().max())
        assert leak <= 1e-5 if i == longest else leak > 1e-3, (i, leak)


def test_lora_targets_and_adapter_shapes_of_the_linear_attention_layers(lm, tmp_path):
    from lowmem_vt.preflight import PreflightError, check_adapter_fits, check_lora_targets

    check_lora_targets(lm.config, TARGETS, "r.yaml")
    with pytest.raises(PreflightError, match=r"lora.target_modules\[0\]': 'conv1d' matches no linear.*in_proj_qkv"):
        check_lora_targets(lm.config, ["conv1d"], "r.yaml")
    lm.peft_model.save_pretrained(str(tmp_path / "adapter"))
    check_adapter_fits(tmp_path / "adapter", lm.config, "--model")
    # a base with wider value heads: the adapter's linear-attention in_proj_qkv no longer fits
    wider = lm.config.__class__.from_dict(lm.config.to_dict())
    wider.text_config.linear_value_head_dim = 32
    with pytest.raises(PreflightError, match=r"the base's in_proj_qkv has 192 outputs but the adapter's layer 0 in_proj_qkv"):
        check_adapter_fits(tmp_path / "adapter", wider, "--model")


@torch.no_grad()
def test_merged_model_is_base_plus_adapter_norms_included(lm, tiny35_dir, prompts, tmp_path):
    """The merged folder's every weight: base + scale * B @ A for each adapted linear (both layer kinds), the base's
    own elsewhere (the zero-centred norms as trained, not reset); its logits equal the adapter's."""
    from safetensors.torch import load_file

    from lowmem_vt.cli import main

    ckpt = tmp_path / "checkpoint-1"
    lm.peft_model.save_pretrained(str(ckpt / "adapter"))
    cfg = load_config(None, [f"model.name_or_path={tiny35_dir}", "model.dtype=float32", "lora.r=4", "lora.alpha=8",
                             f"lora.target_modules=[{','.join(TARGETS)}]", "data.min_pixels=3136", f"data.max_pixels={MAX_PIXELS}"])
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert main(["merge", "--checkpoint", str(ckpt), "--out", str(tmp_path / "merged")]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(tiny35_dir / "model.safetensors"))
    assert merged.keys() == base.keys()
    adapted = {}
    for name, module in lm.hf_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            adapted[name + ".weight"] = delta
    assert len(adapted) == 15  # layer 0: 5 linear-attention + 3 MLP linears; layer 1: 4 attention + 3 MLP
    for key, w in base.items():
        want = w + adapted[key] if key in adapted else w
        torch.testing.assert_close(merged[key], want, rtol=0, atol=1e-6, msg=key)
    assert any("layernorm" in k and float(base[k].abs().max()) > 0.01 for k in base)
    model = family_named("qwen3_5").model_class().from_pretrained(tmp_path / "merged").eval()
    p = prompts[0]
    kwargs = dict(input_ids=p.input_ids[None], pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
                  mm_token_type_ids=p.mm_token_type_ids[None])
    torch.testing.assert_close(model(**kwargs).logits, lm.hf_model(**kwargs).logits, rtol=1e-5, atol=2e-5)


def test_qwen3_5_moe_is_refused_in_one_line(tmp_path):
    from lowmem_vt.preflight import PreflightError, check_model_source

    folder = tmp_path / "moe"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
    (folder / "model.safetensors").write_bytes(b"")
    for name in (str(folder), "tiny-qwen3_5_moe:x"):
        with pytest.raises(PreflightError, match="Qwen3.5-MoE .* is not supported.*use a dense Qwen3.5") as err:
            check_model_source(name, "key 'model.name_or_path'")
        assert "\n" not in str(err.value)


def test_the_step_runs_on_fake_tensors(tiny35_dir):
    """The memory simulator runs the tiny Qwen3.5's step (both layer kinds, LoRA on the linear-attention layers)
    without values: the text model tests its padding mask for all ones, which a fake mask answers without a value
    (the simulator makes the batch's mask one)."""
    from test_simulate import simulate_fresh

    sim = simulate_fresh("recipes/demo_tiny.yaml", [f"model.name_or_path={tiny35_dir}", "train.micro_batch_size=2",
                                                    "grpo.num_generations=2", "train.prompts_per_step=1",
                                                    f"lora.target_modules=[{','.join(TARGETS)}]"])
    assert sim["peaks"]["policy update"] > sim["resident"] > 0


def test_tiny_names_build_qwen3_5():
    from lowmem_vt.tiny import parse_tiny_name

    family, base, folder = parse_tiny_name("tiny-base-qwen3_5:x/y")
    assert (family.model_type, base, folder) == ("qwen3_5", True, "x/y")


def test_lora_rank_check_skips_the_per_head_linears(lm):
    """in_proj_a / in_proj_b have one output per value head (4 here, 32 in the published models): the paper's r 64
    stays allowed with them targeted; a rank over a wide layer's side is still refused."""
    from lowmem_vt.preflight import PreflightError, check_lora_rank

    targets = f"lora.target_modules=[{','.join(TARGETS)}]"
    check_lora_rank(load_config(None, ["lora.r=16", targets]), lm.config)
    with pytest.raises(PreflightError, match=r"key 'lora.r': 65 exceeds the smallest side \(64\)"):
        check_lora_rank(load_config(None, ["lora.r=65", targets]), lm.config)
