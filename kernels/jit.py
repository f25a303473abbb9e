"""Triton kernels that run compiled on CUDA tensors and interpreted on CPU tensors, in one process.

`triton.jit` decides between compiling and interpreting once, when the decorator runs, from the
`TRITON_INTERPRET` environment variable. Our kernel files also hold the torch references that the
CPU path imports, so whichever module imported them first would fix the mode for everybody (and
a GPU test run also runs the CPU interpreter tests). Instead, each kernel file registers its
`@triton.jit` functions (kernels and their helpers) in a `KernelSet`; on the first launch with a
given device kind the set re-binds every registered function in a private copy of the module's
globals, wrapped for that mode, so helpers called from a kernel resolve to the same mode:

    jit = KernelSet(globals())

    @jit
    def _helper(x): ...

    @jit
    def _kernel(X, N: tl.constexpr): ... _helper(x) ...

    jit["_kernel"][grid](x, N=8)  # CPU tensors → interpreter, CUDA tensors → compiled

`TRITON_INTERPRET=1` in the environment forces the interpreter for every launch. (The interpreter
is for tests at small shapes: its tl.dot on bf16 is wrong, use fp32/fp16 there.)
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language import core as _tl_core


def interpret_forced() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class _Launcher:
    def __init__(self, owner: KernelSet, name: str, grid: Any) -> None:
        self.owner, self.name, self.grid = owner, name, grid

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        interpret = interpret_forced() or not any(
            isinstance(a, torch.Tensor) and a.is_cuda for a in (*args, *kwargs.values())
        )
        fn = self.owner.bound(interpret)[self.name]
        if interpret and not interpret_forced():
            with _interpretable_stdlib():
                return fn[self.grid](*args, **kwargs)
        return fn[self.grid](*args, **kwargs)


@contextlib.contextmanager
def _interpretable_stdlib() -> Iterator[None]:
    """triton.language's own helpers (tl.sum, tl.max, tl.cdiv, …) were decorated as compiled
    JITFunctions when triton was imported without TRITON_INTERPRET; while an interpreted kernel
    runs, calls to them go to their interpreter rewrite. The language is patched once for the
    whole launch (tl and tl.core), so nested calls skip the interpreter's costly per-call
    re-patching (see _FastInterpreted)."""
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__

    def call(self: JITFunction, *args: Any, **kwargs: Any) -> Any:
        return _rewritten(self.fn)(*args, **kwargs)

    with _PATCH_LOCK:
        scope = interpreter._patch_lang(_probe)
        JITFunction.__call__ = call  # type: ignore[method-assign]
        try:
            yield
        finally:
            JITFunction.__call__ = original  # type: ignore[method-assign]
            scope.restore()


def _probe() -> None:
    """Its globals name both tl and tl.core, so patching for it patches the whole language."""
    _ = (tl, _tl_core)


def _rewritten(fn: Callable) -> Callable:
    rewritten = _INTERPRETED.get(fn)
    if rewritten is None:
        from triton.runtime.interpreter import InterpretedFunction

        rewritten = _INTERPRETED[fn] = InterpretedFunction(fn).rewrite()
    return rewritten


def _fast_interpreted(fn: Callable) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    class _FastInterpreted(InterpretedFunction):
        """Launched with [grid] like any interpreted kernel; called from another kernel it runs
        its rewrite directly (the launch already patched the language)."""

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return self.rewrite()(*args, **kwargs)

    return _FastInterpreted(fn)


_INTERPRETED: dict[Callable, Any] = {}
_PATCH_LOCK = threading.RLock()


def _numpy2_scalar_index() -> None:
    """The interpreter holds scalars as 1-element arrays and turns them into Python ints with
    int(array), which NumPy ≥ 2.3 refuses for arrays of one dimension (loop bounds such as
    `range(lo, hi)` of loaded values fail). Re-patch `__index__` with `.item()` in the same
    restorable scope."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_gptoss_shim", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._gptoss_shim = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


_numpy2_scalar_index()


class _Entry:
    def __init__(self, owner: KernelSet, name: str) -> None:
        self.owner, self.name = owner, name

    def __getitem__(self, grid: Any) -> _Launcher:
        return _Launcher(self.owner, self.name, grid)


class KernelSet:
    instances: list[KernelSet] = []  # every kernel file's set, for compiled_variants()

    def __init__(self, module_globals: dict[str, Any]) -> None:
        KernelSet.instances.append(self)
        self._globals = module_globals
        self._fns: dict[str, Callable] = {}
        self._nospec: dict[str, tuple[str, ...]] = {}
        self._bound: dict[bool, dict[str, Any]] = {}

    def __call__(self, fn: Callable | None = None, *,
                 do_not_specialize: tuple[str, ...] = ()) -> Any:
        """Registers a function; the module keeps the plain function (never call it directly).

        do_not_specialize: integer arguments that change from call to call with the batch (token
        counts, pair counts, strides over them). Triton otherwise compiles a variant per value
        class (== 1, divisible by 16, other), so a batch size first seen mid-serving costs a
        compile of seconds (measured on the H100: 0.5–2.4 s steps after warm-up). Used as
        `@jit(do_not_specialize=("T",))`."""
        if fn is None:
            return lambda f: self(f, do_not_specialize=do_not_specialize)
        params = set(inspect.signature(fn).parameters)
        unknown = sorted(set(do_not_specialize) - params)
        if unknown:
            raise TypeError(f"{fn.__name__}: do_not_specialize names unknown arguments {unknown}")
        self._fns[fn.__name__] = fn
        self._nospec[fn.__name__] = tuple(do_not_specialize)
        self._bound.clear()
        return fn

    def __getitem__(self, name: str) -> _Entry:
        if name not in self._fns:
            raise KeyError(f"no Triton function {name!r} registered")
        return _Entry(self, name)

    def bound(self, interpret: bool) -> dict[str, Any]:
        if interpret not in self._bound:
            from triton.runtime.interpreter import InterpretedFunction

            g = dict(self._globals)
            for name, fn in self._fns.items():
                copy = types.FunctionType(
                    fn.__code__, g, name, fn.__defaults__, fn.__closure__
                )
                copy.__module__ = fn.__module__
                copy.__qualname__ = fn.__qualname__
                copy.__doc__ = fn.__doc__
                copy.__annotations__ = dict(fn.__annotations__)
                if not interpret:
                    g[name] = triton.jit(copy, do_not_specialize=self._nospec[name])
                elif interpret_forced():
                    g[name] = InterpretedFunction(copy)
                else:
                    g[name] = _fast_interpreted(copy)
            self._bound[interpret] = g
        return self._bound[interpret]


def compiled_variants() -> dict[str, int]:
    """How many compiled variants each Triton kernel has so far (kernel name → count), from the
    JIT caches: a count that grows while serving means a compile on some request's path."""
    out: dict[str, int] = {}
    for ks in KernelSet.instances:
        for name, fn in ks._bound.get(False, {}).items():
            if name not in ks._fns or not hasattr(fn, "device_caches"):
                continue
            n = sum(len(entry[0]) for entry in fn.device_caches.values())
            if n:
                out[name] = out.get(name, 0) + n
    return out
