"""Backend selection: names, precedence, per-platform resolution of "auto", errors."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import e3kernels
from e3kernels import backend


@pytest.fixture(autouse=True)
def restore_global_setting():
    saved = backend._global_setting
    yield
    backend._global_setting = saved


def test_precedence_argument_context_setter():
    e3kernels.set_backend("reference")
    assert e3kernels.get_backend() == "reference"
    with e3kernels.use_backend("pallas"):
        assert e3kernels.get_backend() == "pallas"
        with e3kernels.use_backend("auto"):
            assert backend.resolve_backend() == "auto"
            assert backend.resolve_backend("reference") == "reference"  # argument wins
        assert e3kernels.get_backend() == "pallas"
    assert e3kernels.get_backend() == "reference"


def _python(code: str, env_value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, E3KERNELS_BACKEND=env_value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_environment_variable_is_the_default_and_setter_overrides_it():
    code = (
        "import e3kernels; print(e3kernels.get_backend()); "
        "e3kernels.set_backend('auto'); print(e3kernels.get_backend())"
    )
    result = _python(code, "reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["reference", "auto"]


def test_environment_variable_must_be_valid():
    result = _python("import e3kernels", "triton")
    assert result.returncode != 0
    expected = "environment variable E3KERNELS_BACKEND: expected one of 'auto', 'reference', 'pallas'"
    assert f"{expected}; got 'triton'" in result.stderr


@pytest.mark.parametrize("bad", ["gpu", "Reference", None, 3])
def test_unknown_names(bad):
    with pytest.raises(ValueError, match=r"expected one of 'auto', 'reference', 'pallas'"):
        e3kernels.set_backend(bad)
    with pytest.raises(ValueError, match=r"expected one of"):
        e3kernels.use_backend(bad)


FAKE_KERNELS = dict(
    gpu=lambda x: x * 2.0, tpu=lambda x: x * 3.0, interpret=lambda x: x * 4.0
)
reference = lambda x: x + 1.0


def _lowered(name, platform):
    f = lambda x: backend.select("op", name, reference, lambda: FAKE_KERNELS)(x)
    return jax.jit(f).trace(jnp.float32(1)).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize(
    "name, platform, constant",
    [
        ("auto", "cpu", "1.000000e+00"),  # reference: x + 1
        ("auto", "cuda", "2.000000e+00"),
        ("auto", "tpu", "3.000000e+00"),
        ("pallas", "cpu", "4.000000e+00"),  # interpret mode on CPU
        ("pallas", "cuda", "2.000000e+00"),
        ("reference", "cuda", "1.000000e+00"),
    ],
)
def test_auto_resolves_per_lowering_platform(name, platform, constant):
    text = _lowered(name, platform)
    consts = {c for c in ("1.000000e+00", "2.000000e+00", "3.000000e+00", "4.000000e+00") if c in text}
    assert consts == {constant}


def test_resolution_follows_the_setting_at_trace_time():
    f = lambda x: backend.select("op", None, reference, lambda: FAKE_KERNELS)(x)
    with e3kernels.use_backend("pallas"):
        assert float(f(jnp.float32(1))) == 4.0
    with e3kernels.use_backend("reference"):
        assert float(f(jnp.float32(1))) == 2.0
    assert float(f(jnp.float32(1))) == 2.0  # auto on CPU: the reference


def test_pallas_without_kernel_is_an_error_auto_falls_back():
    match = r"my_op: backend 'pallas' has no kernel for this call: orders > 4"
    with pytest.raises(NotImplementedError, match=match):
        backend.select("my_op", "pallas", reference, lambda: "orders > 4")
    assert backend.select("my_op", "auto", reference, lambda: "orders > 4") is reference


def test_reference_never_asks_for_kernels():
    def no_kernels():
        raise AssertionError("the reference path must not plan kernels")

    assert backend.select("my_op", "reference", reference, no_kernels) is reference
