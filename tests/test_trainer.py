"""The trainer on the tiny model: one step end to end, step-0 equality of policy and reference,
checkpoints, exact resume, interruption and non-finite steps."""

import os
import signal

import pytest
import torch

from lowmem_vt import checkpoint as ckpt
from lowmem_vt.metrics import read_metrics
from lowmem_vt.trainer import Trainer, TrainingStopped

SMALL = dict(**{"train.prompts_per_step": 2, "grpo.num_generations": 4, "train.micro_batch_size": 4,
                "grpo.max_completion_length": 4, "data.generated_samples": 16})


def _adapter(tr):
    return {n: p.detach().clone() for n, p in tr.lm.peft_model.named_parameters() if p.requires_grad}


def test_step_zero_policy_equals_reference_and_step_logs(recipe_factory):
    cfg = recipe_factory(**SMALL, **{"train.max_steps": 2})
    tr = Trainer(cfg)
    batch = tr._encode(*tr._batch_indices(0))
    from lowmem_vt.model import image_embeddings
    from lowmem_vt.rollout import SamplingParams

    embeds = image_embeddings(tr.lm, [p.pixel_values for p in batch.prompts], [p.image_grid_thw for p in batch.prompts])
    roll = tr.rollout.generate(batch.prompts, embeds, SamplingParams(4, 4, 1.0))
    slices = [slice(0, 4), slice(4, 8)]
    pol = tr._logprobs(batch.prompts, embeds, roll, slices, adapter=True)
    ref = tr._logprobs(batch.prompts, embeds, roll, slices, adapter=False)
    assert torch.equal(pol * roll.completion_mask, ref * roll.completion_mask)  # LoRA B starts at zero

    m = tr.step()
    for key in ("reward", "rewards/format", "rewards/accuracy", "accuracy", "format_rate", "reward_std", "completion_length_mean",
                "completion_length_max", "reflection_rate", "kl", "loss", "grad_norm", "lr", "tokens_per_s", "step_time_s"):
        assert key in m, key
    assert m["vision_forward_calls"] == 2  # one per prompt, although G = 4
    assert m["kl"] == 0.0 and m["step"] == 1
    assert m["grad_norm"] == m["grad_norm"] and not m["skipped_step"]  # finite, applied


def test_train_writes_metrics_checkpoints_and_resumes_exactly(recipe_factory, tmp_path):
    over = {**SMALL, "train.max_steps": 4, "log.save_steps": 2, "grpo.beta": 0.04}
    full = Trainer(recipe_factory(**over))
    full.train()
    full_metrics = read_metrics(full.out / "metrics.jsonl")
    full_adapter = _adapter(full)
    assert [m["step"] for m in full_metrics] == [1, 2, 3, 4]
    cps = ckpt.list_checkpoints(full.out)
    assert [p.name for p in cps] == ["checkpoint-2", "checkpoint-4"]
    assert (cps[-1] / "adapter" / "adapter_config.json").is_file()

    # stop after step 2, then resume to 4 in a new trainer
    cfg2 = recipe_factory(**over)
    cfg2.log.output_dir = str(tmp_path / "split")
    Trainer(cfg2).train(until_step=2)
    cfg3 = recipe_factory(**over)
    cfg3.log.output_dir = str(tmp_path / "split")
    resumed = Trainer(cfg3, resume="latest")
    assert resumed.step_count == 2
    resumed.train()
    split_metrics = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [m["step"] for m in split_metrics] == [1, 2, 3, 4]  # continued, no duplicate steps
    for a, b in zip(full_metrics, split_metrics):
        for k in ("reward", "loss", "kl", "grad_norm", "completion_length_mean", "lr"):
            assert a[k] == b[k], (a["step"], k, a[k], b[k])  # bit-for-bit on CPU
    for k, v in full_adapter.items():
        assert torch.equal(v, _adapter(resumed)[k]), k


def test_sigterm_during_step_saves_state_before_the_step(recipe_factory, tmp_path):
    over = {**SMALL, "train.max_steps": 3, "log.save_steps": 100}
    tr = Trainer(recipe_factory(**over))
    real = tr.rollout.generate
    calls = {"n": 0}

    def generate_then_signal(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:  # during step 2, after its rollout
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    tr.rollout.generate = generate_then_signal
    tr.train()
    assert tr.step_count == 1
    cps = ckpt.list_checkpoints(tr.out)
    assert [p.name for p in cps] == ["checkpoint-1"]
    assert not any(p.name.startswith(".tmp") for p in tr.out.iterdir())
    # resuming replays step 2 exactly as an uninterrupted run does
    resumed = Trainer(recipe_factory(**over), resume="latest")
    resumed.train()
    ref_cfg = recipe_factory(**over)
    ref_cfg.log.output_dir = str(tmp_path / "ref")
    ref = Trainer(ref_cfg)
    ref.train()
    a, b = read_metrics(resumed.out / "metrics.jsonl"), read_metrics(ref.out / "metrics.jsonl")
    assert [m["step"] for m in a] == [1, 2, 3]
    assert [m["loss"] for m in a] == [m["loss"] for m in b]


def test_incomplete_checkpoint_is_ignored(recipe_factory):
    tr = Trainer(recipe_factory(**SMALL, **{"train.max_steps": 1}))
    tr.train()
    # a save killed halfway leaves a temporary folder without COMPLETE: never picked up
    broken = tr.out / ".tmp-checkpoint-2"
    broken.mkdir()
    (tr.out / "checkpoint-3").mkdir()  # no COMPLETE marker
    assert ckpt.resolve_resume("latest", tr.out).name == "checkpoint-1"


def test_non_finite_steps_are_skipped_then_stop(recipe_factory, monkeypatch):
    import lowmem_vt.trainer as trainer_mod

    real = trainer_mod.fused_grpo_loss

    def nan_loss(*a, **k):
        loss, stats, lp = real(*a, **k)
        return loss * float("nan"), stats, lp

    monkeypatch.setattr(trainer_mod, "fused_grpo_loss", nan_loss)
    tr = Trainer(recipe_factory(**SMALL, **{"train.max_steps": 10, "train.max_bad_steps": 2, "log.save_steps": 1}))
    before = _adapter(tr)
    with pytest.raises(TrainingStopped, match="2 steps in a row"):
        tr.train()
    rows = read_metrics(tr.out / "metrics.jsonl")
    assert [r["skipped_step"] for r in rows] == [True, True]
    assert rows[-1]["bad_steps_total"] == 2
    for k, v in before.items():
        assert torch.equal(v, _adapter(tr)[k])  # no update was applied
    # the checkpoint written after the first (skipped) step is complete and loadable
    assert ckpt.list_checkpoints(tr.out)[-1].name == "checkpoint-1"


def test_trains_with_the_engine_rollout_and_reports_sampler_drift(recipe_factory, tmp_path):
    """``rollout.backend: engine`` end to end (what a user switches to on a GPU): steps apply, the engine laid
    q/k/v and gate/up out side by side without touching training, and the sampler is the policy the trainer
    scores (the log-probs before the update agree to float32 rounding); ``hf`` the same."""
    from lowmem_vt.rollout.linears import _adjacent

    tr = Trainer(recipe_factory(**SMALL, **{"train.max_steps": 2, "rollout.backend": "engine"}))
    metrics = [tr.step(), tr.step()]
    attn = tr.lm.hf_model.model.language_model.layers[0].self_attn
    assert _adjacent([attn.q_proj.base_layer.weight, attn.k_proj.base_layer.weight, attn.v_proj.base_layer.weight]) is not None
    for m in metrics:
        assert not m["skipped_step"] and m["grad_norm"] == m["grad_norm"]
        assert 0.0 <= m["sampler_logprob_diff"] <= m["sampler_logprob_diff_max"] < 1e-4, m
    tr.close()
    hf = Trainer(recipe_factory(**SMALL, **{"train.max_steps": 1, "log.output_dir": str(tmp_path / "hf")}))
    m = hf.step()  # HF generate records its sampling log-probs too
    assert 0.0 <= m["sampler_logprob_diff"] <= m["sampler_logprob_diff_max"] < 1e-4, m
    hf.close()


def test_a_sampler_that_is_not_the_policy_is_reported_and_warned(recipe_factory, caplog):
    """Rollout log-probs 0.5 off the policy's (as a padding or cache bug would make them): the step's metrics say
    so and the trainer warns, naming the backend."""
    tr = Trainer(recipe_factory(**SMALL, **{"train.max_steps": 1}))
    generate = tr.rollout.generate

    def off_by_half(*args, **kwargs):
        roll = generate(*args, **kwargs)
        roll.sampling_logprobs = (roll.sampling_logprobs - 0.5) * roll.completion_mask
        return roll

    tr.rollout.generate = off_by_half
    with caplog.at_level("WARNING", logger="lowmem_vt.trainer"):
        m = tr.step()
    assert m["sampler_logprob_diff"] == pytest.approx(0.5, abs=1e-3) and m["sampler_logprob_diff_max"] >= 0.5 - 1e-3
    assert any("is not the policy" in r.message and "rollout.backend: hf" in r.message for r in caplog.records)
    tr.close()
