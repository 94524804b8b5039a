"""Pre-flight: everything about a run that can be checked before loading the model, checked before it.

The trainer calls ``check_recipe`` first thing; ``eval`` and ``merge`` call ``check_model_source`` and, for a
checkpoint, ``check_adapter_fits``. Each failure is one
``PreflightError`` line naming the recipe file and key (or the file / record) and what to do, so the CLI
can print it instead of a traceback after minutes of loading.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import ModelConfig, RecipeConfig
from .data import GENERATED_TASKS, peek_records
from .families import FAMILIES, UnknownFamily, family_for, known_labels
from .kernels import resolve_backend
from .model import resolve_device
from .reporting import ReporterUnavailable, check_reporters
from .tiny import parse_tiny_name

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class PreflightError(ValueError):
    """A run that cannot start; the message names where (file, key, record) and what to do."""


def check_recipe(cfg: RecipeConfig, *, check_model: bool = True) -> None:
    """All pre-load checks of a training recipe; raises PreflightError (or RunFolderError / DataError)."""
    f = cfg.source_file
    device = check_device(cfg.train.device, f"{f}: key 'train.device'")
    try:
        resolve_backend(cfg.kernels, device)
    except ValueError as exc:
        raise PreflightError(f"{f}: key 'kernels': {exc}") from None
    _check_packages(cfg, device)
    ckpt.check_output_dir(cfg.log.output_dir)
    check_data(cfg)
    if check_model:
        config = check_model_source(cfg.model.name_or_path, f"{f}: key 'model.name_or_path'")
        check_lora_targets(config, cfg.lora.target_modules, f)
        check_rollout_backend(config, cfg.rollout.backend, f)


def check_device(name: str, where: str) -> torch.device:
    try:
        return resolve_device(name)
    except RuntimeError as exc:
        raise PreflightError(f"{where}: {exc}") from None


def _check_packages(cfg: RecipeConfig, device: torch.device) -> None:
    f = cfg.source_file
    needs = []
    if cfg.rollout.backend == "vllm":
        needs.append(("rollout.backend", "vllm", "vllm", "or use rollout.backend=engine (in-process, no extra package)"))
        if device.type != "cuda":
            raise PreflightError(f"{f}: key 'rollout.backend': vllm needs a CUDA GPU; use rollout.backend=engine or hf on {device}")
    if cfg.model.quantization == "nf4":
        needs.append(("model.quantization", "bitsandbytes", "bitsandbytes", "or set model.quantization=none"))
    if cfg.train.optimizer != "adamw":
        needs.append(("train.optimizer", "bitsandbytes", "bitsandbytes", "or use train.optimizer=adamw"))
    if cfg.model.attn_implementation == "flash_attention_2":
        needs.append(("model.attn_implementation", "flash_attn", "flash-attn", "or use model.attn_implementation=sdpa"))
    for key, module, package, alternative in needs:
        if importlib.util.find_spec(module) is None:
            raise PreflightError(f"{f}: key '{key}': needs the {package} package, which is not installed; "
                                 f"pip install {package}, {alternative}")
    try:
        check_reporters(cfg.log.report_to, f"{f}: key 'log.report_to'")
    except ReporterUnavailable as exc:
        raise PreflightError(str(exc)) from None


def check_data(cfg: RecipeConfig) -> None:
    """Generated tasks exist; a local dataset has SAT's columns and its first records are usable."""
    d, f = cfg.data, cfg.source_file
    if d.source == "generated":
        for i, task in enumerate(d.generated_tasks):
            if task not in GENERATED_TASKS:
                raise PreflightError(f"{f}: key 'data.generated_tasks[{i}]': unknown task {task!r}; known: {', '.join(GENERATED_TASKS)}")
        return
    if Path(os.path.expanduser(d.path)).exists():
        peek_records(d)  # raises DataError naming the file, the column or the record


def check_model_source(name_or_path: str, where: str):
    """The model's config (a transformers config of a known family), checked without loading weights.

    A local folder must hold config.json of a known family and weights; a name that looks like a path
    (not ``owner/name``, or whose first folder exists here) must exist; a hub id must be reachable or cached.
    """
    try:
        if parse_tiny_name(name_or_path) is not None:  # built on first use
            return _config(name_or_path)
    except UnknownFamily as exc:
        raise PreflightError(f"{where}: {exc}") from None
    local = Path(os.path.expanduser(name_or_path))
    if local.exists():
        _check_model_folder(local, where)
    elif not _HUB_ID.fullmatch(name_or_path) or Path(name_or_path.split("/")[0]).is_dir():
        raise PreflightError(
            f"{where}: {name_or_path!r} looks like a local path but does not exist (from {os.getcwd()}); fix the path, "
            "or give a hub id written owner/name"
        )
    try:
        config = _config(name_or_path)
    except Exception as exc:  # noqa: BLE001 -- hub/network/cache errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PreflightError(
            f"{where}: could not read the config of hub model {name_or_path!r} ({type(exc).__name__}: {first[:160]}); "
            "check the id and the network (or HF_HUB_OFFLINE), or point it at a local model folder"
        ) from None
    if getattr(config, "model_type", None) not in FAMILIES:
        raise PreflightError(f"{where}: {name_or_path!r} is a {getattr(config, 'model_type', '?')!r} model; this trainer "
                             f"knows {known_labels()} ({', '.join(FAMILIES)})")
    return config


_LORA_KEY = re.compile(r"language_model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def check_adapter_fits(adapter: str | Path, config, where: str) -> None:
    """PreflightError unless every LoRA matrix in ``adapter``'s safetensors fits the base model ``config``: a layer
    the base has, and the input (A) / output (B) size of the linear it adapts. Read from the file's header, no
    weights loaded: an adapter trained on another base (another size or family) would otherwise fail inside
    peft only after the whole base has loaded. ``where``: what named the base (for the message)."""
    from safetensors import safe_open

    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a .bin adapter: peft checks it when it loads
    t = config.text_config
    shapes = family_for(config).decoder_linear_shapes(t)
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            m = _LORA_KEY.search(key)
            if not m or m[2] not in shapes:
                continue
            layer, name, matrix = int(m[1]), m[2], m[3]
            if layer >= t.num_hidden_layers:
                raise PreflightError(f"{where}: the base has {t.num_hidden_layers} decoder layers but the adapter "
                                     f"{weights} adapts layer {layer}: it was trained on another base; give that one")
            shape = list(f.get_slice(key).get_shape())
            n_in, n_out = shapes[name]
            got, want = (shape[1], n_in) if matrix == "A" else (shape[0], n_out)
            if got != want:
                side = "inputs" if matrix == "A" else "outputs"
                raise PreflightError(f"{where}: the base's {name} has {want} {side} but the adapter's layer {layer} {name} "
                                     f"lora_{matrix} has shape {shape} ({weights}): it was trained on another base; give that one")


def _config(name_or_path: str):
    from .planner import config_for  # the same config the memory plan uses (cache, 2B fallback, hub)

    return config_for(RecipeConfig(model=ModelConfig(name_or_path=name_or_path)))


def _check_model_folder(folder: Path, where: str) -> None:
    if not folder.is_dir():
        raise PreflightError(f"{where}: {folder} is a file; give the model's folder (with config.json and weights)")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file() and (folder / "adapter_config.json").is_file():
        raise PreflightError(f"{where}: {folder} holds a LoRA adapter (adapter_config.json), not a model; "
                             "give the base model's folder (with config.json and weights)")
    if not cfg_file.is_file():
        raise PreflightError(
            f"{where}: {folder} has no config.json (without it transformers would build a default-sized model); "
            "copy the model's config.json into it, or point to the complete model folder"
        )
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (ValueError, AttributeError):
        raise PreflightError(f"{where}: {cfg_file} is not a valid JSON object; restore the model's config.json") from None
    if model_type not in FAMILIES:
        raise PreflightError(f"{where}: {cfg_file} says model_type {model_type!r}; this trainer knows {known_labels()} "
                             f"({', '.join(map(repr, FAMILIES))})")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise PreflightError(f"{where}: {folder} has no weights (*.safetensors or *.bin); copy the model's weight files into it")


def check_lora_targets(config, target_modules: list[str], recipe_file: str) -> None:
    """Each LoRA target matches at least one linear of the language model (checked on the meta device)."""
    family = family_for(config)
    with torch.device("meta"):
        model = family.model_class()(config)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    known = sorted({n.rsplit(".", 1)[-1] for n in linears if re.fullmatch(family.lora_target_regex([r"\w+"]), n)})
    for i, target in enumerate(target_modules):
        if not any(re.fullmatch(family.lora_target_regex([target]), n) for n in linears):
            raise PreflightError(f"{recipe_file}: key 'lora.target_modules[{i}]': {target!r} matches no linear layer of the "
                                 f"language model; known: {', '.join(known)}")


def check_rollout_backend(config, backend: str, recipe_file: str) -> None:
    """The rollout backend handles the model's family (the engine and hf handle every family here; vllm is wired
    for Qwen2-VL only); one line naming the backends that do, where it does not."""
    family = family_for(config)
    if backend == "vllm" and not family.vllm_rollout:
        raise PreflightError(f"{recipe_file}: key 'rollout.backend': vllm is wired for Qwen2-VL only, not {family.label}; "
                             "use rollout.backend=engine or hf")
