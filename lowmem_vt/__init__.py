"""lowmem_vt: memory-efficient single-GPU R1-Zero GRPO for Qwen2-VL."""

import os
import sys
from pathlib import Path

# The repository's top-level ``kernels/`` folder is installed as ``lowmem_vt.kernels``. When the repository
# root is on sys.path (``python train.py``, ``python -m ...`` from the root) it would also answer to the
# top-level name ``kernels``, which belongs to the pip package of that name (bitsandbytes and transformers
# look for it). The root's path finder is wrapped so that it does not offer our folder under that name.
_REPO = Path(__file__).resolve().parent.parent


class _RootFinderWithoutKernels:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, fullname, target=None):
        return None if fullname == "kernels" else self.inner.find_spec(fullname, target)

    def invalidate_caches(self):
        self.inner.invalidate_caches()


def _hide_repo_kernels() -> None:
    for entry in sys.path:
        key = entry or os.getcwd()  # the import system caches "" under the current directory
        try:
            if Path(key).resolve() != _REPO or isinstance(sys.path_importer_cache.get(key), _RootFinderWithoutKernels):
                continue
        except OSError:
            continue
        finder = sys.path_importer_cache.get(key)
        for hook in sys.path_hooks if finder is None else ():
            try:
                finder = hook(key)
                break
            except ImportError:
                continue
        if finder is not None:
            sys.path_importer_cache[key] = _RootFinderWithoutKernels(finder)


if (_REPO / "kernels" / "grpo_loss.py").is_file():
    _hide_repo_kernels()
