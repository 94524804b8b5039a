"""The memory planner's arithmetic on known configurations, checked against hand-computed values."""

import dataclasses
import importlib

import pytest

from lowmem_vt.config import load_config
from lowmem_vt.planner import (GIB, SAMPLING_BUFFERS, PlanError, check_fits, kv_cache_bytes_per_token, layer_bytes_per_token,
                               model_shape, plan, rollout_bytes)
from lowmem_vt.families.qwen2_vl import qwen2_vl_2b_config


@pytest.fixture(scope="module")
def cfg2b():
    return qwen2_vl_2b_config()


def test_2b_parameter_counts(cfg2b):
    s = model_shape(cfg2b, 64, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert round((s.params_text_linear + s.params_other) / 1e9, 3) == 2.209  # ANCHORS.md: 2.209 B
    assert round(s.params_vision / 1e9, 3) == 0.665
    # LoRA r=64 on q/k/v/o/gate/up/down: per layer r·(1536+1536 + 2·(1536+256) + 1536+1536 + 3·(1536+8960)) × 28 layers
    assert s.lora_params == 64 * (3072 + 2 * 1792 + 3072 + 3 * 10496) * 28 == 73_859_072


def test_kv_cache_bytes(cfg2b):
    s = model_shape(cfg2b, 8, ["q_proj"])
    # 2 (K and V) x 28 layers x 2 kv heads x 128 head dim x 2 bytes (bf16)
    assert kv_cache_bytes_per_token(s, 2) == 2 * 28 * 2 * 128 * 2 == 28_672


def test_plan_of_the_lora_recipe(cfg2b):
    cfg = load_config("recipes/sat_lora.yaml")
    p = plan(cfg, cfg2b)
    assert p.phases["weights"] == pytest.approx(2_208_985_600 * 2 / GIB, rel=2e-3)  # bf16 weights ~4.11 GiB
    assert p.phases["vision tower (host memory between its calls)"] == pytest.approx(0.665e9 * 2 / GIB, rel=2e-3)
    assert p.phases["LoRA weights (fp32)"] == pytest.approx(73_859_072 * 4 / GIB)
    assert p.phases["LoRA gradients (fp32)"] == pytest.approx(73_859_072 * 4 / GIB)
    assert p.phases["optimizer state"] == pytest.approx(73_859_072 * 8 / GIB)  # AdamW moments
    qlora = plan(load_config("recipes/sat_qlora.yaml"), cfg2b)
    # NF4 on the language model's linears (per layer 2·1536² + 2·1536·256 + 3·1536·8960, × 28), the rest
    # (vision tower, embeddings/head, norms, biases) stays bf16
    text_linear = (2 * 1536**2 + 2 * 1536 * 256 + 3 * 1536 * 8960) * 28
    assert text_linear == 1_310_195_712
    nf4 = text_linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + (2_208_985_600 - text_linear) * 2
    assert qlora.phases["weights"] == pytest.approx(nf4 / GIB, rel=2e-3)
    assert qlora.phases["optimizer state"] == 0.0  # paged 8-bit AdamW: managed memory, outside the allocator
    assert any("managed memory" in n for n in qlora.notes)
    # the CUDA context is added to the allocated peak, not to a phase
    assert p.peak == pytest.approx(p.allocated + 0.5) and p.allocated == max(p.peaks.values())


def test_rollout_bytes_follow_the_backend(cfg2b):
    s = model_shape(cfg2b, 64, ["q_proj"])
    hf = load_config("recipes/sat_lora.yaml", ["rollout.backend=hf"])
    kv = 28_672 * 8 * (594 + 700)  # G rows x (prompt + completion) slots
    sampling = SAMPLING_BUFFERS * 8 * 151936 * 4
    # the prefill of the prompt's G rows (one no-grad layer's temporaries: 3I + 2H in bf16, one fp32 norm copy)
    # outweighs one decode step's sampling buffers; one layer's K or V copied as the dynamic cache grows
    prefill = 8 * 594 * ((3 * 8960 + 2 * 1536) * 2 + 4 * 1536)
    assert prefill > sampling
    assert rollout_bytes(hf, s, 594, 700) == kv + kv // 56 + prefill
    engine = load_config("recipes/sat_lora.yaml", ["rollout.backend=engine"])
    # the engine's own accounting: each of the 8 prompts' KV held once (594 -> 640 slots, the engine's
    # 128-slot bucket) beside its G = 8 samples' 700 -> 768 slots; its state, adapter copies and one decode
    # step's workspace (the larger, here, than one prompt's prefill)
    from lowmem_vt.rollout import engine_allocation_bytes

    e = engine_allocation_bytes(cfg2b.text_config, "bfloat16", 8, 594, 8, 700, lora_r=64, lora_targets=engine.lora.target_modules)
    assert e.kv_cache == 28_672 * 8 * (640 + 8 * 768)
    assert e.step_workspace > prefill // 8
    assert rollout_bytes(engine, s, 594, 700) == e.allocated + e.step_workspace
    # auto (the SAT recipes' default): the self-check picks one before step 1, so the plan holds the larger
    auto = load_config("recipes/sat_lora.yaml")
    assert auto.rollout.backend == "auto"
    assert rollout_bytes(auto, s, 594, 700) == max(rollout_bytes(engine, s, 594, 700), rollout_bytes(hf, s, 594, 700))


def test_plan_that_cannot_fit_names_the_knob(cfg2b):
    cfg = load_config("recipes/sat_lora.yaml", ["train.micro_batch_size=64", "grpo.num_generations=8",
                                                "train.prompts_per_step=8"])
    with pytest.raises(PlanError) as err:
        check_fits(cfg, cfg2b, gpu_gib=8.0)
    msg = str(err.value)
    assert "train.micro_batch_size" in msg and "recipes/sat_lora.yaml" in msg
    assert check_fits(load_config("recipes/sat_lora.yaml"), cfg2b, gpu_gib=24.0).peak < 24.0


def test_plan_cli(tiny_dir, capsys):
    from lowmem_vt.cli import main

    assert main(["plan", "recipes/demo_tiny.yaml", f"model.name_or_path={tiny_dir}", "--gpu-gib", "4"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "rollout KV cache" in out


# ------------------------------------------------------------------------------ hybrid (Qwen3.5)


@pytest.fixture(scope="module")
def cfg35():
    from lowmem_vt.families.qwen3_5 import qwen3_5_9b_config

    return qwen3_5_9b_config()


TARGETS35 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj_qkv", "in_proj_z",
             "in_proj_a", "in_proj_b", "out_proj"]


def test_qwen35_9b_shape_counts_both_layer_kinds(cfg35):
    s = model_shape(cfg35, 64, TARGETS35)
    assert s.params_text_linear + s.params_other == 9_409_813_744  # the count published for Qwen3.5-9B-Base
    assert (s.attention_layers, s.linear_layers, s.linear_width, s.linear_heads) == (8, 24, 32 * 128, 32)
    assert not s.tied and s.vocab == 248_320
    # LoRA r 64: attention layers' q_proj (query and gate: 2 x 16 x 256 = 8192 out), k/v (1024), o (4096 in); the
    # linear layers' in_proj_qkv (2 x 2048 + 4096 = 8192), z (4096), a and b (32), out_proj (4096 in); every MLP
    H, I = 4096, 12288
    attention = (H + 8192) + 2 * (H + 1024) + (4096 + H)
    linear = (H + 8192) + (H + 4096) + 2 * (H + 32) + (4096 + H)
    assert s.lora_params == 64 * (8 * attention + 24 * linear + 32 * 3 * (H + I))


def test_qwen35_rollout_holds_kv_of_full_attention_layers_and_state_of_linear_ones(cfg35):
    s = model_shape(cfg35, 64, TARGETS35)
    # K and V of the 8 full-attention layers only: 2 x 8 x 4 kv heads x 256 x 2 bytes
    assert kv_cache_bytes_per_token(s, 2) == 2 * 8 * 4 * 256 * 2
    hf = load_config("recipes/sat_qlora_qwen35_9b.yaml", ["rollout.backend=hf"])
    states = 8 * 24 * ((2 * 16 * 128 + 32 * 128) * 3 * 2 + 32 * 128 * 128 * 4)  # G rows x linear layers x (conv + recurrent)
    kv = 8 * 1200 * 32768  # G rows x (prompt + completion) x K/V bytes per token
    prefill = 8 * 500 * layer_bytes_per_token(s, hf, backward=False)  # generate expands the prompt to its G rows
    assert prefill > SAMPLING_BUFFERS * 8 * 248_320 * 4
    assert rollout_bytes(hf, s, 500, 700) == int(kv + kv // 16 + states + prefill)  # + one layer's K or V regrown
    from lowmem_vt.engine_memory import engine_allocation_bytes
    from lowmem_vt.families import family_named

    e = engine_allocation_bytes(cfg35.text_config, "bfloat16", 8, 500, 8, 700, lora_r=64, lora_targets=TARGETS35,
                                qkv_bias=False, shapes=family_named("qwen3_5").decoder_linear_shapes(cfg35.text_config))
    assert e.kv_cache == 2 * 8 * 8 * 4 * (512 + 8 * 768) * 256 * 2  # 8 prompts' KV once: 512 prompt + G x 768 slots
    assert e.linear_state == 64 * states // 8  # every one of the 64 rows
    engine = load_config("recipes/sat_qlora_qwen35_9b.yaml", ["rollout.backend=engine"])
    assert rollout_bytes(engine, s, 500, 700) > e.allocated


def test_qwen35_recipes_fit_14_gib_in_the_plan():
    from lowmem_vt.planner import config_for

    for recipe in ("sat_lora_qwen35_4b", "sat_qlora_qwen35_9b"):
        cfg = load_config(f"recipes/{recipe}.yaml")
        assert (cfg.grpo.num_generations, cfg.grpo.max_completion_length, cfg.train.prompts_per_step) == (8, 700, 8)
        assert plan(cfg, config_for(cfg)).peak <= 14.0, recipe


PROBE_QUIET = r"""
import sys, torch
from lowmem_vt.families import family_named
family = family_named("qwen3_5")
family.mixer_holds_repeated_qk()
print("probed", file=sys.stderr, flush=True)
rule = sys.modules[family.model_class().__module__].torch_chunk_gated_delta_rule
q, k, v = torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4, 4)
rule(q, k, v, g=-torch.rand(1, 2, 4), beta=torch.rand(1, 2, 4), use_qk_l2norm_in_kernel=True)
"""


def test_qwen35_probe_says_nothing_and_leaves_the_runs_fallback_warning():
    """The probe runs the delta rule on CPU tensors; transformers would say it "is falling back to its reference
    PyTorch implementation", which ``lowmem-vt plan`` on a GPU with flash-linear-attention must not claim. The run's
    own call (here the same rule, on CPU, without flash-linear-attention) still warns, once."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", PROBE_QUIET], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    probe, run = res.stderr.split("probed\n")
    assert "falling back" not in probe, probe
    assert run.count("falling back to its reference PyTorch implementation") == 1, run


def test_qwen35_repeated_qk_follow_the_installed_layer(monkeypatch, cfg35):
    """The planner counts q / k repeated to the value heads where the installed transformers' Gated DeltaNet layer
    repeats them before its chunked delta rule (5.17) and holds them while it runs; the oracle is that layer's own
    forward (2 key heads serving 4 value heads), its rule replaced by one that records what it is handed."""
    import torch
    from transformers import Qwen3_5TextConfig

    from lowmem_vt.families import family_named

    text = Qwen3_5TextConfig(hidden_size=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                             linear_value_head_dim=8, linear_conv_kernel_dim=4, num_hidden_layers=1,
                             layer_types=["linear_attention"])
    modeling = importlib.import_module(family_named("qwen3_5").model_class().__module__)
    layer = modeling.Qwen3_5GatedDeltaNet(text, layer_idx=0)
    handed = {}

    class Recorded(Exception):
        pass

    def recorder(query, key, value, **kwargs):
        handed.update(query=query.shape[2], key=key.shape[2], value=value.shape[2])
        raise Recorded

    monkeypatch.setattr(modeling, "torch_chunk_gated_delta_rule", recorder)
    with torch.no_grad(), pytest.raises(Recorded):
        layer(torch.randn(1, 5, 32))
    monkeypatch.undo()
    repeats_before = handed == {"query": 4, "key": 4, "value": 4}
    assert repeats_before or handed == {"query": 2, "key": 2, "value": 4}, handed
    assert family_named("qwen3_5").mixer_holds_repeated_qk() == repeats_before

    s = model_shape(cfg35, 64, TARGETS35)  # 16 key heads serve 32 value heads of key dim 128
    assert s.linear_repeated_qk_width == (32 * 128 if repeats_before else 0)
    # a no-grad forward (the reference pass, a prefill) holds both copies in bf16 beside the rule's float32 work; a
    # recomputed backward's peak comes after the layer's forward has let them go
    cfg = load_config("recipes/sat_qlora_qwen35_9b.yaml")
    held, none = (dataclasses.replace(s, linear_repeated_qk_width=w) for w in (s.linear_width, 0))
    assert layer_bytes_per_token(held, cfg, backward=False) - layer_bytes_per_token(none, cfg, backward=False) \
        == pytest.approx(2 * 32 * 128 * 2)
    assert layer_bytes_per_token(held, cfg, backward=True) == layer_bytes_per_token(none, cfg, backward=True)
