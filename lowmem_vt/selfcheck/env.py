"""The machine a self-check ran on (GPU, driver, package versions, our own code, the model) and the verdict cache.

Verdicts are cached per machine in ``$LOWMEM_VT_CACHE_DIR`` or else ``$XDG_CACHE_HOME/lowmem_vt`` (default
``~/.cache/lowmem_vt``), under ``selfcheck/``, one JSON file per check group and key. The key holds everything
a verdict depends on: GPU name, compute capability, driver and CUDA versions, every accelerating package's
version (``KEY_PACKAGES``), a fingerprint of every source file of ours the checks import (``code_fingerprint``:
the import graph, not a list), the model's identity (``model_identity``), the dtype and the shapes checked.
Change any of them and the group is measured again. Speeds are kept only when measured on a quiet machine
(``machine_load``): see ``selfcheck._Runner.cached_or_measure`` and docs/selfcheck.md, "The cache".
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# distribution names whose versions go into every cache key (and into doctor's report): everything that can put
# another kernel under a checked path (attention, linear attention, NF4, fused losses, placement, generation)
KEY_PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "flash-attn",
                "flash-linear-attention", "vllm", "liger-kernel")
REPORT_PACKAGES = KEY_PACKAGES
CACHE_VERSION = 2  # bump when the meaning of a stored verdict changes (2: speeds kept only from a quiet machine)


def package_versions(names=KEY_PACKAGES) -> dict[str, str | None]:
    """Installed versions by distribution name; None when not installed."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (Linux: /proc/driver/nvidia/version), or None."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    for token in text.split():
        if token.count(".") >= 1 and token.replace(".", "").isdigit():
            return token
    return None


def gpu_info(device: torch.device | str | None = None) -> dict:
    """Name, compute capability, memory and bf16 support of a CUDA device; ``{"device": "cpu"}`` without one.

    ``bf16_in_hardware`` comes from the capability (>= 8.0: Ampere and later have bf16 tensor cores);
    ``torch.cuda.is_bf16_supported()`` also says yes on a T4 (7.5), where bf16 is emulated, slowly."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return {"device": "cpu", "cpu": platform.processor() or platform.machine()}
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    major, minor = props.major, props.minor
    try:
        torch_says = bool(torch.cuda.is_bf16_supported())
    except Exception:  # noqa: BLE001 -- informative only
        torch_says = None
    return {
        "device": "cuda", "name": props.name, "capability": f"{major}.{minor}",
        "memory_gib": round(props.total_memory / 2**30, 2), "bf16_in_hardware": (major, minor) >= (8, 0),
        "torch_is_bf16_supported": torch_says, "cuda_runtime": torch.version.cuda, "driver": driver_version(),
    }


PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the lowmem_vt folder
PACKAGE = "lowmem_vt"
# the checks' entry: the self-check package imports every path it judges (heads, rollout backends, levers) and the
# trainer's references they are compared with (inputs, families, grpo ...); the walk below finds the rest
ENTRY_MODULES = ("lowmem_vt.selfcheck",)
# folders hashed whole, whatever the walk finds: the Triton kernels with everything beside them (the launch
# resources measured per configuration, compiled_resources.json, and the module that measures them are used by
# bench/ and the GPU check, not imported by a check; a small folder, so no file of it is left to judgement)
WHOLE_FOLDERS = ("kernels",)


def _module_source(root: Path, name: str) -> Path | None:
    """The file a module of ours is loaded from (``x.py`` or ``x/__init__.py``); None for a folder without
    ``__init__.py`` (a namespace package: nothing runs) or a name that is not ours."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    if parts[1:] and base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return base / "__init__.py" if (base / "__init__.py").is_file() else None


def _is_module(root: Path, name: str) -> bool:
    parts = name.split(".")
    base = root.joinpath(*parts[1:])
    return parts[0] == PACKAGE and (base.with_suffix(".py").is_file() or base.is_dir())


def _statements(nodes):
    """Every statement of a module, nested ones included (an import is a statement: no need to visit expressions)."""
    for node in nodes:
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                yield from _statements(inner)


def _imports(root: Path, name: str, source: Path) -> tuple[set[str], set[Path], bool]:
    """What one module of ours imports (anywhere in it: a function's lazy import counts), the data files beside it
    that it names (a string constant equal to an existing file's name, e.g. ``"compiled_resources.json"``), and
    whether it imports by computed name (``importlib.import_module`` / ``__import__``), which no walk can follow."""
    text = source.read_bytes()
    tree = ast.parse(text, filename=str(source))
    package = name if source.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if _is_module(root, f"{base}.{a.name}"))
    dynamic = False
    if b"import_module" in text or b"__import__" in text:  # the whole tree only where such a call may be
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func
                called = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
                dynamic |= called in ("import_module", "__import__")
    data = {f for f in source.parent.iterdir() if f.is_file() and f.suffix != ".py"
            and any(f'{q}{f.name}{q}'.encode() in text for q in "\"'")}
    ours = set()
    for full in found:
        parts = full.split(".")
        if parts[0] == PACKAGE:  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            ours.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return ours, data, dynamic


def fingerprinted_files(root: Path | None = None, entries: tuple[str, ...] = ENTRY_MODULES) -> list[Path]:
    """Every file of ours the checked paths can run or read: the modules reachable from ``entries`` through their
    imports (static, lazy ones included), the data files those modules name, and every file of ``WHOLE_FOLDERS``
    (a module that imports by a computed name makes the walk give up on precision: then every source and data file
    of the package counts)."""
    root = Path(root) if root is not None else PACKAGE_ROOT
    seen: set[str] = set()
    files: set[Path] = {f for folder in WHOLE_FOLDERS for f in (root / folder).rglob("*")
                        if f.is_file() and "__pycache__" not in f.parts}
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        source = _module_source(root, name)
        if source is None:
            continue
        files.add(source)
        modules, data, dynamic = _imports(root, name, source)
        if dynamic:  # rglob does not enter the kernels link: WHOLE_FOLDERS' files are added as they are
            return sorted(files | {f for f in root.rglob("*") if f.is_file() and "__pycache__" not in f.parts})
        files |= data
        todo += sorted(modules - seen)
    return sorted(files)


@functools.lru_cache(maxsize=None)
def code_fingerprint(root: Path | None = None) -> str:
    """SHA-256 (first 16 hex digits) of every file ``fingerprinted_files`` finds: their paths under the package and
    their bytes. Any edit to code the checks run (a comment included) measures again."""
    root = Path(root) if root is not None else PACKAGE_ROOT
    h = hashlib.sha256()
    for f in fingerprinted_files(root):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- the model's identity

_HUB_BLOB = re.compile(r"[0-9a-f]{64}")  # a hub cache blob of an LFS file is named by its content's SHA-256
_HUB_SNAPSHOT = re.compile(r"[0-9a-f]{40}")  # .../snapshots/<commit>/


def _weights_digest(f: Path) -> str:
    """One weight file's identity, as cheaply as it can be had without reading gigabytes.

    In the hub's cache the file is a link to ``blobs/<sha256 of its content>``: that name is a full content hash,
    free. Elsewhere: a safetensors file's header (every tensor's name, dtype, shape and offsets, and the
    metadata) plus 256 bytes at the start and the middle of every tensor's data -- a fine-tune or a merged
    adapter rewrites whole tensors, so each changed tensor is seen, for ~2 small reads per tensor. A pickled
    ``.bin``: its size and 64 blocks of 4 KiB spread over it."""
    real = f.resolve()
    if real.parent.name == "blobs" and _HUB_BLOB.fullmatch(real.name):
        return "sha256:" + real.name
    h = hashlib.sha256()
    size = real.stat().st_size
    with open(real, "rb") as fh:
        if f.suffix == ".safetensors":
            n = int.from_bytes(fh.read(8), "little")
            header_bytes = fh.read(n)
            h.update(header_bytes)
            header = json.loads(header_bytes)
            for name in sorted(k for k in header if k != "__metadata__"):
                begin, end = header[name]["data_offsets"]
                for at in (begin, (begin + end) // 2):
                    fh.seek(8 + n + at)
                    h.update(fh.read(min(256, end - at)))
        else:
            h.update(str(size).encode())
            for i in range(64):
                fh.seek(size * i // 64)
                h.update(fh.read(4096))
    return "sampled:" + h.hexdigest()[:32]


def model_identity(name_or_path: str) -> dict:
    """What identifies the model a verdict was measured on: the SHA-256 of its ``config.json`` (the bytes), each
    weight file's digest (``_weights_digest``) and, loaded from the hub's cache, the snapshot's commit. Sizes and
    modification times are not identity (a copy changes the times; another fine-tune keeps the sizes). A model
    that is not on disk (a hub id not downloaded yet) has only its name."""
    from ..checkpoint import model_folder
    from ..tiny import parse_tiny_name

    tiny = parse_tiny_name(name_or_path)
    folder = model_folder(tiny[2] if tiny else name_or_path)
    if folder is None:
        return {"name": name_or_path}
    try:
        identity = {"config_sha256": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:32],
                    "weights": {f.name: _weights_digest(f) for f in
                                sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])}}
    except (OSError, ValueError, KeyError) as exc:  # unreadable: no identity, so no cached verdict can match it
        return {"name": name_or_path, "unreadable": f"{type(exc).__name__}: {exc}"[:200]}
    if folder.parent.name == "snapshots" and _HUB_SNAPSHOT.fullmatch(folder.name):
        identity["hub_commit"] = folder.name
    return identity


# ------------------------------------------------------------------------------------------- a busy machine

# A speed measured while other work shares the machine is not a property of the paths (engine 27 vs hf 60 tokens/s
# in one loaded run): it decides that run only and is not kept. Busy: other processes kept at least half the cores
# busy over 0.1 s just before measuring (our own CPU time subtracted), another process computes on our GPU or the
# GPU was more than 10 % busy before we started, or a fixed calibration workload's time before and after the
# measurement differs by 1.5x or more (load that came or went meanwhile).
BUSY_LOAD_PER_CORE = 0.5
BUSY_GPU_UTILIZATION = 10  # percent, sampled before measuring
BUSY_CALIBRATION_RATIO = 1.5


def _nvidia_smi(args: list[str]) -> list[str] | None:
    try:
        out = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else None


def calibration_seconds(device: torch.device) -> float:
    """The median of 5 timings of a fixed workload on ``device``, after one untimed run (first-call set-up is not
    load): 8 fp32 matmuls of 2048 x 2048 on a GPU (~3 ms on an H100, ~20 ms on a T4), of 256 x 256 on a CPU."""
    n = 2048 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, generator=torch.Generator(device=device).manual_seed(0)) / n**0.5
    times = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        b = a
        for _ in range(8):
            b = b @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    return times[len(times) // 2]


def _others_cpu_share(window_s: float = 0.1) -> float:
    """The share of all cores that other processes kept busy over ``window_s`` (0..1): the busy time of the whole
    machine (Linux ``/proc/stat``) less this process's own CPU time, over wall time x cores. Elsewhere the 1-minute
    load average less one (this process), per core: coarser, and it counts our own threads."""
    cores = os.cpu_count() or 1

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)

    try:
        busy0, total0 = sample()
        own0 = sum(os.times()[:2])
        time.sleep(window_s)
        busy1, total1 = sample()
        own1 = sum(os.times()[:2])
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        try:
            return max(0.0, os.getloadavg()[0] - 1.0) / cores
        except OSError:
            return 0.0
    capacity = (total1 - total0) / hz  # wall time x cores, in seconds
    return max(0.0, (busy1 - busy0) / hz - (own1 - own0)) / capacity if capacity > 0 else 0.0


def machine_load(device: torch.device) -> dict:
    """How busy the machine is now: the share of the cores other processes use, the calibration time and, on a GPU,
    its utilization and the processes computing on it besides us. Taken before and after a measurement
    (``busy_reason`` judges the pair)."""
    load = {"load_per_core": round(_others_cpu_share(), 3), "calibration_s": calibration_seconds(device)}
    if device.type == "cuda":
        index = str(device.index if device.index is not None else torch.cuda.current_device())
        util = _nvidia_smi(["-i", index, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"])
        pids = _nvidia_smi(["-i", index, "--query-compute-apps=pid", "--format=csv,noheader"])
        load["gpu_utilization"] = int(util[0]) if util and util[0].isdigit() else None
        load["gpu_other_processes"] = None if pids is None else sum(p != str(os.getpid()) for p in pids)
    return load


def busy_reason(before: dict, after: dict) -> str:
    """Why speeds measured between the two ``machine_load`` samples are not a property of the paths ("" when the
    machine was quiet): the rule above ``BUSY_LOAD_PER_CORE``."""
    reasons = []
    if before["load_per_core"] >= BUSY_LOAD_PER_CORE:
        reasons.append(f"other processes used {before['load_per_core']:.0%} of the cores")
    if (before.get("gpu_utilization") or 0) > BUSY_GPU_UTILIZATION:
        reasons.append(f"the GPU was {before['gpu_utilization']} % busy before the check")
    others = max(before.get("gpu_other_processes") or 0, after.get("gpu_other_processes") or 0)
    if others:
        reasons.append(f"{others} other process(es) computing on the GPU")
    ratio = max(after["calibration_s"], before["calibration_s"]) / max(min(after["calibration_s"], before["calibration_s"]), 1e-9)
    if ratio >= BUSY_CALIBRATION_RATIO:
        reasons.append(f"a calibration workload took {before['calibration_s'] * 1e3:.3g} ms before the check and "
                       f"{after['calibration_s'] * 1e3:.3g} ms after")
    return "; ".join(reasons)


def environment(device: torch.device) -> dict:
    """What every cache key holds about the machine and the software."""
    gpu = gpu_info(device)
    env = {"cache_version": CACHE_VERSION, "device": gpu["device"], "code": code_fingerprint(),
           "packages": package_versions(), "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    if gpu["device"] == "cuda":
        env.update(gpu_name=gpu["name"], capability=gpu["capability"], driver=gpu["driver"], cuda=gpu["cuda_runtime"])
    else:  # the CPU's vector unit picks torch's CPU kernels (AVX2 / AVX512 / AMX): another CPU, other numbers
        env.update(cpu=gpu["cpu"], cpu_capability=torch.backends.cpu.get_cpu_capability())
    return env


def cache_dir() -> Path:
    """``$LOWMEM_VT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowmem_vt``, else ``~/.cache/lowmem_vt``."""
    explicit = os.environ.get("LOWMEM_VT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lowmem_vt"


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_path(group: str, key: dict) -> Path:
    return cache_dir() / "selfcheck" / f"{group}-{_digest(key)}.json"


def cache_load(group: str, key: dict) -> dict | None:
    """The stored verdicts of ``group`` under exactly ``key``, or None (missing, unreadable, another key)."""
    path = cache_path(group, key)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != json.loads(json.dumps(key, default=str)):
        return None
    return data


def cache_store(group: str, key: dict, data: dict) -> Path | None:
    """Write the verdicts atomically (temporary file, then rename); a cache that cannot be written only warns."""
    path = cache_path(group, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"key": key, "stored": time.strftime("%Y-%m-%d %H:%M:%S"), **data}, indent=1, default=str)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        os.replace(tmp, path)
        return path
    except OSError as exc:
        log.warning("self-check: could not write the verdict cache %s (%s); the next run measures again", path, exc)
        return None


def python_info() -> dict:
    return {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
