"""Shared plumbing for the kernels: Triton availability, the `DG_KERNELS` switch, launching (or only
compiling) a kernel, and interpreter wrapping for CPU tensors. Autotuning is in `_tuning`."""

from __future__ import annotations

import os

import torch

from dgcli import settings

try:
    import triton
except ImportError:  # CPU-only installs (macOS, Windows, no wheel): the references still work
    triton = None

HAS_TRITON = triton is not None


def mode() -> str:
    """DG_KERNELS: ref | triton | auto (dgcli.settings parses it; a bad value is a ConfigError)."""
    return settings.kernels_mode()


def use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA by default; `DG_KERNELS=ref` forces the reference, `=triton` forces Triton
    (on CPU tensors that means the interpreter, as the tests run it)."""
    m = mode()
    if m == "ref":
        return False
    if m == "triton":
        if not HAS_TRITON:
            raise RuntimeError("DG_KERNELS=triton but triton is not importable (pip install triton)")
        return True
    return HAS_TRITON and t.is_cuda


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch(kernel, device: torch.device, grid, *args, warmup: bool = False, **kwargs):
    """Launch `kernel[grid](*args, **kwargs)` on `device`; with warmup=True compile it for those
    arguments without launching. Either way the compiled kernel comes back (None on the interpreter)."""
    if warmup:
        return kernel.warmup(*args, grid=grid, **kwargs)
    return launchable(kernel, device)[grid](*args, **kwargs)


def launchable(kernel, device: torch.device):
    """The kernel as it can be launched on `device` (`launchable(k, x.device)[grid](...)`).

    CPU tensors need Triton's interpreter. If triton was imported before TRITON_INTERPRET was set
    (another test module got there first), the kernel and triton's own jit helpers (tl.max, tl.sum,
    tl.zeros...) are compiled JITFunctions; interpret them on the fly for the duration of the launch.
    The same holds for an interpreted kernel that calls helpers from a module imported earlier.
    """
    if device.type != "cpu":
        return kernel
    if not interpreting():
        raise RuntimeError("a Triton kernel on CPU tensors needs TRITON_INTERPRET=1 (or DG_KERNELS=ref)")
    _fix_interpreter_bf16()
    return _Interpreted(kernel)


_as_interpreted: dict = {}  # id(JITFunction) -> (it, InterpretedFunction); JITFunction's hash parses source


def _interpreted(fn):
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(fn, InterpretedFunction):
        return fn
    if id(fn) not in _as_interpreted:
        _as_interpreted[id(fn)] = (fn, InterpretedFunction(fn.fn))  # holding fn keeps its id unique
    return _as_interpreted[id(fn)][1]


class _Interpreted:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.jit import JITFunction

            saved = JITFunction.__call__
            JITFunction.__call__ = lambda self, *a, **k: _interpreted(self)(*a, **k)  # device-function calls
            try:
                return _interpreted(self.kernel)[grid](*args, **kwargs)
            finally:
                JITFunction.__call__ = saved

        return launch


_bf16_fixed = False


def _fix_interpreter_bf16() -> None:
    """Triton 3.9's interpreter stores bf16 as raw uint16 bits, and its `create_dot` and float
    add/sub/mul/div work on those bits as integers. Widen bf16 operands to fp32 (exact) first, and
    round arithmetic results back to bf16 (to nearest even, as the GPU does), so bf16 kernels can be
    checked on CPU. Touches only the interpreter; compiled kernels are unaffected."""
    global _bf16_fixed
    if _bf16_fixed:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    B = interpreter.InterpreterBuilder

    def widen(h):
        if h.dtype == tl.bfloat16:
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def narrow(h):
        bits = h.data.astype(np.float32).view(np.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even (NaN stays NaN)
        return interpreter.TensorHandle(bits.astype(np.uint16), tl.bfloat16)

    original_dot = B.create_dot

    def create_dot(self, a, b, d, *args, **kwargs):
        return original_dot(self, widen(a), widen(b), d, *args, **kwargs)

    B.create_dot = create_dot
    for name in ("create_fadd", "create_fsub", "create_fmul", "create_fdiv"):
        original = getattr(B, name)

        def op(self, lhs, rhs, original=original):
            if lhs.dtype == tl.bfloat16 and rhs.dtype == tl.bfloat16:
                return narrow(original(self, widen(lhs), widen(rhs)))
            return original(self, lhs, rhs)

        setattr(B, name, op)
    _bf16_fixed = True


def swap_modules(model: torch.nn.Module, plain: type, fused: type) -> int:
    """Make every module of exactly type `plain` under `model` a `fused` (a subclass that adds no
    state, only methods that launch kernels): the same objects, so parameters, ties and state-dict
    keys stay as they are. Returns how many were swapped (0 on a second call)."""
    found = [m for m in model.modules() if type(m) is plain]
    for m in found:
        m.__class__ = fused
    return len(found)
