"""``python -m bench.compile_check``: every kernel compiled by the real TPU and GPU compilers,
on a machine without either device.

Lowering a Pallas kernel is not compiling it: Mosaic's layout rules, Triton's pipeline to
PTX and ptxas only run at ``.compile()``. JAX can compile for devices it does not have:

* TPU: ``jax.experimental.topologies.get_topology_desc("v5e:2x2", "tpu")`` gives compile-only
  devices (``libtpu``, from ``jax[tpu]``); a program compiled on one of them runs Mosaic.
* GPU: the CUDA plugin (``jax[cuda12-local]``, no CUDA runtime needed) gives a compile-only
  device for a target description (``bench/gpu_targets/*.txtpb``: compute capability,
  shared memory, registers). XLA then runs Triton to PTX and ptxas; ``--xla_dump_to``
  keeps the PTX and the launch of every kernel (grid, threads, shared memory), and
  ``ptxas -v`` on that PTX gives registers and spills.

Every entry point of the three ops (forward, gradient, second order) is compiled at the
bench's MACE-M sizes for each target (the convolution: 4000 nodes, 120000 edges); the
indexed Linear at each matmul precision; the three ops at a million edges or rows, forward
and gradient (the sizes where per-edge index data in SMEM, or per-edge temporaries, stop a
program from compiling); and the bench's complete MACE model (1000 atoms), energy+forces
and training step, every op on the kernels. Each entry reports its compile seconds and its
temporary memory (XLA's memory analysis), beside its kernels' figures. A control
kernel that the compiler must reject proves it ran. Prints one table per target and
writes JSON to ``bench/results/``. ``make compile-check`` installs what it needs into
``.venv-compile``.
"""

from __future__ import annotations

import os

# Before JAX starts: the CPU is the only real platform (the CUDA plugin then registers
# without looking for a driver), and XLA keeps what it compiles for GPU targets.
os.environ["JAX_PLATFORMS"] = "cpu"

import argparse  # noqa: E402
import base64  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from bench import peers  # noqa: E402
from bench.workloads import CHANNELS, KEEP, LINEAR_IRREPS, NODE_IRREPS, ORDERS, SPECIES  # noqa: E402
from e3kernels import ops  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GPU_TARGETS = Path(__file__).parent / "gpu_targets"
TPU_TOPOLOGIES = {"TPU v5e": "v5e:2x2", "TPU v6e": "v6e:2x2"}
GPU_SPECS = {"H100": "h100_sxm.txtpb", "H200": "h200.txtpb"}
ROWS = 4000
#: edges (convolution) and rows (indexed Linear, symmetric contraction) of the large entries
MILLION = 1_000_000
#: the names our pallas_calls give their kernels
KERNEL_NAMES = ("indexed_linear_gpu", "indexed_linear_weight_grad_gpu", "sparse_polynomial",
                "sparse_row_reduction", "indexed_linear_tpu", "indexed_linear_weight_grad_tpu",
                "convolution_node_partial", "convolution_weights_partial", "convolution_sh_partial",
                "convolution_hidden_partial", "convolution_matrix_partial")
#: the radial network's last hidden layer in MACE (radial_MLP [64, 64, 64]): fused entries
RADIAL_HIDDEN = 64
#: and e3j's Mosaic convolution, compiled beside ours for the TPU targets (bench/peers.py)
KERNEL_NAMES += peers.E3J_TPU_KERNEL_NAMES


@dataclasses.dataclass
class Kernel:
    """One compiled kernel of one entry point (GPU figures from ptxas and XLA's launch)."""

    target: str
    entry: str
    kernel: str
    grid: str = "-"
    shared_bytes: int | None = None
    registers: int | None = None
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    tensor_core_instructions: int | None = None
    #: TPU: whether the Mosaic module has a matmul (``tpu.matmul``, which runs on the MXU)
    mxu_matmul: bool | None = None
    #: the kernel's code as the compiler gets it: PTX bytes (GPU), serialized Mosaic module
    #: bytes (TPU)
    code_bytes: int | None = None
    error: str | None = None
    #: the entry's compile time and XLA temporaries (the same on each of its kernels' rows)
    compile_seconds: float | None = None
    temp_bytes: int | None = None


# ---- the entry points ---------------------------------------------------------------------


def _entry_points() -> list[tuple[str, Callable, tuple]]:
    """``(name, function, argument types)`` for every entry point at MACE-M sizes."""
    entries = []
    f32 = jnp.float32
    linear = ops.linear_plan(LINEAR_IRREPS, LINEAR_IRREPS)
    x = jax.ShapeDtypeStruct((ROWS, linear.dim_in), f32)
    w = [jax.ShapeDtypeStruct(s, f32) for s in linear.weight_shapes(SPECIES)]
    i = jax.ShapeDtypeStruct((ROWS,), jnp.int32)
    projection = np.random.default_rng(0).standard_normal((ROWS, linear.dim_out)).astype(np.float32)
    for precision in ("DEFAULT", "HIGH", "HIGHEST"):
        def apply(x, w, i, precision=lax.Precision[precision]):
            return ops.indexed_linear(x, w, i, linear, backend="pallas", precision=precision)

        entries += _three_orders(f"indexed_linear {precision}", apply, (x, w, i), projection)

    plan = ops.symmetric_contraction_plan(NODE_IRREPS, ORDERS, keep_irrep_out=KEEP)
    xs = jax.ShapeDtypeStruct((ROWS, CHANNELS, plan.dim_in), f32)
    ws = [jax.ShapeDtypeStruct((SPECIES, p.mul, CHANNELS), f32) for p in plan.paths]
    projection = np.random.default_rng(1).standard_normal((ROWS, CHANNELS, plan.dim_out)).astype(np.float32)

    def contract(x, w, i):
        return ops.symmetric_contraction(x, w, plan, indices=i, backend="pallas")

    entries += _three_orders("symmetric_contraction", contract, (xs, ws, i), projection)

    # MACE's second interaction: 128x(0e+1o) convolved with l <= 3, 30 neighbours per node
    conv = ops.convolution_plan(KEEP, NODE_IRREPS, NODE_IRREPS)
    edges = 30 * ROWS
    xc = jax.ShapeDtypeStruct((ROWS, CHANNELS, conv.dim_in), f32)
    per_edge = (jax.ShapeDtypeStruct((edges, conv.dim_sh), f32),
                jax.ShapeDtypeStruct((edges, conv.num_paths, CHANNELS), f32))
    index = (jax.ShapeDtypeStruct((edges,), jnp.int32),) * 2
    projection = np.random.default_rng(2).standard_normal((ROWS, CHANNELS, conv.dim_out)).astype(np.float32)

    def convolve(x, per_edge, index):
        return ops.equivariant_convolution(x, *per_edge, *index, conv, avg_num_neighbors=30.0,
                                           backend="pallas")

    entries += _three_orders("equivariant_convolution", convolve, (xc, per_edge, index), projection)
    entries += _three_orders("equivariant_convolution fused radial", _fused_convolve(conv),
                             (xc, _radial_inputs(conv, edges), index), projection)
    return entries + _million_entries() + _mace_entries() + _cue_entries()


def _radial_inputs(conv, edges):
    """``(sh, hidden, matrix)``: the weights as the radial network's last layer, fused."""
    f32 = jnp.float32
    return (jax.ShapeDtypeStruct((edges, conv.dim_sh), f32),
            jax.ShapeDtypeStruct((edges, RADIAL_HIDDEN), f32),
            jax.ShapeDtypeStruct((RADIAL_HIDDEN, conv.num_paths * CHANNELS), f32))


def _fused_convolve(conv):
    def convolve(x, radial, index):
        sh, hidden, matrix = radial
        return ops.equivariant_convolution(x, sh, ops.RadialWeights(hidden, matrix), *index, conv,
                                           avg_num_neighbors=30.0, backend="pallas")

    return convolve


def _million_entries():
    """Forward and gradient at a million edges (the convolution, MACE-M's second interaction,
    30,000 nodes) or rows. The row ops use smaller irreps than above so that inputs, outputs
    and their padded kernel layouts fit a v5e's 15.75 GB: ``128x0e+128x1o`` for the Linear
    (2 GB per array), ``0e+1o`` inputs for the contraction."""
    f32 = jnp.float32
    conv = ops.convolution_plan(KEEP, NODE_IRREPS, NODE_IRREPS)
    nodes = MILLION // 30
    x = jax.ShapeDtypeStruct((nodes, CHANNELS, conv.dim_in), f32)
    per_edge = (jax.ShapeDtypeStruct((MILLION, conv.dim_sh), f32),
                jax.ShapeDtypeStruct((MILLION, conv.num_paths, CHANNELS), f32))
    index = (jax.ShapeDtypeStruct((MILLION,), jnp.int32),) * 2

    def convolve(x, per_edge, index):
        return ops.equivariant_convolution(x, *per_edge, *index, conv, avg_num_neighbors=30.0,
                                           backend="pallas")

    irreps = f"{CHANNELS}x0e + {CHANNELS}x1o"
    linear = ops.linear_plan(irreps, irreps)
    rows = jax.ShapeDtypeStruct((MILLION, linear.dim_in), f32)
    weights = [jax.ShapeDtypeStruct(s, f32) for s in linear.weight_shapes(SPECIES)]
    species = jax.ShapeDtypeStruct((MILLION,), jnp.int32)

    def apply(x, w, i):
        return ops.indexed_linear(x, w, i, linear, backend="pallas")

    plan = ops.symmetric_contraction_plan(KEEP, ORDERS, keep_irrep_out=KEEP)
    xs = jax.ShapeDtypeStruct((MILLION, CHANNELS, plan.dim_in), f32)
    ws = [jax.ShapeDtypeStruct((SPECIES, p.mul, CHANNELS), f32) for p in plan.paths]

    def contract(x, w, i):
        return ops.symmetric_contraction(x, w, plan, indices=i, backend="pallas")

    return (_two_orders("equivariant_convolution 1M edges", convolve, (x, per_edge, index))
            + _two_orders("equivariant_convolution fused radial 1M edges", _fused_convolve(conv),
                          (x, _radial_inputs(conv, MILLION), index))
            + _two_orders("indexed_linear 1M rows", apply, (rows, weights, species))
            + _two_orders("symmetric_contraction 1M rows", contract, (xs, ws, species)))


#: entries of e3nn-jax's modules: the baseline, with no kernel of ours to find
BASELINE = "e3nn-jax"
#: the cue model's baseline: cuex's portable method, no kernel of ours either
CUE_BASELINE = "cuex naive"


def is_baseline(entry: str) -> bool:
    return BASELINE in entry or CUE_BASELINE in entry


def _mace_entries(atoms: int = 1000):
    """The bench's complete model (``mace`` workload, GPU size: 1000 atoms, ~30 neighbours
    each), energy and forces and the training step's gradient: every op on the kernels,
    and e3nn-jax's modules beside it."""
    from bench.workloads import mace_model

    return _model_entries("mace", mace_model(atoms, "gpu"), BASELINE, "e3kernels pallas")


def _cue_entries(atoms: int = 1000):
    """The bench's ``cue`` model (GPU size) traced inside ``e3kernels.cue.routed`` on the
    kernels, and all-cuex (``naive``, its portable method) beside it."""
    from bench.workloads import cue_model, has_cuequivariance

    if not has_cuequivariance():
        return []
    return _model_entries("cue", cue_model(atoms, "gpu"), CUE_BASELINE, "e3kernels.cue pallas")


def _model_entries(model: str, candidates, baseline: str, ours: str):
    """Energy and forces, and the training step, of the ``baseline`` and ``ours`` candidates."""
    entries = []
    for candidate in candidates:
        if candidate.name not in (baseline, ours):
            continue
        suffix = f" ({baseline})" if candidate.name == baseline else ""
        args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), candidate.args)
        entries += [(f"{model} energy+forces{suffix}", candidate.fwd, args),
                    (f"{model} training step{suffix}", candidate.fwd_bwd, args)]
    return entries


def _two_orders(name, apply, args):
    """The forward pass and the gradient of ``sum(sin(out))``: a cotangent computed in the
    program, where a projection array as :func:`_three_orders`' would be a constant of the
    output's size."""

    def energy(x, w, i):
        return jnp.sum(jnp.sin(apply(x, w, i)))

    return [(f"{name} fwd", apply, args), (f"{name} grad", jax.grad(energy, argnums=(0, 1)), args)]


def _three_orders(name, apply, args, projection):
    """The forward pass, the gradient of a fixed projection, and the gradient of a loss on
    the input gradient (force training: second order)."""

    def energy(x, w, i):
        return jnp.sum(projection * apply(x, w, i))

    def force_loss(x, w, i):
        return jnp.sum(jnp.sin(jax.grad(energy)(x, w, i)))

    return [
        (f"{name} fwd", apply, args),
        (f"{name} grad", jax.grad(energy, argnums=(0, 1)), args),
        (f"{name} 2nd order", jax.grad(force_loss, argnums=(0, 1)), args),
    ]


# ---- compiling for a target ---------------------------------------------------------------


def _lowered(fn, args, device, platform):
    """``fn`` lowered for one compile-only ``device``, its arguments placed there. Pallas'
    TPU lowering asks the current device for its kind, so this runs under its mesh (of one
    device: with several, the ops' row partitioning would need a partitioner that
    compile-only clients lack)."""
    mesh = jax.sharding.Mesh(np.array([device]), ("d",))
    sharding = NamedSharding(mesh, P())
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    # traced outside the mesh: constants computed eagerly while tracing (e3nn's activation
    # normalisation in the model's MLPs) run on the host, not on the compile-only device
    traced = jax.jit(fn).trace(*args)
    with jax.set_mesh(mesh):
        return traced.lower(lowering_platforms=(platform,))


def _compile(fn, args, device, platform, options=None):
    return _lowered(fn, args, device, platform).compile(compiler_options=options)


def _timed_compile(fn, args, device, platform, options=None):
    """The compiled program and its figures: compile seconds (lowering included) and XLA's
    temporary bytes."""
    start = time.perf_counter()
    compiled = _compile(fn, args, device, platform, options)
    seconds = time.perf_counter() - start
    return compiled, {"compile_seconds": seconds, "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}


def tpu_target(name: str, device, entries, progress) -> list[Kernel]:
    kernels = []
    for entry, fn, args in entries:
        progress(f"  {name}: {entry}")
        try:
            compiled, figures = _timed_compile(fn, args, device, "tpu")
        except Exception as error:  # noqa: BLE001 - reported per entry, the check goes on
            kernels.append(Kernel(name, entry, "-", error=_short(error)))
            continue
        found = _mosaic_kernels(compiled.as_text())
        if found:
            kernels += [Kernel(name, entry, k, code_bytes=size, mxu_matmul=mxu, **figures)
                        for k, size, mxu in found]
        else:
            error = None if is_baseline(entry) else "no kernel"
            kernels.append(Kernel(name, entry, "-", error=error, **figures))
    return kernels


def _mosaic_kernels(hlo_text: str) -> list[tuple[str, int, bool | None]]:
    """``(name, serialized Mosaic module bytes, has an MXU matmul)`` of each TPU custom call of
    ours. The module is MLIR bytecode, whose string table names each op kind it uses once:
    ``matmul`` is there exactly when the kernel has a ``tpu.matmul``."""
    found = []
    for line in hlo_text.splitlines():
        if "tpu_custom_call" not in line:
            continue
        name = next((k for k in KERNEL_NAMES if re.search(rf"\b{k}\b", line)), None)
        body = re.search(r'"body":"([A-Za-z0-9+/=]*)"', line)  # the base64 Mosaic module
        if name is not None:
            module = base64.b64decode(body.group(1)) if body else None
            has_matmul = None if module is None else b"matmul" in module
            found.append((name, len(module) if module else 0, has_matmul))
    return found


def gpu_target(name: str, device, entries, ptxas: str, progress) -> list[Kernel]:
    kernels = []
    for entry, fn, args in entries:
        progress(f"  {name}: {entry}")
        with tempfile.TemporaryDirectory() as dump:
            try:
                # XLA's own dots through cuBLAS: without a device, its Triton GEMM fusions
                # cannot be autotuned and some fail to find tile sizes (the model's Linears)
                _, figures = _timed_compile(fn, args, device, "cuda",
                                            {"xla_dump_to": dump, "xla_gpu_enable_triton_gemm": False})
            except Exception as error:  # noqa: BLE001
                kernels.append(Kernel(name, entry, "-", error=_short(error)))
                continue
            found = _gpu_kernels(name, entry, Path(dump), ptxas)
            if is_baseline(entry) and all(k.kernel == "-" for k in found):
                found = [Kernel(name, entry, "-")]  # no kernel of ours: expected
            kernels += [dataclasses.replace(k, **figures) for k in found]
    return kernels


def _gpu_device(spec: str):
    config = (GPU_TARGETS / spec).read_text()
    return topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=config).devices[0]


def _gpu_kernels(target: str, entry: str, dump: Path, ptxas: str) -> list[Kernel]:
    """Our kernels in an XLA dump: launch from the thunk sequence, resources from ptxas."""
    launches = []
    for path in dump.glob("*thunk_sequence.txt"):
        for line in path.read_text().splitlines():
            m = re.search(r"kCustomKernel.*?\s(\w+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+"
                          r"shared_memory: (\d+)", line)
            if m and m.group(1) in KERNEL_NAMES:
                launches.append((m.group(1), m.group(2).replace(" ", ""), int(m.group(4))))
    ptx_by_name: dict[str, list[Path]] = {}
    for path in sorted(dump.glob("*.ptx")):
        m = re.search(r"\.entry (\w+)\(", path.read_text())
        if m and m.group(1) in KERNEL_NAMES:
            ptx_by_name.setdefault(m.group(1), []).append(path)
    kernels, compiled = [], {}
    for name, grid, shared in launches:
        kernel = Kernel(target, entry, name, grid=grid, shared_bytes=shared)
        candidates = ptx_by_name.get(name, [])
        if candidates:
            ptx = candidates.pop(0)
            text = ptx.read_text()
            kernel.tensor_core_instructions = len(re.findall(r"\b(?:w?gmma|mma)\.", text))
            kernel.code_bytes = len(text.encode())
            _ptxas(kernel, ptx, ptxas)
            compiled.setdefault(name, []).append(kernel)
        else:  # never a silent pass: without the PTX, registers and spills are unknown
            kernel.error = ("no PTX for this kernel in XLA's dump (XLA from JAX 0.11 on does not "
                            "write Triton's PTX there): registers and spills unchecked")
        kernels.append(kernel)
    for kernel in kernels:
        # XLA compiles identical kernels once and launches the one binary again (its kernel
        # reuse cache): a launch without PTX of its own, whose name has PTX, is one of those.
        # It gets the worst registers and spills of that name's compiled kernels, no code.
        same = compiled.get(kernel.kernel, [])
        if kernel.error and "no PTX" in kernel.error and same and all(k.error is None for k in same):
            worst = max(same, key=lambda k: (k.spill_store_bytes or 0, k.registers or 0))
            kernel.kernel += " (reused)"
            kernel.error = None
            kernel.registers = worst.registers
            kernel.spill_store_bytes = worst.spill_store_bytes
            kernel.spill_load_bytes = worst.spill_load_bytes
    return kernels or [Kernel(target, entry, "-", error="no kernel in the dump")]


def _ptxas(kernel: Kernel, ptx: Path, ptxas: str) -> None:
    arch = re.search(r"\.target (sm_\w+)", ptx.read_text()).group(1)
    run = subprocess.run([ptxas, f"-arch={arch}", "-v", str(ptx), "-o", os.devnull],
                         capture_output=True, text=True)
    report = run.stderr + run.stdout
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if run.returncode or not registers:
        kernel.error = f"ptxas: {report.strip()[-200:]}"
        return
    kernel.registers = int(registers.group(1))
    stores, loads = spills.groups() if spills else (0, 0)
    kernel.spill_store_bytes, kernel.spill_load_bytes = int(stores), int(loads)


# ---- the control kernels: what the compilers must reject ----------------------------------


def _control_gpu(x_ref, y_ref, o_ref):
    o_ref[...] = jnp.dot(x_ref[...], y_ref[...])  # 512^3 float32 operands: 2 MiB of shared memory


def _control_tpu(x_ref, o_ref):
    # flattening a (16, 130) tile: a shape cast Mosaic's layout inference rejects
    o_ref[...] = x_ref[...].reshape(16 * 130)[:128].reshape(1, 128)


def control_rejected(platform: str, device) -> str | None:
    """The compiler's error on a kernel it must reject, or ``None`` if it compiled it.
    The kernel must lower: a rejection before the compiler runs proves nothing."""
    if platform == "cuda":
        spec = jax.ShapeDtypeStruct((512, 512), jnp.float32)
        fn = pl.pallas_call(_control_gpu, out_shape=spec, compiler_params=plgpu.CompilerParams())
        args = (spec, spec)
    else:
        spec = jax.ShapeDtypeStruct((16, 130), jnp.float32)
        fn = pl.pallas_call(_control_tpu, out_shape=jax.ShapeDtypeStruct((1, 128), jnp.float32))
        args = (spec,)
    lowered = _lowered(fn, args, device, platform)  # it must reach the compiler to prove anything
    try:
        lowered.compile()
    except Exception as error:  # noqa: BLE001 - the rejection is the expected outcome
        return _short(error)
    return None


def _short(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}"
    lines = [line for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2])[:300]


# ---- report ---------------------------------------------------------------------------------


def table(kernels: list[Kernel]) -> str:
    header = ("| entry point | compile s | temporaries MB | kernel | grid | shared memory B | registers "
              "| spill stores / loads B | tensor-core instrs (GPU) / MXU matmul (TPU) | error |")
    lines = [header, "|" + "---|" * 10]
    for k in kernels:
        spills = "-" if k.spill_store_bytes is None else f"{k.spill_store_bytes} / {k.spill_load_bytes}"
        seconds = "-" if k.compile_seconds is None else f"{k.compile_seconds:.1f}"
        temporaries = "-" if k.temp_bytes is None else f"{k.temp_bytes / 2**20:.0f}"
        lines.append(
            f"| {k.entry} | {seconds} | {temporaries} | {k.kernel} | {k.grid} | {_dash(k.shared_bytes)} "
            f"| {_dash(k.registers)} "
            f"| {spills} | {_matmul_units(k)} | {k.error or ''} |"
        )
    return "\n".join(lines)


def entry_table(kernels: list[Kernel]) -> str:
    """Per entry point: compile seconds, temporaries, how many of our kernels it launches
    and their total code (PTX or Mosaic bytes); e3nn-jax's entries beside ours."""
    entries: dict[str, list[Kernel]] = {}
    for k in kernels:
        entries.setdefault(k.entry, []).append(k)
    lines = ["| entry point | compile s | temporaries MB | our kernel launches | compiled kernels "
             "| kernel code kB |", "|---|---|---|---|---|---|"]
    for entry, ks in entries.items():
        first, ours = ks[0], [k for k in ks if k.kernel != "-"]
        compiled = [k for k in ours if not k.kernel.endswith("(reused)")]
        seconds = "-" if first.compile_seconds is None else f"{first.compile_seconds:.1f}"
        temporaries = "-" if first.temp_bytes is None else f"{first.temp_bytes / 2**20:.0f}"
        code = sum(k.code_bytes or 0 for k in ours) / 1e3
        lines.append(f"| {entry} | {seconds} | {temporaries} | {len(ours)} | {len(compiled)} | {code:.0f} |")
    return "\n".join(lines)


def _matmul_units(k: Kernel) -> str:
    if k.mxu_matmul is not None:
        return "MXU" if k.mxu_matmul else "none"
    return _dash(k.tensor_core_instructions)


def _dash(value) -> str:
    return "-" if value is None else str(value)


def _find_ptxas() -> str | None:
    found = shutil.which("ptxas")
    if found:
        return found
    try:
        import nvidia.cuda_nvcc  # the nvidia-cuda-nvcc wheel
    except ImportError:
        return None
    path = Path(next(iter(nvidia.cuda_nvcc.__path__))) / "bin" / "ptxas"
    return str(path) if path.exists() else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default=",".join(list(TPU_TOPOLOGIES) + list(GPU_SPECS)),
                        help="comma-separated subset of the targets")
    parser.add_argument("--entries", default="", help="only entry points whose name contains this")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TPU_TOPOLOGIES and t not in GPU_SPECS]
    if unknown:
        parser.error(f"--targets: unknown {unknown}; expected names from "
                     f"{list(TPU_TOPOLOGIES) + list(GPU_SPECS)}")
    progress = lambda message: print(message, file=sys.stderr, flush=True)
    entries = [e for e in _entry_points() if args.entries in e[0]]
    ptxas = _find_ptxas()
    progress(f"compile check: jax {jax.__version__}, {len(entries)} entry points, targets {targets}")

    report, failed = {}, []
    for target in targets:
        start = time.perf_counter()
        if target in TPU_TOPOLOGIES:
            device = topologies.get_topology_desc(TPU_TOPOLOGIES[target], "tpu").devices[0]
            control = control_rejected("tpu", device)
            peer_entries = peers.e3j_tpu_entries(device, ROWS, CHANNELS, _three_orders, args.entries)
            kernels = tpu_target(target, device, entries + peer_entries, progress)
        else:
            if ptxas is None:
                failed.append(f"{target}: no ptxas (install nvidia-cuda-nvcc-cu12)")
                continue
            device = _gpu_device(GPU_SPECS[target])
            control = control_rejected("cuda", device)
            kernels = gpu_target(target, device, entries, ptxas, progress)
        seconds = time.perf_counter() - start
        print(f"\n### {target} ({device.device_kind}), {seconds:.0f} s\n")
        print(f"control kernel rejected: {control or 'NO: the compiler accepted it'}\n")
        print(table(kernels))
        print(f"\nPer entry point:\n\n{entry_table(kernels)}", flush=True)
        if control is None:
            failed.append(f"{target}: the control kernel compiled, so the compiler did not run")
        failed += [f"{target}: {k.entry}: {k.error}" for k in kernels if k.error]
        failed += [f"{target}: {k.entry}: {k.kernel} spills" for k in kernels if k.spill_store_bytes]
        report[target] = {"device_kind": device.device_kind, "seconds": seconds, "control_rejected": control,
                          "kernels": [dataclasses.asdict(k) for k in kernels]}

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compile-check-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"jax": jax.__version__, "targets": report, "failures": failed}, indent=1))
    progress(f"wrote {path}")
    if failed:
        print("\nFailures:\n" + "\n".join(f"- {f}" for f in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
