"""Recipes: one YAML file holds a whole run; it is validated into typed dataclasses.

Unknown keys, wrong types and out-of-range values are errors that name the file and the dotted key,
raised before any model or dataset is loaded. ``key.sub=value`` overrides (from the command line) are
parsed as YAML values and validated the same way; ``section={key: value}`` changes only the keys it names.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import re

import yaml

from .errors import UserError, what_is_at


class ConfigError(UserError, ValueError):
    """A recipe problem, phrased for the user: where (file, key) and what is expected."""


# A recipe is a page of settings: a file over this size, or YAML expanding (through anchors and aliases) to more
# values or deeper nesting than these, is refused before it is built (a 2 KB "billion laughs" expands to GBs).
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_VALUES = 10_000
MAX_YAML_DEPTH = 32


class RecipeLoader(yaml.SafeLoader):
    """YAML with YAML 1.2 numbers (``1e-5`` is a float; YAML 1.1, PyYAML's default, reads it as a string) and
    without duplicate keys (PyYAML silently keeps the last of two ``train:`` sections)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # SafeLoader reports an unhashable key itself
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {_short(key)} appears a second time (first on line {seen[key] + 1}): the second would "
                        "silently replace the first; merge them",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


RecipeLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _check_expansion(root) -> None:
    """ConfigError when the node graph, with every alias expanded, holds more than MAX_YAML_VALUES values or is
    deeper than MAX_YAML_DEPTH (or refers to itself); counted on the composed nodes, before anything is built."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, 0, False)]
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            on_path.discard(key)
            sizes[key] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_VALUES + 1)
            if sizes[key] > MAX_YAML_VALUES:
                raise ConfigError(f"expands to more than {MAX_YAML_VALUES} values (anchors and aliases); a recipe holds "
                                  "about a hundred settings: write them out")
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ConfigError("refers to itself (an alias inside its own anchor); write the settings out")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"is nested deeper than {MAX_YAML_DEPTH} levels; a recipe is sections of settings")
        on_path.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)


def yaml_load(text: str) -> Any:
    """One YAML document, read with RecipeLoader after its expanded size is checked. Raises yaml.YAMLError for
    bad YAML (duplicate keys included) and ConfigError (without a file name) for a document too large."""
    loader = RecipeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"is nested deeper than {MAX_YAML_DEPTH} levels; a recipe is sections of settings") from None
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: ``line L, column C: problem``."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        return " ".join(str(exc).split())[:300]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(exc, "context", None)
    return where + (f"{context}, {problem}" if context else problem)


def _not_text(s: str) -> bool:
    """A NUL, or a byte that was not UTF-8 (Python keeps those of argv as lone surrogates)."""
    return "\x00" in s or any("\ud800" <= ch <= "\udfff" for ch in s)


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a value in a message, never a megabyte of it)."""
    if isinstance(value, (dict, list)) and len(value) > 8:
        return f"<a {type(value).__name__} of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    # questions with up to this many images are kept (1 = the paper's filter); their images come first in the
    # prompt, in the record's order, each encoded once per step
    max_images_per_question: int = 1
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
    # DAPO's soft overlong punishment (2503.14476, eq. 13): a completion longer than max_completion_length - buffer
    # tokens earns up to -overlong_penalty, linearly over the buffer; 0 = off
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0


@dataclass
class GRPOConfig:
    num_generations: int = 8
    temperature: float = 1.0
    max_prompt_length: int = 1024
    max_completion_length: int = 700
    beta: float = 0.04
    epsilon: float = 0.2  # clip range; inactive with num_iterations 1 (ratio is exactly 1)
    epsilon_high: float | None = None  # defaults to epsilon
    # the policy loss: grpo (the paper), dr_grpo (Dr. GRPO, arXiv 2503.20783), bnpo, dapo (DAPO, 2503.14476), cispo
    # (MiniMax-M1, 2506.13585), sapo (SAPO, 2511.20347), luspo (LUSPO, 2602.05261), vespo (VESPO, 2602.10693); the
    # table in README.md and lowmem_vt/grpo.py. Semantics TRL 1.16's loss_type of the same name.
    loss_type: Literal["grpo", "dr_grpo", "bnpo", "dapo", "cispo", "sapo", "luspo", "vespo"] = "grpo"
    # std that divides the centred rewards: group (the paper; true), batch (PPO Lite, 2508.08221), none (Dr. GRPO; false)
    scale_rewards: Literal["group", "batch", "none"] | bool = "group"
    num_iterations: int = 1  # policy updates per rollout; > 1 uses the clipped ratio
    # token: one importance ratio per token; sequence: exp(mean log-ratio of the completion) (GSPO, 2507.18071)
    importance_sampling_level: Literal["token", "sequence"] = "token"
    delta: float | None = None  # two-sided clip: the ratio capped at delta (INTELLECT-2, 2505.07291); > 1 + epsilon_high
    sapo_temperature_pos: float = 1.0  # SAPO's gate temperature for positive advantages
    sapo_temperature_neg: float = 1.05  # ... for the others
    vespo_k_pos: float = 2.0  # VESPO's Gamma shape k for advantages >= 0
    vespo_lambda_pos: float = 3.0  # ... and its rate lambda
    vespo_k_neg: float = 3.0  # ... for negative advantages
    vespo_lambda_neg: float = 2.0
    mask_truncated_completions: bool = False  # completions without an EOS leave the loss (DAPO)
    top_entropy_quantile: float = 1.0  # train only on this top share of tokens by entropy (2506.01939; 0.2 there)
    off_policy_mask_threshold: float | None = None  # drop negative-advantage completions this far off-policy (DeepSeek-V3.2)
    bias_corrected_kl: bool = False  # k3 times the importance ratio (DeepSeek-V3.2; TRL's use_bias_correction_kl)
    # sampler-mismatch importance sampling from the rollout backend's log-probs (TRL's vllm_importance_sampling_*):
    # auto = none with hf (the sampler is the policy), token_truncate with engine; none with vllm (no tempered log-probs)
    sampler_correction: Literal["auto", "none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "auto"
    sampler_correction_clip_min: float | None = None
    sampler_correction_clip_max: float | None = 3.0
    # DAPO's dynamic sampling: groups whose G rewards are all equal are dropped and the step refilled from the next
    # prompts, in more rollout rounds of prompts_per_step prompts (never a bigger batch), at most this many extra
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3


@dataclass
class RolloutConfig:
    # auto: the self-check (lowmem_vt/selfcheck) measures the engine against hf on this device before step 1
    # and takes the faster one that passes; hf: the reference; engine / vllm: as named, checked first
    backend: Literal["auto", "hf", "engine", "vllm"] = "hf"
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # with engine / vllm: sampler_logprob_diff above 0.05 (or sampler_logprob_diff_max above the dtype's per-token
    # bound, selfcheck/rollout.py LOGPROB_MAX_BOUND) for this many steps in a row switches the run to hf
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


# ints beyond this are typos (no count, size or seed of a run comes near); numbers must be finite
MAX_INT = 2**53


def _coerce(value: Any, tp: Any, where: str, file: str) -> Any:
    origin = typing.get_origin(tp)

    def bad() -> ConfigError:  # built only when raised: repr of a huge value costs (a YAML alias bomb)
        return ConfigError(f"{file}: key '{where}': got {_short(value)} ({type(value).__name__}), expected {_type_name(tp)}")

    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty section (``train:`` with nothing under it)
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: key '{where}': expected a mapping of settings (key: value lines), got {_short(value)}")
        return _build(tp, value, where, file)
    if origin is Literal:
        if not isinstance(value, (str, int, float, bool, type(None))) or value not in typing.get_args(tp):
            raise bad()
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where, file)
            except ConfigError:
                continue
        raise bad()
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]", file) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise bad()
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        if abs(value) > MAX_INT:
            raise ConfigError(f"{file}: key '{where}': {_short(value)} is out of range (at most {MAX_INT:.0e} in size)")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise ConfigError(f"{file}: key '{where}': {_short(value)} is out of range (at most {MAX_INT:.0e} in size)")
        if not math.isfinite(value):
            raise ConfigError(f"{file}: key '{where}': got {value}; expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        if _not_text(value):
            raise ConfigError(f"{file}: key '{where}': {_short(value)} is not valid text (a NUL or a byte that is not UTF-8)")
        return value
    raise bad()


def _build(cls: type, values: dict, prefix: str, file: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{file}: unknown key {_short(where)}; known keys here: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(value, hints[key], where, file)
    return cls(**kwargs)


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _field_type(dotted: str) -> Any:
    """The schema's type at a dotted key (a section's dataclass, or a setting's type); None for an unknown key."""
    tp: Any = RecipeConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        fields = {f.name for f in dataclasses.fields(tp) if not f.metadata.get("internal")}
        if part not in fields:
            return None
        tp = typing.get_type_hints(tp)[part]
    return tp


def _merge(node: dict, key: str, value: Any, where: str) -> None:
    """``node[key] = value``, except that a mapping given for a section changes only the keys it names, at any
    depth (the section's other keys keep their values). Dicts on the way are copied, never changed in place
    (a YAML alias may share one between two places)."""
    if not dataclasses.is_dataclass(_field_type(where)):
        node[key] = value  # a setting (or an unknown key, which building the recipe reports)
        return
    if not isinstance(value, dict):
        raise ConfigError(f"override '{where}': '{where}' is a section, and {_short(value)} is not a mapping of its keys; "
                          f"change keys with {where}.key=value or {where}={{key: value, ...}} (the others keep their values)")
    current = node.get(key)
    if current is not None and not isinstance(current, dict):
        return  # the recipe holds a value where the section is: building the recipe reports it
    merged = dict(current or {})
    for k, v in value.items():
        _merge(merged, k, v, f"{where}.{k}")
    node[key] = merged


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        if node.get(p) is None:  # absent, or an empty section
            node[p] = {}
        nxt = node[p]
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
        node[p] = nxt = dict(nxt)
        node = nxt
    _merge(node, parts[-1], value, dotted)


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """The recipe's mapping with ``key.sub=value`` / ``section={key: value}`` overrides applied, in order: each changes
    the keys it names and nothing else (``tree`` is not changed). Raises ConfigError naming the override."""
    out = dict(tree)
    for key, value in parse_overrides(overrides):
        _set_dotted(out, key, value)
    return out


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.learning_rate=1e-5", "grpo.beta=0"]`` -> [(key, value)], values parsed as YAML (a scalar, a flow
    list like ``[q_proj, v_proj]``, or a flow mapping like ``{max_steps: 1}`` for a section). Raises ConfigError naming
    the override."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {_short(item)}: expected key.sub=value (e.g. train.learning_rate=1e-5)")
        if _not_text(item):
            raise ConfigError(f"override {_short(item)}: is not UTF-8 text (or holds a NUL); retype it")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not _KEY.fullmatch(key):
            raise ConfigError(f"override {_short(item)}: {_short(key)} is not a key; expected key.sub=value (e.g. train.max_steps=10)")
        if len(raw) > 10_000:
            raise ConfigError(f"override '{key}': the value is {len(raw)} characters long; a setting is one line")
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            if "\t" in raw:  # YAML takes a tab only inside quotes; the value itself is fine
                raise ConfigError(f"override '{key}': the value {_short(raw)} holds a tab character, which a value takes only "
                                  f"inside quotes: remove it (a tab in a path or a name is usually a paste slip), or quote the "
                                  f"value ({key}='\"...\"')") from None
            raise ConfigError(f"override '{key}': {_short(raw)} is not a valid value ({yaml_problem(exc)}); quote text that "
                              "starts with [ { : # & * ! | > ' \" % @ or `") from None
        except ConfigError as exc:
            raise ConfigError(f"override '{key}': the value {exc}") from None
        out.append((key, value))
    return out


def read_recipe_text(path: str | os.PathLike) -> str:
    """The text of a recipe file: at most MAX_RECIPE_BYTES, UTF-8 (a UTF-8 byte-order mark is allowed).
    Raises ConfigError naming the file."""
    file = str(path)
    p = Path(path)
    if not file.strip():
        raise ConfigError("no recipe file given (an empty path); e.g. recipes/sat_lora.yaml")
    if not p.is_file():
        what = what_is_at(p)
        if what == "does not exist":
            raise ConfigError(f"recipe file not found: {file}")
        raise ConfigError(f"recipe file {file} {what}; give a recipe file, e.g. recipes/sat_lora.yaml")
    try:
        size = p.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise ConfigError(f"{file}: {size} bytes; a recipe is a page of settings (at most {MAX_RECIPE_BYTES} bytes): "
                              "is this the right file?")
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{file}: is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe, apply ``key.sub=value`` overrides, validate. Raises ConfigError naming file and key."""
    file = str(path) if path is not None else "<defaults>"
    tree: dict = {}
    if path is not None:
        text = read_recipe_text(path)
        try:
            loaded = yaml_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {yaml_problem(exc)}") from None
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: the recipe must be a mapping of sections (model:, data:, ...), got {type(loaded).__name__}")
        tree = loaded
    tree = apply_overrides(tree, overrides or [])
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


# Ranges of the numbers a recipe may hold, beyond which a setting is a typo or cannot train (an infinite or
# overflowing value, a learning rate that sends the weights to infinity in one step, a temperature that flattens
# every distribution): refused before anything loads.
SEED_RANGE = (0, 2**32 - 1)  # numpy's seeds
MAX_COMPLETIONS_PER_STEP = 1 << 16
MAX_GENERATED_SAMPLES = 100_000
MAX_GENERATED_IMAGE_SIZE = 2048
MAX_GENERATED_BYTES = 8 << 30  # the generated images are held decoded in memory (RGB)
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def validate(cfg: RecipeConfig) -> None:
    """Range and consistency checks; each error names the file, the key and what is expected."""
    f = cfg.source_file

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{f}: key '{key}': {msg}")

    def within(value, lo, hi, key: str, note: str = "") -> None:
        show = (lambda x: str(x)) if isinstance(value, int) else (lambda x: f"{x:g}")
        need(lo <= value <= hi, key, f"must be in [{show(lo)}, {show(hi)}]{note}, got {show(value)}")

    g, t = cfg.grpo, cfg.train
    need(cfg.data.max_images_per_question >= 1, "data.max_images_per_question", "must be >= 1 (1: single-image questions)")
    need(g.num_generations >= 2, "grpo.num_generations", f"must be >= 2 (group advantages need a group), got {g.num_generations}")
    within(g.temperature, 0.01, 100.0, "grpo.temperature", " (sampling divides the logits by it)")
    need(g.max_completion_length >= 1, "grpo.max_completion_length", "must be >= 1")
    need(g.max_prompt_length >= 1, "grpo.max_prompt_length", "must be >= 1")
    within(g.beta, 0.0, 100.0, "grpo.beta")
    need(0 <= g.epsilon < 1, "grpo.epsilon", f"must be in [0, 1), got {g.epsilon}")
    need(g.epsilon_high is None or 0 <= g.epsilon_high <= 10, "grpo.epsilon_high", f"must be in [0, 10], got {g.epsilon_high}")
    within(g.num_iterations, 1, 64, "grpo.num_iterations")
    need(g.delta is None or g.delta > 1 + (g.epsilon if g.epsilon_high is None else g.epsilon_high), "grpo.delta",
         f"must be > 1 + epsilon_high (it caps the ratio above the clip range), got {g.delta}")
    for key in ("sapo_temperature_pos", "sapo_temperature_neg"):
        need(getattr(g, key) > 0, f"grpo.{key}", f"must be > 0, got {getattr(g, key)}")
    for key in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
        need(getattr(g, key) >= 0, f"grpo.{key}", f"must be >= 0, got {getattr(g, key)}")
    within(g.top_entropy_quantile, 0.0, 1.0, "grpo.top_entropy_quantile", " (1 keeps every token)")
    need(g.off_policy_mask_threshold is None or g.off_policy_mask_threshold >= 0, "grpo.off_policy_mask_threshold",
         f"must be >= 0 (a KL threshold, e.g. 0.5), got {g.off_policy_mask_threshold}")
    lo, hi = g.sampler_correction_clip_min, g.sampler_correction_clip_max
    need(lo is None or lo >= 0, "grpo.sampler_correction_clip_min", f"must be >= 0, got {lo}")
    need(hi is None or hi > (lo or 0), "grpo.sampler_correction_clip_max", f"must be > clip_min ({lo or 0}), got {hi}")
    need(not (g.loss_type == "vespo" and g.sampler_correction.startswith("sequence")), "grpo.sampler_correction",
         "vespo folds a token correction into its sequence weight: use token_truncate or token_mask (or none)")
    need(not (g.sampler_correction not in ("auto", "none") and cfg.rollout.backend == "vllm"), "grpo.sampler_correction",
         "rollout.backend vllm reports no tempered log-probs to correct with; use none (or auto)")
    within(g.dynamic_sampling_max_rounds, 0, 64, "grpo.dynamic_sampling_max_rounds", " extra rollout rounds")
    need(cfg.rewards.overlong_buffer >= 0, "rewards.overlong_buffer", "must be >= 0 (0 = off)")
    need(cfg.rewards.overlong_buffer < g.max_completion_length, "rewards.overlong_buffer",
         f"must be < grpo.max_completion_length ({g.max_completion_length}), got {cfg.rewards.overlong_buffer}")
    need(cfg.rewards.overlong_penalty >= 0, "rewards.overlong_penalty", "must be >= 0")
    need(t.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1")
    need(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    per_step = cfg.completions_per_step
    need(per_step <= MAX_COMPLETIONS_PER_STEP, "grpo.num_generations",
         f"prompts_per_step {t.prompts_per_step} x num_generations {g.num_generations} = {per_step} completions per step; "
         f"at most {MAX_COMPLETIONS_PER_STEP}")
    need(
        per_step % t.micro_batch_size == 0,
        "train.micro_batch_size",
        f"must divide the completions per step (prompts_per_step {t.prompts_per_step} x num_generations "
        f"{g.num_generations} = {per_step}), got {t.micro_batch_size}",
    )
    need(0 < t.learning_rate <= 1, "train.learning_rate",
         f"must be in (0, 1] (LoRA learns at 1e-6 .. 1e-2; larger sends the weights to infinity), got {t.learning_rate:g}")
    need(t.max_steps > 0 or 0 < t.num_epochs <= 1e6, "train.num_epochs",
         f"must be in (0, 1e6] (or set train.max_steps), got {t.num_epochs:g}")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 turns clipping off)")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    within(t.weight_decay, 0.0, 1.0, "train.weight_decay")
    need(0 <= t.adam_beta1 < 1, "train.adam_beta1", f"must be in [0, 1), got {t.adam_beta1:g}")
    need(0 <= t.adam_beta2 < 1, "train.adam_beta2", f"must be in [0, 1), got {t.adam_beta2:g}")
    need(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
    within(t.seed, *SEED_RANGE, "train.seed")
    need(cfg.lora.r >= 1, "lora.r", f"must be >= 1, got {cfg.lora.r}")
    within(cfg.lora.alpha, 1, 1 << 16, "lora.alpha")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    need(len(cfg.lora.target_modules) > 0, "lora.target_modules", "must name at least one module")
    for i, name in enumerate(cfg.lora.target_modules):
        need(bool(_MODULE_NAME.fullmatch(name)), f"lora.target_modules[{i}]", f"{_short(name)} is not a module name (e.g. q_proj)")
    d = cfg.data
    need(d.min_pixels >= 1, "data.min_pixels", f"must be >= 1, got {d.min_pixels}")
    need(d.min_pixels <= d.max_pixels <= 1 << 28, "data.max_pixels",
         f"must be in [data.min_pixels ({d.min_pixels}), {1 << 28}], got {d.max_pixels}")
    need(d.max_samples >= 1, "data.max_samples", "must be >= 1")
    within(d.seed, *SEED_RANGE, "data.seed")
    if d.source == "generated":
        need(d.generated_samples >= t.prompts_per_step, "data.generated_samples", f"must be >= train.prompts_per_step ({t.prompts_per_step})")
        need(d.generated_samples <= MAX_GENERATED_SAMPLES, "data.generated_samples", f"must be <= {MAX_GENERATED_SAMPLES}, got {d.generated_samples}")
        within(d.generated_image_size, 28, MAX_GENERATED_IMAGE_SIZE, "data.generated_image_size", " pixels")
        need(d.generated_image_size**2 <= 16 * d.max_pixels, "data.generated_image_size",
             f"{d.generated_image_size}x{d.generated_image_size} images are over 16 x data.max_pixels ({d.max_pixels}): every "
             "one would be skipped; generate smaller images or raise data.max_pixels")
        held = d.generated_samples * d.generated_image_size**2 * 3
        need(held <= MAX_GENERATED_BYTES, "data.generated_samples",
             f"{d.generated_samples} images of {d.generated_image_size}x{d.generated_image_size} would hold {held / 2**30:.1f} GiB "
             f"in memory (at most {MAX_GENERATED_BYTES >> 30}); generate fewer or smaller images")
    else:
        need(d.path.strip() != "", "data.path", "is empty; give a hub id (owner/name) or a local file or folder")
        need(d.data_file.strip() != "" or os.path.isfile(os.path.expanduser(d.path)), "data.data_file",
             "is empty; name the file inside data.path (e.g. SAT_train.parquet)")
        if _looks_local(d.path):
            need(os.path.exists(os.path.expanduser(d.path)), "data.path", f"local dataset path {d.path!r} does not exist")
    known_rewards = ("format", "accuracy")
    for i, name in enumerate(cfg.rewards.funcs):
        need(name in known_rewards, f"rewards.funcs[{i}]", f"unknown reward {_short(name)}; known: {', '.join(known_rewards)}")
    need(len(cfg.rewards.funcs) > 0, "rewards.funcs", "must name at least one reward")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {cfg.rollout.top_p:g}")
    need(cfg.rollout.top_k >= 0, "rollout.top_k", "must be >= 0 (0 = off)")
    need(cfg.model.name_or_path.strip() != "", "model.name_or_path", "is empty; give a hub id (owner/name) or a model folder")
    need(cfg.log.output_dir.strip() != "", "log.output_dir",
         "is empty (the run would be written into the current folder); give a folder for the run, e.g. out/my_run")
    need(cfg.rollout.fallback_after >= 0, "rollout.fallback_after", "must be >= 0 (0: never switch)")
    need(cfg.kernels_recheck_every >= 0, "kernels_recheck_every", "must be >= 0 (0: never)")
    need(cfg.log.save_steps >= 1, "log.save_steps", "must be >= 1")
    need(cfg.log.sample_every >= 0, "log.sample_every", "must be >= 0 (0 = never)")
    need(cfg.log.keep_checkpoints >= 1, "log.keep_checkpoints", "must be >= 1")
    if cfg.model.quantization == "nf4":
        need(cfg.model.dtype != "float32", "model.dtype", "QLoRA computes in bfloat16/float16, not float32")


def to_dict(cfg: RecipeConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("source_file", None)
    return d
