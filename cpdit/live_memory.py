# Peak memory of a computation without running it: the computation runs on the meta device (shapes only) under a
# dispatch mode that tracks every storage an op creates and frees it when the last reference to it is gone, the
# way a caching allocator sees allocations and frees (without rounding). It is how the layout planner
# (parallel/memory_model.py) predicts what a model at CogVideoX-5B scale needs per rank on a laptop.
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveMemory(TorchDispatchMode):
    """`with LiveMemory() as mem: ...` on meta tensors; then `mem.peak` (bytes), `mem.live` (bytes still alive),
    `mem.peak_by_tag`. Only storages created inside the block count; tensors created before (parameters, inputs)
    are the caller's to account for. `mem.tag = "..."` labels what runs next (the peak is attributed per tag).

    A storage is alive while anything but this tracker references it (autograd's saved tensors, views, Python
    names). The peak is taken after each op, with its outputs allocated and its inputs not yet released, which is
    the moment an allocator's peak is reached too."""

    def __init__(self, snapshot: Callable[[], dict[str, int]] | None = None) -> None:
        """`snapshot`: called at each new peak; its last answer is kept as `at_peak` (what held the memory then)."""
        super().__init__()
        self.snapshot = snapshot
        self.at_peak: dict[str, int] = {}
        self._storages: dict[int, tuple[torch.UntypedStorage, int]] = {}  # cdata -> (storage, bytes)
        self.live = 0
        self.peak = 0
        self.tag = ""
        self.peak_by_tag: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._storages and key not in inputs:  # a view or in-place result allocates nothing
                    self._storages[key] = (storage, storage.nbytes())
                    self.live += storage.nbytes()
        self._note_peak()
        self._sweep()
        return out

    def _note_peak(self) -> None:
        if self.live > self.peak:
            self.peak = self.live
            if self.snapshot is not None:
                self.at_peak = self.snapshot()
        self.peak_by_tag[self.tag] = max(self.peak_by_tag[self.tag], self.live)

    def _sweep(self) -> None:
        """Release the storages only this tracker still holds (use count 1: our own reference)."""
        dead = [k for k, (s, _) in self._storages.items() if torch._C._storage_Use_Count(s._cdata) <= 1]
        for k in dead:
            self.live -= self._storages.pop(k)[1]

    def bump(self, nbytes: int) -> None:
        """Account for memory the meta run does not allocate (e.g. FSDP's gathered parameters): `nbytes` more (or,
        negative, fewer) live bytes from now on."""
        self.live += nbytes
        self._note_peak()

    def collect(self) -> int:
        """Sweep now (after Python dropped references outside any op); returns the live bytes."""
        self._sweep()
        return self.live
