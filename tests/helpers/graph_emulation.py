"""CUDA graphs emulated on CPU, to test the engine's capture logic (``EngineRollout._capture``) without a GPU.

Capture records every operator the step dispatches (the tensors it reads and writes are fixed, as in a CUDA
graph) and, like a CUDA capture, leaves the random generators where they were and every tensor that existed
before it as it was (a CUDA capture runs nothing: what the recording wrote in place, a cache slot or a
linear-attention state, is put back); replay runs the recorded operators again on the same tensors, drawing
from the registered generators (or the global RNG) as a CUDA replay does. Python in the step runs at capture
only, so a step that decided anything on the host from tensor values would replay wrongly here as it would on
the GPU.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []
        self.overwritten: dict[int, tuple] = {}  # storages in-place ops wrote: (storage, a copy of it before)
        self.created: set[int] = set()  # storages the recording allocated (a CUDA capture's pool: nothing to put back)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for arg, value in zip(func._schema.arguments, [*args, *(kwargs.get(a.name) for a in func._schema.arguments[len(args):])]):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                key = value.untyped_storage()._cdata
                if key not in self.created and key not in self.overwritten:
                    self.overwritten[key] = (value.untyped_storage(), value.untyped_storage().clone())
        out = func(*args, **kwargs)
        if not func.is_view:
            self.ops.append((func, args, kwargs, out))
            self.created.update(t.untyped_storage()._cdata for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out

    def put_back(self) -> None:
        for storage, before in self.overwritten.values():
            storage.copy_(before)


class EmulatedGraph:
    def __init__(self, ops):
        self.ops = ops
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            for old, fresh in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                if isinstance(old, torch.Tensor) and old is not fresh:
                    old.copy_(fresh)  # the graph's outputs live at the captured addresses


class EmulatedGraphs:
    """Stands in for ``engine.CudaGraphs`` on CPU."""

    def __init__(self):
        self.captured: list[EmulatedGraph] = []
        self.warm_ups = 0

    def new_pool(self):
        return None

    def get_rng_state(self) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.set_rng_state(state)

    def synchronize(self) -> None:
        pass

    def warm_up(self, step) -> None:
        self.warm_ups += 1
        step()

    def capture(self, step, generators, pool) -> EmulatedGraph:
        rng = [g.get_state() for g in generators], torch.get_rng_state()
        recorder = _Recorder()
        with recorder:
            step()
        recorder.put_back()
        for g, state in zip(generators, rng[0]):  # a CUDA capture draws nothing
            g.set_state(state)
        torch.set_rng_state(rng[1])
        self.captured.append(EmulatedGraph(recorder.ops))
        return self.captured[-1]
