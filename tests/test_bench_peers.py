"""The bench's peers of our convolution (bench/peers.py: InstaDeep's e3j, cuequivariance-jax)
compute what e3kernels' ``equivariant_convolution`` computes: output, gradients and the
force-style second order, on the bench's own kind of graph, after the layout mapping.
Skipped where a peer is not installed (CI installs ``.[test,lint]`` only)."""

from __future__ import annotations

import importlib.util

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import peers, workloads
from e3kernels.models import mace
from e3kernels.ops import convolution_plan, equivariant_convolution

CHANNELS = 8


def _requires(peer: str) -> None:
    for module in {"e3j": ["e3j"], "cuequivariance": ["cuequivariance", "cuequivariance_jax"]}[peer]:
        pytest.importorskip(module)


def _make_op(peer: str, plan, avg):
    if peer == "e3j":
        return peers.e3j_convolution(plan, avg, "UNFUSED")
    return peers.cue_convolution(plan, CHANNELS, avg, "naive")


@pytest.fixture(scope="module")
def graph():
    """A small random liquid, as the bench's convolution workload builds it: sender-sorted,
    symmetric edges, their harmonics and random per-edge weights."""
    plan = convolution_plan(workloads.KEEP, workloads.SH_IRREPS, workloads.SH_IRREPS)
    positions, _, cell = mace.random_liquid(6, neighbors=12, r_max=4.0, seed=3)
    senders, receivers, shifts = mace.neighbor_list(positions, cell, 4.0)
    vectors = jnp.asarray(positions[receivers] - positions[senders] + shifts @ cell, jnp.float32)
    sh = e3nn.spherical_harmonics(workloads.SH_IRREPS, vectors, normalize=True, normalization="component")
    sh = sh.array
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    x = jax.random.normal(keys[0], (len(positions), CHANNELS, plan.dim_in))
    weights = jax.random.normal(keys[1], (len(senders), plan.num_paths, CHANNELS))
    edges = (jnp.asarray(senders), jnp.asarray(receivers))
    return plan, (x, sh, weights, *edges), len(senders) / len(positions)


def _orders(op, args):
    """Output, gradients of a fixed projection w.r.t. x, sh and weights, and the gradients
    of ``sum(sin(d projection / d x))`` w.r.t. x and weights (force training)."""
    projection = jax.random.normal(jax.random.PRNGKey(5), jax.eval_shape(op, *args).shape)
    energy = lambda x, sh, w: jnp.sum(projection * op(x, sh, w, *args[3:]))
    force_loss = lambda x, sh, w: jnp.sum(jnp.sin(jax.grad(energy)(x, sh, w)))
    return {
        "output": jax.jit(op)(*args),
        "gradients": jax.jit(jax.grad(energy, argnums=(0, 1, 2)))(*args[:3]),
        "second order": jax.jit(jax.grad(force_loss, argnums=(0, 2)))(*args[:3]),
    }


@pytest.mark.parametrize("peer", ["e3j", "cuequivariance"])
def test_peer_matches_equivariant_convolution(peer, graph):
    _requires(peer)
    plan, args, avg = graph
    peers.check_sender_ordering(*args[3:])
    reference = lambda *a: equivariant_convolution(*a, plan, avg_num_neighbors=avg, backend="reference")
    ours = _orders(reference, args)
    theirs = _orders(_make_op(peer, plan, avg), args)
    for what in ours:
        peers.assert_parity(peer, theirs[what], ours[what], what)


@pytest.mark.parametrize("peer", ["e3j", "cuequivariance"])
def test_parity_check_catches_a_wrong_path_order(peer, graph):
    _requires(peer)
    plan, (x, sh, weights, senders, receivers), avg = graph
    op = _make_op(peer, plan, avg)
    ours = equivariant_convolution(x, sh, weights, senders, receivers, plan, avg_num_neighbors=avg)
    swapped = weights[:, ::-1]  # the paths in another order
    with pytest.raises(AssertionError, match=f"{peer}: its output differs"):
        peers.assert_parity(peer, op(x, sh, swapped, senders, receivers), ours)


def test_convolution_workload_checks_the_installed_peers():
    """The workload builds a candidate per installed peer, with our parameters, and its
    parity check passes on the workload's own inputs (it raises otherwise)."""
    installed = [p for p in ("e3j", "cuequivariance") if peers.unavailable(p, "cpu") is None]
    if not installed:
        pytest.skip("neither e3j nor cuequivariance-jax is installed")
    names = [c.name for c in workloads.convolution(8, "cpu")]
    expected = {"e3j": "e3j UNFUSED", "cuequivariance": "cuequivariance naive"}
    assert [n for n in names if n in expected.values()] == [expected[p] for p in installed]


def test_a_missing_peer_is_skipped_with_its_reason(monkeypatch, capsys):
    real = importlib.util.find_spec
    hide_e3j = lambda name, *a: None if name == "e3j" else real(name, *a)
    monkeypatch.setattr(importlib.util, "find_spec", hide_e3j)
    names = [name for name, _ in peers.peer_ops("cpu")]
    assert not any(name.startswith("e3j") for name in names)
    assert 'e3j skipped: e3j is not installed (pip install "e3j[ops]==0.1.*"' in capsys.readouterr().err


def test_sender_ordering_check():
    peers.check_sender_ordering(np.array([0, 0, 1, 2]), np.array([1, 2, 0, 0]))
    with pytest.raises(ValueError, match="sorted by sender"):
        peers.check_sender_ordering(np.array([1, 0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="symmetric"):
        peers.check_sender_ordering(np.array([0, 1]), np.array([1, 2]))
