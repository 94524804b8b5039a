"""Rollout throughput on one GPU: HF ``generate`` vs the in-process engine (rollout.backend hf / engine).

    python bench/rollout.py                  # 8 completions x 1024 tokens, ~2 min of which HF is ~1.5
    python bench/rollout.py --skip-hf        # the engine's numbers only
    python bench/rollout.py --out DIR [--smoke]   # also rollout.json / rollout.md; --smoke: tiny model, CPU

Model: the real Qwen2-VL-2B architecture (lowmem_vt.tiny.qwen2_vl_2b_config) with random weights in bf16 and
a LoRA adapter of r 64 on every language-model linear (B non-zero, so the adapter changes the output), as
the trainer runs it. Prompt: one 338-token prompt with a 448x448 image (32x32 patches = 256 image tokens),
its image features computed once. EOS is ignored (no token id ends a completion), so every run decodes
exactly completions x tokens; sampling at temperature 1.

Reported:
1. rollouts: tokens/s and the extra peak memory (torch.cuda.max_memory_allocated during the call minus what
   was allocated before it: KV cache, graph pool, logits, workspaces) for HF generate; the engine with the
   adapter in the matmul (the default); the engine with the adapter off (a lower bound on what merged
   weights could decode at); and merge -> engine -> unmerge (peft merge_adapter / unmerge_adapter).
2. the engine's decode step in ms: eager, manual CUDA graph (the engine's), torch.compile(mode="reduce-overhead").
3. the LoRA choice: bf16 merge + unmerge round trip on the base weights (elements changed, max error) and the
   log-prob gap between merged bf16 weights and the adapter in the matmul (what the trainer computes).
Vision-tower calls during the rollouts are counted and must be 0.
"""

from __future__ import annotations

import argparse
import sys
import time
import types

import torch

import report

from lowmem_vt.inputs import PromptInputs, build_sequences, mrope_positions
from lowmem_vt.model import LoadedModel, image_embeddings, lora_target_regex, sequence_hidden
from lowmem_vt.rollout import SamplingParams
from lowmem_vt.rollout.engine import EngineRollout
from lowmem_vt.rollout.hf import HFRollout
from lowmem_vt.tiny import build_tiny_tokenizer, qwen2_vl_2b_config, tiny_config

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--completions", type=int, default=8, help="samples of the one prompt (num_generations)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per completion (max_new_tokens; EOS ignored)")
    p.add_argument("--prompt-length", type=int, default=338)
    p.add_argument("--image-side", type=int, default=448, help="pixels; 448 -> 256 image tokens")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--step-repeats", type=int, default=200, help="decode steps timed per method in part 2")
    p.add_argument("--skip-hf", action="store_true", help="leave out HF generate (the slow one)")
    p.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (compiles for ~1-2 min)")
    p.add_argument("--out", default=None, help="write rollout.json / rollout.md here")
    p.add_argument("--smoke", action="store_true", help="the tiny model on CPU: rollouts and the LoRA check only")
    args = p.parse_args()
    if args.smoke:
        args.completions, args.tokens, args.prompt_length, args.image_side, args.lora_r = 2, 4, 20, 56, 4
        args.skip_compile = True
    return args


def build_lm(lora_r: int, smoke: bool = False) -> LoadedModel:
    """The 2B architecture, random bf16 weights on the GPU, LoRA as load_model adds it (adapter fp32).
    ``smoke``: the tiny config, fp32 on CPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    cfg = tiny_config(build_tiny_tokenizer()) if smoke else qwen2_vl_2b_config()
    device = torch.device("cpu" if smoke else "cuda")
    torch.manual_seed(0)
    with device:
        model = Qwen2VLForConditionalGeneration._from_config(cfg, dtype=torch.float32 if smoke else torch.bfloat16,
                                                             attn_implementation="sdpa")
    model.requires_grad_(False)
    peft_model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=lora_target_regex(LORA_TARGETS),
                                                  bias="none"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)  # a trained adapter is non-zero: the merge then really changes the weights
    calls = [0]
    model.model.visual.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    # eos -1: no token ends a completion, so every run decodes the same number of tokens
    tokenizer = types.SimpleNamespace(eos_token_id=-1, pad_token_id=cfg.text_config.pad_token_id)
    return LoadedModel(peft_model, tokenizer, None, device, calls)


def bench_prompt(cfg, length: int, image_side: int) -> PromptInputs:
    """text, <|vision_start|>, the image tokens, <|vision_end|>, text: ``length`` tokens in all."""
    vision = cfg.vision_config
    side = image_side // vision.patch_size
    grid = torch.tensor([[1, side, side]])
    n_image = side * side // vision.spatial_merge_size**2
    n_text = length - n_image - 2
    if n_text < 2:
        raise SystemExit(f"--prompt-length {length} leaves no room for text around {n_image} image tokens")
    g = torch.Generator().manual_seed(0)
    # ordinary tokens: below the special ones (the 2B vocabulary ends with them; the tiny one starts with them)
    lo, hi = (0, cfg.vision_start_token_id - 10) if cfg.vision_start_token_id > 1000 else (10, cfg.text_config.vocab_size)
    text = torch.randint(lo, hi, (n_text,), generator=g)
    head = n_text // 8
    ids = torch.cat([text[:head], torch.tensor([cfg.vision_start_token_id]), torch.full((n_image,), cfg.image_token_id),
                     torch.tensor([cfg.vision_end_token_id]), text[head:]])
    types_ = (ids == cfg.image_token_id).int()
    positions, next_position = mrope_positions(types_, grid, vision.spatial_merge_size)
    channels = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(side * side, channels, generator=g)
    return PromptInputs(ids, types_, positions, pixels, grid, next_position)


def measured(fn):
    """(result, seconds, extra peak bytes or NaN off CUDA) of one call."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t, float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t, torch.cuda.max_memory_allocated() - before


def rollouts(lm, prompt, embeds, params, skip_hf: bool) -> tuple[list[str], object]:
    engine = EngineRollout(lm)
    engine.generate([prompt], embeds, SamplingParams(params.num_generations, 32))  # warm-up: cuBLAS, allocator
    runs = [("engine, adapter in the matmul (default)", lambda: engine.generate([prompt], embeds, params))]

    def adapter_off():
        with lm.peft_model.disable_adapter():
            return engine.generate([prompt], embeds, params)

    def merged():
        lm.peft_model.merge_adapter()
        try:
            return engine.generate([prompt], embeds, params)
        finally:
            lm.peft_model.unmerge_adapter()

    runs += [("engine, adapter off (merged-weights speed)", adapter_off), ("engine, merge -> rollout -> unmerge", merged)]
    if not skip_hf:
        runs.insert(0, ("HF generate", lambda: HFRollout(lm).generate([prompt], embeds, params)))
    rows, kept = [], None
    for name, fn in runs:
        calls = lm.vision_calls[0]
        out, seconds, peak = measured(fn)
        if lm.vision_calls[0] != calls:
            raise RuntimeError(f"{name} called the vision tower")
        tokens = int(out.completion_mask.sum())
        rows.append(f"| {name} | {tokens} | {seconds:.2f} | {tokens / seconds:,.0f} | {peak / 2**20:,.0f} |")
        print(rows[-1], flush=True)
        if name.startswith("engine, adapter in"):
            kept = out
    return rows, kept


def decode_step_ms(lm, prompt, embeds, params, repeats: int, skip_compile: bool) -> list[str]:
    """ms per decode step of the engine's batch, same state, three ways of running it."""
    engine = EngineRollout(lm)
    lm.hf_model.eval()
    with torch.no_grad():
        s = engine._prefill([prompt], embeds, params)
    first_slot = s.cursor.clone()
    repeats = min(repeats, params.max_new_tokens - 8)

    def time_steps(step) -> float:
        for warm in (True, False):
            s.offset.zero_()
            s.cursor.copy_(first_slot)
            s.done.zero_()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(5 if warm else repeats):
                step()
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / repeats * 1e3

    rows = []
    with torch.no_grad():
        rows.append(("eager", time_steps(lambda: engine._decode_step(s, params))))
        rows.append(("manual CUDA graph (the engine's)", time_steps(engine._capture(s, params))))
        if not skip_compile:
            try:
                for t in s.tensors():
                    torch._dynamo.mark_static_address(t)  # cudagraph trees may then mutate them in place
                compiled = torch.compile(engine._decode_step, mode="reduce-overhead", fullgraph=True)
                rows.append(('torch.compile(mode="reduce-overhead")', time_steps(lambda: compiled(s, params))))
            except Exception as e:  # noqa: BLE001 - report, do not lose the other numbers
                rows.append((f"torch.compile failed: {type(e).__name__}: {e}".replace("\n", " ")[:200], float("nan")))
    B = s.token.shape[0]
    return [f"| {name} | {ms:.3f} | {B / ms * 1e3:,.0f} |" for name, ms in rows]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def lora_choice(lm, prompt, embeds, roll) -> list[str]:
    """Merge + unmerge in bf16 vs the untouched base weights; merged vs in-matmul log-probs of one completion."""
    layers = [m for m in lm.hf_model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    saved = [m.base_layer.weight.to("cpu", copy=True) for m in layers]  # host copy: the reference for the round trip
    ids, mask = roll.completion_ids[:1], roll.completion_mask[:1]
    seqs = build_sequences([prompt], [0], ids, mask, lm.pad_token_id).to(lm.device)

    def logprobs():  # as the trainer computes them
        logits = lm.hf_model.lm_head(sequence_hidden(lm, seqs, embeds)).float()
        return torch.log_softmax(logits, -1).gather(-1, ids.to(lm.device)[..., None])[..., 0]

    lm.hf_model.eval()
    in_matmul = logprobs()
    _sync()
    t = time.perf_counter()
    lm.peft_model.merge_adapter()
    _sync()
    t_merge = time.perf_counter() - t
    merged = logprobs()
    t = time.perf_counter()
    lm.peft_model.unmerge_adapter()
    _sync()
    t_unmerge = time.perf_counter() - t
    changed, total, worst = 0, 0, 0.0
    for m, w in zip(layers, saved):
        after = m.base_layer.weight.cpu()
        changed += int((after != w).sum())
        total += w.numel()
        worst = max(worst, float((after.float() - w.float()).abs().max()))
    gap = (merged - in_matmul).abs()
    return [
        f"| merge_adapter + unmerge_adapter time | {(t_merge + t_unmerge) * 1e3:.1f} ms |",
        f"| base weights changed by the bf16 round trip | {changed:,} of {total:,} ({changed / total:.2%}), max abs error {worst:.3g} |",
        f"| log-prob gap, merged bf16 vs adapter in the matmul | max {float(gap.max()):.3g}, mean {float(gap.mean()):.3g} nats |",
    ]


def main() -> int:
    args = parse_args()
    if not args.smoke and not torch.cuda.is_available():
        return report.skip(args.out, "rollout", "bench/rollout.py needs a CUDA GPU (--smoke runs it on CPU)")
    lm = build_lm(args.lora_r, args.smoke)
    prompt = bench_prompt(lm.config, args.prompt_length, args.image_side)
    embeds = image_embeddings(lm, [prompt.pixel_values], [prompt.image_grid_thw])  # once, reused by every run
    params = SamplingParams(num_generations=args.completions, max_new_tokens=args.tokens, temperature=1.0)
    device = "cpu (smoke), tiny model" if args.smoke else torch.cuda.get_device_name()
    head = (f"{device}: Qwen2-VL-2B architecture, random bf16 weights, LoRA r {args.lora_r}; "
            f"{args.completions} x {args.tokens} tokens from a {prompt.length}-token prompt ({prompt.num_image_tokens} image tokens); "
            f"torch {torch.__version__}")
    print(head, flush=True)
    tables: dict[str, list[str]] = {}

    def save() -> None:  # the tables so far, as markdown rows (JSON for the GPU check, markdown for people)
        report.write(args.out, "rollout", {"device": device, "args": vars(args), "tables": tables},
                     "\n\n".join([head] + ["\n".join(rows) for rows in tables.values()]))

    print("\n| rollout | tokens | s | tokens/s | extra peak MiB |\n|---|---:|---:|---:|---:|")
    rows, roll = rollouts(lm, prompt, embeds, params, args.skip_hf)
    tables["rollouts"] = ["| rollout | tokens | s | tokens/s | extra peak MiB |", "|---|---:|---:|---:|---:|", *rows]
    save()
    if torch.cuda.is_available():  # CUDA graphs and torch.compile's cudagraph trees: GPU only
        print(f"\n| decode step, batch {args.completions} | ms | tokens/s |\n|---|---:|---:|")
        tables["decode_step"] = [f"| decode step, batch {args.completions} | ms | tokens/s |", "|---|---:|---:|"]
        for row in decode_step_ms(lm, prompt, embeds, params, args.step_repeats, args.skip_compile):
            tables["decode_step"].append(row)
            print(row, flush=True)
        save()
    print("\n| LoRA: merge/unmerge vs in the matmul | |\n|---|---|")
    tables["lora"] = ["| LoRA: merge/unmerge vs in the matmul | |", "|---|---|"]
    for row in lora_choice(lm, prompt, embeds, roll):
        tables["lora"].append(row)
        print(row, flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
