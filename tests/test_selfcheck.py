"""The self-check (lowmem_vt/selfcheck, issue 21) on CPU: the tiny model, the Triton heads in Triton's interpreter
in fp32, the engine with its CUDA graphs emulated (tests/helpers/graph_emulation.py). Each fast path gets a fault
injected: a loss head off by 1e-2, one that raises, one slower than torch, one not bit-identical over its repeats;
an engine whose capture raises, whose tokens differ, whose log-probs drift; an offload that does not round-trip;
fp16 that overflows. Each gives the right fallback, warning and selfcheck.json; a named backend that fails stops
the run with status 2 before step 1; the cache hits on a second run and a version change invalidates it; doctor
runs on CPU and says what it could not check; and, during training, drift switches the engine to hf and a head
whose gradient disagrees is switched to torch."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import pytest
import torch

import lowmem_vt.selfcheck as sc
from lowmem_vt.cli import main
from lowmem_vt.kernels.head import fused_grpo_loss
from lowmem_vt.selfcheck import head, report, rollout
from lowmem_vt.selfcheck.report import GroupResult, PathResult, decide

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from graph_emulation import EmulatedGraphs  # noqa: E402

FAST = dict(**{"train.prompts_per_step": 2, "grpo.num_generations": 4, "train.micro_batch_size": 8,
               "grpo.max_completion_length": 6, "data.generated_samples": 16, "log.sample_every": 0})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A verdict cache of this test's own (the session's is shared by the other tests), on a machine that counts as
    quiet (speeds measured under load are not kept: tests/test_selfcheck_cache.py tests that rule)."""
    from lowmem_vt.selfcheck import env

    path = tmp_path / "cache"
    monkeypatch.setenv("LOWMEM_VT_CACHE_DIR", str(path))
    monkeypatch.setattr(env, "machine_load", lambda device: {"load_per_core": 0.0, "calibration_s": 0.01})
    return path


def _data(cfg, lm):
    from lowmem_vt.data import load_examples
    from lowmem_vt.inputs import InputBuilder

    examples, _ = load_examples(cfg.data)
    inputs = InputBuilder(lm.tokenizer, lm.image_processor, lm.config, max_prompt_length=cfg.grpo.max_prompt_length,
                          min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    return examples, inputs


def _json(out: Path) -> dict:
    return json.loads((out / "selfcheck.json").read_text())


def _path(data: dict, group: str, name: str) -> dict:
    g = next(g for g in data["groups"] if g["group"] == group)
    return next(p for p in g["paths"] if p["name"] == name)


# ---------------------------------------------------------------------------------------------- decisions


def _group(name, requested, *paths):
    return GroupResult(name, requested, list(paths))


def test_decide_takes_the_fastest_path_that_passes_and_says_why_others_are_not_used():
    ref = PathResult("kernels", "torch", reference=True, ok=True, cost=0.010)
    fast = PathResult("kernels", "triton_fused_linear", ok=True, cost=0.002)
    slow = PathResult("kernels", "triton_streaming", ok=True, cost=0.020)
    d = decide(_group("kernels", "auto", ref, fast, slow))
    assert d.chosen == "triton_fused_linear" and d.error is None
    assert len(d.warnings) == 1 and "triton_streaming" in d.warnings[0] and "slower than torch" in d.warnings[0]
    broken = PathResult("kernels", "triton_fused_linear", ok=False, reason="grad error 3.00e-02 > 1e-03", cost=0.001)
    d = decide(_group("kernels", "auto", ref, broken, slow))
    assert d.chosen == "torch"  # the faster one is wrong; the other is slower than the reference
    assert any("triton_fused_linear is not used: grad error 3.00e-02 > 1e-03; torch runs instead" in w for w in d.warnings)
    # named explicitly: it runs if it passed, stops the run if it failed (unless selfcheck: warn)
    assert decide(_group("kernels", "triton_fused_linear", ref, fast)).chosen == "triton_fused_linear"
    d = decide(_group("kernels", "triton_fused_linear", ref, broken))
    assert d.error and "grad error" in d.error
    d = decide(_group("kernels", "triton_fused_linear", ref, broken), mode="warn")
    assert d.error is None and d.chosen == "triton_fused_linear" and "runs anyway" in d.warnings[0]
    # a head run in Triton's interpreter is checked but never picked by auto
    interpreted = PathResult("kernels", "triton_streaming", ok=True, cost=0.001, figures={"interpreted": True})
    assert decide(_group("kernels", "auto", ref, interpreted)).chosen == "torch"
    # the rollout: cost is seconds per token
    hf = PathResult("rollout", "hf", reference=True, ok=True, cost=1 / 100)
    engine = PathResult("rollout", "engine", ok=True, cost=1 / 900)
    assert decide(_group("rollout", "auto", hf, engine)).chosen == "engine"
    assert "900 tokens/s" in report.describe_cost(engine)


# ---------------------------------------------------------------------------------------------- loss heads


def _faulty_heads(monkeypatch, faults: dict[str, str], torch_delay: float = 0.0):
    """Both Triton heads computed by the torch reference (fast, exact), with a fault each: the head check sees
    what a broken kernel would give. ``torch_delay``: the reference made slower, so a head may win on time."""
    real = fused_grpo_loss

    def head_impl(hidden, *args, backend, **kwargs):
        fault = faults.get(backend)
        if backend == "torch" and torch_delay:
            time.sleep(torch_delay)
        if backend != "torch":
            if fault == "raises":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            if fault == "slower":
                time.sleep(0.5)
            if fault == "race" and hidden.requires_grad:
                hidden.register_hook(lambda g: g + 1e-9 * torch.randn_like(g))  # a different rounding every run
        loss, stats, logp = real(hidden, *args, backend="torch", **kwargs)
        if fault == "off":
            loss, logp = loss + 1e-2, logp + 1e-2
        return loss, stats, logp

    real_logprobs = head.token_logprobs

    def token_logprobs_impl(hidden, weight, targets, temperature, backend):
        out = real_logprobs(hidden, weight, targets, temperature, "torch")
        return out + 1e-2 if faults.get(backend) == "off" else out

    monkeypatch.setattr(head, "fused_grpo_loss", head_impl)
    monkeypatch.setattr(head, "token_logprobs", token_logprobs_impl)


def _weight(V=300, H=32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(V, H, generator=g) * 0.2


@pytest.mark.parametrize("fault, reason", [
    ("off", "recipe: logp error"),
    ("raises", "raised RuntimeError: CUDA error: an illegal memory access"),
    ("race", "not bit-identical over 3 repeats (gradient): a race"),
])
def test_a_wrong_head_is_rejected_with_the_measured_error(monkeypatch, fault, reason):
    _faulty_heads(monkeypatch, {"triton_fused_linear": fault})
    results = head.check_heads(_weight(), ["triton_fused_linear", "triton_streaming"], head.HeadSettings(), interpreted=False)
    by_name = {p.name: p for p in results}
    assert by_name["torch"].reference and by_name["torch"].ok
    bad = by_name["triton_fused_linear"]
    assert bad.ok is False and reason in bad.reason, bad.reason
    assert by_name["triton_streaming"].ok, by_name["triton_streaming"].reason
    d = decide(_group("kernels", "auto", *results))
    assert d.chosen != "triton_fused_linear"
    assert sum("triton_fused_linear is not used" in w and reason in w for w in d.warnings) == 1


def test_a_head_slower_than_torch_is_not_used_and_a_faster_one_is(monkeypatch):
    _faulty_heads(monkeypatch, {"triton_streaming": "slower"}, torch_delay=0.15)
    results = head.check_heads(_weight(), ["triton_fused_linear", "triton_streaming"], head.HeadSettings(), interpreted=False)
    assert all(p.ok for p in results)
    d = decide(_group("kernels", "auto", *results))
    assert d.chosen == "triton_fused_linear"
    assert [w for w in d.warnings if "triton_streaming" in w and "slower than torch" in w]
    fig = next(p for p in results if p.name == "triton_fused_linear").figures
    assert fig["fwd_ms"] > 0 and fig["bwd_ms"] >= 0 and fig["bit_identical"] and fig["peak_extra_mib"] is None  # CPU


def test_interpreted_triton_heads_pass_against_the_reference(one_thread):
    """The real heads, in Triton's interpreter in fp32, at the tiny model's head shape: every error within the
    bounds drawn from the torch reference's own error against float64 (every case), repeats bit-identical, forward and
    backward timed; auto keeps torch (the
    interpreter is not a fast path) and says so."""
    results = head.check_heads(_weight(V=257, H=64), ["triton_fused_linear", "triton_streaming"], head.HeadSettings(beta=0.04))
    for p in results:
        assert p.ok, (p.name, p.reason)
        assert p.figures["fwd_ms"] > 0 and p.cost > 0
    for p in results[1:]:
        for case, quantities in p.figures["errors"].items():
            assert all(q["error"] <= q["bound"] for q in quantities.values()), (case, quantities)
        assert p.figures["worst_margin"] > 1
        assert p.figures["bit_identical"] and p.figures["interpreted"]
    d = decide(_group("kernels", "auto", *results))
    assert d.chosen == "torch" and not d.warnings and len(d.infos) == 2


def test_auto_on_cpu_does_not_run_the_interpreted_heads(recipe_factory, tiny_lm, tmp_path, monkeypatch, cache):
    """kernels: auto never picks a head run by Triton's interpreter, so on CPU it does not spend time on them: torch,
    with a note saying why (a named head is still checked: the tests above and below)."""
    monkeypatch.setattr(head, "check_heads", lambda *a, **k: pytest.fail("nothing to measure for auto on CPU"))
    res = sc.run_selfcheck(recipe_factory(**FAST), tiny_lm, out_dir=tmp_path)
    assert res.kernels == "torch" and res.measured == [] and not res.warnings
    notes = next(g for g in _json(tmp_path)["groups"] if g["group"] == "kernels")["notes"]
    assert notes and "need a CUDA GPU" in notes[0]


def test_trainer_falls_back_from_a_wrong_head_with_a_warning_and_selfcheck_json(recipe_factory, monkeypatch, caplog, cache):
    _faulty_heads(monkeypatch, {"triton_fused_linear": "off", "triton_streaming": "raises"})
    monkeypatch.setattr(head, "fast_path_device", lambda device: True)  # the heads count as compiled, as on a GPU
    from lowmem_vt.trainer import Trainer

    with caplog.at_level(logging.WARNING, logger="lowmem_vt.selfcheck"):
        tr = Trainer(recipe_factory(**FAST, **{"train.max_steps": 1}))
    assert tr.kernel_backend == "torch"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("kernels: auto: triton_fused_linear is not used: recipe: " in w and "logp error" in w and "torch runs instead" in w for w in warnings) == 1
    assert sum("triton_streaming is not used: raised RuntimeError" in w for w in warnings) == 1
    data = _json(tr.out)
    assert data["chosen"] == {"kernels": "torch", "rollout": "hf"}
    assert _path(data, "kernels", "triton_fused_linear")["ok"] is False
    assert "logp error" in _path(data, "kernels", "triton_fused_linear")["reason"]
    assert data["environment"]["packages"]["torch"] and data["environment"]["code"]
    m = tr.step()
    assert m["kernels"] == "torch" and m["rollout_backend"] == "hf" and m["selfcheck_s"] >= 0  # step 1 records them
    assert "kernels" not in tr.step()  # later steps only when they change
    tr.close()


def test_a_named_head_that_fails_stops_the_run_before_step_1(tiny_dir, tmp_path, monkeypatch, capsys, cache):
    _faulty_heads(monkeypatch, {"triton_fused_linear": "off"})
    out = tmp_path / "out"
    args = ["train", "recipes/demo_tiny.yaml", f"model.name_or_path={tiny_dir}", f"log.output_dir={out}", "log.progress_bar=false",
            "log.plot=false", "kernels=triton_fused_linear", "train.max_steps=1", "data.generated_samples=16",
            "train.prompts_per_step=2", "grpo.num_generations=2", "train.micro_batch_size=4", "grpo.max_completion_length=4"]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # (the model's loading bar aside)
    assert len(errors) == 1 and "Traceback" not in err, err
    err = errors[0]
    assert "key 'kernels': triton_fused_linear failed its self-check: recipe: " in err and "logp error" in err
    assert "selfcheck: warn" in err and "selfcheck.json" in err
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text()  # no step ran
    assert _path(_json(out), "kernels", "triton_fused_linear")["ok"] is False
    # selfcheck: warn runs it anyway, with the warning (cached verdict: nothing is measured again)
    monkeypatch.setattr(head, "check_heads", lambda *a, **k: pytest.fail("the cached verdict should be used"))
    assert main(args + ["selfcheck=warn", "--overwrite"]) == 0
    data = _json(out)
    assert data["chosen"]["kernels"] == "triton_fused_linear" and data["cache"]["hits"] == ["kernels"]
    assert any("runs anyway (selfcheck: warn)" in w for w in data["warnings"])


def test_selfcheck_off_checks_nothing_and_runs_the_references(recipe_factory, caplog, cache):
    from lowmem_vt.trainer import Trainer

    with caplog.at_level(logging.WARNING):
        tr = Trainer(recipe_factory(**FAST, **{"rollout.backend": "auto", "selfcheck": "off"}))
    assert (tr.kernel_backend, tr.rollout_backend) == ("torch", "hf")
    assert any("selfcheck: off" in r.getMessage() for r in caplog.records)
    assert _json(tr.out)["mode"] == "off" and not list(cache.glob("*/*.json"))
    tr.close()


# ---------------------------------------------------------------------------------------------- rollout


class CaptureFails(EmulatedGraphs):
    def capture(self, step, generators, pool):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


def _engine_factory(fault: str | None):
    """make_rollout with the engine's CUDA graphs emulated on CPU, and one fault."""
    from lowmem_vt.rollout import make_rollout
    from lowmem_vt.rollout.engine import EngineRollout

    def make(name, lm):
        if name != "engine":
            return make_rollout(name, lm)
        engine = EngineRollout(lm, graphs=CaptureFails() if fault == "capture" else EmulatedGraphs())
        generate = engine.generate

        def faulty(prompts, embeds, params):
            roll = generate(prompts, embeds, params)
            if fault == "tokens" and params.greedy:
                ids = roll.completion_ids.clone()
                ids[:, 1] = torch.where(ids[:, 1] == 5, 6, 5)  # not the model's choice: far from a tie
                roll.completion_ids = ids
            if fault == "drift" and roll.sampling_logprobs is not None:
                roll.sampling_logprobs = (roll.sampling_logprobs - 0.3) * roll.completion_mask
            return roll

        engine.generate = faulty
        return engine

    return make


@pytest.mark.parametrize("fault, reason", [
    (None, None),
    ("capture", "raised RuntimeError: CUDA error: operation not permitted when stream is capturing"),
    ("tokens", "greedy tokens differ from hf"),
    ("drift", "sampling log-probs differ from the trainer's by 0.3"),
])
def test_engine_check_and_its_faults(recipe_factory, tiny_lm, monkeypatch, tmp_path, caplog, cache, one_thread, fault, reason):
    monkeypatch.setattr(rollout, "make_rollout", _engine_factory(fault))
    cfg = recipe_factory(**FAST, **{"rollout.backend": "auto", "kernels": "torch"})
    examples, inputs = _data(cfg, tiny_lm)
    with caplog.at_level(logging.WARNING, logger="lowmem_vt.selfcheck"):
        res = sc.run_selfcheck(cfg, tiny_lm, examples=examples, inputs=inputs, out_dir=tmp_path)
    data = _json(tmp_path)
    engine, hf = _path(data, "rollout", "engine"), _path(data, "rollout", "hf")
    assert hf["ok"] and hf["figures"]["tokens_per_s"] > 0 and hf["figures"]["logprob_diff_mean"] < 1e-4
    if fault is None:
        assert engine["ok"], engine["reason"]
        assert engine["figures"]["greedy"] == "2/2 rows identical" and engine["figures"]["logprob_diff_max"] < 1e-4
        # one graph per generate call (greedy, then sampling): of the 5 decode steps of 6 tokens, the first runs
        # eagerly before the capture (the warm-up), the graph replays the other 4
        assert engine["figures"]["captures"] == 2 and engine["figures"]["replays"] == 8
        faster = "engine" if engine["cost"] < hf["cost"] else "hf"
        assert res.rollout == faster  # the faster of the two, both passing
        if faster == "engine":
            assert res.rollout_backend is not None  # the engine that was checked is the one that runs
        return
    assert engine["ok"] is False and reason in engine["reason"], engine["reason"]
    assert res.rollout == "hf" and data["chosen"]["rollout"] == "hf"
    warned = [r.getMessage() for r in caplog.records if "rollout.backend: auto: engine is not used" in r.getMessage()]
    assert len(warned) == 1 and reason in warned[0] and "hf runs instead" in warned[0]


def test_a_named_engine_that_fails_stops_before_step_1(recipe_factory, tiny_lm, monkeypatch, tmp_path, cache, one_thread):
    monkeypatch.setattr(rollout, "make_rollout", _engine_factory("drift"))
    cfg = recipe_factory(**FAST, **{"rollout.backend": "engine", "kernels": "torch"})
    examples, inputs = _data(cfg, tiny_lm)
    with pytest.raises(sc.SelfCheckError, match=r"key 'rollout.backend': engine failed its self-check: sampling log-probs"):
        sc.run_selfcheck(cfg, tiny_lm, examples=examples, inputs=inputs, out_dir=tmp_path)
    assert _json(tmp_path)["errors"]


# ---------------------------------------------------------------------------------------------- levers


def test_offload_levers_round_trip_and_a_broken_one_is_undone(tiny_dir, recipe_factory, tmp_path, caplog, cache, monkeypatch):
    """The CUDA levers installed with host copies on CPU (as tests/test_levers.py does): checked bit-exact; a copy
    that corrupts is reported and the lever taken off, so the run goes on without it."""
    from lowmem_vt.config import LoraConfig, ModelConfig
    from lowmem_vt.model import load_model, offload_checkpointed_inputs, offload_vision
    from lowmem_vt.selfcheck import levers

    def fresh():
        return load_model(ModelConfig(name_or_path=str(tiny_dir), dtype="float32"), LoraConfig(r=4, alpha=8), torch.device("cpu"),
                          min_pixels=3136, max_pixels=112 * 112)

    lm = fresh()
    offload_vision(lm, host_copy=lambda t: t.detach().clone())
    offload_checkpointed_inputs(lm.hf_model, host_copy=lambda t: (t.detach().clone(), None))
    assert levers.applicable(lm) == [levers.VISION, levers.CHECKPOINT]
    assert all(p.ok for p in levers.check_levers(lm, levers.applicable(lm))), levers.check_levers(lm, levers.applicable(lm))

    bad = fresh()
    offload_vision(bad, host_copy=lambda t: t.detach().clone())
    offload_checkpointed_inputs(bad.hf_model, host_copy=lambda t: (t.detach().clone() * 1.001, None))
    real_on_device = levers.vision_on_device

    @contextlib.contextmanager
    def corrupting(lm):  # a copy in that changes one weight (as a bad transfer would)
        with real_on_device(lm):
            lm.vision_host[0][0].data = lm.vision_host[0][0].data + 1.0
            yield

    monkeypatch.setattr(levers, "vision_on_device", corrupting)
    cfg = recipe_factory(**FAST, **{"kernels": "torch"})
    with caplog.at_level(logging.WARNING, logger="lowmem_vt.selfcheck"):
        res = sc.run_selfcheck(cfg, bad, out_dir=tmp_path)
    assert bad.vision_host is None and levers.applicable(bad) == []  # both undone
    warned = [r.getMessage() for r in caplog.records]
    assert any("vision-tower offload is not used: 1 of" in w and "stay on the device instead" in w for w in warned)
    assert any("checkpointed-input offload is not used" in w for w in warned)
    assert {p["name"]: p["ok"] for p in next(g for g in _json(tmp_path)["groups"] if g["group"] == "levers")["paths"]} == \
        {levers.VISION: False, levers.CHECKPOINT: False}
    assert res.kernels == "torch"


def test_nf4_linear_against_its_dequantized_weight(tiny_dir, recipe_factory, tmp_path, monkeypatch, cache):
    """QLoRA: one 4-bit linear of the model against x @ dequantize(W).T; a 4-bit linear that computes wrong (here:
    its output made 10 % off) stops a run naming model.quantization. (The fault is in the module's forward, not in
    dequantize_4bit: bitsandbytes < 0.50 computes the CPU forward through dequantize_4bit itself, so a wrong
    dequantization would move both sides alike there.)"""
    from nf4 import nf4_on_cpu

    if not nf4_on_cpu():
        pytest.skip("bitsandbytes NF4 has no CPU backend here")
    from lowmem_vt.config import LoraConfig, ModelConfig
    from lowmem_vt.model import load_model
    from lowmem_vt.selfcheck import levers

    lm = load_model(ModelConfig(name_or_path=str(tiny_dir), dtype="bfloat16", quantization="nf4"), LoraConfig(r=4, alpha=8),
                    torch.device("cpu"), min_pixels=3136, max_pixels=112 * 112)
    (p,) = levers.check_levers(lm, [levers.NF4])
    assert p.ok, p.reason
    assert p.figures["rel_error"] <= levers.NF4_TOLERANCE and p.figures["dtype"] == "bfloat16"
    import bitsandbytes as bnb

    real = bnb.nn.Linear4bit.forward
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: real(self, x) * 1.1)
    cfg = recipe_factory(**FAST, **{"kernels": "torch", "model.dtype": "bfloat16", "model.quantization": "nf4"})
    with pytest.raises(sc.SelfCheckError, match=r"key 'model.quantization': a 4-bit linear differs .*model.quantization: none"):
        sc.run_selfcheck(cfg, lm, out_dir=tmp_path)


def test_fp16_overflow_stops_with_what_to_choose(tiny_dir, recipe_factory, tmp_path, cache):
    """float16: the model's forward on prompts of the run's data must give finite logits (Qwen2-VL overflows
    fp16, transformers #33294); here an overflow is forced in the last layer."""
    from lowmem_vt.config import LoraConfig, ModelConfig
    from lowmem_vt.model import load_model

    lm = load_model(ModelConfig(name_or_path=str(tiny_dir), dtype="float16"), LoraConfig(r=4, alpha=8), torch.device("cpu"),
                    min_pixels=3136, max_pixels=112 * 112)
    cfg = recipe_factory(**FAST, **{"kernels": "torch", "model.dtype": "float16"})
    examples, inputs = _data(cfg, lm)
    res = sc.run_selfcheck(cfg, lm, examples=examples, inputs=inputs, out_dir=tmp_path)  # healthy: passes
    assert _path(_json(tmp_path), "levers", "fp16 finite logits")["ok"] is True and not res.errors
    layer = lm.hf_model.model.language_model.layers[-1]
    layer.register_forward_hook(lambda m, a, out: (out[0] * 1e30,) + tuple(out[1:]) if isinstance(out, tuple) else out * 1e30)
    with pytest.raises(sc.SelfCheckError, match=r"key 'model.dtype': .*non-finite .*float16.*#33294.*bfloat16.*float32"):
        sc.run_selfcheck(cfg, lm, examples=examples, inputs=inputs, out_dir=tmp_path, force=True)


# ---------------------------------------------------------------------------------------------- cache


def test_second_run_reads_the_cache_and_a_version_change_measures_again(recipe_factory, tiny_lm, monkeypatch, tmp_path, cache):
    from lowmem_vt.selfcheck import env

    calls = []

    def counted(weight, heads, settings, **kw):
        calls.append(heads)
        return [PathResult("kernels", "torch", reference=True, ok=True, cost=0.01),
                *[PathResult("kernels", h, ok=True, cost=0.001) for h in heads]]

    monkeypatch.setattr(head, "check_heads", counted)
    monkeypatch.setattr(head, "fast_path_device", lambda device: True)  # auto measures the heads, as on a GPU
    cfg = recipe_factory(**FAST)
    first = sc.run_selfcheck(cfg, tiny_lm, out_dir=tmp_path)
    assert len(calls) == 1 and first.measured == ["kernels"] and first.kernels == "triton_fused_linear"
    assert len(list((cache / "selfcheck").glob("kernels-*.json"))) == 1
    second = sc.run_selfcheck(cfg, tiny_lm, out_dir=tmp_path)
    assert len(calls) == 1 and second.cache_hits == ["kernels"] and second.measured == []  # nothing measured again
    assert second.kernels == first.kernels and _json(tmp_path)["cache"]["hits"] == ["kernels"]
    sc.run_selfcheck(cfg, tiny_lm, out_dir=tmp_path, force=True)  # --selfcheck force
    assert len(calls) == 2
    real = env.package_versions
    monkeypatch.setattr(env, "package_versions", lambda names=env.KEY_PACKAGES: {**real(names), "triton": "99.0"})
    third = sc.run_selfcheck(cfg, tiny_lm, out_dir=tmp_path)
    assert len(calls) == 3 and third.measured == ["kernels"]  # another Triton: measured again
    assert len(list((cache / "selfcheck").glob("kernels-*.json"))) == 2


def test_cli_selfcheck_force_and_recipe_modes():
    from lowmem_vt.cli import build_parser
    from lowmem_vt.config import ConfigError, load_config

    args = build_parser().parse_args(["train", "recipes/demo_tiny.yaml", "--selfcheck", "force"])
    assert args.selfcheck == "force"
    assert build_parser().parse_args(["train", "recipes/demo_tiny.yaml"]).selfcheck is None
    # YAML 1.1 reads a bare on / off as booleans: the recipe means the modes
    assert [load_config("recipes/demo_tiny.yaml", [f"selfcheck={v}"]).selfcheck for v in ("on", "off", "warn")] == ["on", "off", "warn"]
    with pytest.raises(ConfigError, match="selfcheck"):
        load_config("recipes/demo_tiny.yaml", ["selfcheck=maybe"])
    assert load_config("recipes/demo_tiny.yaml").rollout.backend == "hf"  # auto is the SAT recipes' default only


def test_cache_folder_follows_xdg(monkeypatch, tmp_path):
    from lowmem_vt.selfcheck import env

    monkeypatch.delenv("LOWMEM_VT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert env.cache_dir() == tmp_path / "xdg" / "lowmem_vt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert env.cache_dir() == tmp_path / "home" / ".cache" / "lowmem_vt"
    path = env.cache_store("kernels", {"a": 1}, {"paths": []})
    assert path is not None and env.cache_load("kernels", {"a": 1})["paths"] == []
    assert env.cache_load("kernels", {"a": 2}) is None


# ---------------------------------------------------------------------------------------------- during training


def test_engine_drift_during_training_switches_to_hf(recipe_factory, caplog, one_thread):
    from lowmem_vt.trainer import Trainer

    tr = Trainer(recipe_factory(**FAST, **{"rollout.backend": "engine", "rollout.fallback_after": 2, "train.max_steps": 4}))
    assert tr.rollout_backend == "engine"
    generate = tr.rollout.generate

    def drifting(*args, **kwargs):
        roll = generate(*args, **kwargs)
        roll.sampling_logprobs = (roll.sampling_logprobs + 0.2) * roll.completion_mask
        return roll

    tr.rollout.generate = drifting
    with caplog.at_level(logging.WARNING, logger="lowmem_vt.trainer"):
        steps = [tr.step() for _ in range(3)]
    assert steps[0]["rollout_backend"] == "engine" and not steps[0].get("rollout_switched_to_hf")
    assert steps[1]["rollout_switched_to_hf"] is True and "rollout_backend" not in steps[1]  # it ran on the engine
    assert steps[2]["rollout_backend"] == "hf" and tr.rollout_backend == "hf"  # the next step on hf
    assert steps[2]["sampler_logprob_diff"] < 1e-4
    assert any("switches to hf" in r.getMessage() for r in caplog.records)
    tr.close()


def test_head_gradient_recheck_switches_a_head_that_goes_wrong(recipe_factory, monkeypatch, caplog, cache):
    """kernels_recheck_every 1: at the first step the head is re-checked on the step's own micro-batch; made to
    disagree after the pre-run check, the run moves to torch with a warning and the metrics say so."""
    from lowmem_vt.trainer import Trainer

    _faulty_heads(monkeypatch, {})  # the pre-run check: both heads exact
    monkeypatch.setattr(head, "fast_path_device", lambda device: True)  # the heads count as compiled, as on a GPU
    cfg = recipe_factory(**FAST, **{"kernels": "triton_fused_linear", "kernels_recheck_every": 1, "train.max_steps": 1})
    tr = Trainer(cfg)
    assert tr.kernel_backend == "triton_fused_linear"
    import lowmem_vt.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "fused_grpo_loss", lambda *a, backend, **k: fused_grpo_loss(*a, backend="torch", **k))
    monkeypatch.setattr(trainer_module, "token_logprobs", lambda h, w, t, temp, backend: head.token_logprobs(h, w, t, temp, "torch"))
    _faulty_heads(monkeypatch, {"triton_fused_linear": "off"})  # the head now disagrees with the reference
    with caplog.at_level(logging.WARNING, logger="lowmem_vt.trainer"):
        m = tr.step()
    assert m["kernel_recheck_ok"] is False and m["kernel_recheck_grad_err"] >= 0
    assert tr.kernel_backend == "torch" and m["kernels"] == "torch"
    assert any("disagrees with the exact (float64) head" in r.getMessage() for r in caplog.records)
    tr.close()


# ---------------------------------------------------------------------------------------------- doctor, budget


def test_doctor_on_cpu_says_what_it_could_not_check(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## lowmem-vt doctor")
    for row in ("| torch |", "| triton |", "| transformers |", "| peft |", "| bitsandbytes |", "| flash-attn |", "| vllm |",
                "| C compiler (Triton) |", "| Python.h (Triton) |", "| libcuda (Triton) |", "| bf16 in hardware |"):
        assert row in out, row
    if not torch.cuda.is_available():
        assert "### Not checked on this machine" in out and "no CUDA device visible" in out
        assert "CUDA graphs" in out and "pinned-memory offloads" in out


def test_doctor_with_a_recipe_runs_the_checks_standalone(tiny_dir, tmp_path, capsys, cache, one_thread):
    rc = main(["doctor", "recipes/demo_tiny.yaml", f"model.name_or_path={tiny_dir}", "rollout.backend=engine", "kernels=torch",
               "grpo.num_generations=2", "train.micro_batch_size=16", "grpo.max_completion_length=4", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "### Self-check: recipes/demo_tiny.yaml (cpu, float32" in out and "| rollout: engine | pass" in out
    assert "A run of this recipe would use: kernels **torch**, rollout **" in out
    assert (tmp_path / "doctor.md").read_text().startswith("## lowmem-vt doctor")
    assert _json(tmp_path)["forced"] is True


@pytest.mark.parametrize("recipe", ["sat_lora", "sat_qlora"])
def test_gpu_budget_estimate_and_memory_of_the_check(recipe):
    """An estimate from FLOPs and bytes (lowmem_vt/selfcheck/budget.py), not a measurement: the self-check of the
    SAT recipes on a 24 GB card within 60 s, and its allocations within the recipe's memory plan."""
    from lowmem_vt.config import load_config
    from lowmem_vt.selfcheck.budget import CARDS_24GB, check_memory, estimate_seconds

    cfg = load_config(f"recipes/{recipe}.yaml", ["train.device=cpu"])
    assert cfg.rollout.backend == "auto" and cfg.kernels == "auto"
    for card in CARDS_24GB:
        e = estimate_seconds(cfg, card)
        assert e["total"] <= 60.0, (card.name, e)
        assert e["rollout: hf (greedy + sampling)"] > 0 and e["loss heads"] > 0
    mem = check_memory(cfg)
    assert mem["fits"], mem


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the heads compiled by Triton, CUDA graphs, pinned memory")
def test_every_fast_path_passes_on_this_gpu(recipe_factory, cache):
    """On the GPU at hand (make gpu-check): both Triton heads in the GPU's 16-bit dtype against torch, the engine with
    real CUDA graphs against hf, the pinned-memory offloads; every path passes, the engine captured and replayed,
    the peak memory of each head is measured, a second trainer reads the cache, and a step runs on what was chosen."""
    from lowmem_vt.trainer import Trainer

    dtype = "bfloat16" if torch.cuda.get_device_capability()[0] >= 8 else "float16"
    over = {**FAST, "model.dtype": dtype, "train.device": "cuda", "rollout.backend": "auto", "train.max_steps": 1,
            "grpo.max_completion_length": 16}
    tr = Trainer(recipe_factory(**over))
    data = _json(tr.out)
    for g in data["groups"]:
        for p in g["paths"]:
            assert p["ok"], (g["group"], p["name"], p["reason"])
    assert {g["group"] for g in data["groups"]} == {"kernels", "rollout", "levers"}
    assert _path(data, "rollout", "engine")["figures"]["captures"] >= 1
    assert _path(data, "kernels", "triton_fused_linear")["figures"]["peak_extra_mib"] > 0
    m = tr.step()
    assert m["kernels"] == tr.kernel_backend and m["loss"] == m["loss"]
    tr.close()
    again = Trainer(recipe_factory(**{**over, "log.output_dir": str(tr.out) + "-2"}))
    assert set(again.selfcheck.cache_hits) == {"kernels", "rollout", "levers"}
    again.close()
