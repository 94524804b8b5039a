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

MERGE_RECORD = "lowmem_vt_merge.json"  # in the merged model's folder: what was merged into what


def checkpoint_configs(checkpoint: str | Path) -> tuple[ModelConfig, LoraConfig, dict]:
    """The model and LoRA sections of the recipe a checkpoint was trained with, and its data section (pixel budget).
    The checkpoint is verified (sizes and checksums of COMPLETE) when it has the marker. Raises FileNotFoundError
    (not a checkpoint, or a damaged one) naming the file."""
    from .checkpoint import DONE_FILE, CheckpointError, verify_checkpoint
    from .config import ConfigError, _coerce

    ckpt = Path(checkpoint)
    if (ckpt / "adapter_config.json").is_file() and (ckpt.parent / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{ckpt} is the adapter folder of a checkpoint; give the checkpoint folder ({ckpt.parent})")
    if not (ckpt / "adapter" / "adapter_config.json").is_file() or not (ckpt / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{ckpt} is not a checkpoint folder: expected adapter/adapter_config.json and recipe.yaml "
                                "(as lowmem-vt train writes them in <log.output_dir>/checkpoint-N)")
    if (ckpt / DONE_FILE).is_file():
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as exc:
            raise FileNotFoundError(f"{exc}; use another checkpoint") from None
    adapter = ckpt / "adapter"
    try:
        json.loads((adapter / "adapter_config.json").read_text())["peft_type"]
    except (ValueError, KeyError, TypeError):
        raise FileNotFoundError(f"{adapter / 'adapter_config.json'} is not a peft adapter config (damaged?); "
                                "use another checkpoint") from None
    if not any((adapter / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(f"{adapter} has no adapter weights (adapter_model.safetensors); use another checkpoint")
    from .preflight import checkpoint_recipe

    try:
        recipe = checkpoint_recipe(ckpt)
    except CheckpointError as exc:
        raise FileNotFoundError(str(exc)) from None
    where = f"{ckpt / 'recipe.yaml'}"
    try:
        model = _coerce(recipe.get("model") or {}, ModelConfig, "model", where)
        lora = _coerce(recipe.get("lora") or {}, LoraConfig, "lora", where)
    except ConfigError as exc:
        raise FileNotFoundError(f"{exc} (not a recipe this version reads); use another checkpoint") from None
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    pixels = {k: data[k] for k in ("min_pixels", "max_pixels") if isinstance(data.get(k), int) and not isinstance(data.get(k), bool)
              and 1 <= data[k] <= 1 << 28}
    return model, lora, pixels


def merge_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, base: str | None = None, dtype: str | None = None,
                     device: str = "cpu", allow_other_base: bool = False) -> Path:
    """Merge ``checkpoint``'s adapter into its base (``base`` overrides the recipe's path) and save to ``out_dir``.

    The checkpoint, the adapter, the base and the output folder are checked before anything is loaded:
    FileNotFoundError for a folder that is not a checkpoint (or whose adapter is damaged), preflight.PreflightError
    for the base (not the one the checkpoint was trained on, unless ``allow_other_base``), the device or the output
    (the base, the checkpoint, or a folder that is not empty: refused). The model is written into a temporary folder
    beside ``out_dir`` and renamed: a failed merge leaves nothing. MERGE_RECORD in it names the checkpoint and the
    base, and the warning when another base was allowed.
    """
    import os
    import shutil

    import torch

    from .model import load_model
    from .preflight import check_adapter_fits, check_checkpoint_base, check_device, check_model_source, check_output_folder
    from .tiny import resolve_model_path

    model_cfg, lora_cfg, data = checkpoint_configs(checkpoint)
    if base is not None:
        model_cfg.name_or_path = base
    out = Path(out_dir)
    from .checkpoint import model_folder

    inputs = {"the checkpoint": Path(checkpoint)}
    base_folder = model_folder(model_cfg.name_or_path)
    if base_folder is not None:
        inputs["the base model"] = base_folder
    check_output_folder(out, "--out", inputs)
    dev = check_device(device, "--device")
    # the base is a model folder of a known family with config and weights (or a reachable hub id) before anything loads
    where = "--model" if base is not None else f"{checkpoint}/recipe.yaml: key 'model.name_or_path'"
    config = check_model_source(model_cfg.name_or_path, where)
    other_base = check_checkpoint_base(checkpoint, model_cfg.name_or_path, where, allow_other=allow_other_base)
    if other_base:
        log.warning(other_base)
    record = {"checkpoint": str(checkpoint), "base": model_cfg.name_or_path, **({"warning": other_base} if other_base else {})}
    check_adapter_fits(Path(checkpoint) / "adapter", config, where)
    model_cfg.name_or_path = resolve_model_path(model_cfg.name_or_path)
    if model_cfg.quantization == "nf4":
        log.info("QLoRA checkpoint: merging into the unquantized %s base", model_cfg.dtype)
        model_cfg.quantization = "none"
    if dtype is not None:
        model_cfg.dtype = dtype
    lm = load_model(model_cfg, lora_cfg, dev if dev.type == "cuda" else torch.device("cpu"), min_pixels=data.get("min_pixels", 3136),
                    max_pixels=data.get("max_pixels", 401408), adapter_path=str(Path(checkpoint) / "adapter"), trainable=False)
    layers = sum(1 for name, _ in lm.peft_model.named_modules() if name.endswith(".lora_A"))
    merged = lm.peft_model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-merge-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        # The image processor keeps the training pixel budget (data.min/max_pixels) as its default size.
        lm.image_processor.save_pretrained(tmp)
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if out.is_dir():
            out.rmdir()  # checked empty above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged %d LoRA layers of %s into %s -> %s", layers, checkpoint, model_cfg.name_or_path, out)
    return out


def cmd_merge(args) -> int:
    try:
        out = merge_checkpoint(args.checkpoint, args.out, base=args.model, dtype=args.dtype, device=args.device,
                               allow_other_base=args.allow_other_base)
    except (FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing the merged model (the temporary folder is gone again)
        from .checkpoint import _write_problem

        print(f"error: the merged model could not be written: {_write_problem(exc, Path(args.out).parent)}", file=sys.stderr)
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
    p.add_argument("--allow-other-base", action="store_true",
                   help="merge the adapter into a base other than the one it was trained on (its base.json); refused "
                        f"without this, and recorded in the merged model's {MERGE_RECORD} with it")
    p.set_defaults(func=cmd_merge)
