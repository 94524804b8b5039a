"""Our whole GRPO step beside TRL's GRPOTrainer at the same shapes, in one process on one GPU.

    python bench/vs_trl.py --out DIR [--completion 1024] [--prompts 1] [--steps 2] [--backend engine] [--smoke]

Both sides train the same model folder: the real Qwen2-VL-2B architecture (lowmem_vt.families.qwen2_vl.qwen2_vl_2b_config)
with random bf16 weights, saved once with the project's offline word-level tokenizer (its special-token ids
written into the config; the architecture and the 151,936-row head are the 2B model's), on the same generated
SAT-style records (448x448 images = 256 image tokens, the R1-Zero prompt). Shapes: ``--prompts`` prompts x
G = 8 completions x ``--completion`` tokens, micro-batch 8, LoRA r 64 / alpha 128 on q/k/v/o/gate/up/down,
gradient checkpointing, beta 0.04, loss_type grpo, AdamW, lr 1e-5. ``--completion`` is lowered by the GPU
check to fit its budget, the same for both sides.

Ours: ``Trainer.step()`` on recipes/sat_lora.yaml with those overrides; its own step time and
``torch.cuda.max_memory_allocated`` (reset at the start of each step). TRL 1.16: ``GRPOTrainer`` with a peft
LoRA config, HF generate (no vLLM), a callback timing each optimizer step and its peak the same way. The
first step of each side includes warm-up (cuBLAS, graph capture, allocator); the table reports every step.
Ours runs first and is freed before TRL loads; the memory still allocated then is reported.

``--smoke``: the tiny model on CPU, a few tokens. TRL's Qwen2-VL processor needs torchvision; without it (or
without trl) the TRL side is recorded as skipped, with the reason, and our side still runs.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import report

ROOT = Path(__file__).resolve().parent.parent
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# TRL renders prompts through the processor's chat template: the image placeholder, then the text, as ours
CHAT_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write vs_trl.json / vs_trl.md here")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few tokens")
    p.add_argument("--completion", type=int, default=1024, help="max_completion_length, both sides")
    p.add_argument("--prompts", type=int, default=1, help="prompts per step (G = 8 completions each)")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per side (the first includes warm-up)")
    p.add_argument("--backend", default="engine", choices=["hf", "engine"], help="our rollout backend")
    p.add_argument("--image-side", type=int, default=448, help="pixels; 448 -> 256 image tokens")
    p.add_argument("--liger", action="store_true", help="TRL with use_liger_kernel=True")
    p.add_argument("--skip", nargs="*", default=[], choices=["ours", "trl"])
    args = p.parse_args(argv)
    if args.smoke:
        args.completion, args.generations, args.image_side = min(args.completion, 4), 4, 56
    return args


def micro_batch(args: argparse.Namespace) -> int:
    """Completions per forward/backward: 8, as the anchors, or all of them when fewer (smoke)."""
    return min(8, args.prompts * args.generations)


def trl_missing() -> str | None:
    """Why TRL's side cannot run here (every missing piece, in one line), or None. The imports are tried, not looked
    up: a carried ``datasets`` whose own dependencies (pandas, pyarrow, xxhash, ...) are absent is found but
    does not import, and then neither do TRL and ``transformers.trainer``."""
    import importlib

    problems = []
    for module, role in (("torchvision", "TRL builds Qwen2VLProcessor, which transformers 5 builds only with torchvision"),
                         ("datasets", "TRL imports it (make gpu-wheels carries it, not its pandas / pyarrow)"),
                         ("trl", "make gpu-wheels carries it"),
                         ("transformers.trainer", "GRPOTrainer is a transformers Trainer")):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 -- ImportError, or whatever a half-installed package raises
            missing = getattr(exc, "name", None)
            what = f"needs {missing}, not installed" if missing and missing != module else f"{type(exc).__name__}: {exc}"[:120]
            problems.append(f"{module} does not import ({what}; {role})")
            if module == "datasets":
                break  # trl and transformers.trainer then fail for the same reason
    return "; ".join(problems) or None


def build_model_dir(path: Path, smoke: bool, side: int) -> Path:
    """The model folder both sides load: tokenizer, image-processor config and random weights."""
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    from lowmem_vt.families.qwen2_vl import SPECIAL_TOKENS, Qwen2VL, qwen2_vl_2b_config
    from lowmem_vt.tiny import build_tiny_model, build_tiny_tokenizer

    if smoke:
        return build_tiny_model(path)
    tok = build_tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = qwen2_vl_2b_config()
    cfg.image_token_id, cfg.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    cfg.vision_start_token_id, cfg.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    end = ids["<|endoftext|>"]
    cfg.text_config.bos_token_id = cfg.text_config.eos_token_id = cfg.text_config.pad_token_id = end
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=end, eos_token_id=end, pad_token_id=end)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    tok.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(Qwen2VL().image_processor_config(3136, side * side)))
    return path


def recipe(args: argparse.Namespace, model_dir: Path, run_dir: Path):
    from lowmem_vt.config import load_config

    over = [f"model.name_or_path={model_dir}", "model.attn_implementation=sdpa", "data.source=generated",
            f"data.generated_samples={args.prompts * args.steps}", f"data.generated_image_size={args.image_side}",
            "data.min_pixels=3136", f"data.max_pixels={args.image_side ** 2}", f"grpo.num_generations={args.generations}",
            f"grpo.max_completion_length={args.completion}", "grpo.loss_type=grpo", "grpo.beta=0.04",
            f"train.prompts_per_step={args.prompts}", f"train.micro_batch_size={micro_batch(args)}", f"train.max_steps={args.steps}",
            "train.optimizer=adamw", "train.learning_rate=1e-5", f"rollout.backend={args.backend}",
            f"log.output_dir={run_dir}", "log.progress_bar=false", "log.plot=false", "log.save_steps=1000000",
            "log.sample_every=1000000"]
    if args.smoke:
        over += ["model.dtype=float32", "train.device=cpu", "kernels=torch", "lora.r=8", "lora.alpha=16"]
    return load_config(ROOT / "recipes" / "sat_lora.yaml", over)


def ours(args: argparse.Namespace, model_dir: Path, tmp: Path) -> list[dict]:
    from lowmem_vt.trainer import Trainer

    trainer = Trainer(recipe(args, model_dir, tmp / "ours"))
    steps = []
    for i in range(args.steps):
        if report.fault():  # the GPU check's --fault: our step crashing must fail the stage
            raise RuntimeError("deliberate fault (LOWMEM_BENCH_FAULT=1)")
        m = trainer.step()
        # the rollout's log-probs against the trainer's (bf16 on the GPU: bench/rollout.py's bound), a finite loss
        if not (math.isfinite(m["loss"]) and m["sampler_logprob_diff"] < 0.01 and m["sampler_logprob_diff_max"] < 0.1):
            raise RuntimeError(f"step {i + 1}: loss {m['loss']}, sampler/trainer log-prob diff mean "
                               f"{m['sampler_logprob_diff']:.3g} (bound 0.01), max {m['sampler_logprob_diff_max']:.3g} (bound 0.1)")
        steps.append({"step": i + 1, "s": round(m["step_time_s"], 3), "peak_gib": m["peak_gpu_mem_gib"],
                      "rollout_s": round(m["rollout_s"], 3), "completion_tokens_mean": m["completion_length_mean"],
                      # the rollout's log-probs against the trainer's, before the update (bf16 on the GPU)
                      "sampler_logprob_diff": m["sampler_logprob_diff"], "sampler_logprob_diff_max": m["sampler_logprob_diff_max"]})
        print(f"ours step {i + 1}: {json.dumps(steps[-1])}", flush=True)
    del trainer
    return steps


def trl_processor(model_dir: Path, side: int):
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHAT_TEMPLATE
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=3136, max_pixels=side * side), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def trl_dataset(args: argparse.Namespace):
    """The records our side trains on (generate_sat_records with the recipe's seed), in TRL's VLM schema."""
    from datasets import Dataset
    from PIL import Image

    from lowmem_vt.data import R1_ZERO_TEMPLATE, generate_sat_records, sat_question

    rows = []
    for rec in generate_sat_records(args.prompts * args.steps, size=args.image_side, seed=0):
        text = R1_ZERO_TEMPLATE.format(question=sat_question(rec["question"], rec["answers"]))
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                     "image": Image.open(io.BytesIO(rec["image_bytes"][0])).convert("RGB")})
    return Dataset.from_list(rows)


def trl_steps(args: argparse.Namespace, model_dir: Path, tmp: Path, steps: list[dict], on_step) -> list[dict]:
    """TRL's steps, appended to ``steps`` as they end (``on_step`` saves them: a run cut off keeps them)."""
    from peft import LoraConfig
    from transformers import Qwen2VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cuda = not args.smoke

    class Meter(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.t = time.perf_counter()

        def on_step_end(self, _args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            steps.append({"step": state.global_step, "s": round(time.perf_counter() - self.t, 3),
                          "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None})
            print(f"trl step {state.global_step}: {json.dumps(steps[-1])}", flush=True)
            on_step()

        def on_log(self, _args, state, control, logs=None, **kw):
            if steps and logs and "completions/mean_length" in logs:
                steps[-1]["completion_tokens_mean"] = float(logs["completions/mean_length"])  # TRL logs strings
                on_step()

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                            attn_implementation="sdpa", device_map="cuda" if cuda else "cpu")
    lora_r = 64 if cuda else 8
    config = GRPOConfig(
        output_dir=str(tmp / "trl"), per_device_train_batch_size=micro_batch(args),
        gradient_accumulation_steps=args.prompts * args.generations // micro_batch(args),
        num_generations=args.generations, max_completion_length=args.completion, gradient_checkpointing=True, bf16=cuda,
        use_cpu=not cuda, beta=0.04, loss_type="grpo", learning_rate=1e-5, max_steps=args.steps, logging_steps=1,
        report_to="none", temperature=1.0, save_strategy="no", use_liger_kernel=args.liger, use_vllm=False,
        dataloader_num_workers=0, seed=42,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=lambda completions, **kw: [float(i % 2) for i in range(len(completions))], args=config,
        train_dataset=trl_dataset(args), processing_class=trl_processor(model_dir, args.image_side),
        peft_config=LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=LORA_TARGETS), callbacks=[Meter()],
    )
    trainer.train()
    return steps


def markdown(res: dict) -> str:
    sh = res["shapes"]
    lines = [f"{res['device']}; {sh['prompts']} prompt(s) x {sh['generations']} completions x {sh['completion']} tokens, "
             f"{sh['image_tokens']} image tokens, micro-batch {min(8, sh['prompts'] * sh['generations'])}, LoRA r {sh['lora_r']}, "
             f"grad checkpointing; ours: rollout backend "
             f"{sh['backend']}", ""]
    rows = []
    for side in ("ours", "trl"):
        r = res[side]
        if isinstance(r, dict):
            rows.append([side, "", r.get("skipped") or r.get("error"), "", "", "", ""])  # a row as wide as the header
            continue
        for s in r or []:
            rows.append([side, s["step"], s["s"], s.get("peak_gib"), s.get("completion_tokens_mean"),
                         s.get("sampler_logprob_diff"), s.get("sampler_logprob_diff_max")])
    lines.append(report.table(["side", "step", "s", "peak GiB", "completion tokens (mean)", "sampler log-prob diff (mean)",
                               "(max)"], rows))
    if res.get("speedup") is not None:
        lines += ["", f"last step: TRL / ours = {res['speedup']:.1f}x time"]
    if res.get("allocated_before_trl_gib") is not None:
        lines += [f"still allocated when TRL started (should be ~0): {res['allocated_before_trl_gib']:.2f} GiB"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        return report.skip(args.out, "vs_trl", "needs a CUDA GPU (--smoke runs it on CPU at tiny sizes)")
    res = {"device": torch.cuda.get_device_name() if not args.smoke else "cpu (smoke)",
           "shapes": {"prompts": args.prompts, "generations": args.generations, "completion": args.completion,
                      "image_tokens": (args.image_side // 28) ** 2, "backend": args.backend, "liger": args.liger,
                      "lora_r": 8 if args.smoke else 64},
           "ours": None, "trl": None}

    def save() -> None:
        report.write(args.out, "vs_trl", res, markdown(res))

    with tempfile.TemporaryDirectory(prefix="vs_trl_") as d:
        tmp = Path(d)
        t = time.perf_counter()
        model_dir = build_model_dir(tmp / "model", args.smoke, args.image_side)
        res["model_build_s"] = round(time.perf_counter() - t, 1)
        if "ours" in args.skip:
            res["ours"] = {"skipped": "--skip ours"}
        else:
            try:
                res["ours"] = ours(args, model_dir, tmp)
            except Exception as exc:  # noqa: BLE001 - recorded; TRL's side still runs, and the script then fails
                res["ours"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                traceback.print_exc()
        save()
        gc.collect()
        if not args.smoke:
            torch.cuda.empty_cache()
            res["allocated_before_trl_gib"] = torch.cuda.memory_allocated() / 2**30
        why = "--skip trl" if "trl" in args.skip else trl_missing()
        if why:
            res["trl"] = {"skipped": why}
            res["skipped"] = f"TRL side: {why}"  # the comparison did not happen; our side's figures are kept above
        else:
            res["trl"] = []
            trl_steps(args, model_dir, tmp, res["trl"], save)
            if isinstance(res["ours"], list) and res["ours"] and res["trl"]:
                res["speedup"] = res["trl"][-1]["s"] / res["ours"][-1]["s"]
        save()
    print(markdown(res))
    return 1 if "error" in res["ours"] else 0


if __name__ == "__main__":
    sys.exit(main())
