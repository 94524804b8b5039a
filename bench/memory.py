"""One recipe step of sat_lora.yaml's shapes on the real Qwen2-VL-2B architecture (random weights):
peak memory and time of each phase (vision, rollout, reference pass, policy update, optimizer step),
for bf16 LoRA or QLoRA, next to the planner's prediction. GPU only.

    python bench/memory.py [--quantization none|nf4] [--optimizer adamw|adamw_8bit] [--completion 1024]
                           [--micro-batch 8] [--backend hf|engine] [--kernels triton|torch]

Shapes as ../shared/ANCHORS.md: one prompt = vision_start + 256 image tokens (448x448) + vision_end + 80 text
tokens; G = 8 completions; LoRA r 64 on q/k/v/o/gate/up/down; beta 0.04. EOS is never sampled (it is
masked out of the logits) so every completion has the full length.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--completion", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--backend", default="hf")
    ap.add_argument("--kernels", default="triton")
    ap.add_argument("--no-ckpt", action="store_true")
    ap.add_argument("--quantization", default="none", choices=["none", "nf4"])
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit", "paged_adamw_8bit"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("skipped: bench/memory.py needs a CUDA GPU")
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
        import json
        from pathlib import Path

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

    from lowmem_vt.config import load_config
    from lowmem_vt.model import trainable_parameters
    from lowmem_vt.planner import plan
    from lowmem_vt.trainer import make_optimizer

    recipe = load_config("recipes/sat_lora.yaml", [
        f"model.quantization={args.quantization}", f"train.optimizer={args.optimizer}", f"train.micro_batch_size={mb}",
        f"grpo.max_completion_length={T}", f"model.gradient_checkpointing={str(not args.no_ckpt).lower()}",
        f"kernels={args.kernels}", f"rollout.backend={args.backend}", "data.max_pixels=200704"])  # 448x448 -> 256 tokens
    opt = make_optimizer(trainable_parameters(lm.peft_model), recipe)
    phase(f"optimizer step ({args.optimizer})", opt.step)
    predicted = plan(recipe, cfg)
    print(f"device: {torch.cuda.get_device_name()}; {args}; weights + LoRA resident: {weights_gib:.2f} GiB")
    print("| phase | time s | measured peak GiB |\n|---|---:|---:|")
    for name, t, m in rows:
        print(f"| {name} | {t:.2f} | {m:.2f} |")
    print(f"\nplanner prediction (max over phases, includes {0.5} GiB CUDA context that max_memory_allocated does not "
          f"count): {predicted.peak:.2f} GiB\n{predicted.table()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
