"""A MACE-style model written for cuequivariance-jax, the way its own MACE example and
mace-jax's adapters wire the descriptors: the bench's ``cue`` workload and the parity
test of ``e3kernels.cue``.

Every equivariant op is a ``cuex.equivariant_polynomial`` call with ``method="naive"``
(what mace-jax runs on CPU and TPU):

* edge spherical harmonics: ``cue.descriptors.spherical_harmonics``;
* Linears: ``cue.descriptors.linear`` (shared weights);
* species skip: ``cue.descriptors.fully_connected_tensor_product`` against the one-hot
  species (mace-jax's ``FullyConnectedTensorProduct``);
* interaction: ``cue.descriptors.channelwise_tensor_product``, node features gathered by
  sender and messages scattered to receivers by ``indices`` (cuex's example), its weights
  a radial MLP of the edge lengths;
* product basis: the MACE ``symmetric_contraction`` descriptor, weights selected per node
  by its species through ``indices``.

The e3kernels candidate is the same function traced inside ``e3kernels.cue.routed``.
"""

from __future__ import annotations

import dataclasses

import cuequivariance as cue
import cuequivariance_jax as cuex
import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
from cuequivariance.group_theory.experimental.mace import symmetric_contraction


@dataclasses.dataclass(frozen=True)
class Config:
    channels: int = 128
    hidden: str = "0e + 1o"
    max_ell: int = 3
    correlation: int = 3
    species: int = 10
    layers: int = 2
    radial_basis: int = 8
    radial_hidden: int = 64
    r_max: float = 5.0
    avg_num_neighbors: float = 30.0


def _irreps(s: str) -> cue.Irreps:
    return cue.Irreps(cue.O3, s)


def _layer_descriptors(config: Config, first: bool, last: bool):
    c = config.channels
    node_in = _irreps(f"{c}x0e") if first else _irreps(config.hidden).set_mul(c)
    sh = _irreps(" + ".join(f"{ell}{'eo'[ell % 2]}" for ell in range(config.max_ell + 1)))
    hidden = _irreps("0e").set_mul(c) if last else _irreps(config.hidden).set_mul(c)
    conv = cue.descriptors.channelwise_tensor_product(node_in, sh, sh, True) * (1 / config.avg_num_neighbors)
    message = _irreps(str(sh)).set_mul(c)
    product, projection = symmetric_contraction(message, hidden, range(1, config.correlation + 1))
    return dict(
        up=cue.descriptors.linear(node_in, node_in),
        conv=conv,
        down=cue.descriptors.linear(conv.outputs[0].irreps, message),
        product=product,
        projection=np.asarray(projection),
        post=cue.descriptors.linear(hidden, hidden),
        skip=cue.descriptors.fully_connected_tensor_product(node_in, _irreps(f"{config.species}x0e"), hidden),
        readout=cue.descriptors.linear(hidden, _irreps("0e")),
    )


def descriptors(config: Config):
    return [_layer_descriptors(config, i == 0, i == config.layers - 1) for i in range(config.layers)]


def init(config: Config, key) -> dict:
    """Normal weights: linear and tensor-product weights as cuex's example draws them."""
    layers = []
    for d in descriptors(config):
        keys = iter(jax.random.split(key := jax.random.fold_in(key, len(layers)), 16))
        radial = [config.radial_basis] + [config.radial_hidden] * 3 + [d["conv"].inputs[0].dim]
        layers.append(dict(
            radial=[jax.random.normal(next(keys), shape) / np.sqrt(shape[0])
                    for shape in zip(radial, radial[1:])],
            **{name: jax.random.normal(next(keys), (d[name].inputs[0].dim,))
               for name in ("up", "down", "post", "skip", "readout")},
            product=jax.random.normal(next(keys), (config.species, len(d["projection"]), config.channels)),
        ))
    embed = jax.random.normal(jax.random.fold_in(key, 99), (config.species, config.channels))
    return dict(embed=embed, layers=layers)


def _radial_basis(lengths, config: Config):
    """Bessel functions times MACE's polynomial envelope, as ``e3kernels.models.mace``."""
    envelope = e3nn.poly_envelope(5, 2)(lengths / config.r_max)
    return e3nn.bessel(lengths, config.radial_basis, config.r_max) * envelope[:, None]


def energy(params, positions, species, senders, receivers, shifts, config: Config):
    """The total energy (the sum of every layer's per-atom readout) of a periodic structure
    (edges as :func:`e3kernels.models.mace.neighbor_list` gives them)."""
    rep = lambda irreps, array: cuex.RepArray(irreps, array, cue.ir_mul)
    naive = dict(method="naive")
    vectors = positions[receivers] - positions[senders] + shifts
    lengths = jnp.sqrt(jnp.sum(vectors**2, axis=1) + 1e-12)
    sh_poly = cue.descriptors.spherical_harmonics(cue.O3(1, -1), range(config.max_ell + 1))
    directions = rep(sh_poly.inputs[0].irreps, vectors / lengths[:, None])
    sh = cuex.equivariant_polynomial(sh_poly, [directions], **naive)
    radial = _radial_basis(lengths, config)
    one_hot = jax.nn.one_hot(species, config.species)
    nodes = params["embed"][species]
    total = 0.0
    for d, p in zip(descriptors(config), params["layers"]):
        x = rep(d["up"].inputs[1].irreps, nodes)
        skip = cuex.equivariant_polynomial(
            d["skip"], [rep(d["skip"].inputs[0].irreps, p["skip"]), x,
                        rep(d["skip"].inputs[2].irreps, one_hot)], **naive)
        x = cuex.equivariant_polynomial(d["up"], [rep(d["up"].inputs[0].irreps, p["up"]), x], **naive)
        h = radial
        for k, w in enumerate(p["radial"]):
            h = h @ w
            h = jax.nn.silu(h) if k < len(p["radial"]) - 1 else h
        x = cuex.equivariant_polynomial(
            d["conv"], [rep(d["conv"].inputs[0].irreps, h), x, sh],
            jax.ShapeDtypeStruct((nodes.shape[0], d["conv"].outputs[0].dim), nodes.dtype),
            indices=[None, senders, None, receivers], **naive)
        x = cuex.equivariant_polynomial(d["down"], [rep(d["down"].inputs[0].irreps, p["down"]), x], **naive)
        w = jnp.einsum("zau,ab->zbu", p["product"], jnp.asarray(d["projection"], nodes.dtype))
        x = cuex.equivariant_polynomial(
            d["product"], [rep(d["product"].inputs[0].irreps, w.reshape(config.species, -1)), x],
            indices=[species, None, None], **naive)
        x = cuex.equivariant_polynomial(d["post"], [rep(d["post"].inputs[0].irreps, p["post"]), x], **naive)
        nodes = x.array + skip.array
        out = cuex.equivariant_polynomial(
            d["readout"], [rep(d["readout"].inputs[0].irreps, p["readout"]), rep(x.irreps, nodes)], **naive)
        total = total + jnp.sum(out.array)
    return total


def energy_and_forces(params, positions, species, senders, receivers, shifts, config: Config):
    e, grad = jax.value_and_grad(energy, argnums=1)(params, positions, species, senders, receivers, shifts,
                                                    config)
    return e, -grad


def training_loss(params, positions, species, senders, receivers, shifts, projection, config: Config):
    """Energy and a fixed random projection of the forces (differentiates twice)."""
    e, forces = energy_and_forces(params, positions, species, senders, receivers, shifts, config)
    rows = positions.shape[0]
    return 0.3 * e / rows + jnp.sum(projection * forces) / rows
