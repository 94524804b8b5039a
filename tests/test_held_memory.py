"""Memory held between steps (lowmem_vt.held_memory): the watch's rule on given figures, and the real trainer on
CPU, where the figure is every tensor Python can still reach after a step (CUDA's allocator count has no CPU
counterpart): flat from the first step on, and a trainer that keeps tensors of each step is caught."""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from lowmem_vt import trainer as trainer_module
from lowmem_vt.held_memory import GIB, HeldMemoryWatch
from lowmem_vt.metrics import read_metrics
from lowmem_vt.trainer import Trainer

from test_trainer import SMALL  # the trainer tests' small step

MIB = 2**20


def feed(watch: HeldMemoryWatch, held: list[int | None]) -> list[tuple[int, str]]:
    return [(step, w) for step, h in enumerate(held, 1) if (w := watch.add(step, h))]


def test_flat_or_a_plateau_is_not_a_leak():
    watch = HeldMemoryWatch()
    # step 1 allocates the optimizer's state; later steps hold the same, give or take allocator rounding
    assert feed(watch, [1 * GIB, 3 * GIB] + [3 * GIB + (k % 2) * MIB for k in range(30)]) == []
    # one jump (a longer prompt grew a buffer once), then flat
    assert feed(HeldMemoryWatch(), [GIB, 2 * GIB, 2 * GIB, 3 * GIB] + [3 * GIB] * 20) == []
    # growth at every step, but 1 MiB a step: 20 MiB since step 2, under the 256 MiB threshold
    assert feed(HeldMemoryWatch(), [GIB] + [2 * GIB + k * MIB for k in range(20)]) == []
    assert feed(HeldMemoryWatch(), [None] * 20) == []  # CPU: nothing measured, nothing said


def test_steady_growth_is_warned_once_with_the_step_the_card_runs_out():
    watch = HeldMemoryWatch(capacity=80 * GIB)
    held = [GIB] + [2 * GIB + k * 100 * MIB for k in range(30)]  # 100 MiB a step from step 2 on
    warnings = feed(watch, held)
    # the 5-step window is first full at step 6 (steps 2-6), and 400 MiB since step 2 pass the 256 MiB threshold
    assert [s for s, _ in warnings] == [6]
    text = warnings[0][1]
    assert "from 2.00 GiB after step 2 to 2.39 GiB after step 6" in text and "(100 MiB a step lately)" in text
    # (80 GiB - 2.39 GiB) / 100 MiB = 794 more steps
    assert "the card's 80 GiB are reached around step 800" in text, text
    # slower growth: the threshold decides the step (30 MiB a step: 256 MiB is passed at step 2 + 9)
    slow = feed(HeldMemoryWatch(), [GIB] + [2 * GIB + k * 30 * MIB for k in range(30)])
    assert [s for s, _ in slow] == [11]


def test_growth_that_pauses_is_not_warned_until_it_grows_a_whole_window_again():
    held = [GIB, 2 * GIB]
    for k in range(1, 20):  # + 200 MiB at each step, except every 4th step, which holds the same
        held.append(held[-1] if k % 4 == 0 else held[-1] + 200 * MIB)
    warnings = feed(HeldMemoryWatch(), held)
    assert warnings == []  # never 5 growing steps in a row
    # a 3-step window sees steps 2-4 grow, by 400 MiB
    assert [s for s, _ in feed(HeldMemoryWatch(window=3), held)] == [4]


def real_tensors() -> list[torch.Tensor]:
    """Every plain tensor and parameter Python can reach, after a collection. Subclasses are left out: the fake
    tensors that simulation tests earlier in the same process leave behind have no storage to count."""
    gc.collect()
    return [o for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter) and o.device.type == "cpu"]


def live_tensor_bytes() -> int:
    """Bytes of the storages of every tensor Python can reach (each storage once): parameters, optimizer state,
    buffers, and whatever a step left behind. Tensors an autograd graph saved are reached through the graph's
    output, which ``graphs_alive`` counts."""
    storages: dict[int, int] = {}
    for t in real_tensors():
        st = t.untyped_storage()
        storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
    return sum(storages.values())


def graphs_alive() -> int:
    """Tensors Python can reach that carry an autograd graph (a step's loss or logits kept past the step)."""
    return sum(1 for t in real_tensors() if t.grad_fn is not None)


@pytest.fixture
def cpu_counts(monkeypatch):
    """The trainer's held memory on CPU: live tensor bytes (a test-only figure: gc over every object each step).
    Returns the number of tensors with a graph alive after each step, less those alive before the test (an earlier
    test in the same process may have left some)."""
    graphs: list[int] = []
    before = graphs_alive()

    def held(device):
        graphs.append(graphs_alive() - before)
        return live_tensor_bytes()

    monkeypatch.setattr(trainer_module, "held_bytes", held)
    return graphs


@pytest.mark.parametrize("family,over", [
    ("qwen2_vl", {"rollout.backend": "hf"}),
    ("qwen2_vl", {"rollout.backend": "engine"}),  # its KV cache and buffers
    # DAPO's dynamic sampling (rounds of rollouts kept until the update) and two iterations on one rollout
    ("qwen2_vl", {"rollout.backend": "engine", "grpo.loss_type": "dapo", "grpo.dynamic_sampling": "true",
                  "grpo.num_iterations": 2}),
    ("qwen3_vl", {"rollout.backend": "engine"}),  # DeepStack's levels of image features
    ("qwen3_5", {"rollout.backend": "engine"}),  # the linear-attention layers' conv and recurrent states
], ids=["hf", "engine", "engine-dapo-2-iterations", "qwen3_vl-engine", "qwen3_5-engine"])
def test_held_memory_is_flat_from_the_first_step(recipe_factory, tiny_family_dir, cpu_counts, caplog, family, over):
    if family != "qwen2_vl":
        over = {**over, "model.name_or_path": tiny_family_dir(family)}
    tr = Trainer(recipe_factory(**SMALL, **over, **{"train.max_steps": 4, "log.save_steps": 100}))
    with caplog.at_level(logging.WARNING, logger="lowmem_vt.trainer"):
        tr.train()
    held = [m["mem_held_gib"] for m in read_metrics(tr.out / "metrics.jsonl")]
    assert len(held) == 4 and all(h > 0 for h in held)
    assert held == [held[0]] * 4, [(h - held[0]) * GIB for h in held]  # bytes, exactly, from step 1 on
    assert cpu_counts == [0] * 4  # no step's graph outlives it
    assert not any("held between steps" in r.message for r in caplog.records)


def test_a_step_that_keeps_a_tensor_is_caught(recipe_factory, cpu_counts, caplog, monkeypatch):
    """The fault: each step's reference log-probs and each micro-batch's loss (with its graph) kept, as a cache or a
    history list would."""
    kept = []
    real_logprobs, real_loss = Trainer._logprobs, trainer_module.fused_grpo_loss

    def keeping_logprobs(self, *a, **k):
        kept.append(real_logprobs(self, *a, **k))
        return kept[-1]

    def keeping_loss(*a, **k):
        out = real_loss(*a, **k)
        kept.append(out[0])
        return out

    monkeypatch.setattr(Trainer, "_logprobs", keeping_logprobs)
    monkeypatch.setattr(trainer_module, "fused_grpo_loss", keeping_loss)
    tr = Trainer(recipe_factory(**SMALL, **{"train.max_steps": 4, "log.save_steps": 100}))
    tr._held_watch = HeldMemoryWatch(window=3, threshold=0)  # the tiny model's leak is bytes, not MiB
    with caplog.at_level(logging.WARNING, logger="lowmem_vt.trainer"):
        tr.train()
    held = [m["mem_held_gib"] for m in read_metrics(tr.out / "metrics.jsonl")]
    assert all(b > a for a, b in zip(held[1:], held[2:])), held
    assert cpu_counts == list(range(2, 9, 2)), cpu_counts  # two micro-batches: two losses with their graph a step
    warned = [r.message for r in caplog.records if "held between steps" in r.message]
    assert len(warned) == 1 and warned[0].startswith("step 4:"), warned


def test_the_run_summary_shows_memory_on_a_gpu_and_nothing_on_cpu(tmp_path):
    from lowmem_vt.metrics import MetricsWriter, format_summary, run_summary

    def summary(folder, gpu: bool) -> str:
        w = MetricsWriter(folder / "metrics.jsonl")
        for s in range(1, 11):
            w.write({"step": s, "reward": 0.1 * s, "peak_gpu_mem_gib": 14.0 + 0.1 * (s % 2) if gpu else None,
                     "mem_held_gib": 6.0 + 0.25 * s if gpu else None})
        w.close()
        return format_summary(run_summary(folder))

    gpu = summary(tmp_path / "gpu", True)
    assert "  peak GPU memory (GiB)           14.100    14.060 ->  14.040" in gpu, gpu
    assert "  held between steps (GiB)         6.250     6.750 ->   8.000" in gpu, gpu  # first 5 vs last 5 means
    cpu = summary(tmp_path / "cpu", False)
    assert "reward" in cpu and "GPU" not in cpu and "held" not in cpu, cpu
