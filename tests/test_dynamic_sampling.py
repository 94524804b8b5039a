"""DAPO's dynamic sampling and overlong shaping in the trainer (issue 27): zero-variance groups are dropped and
the step refilled from the next prompts in more rounds of the same size, up to a cap; the data cursor moves with
the extra rounds and checkpoints keep it, so an interrupted and resumed run equals an uninterrupted one."""

import os
import signal

import pytest
import torch

from lowmem_vt import checkpoint as ckpt
from lowmem_vt.grpo import overlong_penalty, truncated_rows, zero_variance_groups
from lowmem_vt.metrics import read_metrics
from lowmem_vt.trainer import Trainer

DAPO = {"train.prompts_per_step": 2, "grpo.num_generations": 4, "train.micro_batch_size": 4,
        "grpo.max_completion_length": 4, "data.generated_samples": 16, "grpo.loss_type": "dapo",
        "grpo.dynamic_sampling": True, "grpo.dynamic_sampling_max_rounds": 2, "grpo.mask_truncated_completions": True,
        "rewards.overlong_buffer": 2, "grpo.epsilon_high": 0.28, "log.save_steps": 100}
COMPARED = ("reward", "loss", "grad_norm", "dynamic_groups_dropped", "dynamic_rounds", "dynamic_rollouts_per_kept_group",
            "rewards/overlong")


def _adapter(tr):
    return {n: p.detach().clone() for n, p in tr.lm.peft_model.named_parameters() if p.requires_grad}


def test_zero_variance_groups_overlong_penalty_and_truncation():
    assert zero_variance_groups(torch.tensor([1.0, 1, 1, 0, 2, 2, 2, 2]), 4).tolist() == [False, True]
    # DAPO eq. 13 with L_max 10, buffer 4: 0 up to 6 tokens, -1 at 10, linear between
    pen = overlong_penalty(torch.tensor([3, 6, 8, 10]), 10, 4, 1.0)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0]))
    ids = torch.tensor([[5, 0, 0], [5, 6, 7], [0, 9, 9]])
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0]])
    assert truncated_rows(ids, mask, 0).tolist() == [False, True, False]


@pytest.mark.slow
def test_dynamic_sampling_refills_and_resumes_exactly(recipe_factory, tmp_path):
    over = {**DAPO, "train.max_steps": 4}
    full = Trainer(recipe_factory(**over))
    full.train()
    rows = read_metrics(full.out / "metrics.jsonl")
    assert sum(r["dynamic_groups_dropped"] for r in rows) > 0, rows  # the random policy's all-equal groups
    assert max(r["dynamic_rounds"] for r in rows) > 1
    assert all(1 <= r["dynamic_rounds"] <= 3 for r in rows)  # the cap: 2 extra rounds
    assert full.data_cursor == sum(r["dynamic_rounds"] for r in rows) > full.step_count
    assert all(r["rewards/overlong"] <= 0.0 for r in rows)

    split_cfg = recipe_factory(**over)
    split_cfg.log.output_dir = str(tmp_path / "split")
    Trainer(split_cfg).train(until_step=2)
    resumed = Trainer(split_cfg, resume="latest")
    assert resumed.step_count == 2 and resumed.data_cursor == sum(r["dynamic_rounds"] for r in rows[:2])
    resumed.train()
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(rows, split):
        for k in COMPARED:
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
    for k, v in _adapter(full).items():
        assert torch.equal(v, _adapter(resumed)[k]), k


@pytest.mark.slow
def test_sigterm_in_an_extra_round_resumes_exactly(recipe_factory, tmp_path):
    """A signal during a step's extra rollout round: the checkpoint is the state before the step, data cursor
    included, and the resumed run replays the step as an uninterrupted run does."""
    over = {**DAPO, "train.max_steps": 3}
    ref_cfg = recipe_factory(**over)
    ref_cfg.log.output_dir = str(tmp_path / "ref")
    ref = Trainer(ref_cfg)
    ref.train()
    ref_rows = read_metrics(ref.out / "metrics.jsonl")
    rounds_1 = ref_rows[0]["dynamic_rounds"]
    tr = Trainer(recipe_factory(**over))
    real = tr.rollout.generate
    calls = {"n": 0}

    def generate_then_signal(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == rounds_1 + 2:  # step 2's second round (or its first, if step 2 needed none)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    tr.rollout.generate = generate_then_signal
    tr.train()
    assert tr.step_count == 1
    assert [p.name for p in ckpt.list_checkpoints(tr.out)] == ["checkpoint-1"]
    assert ckpt.load_state(ckpt.list_checkpoints(tr.out)[0])["data_cursor"] == rounds_1
    resumed = Trainer(recipe_factory(**over), resume="latest")
    resumed.train()
    rows = read_metrics(resumed.out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for a, b in zip(rows, ref_rows):
        for k in COMPARED:
            assert a[k] == b[k], (a["step"], k, a[k], b[k])
