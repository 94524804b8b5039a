"""The rollout's distribution check (lowmem_vt/selfcheck/distribution.py, issue 26 item 4) and the drift watcher's
worst-token bound, on CPU: the target against transformers' own warpers; the tests' false-alarm rate over many seeds
of a correct sampler and their power against a wrong temperature, top-k or top-p; each fault injected into the
engine's sampling and into hf's (sampling one way, reporting the right log-probs, which the log-prob comparison
cannot see) fails the self-check's rollout group; and a sampler off on a few tokens only, which the mean averages
out, is caught by the self-check and switches the run to hf during training."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import lowmem_vt.rollout.engine as engine_module
import lowmem_vt.rollout.hf as hf_module
import lowmem_vt.selfcheck as sc
from lowmem_vt.rollout import SamplingParams
from lowmem_vt.rollout.sampling import sample_tokens
from lowmem_vt.selfcheck import distribution, rollout
from lowmem_vt.selfcheck.distribution import DRAWS, FALSE_ALARM, judge_draws, sampling_target

FAST = dict(**{"train.prompts_per_step": 2, "grpo.num_generations": 4, "train.micro_batch_size": 8,
               "grpo.max_completion_length": 6, "data.generated_samples": 16, "log.sample_every": 0})
# a check of 2 positions runs each of its tests at this level
ALPHA = FALSE_ALARM / (distribution.TESTS_PER_POSITION * 2)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWMEM_VT_CACHE_DIR", str(tmp_path / "cache"))


def _logits(V=96, seed=0):
    """A next-token distribution with the tiny model's spread (logit std ~1.6)."""
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 1.6


def _draws(logits, params: SamplingParams, seed: int) -> torch.Tensor:
    """DRAWS tokens through the engine's sampling function, one generator as a prompt's."""
    gen = torch.Generator().manual_seed(seed)
    return sample_tokens(logits.expand(DRAWS, -1).contiguous(), dataclasses.replace(params, num_generations=DRAWS), [gen])[0]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.0, 0, 0.9), (1.3, 30, 0.8)])
def test_the_target_is_what_transformers_warpers_keep(temperature, top_k, top_p):
    """The check's own float64 target against HF's warpers (the peer's code as the oracle): same support, same
    probabilities."""
    for seed in range(5):
        logits = _logits(seed=seed)
        scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
        want = scores[0].softmax(-1).double()
        got = sampling_target(logits, temperature, top_k, top_p)
        assert torch.equal(got.probs > 0, want > 0)
        torch.testing.assert_close(got.probs, want, rtol=1e-5, atol=1e-7)
        assert torch.equal(got.allowed, got.probs > 0) and torch.equal(got.inside, got.probs > 0)  # no slack: exact


def test_slack_spares_the_tokens_rounding_can_move_across_the_cut():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.95, 0.0, -1.0])
    t = sampling_target(logits, 1.0, top_k=3, slack=0.1)
    assert t.probs[3] == 0 and t.allowed[3] and not t.inside[2]  # 0.95 is within 0.1 of the cut at 1.0
    assert not t.allowed[4] and t.inside[1]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_false_alarm_rate_of_a_correct_sampler(temperature, top_k, top_p, one_thread):
    """150 seeds of the engine's own sampling function, correct: the chi-square's and the temperature test's
    p-values are uniform (about 5 % below 0.05; binomial 150 x 0.05 has a standard deviation of 1.8 %), nothing is
    ever outside the support, and none fails at the check's level (FALSE_ALARM = 1e-4 for the whole check)."""
    logits = _logits(seed=1)
    target = sampling_target(logits, temperature, top_k, top_p, slack=1e-3)
    params = SamplingParams(1, 1, temperature, top_p, top_k)
    figures = [judge_draws(_draws(logits, params, seed), target, ALPHA) for seed in range(150)]
    chi2_low = sum(j.figures["p_chi2"] < 0.05 for j in figures) / len(figures)
    z_low = sum(abs(j.figures["temperature_z"]) > 1.96 for j in figures) / len(figures)
    assert 0.01 <= chi2_low <= 0.11 and 0.01 <= z_low <= 0.11, (chi2_low, z_low)
    assert all(j.figures["outside_support"] == 0 for j in figures)
    assert all(j.ok for j in figures), [j.problems for j in figures if not j.ok]


POWER = [  # (name, the run's settings, what the faulty sampler uses instead, the reason it must give)
    ("colder: temperature x0.8", (1.0, 0, 1.0), (0.8, 0, 1.0), "favour likely tokens"),
    ("hotter: temperature x1.25", (1.0, 0, 1.0), (1.25, 0, 1.0), "favour unlikely tokens"),
    ("temperature 0.7 ignored", (0.7, 0, 1.0), (1.0, 0, 1.0), "favour unlikely tokens"),
    ("top-k 20 ignored", (1.0, 20, 1.0), (1.0, 0, 1.0), "outside the top-k/top-p support"),
    ("top-k 20 -> 23", (1.0, 20, 1.0), (1.0, 23, 1.0), "outside the top-k/top-p support"),
    ("top-k 20 -> 17", (1.0, 20, 1.0), (1.0, 17, 1.0), "counts differ from the target"),
    ("top-p 0.9 ignored", (1.0, 0, 0.9), (1.0, 0, 1.0), "outside the top-k/top-p support"),
    ("top-p 0.9 -> 0.8", (1.0, 0, 0.9), (1.0, 0, 0.8), "counts differ from the target"),
]


@pytest.mark.parametrize("name, run, used, reason", POWER, ids=[p[0] for p in POWER])
def test_power_a_wrong_temperature_top_k_or_top_p_fails(name, run, used, reason, one_thread):
    """At ONE position of DRAWS draws (the check has two), each fault fails on every one of 30 seeds. Top-k off by
    3 below removes the 3 tokens at the cut, 2.4 % of the mass here (~50 expected draws); a top-k off by one token
    of ~0.8 % (16 draws) is below what 2048 draws resolve and is not claimed."""
    logits = _logits(seed=1)
    target = sampling_target(logits, *run, slack=1e-3)
    t, k, p = used
    results = [judge_draws(_draws(logits, SamplingParams(1, 1, t, p, k), seed), target, ALPHA) for seed in range(30)]
    assert all(not j.ok for j in results), f"{name}: {sum(j.ok for j in results)}/30 passed"
    assert all(any(reason in line for line in j.problems) for j in results), results[0].problems


# ---------------------------------------------------------------------------------------------- the backends


def _data(cfg, lm):
    from lowmem_vt.data import load_examples
    from lowmem_vt.inputs import InputBuilder

    examples, _ = load_examples(cfg.data)
    return examples, InputBuilder(lm.tokenizer, lm.image_processor, lm.config, max_prompt_length=cfg.grpo.max_prompt_length,
                                  min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)


def _prompts(recipe_factory, lm):
    return sc._encode_prompts(lm, *_data(recipe_factory(**FAST), lm))


FAULTS = {  # fault: (the run's temperature, top_k, top_p), and what the faulty sampler draws with
    "temperature x0.8": ((1.0, 0, 1.0), lambda p: dataclasses.replace(p, temperature=0.8 * p.temperature)),
    "temperature ignored": ((0.7, 0, 1.0), lambda p: dataclasses.replace(p, temperature=1.0)),
    "top-k off by 3": ((1.0, 20, 1.0), lambda p: dataclasses.replace(p, top_k=p.top_k + 3)),
    "top-p ignored": ((1.0, 0, 0.9), lambda p: dataclasses.replace(p, top_p=1.0)),
}


def _faulty_engine_sampling(monkeypatch, wrong):
    """The engine draws with ``wrong(params)`` but reports the log-probs of the right ones (the issue's fault)."""

    def sample(logits, params, *args, **kwargs):
        if params.greedy:
            return sample_tokens(logits, params, *args, **kwargs)
        token, _ = sample_tokens(logits, wrong(params), *args, **kwargs)
        scaled = logits.float() / params.temperature
        return token, scaled.gather(-1, token[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)

    monkeypatch.setattr(engine_module, "sample_tokens", sample)


def _faulty_hf_sampling(monkeypatch, wrong):
    """hf's generate gets ``wrong(params)``'s settings; its recorder still reports the right temperature's log-probs."""
    settings = hf_module.sampling_settings
    monkeypatch.setattr(hf_module, "sampling_settings", lambda params: settings(params if params.greedy else wrong(params)))


def _check(lm, prompts, embeds, settings, candidates):
    t, k, p = settings
    results, _ = rollout.check_rollout(lm, prompts, embeds, candidates, num_generations=4, length=8, temperature=t,
                                       top_k=k, top_p=p)
    return {r.name: r for r in results}


@pytest.mark.parametrize("settings", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_correct_samplers_pass_with_their_power_stated(recipe_factory, tiny_lm, cache, one_thread, settings):
    prompts, embeds = _prompts(recipe_factory, tiny_lm)
    paths = _check(tiny_lm, prompts, embeds, settings, ["engine"])
    for name in ("hf", "engine"):
        p = paths[name]
        assert p.ok, p.reason
        judged = p.figures["distribution_positions"]
        firsts = [q for q in judged if q["token"] == "first"]
        assert len(firsts) == 2 and all(q["draws"] == DRAWS for q in firsts)
        assert all(q["prefix_tokens"] >= 1 for q in firsts)  # a prompt + already-decoded tokens
        assert all(q["outside_support"] == 0 for q in judged)
        # the tiny model is spread enough that a colder sampler would move z far past its threshold
        assert all(q["colder_z"] > 2 * q["z_threshold"] for q in judged), judged
        assert "distribution: 2 positions x 2048 draws" in p.figures["distribution"]
    # the engine's draws also come from its decode step: second tokens judged given the first (hf has one path)
    seconds = [q for q in paths["engine"].figures["distribution_positions"] if q["token"] == "second"]
    assert len(seconds) == 2 and all(q["draws"] >= distribution.GROUP_MIN and q["df"] > 0 for q in seconds), seconds
    assert "second tokens given the first" in paths["engine"].figures["distribution"]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_wrong_engine_sampler_fails_the_rollout_check(recipe_factory, tiny_lm, monkeypatch, cache, one_thread, fault):
    settings, wrong = FAULTS[fault]
    prompts, embeds = _prompts(recipe_factory, tiny_lm)
    _faulty_engine_sampling(monkeypatch, wrong)
    paths = _check(tiny_lm, prompts, embeds, settings, ["engine"])
    engine = paths["engine"]
    assert paths["hf"].ok, paths["hf"].reason
    # what the old check compared still agrees: the engine reports the right log-probs of what it drew
    assert engine.figures["logprob_diff_max"] < 1e-4 and engine.figures["greedy"] == "2/2 rows identical"
    assert engine.ok is False and "sampling distribution differs from the trainer's" in engine.reason, engine.reason


def test_a_fault_in_the_engines_decode_step_alone_fails_on_the_second_token(recipe_factory, tiny_lm, monkeypatch, cache,
                                                                          one_thread):
    """The engine's decode step samples colder than it reports, its prefill (the first token) does not: the second
    tokens, judged given the first, fail."""
    prompts, embeds = _prompts(recipe_factory, tiny_lm)
    prefill_and_decode = engine_module.sample_tokens

    def decode_step_wrong(logits, params, generators=None, picks=None, draws=0):
        if params.greedy or draws == 0:  # the prefill's call (the decode step always passes its G as draws)
            return prefill_and_decode(logits, params, generators, picks, draws)
        token, _ = prefill_and_decode(logits, dataclasses.replace(params, temperature=0.8), generators, picks, draws)
        scaled = logits.float() / params.temperature
        return token, scaled.gather(-1, token[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)

    monkeypatch.setattr(engine_module, "sample_tokens", decode_step_wrong)
    engine = _check(tiny_lm, prompts, embeds, (1.0, 0, 1.0), ["engine"])["engine"]
    assert engine.ok is False and "second token: draws favour likely tokens" in engine.reason, engine.reason
    assert "first token" not in engine.reason


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_wrong_hf_sampler_fails_the_rollout_check(recipe_factory, tiny_lm, monkeypatch, cache, one_thread, fault):
    settings, wrong = FAULTS[fault]
    prompts, embeds = _prompts(recipe_factory, tiny_lm)
    _faulty_hf_sampling(monkeypatch, wrong)
    hf = _check(tiny_lm, prompts, embeds, settings, [])["hf"]
    assert hf.figures["logprob_diff_max"] < 1e-4
    assert hf.ok is False and "sampling distribution differs from the trainer's" in hf.reason, hf.reason


def test_the_self_check_falls_back_from_a_wrong_engine_sampler_and_names_a_wrong_hf(recipe_factory, tiny_lm, monkeypatch,
                                                                                     tmp_path, caplog, cache, one_thread):
    """Through run_selfcheck: auto takes hf instead of an engine sampling colder than it reports, with one warning;
    with hf's sampling wrong, hf (the reference and the fallback) is marked failed and a warning says so."""
    cfg = recipe_factory(**FAST, **{"rollout.backend": "auto", "kernels": "torch"})
    examples, inputs = _data(cfg, tiny_lm)
    _faulty_engine_sampling(monkeypatch, FAULTS["temperature x0.8"][1])
    with caplog.at_level(logging.WARNING, logger="lowmem_vt.selfcheck"):
        res = sc.run_selfcheck(cfg, tiny_lm, examples=examples, inputs=inputs, out_dir=tmp_path, force=True)
    assert res.rollout == "hf"
    warned = [r.getMessage() for r in caplog.records if "engine is not used" in r.getMessage()]
    assert len(warned) == 1 and "sampling distribution differs" in warned[0] and "favour likely tokens" in warned[0]

    monkeypatch.setattr(engine_module, "sample_tokens", sample_tokens)
    _faulty_hf_sampling(monkeypatch, FAULTS["top-p ignored"][1])
    cfg = recipe_factory(**FAST, **{"rollout.backend": "auto", "kernels": "torch", "rollout.top_p": 0.9})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_vt.selfcheck"):
        res = sc.run_selfcheck(cfg, tiny_lm, examples=examples, inputs=inputs, out_dir=tmp_path, force=True)
    hf = res.groups[0].path("hf")
    assert hf.ok is False and "outside the top-k/top-p support" in hf.reason
    assert any("hf (the reference) failed its self-check" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------- the worst token


def test_a_sampler_off_on_one_token_fails_the_check_though_the_mean_passes(recipe_factory, tiny_lm, monkeypatch, cache, one_thread):
    """One token of the whole sampling call off by 0.06 nats: the mean (0.06 / 64 tokens) is under its fp32 bound
    1e-3, the worst token over LOGPROB_MAX_BOUND 5e-2."""
    prompts, embeds = _prompts(recipe_factory, tiny_lm)
    generate = engine_module.EngineRollout.generate

    def one_token_off(self, prompts, embeds, params):
        roll = generate(self, prompts, embeds, params)
        if roll.sampling_logprobs is not None:
            roll.sampling_logprobs[0, 0] += 0.06
        return roll

    monkeypatch.setattr(engine_module.EngineRollout, "generate", one_token_off)
    engine = _check(tiny_lm, prompts, embeds, (1.0, 0, 1.0), ["engine"])["engine"]
    assert engine.figures["logprob_diff_mean"] < rollout.LOGPROB_BOUND["float32"]
    assert engine.ok is False and "on the worst token > 0.05" in engine.reason, engine.reason


def test_drift_on_a_few_tokens_switches_to_hf_during_training(recipe_factory, caplog, one_thread):
    """The drift watcher judges the worst token too: a sampler off by 0.5 nats on one token per step (the mean, over
    the step's 48 tokens, stays near 0.01, under 0.05) switches the run to hf after fallback_after steps."""
    from lowmem_vt.trainer import SAMPLER_DIFF_WARN, Trainer

    tr = Trainer(recipe_factory(**FAST, **{"rollout.backend": "engine", "rollout.fallback_after": 2, "train.max_steps": 4}))
    assert tr.rollout_backend == "engine"
    generate = tr.rollout.generate

    def one_token_off(*args, **kwargs):
        roll = generate(*args, **kwargs)
        roll.sampling_logprobs[0, 0] += 0.5
        return roll

    tr.rollout.generate = one_token_off
    with caplog.at_level(logging.WARNING, logger="lowmem_vt.trainer"):
        steps = [tr.step() for _ in range(3)]
    first = steps[0]
    assert first["sampler_logprob_diff"] < SAMPLER_DIFF_WARN  # the mean alone would never fire
    assert first["sampler_logprob_diff_max"] > rollout.LOGPROB_MAX_BOUND["float32"]
    assert not first.get("rollout_switched_to_hf") and steps[1]["rollout_switched_to_hf"] is True
    assert steps[2]["rollout_backend"] == "hf" and steps[2]["sampler_logprob_diff_max"] < 1e-4
    assert any("worst token" in r.getMessage() for r in caplog.records)
    tr.close()
