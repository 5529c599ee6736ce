"""Backend selection: the one place that turns a backend name into an implementation.

Three names exist:

* ``"reference"``: pure ``jax.numpy`` (``e3kernels.reference``), correct everywhere and
  the fast path on CPU.
* ``"pallas"``: the fused Pallas kernels (``e3kernels.kernels``): Triton on CUDA/ROCm,
  Mosaic on TPU and, on CPU, the same kernels in interpret mode (slow; meant for tests).
  An op without a kernel raises :class:`NotImplementedError` naming the op.
* ``"auto"`` (default): ``"pallas"`` where the program is lowered for a GPU or TPU and a
  kernel exists for the op, ``"reference"`` everywhere else.

The setting is read when an op is *traced* and ``"auto"`` is resolved when it is
*lowered*, per lowering platform (through :func:`jax.lax.platform_dependent`): a function
lowered or exported for CUDA from a CPU host gets the CUDA implementation.

Precedence, most specific first:

1. the ``backend=`` argument of an op or module;
2. the innermost :func:`use_backend` context;
3. the last :func:`set_backend` call;
4. the environment variable ``E3KERNELS_BACKEND`` (read at import);
5. ``"auto"``.

>>> import e3kernels
>>> e3kernels.get_backend()
'auto'
>>> with e3kernels.use_backend("reference"):
...     e3kernels.get_backend()
'reference'
>>> e3kernels.use_backend("cuda")
Traceback (most recent call last):
...
ValueError: backend: expected one of 'auto', 'reference', 'pallas'; got 'cuda'
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax

BACKENDS = ("auto", "reference", "pallas")
ENV_VAR = "E3KERNELS_BACKEND"

GPU_PLATFORMS = ("cuda", "rocm")
TPU_PLATFORMS = ("tpu",)


def validate_backend(name: Any, argument: str = "backend") -> str:
    """Return ``name`` if it is a backend name, else raise a ValueError naming ``argument``."""
    if not isinstance(name, str) or name not in BACKENDS:
        valid = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"{argument}: expected one of {valid}; got {name!r}")
    return name


def _from_environment() -> str | None:
    value = os.environ.get(ENV_VAR)
    if value is None or value == "":
        return None
    return validate_backend(value, f"environment variable {ENV_VAR}")


_global_setting: str | None = _from_environment()
_context_setting: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "e3kernels_backend", default=None
)


def set_backend(name: str) -> None:
    """Set the process-wide backend (overrides ``E3KERNELS_BACKEND``)."""
    global _global_setting
    _global_setting = validate_backend(name)


def use_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """Use backend ``name`` for ops traced inside the ``with`` block (checked right away)."""
    return _using(validate_backend(name))


@contextlib.contextmanager
def _using(name: str) -> Iterator[None]:
    token = _context_setting.set(name)
    try:
        yield
    finally:
        _context_setting.reset(token)


def get_backend() -> str:
    """The backend name in force here, ignoring per-call ``backend=`` arguments."""
    return _context_setting.get() or _global_setting or "auto"


def resolve_backend(name: str | None = None) -> str:
    """The backend an op called with ``backend=name`` uses (``None``: the current setting)."""
    if name is None:
        return get_backend()
    return validate_backend(name)


def select(
    op: str,
    backend: str | None,
    reference: Callable[..., Any],
    kernels: Callable[[], dict[str, Callable[..., Any]] | str],
) -> Callable[..., Any]:
    """Choose the implementation of ``op`` for ``backend``; the single dispatch point.

    Args:
      op: the op's name, for error messages.
      backend: a backend name or ``None`` for the current setting.
      reference: the ``jax.numpy`` implementation.
      kernels: called only when a kernel may be used (so the reference path never imports
        or plans kernels); returns the kernel implementations keyed ``"gpu"``, ``"tpu"`` and
        ``"interpret"`` (CPU), or a string saying why no kernel handles this call.

    Returns:
      A function with the signature of ``reference``.
    """
    name = resolve_backend(backend)
    if name == "reference":
        return reference
    pallas = kernels()
    if isinstance(pallas, str):
        if name == "auto":
            return reference
        raise NotImplementedError(
            f"{op}: backend 'pallas' has no kernel for this call: {pallas}. "
            "Use backend='reference' or 'auto'."
        )
    gpu, tpu, interpret = pallas["gpu"], pallas["tpu"], pallas["interpret"]

    def by_platform(*args):
        per_platform = {p: gpu for p in GPU_PLATFORMS} | {p: tpu for p in TPU_PLATFORMS}
        cpu = reference if name == "auto" else interpret
        return jax.lax.platform_dependent(*args, cpu=cpu, default=cpu, **per_platform)

    return by_platform
