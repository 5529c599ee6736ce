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
*lowered*, per lowering platform (:mod:`e3kernels.dispatch`): a function lowered or
exported for CUDA from a CPU host gets the CUDA implementation, and lowering traces only
the implementation of the platform lowered for.

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
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import jax

from e3kernels import dispatch

BACKENDS = ("auto", "reference", "pallas")
ENV_VAR = "E3KERNELS_BACKEND"


def validate_backend(name: Any, argument: str = "backend") -> str:
    """Return ``name`` if it is a backend name, else raise a ValueError naming ``argument``."""
    if not isinstance(name, str) or name not in BACKENDS:
        valid = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"{argument}: expected one of {valid}; got {name!r}")
    return name


def validate_optional_backend(name: Any) -> str | None:
    """A module's ``backend=``: ``None`` (the setting in force when it is called) or a
    backend name, checked as :func:`validate_backend` does."""
    return None if name is None else validate_backend(name)


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
    kernels: Callable[[], Mapping[str, Callable[..., Any] | str] | str],
    out: jax.ShapeDtypeStruct,
    key: Hashable | None = None,
    row_axes: tuple[int | None, ...] | None = None,
    out_row_axis: int | None = 0,
    spaces: tuple[str, ...] | None = None,
    out_spaces: str | None = None,
) -> Callable[..., Any]:
    """Choose the implementation of ``op`` for ``backend``; the single dispatch point.

    Args:
      op: the op's name, for error messages.
      backend: a backend name or ``None`` for the current setting.
      reference: the ``jax.numpy`` implementation.
      kernels: called only when a kernel may be used (so the reference path never imports
        or plans kernels); returns the kernel implementations keyed ``"gpu"``, ``"tpu"`` and
        ``"interpret"`` (CPU), each a function or a string saying why no kernel handles
        this call on that platform; or one string saying why no kernel handles it at all.
      out: the shape and dtype of the op's output, the same for every implementation.
      key: everything static ``reference`` and ``kernels`` depend on (a plan, a precision):
        equal keys mean equal computations, so that JAX's caches are shared (``None``: no
        sharing).
      row_axes: for a row-wise op, per argument, the axis of its rows or ``None`` (see
        :func:`e3kernels.dispatch.call`): a sharded ``jax.jit`` keeps rows on their devices.
      out_row_axis: the output's row axis, or ``None`` for a sum over the rows.
      spaces, out_spaces: per argument, and for the output, the spaces of its axes (see
        :func:`e3kernels.dispatch.call`): ``jax.vmap`` folds a batch into them, one call.

    Returns:
      A function with the signature of ``reference`` that binds the op through
      :func:`e3kernels.dispatch.call`: lowering traces only the implementation of the
      platform lowered for, and every backend composes with JAX's transformations the
      same way (``"reference"`` is the reference on every platform).
    """
    name = resolve_backend(backend)
    family = {"cpu": "reference", "cuda": "reference", "rocm": "reference", "tpu": "reference"}
    if name != "reference":
        pallas = kernels()
        if isinstance(pallas, str):
            if name == "pallas":
                raise NotImplementedError(
                    f"{op}: backend 'pallas' has no kernel for this call: {pallas}. "
                    "Use backend='reference' or 'auto'."
                )
        else:
            family = {"cpu": "interpret", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
            if name == "auto":
                family["cpu"] = "reference"
    implementations = {}
    for platform, kind in family.items():
        chosen = reference if kind == "reference" else pallas[kind]
        if isinstance(chosen, str):
            chosen = reference if name == "auto" else _refusal(op, platform, chosen)
        implementations[platform] = chosen
    key = None if key is None else (name, key)
    return lambda *args: dispatch.call(op, key, implementations, out, args, row_axes, out_row_axis,
                                       spaces, out_spaces)


def _refusal(op: str, platform: str, reason: str) -> Callable[..., Any]:
    """An implementation that refuses, when lowered for ``platform``, saying why."""

    def refuse(*args):
        raise NotImplementedError(
            f"{op}: backend 'pallas' has no {platform} kernel for this call: {reason}. "
            "Use backend='reference' or 'auto'."
        )

    return refuse
