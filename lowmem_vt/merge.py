"""``lowmem-vt merge``: fold a checkpoint's LoRA adapter into the base weights and write a plain Hugging Face
model folder (weights, config, generation config, tokenizer, image-processor config) that loads with
``transformers`` alone, no peft.

QLoRA checkpoints (recipe ``model.quantization: nf4``) are merged into the base loaded unquantized in the
recipe's 16-bit dtype: the weights the nf4 codes approximate. The merged model is therefore a bf16 model, not a
4-bit one; it differs from the QLoRA policy by the base's quantization error (quantize it again to serve in 4 bit).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from .config import LoraConfig, ModelConfig

log = logging.getLogger(__name__)


def checkpoint_configs(checkpoint: str | Path) -> tuple[ModelConfig, LoraConfig, dict]:
    """The model and LoRA sections of the recipe a checkpoint was trained with, and its data section (pixel budget)."""
    import yaml

    ckpt = Path(checkpoint)
    if (ckpt / "adapter_config.json").is_file() and (ckpt.parent / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{ckpt} is the adapter folder of a checkpoint; give the checkpoint folder ({ckpt.parent})")
    if not (ckpt / "adapter" / "adapter_config.json").is_file() or not (ckpt / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{ckpt} is not a checkpoint folder: expected adapter/adapter_config.json and recipe.yaml "
                                "(as lowmem-vt train writes them in <log.output_dir>/checkpoint-N)")
    adapter = ckpt / "adapter"
    try:
        json.loads((adapter / "adapter_config.json").read_text())["peft_type"]
    except (ValueError, KeyError, TypeError):
        raise FileNotFoundError(f"{adapter / 'adapter_config.json'} is not a peft adapter config (damaged?); "
                                "use another checkpoint") from None
    if not any((adapter / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(f"{adapter} has no adapter weights (adapter_model.safetensors); use another checkpoint")
    recipe = yaml.safe_load((ckpt / "recipe.yaml").read_text()) or {}
    try:
        return ModelConfig(**recipe.get("model", {})), LoraConfig(**recipe.get("lora", {})), recipe.get("data", {})
    except TypeError as exc:
        raise FileNotFoundError(f"{ckpt / 'recipe.yaml'}: not a recipe this version reads ({exc})") from exc


def merge_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, base: str | None = None, dtype: str | None = None,
                     device: str = "cpu") -> Path:
    """Merge ``checkpoint``'s adapter into its base (``base`` overrides the recipe's path) and save to ``out_dir``.

    The checkpoint, the adapter and the base are checked before anything is loaded: FileNotFoundError for a
    folder that is not a checkpoint (or whose adapter is damaged), preflight.PreflightError for the base.
    """
    import torch

    from .model import load_model
    from .preflight import check_adapter_fits, check_model_source
    from .tiny import resolve_model_path

    model_cfg, lora_cfg, data = checkpoint_configs(checkpoint)
    out = Path(out_dir)
    if (out / "adapter_config.json").is_file():
        raise FileExistsError(f"{out} holds a peft adapter; write the merged model to another folder")
    if base is not None:
        model_cfg.name_or_path = base
    # the base is a model folder of a known family with config and weights (or a reachable hub id) before anything loads
    where = "--model" if base is not None else f"{checkpoint}/recipe.yaml: key 'model.name_or_path'"
    check_adapter_fits(Path(checkpoint) / "adapter", check_model_source(model_cfg.name_or_path, where), where)
    model_cfg.name_or_path = resolve_model_path(model_cfg.name_or_path)
    if model_cfg.quantization == "nf4":
        log.info("QLoRA checkpoint: merging into the unquantized %s base", model_cfg.dtype)
        model_cfg.quantization = "none"
    if dtype is not None:
        model_cfg.dtype = dtype
    lm = load_model(model_cfg, lora_cfg, torch.device(device), min_pixels=data.get("min_pixels", 3136),
                    max_pixels=data.get("max_pixels", 401408), adapter_path=str(Path(checkpoint) / "adapter"), trainable=False)
    layers = sum(1 for name, _ in lm.peft_model.named_modules() if name.endswith(".lora_A"))
    merged = lm.peft_model.merge_and_unload()
    merged.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    # The image processor keeps the training pixel budget (data.min/max_pixels) as its default size.
    lm.image_processor.save_pretrained(out)
    log.info("merged %d LoRA layers of %s into %s -> %s", layers, checkpoint, model_cfg.name_or_path, out)
    return out


def cmd_merge(args) -> int:
    try:
        out = merge_checkpoint(args.checkpoint, args.out, base=args.model, dtype=args.dtype, device=args.device)
    except (FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .model import model_family

    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    human = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    print(f"merged model written to {out} ({human}); load it with "
          f"{model_family(str(out)).class_name}.from_pretrained({str(out)!r}) or lowmem-vt eval --model {out}")
    return 0


def register_cli(sub) -> None:
    """``lowmem-vt merge``: called by cli.build_parser."""
    p = sub.add_parser("merge", help="fold a checkpoint's LoRA adapter into the base: a plain transformers model folder")
    p.add_argument("--checkpoint", required=True, help="a training checkpoint (out/<run>/checkpoint-N)")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--model", default=None, help="the base model (hub id or folder); default: the checkpoint recipe's")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: the recipe's model.dtype")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to merge (cpu needs no GPU memory)")
    p.set_defaults(func=cmd_merge)
