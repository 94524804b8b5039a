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

from .errors import UserError
from . import checkpoint as ckpt
from .config import ModelConfig, RecipeConfig, resolve_dtype
from .data import GENERATED_TASKS, peek_records
from .engine_memory import check_engine_memory
from .families import FAMILIES, REFUSED, UnknownFamily, family_for, known_labels
from .kernels.head import TRITON_BACKENDS, resolve_backend
from .model import resolve_device
from .reporting import ReporterUnavailable, check_reporters
from .tiny import parse_tiny_name

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class PreflightError(UserError, ValueError):
    """A run that cannot start; the message names where (file, key, record) and what to do."""


def check_recipe(cfg: RecipeConfig, *, check_model: bool = True, overwrite: bool = False, model_config=None):
    """All pre-load checks of a training recipe; raises PreflightError (or RunFolderError / DataError). Returns the
    model's config (``model_config`` when given: a model already loaded), or None with ``check_model`` off."""
    f = cfg.source_file
    device = check_device(cfg.train.device, f"{f}: key 'train.device'")
    try:
        backend = resolve_backend(cfg.kernels, device)
    except ValueError as exc:
        raise PreflightError(f"{f}: key 'kernels': {exc}") from None
    if device.type == "cuda":
        check_head_dtype(backend, resolve_dtype(cfg.model.dtype, "cuda"), torch.cuda.get_device_capability(device), f)
    _check_packages(cfg, device)
    ckpt.check_output_dir(cfg.log.output_dir, overwrite=overwrite)
    check_inputs_outside_run(cfg)
    check_data(cfg)
    config = model_config
    if check_model:
        config = check_model_source(cfg.model.name_or_path, f"{f}: key 'model.name_or_path'")
        check_lora_targets(config, cfg.lora.target_modules, f)
        check_rollout_backend(config, cfg.rollout.backend, f)
    if config is not None:
        check_lengths(cfg, config)
        check_lora_rank(cfg, config)
        if cfg.rollout.backend == "engine" and device.type == "cpu":
            # on a GPU the memory plan (planner.check_fits, which holds the engine's allocation) is checked
            check_engine_memory(config.text_config, cfg.model.dtype, cfg.train.prompts_per_step, cfg.grpo.max_prompt_length,
                                cfg.grpo.num_generations, cfg.grpo.max_completion_length, device,
                                f"{f}: key 'grpo.max_completion_length'",
                                shapes=family_for(config).decoder_linear_shapes(config.text_config))
    return config


def check_inputs_outside_run(cfg: RecipeConfig) -> None:
    """No input (the recipe file, a local dataset, its image folder, a local model) lies in the run folder, where the
    run writes (a recipe named recipe.yaml there would be overwritten by the run's record of it)."""
    out = Path(os.path.realpath(os.path.expanduser(cfg.log.output_dir)))
    inputs = {"the recipe": cfg.source_file, "data.path": cfg.data.path if cfg.data.source == "sat" else "",
              "data.image_dir": cfg.data.image_dir, "model.name_or_path": cfg.model.name_or_path.split(":", 1)[-1]}
    for what, path in inputs.items():
        if not path or path.startswith("<") or not Path(os.path.expanduser(path)).exists():
            continue
        real = Path(os.path.realpath(os.path.expanduser(path)))
        if real == out or out in real.parents:
            raise PreflightError(f"{cfg.source_file}: key 'log.output_dir': {cfg.log.output_dir} holds {what} ({path}); "
                                 "a run writes there, and an input is never written over: choose another log.output_dir")


def check_lengths(cfg: RecipeConfig, config) -> None:
    """A prompt and its completion fit the model's positions (beyond them it was never trained, and nothing bounds
    the cache a rollout grows)."""
    limit = getattr(config.text_config, "max_position_embeddings", None)
    g = cfg.grpo
    family = family_for(config)
    side = family.patch_size(config) * family.merge_size(config)
    least = -(-cfg.data.min_pixels // side**2)  # every image is resized to at least min_pixels
    d = cfg.data
    if d.source == "generated":  # every image has the same size: its token count is known
        tokens = family.image_tokens(config, d.generated_image_size, d.generated_image_size, d.min_pixels, d.max_pixels)
        if tokens >= g.max_prompt_length:
            raise PreflightError(f"{cfg.source_file}: key 'grpo.max_prompt_length': each generated {d.generated_image_size}x"
                                 f"{d.generated_image_size} image becomes {tokens} image tokens (data.min_pixels / max_pixels), "
                                 f"as many as grpo.max_prompt_length ({g.max_prompt_length}) allows a whole prompt; every prompt "
                                 "would be refused: raise it, or lower data.generated_image_size or data.max_pixels")
    if least >= g.max_prompt_length:
        raise PreflightError(f"{cfg.source_file}: key 'data.min_pixels': {cfg.data.min_pixels} pixels make at least {least} image "
                             f"tokens, as many as grpo.max_prompt_length ({g.max_prompt_length}) allows a whole prompt; every "
                             "prompt would be refused: lower data.min_pixels or raise grpo.max_prompt_length")
    if limit and g.max_prompt_length + g.max_completion_length > limit:
        raise PreflightError(f"{cfg.source_file}: key 'grpo.max_completion_length': max_prompt_length {g.max_prompt_length} + "
                             f"max_completion_length {g.max_completion_length} tokens exceed the model's {limit} positions "
                             "(max_position_embeddings); lower them")


def check_lora_rank(cfg: RecipeConfig, config) -> None:
    """lora.r is at most the smaller side of every adapted linear (a larger rank adds nothing and costs memory),
    the family's per-head linears aside (``QwenVLFamily.rank_exempt``)."""
    family = family_for(config)
    shapes = family.decoder_linear_shapes(config.text_config)
    sides = [min(shapes[t]) for t in cfg.lora.target_modules if t in shapes and t not in family.rank_exempt]
    if sides and cfg.lora.r > min(sides):
        raise PreflightError(f"{cfg.source_file}: key 'lora.r': {cfg.lora.r} exceeds the smallest side ({min(sides)}) of the "
                             "adapted layers; a LoRA rank is at most that (the paper's recipe uses 64)")


def check_resume(cfg: RecipeConfig, resume: str, config=None) -> Path:
    """``--resume`` against the run folder, the recipe and the base, before anything loads; returns the verified
    checkpoint. Raises RunFolderError / CheckpointError / PreflightError (one line each)."""
    ckpt.check_resume_source(resume, cfg.log.output_dir)
    path = ckpt.resolve_resume(resume, cfg.log.output_dir)
    check_resume_recipe(cfg, path)
    check_resume_base(cfg.model.name_or_path, path)
    if config is not None:
        check_adapter_fits(path / "adapter", config, f"{cfg.source_file}: key 'model.name_or_path'")
    return path


# what a resumed run may change: where it logs and how long it runs, the learning rate from here on (applied to
# the optimizer), and how it computes (device, kernels, backend, dtype, micro-batches: the same training, another
# speed or memory); where the base and the data lie (the base's identity is checked). Anything else (the data,
# the adapter's shape, GRPO, the optimizer, seeds) would make the checkpoint and the recipe disagree.
RESUMABLE = ("log.", "train.max_steps", "train.num_epochs", "train.learning_rate", "train.max_bad_steps", "train.device",
             "train.micro_batch_size", "kernels", "rollout.backend", "model.name_or_path", "model.attn_implementation",
             "model.gradient_checkpointing", "model.dtype", "data.path", "data.data_file", "data.image_dir", "data.on_error")


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def checkpoint_recipe(path: str | Path) -> dict:
    """The recipe a checkpoint recorded (``recipe.yaml``) as a mapping; CheckpointError when it is not one."""
    from .config import ConfigError, read_recipe_text, yaml_load

    import yaml

    f = Path(path) / "recipe.yaml"
    try:
        tree = yaml_load(read_recipe_text(f))
    except (ConfigError, ValueError, yaml.YAMLError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise ckpt.CheckpointError(f"{f} is not a readable recipe ({first}); use another checkpoint") from None
    if not isinstance(tree, dict):
        raise ckpt.CheckpointError(f"{f} is not a recipe (a {type(tree).__name__}, not a mapping of sections); use another checkpoint")
    return tree


def check_resume_recipe(cfg: RecipeConfig, path: Path) -> None:
    """PreflightError when the recipe changes a setting a resumed run must keep (see RESUMABLE)."""
    from .config import to_dict

    then, now = _flatten(checkpoint_recipe(path)), _flatten(to_dict(cfg))
    changed = [k for k in now if k in then and then[k] != now[k] and not k.startswith(RESUMABLE)]
    if changed:
        shown = "; ".join(f"{k} is {now[k]!r} here, {then[k]!r} in the checkpoint" for k in changed[:3])
        raise PreflightError(
            f"--resume {path}: {shown}{' (and more)' if len(changed) > 3 else ''}. A resumed run keeps the settings it was "
            "trained with (it may change log.*, train.max_steps / num_epochs / learning_rate, the device, kernels and "
            "rollout backend); drop the change, or start a new run in another log.output_dir"
        )


def other_base(name_or_path: str, path: str | Path) -> str | None:
    """What differs when ``name_or_path`` is not the base checkpoint ``path`` was trained on (its ``base.json``
    fingerprint: config and sampled weight blocks; the same model moved to another folder is the same base), else
    None. None also when either identity is unknown (a checkpoint older than base.json, a hub base not on disk yet)."""
    recorded = ckpt.checkpoint_base(path)
    current = ckpt.base_identity(name_or_path) if recorded else None
    if recorded and current and current["fingerprint"] != recorded["fingerprint"]:
        return (f"the checkpoint was trained on the base {recorded.get('name')!r}; {name_or_path!r} is another model "
                "(its config or weights differ)")
    return None


def check_resume_base(name_or_path: str, path: Path) -> None:
    """PreflightError when the base model differs from the one the checkpoint was trained on (``other_base``)."""
    problem = other_base(name_or_path, path)
    if problem:
        raise PreflightError(f"--resume {path}: {problem}: give the base it was trained on")


def check_checkpoint_base(checkpoint: str | Path, name_or_path: str, where: str, *, allow_other: bool) -> str | None:
    """eval and merge check the base as a resume does (``other_base``), before any weights load: PreflightError on a
    mismatch, unless ``allow_other`` (``--allow-other-base``); then the warning is returned, for the caller to log and
    the output to record. ``where``: what named the base (``--model``, or the checkpoint's recipe key)."""
    problem = other_base(name_or_path, checkpoint)
    if problem is None:
        return None
    if not allow_other:
        raise PreflightError(f"{where}: {problem}; adapting another base gives a wrong model. Give the base it was trained "
                             "on, or pass --allow-other-base if you mean it")
    return f"--allow-other-base: {problem}; the adapter was applied to it anyway"


def check_output_folder(out: str | Path, what: str, inputs: dict[str, Path], *, own: tuple[str, ...] = (),
                        inside_ok: tuple[str, ...] = ()) -> None:
    """An output folder is fresh: absent, or an empty folder (or one holding only the ``own`` files a previous
    run of the same command wrote); never a file, never an input (``inputs``: label -> path), never inside one
    (except those labelled in ``inside_ok``) and never holding one. Its nearest existing parent is writable.
    Raises PreflightError naming ``what`` (the option)."""
    p = Path(out)
    if str(out).strip() == "":
        raise PreflightError(f"{what} is empty; give a folder")
    if p.is_symlink() and not p.exists():
        raise PreflightError(f"{what} {p} is a symbolic link to nothing (dangling or looping); give a folder")
    if p.exists() and not p.is_dir():
        raise PreflightError(f"{what} {p} is a file; give a folder (new or empty)")
    real = Path(os.path.realpath(p))
    for label, path in inputs.items():
        src = Path(os.path.realpath(path))
        if real == src or src in real.parents and label not in inside_ok or real in src.parents:
            relation = "is" if real == src else "is inside" if src in real.parents else "holds"
            raise PreflightError(f"{what} {p} {relation} {label} ({path}): an input is never written over; give another folder")
    if p.is_dir():
        try:
            foreign = sorted(x.name for x in p.iterdir() if x.name not in own)
        except OSError as exc:
            raise PreflightError(f"{what} {p} cannot be read ({exc.strerror}); give another folder") from None
        if foreign:
            shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
            raise PreflightError(f"{what} {p} is not empty ({shown}); give a new or empty folder (nothing is overwritten)")
    existing = p
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"{what} {p}: {existing} is not a writable folder; give another folder")


def check_head_dtype(backend: str, dtype: str, capability: tuple[int, int], recipe_file: str) -> None:
    """A Triton loss head in bfloat16 needs a GPU of compute capability >= 8.0: its matmuls (torch.mm with an fp32
    output) have no bfloat16 kernel in cuBLAS below that and raise there, after the model loaded and a rollout ran."""
    if backend in TRITON_BACKENDS and dtype == "bfloat16" and tuple(capability) < (8, 0):
        cap = ".".join(str(c) for c in capability)
        raise PreflightError(
            f"{recipe_file}: key 'model.dtype': bfloat16 with the Triton loss head (kernels: {backend}) needs a GPU of "
            f"compute capability >= 8.0, this one has {cap}; set model.dtype=auto (float16 here, loss scaled) or "
            "kernels=torch"
        )


def check_device(name: str, where: str) -> torch.device:
    if where.startswith("--") and name == "cuda" and not torch.cuda.is_available():
        raise PreflightError(f"{where} cuda: no CUDA GPU is visible; use {where} cpu")
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
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:  # offline, a hub dataset must be in the cache: said now, not after the data loader starts
        try:
            cached = try_to_load_from_cache(d.path, d.data_file, repo_type="dataset")
        except Exception:  # noqa: BLE001 -- an id the hub library rejects is not cached either
            cached = None
        if not isinstance(cached, str):
            raise PreflightError(f"{f}: key 'data.path': {d.path!r} ({d.data_file}) is a hub dataset that is not in the cache, "
                                 "and HF_HUB_OFFLINE is set; download it once online, or point data.path at a local file")


def check_model_source(name_or_path: str, where: str):
    """The model's config (a transformers config of a known family), checked without loading weights.

    A local folder must hold config.json of a known family and weights; a name that looks like a path
    (not ``owner/name``, or whose first folder exists here) must exist; a hub id must be reachable or cached.
    """
    try:
        tiny = parse_tiny_name(name_or_path)
    except UnknownFamily as exc:
        raise PreflightError(f"{where}: {exc}") from None
    if tiny is not None:  # built on first use
        _check_tiny_target(name_or_path, tiny[1], tiny[2], where)
        return _config(name_or_path)
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
    if getattr(config, "model_type", None) in REFUSED:
        raise PreflightError(f"{where}: {name_or_path!r}: {REFUSED[config.model_type]}")
    if getattr(config, "model_type", None) not in FAMILIES:
        raise PreflightError(f"{where}: {name_or_path!r} is a {getattr(config, 'model_type', '?')!r} model; this trainer "
                             f"knows {known_labels()} ({', '.join(FAMILIES)})")
    return config


_LORA_KEY = re.compile(r"language_model\.layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.weight$")  # mixer or mlp


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
    try:
        handle = safe_open(str(weights), framework="pt")
    except Exception as exc:  # noqa: BLE001 -- safetensors raises its own and OS errors for a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PreflightError(f"{weights} cannot be read ({first[:160]}): the adapter file is damaged or truncated; "
                             "use another checkpoint") from None
    with handle as f:
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


def _check_tiny_target(name_or_path: str, base: bool, folder: str, where: str) -> None:
    """``tiny[-base][-<model_type>]:<dir>`` builds into ``<dir>``: a new or empty folder, or one it built before."""
    if not folder.strip():
        raise PreflightError(f"{where}: {name_or_path!r} names no folder for the tiny model; e.g. tiny:artifacts/tiny-qwen2vl")
    p = Path(os.path.expanduser(folder))
    built = ("pretraining.json", "config.json") if base else ("config.json", "tokenizer.json", "preprocessor_config.json")
    if p.exists() and not p.is_dir():
        raise PreflightError(f"{where}: {folder} is a file; the tiny model is built into a folder")
    if p.is_dir() and any(p.iterdir()) and not all((p / f).is_file() for f in built):
        raise PreflightError(f"{where}: {folder} holds other files; the tiny model is built only into a new or empty folder "
                             "(or one it was built into before)")


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
    if model_type in REFUSED:
        raise PreflightError(f"{where}: {cfg_file} says model_type {model_type!r}: {REFUSED[model_type]}")
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
    if backend == "hf":
        import transformers

        from .rollout.hf import hf_takes_features

        if not hf_takes_features(family, config):
            raise PreflightError(f"{recipe_file}: key 'rollout.backend': {family.label}'s DeepStack image features cannot be "
                                 "handed to HF generate before transformers 5.18 (this is "
                                 f"{transformers.__version__}); use rollout.backend=engine, or a newer transformers")
    if backend == "vllm" and not family.vllm_rollout:
        raise PreflightError(f"{recipe_file}: key 'rollout.backend': vllm is wired for Qwen2-VL only, not {family.label}; "
                             "use rollout.backend=engine or hf")
