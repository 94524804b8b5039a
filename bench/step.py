"""The whole step over several steps (what `make gpu-check` runs): one recipe step of sat_lora.yaml's shapes on the real Qwen2-VL-2B architecture (random weights):
peak memory and time of each phase (vision, rollout, reference pass, policy update, optimizer step),
for bf16 LoRA or QLoRA, next to the planner's prediction. GPU only (``--smoke``: the tiny model on CPU).

    python bench/step.py [--recipe recipes/sat_lora.yaml] [--steps 3] [--out DIR] [--smoke]
                           [--quantization none|nf4] [--optimizer adamw|adamw_8bit] [--completion 1024]
                           [--micro-batch 8] [--backend hf|engine] [--kernels triton|torch]

Quantization and optimizer default to the recipe's (sat_qlora.yaml: nf4 + paged 8-bit AdamW). With
``--steps N`` the phases repeat N times on the same model: memory still allocated after each step shows
whether it stays flat. ``--out DIR`` writes step.json / step.md after every step (bench/report.py).

Shapes as ../shared/ANCHORS.md: one prompt = vision_start + 256 image tokens (448x448) + vision_end + 80 text
tokens (the image a generated SAT-style one); G = 8 completions; LoRA r 64 on q/k/v/o/gate/up/down; beta 0.04.
EOS is never sampled (it is masked out of the logits) so every completion has the full length.

Checks (exit 1 when one fails): every micro-batch's loss and the LoRA gradient norm are finite, the rollout's
sampling log-probs agree with the policy update's log-probs of the same tokens (max < 0.1, mean < 0.01: bf16, as
bench/rollout.py), and (CUDA, from step 2 on) the memory allocated after each step so far is the same within 1/16
GiB. ``LOWMEM_BENCH_FAULT=1`` (the GPU check's ``--fault``) makes the loss NaN: the check must fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import report


FLAT_GIB = 1 / 16  # what allocator rounding can explain between steps, not a leak (lowmem_vt.held_memory)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--completion", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--backend", default="hf")
    ap.add_argument("--kernels", default="triton")
    ap.add_argument("--no-ckpt", action="store_true")
    ap.add_argument("--quantization", default=None, choices=["none", "nf4"], help="default: the recipe's")
    ap.add_argument("--optimizer", default=None, choices=["adamw", "adamw_8bit", "paged_adamw_8bit"], help="default: the recipe's")
    ap.add_argument("--recipe", default="recipes/sat_lora.yaml")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="the tiny model on CPU, a few tokens")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        return report.skip(args.out, "step", "bench/step.py needs a CUDA GPU (--smoke runs it on CPU)")
    from PIL import Image
    from transformers import Qwen2VLForConditionalGeneration

    from lowmem_vt.config import LoraConfig, ModelConfig, load_config
    from lowmem_vt.grpo import LossCounts, group_advantages
    from lowmem_vt.families import mrope_positions
    from lowmem_vt.families.qwen2_vl import Qwen2VL, qwen2_vl_2b_config
    from lowmem_vt.inputs import PromptInputs, build_sequences
    from lowmem_vt.kernels.head import fused_grpo_loss, token_logprobs
    from lowmem_vt.model import image_embeddings, load_model, sequence_hidden
    from lowmem_vt.rollout import SamplingParams, make_rollout
    from lowmem_vt.data import generate_sat_records
    from lowmem_vt.tiny import build_tiny_model, build_tiny_tokenizer

    recipe_file = load_config(args.recipe)
    args.quantization = args.quantization or recipe_file.model.quantization
    args.optimizer = args.optimizer or recipe_file.train.optimizer
    cuda = not args.smoke
    side, n_text = (448, 80) if cuda else (56, 8)
    if args.smoke:
        args.completion, args.kernels = min(args.completion, 4), "torch"
        # bitsandbytes' NF4 on CPU is slow and its path depends on the CPU's features, and paged optimizer state
        # needs CUDA: the smoke keeps this script's code path, not NF4 (tests/test_memory.py covers NF4 on CPU)
        args.quantization, args.optimizer = "none", "adamw"
    dev = torch.device("cuda" if cuda else "cpu")
    with tempfile.TemporaryDirectory() as d:
        if cuda:
            cfg = qwen2_vl_2b_config()
            with torch.device("cuda"):
                model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16)
            model.save_pretrained(d)
            del model
            build_tiny_tokenizer().save_pretrained(d)  # tokenizer only for decoding; ids come from the 2B vocab
            Path(d, "preprocessor_config.json").write_text(json.dumps(Qwen2VL().image_processor_config()))
        else:
            build_tiny_model(d)
            cfg = Qwen2VLForConditionalGeneration.config_class.from_pretrained(d)
        lm = load_model(ModelConfig(name_or_path=d, gradient_checkpointing=not args.no_ckpt, quantization=args.quantization,
                                    dtype="bfloat16" if cuda else "float32"),
                        LoraConfig(r=64, alpha=128), dev, min_pixels=3136, max_pixels=side * side)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    allocated = (lambda: torch.cuda.memory_allocated() / 2**30) if cuda else (lambda: None)
    sync()
    weights_gib = allocated()

    # the prompt: vision_start, 256 image tokens (a generated SAT-style image), vision_end, 80 text tokens
    image = Image.open(io.BytesIO(generate_sat_records(1, size=side)[0]["image_bytes"][0])).convert("RGB")
    pv, grid = lm.image_processor(images=[image], return_tensors="pt").values()
    n_image = int(grid.prod()) // cfg.vision_config.spatial_merge_size**2
    ids = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_image + [cfg.vision_end_token_id] + list(range(10, 10 + n_text))
    ids = torch.tensor(ids)
    types = (ids == cfg.image_token_id).int()
    pos, nxt = mrope_positions(types, grid, 2)
    prompt = PromptInputs(ids, types, pos, pv.float(), grid.long(), nxt)
    G, T = 8, args.completion
    mb = args.micro_batch
    rows = []  # (step, phase, seconds, peak GiB or None)

    from lowmem_vt.model import trainable_parameters
    from lowmem_vt.planner import plan
    from lowmem_vt.trainer import make_optimizer

    recipe = load_config(args.recipe, [
        f"model.quantization={args.quantization}", f"train.optimizer={args.optimizer}", f"train.micro_batch_size={mb}",
        f"grpo.max_completion_length={T}", f"model.gradient_checkpointing={str(not args.no_ckpt).lower()}",
        f"kernels={args.kernels}", f"rollout.backend={args.backend}", f"data.max_pixels={side * side}"])
    opt = make_optimizer(trainable_parameters(lm.peft_model), recipe)
    predicted = plan(recipe, cfg)
    # full-length completions: an end token id no row can sample (the vocabulary's size), for either backend
    never = SimpleNamespace(eos_token_id=cfg.text_config.vocab_size, pad_token_id=lm.pad_token_id)
    ro = make_rollout(args.backend, dataclasses.replace(lm, tokenizer=never))
    device_name = torch.cuda.get_device_name() if cuda else "cpu (smoke)"
    after_step: list[float | None] = []  # memory still allocated after each step: flat if nothing leaks
    checks: list[dict] = []

    def check(step: int, name: str, ok: bool, detail: str) -> None:
        checks.append(dict(step=step, check=name, ok=ok, detail=detail))
        if not ok:
            print(f"FAILED step {step}: {name}: {detail}", flush=True)

    def phase(step, name, fn):
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        sync()
        rows.append((step, name, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30 if cuda else None))
        return out

    def spread() -> float | None:
        """How far apart the memory allocated after each step so far lies (GiB); None before two CUDA steps."""
        return max(after_step) - min(after_step) if cuda and len(after_step) > 1 else None

    def save() -> None:
        flat = None if spread() is None else spread() < FLAT_GIB
        data = {"device": device_name, "args": vars(args), "weights_gib": weights_gib, "after_step_gib": after_step,
                "memory_flat": flat, "phases": [dict(step=r[0], phase=r[1], s=r[2], peak_gib=r[3]) for r in rows],
                "measured_peak_gib": max((r[3] for r in rows if r[3] is not None), default=None),
                "planner_peak_gib": predicted.peak, "planner_phases_gib": predicted.peaks, "checks": checks}
        md = (f"{device_name}; {args.recipe}, quantization {args.quantization}, optimizer {args.optimizer}, {G} x {T} tokens, "
              f"micro-batch {mb}, backend {args.backend}, kernels {args.kernels}; weights + LoRA resident: {weights_gib} GiB\n\n"
              + report.table(["step", "phase", "time s", "measured peak GiB"], [list(r) for r in rows])
              + f"\n\nallocated after each step (GiB): {after_step}; flat: {flat}\n\n"
              + f"planner prediction (max over phases, includes {0.5} GiB CUDA context that max_memory_allocated does not "
              f"count): {predicted.peak:.2f} GiB\n{predicted.table()}\n\n"
              + report.table(["step", "check", "ok", "detail"], [[c["step"], c["check"], c["ok"], c["detail"]] for c in checks]))
        report.write(args.out, "step", data, md)

    for step in range(1, args.steps + 1):
        embeds = phase(step, "vision (once per prompt)", lambda: image_embeddings(lm, [prompt.pixel_values], [prompt.image_grid_thw]))
        roll = phase(step, f"rollout ({args.backend}, {G}x{T})",
                     lambda: ro.generate([prompt], embeds, SamplingParams(G, T, 1.0, seeds=None)))
        B = roll.completion_ids.shape[0]
        slices = [slice(i, i + mb) for i in range(0, B, mb)]

        def reference():
            out = []
            with torch.no_grad(), lm.peft_model.disable_adapter():
                for s in slices:
                    seqs = build_sequences([prompt], roll.prompt_rows[s], roll.completion_ids[s], roll.completion_mask[s], 0).to(dev)
                    out.append(token_logprobs(sequence_hidden(lm, seqs, embeds), lm.lm_head_weight,
                                              roll.completion_ids[s].to(dev), 1.0, args.kernels))
            return torch.cat(out)

        ref = phase(step, "reference pass", reference)
        adv = group_advantages(torch.randn(B), G).to(dev)
        counts = LossCounts(B, float(roll.completion_mask.sum()), T)
        losses, policy_logp = [], []

        def update():
            for s in slices:
                seqs = build_sequences([prompt], roll.prompt_rows[s], roll.completion_ids[s], roll.completion_mask[s], 0).to(dev)
                loss, _, logp = fused_grpo_loss(sequence_hidden(lm, seqs, embeds), lm.lm_head_weight, roll.completion_ids[s].to(dev),
                                                roll.completion_mask[s].to(dev), adv[s], None, ref[s], beta=0.04, epsilon_low=0.2,
                                                epsilon_high=0.2, loss_type="grpo", counts=counts, backend=args.kernels)
                if report.fault():  # the GPU check's --fault: a step that goes wrong must fail the stage
                    loss = loss * float("nan")
                loss.backward()
                losses.append(loss.detach())
                policy_logp.append(logp.float())

        phase(step, f"policy update (micro-batch {mb})", update)
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in lm.peft_model.parameters()
                                                          if p.grad is not None]))
        mask = roll.completion_mask.to(dev).float()
        drift = (torch.cat(policy_logp) - roll.sampling_logprobs.to(dev).float()).abs() * mask
        check(step, "loss finite", bool(torch.isfinite(torch.stack(losses)).all()), f"{[float(x) for x in losses]}")
        check(step, "gradient norm finite", bool(torch.isfinite(grad_norm)), f"{float(grad_norm):.3g}")
        max_drift, mean_drift = float(drift.max()), float(drift.sum() / mask.sum())
        check(step, "sampling log-probs match the update's", max_drift < 0.1 and mean_drift < 0.01,
              f"max {max_drift:.3g} (< 0.1), mean {mean_drift:.3g} (< 0.01)")
        phase(step, f"optimizer step ({args.optimizer})", opt.step)
        opt.zero_grad(set_to_none=True)
        embeds = roll = ref = adv = None  # freed before the memory held after the step is read
        sync()
        after_step.append(allocated())
        if spread() is not None:  # step 1 allocated the optimizer's state and the engine's buffers; nothing more after it
            check(step, "memory held between steps flat", spread() < FLAT_GIB,
                  f"allocated after steps 1-{step}: {[round(a, 3) for a in after_step]} GiB (spread < {FLAT_GIB:.4f})")
        save()
    print(f"device: {device_name}; {args}; weights + LoRA resident: {weights_gib} GiB")
    print(Path(args.out, "step.md").read_text() if args.out else predicted.table())
    return 1 if any(not c["ok"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
