"""The machine a self-check ran on (GPU, driver, package versions, our own code) and the verdict cache.

Verdicts are cached per machine in ``$LOWMEM_VT_CACHE_DIR`` or else ``$XDG_CACHE_HOME/lowmem_vt`` (default
``~/.cache/lowmem_vt``), under ``selfcheck/``, one JSON file per check group and key. The key holds everything
a verdict depends on: GPU name, compute capability, driver and CUDA versions, the torch / triton /
transformers / peft / bitsandbytes versions, a fingerprint of our kernels', rollout's and self-check's source,
the dtype and the shapes checked. Change any of them and the group is measured again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# distribution names whose versions go into every cache key (and into doctor's report)
KEY_PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes")
REPORT_PACKAGES = KEY_PACKAGES + ("flash-attn", "vllm", "accelerate", "liger-kernel")
CACHE_VERSION = 1  # bump when the meaning of a stored verdict changes


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


_fingerprint: str | None = None


def code_fingerprint() -> str:
    """SHA-256 (first 16 hex digits) of the source of what the self-check judges and how: the kernels, the
    rollout backends, the model's levers and the self-check itself. A changed kernel re-measures."""
    global _fingerprint
    if _fingerprint is None:
        from .. import kernels, model, rollout

        files = [Path(model.__file__), *sorted(Path(__file__).parent.glob("*.py"))]
        for pkg in (kernels, rollout):  # kernels is a namespace package (no __file__): its folder via __path__
            files += sorted(Path(list(pkg.__path__)[0]).glob("*.py"))
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        _fingerprint = h.hexdigest()[:16]
    return _fingerprint


def environment(device: torch.device) -> dict:
    """What every cache key holds about the machine and the software."""
    gpu = gpu_info(device)
    env = {"cache_version": CACHE_VERSION, "device": gpu["device"], "code": code_fingerprint(),
           "packages": package_versions(), "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    if gpu["device"] == "cuda":
        env.update(gpu_name=gpu["name"], capability=gpu["capability"], driver=gpu["driver"], cuda=gpu["cuda_runtime"])
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
