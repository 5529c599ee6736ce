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
SCALAR = jax.ShapeDtypeStruct((), jnp.float32)


def _lowered(name, platform):
    f = lambda x: backend.select("op", name, reference, lambda: FAKE_KERNELS, SCALAR)(x)
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
    f = lambda x: backend.select("op", None, reference, lambda: FAKE_KERNELS, SCALAR)(x)
    with e3kernels.use_backend("pallas"):
        assert float(f(jnp.float32(1))) == 4.0
    with e3kernels.use_backend("reference"):
        assert float(f(jnp.float32(1))) == 2.0
    assert float(f(jnp.float32(1))) == 2.0  # auto on CPU: the reference


def test_pallas_without_kernel_is_an_error_auto_falls_back():
    match = r"my_op: backend 'pallas' has no kernel for this call: orders > 4"
    with pytest.raises(NotImplementedError, match=match):
        backend.select("my_op", "pallas", reference, lambda: "orders > 4", SCALAR)
    auto = backend.select("my_op", "auto", reference, lambda: "orders > 4", SCALAR)
    for platform in ("cpu", "cuda", "tpu"):
        text = jax.jit(auto).trace(jnp.float32(1)).lower(lowering_platforms=(platform,)).as_text()
        assert "1.000000e+00" in text  # x + 1: the reference


def test_reference_never_asks_for_kernels():
    def no_kernels():
        raise AssertionError("the reference path must not plan kernels")

    f = backend.select("my_op", "reference", reference, no_kernels, SCALAR)
    assert float(f(jnp.float32(1))) == 2.0


def _recording_kernels():
    """Fake kernels that record which ones were traced."""
    traced = []

    def make(name, result):
        def f(x):
            traced.append(name)
            return x * result

        return f

    kernels = dict(gpu=make("gpu", 2.0), tpu=make("tpu", 3.0), interpret=make("interpret", 4.0))
    return traced, kernels


@pytest.mark.parametrize("platform, expected", [("cpu", []), ("cuda", ["gpu"]), ("tpu", ["tpu"])])
def test_lowering_traces_only_the_platform_lowered_for(platform, expected):
    traced, kernels = _recording_kernels()

    def f(x):
        return backend.select("op", "auto", reference, lambda: kernels, SCALAR)(x)

    grad = jax.jit(jax.grad(jax.grad(f)))
    traced_program = grad.trace(jnp.float32(1))
    assert traced == []  # tracing binds the op; no implementation is traced yet
    traced_program.lower(lowering_platforms=(platform,))
    assert set(traced) == set(expected)


def test_multi_platform_lowering_carries_each_platform_implementation():
    traced, kernels = _recording_kernels()
    f = lambda x: backend.select("op", "auto", reference, lambda: kernels, SCALAR)(x)
    text = jax.jit(f).trace(jnp.float32(1)).lower(lowering_platforms=("cuda", "tpu", "cpu")).as_text()
    assert set(traced) == {"gpu", "tpu"}
    for constant in ("1.000000e+00", "2.000000e+00", "3.000000e+00"):  # reference, gpu, tpu
        assert constant in text
    assert "4.000000e+00" not in text  # interpret mode is not part of "auto"


def test_pallas_refuses_per_platform_when_lowered_there():
    kernels = dict(FAKE_KERNELS, tpu="no float64 on TPU")
    f = lambda x: backend.select("op", "pallas", reference, lambda: kernels, SCALAR)(x)
    jax.jit(f).trace(jnp.float32(1)).lower(lowering_platforms=("cuda",))  # fine
    with pytest.raises(NotImplementedError, match=r"op: backend 'pallas' has no tpu kernel.*no float64"):
        jax.jit(f).trace(jnp.float32(1)).lower(lowering_platforms=("tpu",))
    g = lambda x: backend.select("op", "auto", reference, lambda: kernels, SCALAR)(x)
    text = jax.jit(g).trace(jnp.float32(1)).lower(lowering_platforms=("tpu",)).as_text()
    assert "1.000000e+00" in text  # auto: the reference where no kernel handles the call


def test_cuda_lowering_without_a_gpu_asks_for_gpu_target():
    """JAX >= 0.11 lowers Triton kernels for a known GPU: on a host without one, and without
    ``e3kernels.gpu_target``, the error says what to do; JAX 0.10 lowers without one."""
    from e3kernels import dispatch, ops

    plan = ops.linear_plan("2x0e + 1o", "1x0e + 1o")
    x, i = jnp.ones((4, plan.dim_in)), jnp.arange(4) % 2
    w = [jnp.ones(s) for s in plan.weight_shapes(2)]
    f = jax.jit(lambda x, w, i: ops.indexed_linear(x, w, i, plan, backend="pallas"))
    lower = lambda: f.trace(x, w, i).lower(lowering_platforms=("cuda",)).as_text()
    token = dispatch._gpu_target.set(None)  # undo the autouse fixture's target
    try:
        if jax.__version_info__ >= (0, 11):
            expected = r"indexed_linear: .*e3kernels.gpu_target\('NVIDIA H100'\)"
            with pytest.raises(RuntimeError, match=expected):
                lower()
        else:
            assert "triton" in lower()
    finally:
        dispatch._gpu_target.reset(token)
    with e3kernels.gpu_target("NVIDIA A100"):
        assert "triton" in lower()
    with pytest.raises(ValueError, match=r"gpu_target: expected an NVIDIA device kind"):
        with e3kernels.gpu_target("sm_90"):
            pass
