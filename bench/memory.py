"""Memory of one recipe step on the real Qwen2-VL-2B architecture, two ways.

``--simulate`` (CPU, no GPU, no weights; what runs without a GPU): ``lowmem_vt.simulate`` runs the step's
phases on fake tensors for the grid LoRA / QLoRA x micro-batch 1, 2, 4, 8 x completion 256, 700, 1024 and
puts each phase's simulated peak beside the planner's; then the memory levers, added one at a time, at each
recipe's own settings. ``--smoke``: the tiny model at two points (seconds; a CPU test runs it).

    python bench/memory.py --out DIR --simulate [--smoke]

On a GPU (without ``--simulate``): peak memory and time of each phase (vision, rollout, reference pass,
policy update, optimizer step), for bf16 LoRA or QLoRA, next to the planner's prediction.

    python bench/memory.py --out DIR [--quantization none|nf4] [--optimizer adamw|adamw_8bit] [--completion 1024]
                           [--micro-batch 8] [--backend hf|engine] [--kernels triton|torch]

Shapes as ../shared/ANCHORS.md: one prompt = vision_start + 256 image tokens (448x448) + vision_end + 80 text
tokens; G = 8 completions; LoRA r 64 on q/k/v/o/gate/up/down; beta 0.04. EOS is never sampled (it is
masked out of the logits) so every completion has the full length.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

GRID = [(recipe, mb, T) for recipe in ("recipes/sat_lora.yaml", "recipes/sat_qlora.yaml")
        for mb in (1, 2, 4, 8) for T in (256, 700, 1024)]


def write(out: Path, payload: dict, md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(payload, indent=1))
    (out / "memory.md").write_text(md)


def simulated(out: Path, smoke: bool) -> int:
    from lowmem_vt.config import load_config
    from lowmem_vt.planner import config_for, plan
    from lowmem_vt.simulate import LEVERS, simulate

    if smoke:
        from lowmem_vt.tiny import build_tiny_model

        tiny = build_tiny_model(Path(tempfile.gettempdir()) / "lowmem-vt-bench-tiny")
        base = ["recipes/demo_tiny.yaml", [f"model.name_or_path={tiny}"]]
        grid = [(base, mb, T) for mb, T in ((2, 64), (8, 256))]
        recipes = [base]
    else:
        grid = [([r, []], mb, T) for r, mb, T in GRID]
        recipes = [["recipes/sat_lora.yaml", []], ["recipes/sat_qlora.yaml", []]]
    rows, worst = [], 0.0
    unit, scale = ("MiB", 1024) if smoke else ("GiB", 1)
    md = [f"## Simulated: planner vs simulation per phase ({unit} allocated)", "",
          "| recipe | micro | completion | " + " | ".join(f"{p} sim / plan" for p in PHASES) + " | worst plan/sim |",
          "|---|---:|---:|" + "---:|" * (len(PHASES) + 1)]
    for (recipe, over), mb, T in grid:
        cfg = load_config(recipe, over + [f"train.micro_batch_size={mb}", f"grpo.max_completion_length={T}"])
        config = config_for(cfg)
        t0 = time.perf_counter()
        sim = simulate(cfg, config)
        p = plan(cfg, config)
        ratios = {k: p.peaks[k] / v for k, v in sim.peaks.items()}
        dev = max(ratios.values(), key=lambda r: abs(r - 1))
        worst = max(worst, abs(dev - 1))
        rows.append({"recipe": recipe, "micro_batch": mb, "completion": T, "simulated": sim.peaks, "planned": p.peaks,
                     "seconds": time.perf_counter() - t0})
        md.append(f"| {Path(recipe).stem} | {mb} | {T} | "
                  + " | ".join(f"{scale * sim.peaks[k]:.2f} / {scale * p.peaks[k]:.2f}" for k in PHASES) + f" | {dev:.3f} |")
        write(out, {"grid": rows}, "\n".join(md) + "\n")
    md += ["", f"Largest planner deviation from the simulation over the grid: {100 * worst:.1f} %.", ""]

    # the levers, added one at a time, at each recipe's own settings
    levers_rows = []
    md += [f"## Simulated: memory levers at each recipe's settings (whole-step peak, {unit} allocated)", "",
           "| levers on | " + " | ".join(Path(r).stem for r, _ in recipes) + " |", "|---|" + "---:|" * len(recipes)]
    for k in range(len(LEVERS) + 1):
        on = LEVERS[:k]
        cells = []
        for recipe, over in recipes:
            cfg = load_config(recipe, over)
            sim = simulate(cfg, config_for(cfg), without=LEVERS[k:])
            levers_rows.append({"recipe": recipe, "levers": list(on), "simulated": sim.peaks})
            worst_phase = max(sim.peaks, key=sim.peaks.get)
            cells.append(f"{scale * sim.peak:.2f} ({worst_phase})")
        md.append(f"| {' + '.join(on) if on else 'none (peft fp32 adapter, tower and layer inputs on the GPU)'} | "
                  + " | ".join(cells) + " |")
        write(out, {"grid": rows, "levers": levers_rows}, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


PHASES = ("vision", "rollout", "reference pass", "policy update", "optimizer step")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out", help="folder for memory.json and memory.md")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (with --simulate: the tiny model)")
    ap.add_argument("--simulate", action="store_true", help="fake tensors on the CPU instead of a GPU run")
    ap.add_argument("--completion", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--backend", default="hf")
    ap.add_argument("--kernels", default="triton")
    ap.add_argument("--no-ckpt", action="store_true")
    ap.add_argument("--quantization", default="none", choices=["none", "nf4"])
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit", "paged_adamw_8bit"])
    args = ap.parse_args()
    if args.simulate:
        return simulated(Path(args.out), args.smoke)
    if not torch.cuda.is_available():
        print("skipped: bench/memory.py needs a CUDA GPU (or --simulate)")
        return 0
    from PIL import Image
    from transformers import Qwen2VLForConditionalGeneration

    from lowmem_vt.config import LoraConfig, ModelConfig
    from lowmem_vt.grpo import LossCounts, group_advantages
    from lowmem_vt.inputs import PromptInputs, build_sequences, mrope_positions
    from lowmem_vt.kernels import fused_grpo_loss, token_logprobs
    from lowmem_vt.model import image_embeddings, load_model, sequence_hidden
    from lowmem_vt.rollout import SamplingParams, make_rollout
    from lowmem_vt.tiny import build_tiny_tokenizer, image_processor_config, qwen2_vl_2b_config

    dev = torch.device("cuda")
    with tempfile.TemporaryDirectory() as d:
        cfg = qwen2_vl_2b_config()
        with torch.device("cuda"):
            model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16)
        model.save_pretrained(d)
        del model
        build_tiny_tokenizer().save_pretrained(d)  # tokenizer only for decoding; ids come from the 2B vocab
        Path(d, "preprocessor_config.json").write_text(json.dumps(image_processor_config()))
        lm = load_model(ModelConfig(name_or_path=d, gradient_checkpointing=not args.no_ckpt, quantization=args.quantization),
                        LoraConfig(r=64, alpha=128), dev, min_pixels=3136, max_pixels=448 * 448)
    torch.cuda.synchronize()
    weights_gib = torch.cuda.memory_allocated() / 2**30

    # the prompt: vision_start, 256 image tokens, vision_end, 80 text tokens
    pv, grid = lm.image_processor(images=[Image.new("RGB", (448, 448), (120, 30, 200))], return_tensors="pt").values()
    ids = [cfg.vision_start_token_id] + [cfg.image_token_id] * 256 + [cfg.vision_end_token_id] + list(range(1000, 1080))
    ids = torch.tensor(ids)
    types = (ids == cfg.image_token_id).int()
    pos, nxt = mrope_positions(types, grid, 2)
    prompt = PromptInputs(ids, types, pos, pv.float(), grid.long(), nxt)
    G, T = 8, args.completion
    rows = []

    def phase(name, fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        rows.append((name, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30))
        return out

    from lowmem_vt.config import load_config
    from lowmem_vt.model import trainable_parameters
    from lowmem_vt.planner import plan
    from lowmem_vt.trainer import make_optimizer

    recipe = load_config("recipes/sat_lora.yaml", [
        f"model.quantization={args.quantization}", f"train.optimizer={args.optimizer}", f"train.micro_batch_size={args.micro_batch}",
        f"grpo.max_completion_length={args.completion}", f"model.gradient_checkpointing={str(not args.no_ckpt).lower()}",
        f"kernels={args.kernels}", f"rollout.backend={args.backend}", "train.prompts_per_step=1",
        "data.max_pixels=200704"])  # 448x448 -> 256 tokens
    params = trainable_parameters(lm.peft_model)
    opt = make_optimizer(params, recipe)
    for p in params:  # the steady state the planner describes: the optimizer state exists from a previous step
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)

    embeds = phase("vision (once per prompt)", lambda: image_embeddings(lm, [prompt.pixel_values], [prompt.image_grid_thw]))
    lm.hf_model.generation_config.suppress_tokens = [lm.eos_token_id]  # full-length completions
    ro = make_rollout(args.backend, lm)
    roll = phase(f"rollout ({args.backend}, {G}x{T})",
                 lambda: ro.generate([prompt], embeds, SamplingParams(G, T, 1.0, seeds=None)))
    B = roll.completion_ids.shape[0]
    mb = args.micro_batch
    slices = [slice(i, i + mb) for i in range(0, B, mb)]

    def reference():
        out = []
        with torch.no_grad(), lm.peft_model.disable_adapter():
            for s in slices:
                seqs = build_sequences([prompt], roll.prompt_rows[s], roll.completion_ids[s], roll.completion_mask[s], 0).to(dev)
                out.append(token_logprobs(sequence_hidden(lm, seqs, embeds), lm.lm_head_weight, roll.completion_ids[s].to(dev),
                                          1.0, args.kernels))
        return torch.cat(out)

    ref = phase("reference pass", reference)
    adv = group_advantages(torch.randn(B), G).to(dev)
    counts = LossCounts(B, float(roll.completion_mask.sum()), T)

    def update():
        for s in slices:
            seqs = build_sequences([prompt], roll.prompt_rows[s], roll.completion_ids[s], roll.completion_mask[s], 0).to(dev)
            loss, _, _ = fused_grpo_loss(sequence_hidden(lm, seqs, embeds), lm.lm_head_weight, roll.completion_ids[s].to(dev),
                                         roll.completion_mask[s].to(dev), adv[s], None, ref[s], beta=0.04, epsilon_low=0.2,
                                         epsilon_high=0.2, loss_type="grpo", counts=counts, backend=args.kernels)
            loss.backward()

    phase(f"policy update (micro-batch {mb})", update)

    phase(f"optimizer step ({args.optimizer})", opt.step)
    predicted = plan(recipe, cfg)
    planned = list(predicted.peaks.values())  # the same five phases, in the same order
    md = [f"## GPU-measured: {torch.cuda.get_device_name()}", "", f"`{' '.join(sys.argv)}`; weights + LoRA resident "
          f"{weights_gib:.2f} GiB", "", "| phase | time s | measured peak GiB allocated | planner GiB |", "|---|---:|---:|---:|"]
    md += [f"| {name} | {t:.2f} | {m:.2f} | {pl:.2f} |" for (name, t, m), pl in zip(rows, planned)]
    md += ["", f"Planner whole step + CUDA context: {predicted.peak:.2f} GiB", "", predicted.table()]
    write(Path(args.out), {"device": torch.cuda.get_device_name(), "args": vars(args),
                           "phases": [{"phase": n, "seconds": t, "peak_gib": m} for n, t, m in rows],
                           "planned": predicted.peaks}, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
