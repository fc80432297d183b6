"""Shared plumbing for the kernels: Triton availability, the `DG_KERNELS` switch, launching (or only
compiling) a kernel, and interpreter wrapping for CPU tensors. Autotuning is in `_tuning`."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

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


class KernelUnavailable(RuntimeError):
    """A Triton kernel cannot be compiled or loaded on a device (`launch` said so once on stderr);
    `guarded` and `pick` then run the kernel's PyTorch reference instead."""


if HAS_TRITON:
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    _BUILD_ERRORS: tuple = (CompilationError, PTXASError, OutOfResources)
else:  # pragma: no cover - nothing is launched without triton
    _BUILD_ERRORS = ()

_unavailable: set = set()  # (kernel name, str(device)) that failed to compile or load
_probing = 0  # > 0 while the autotuner tries candidates: their failures only drop the candidate


def _build_error(e: BaseException) -> bool:
    """Whether e says the kernel cannot be built or loaded here: the compiler's or ptxas's rejection,
    a resource limit (shared memory, threads), an MLIR pass crash, or the driver refusing the module
    (cuModuleLoadData & co: "Triton Error [CUDA]: no kernel image ...", raised as RuntimeError by
    triton's driver.c). Never OOM nor a CUDA error from torch (the context may be lost), never our
    argument checks' ValueError/TypeError. The interpreter raises none of these (its own errors are
    InterpreterError), so a kernel bug under TRITON_INTERPRET still fails its test."""
    if isinstance(e, _BUILD_ERRORS):
        return True
    msg = str(e)  # exactly RuntimeError: torch's OutOfMemoryError and AcceleratorError are subclasses
    return type(e) is RuntimeError and (msg.startswith("Triton Error [CUDA]") or "PassManager::run failed" in msg)


@contextmanager
def probing():
    """Failures inside are the autotuner's to drop a candidate: not a kernel marked unavailable."""
    global _probing
    _probing += 1
    try:
        yield
    finally:
        _probing -= 1


def launch(kernel, device: torch.device, grid, *args, warmup: bool = False, **kwargs):
    """Launch `kernel[grid](*args, **kwargs)` on `device`; with warmup=True compile it for those
    arguments without launching. Either way the compiled kernel comes back (None on the interpreter).

    A kernel that cannot be compiled or loaded here (`_build_error`) raises KernelUnavailable, with
    one line on stderr the first time; later launches of it on that device raise it at once."""
    name = getattr(getattr(kernel, "fn", None), "__name__", None) or getattr(kernel, "__name__", repr(kernel))
    where = str(device)
    if (name, where) in _unavailable and not _probing:
        raise KernelUnavailable(f"{name} is unavailable on {where}")
    try:
        if warmup:
            return kernel.warmup(*args, grid=grid, **kwargs)
        return launchable(kernel, device)[grid](*args, **kwargs)
    except Exception as e:
        if _probing or not _build_error(e):
            raise
        _unavailable.add((name, where))
        gpu = f"{torch.cuda.get_device_name(device)} ({where})" if device.type == "cuda" else where
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"dg: the Triton kernel {name} cannot run on {gpu} ({type(e).__name__}: {first}); "
              "dg uses the slower PyTorch path for it", file=sys.stderr, flush=True)
        raise KernelUnavailable(f"{name} is unavailable on {where}: {first}") from e


_skipped: set = set()  # Triton paths that raised KernelUnavailable: their reference runs from then on


def guarded(triton_fn, ref, *args, **kwargs):
    """triton_fn(*args, **kwargs), or ref() once triton_fn has raised KernelUnavailable (then, and on
    every later call, without trying Triton again). For the fused modules, whose reference is their
    parent's method; dispatchers use `pick`."""
    if triton_fn not in _skipped:
        try:
            return triton_fn(*args, **kwargs)
        except KernelUnavailable:
            _skipped.add(triton_fn)
    return ref()


def pick(triton_fn, ref_fn, t: torch.Tensor):
    """The function a dispatcher calls for tensor t: ref_fn off the Triton path (`use_triton`) or once
    triton_fn was found unavailable, else triton_fn falling back to ref_fn (same signature)."""
    if not use_triton(t) or triton_fn in _skipped:
        return ref_fn
    return lambda *a, **k: guarded(triton_fn, lambda: ref_fn(*a, **k), *a, **k)


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
