"""Recipes: one YAML file holds a whole run; it is validated into typed dataclasses.

Unknown keys, wrong types and out-of-range values are errors that name the file and the dotted key,
raised before any model or dataset is loaded. ``key.sub=value`` overrides (from the command line) are
parsed as YAML scalars and validated the same way.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import re

import yaml


class RecipeLoader(yaml.SafeLoader):
    """YAML with YAML 1.2 numbers: ``1e-5`` is a float (YAML 1.1, PyYAML's default, reads it as a string)."""


RecipeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)


class ConfigError(ValueError):
    """A recipe problem, phrased for the user: where (file, key) and what is expected."""


@dataclass
class ModelConfig:
    name_or_path: str = "Qwen/Qwen2-VL-2B"  # hub id or local directory
    # auto: bfloat16 where the GPU has it (compute capability >= 8.0), float16 on older GPUs (the T4 of
    # Colab), bfloat16 on CPU (as the GPU recipes were written); resolved when the recipe is loaded
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = True
    quantization: Literal["none", "nf4"] = "none"  # nf4 = QLoRA (bitsandbytes, double quant, bf16 compute)
    freeze_vision: bool = True


@dataclass
class LoraConfig:
    r: int = 64
    alpha: int = 128
    dropout: float = 0.0
    # language-model linears only; the vision tower stays frozen
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class DataConfig:
    source: Literal["sat", "generated"] = "sat"
    path: str = "array/SAT"  # hub id, or a local parquet / JSON / JSONL file or folder of them
    data_file: str = "SAT_train.parquet"  # file inside the hub repo or folder
    image_dir: str = ""  # for local JSON records whose images are file names
    max_samples: int = 15000  # the paper: first 15,000 single-image rows
    shuffle_options: bool = True
    min_pixels: int = 3136
    max_pixels: int = 401408
    on_error: Literal["skip", "raise"] = "skip"
    # source: generated -- SAT-style questions with rendered images, written in SAT's schema
    generated_samples: int = 256
    generated_image_size: int = 112
    generated_tasks: list[str] = field(default_factory=lambda: ["left_right", "above_below", "closer", "count"])
    seed: int = 0


@dataclass
class RewardsConfig:
    funcs: list[str] = field(default_factory=lambda: ["format", "accuracy"])
    accuracy_mode: Literal["exact", "normalized"] = "exact"  # exact = the paper's rule
    reflection_words: list[str] = field(
        default_factory=lambda: ["wait", "re-check", "recheck", "verify", "however", "re-examine", "double-check", "but"]
    )


@dataclass
class GRPOConfig:
    num_generations: int = 8
    temperature: float = 1.0
    max_prompt_length: int = 1024
    max_completion_length: int = 700
    beta: float = 0.04
    epsilon: float = 0.2  # clip range; inactive with num_iterations 1 (ratio is exactly 1)
    epsilon_high: float | None = None  # defaults to epsilon
    loss_type: Literal["grpo", "dr_grpo", "bnpo"] = "grpo"
    scale_rewards: bool = True
    num_iterations: int = 1  # policy updates per rollout; > 1 uses the clipped ratio


@dataclass
class RolloutConfig:
    # auto: the self-check (lowmem_vt/selfcheck) measures the engine against hf on this device before step 1
    # and takes the faster one that passes; hf: the reference; engine / vllm: as named, checked first
    backend: Literal["auto", "hf", "engine", "vllm"] = "hf"
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # with engine / vllm: sampler_logprob_diff above 0.05 for this many steps in a row switches the run to hf
    # (a warning and the metric rollout_switched_to_hf); 0 = never
    fallback_after: int = 3


@dataclass
class TrainConfig:
    prompts_per_step: int = 8  # the paper: 8 prompts x 8 completions per optimizer step
    micro_batch_size: int = 8  # completions per forward/backward
    num_epochs: float = 2.0
    max_steps: int = -1  # > 0 overrides num_epochs
    learning_rate: float = 1e-5
    lr_scheduler: Literal["linear", "constant", "cosine"] = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops


@dataclass
class LogConfig:
    output_dir: str = "out/sat_lora"
    save_steps: int = 50
    sample_every: int = 10  # print and log one completion every N steps
    keep_checkpoints: int = 3
    plot: bool = True
    progress_bar: bool = True
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)  # [] = metrics.jsonl and plots only
    wandb_project: str = "lowmem-vt"  # the environment's WANDB_PROJECT, when set, wins


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    kernels: Literal["auto", "triton", "triton_fused_linear", "triton_streaming", "torch"] = "auto"
    # a Triton head's gradient re-checked against the torch reference on (part of) one micro-batch every this
    # many steps (a warning and a switch to torch if it disagrees); 0 = never
    kernels_recheck_every: int = 50
    # on: every fast path is measured against its reference before step 1 (lowmem_vt/selfcheck; verdicts
    # cached per machine); an explicitly named backend that fails stops the run (status 2). warn: it runs
    # anyway, with a warning. off: nothing is checked (a warning; auto then means the references torch / hf)
    selfcheck: Literal["on", "warn", "off"] = "on"
    source_file: str = field(default="<defaults>", metadata={"internal": True})

    @property
    def completions_per_step(self) -> int:
        return self.train.prompts_per_step * self.grpo.num_generations


# --------------------------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, where: str, file: str) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{file}: key '{where}': got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: key '{where}': expected a mapping of settings, got {value!r}")
        return _build(tp, value, where, file)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where, file)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]", file) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _build(cls: type, values: dict, prefix: str, file: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{file}: unknown key '{where}'; known keys here: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(value, hints[key], where, file)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.learning_rate=1e-5", "grpo.beta=0"]`` -> [(key, value)], values parsed as YAML scalars."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml_load(raw) if raw != "" else ""
        out.append((key.strip(), value))
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe, apply ``key.sub=value`` overrides, validate. Raises ConfigError naming file and key."""
    file = str(path) if path is not None else "<defaults>"
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {file}")
        try:
            loaded = yaml_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the recipe must be a mapping of sections (model:, data:, ...)")
        tree = loaded
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    if isinstance(tree.get("selfcheck"), bool):  # YAML 1.1 reads a bare on / off as true / false
        tree["selfcheck"] = "on" if tree["selfcheck"] else "off"
    cfg = _build(RecipeConfig, tree, "", file)
    cfg.source_file = file
    cfg.model.dtype = resolve_dtype(cfg.model.dtype, cfg.train.device)
    validate(cfg)
    return cfg


def resolve_dtype(name: str, device: str) -> str:
    """``model.dtype`` without "auto": bfloat16 on a GPU of compute capability >= 8.0 and on CPU, float16
    on older GPUs (no bfloat16 arithmetic: the T4). device: ``train.device`` ("auto", "cpu", "cuda")."""
    if name != "auto":
        return name
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return "bfloat16"
    return "bfloat16" if torch.cuda.get_device_capability()[0] >= 8 else "float16"


def _looks_local(path: str) -> bool:
    """A hub id is exactly ``owner/name``; anything else is a local path."""
    return path.startswith((".", "/", "~")) or path.endswith((".parquet", ".json", ".jsonl")) or path.count("/") != 1


def validate(cfg: RecipeConfig) -> None:
    """Range and consistency checks; each error names the file, the key and what is expected."""
    f = cfg.source_file

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{f}: key '{key}': {msg}")

    g, t = cfg.grpo, cfg.train
    need(g.num_generations >= 2, "grpo.num_generations", f"must be >= 2 (group advantages need a group), got {g.num_generations}")
    need(g.temperature > 0, "grpo.temperature", f"must be > 0, got {g.temperature}")
    need(g.max_completion_length >= 1, "grpo.max_completion_length", "must be >= 1")
    need(g.max_prompt_length >= 1, "grpo.max_prompt_length", "must be >= 1")
    need(g.beta >= 0, "grpo.beta", f"must be >= 0, got {g.beta}")
    need(0 <= g.epsilon < 1, "grpo.epsilon", f"must be in [0, 1), got {g.epsilon}")
    need(g.epsilon_high is None or g.epsilon_high >= 0, "grpo.epsilon_high", "must be >= 0")
    need(g.num_iterations >= 1, "grpo.num_iterations", "must be >= 1")
    need(t.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1")
    need(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    per_step = cfg.completions_per_step
    need(
        per_step % t.micro_batch_size == 0,
        "train.micro_batch_size",
        f"must divide the completions per step (prompts_per_step {t.prompts_per_step} x num_generations "
        f"{g.num_generations} = {per_step}), got {t.micro_batch_size}",
    )
    need(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate}")
    need(t.num_epochs > 0 or t.max_steps > 0, "train.num_epochs", "must be > 0 (or set train.max_steps)")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 turns clipping off)")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
    need(cfg.lora.r >= 1, "lora.r", f"must be >= 1, got {cfg.lora.r}")
    need(cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    need(len(cfg.lora.target_modules) > 0, "lora.target_modules", "must name at least one module")
    d = cfg.data
    need(d.min_pixels > 0 and d.max_pixels >= d.min_pixels, "data.max_pixels", f"must be >= data.min_pixels ({d.min_pixels})")
    need(d.max_samples >= 1, "data.max_samples", "must be >= 1")
    if d.source == "generated":
        need(d.generated_samples >= t.prompts_per_step, "data.generated_samples", f"must be >= train.prompts_per_step ({t.prompts_per_step})")
    elif _looks_local(d.path):
        need(os.path.exists(os.path.expanduser(d.path)), "data.path", f"local dataset path {d.path!r} does not exist")
    known_rewards = ("format", "accuracy")
    for i, name in enumerate(cfg.rewards.funcs):
        need(name in known_rewards, f"rewards.funcs[{i}]", f"unknown reward {name!r}; known: {', '.join(known_rewards)}")
    need(len(cfg.rewards.funcs) > 0, "rewards.funcs", "must name at least one reward")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    need(cfg.rollout.top_k >= 0, "rollout.top_k", "must be >= 0")
    need(cfg.rollout.fallback_after >= 0, "rollout.fallback_after", "must be >= 0 (0: never switch)")
    need(cfg.kernels_recheck_every >= 0, "kernels_recheck_every", "must be >= 0 (0: never)")
    need(cfg.log.save_steps >= 1, "log.save_steps", "must be >= 1")
    need(cfg.log.keep_checkpoints >= 1, "log.keep_checkpoints", "must be >= 1")
    if cfg.model.quantization == "nf4":
        need(cfg.model.dtype != "float32", "model.dtype", "QLoRA computes in bfloat16/float16, not float32")


def to_dict(cfg: RecipeConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("source_file", None)
    return d
