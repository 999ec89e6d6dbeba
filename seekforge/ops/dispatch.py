"""Which implementation an op runs: its PyTorch reference or its Triton kernel.

    with ops.backend("torch"):            # the references everywhere
    with ops.backend("triton"):           # Triton wherever the inputs fit, on the CPU too under TRITON_INTERPRET=1
    with ops.backend("torch", ops=["gemv"]):  # the GEMVs only; the other ops keep the enclosing choice

- "auto" (the default): Triton on CUDA devices where it is installed, the reference elsewhere. With the
  environment variable SEEKFORGE_TRITON=0 (read when seekforge.ops is first imported), "auto" means "torch".
- "torch": the PyTorch reference (any device).
- "triton": the Triton kernel on CUDA devices, and on the CPU where Triton's interpreter is on (TRITON_INTERPRET=1
  before Triton is imported: how the kernel tests run without a GPU); entering it without Triton installed raises
  ConfigError.

Either way an op takes its kernel only where its inputs fit the kernel (dtype, rows, strides) and runs the
reference otherwise. The engine sets its choice around each step (`EngineConfig.kernels`).

Each op with a Triton kernel registers a `TritonOp`: its name and how to import its kernel module
(`seekforge.ops.triton.NAME`, which imports Triton). The dispatch inside an op reads plain attributes the context
set on entry, and imports nothing once the kernels are loaded, so torch.compile traces it without a graph break or
host sync: `backend("triton")` loads its ops' kernels on entry, and `load_triton_kernels` loads those "auto" runs,
for a caller to run before tracing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from types import ModuleType

import torch

from seekforge.errors import ConfigError


class Backend(str, Enum):
    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"

    @classmethod
    def of(cls, kind: Backend | str) -> Backend:
        try:
            return cls(kind)
        except ValueError:
            raise ConfigError(f"kernels must be one of {', '.join(b.value for b in cls)}; got {kind!r}") from None


# The device types an op runs its kernel on, by choice: constants, so that a compiled function's guards on them hold
# from one step to the next.
_NOWHERE: tuple[str, ...] = ()
_CUDA = ("cuda",)
_CUDA_AND_CPU = ("cuda", "cpu")
_TRITON_OFF = os.environ.get("SEEKFORGE_TRITON", "1") == "0"


class TritonOp:
    """An op's Triton implementation: `load` imports its kernel module (None where Triton is missing). `on(device)`
    is what the op's dispatch asks: the module, where the current choice runs Triton on that device, else None."""

    def __init__(self, name: str, load: Callable[[], ModuleType]):
        if name in _OPS:
            raise ConfigError(f"a Triton op named {name!r} is registered already")
        self.name = name
        self._load = load
        self._module: ModuleType | None = None
        self._loaded = False
        self.devices = _devices(Backend.AUTO)
        _OPS[name] = self

    def module(self) -> ModuleType | None:
        if not self._loaded:
            try:
                self._module = self._load()
            except ImportError:
                self._module = None
            self._loaded = True
        return self._module

    def on(self, device: torch.device) -> ModuleType | None:
        return self.module() if device.type in self.devices else None


_OPS: dict[str, TritonOp] = {}  # by name


@contextmanager
def backend(kind: Backend | str, ops: Iterable[str] | None = None) -> Iterator[Backend]:
    """Within: the ops named (all where None) run `kind` (see the module's docstring); on exit, what they ran before.
    Not thread-safe: one choice holds for the whole process while the context is open."""
    kind = Backend.of(kind)
    chosen = [_op(name) for name in ops] if ops is not None else list(_OPS.values())
    devices = _devices(kind)
    if kind is Backend.TRITON:
        for op in chosen:
            if op.module() is None:
                raise ConfigError(f"kernels='triton' needs Triton's kernel of {op.name}, which cannot be imported "
                                  f"(is Triton installed?); use kernels='auto' or 'torch'")
    before = [op.devices for op in chosen]
    for op in chosen:
        op.devices = devices
    try:
        yield kind
    finally:
        for op, was in zip(chosen, before):
            op.devices = was


def _devices(kind: Backend) -> tuple[str, ...]:
    if kind is Backend.TORCH:
        return _NOWHERE
    if kind is Backend.AUTO:
        return _NOWHERE if _TRITON_OFF else _CUDA
    return _CUDA_AND_CPU if triton_interpreted() else _CUDA


def triton_interpreted() -> bool:
    """Whether Triton's kernels run under its interpreter (TRITON_INTERPRET=1), which runs them on the CPU."""
    try:
        import triton
    except ImportError:
        return False
    return bool(triton.knobs.runtime.interpret)


def _op(name: str) -> TritonOp:
    if name not in _OPS:
        raise ConfigError(f"no op named {name!r} has a Triton kernel; those that do: {', '.join(sorted(_OPS))}")
    return _OPS[name]


def check_device(kind: Backend | str, device: torch.device) -> Backend:
    """`kind` for an engine on `device`: ConfigError where "triton" cannot run there."""
    kind = Backend.of(kind)
    if kind is Backend.TRITON and device.type not in _devices(kind):
        raise ConfigError(f"kernels='triton' runs on CUDA devices, and on the CPU under Triton's interpreter only "
                          f"(TRITON_INTERPRET=1 before Triton is imported); got device {device}. Use kernels='auto'")
    return kind


def triton_runs_on(device: torch.device) -> bool:
    """Whether any op may run its Triton kernel on `device` under the current choice."""
    return any(device.type in op.devices for op in _OPS.values())


def load_triton_kernels() -> None:
    """Imports the kernel modules of every op that may run Triton under the current choice: run it before
    torch.compile traces code that calls the ops (an import inside a trace breaks the graph)."""
    for op in _OPS.values():
        if op.devices:
            op.module()
