"""Learning: the real trainer, on the tiny model and a simple generated task, raises the mean reward
from its starting level to >= 0.9 of the maximum.

Task: "What color is the shape?" (red or blue, one large shape), accuracy reward only (max 1.0), one
answer token. The tiny word-level vocabulary (~100 tokens) gives a random policy ~1 % of sampling each
answer word, so GRPO gets a signal at once; answering right needs the image (the vision tower is frozen
and random, LoRA learns to read it), so a policy that ignores the image stays near 0.5.
"""

import numpy as np

from lowmem_vt.metrics import read_metrics
from lowmem_vt.trainer import Trainer

SETTINGS = {
    "data.generated_tasks": "[color]",
    "data.generated_samples": 256,
    "rewards.funcs": "[accuracy]",
    "grpo.max_completion_length": 1,
    "grpo.num_generations": 16,
    "grpo.beta": 0.0,
    "train.prompts_per_step": 8,
    "train.micro_batch_size": 128,
    "train.learning_rate": 1e-3,
    "train.max_steps": 30,
    "log.save_steps": 1000,
    "log.sample_every": 0,
}


def test_reward_rises_to_ninety_percent_of_max(recipe_factory):
    tr = Trainer(recipe_factory(**SETTINGS))
    tr.train()
    rewards = [m["reward"] for m in read_metrics(tr.out / "metrics.jsonl")]
    start, end = np.mean(rewards[:3]), np.mean(rewards[-10:])
    print(f"mean reward: first 3 steps {start:.3f}, last 10 steps {end:.3f}")
    assert start < 0.3
    assert end >= 0.9, f"mean reward of the last 10 steps {end:.3f} < 0.9 (max 1.0); curve: {np.round(rewards, 2).tolist()}"
