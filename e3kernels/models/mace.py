r"""MACE, an equivariant interatomic potential, on e3kernels' modules; and its data helpers.

:class:`MACE` computes the total energy of a periodic structure from atom positions,
species and an edge list (forces: :func:`energy_and_forces`). It takes the
implementation of its modules as an argument (:class:`Modules`), so that one parameter
tree runs, with the same numbers to float32 round-off, on:

* :data:`E3NN_MODULES`: e3nn-jax throughout: ``e3nn_jax.haiku`` Linear and MLP,
  the species-indexed symmetric product the way e3nn-jax users write it
  (:func:`e3nn_indexed_symmetric_tensor_product`) and the convolution in e3nn-jax's
  formulation (:class:`E3nnMessagePassingConvolution`);
* ``e3kernels_modules(backend, e3nn_convolution=True)``: e3kernels' Linear, MLP and
  SymmetricTensorProduct, with e3nn-jax's convolution;
* ``e3kernels_modules(backend)``: e3kernels throughout, the convolution included
  (:class:`e3kernels.haiku.MessagePassingConvolution`).

Edges follow one convention everywhere: an edge goes from ``senders[e]`` to
``receivers[e]`` (the receiver sums the messages) along the vector
``positions[receivers] - positions[senders] + shifts`` (Å; ``shifts`` are the periodic
images' cartesian offsets, :func:`neighbor_list`). mace-jax uses the same.

>>> import jax, jax.numpy as jnp
>>> from e3kernels.models import mace
>>> positions, species, cell = mace.random_liquid(8, num_species=3, r_max=3.0, neighbors=6)
>>> senders, receivers, shifts = mace.neighbor_list(positions, cell, r_max=3.0)
>>> model = mace.make_mace(len(senders) / 8, num_species=3, channels=4, l_max=1,
...                        num_interactions=1, correlation=2, r_max=3.0, radial_neurons=(8,))
>>> graph = (jnp.asarray(positions), jnp.asarray(species), jnp.asarray(senders),
...          jnp.asarray(receivers), jnp.asarray(shifts))
>>> params = jax.jit(model.init)(jax.random.PRNGKey(0), *graph)  # jit: one compile, not one per op
>>> energy_forces = jax.jit(lambda params, *graph: mace.energy_and_forces(model.apply, params, *graph))
>>> energy, forces = energy_forces(params, *graph)
>>> energy.shape, forces.shape
((), (8, 3))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Sequence

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from e3kernels import backend as _backend
from e3kernels import haiku as _haiku

# ---- data: random liquids and periodic neighbour lists (numpy) ---------------------------


def random_liquid(
    num_atoms: int,
    *,
    neighbors: float = 30,
    r_max: float = 5.0,
    num_species: int = 10,
    min_distance: float = 1.8,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random atoms in a periodic cubic box, about ``neighbors`` of them within ``r_max``
    of each atom, none closer than ``min_distance`` (Å) to another (periodic images
    included).

    The box holds ``num_atoms`` at the density ``neighbors / (4/3 pi r_max^3)``. Atoms are
    placed one at a time at uniform random positions, each rejected if it comes within
    ``min_distance`` of one already placed (random sequential addition: no two atoms
    overlap, as in a liquid, and it takes well under a second for 1000 atoms).

    Returns:
      ``positions`` ``(num_atoms, 3)`` float64 in ``[0, L)``, ``species`` ``(num_atoms,)``
      int32 uniform in ``[0, num_species)``, and ``cell`` ``(3, 3)``: ``L`` times the
      identity (rows are the lattice vectors).

    >>> positions, species, cell = random_liquid(100, neighbors=20, r_max=4.0)
    >>> positions.shape, species.dtype, round(float(cell[0, 0]), 2)
    ((100, 3), dtype('int32'), 11.03)
    """
    where = "random_liquid"
    _check_positive_int(where, "num_atoms", num_atoms)
    _check_positive_int(where, "num_species", num_species)
    for argument, value in (("neighbors", neighbors), ("r_max", r_max), ("min_distance", min_distance)):
        _check_positive_float(where, argument, value)
    density = neighbors / (4 / 3 * math.pi * r_max**3)
    length = (num_atoms / density) ** (1 / 3)
    # Random sequential addition jams near a packing fraction of 0.55 and slows long before;
    # a liquid's is about 0.45: refuse what would not finish.
    packing = density * math.pi / 6 * min_distance**3
    if packing > 0.4 or length <= min_distance:
        raise ValueError(
            f"{where}: min_distance={min_distance} is too large for {neighbors} neighbours within "
            f"r_max={r_max} (hard-sphere packing fraction {packing:.2f}, box {length:.2f} Å; "
            "needs < 0.4 and a box wider than min_distance); lower min_distance or neighbors"
        )
    rng = np.random.default_rng(seed)
    positions = np.empty((num_atoms, 3))
    placed, attempts = 0, 0
    while placed < num_atoms:
        attempts += 1
        if attempts > 1000 * num_atoms:
            raise ValueError(f"{where}: could not place {num_atoms} atoms {min_distance} Å apart "
                             f"in {attempts - 1} attempts; lower min_distance or neighbors")
        candidate = rng.uniform(0.0, length, 3)
        delta = positions[:placed] - candidate
        delta -= length * np.round(delta / length)  # nearest periodic image
        if placed == 0 or np.min(np.einsum("ij,ij->i", delta, delta)) >= min_distance**2:
            positions[placed] = candidate
            placed += 1
    species = rng.integers(0, num_species, num_atoms).astype(np.int32)
    return positions, species, length * np.eye(3)


def neighbor_list(positions, cell, r_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All edges of a periodic structure shorter than ``r_max``, in both directions.

    An edge ``e`` goes from atom ``senders[e]`` to atom ``receivers[e]`` along the vector
    ``positions[receivers] - positions[senders] + shifts[e]``, where ``shifts[e]`` is a
    sum of lattice vectors (the rows of ``cell``): every pair of distinct atoms, and of an
    atom and its own periodic images, closer than ``r_max``. A pair appears once per
    image within reach, so a cell narrower than ``2 * r_max`` (even than ``r_max``) is
    fine. Positions may lie outside the cell. Brute force over all pairs and images,
    vectorised: fine for a few thousand atoms.

    Args:
      positions: ``(N, 3)`` cartesian positions.
      cell: ``(3, 3)`` lattice vectors as rows (ASE's convention); periodic in all three
        directions.
      r_max: the cutoff; edges are strictly shorter.

    Returns:
      ``senders`` and ``receivers`` ``(E,)`` int32, ``shifts`` ``(E, 3)`` float64, sorted
      by sender, then receiver.

    >>> import numpy as np
    >>> s, r, shifts = neighbor_list(np.zeros((1, 3)), 2.0 * np.eye(3), r_max=2.5)
    >>> len(s), sorted({float(np.linalg.norm(v)) for v in shifts})  # an atom and its 6 images
    (6, [2.0])
    """
    where = "neighbor_list"
    positions = np.asarray(positions, np.float64)
    cell = np.asarray(cell, np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"{where}: positions must have shape (num_atoms, 3); got {positions.shape}")
    if cell.shape != (3, 3) or abs(np.linalg.det(cell)) < 1e-9:
        raise ValueError(f"{where}: cell must be 3 lattice vectors as rows of a (3, 3) matrix with "
                         f"nonzero volume; got shape {cell.shape}")
    _check_positive_float(where, "r_max", r_max)
    inverse = np.linalg.inv(cell)  # its columns are the reciprocal vectors b_j (a_i . b_j = delta_ij)
    fractional = positions @ inverse
    wrap = np.floor(fractional)
    wrapped = (fractional - wrap) @ cell  # every atom inside the cell
    # Wrapped fractional differences lie in (-1, 1); an edge's fractional coordinate j is
    # at most r_max / spacing_j in size, so images up to floor(r_max / spacing_j) + 1 away.
    spacing = 1.0 / np.linalg.norm(inverse, axis=0)  # between lattice planes
    reach = np.floor(r_max / spacing).astype(int) + 1
    images = np.stack(np.meshgrid(*[np.arange(-n, n + 1) for n in reach], indexing="ij"), -1).reshape(-1, 3)
    difference = wrapped[None, :, :] - wrapped[:, None, :]  # [s, r] = wrapped[r] - wrapped[s]
    senders, receivers, shifts = [], [], []
    for image in images:  # one (N, N) slab at a time: 27 images x 1000^2 pairs would be GBs
        d2 = np.sum((difference + image @ cell) ** 2, axis=-1)
        close = d2 < r_max**2
        if not image.any():
            np.fill_diagonal(close, False)  # an atom is not its own neighbour
        s, r = np.nonzero(close)
        senders.append(s)
        receivers.append(r)
        # back to the positions as given: wrapped = positions - wrap @ cell
        shifts.append((image[None, :] - wrap[r] + wrap[s]) @ cell)
    senders, receivers, shifts = np.concatenate(senders), np.concatenate(receivers), np.concatenate(shifts)
    order = np.lexsort((receivers, senders))
    return senders[order].astype(np.int32), receivers[order].astype(np.int32), shifts[order]


def pad_edges(senders, receivers, shifts, num_edges: int, *, num_atoms: int):
    """Pad an edge list to ``num_edges`` edges that change nothing, so that structures with
    different edge counts share one shape (to stack them under ``jax.vmap``, or to reuse
    one compiled program across MD steps).

    The added edges go from atom ``num_atoms`` to itself: an index out of range, so every
    e3kernels op drops the edge (exactly: whatever its harmonics and weights hold) and no
    GPU or TPU program walks it; e3nn-jax's ``scatter_sum`` drops it too. This is
    jraph-style padding without the padding node. Their shift is a unit vector: JAX
    clamps the out-of-range position gathers onto the last atom, so each padding edge
    has length 1 and finite harmonics and radial features (a zero-length vector would
    give NaN derivatives, which a dropped edge never passes on, but a user's own code
    might).

    >>> import numpy as np
    >>> s, r, sh = pad_edges(np.array([0, 1]), np.array([1, 0]), np.zeros((2, 3)), 4, num_atoms=2)
    >>> s.tolist(), r.tolist(), sh[-1].tolist()
    ([0, 1, 2, 2], [1, 0, 2, 2], [1.0, 0.0, 0.0])
    """
    senders, receivers, shifts = np.asarray(senders), np.asarray(receivers), np.asarray(shifts)
    extra = num_edges - len(senders)
    if extra < 0:
        raise ValueError(f"pad_edges: num_edges={num_edges} is fewer than the {len(senders)} edges given")
    _check_positive_int("pad_edges", "num_atoms", num_atoms)
    unit = np.zeros((extra, 3), shifts.dtype)
    unit[:, 0] = 1
    outside = np.full(extra, num_atoms)
    return (np.concatenate([senders, outside.astype(senders.dtype)]),
            np.concatenate([receivers, outside.astype(receivers.dtype)]), np.concatenate([shifts, unit]))


# ---- the module implementations a MACE is built from ------------------------------------


@dataclasses.dataclass(frozen=True)
class Modules:
    """The implementations of the modules :class:`MACE` is made of, each called as e3nn-jax's.

    Attributes:
      linear: like ``e3nn_jax.haiku.Linear``: ``(irreps_out, num_indexed_weights=, name=)``,
        called ``(x)`` or ``(i, x)``.
      mlp: like ``e3nn_jax.haiku.MultiLayerPerceptron``.
      convolution: like :class:`e3kernels.haiku.MessagePassingConvolution`:
        ``(target_irreps, avg_num_neighbors, radial_neurons, activation)``, called
        ``(node_feats, edge_sh, radial_embedding, senders, receivers)``.
      symmetric_product: like :class:`e3kernels.haiku.SymmetricTensorProduct` with
        species-indexed weights: ``(orders, keep_irrep_out, num_indexed_weights=S)``,
        called ``(species, x)`` with ``x`` of shape ``(atoms, channels, irreps)``.
    """

    linear: Callable
    mlp: Callable
    convolution: Callable
    symmetric_product: Callable


class E3nnMessagePassingConvolution(hk.Module):
    """MACE's convolution in e3nn-jax's formulation: the baseline of
    :class:`e3kernels.haiku.MessagePassingConvolution`, with its signature, its parameter
    tree (the module is named ``message_passing_convolution`` too) and its numbers.

    It materialises every edge's message ``(E, C x irreps)`` before summing them::

        msg = e3nn.tensor_product(node_feats[senders], edge_sh, filter_ir_out=target_irreps)
        mix = e3nn.haiku.MultiLayerPerceptron(
            list(radial_neurons) + [msg.irreps.num_irreps], activation, output_activation=False
        )(radial_embedding)
        out = e3nn.scatter_sum(msg * mix, dst=receivers, output_size=num_nodes) / avg_num_neighbors
    """

    def __init__(
        self,
        target_irreps,
        avg_num_neighbors: float,
        radial_neurons: Sequence[int] = (64, 64, 64),
        activation: Callable | None = jax.nn.silu,
        *,
        name: str | None = None,
    ):
        super().__init__(name=name or "message_passing_convolution")
        self.target_irreps = e3nn.Irreps(target_irreps)
        self.avg_num_neighbors = avg_num_neighbors
        self.radial_neurons = tuple(radial_neurons)
        self.activation = activation

    def __call__(self, node_feats, edge_sh, radial_embedding, senders, receivers) -> e3nn.IrrepsArray:
        msg = e3nn.tensor_product(node_feats[senders], edge_sh, filter_ir_out=self.target_irreps)
        mix = e3nn.haiku.MultiLayerPerceptron(
            list(self.radial_neurons) + [msg.irreps.num_irreps], self.activation, output_activation=False
        )(radial_embedding)  # (E, num_irreps): one weight per message irrep
        out = e3nn.scatter_sum(msg * mix, dst=receivers, output_size=node_feats.shape[0])
        return out / self.avg_num_neighbors


def e3nn_indexed_symmetric_tensor_product(orders, keep_irrep_out, *, num_indexed_weights: int) -> Callable:
    """``e3nn_jax.haiku.SymmetricTensorProduct`` with one weight set per species, the way
    e3nn-jax users write it: ``hk.vmap`` over atoms, and a ``get_parameter`` that gathers
    the atom's set from parameters of shape ``(num_indexed_weights, mul, channels)``
    (copying it per atom). The same parameters and numbers as
    ``e3kernels.haiku.SymmetricTensorProduct(orders, keep_irrep_out,
    num_indexed_weights=...)``. Returns the call ``(species, x)``.
    """

    def apply(species, x):
        def atom(s, x_atom):
            def get_parameter(name, shape, dtype):
                weights = hk.get_parameter(name, (num_indexed_weights,) + shape, dtype,
                                           hk.initializers.RandomNormal())
                return weights[s]

            return e3nn.haiku.SymmetricTensorProduct(orders, keep_irrep_out, get_parameter)(x_atom)

        return hk.vmap(atom, split_rng=False)(species, x)

    return apply


#: e3nn-jax throughout: the baseline
E3NN_MODULES = Modules(
    linear=e3nn.haiku.Linear,
    mlp=e3nn.haiku.MultiLayerPerceptron,
    convolution=E3nnMessagePassingConvolution,
    symmetric_product=e3nn_indexed_symmetric_tensor_product,
)


def e3kernels_modules(backend: str | None = None, *, e3nn_convolution: bool = False) -> Modules:
    """e3kernels' modules on ``backend`` (``None``: the setting in force when called); with
    ``e3nn_convolution=True``, e3nn-jax's convolution (:class:`E3nnMessagePassingConvolution`)
    in place of e3kernels'."""
    backend = _backend.validate_optional_backend(backend)
    ours = lambda cls: functools.partial(cls, backend=backend)
    return Modules(
        linear=ours(_haiku.Linear),
        mlp=ours(_haiku.MultiLayerPerceptron),
        convolution=(E3nnMessagePassingConvolution if e3nn_convolution
                     else ours(_haiku.MessagePassingConvolution)),
        symmetric_product=ours(_haiku.SymmetricTensorProduct),
    )


# ---- the model ----------------------------------------------------------------------------


class MACE(hk.Module):
    r"""A MACE interatomic potential: the total energy of a structure.

    For atoms with ``species`` and an edge list (:func:`neighbor_list`):

    * edges: the Bessel basis (``num_basis`` functions) of the length ``r`` times the
      polynomial envelope ``e3nn.poly_envelope(5, 2)(r / r_max)``, and the spherical
      harmonics ``0e + 1o + ... `` up to ``l_max`` of the unit vector (``"component"``
      normalisation);
    * atoms start as ``channels x 0e`` per species (an indexed Linear of a constant);
    * each of ``num_interactions`` interactions: ``linear_up`` (Linear), the convolution
      (messages up to ``l_max``, weighted by a radial MLP, summed over neighbours /
      ``avg_num_neighbors``), ``linear_down`` to ``channels x (0e + 1o + ... l_max)``; in
      the first interaction a species-indexed Linear of the messages (``species_mix``), in
      the others a skip connection (``skip``: a species-indexed Linear of the input); the
      product basis: the species-indexed symmetric product of orders ``1..correlation`` per
      channel, keeping ``hidden_irreps`` (``0e`` in the last interaction), then a Linear,
      plus the skip; a readout to one energy per atom: a Linear, and for the last
      interaction an MLP with ``readout_neurons`` hidden neurons;
    * energy: ``sum over atoms of atomic_energies[species] + energy_scale * (sum of the
      readouts)``.

    The architecture is mace-jax's ``MACE`` with its defaults (torch MACE's
    "RealAgnostic" blocks), minus its options; its parameters do not load into mace-jax,
    whose convolution orders the paths of an irrep differently and whose symmetric
    contraction scales its weights differently (see the README). Parameters live under
    ``embedding`` and ``interaction_{t}/...``.

    Args:
      avg_num_neighbors: edges per atom in the data (the convolution divides by it).
      modules: the module implementations (:class:`Modules`); default e3kernels'
        (``e3kernels_modules()``).
      num_species: species are ints in ``[0, num_species)``.
      channels: ``C``, the multiplicity of every hidden irrep.
      hidden_irreps: the hidden irreps per channel, each ``l <= l_max`` with parity
        ``(-1)^l``, including ``0e``: MACE-M's ``"0e + 1o"``.
      l_max: of the spherical harmonics and the messages.
      num_interactions: at least 1.
      correlation: the symmetric product's highest order (the body order minus one).
      r_max: the cutoff, Å.
      num_basis: Bessel functions of the radial embedding.
      radial_neurons: the hidden layers of the convolution's radial MLP.
      readout_neurons: the hidden layer of the last interaction's readout MLP.
      activation: of the MLPs.
      atomic_energies: ``(num_species,)`` fixed energies per atom of each species
        (MACE's E0s), default zeros.
      energy_scale: multiplies the interactions' energies (MACE scales by the RMS force).
      name: Haiku module name.

    Called as ``(positions, species, senders, receivers, shifts)``: ``(N, 3)`` float,
    ``(N,)`` int, ``(E,)`` int, ``(E,)`` int, ``(E, 3)`` float; returns the scalar energy.
    """

    def __init__(
        self,
        avg_num_neighbors: float,
        *,
        modules: Modules | None = None,
        num_species: int = 10,
        channels: int = 128,
        hidden_irreps="0e + 1o",
        l_max: int = 3,
        num_interactions: int = 2,
        correlation: int = 3,
        r_max: float = 5.0,
        num_basis: int = 8,
        radial_neurons: Sequence[int] = (64, 64, 64),
        readout_neurons: int = 16,
        activation: Callable = jax.nn.silu,
        atomic_energies: Sequence[float] | None = None,
        energy_scale: float = 1.0,
        name: str | None = None,
    ):
        super().__init__(name=name)
        where = "MACE"
        _check_positive_float(where, "avg_num_neighbors", avg_num_neighbors)
        _check_positive_float(where, "r_max", r_max)
        for argument, value in (("num_species", num_species), ("channels", channels),
                                ("num_interactions", num_interactions), ("correlation", correlation),
                                ("num_basis", num_basis), ("readout_neurons", readout_neurons)):
            _check_positive_int(where, argument, value)
        if not isinstance(l_max, numbers.Integral) or l_max < 0:
            raise ValueError(f"{where}: l_max must be a non-negative int; got {l_max!r}")
        if modules is not None and not isinstance(modules, Modules):
            raise TypeError(f"{where}: modules must be a mace.Modules (E3NN_MODULES, e3kernels_modules()); "
                            f"got {type(modules).__name__}")
        self.sh_irreps = e3nn.Irreps.spherical_harmonics(l_max)
        self.hidden_irreps = e3nn.Irreps(hidden_irreps)
        if (any(mul != 1 for mul, _ in self.hidden_irreps)
                or e3nn.Irrep("0e") not in [ir for _, ir in self.hidden_irreps]
                or any(ir not in self.sh_irreps for _, ir in self.hidden_irreps)):
            raise ValueError(f"{where}: hidden_irreps must be irreps per channel (multiplicity 1) among "
                             f"{self.sh_irreps} (l_max={l_max}), including 0e; got {hidden_irreps!r}")
        if atomic_energies is None:
            atomic_energies = np.zeros(num_species)
        atomic_energies = np.asarray(atomic_energies, np.float64)
        if atomic_energies.shape != (num_species,):
            raise ValueError(f"{where}: atomic_energies must have one energy per species, shape "
                             f"({num_species},); got {atomic_energies.shape}")
        self.avg_num_neighbors = float(avg_num_neighbors)
        self.modules = modules if modules is not None else e3kernels_modules()
        self.num_species, self.channels = num_species, channels
        self.num_interactions, self.orders = num_interactions, tuple(range(1, correlation + 1))
        self.r_max, self.num_basis = float(r_max), num_basis
        self.radial_neurons, self.readout_neurons = tuple(radial_neurons), readout_neurons
        self.activation = activation
        self.atomic_energies, self.energy_scale = atomic_energies, float(energy_scale)

    def __call__(self, positions, species, senders, receivers, shifts) -> jax.Array:
        _check_graph(positions, species, senders, receivers, shifts)
        m, channels, num_species = self.modules, self.channels, self.num_species
        with jax.named_scope("edge_embedding"):  # a part of its own in profiles (bench.breakdown)
            vectors = positions[receivers] - positions[senders] + shifts
            lengths = jnp.linalg.norm(vectors, axis=-1)
            radial = e3nn.bessel(lengths, self.num_basis, self.r_max) * e3nn.poly_envelope(5, 2)(
                lengths / self.r_max)[:, None]
            sh = e3nn.spherical_harmonics(self.sh_irreps, vectors, normalize=True, normalization="component")

        ones = e3nn.IrrepsArray("0e", jnp.ones((positions.shape[0], 1), positions.dtype))
        h = m.linear(f"{channels}x0e", num_indexed_weights=num_species, name="embedding")(species, ones)
        energies = []
        for t in range(self.num_interactions):
            first, last = t == 0, t == self.num_interactions - 1
            keep = e3nn.Irreps("0e") if last else self.hidden_irreps  # per channel
            with hk.name_scope(f"interaction_{t}"):
                # MACE's first interaction has no skip (its input is the species embedding)
                skip = None if first else m.linear(channels * keep, num_indexed_weights=num_species,
                                                   name="skip")(species, h)
                h = m.linear(h.irreps, name="linear_up")(h)
                h = m.convolution(self.sh_irreps, self.avg_num_neighbors, self.radial_neurons,
                                  self.activation)(h, sh, radial, senders, receivers)
                h = m.linear(channels * self.sh_irreps, name="linear_down")(h)
                if first:  # ... it mixes the messages by species instead
                    h = m.linear(h.irreps, num_indexed_weights=num_species, name="species_mix")(species, h)
                product = m.symmetric_product(self.orders, keep, num_indexed_weights=num_species)
                h = product(species, h.mul_to_axis(channels)).axis_to_mul()
                h = m.linear(channels * keep, name="linear_product")(h)
                if skip is not None:
                    h = h + skip
                if last:
                    readout = m.mlp([self.readout_neurons, 1], self.activation, output_activation=False,
                                    name="readout")
                else:
                    readout = m.linear("0e", name="readout")
                energies.append(readout(h).array[:, 0])
        atom_energies = self.energy_scale * sum(energies) + jnp.asarray(self.atomic_energies,
                                                                         positions.dtype)[species]
        return jnp.sum(atom_energies)


def make_mace(avg_num_neighbors: float, **kwargs) -> hk.Transformed:
    """``MACE(avg_num_neighbors, **kwargs)`` as a Haiku transform without apply rng:
    ``init(rng, positions, species, senders, receivers, shifts)`` and
    ``apply(params, positions, species, senders, receivers, shifts) -> energy``."""

    def energy(positions, species, senders, receivers, shifts):
        return MACE(avg_num_neighbors, **kwargs)(positions, species, senders, receivers, shifts)

    return hk.without_apply_rng(hk.transform(energy))


def energy_and_forces(energy_fn: Callable, params, positions, species, senders, receivers, shifts):
    """``(energy, forces)``, the forces ``-dE/dpositions``, for
    ``energy_fn(params, positions, species, senders, receivers, shifts)`` (such as
    ``make_mace(...).apply``). Differentiable again (a loss on forces needs it)."""
    energy, gradient = jax.value_and_grad(energy_fn, argnums=1)(params, positions, species, senders,
                                                                 receivers, shifts)
    return energy, -gradient


# ---- argument checks ------------------------------------------------------------------------


def _check_positive_int(where: str, argument: str, value) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}: {argument} must be a positive int; got {value!r}")


def _check_positive_float(where: str, argument: str, value) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ValueError(f"{where}: {argument} must be a positive finite number; got {value!r}")


def _check_graph(positions, species, senders, receivers, shifts) -> None:
    """Shapes and kinds of MACE's inputs (values are the modules' to check)."""

    def fail(argument, expected, value):
        raise ValueError(f"MACE: {argument} must be {expected}; got {type(value).__name__} of shape "
                         f"{getattr(value, 'shape', None)} and dtype {getattr(value, 'dtype', None)}")

    def kind(value):
        return getattr(getattr(value, "dtype", None), "kind", None)

    if getattr(positions, "ndim", None) != 2 or positions.shape[1] != 3 or kind(positions) != "f":
        fail("positions", "a float array of shape (num_atoms, 3)", positions)
    if getattr(species, "shape", None) != positions.shape[:1] or kind(species) not in ("i", "u"):
        fail("species", f"an int array of shape ({positions.shape[0]},)", species)
    if getattr(senders, "ndim", None) != 1 or kind(senders) not in ("i", "u"):
        fail("senders", "an int array of shape (num_edges,)", senders)
    if getattr(receivers, "shape", None) != senders.shape or kind(receivers) not in ("i", "u"):
        fail("receivers", f"an int array of shape {senders.shape}", receivers)
    if getattr(shifts, "shape", None) != senders.shape + (3,) or kind(shifts) != "f":
        fail("shifts", f"a float array of shape {senders.shape + (3,)}", shifts)
