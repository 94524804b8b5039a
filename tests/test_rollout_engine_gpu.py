"""The engine checklist (issue 12, items a-g) on a CUDA GPU: the real Qwen2-VL-2B architecture with random bf16
weights and LoRA r 64 on every linear (bench/rollout.py's model and prompts), and the tiny model in bf16 where a
small vocabulary is needed (forced EOS). Run by ``make gpu-check`` (``pytest -m gpu``); skipped without CUDA.

Throughput is not asserted here (bench/rollout.py measures it against the goals); these tests print the
tokens/s they see.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).parents[1]
G, T = 8, 1024


@functools.cache
def _bench():
    """bench/rollout.py as a module: its model, prompts, fingerprint and the trainer's log-probs."""
    spec = importlib.util.spec_from_file_location("bench_rollout", ROOT / "bench" / "rollout.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_rollout"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup():
    """(lm, prompts, image features, seeds): 8 prompts of 338 .. 597 tokens, two image sizes, EOS disabled."""
    # tests/test_kernels.py sets TRITON_INTERPRET=1 for CPU runs; on a GPU it would turn the engine's fused
    # Triton kernels into the (slow, bf16-unsafe) interpreter for the whole session
    assert os.environ.get("TRITON_INTERPRET") != "1", "TRITON_INTERPRET=1 on a CUDA machine: the fused kernels would be interpreted"
    bench = _bench()
    lm = bench.gpu_lm(64)
    prompts = [bench.bench_prompt(lm.config, 338 + 37 * i, 448 if i % 2 == 0 else 336, i) for i in range(8)]
    from lowmem_vt.model import image_embeddings

    with torch.no_grad():
        embeds = image_embeddings(lm, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts])
    yield lm, prompts, embeds, [1000 + i for i in range(8)]
    del lm
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def full_rollout(setup):
    """(a) 8 seeded prompts x 8 x 1024 tokens with CUDA graphs, timed; memory before and the peak during it."""
    from lowmem_vt.rollout import SamplingParams
    from lowmem_vt.rollout.engine import EngineRollout

    lm, prompts, embeds, seeds = setup
    engine = EngineRollout(lm)
    engine.generate(prompts[:1], embeds[:1], SamplingParams(G, 256, seeds=seeds[:1]))  # warm-up (Triton, cuBLAS)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t = time.perf_counter()
    roll = engine.generate(prompts, embeds, SamplingParams(G, T, seeds=seeds))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    print(f"\n8 prompts x {G} x {T}: {roll.completion_mask.sum() / seconds:,.0f} tokens/s ({seconds:.2f} s)")
    return roll, before, torch.cuda.max_memory_allocated()


@pytest.fixture(scope="module")
def tiny_gpu(tmp_path_factory):
    """(lm, prompts, image features): the tiny model in bf16 on the GPU, LoRA r 4, 3 short prompts. Its small
    vocabulary lets a chosen token really end rows."""
    from lowmem_vt.config import LoraConfig, ModelConfig
    from lowmem_vt.model import image_embeddings, load_model
    from lowmem_vt.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")
    lm = load_model(ModelConfig(name_or_path=str(folder), dtype="bfloat16"), LoraConfig(r=4, alpha=8), torch.device("cuda"),
                    min_pixels=3136, max_pixels=112 * 112)
    prompts = [_bench().bench_prompt(lm.config, 40 + 5 * i + 16, 112, i) for i in range(3)]
    with torch.no_grad():
        embeds = image_embeddings(lm, [p.pixel_values for p in prompts], [p.image_grid_thw for p in prompts])
    return lm, prompts, embeds


def test_a_capture_succeeds_for_8_seeded_prompts_of_different_lengths(setup, full_rollout):
    roll, _, _ = full_rollout
    assert roll.completion_ids.shape == (8 * G, T)
    assert bool(roll.completion_mask.all())  # EOS disabled: every row decodes T tokens
    assert bool(torch.isfinite(roll.sampling_logprobs).all()) and bool((roll.sampling_logprobs <= 0).all())
    assert roll.prompt_rows == [p for p in range(8) for _ in range(G)]


def test_b_greedy_graph_replay_equals_the_eager_path(setup):
    """64 rows x 256 steps: the captured graphs and the eager step give identical ids."""
    from lowmem_vt.rollout import SamplingParams
    from lowmem_vt.rollout.engine import EngineRollout

    lm, prompts, embeds, _ = setup
    params = SamplingParams(G, 256, greedy=True)
    graphs = EngineRollout(lm).generate(prompts, embeds, params)
    eager = EngineRollout(lm, graphs=None).generate(prompts, embeds, params)
    assert torch.equal(graphs.completion_ids, eager.completion_ids)


def test_b_seeded_sampling_graph_replay_equals_the_eager_path(setup):
    """The warm-up is a real step and the capture draws nothing, so replays draw what eager steps draw for the same
    seeds."""
    from lowmem_vt.rollout import SamplingParams
    from lowmem_vt.rollout.engine import EngineRollout

    lm, prompts, embeds, seeds = setup
    params = SamplingParams(G, 160, seeds=seeds[:2])
    graphs = EngineRollout(lm).generate(prompts[:2], embeds[:2], params)
    eager = EngineRollout(lm, graphs=None).generate(prompts[:2], embeds[:2], params)
    assert torch.equal(graphs.completion_ids, eager.completion_ids)


def test_c_sampling_logprobs_match_the_trainers(setup, full_rollout):
    """max |diff| < 0.1, mean < 0.01, no trend along the completion, shorter prompts as good as the longest."""
    lm, prompts, embeds, _ = setup
    roll, _, _ = full_rollout
    with torch.no_grad():
        trainer = _bench().trainer_logprobs(lm, prompts, embeds, roll, 1.0, rows_per_pass=G)
    diff = (roll.sampling_logprobs.cpu() - trainer).abs()
    quarters = [float(q.mean()) for q in diff.chunk(4, dim=1)]
    per_prompt = [float(d.mean()) for d in diff.view(8, G, T)]
    print(f"\nlog-prob |diff|: max {float(diff.max()):.3g} mean {float(diff.mean()):.3g}; per quarter {quarters}; per prompt {per_prompt}")
    assert float(diff.max()) < 0.1 and float(diff.mean()) < 0.01
    assert quarters[-1] <= 2 * quarters[0] + 2e-3  # no drift along the completion
    shortest, longest = per_prompt[0], per_prompt[-1]  # prompts grow with their index
    assert shortest <= 2 * longest + 2e-3


def test_d_same_seeds_same_samples_new_seed_other_samples(setup, full_rollout):
    from lowmem_vt.rollout import SamplingParams
    from lowmem_vt.rollout.engine import EngineRollout

    lm, prompts, embeds, seeds = setup
    roll, _, _ = full_rollout
    engine = EngineRollout(lm)
    again = engine.generate(prompts, embeds, SamplingParams(G, T, seeds=seeds))
    assert torch.equal(again.completion_ids, roll.completion_ids)
    other = engine.generate(prompts[:1], embeds[:1], SamplingParams(G, 64, seeds=[seeds[0] + 1]))
    assert not torch.equal(other.completion_ids, roll.completion_ids[:G, :64])


def test_d_captured_sampler_replayed_on_fixed_logits_matches_the_softmax():
    """sample_tokens captured once with a seeded generator, replayed 20 times on 2048 rows of the same logits:
    each replay draws anew, and the frequencies match softmax(logits) within 0.01."""
    from lowmem_vt.rollout import SamplingParams
    from lowmem_vt.rollout.sampling import sample_tokens

    dev = torch.device("cuda")
    logits = (torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 1.5).to(dev).expand(2048, 50).contiguous()
    gen = torch.Generator(dev).manual_seed(3)
    params = SamplingParams()
    tokens = torch.zeros(2048, dtype=torch.long, device=dev)

    def step():
        tokens.copy_(sample_tokens(logits, params, [gen])[0])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    with torch.cuda.graph(graph, stream=side):
        step()
    draws = []
    for _ in range(20):
        graph.replay()
        draws.append(tokens.clone())
    torch.cuda.synchronize()
    assert not torch.equal(draws[0], draws[1])
    freq = torch.bincount(torch.cat(draws), minlength=50).float() / (20 * 2048)
    torch.testing.assert_close(freq, torch.softmax(logits[0].float(), -1), atol=0.01, rtol=0)


def test_e_forced_eos_pads_masks_and_stops(tiny_gpu):
    """The tiny model in bf16 on the GPU (a small vocabulary, so a chosen token really ends every row): after
    EOS pad, mask 0 and log-prob 0; decoding stops within 16 steps of the last EOS."""
    import dataclasses
    import types

    from lowmem_vt.rollout import SamplingParams
    from lowmem_vt.rollout.engine import EngineRollout

    lm, prompts, embeds = tiny_gpu
    params = SamplingParams(G, 300, seeds=[1, 2, 3])
    free_lm = dataclasses.replace(lm, tokenizer=types.SimpleNamespace(eos_token_id=-1, pad_token_id=lm.pad_token_id))
    # one bucket for all 300 steps, so both runs keep every row and run the same kernels on the same shapes:
    # identical tokens up to each EOS (after a prompt left, other matmul shapes could round differently)
    free = EngineRollout(free_lm, decode_bucket=512).generate(prompts, embeds, params)
    eos = int(torch.bincount(free.completion_ids.flatten()).argmax())  # the most frequent token ends rows soon
    eos_lm = dataclasses.replace(lm, tokenizer=types.SimpleNamespace(eos_token_id=eos, pad_token_id=lm.pad_token_id))
    engine = EngineRollout(eos_lm, decode_bucket=512)
    filled = []
    decode = engine._decode
    engine._decode = lambda *a: filled.append(decode(*a)) or filled[-1]
    out = engine.generate(prompts, embeds, params)
    ends = []
    for r in range(free.completion_ids.shape[0]):
        hits = (free.completion_ids[r] == eos).nonzero()
        ends.append(int(hits[0]) + 1 if len(hits) else 300)
    assert max(ends) < 300, "the chosen EOS did not end every row; pick another token"
    assert out.completion_ids.shape[1] == max(ends)
    for r, n in enumerate(ends):
        assert torch.equal(out.completion_ids[r, :n], free.completion_ids[r, :n])
        assert bool((out.completion_ids[r, n:] == lm.pad_token_id).all())
        assert out.completion_mask[r, :n].sum() == n and out.completion_mask[r, n:].sum() == 0
        assert bool((out.sampling_logprobs[r, n:] == 0).all())
    assert filled[0] - max(ends) <= 16, (filled, max(ends))


def test_e_finished_rows_leave_the_batch_under_cuda_graphs(tiny_gpu):
    """The tiny model in bf16, a forced EOS, bucket 16: at each boundary finished rows leave and the next graph is
    captured at the smaller batch. The tokens can differ from a run that keeps every row (other batch sizes,
    other bf16 rounding), so what is checked is what matters: the batch shrank, padding and masks follow each
    EOS, and the sampler is still the policy (log-probs equal the trainer's to bf16 rounding)."""
    import dataclasses
    import types

    from lowmem_vt.rollout import SamplingParams
    from lowmem_vt.rollout.engine import EngineRollout

    lm, prompts, embeds = tiny_gpu
    params = SamplingParams(G, 200, seeds=[1, 2, 3])
    free_lm = dataclasses.replace(lm, tokenizer=types.SimpleNamespace(eos_token_id=-1, pad_token_id=lm.pad_token_id))
    free = EngineRollout(free_lm, decode_bucket=512).generate(prompts, embeds, params)
    counts = torch.bincount(free.completion_ids.flatten())
    eos = int(counts.argsort(descending=True)[3])  # a frequent token, not the most frequent: rows end at different times
    engine = EngineRollout(dataclasses.replace(lm, tokenizer=types.SimpleNamespace(eos_token_id=eos, pad_token_id=lm.pad_token_id)),
                           decode_bucket=16)
    shapes = []
    compact = engine._compact
    engine._compact = lambda s: (compact(s), shapes.append((s.active, s.width)))
    out = engine.generate(prompts, embeds, params)
    print(f"\nbatch per bucket (prompts, width): {shapes}")
    assert any(w < G for _, w in shapes), shapes
    for r in range(out.completion_ids.shape[0]):
        n = int(out.completion_mask[r].sum())
        hits = (out.completion_ids[r, :n] == eos).nonzero()
        assert (len(hits) == 0 and n == out.completion_ids.shape[1]) or (len(hits) == 1 and int(hits[0]) == n - 1)
        assert bool((out.completion_ids[r, n:] == lm.pad_token_id).all()) and bool((out.sampling_logprobs[r, n:] == 0).all())
    with torch.no_grad():
        trainer = _bench().trainer_logprobs(lm, prompts, embeds, out, 1.0, rows_per_pass=G)
    mask = out.completion_mask.cpu().bool()
    diff = (out.sampling_logprobs.cpu() - trainer)[mask].abs()
    print(f"log-prob |diff| after compaction: max {float(diff.max()):.3g} mean {float(diff.mean()):.3g}")
    assert float(diff.max()) < 0.1 and float(diff.mean()) < 0.01


def test_f_decode_attention_does_not_fall_back_to_the_math_kernel(setup):
    """One decode step with SDPA restricted to the fused backends: it would raise if only math could run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lowmem_vt.rollout import SamplingParams
    from lowmem_vt.rollout.engine import EngineRollout

    lm, prompts, embeds, seeds = setup
    engine = EngineRollout(lm, graphs=None)
    params = SamplingParams(G, 64, seeds=seeds)
    lm.hf_model.eval()
    with torch.no_grad():
        s = engine._prefill(prompts, embeds, params)
        w = engine.decode_weights()
        usable = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel([backend]):
                    engine._decode_step(s, w, params, s.active, s.layout.span(0))
                torch.cuda.synchronize()
                usable.append(backend.name)
            except RuntimeError:
                pass
    print(f"\ndecode attention runs on: {usable}")
    assert usable, "decode attention can only run on the math kernel"


def test_g_memory_weights_and_vision_calls(setup, full_rollout):
    """KV cache bytes = 28,672 per token slot held (each prompt once, each row's completion); extra peak of the
    64 x 1024 rollout <= its allocation + 1.5 GB; no growth over 3 rollouts; base weights unchanged; no
    vision-tower call."""
    from lowmem_vt.rollout import SamplingParams
    from lowmem_vt.engine_memory import engine_allocation_bytes
    from lowmem_vt.rollout.engine import EngineRollout

    lm, prompts, embeds, seeds = setup
    _, before, peak = full_rollout
    engine = EngineRollout(lm)
    params = SamplingParams(G, T, seeds=seeds)
    s = engine.new_state([p.length for p in prompts], [p.next_position for p in prompts], params)
    lay = s.layout
    assert s.kv.numel() * s.kv.element_size() == 28_672 * (8 * lay.prompt_slots + 8 * G * lay.steps)
    del s
    alloc = engine_allocation_bytes(lm.config.text_config, torch.bfloat16, 8, max(p.length for p in prompts), G, T,
                                    lora_r=64, lora_targets=_bench().LORA_TARGETS)
    print(f"\nextra peak {(peak - before) / 2**30:.2f} GiB; predicted allocation {alloc.allocated / 2**30:.2f} GiB "
          f"(KV {alloc.kv_cache / 2**30:.2f}), predicted peak {alloc.peak / 2**30:.2f} GiB")
    assert peak - before <= alloc.allocated + 1.5 * 2**30
    fingerprint = _bench().fingerprint
    weights, vision = fingerprint(lm), lm.vision_calls[0]
    after = []
    for _ in range(3):
        out = engine.generate(prompts, embeds, SamplingParams(G, 128, seeds=seeds))
        del out
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert max(after) - min(after) <= 2**20, after
    assert torch.equal(fingerprint(lm), weights)
    assert lm.vision_calls[0] == vision
