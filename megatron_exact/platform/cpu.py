"""Run Megatron-Core on a machine without CUDA (tests, laptops, CI).

Megatron-Core assumes CUDA in a few hundred places (``device='cuda'``,
``.cuda()``, ``torch.cuda.current_device()``, CUDA RNG state in the
tensor-parallel RNG tracker, a ``.type() == 'torch.cuda.FloatTensor'`` check
when clipping gradients). Patching those call sites one by one does not
scale, so this module redirects CUDA at the torch level instead:

* a ``TorchFunctionMode`` entered for the whole process rewrites every
  ``device`` argument naming CUDA to CPU, turns ``Tensor.cuda()`` and
  ``pin_memory()`` into no-ops and reports ``.type()`` with ``cuda`` in it;
* plain stand-ins replace the ``torch.cuda`` functions Megatron-Core calls
  (device index, synchronize, RNG state, streams, events), mapping the
  "CUDA" generator onto the CPU default generator, which is the one that
  actually drives dropout on CPU.

It is installed by :func:`megatron_exact.platform.setup_platform` only when
CUDA is absent, and must never be active on a GPU run.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_installed_mode: "CudaToCpuMode | None" = None


def _names_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is how torch spells "CUDA device <int>".
    return isinstance(device, int) and not isinstance(device, bool)



_CPU = torch.device("cpu")


class CudaToCpuMode(TorchFunctionMode):
    """Redirects every CUDA device request in torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _names_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _names_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()


class _NullEvent:
    """Stand-in for ``torch.cuda.Event``."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _AnyIndex:
    """``torch.cuda.default_generators[any device]`` -> the CPU generator."""

    def __init__(self, item):
        self._item = item

    def __getitem__(self, index):
        return self._item

    def __len__(self):
        return 1


def _cuda_standins() -> dict:
    default_stream = _NullStream()
    return {
        # A device object rather than the usual int: backward passes run outside
        # the mode (a mode is popped while its own handler runs, and backward()
        # is such a call), and Megatron-Core allocates there with
        # device=torch.cuda.current_device().
        "current_device": lambda: _CPU,
        "device_count": lambda: 1,
        "set_device": lambda device: None,
        "synchronize": lambda device=None: None,
        "empty_cache": lambda: None,
        "get_rng_state": lambda device="cuda": torch.get_rng_state(),
        "set_rng_state": lambda state, device="cuda": torch.set_rng_state(state),
        "manual_seed": lambda seed: torch.default_generator.manual_seed(seed),
        "manual_seed_all": lambda seed: torch.default_generator.manual_seed(seed),
        "default_generators": _AnyIndex(torch.default_generator),
        # Megatron-Core's _set_cuda_rng_state defers through _lazy_call, which
        # would queue forever on a build without CUDA: run callbacks at once.
        "_lazy_call": lambda callback, **kwargs: callback(),
        "Stream": _NullStream,
        "Event": _NullEvent,
        "current_stream": lambda device=None: default_stream,
        "default_stream": lambda device=None: default_stream,
        "stream": lambda stream=None: contextlib.nullcontext(),
        "memory_allocated": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: 0,
        "reset_peak_memory_stats": lambda device=None: None,
    }


def install() -> None:
    """Enter the CUDA-to-CPU redirection for the rest of the process (idempotent)."""
    global _installed_mode
    if _installed_mode is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the CPU backend must not be installed on a machine with CUDA")
    for name, standin in _cuda_standins().items():
        setattr(torch.cuda, name, standin)
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    _installed_mode = CudaToCpuMode()
    _installed_mode.__enter__()


def is_installed() -> bool:
    return _installed_mode is not None
