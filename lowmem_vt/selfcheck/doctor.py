"""``lowmem-vt doctor [RECIPE]``: the environment and the self-check, standalone, as one markdown block.

The environment: the GPU (name, compute capability, memory; bf16 in hardware from the capability, since
``torch.cuda.is_bf16_supported()`` also says yes on a T4, which emulates it), the versions of torch, CUDA,
triton, transformers, peft, bitsandbytes, flash-attn and vllm, and what Triton needs to build its launchers: a C
compiler, ``Python.h`` and libcuda. Then the checks: with a recipe, exactly what a run of it would check
(its model, data, dtype and backends; the model is loaded), measured afresh; without one, the loss heads at
Qwen2-VL-2B's head shape (a random head, GPU only). Last, what could not be checked on this machine.

``run_doctor`` returns the text and an exit status (0: nothing failed, 1: a path failed its check); it is what
``make gpu-check`` can call first.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

from . import env

QWEN2_VL_2B_HEAD = (151_936, 1536)  # vocabulary, hidden size


def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def toolchain() -> dict:
    """What Triton needs to build its kernels' launchers, found the way Triton looks for it
    (``kernels.environment``, which the GPU check's first stage runs too)."""
    from ..kernels.environment import c_compiler, libcuda, python_header

    cc, header, cuda = c_compiler(), python_header(), libcuda()
    path = cc.detail.split(" -> ")[-1] if cc.ok else None
    return {"cc": path, "cc_version": _first_line([path, "--version"]) if path else None, "cc_problem": None if cc.ok else cc.detail,
            "python_h": header.detail if header.ok else None, "python_h_problem": None if header.ok else header.detail,
            "libcuda": cuda.detail if cuda.ok else None, "libcuda_problem": None if cuda.ok else cuda.detail}


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    return _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])


def environment_rows() -> tuple[list[tuple[str, str]], list[str]]:
    """(label, value) rows of the environment table, and what could not be checked."""
    import importlib.metadata

    rows, missing = [], []
    try:
        ours = importlib.metadata.version("lowmem_vt")
    except importlib.metadata.PackageNotFoundError:
        ours = "?"
    rev = _git_revision()
    rows.append(("lowmem_vt", f"{ours}" + (f", git {rev}" if rev else "") + f", code fingerprint {env.code_fingerprint()}"))
    py = env.python_info()
    rows.append(("Python", f"{py['python']} ({py['executable']})"))
    rows.append(("platform", py["platform"]))
    gpu = env.gpu_info()
    if gpu["device"] == "cuda":
        rows.append(("GPU", f"{gpu['name']}, compute capability {gpu['capability']}, {gpu['memory_gib']:.1f} GiB, "
                            f"{torch.cuda.device_count()} visible"))
        bf16 = "yes" if gpu["bf16_in_hardware"] else "no"
        note = "" if gpu["bf16_in_hardware"] else (
            " (before compute capability 8.0: model.dtype auto picks float16"
            + ("; torch.cuda.is_bf16_supported() says True, but it is emulated" if gpu["torch_is_bf16_supported"] else "") + ")")
        rows.append(("bf16 in hardware", f"{bf16}, from the capability{note}"))
        rows.append(("CUDA driver", gpu["driver"] or "? (no /proc/driver/nvidia/version)"))
    else:
        rows.append(("GPU", "none: no CUDA device visible" + ("" if torch.version.cuda else " (this torch is a CPU build)")))
        rows.append(("bf16 in hardware", "not checked (no GPU)"))
        missing.append("the GPU: name, compute capability, memory, bf16 in hardware, the CUDA driver (no CUDA device visible)")
    rows.append(("torch", f"{torch.__version__}, CUDA runtime {torch.version.cuda or 'none (CPU build)'}"))
    for name, version in env.package_versions(env.REPORT_PACKAGES[1:]).items():
        rows.append((name, version or "not installed"))
    tc = toolchain()
    rows.append(("C compiler (Triton)", f"{tc['cc']}: {tc['cc_version']}" if tc["cc"] else
                 f"NOT FOUND ({tc['cc_problem']}): Triton cannot build its launchers"))
    rows.append(("Python.h (Triton)", tc["python_h"] or f"NOT FOUND: {tc['python_h_problem']}"))
    if tc["libcuda"]:
        rows.append(("libcuda (Triton)", tc["libcuda"]))
    elif gpu["device"] == "cuda":
        rows.append(("libcuda (Triton)", f"NOT FOUND: {tc['libcuda_problem']}"))
    else:
        rows.append(("libcuda (Triton)", "not found (needed on a GPU only)"))
    return rows, missing


def environment_markdown() -> str:
    rows, _ = environment_rows()
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v.replace('|', '/')} |" for k, v in rows])


def _not_checked_on_cpu() -> list[str]:
    out = []
    if os.environ.get("TRITON_INTERPRET") != "1":
        out.append("the Triton loss heads (they need a CUDA GPU; TRITON_INTERPRET=1 runs them in Triton's interpreter)")
    out += ["the engine's CUDA graphs (decode is eager off CUDA)",
            "the pinned-memory offloads of the vision tower and of the checkpointed inputs (applied on CUDA only)",
            "speed on a GPU: every time measured here is a CPU time"]
    return out


def _standalone_heads() -> tuple[list, list[str]]:
    """Without a recipe: the heads at Qwen2-VL-2B's head shape, on a random head, in the GPU's dtype."""
    from .head import HeadSettings, available_heads, check_heads
    from .report import GroupResult, decide

    if not torch.cuda.is_available():
        return [], []
    dtype = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    V, H = QWEN2_VL_2B_HEAD
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(V, H, device="cuda", generator=g) * 0.02).to(dtype)
    heads, why = available_heads(weight.device, dtype)
    group = GroupResult("kernels", "auto")
    if not heads:
        group.notes.append(why)
        return [group], []
    group.paths = check_heads(weight, heads, HeadSettings())
    d = decide(group)
    group.chosen = d.chosen
    del weight
    torch.cuda.empty_cache()
    return [group], d.warnings


def _load_for_recipe(cfg, recipe: str, device: torch.device, show_progress: bool):
    """((model, examples, input builder), what could not be had) as a run of the recipe would load them (a tiny
    model's name built in its folder first, as ``train`` does), or (None, why) when its model cannot be loaded here
    (no hub access, too large for this machine): the doctor reports that instead of a traceback. Data that cannot
    be loaded leaves the examples empty: the heads are still checked, the checks that need prompts say so."""
    from ..data import load_examples
    from ..inputs import InputBuilder
    from ..model import load_model
    from ..tiny import resolve_model_path

    def first_line(exc: BaseException) -> str:
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__

    if show_progress:
        print(f"doctor: loading {cfg.model.name_or_path} and the data of {recipe} ...", flush=True)
    missing = []
    try:
        examples, _ = load_examples(cfg.data)
    except Exception as exc:  # noqa: BLE001 -- reported: the doctor's job is to say what it could not check
        examples = []  # the heads need no data; the rollout and fp16 checks say they had no prompt
        missing.append(f"its data ({cfg.data.source}) could not be loaded: {first_line(exc)}")
    try:
        cfg.model.name_or_path = resolve_model_path(cfg.model.name_or_path)
        lm = load_model(cfg.model, cfg.lora, device, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    except Exception as exc:  # noqa: BLE001 -- as above
        return None, "; ".join([*missing, f"its model could not be loaded on {device.type}: {first_line(exc)}"])
    inputs = InputBuilder(lm.tokenizer, lm.image_processor, lm.config, max_prompt_length=cfg.grpo.max_prompt_length,
                          min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    return (lm, examples, inputs), "; ".join(missing)


def run_doctor(recipe: str | None = None, overrides=(), *, out_dir: str | None = None,
               show_progress: bool = False) -> tuple[str, int]:
    """The doctor's markdown and exit status (0: nothing failed; 1: a path failed its check). A recipe whose data or
    model cannot be loaded here is reported under "Not checked on this machine" (status 0: nothing failed); a
    recipe that is not valid raises the config's user error (the CLI: status 2)."""
    from . import SelfCheck, format_table, run_selfcheck

    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        from ..preflight import PreflightError

        raise PreflightError(f"--out {out_dir}: a file, not a folder; give a folder (the doctor writes doctor.md and "
                             "selfcheck.json into it)")
    rows, missing = environment_rows()
    lines = ["## lowmem-vt doctor", "", "| | |", "|---|---|"] + [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
    failed = False
    cuda = torch.cuda.is_available()
    report = None
    if recipe is not None:
        from ..config import load_config
        from ..preflight import check_device

        cfg = load_config(recipe, list(overrides))  # a broken recipe is the user's error: the CLI says so (status 2)
        device = check_device(cfg.train.device, f"{cfg.source_file}: key 'train.device'")
        cfg.selfcheck = "on"  # the doctor checks, whatever the recipe says
        loaded, why = _load_for_recipe(cfg, recipe, device, show_progress)
        if loaded is None:
            lines += ["", f"### Self-check: {recipe}: not run", "", f"Nothing of this recipe could be checked here: {why}."]
            missing.insert(0, f"the self-check of {recipe} ({cfg.model.name_or_path}): see above")
        else:
            if why:
                missing.insert(0, f"{recipe}: {why}")
            lm, examples, inputs = loaded
            result: SelfCheck = run_selfcheck(cfg, lm, examples=examples, inputs=inputs, out_dir=out_dir, force=True,
                                              show=False, raise_errors=False)
            report = result.report
            failed = any(p.ok is False for g in result.groups for p in g.paths) or bool(result.errors)
            lines += ["", f"### Self-check: {recipe} ({device.type}, {cfg.model.dtype}, {result.seconds:.1f} s, measured afresh)", ""]
            lines.append(format_table(result.groups) if result.groups else "Nothing to check: the recipe names the references "
                                                                             "(kernels: torch, rollout.backend: hf) and no lever applies here.")
            if result.errors:
                lines += ["", "A run of this recipe would **stop before step 1** (status 2):"]
                lines += [f"- {e}" for e in result.errors]
            else:
                lines += ["", f"A run of this recipe would use: kernels **{result.kernels}**, rollout **{result.rollout}**."]
            lines += [f"- {w}" for w in result.warnings]
    else:
        groups, warnings = _standalone_heads()
        if groups:
            lines += ["", f"### Loss heads at Qwen2-VL-2B's head shape (V {QWEN2_VL_2B_HEAD[0]}, H {QWEN2_VL_2B_HEAD[1]}, "
                          "random weights)", "", format_table(groups)]
            lines += [f"- {w}" for w in warnings]
            failed = any(p.ok is False for g in groups for p in g.paths)
        lines += ["", "(give a recipe to check its rollout backends and levers too: lowmem-vt doctor recipes/sat_lora.yaml)"]
    if not cuda:
        missing += _not_checked_on_cpu()
    if missing:
        lines += ["", "### Not checked on this machine", ""] + [f"- {m}" for m in missing]
    text = "\n".join(lines) + "\n"
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "doctor.md").write_text(text)
        if report is None:
            import json

            (out / "selfcheck.json").write_text(json.dumps({"environment": dict(rows)}, indent=1) + "\n")
    return text, 1 if failed else 0
