"""Train a small MACE potential on energies and forces, with e3kernels' modules.

The data: random Cu/Ni alloys on a face-centred cubic lattice (a supercell of the
primitive cell with ``--atoms`` atoms), each strained by up to 3 % and its atoms rattled by
0.1 Å, labelled with energies and forces by ASE's EMT calculator (effective medium
theory: a cheap classical potential, so the data set takes a second). The model:
``e3kernels.models.mace.MACE`` (on the "auto" backend: the Pallas kernels on a GPU, the
jax.numpy reference on a CPU), trained with optax's Adam on per-atom energy and force
errors, a batch of structures at a time under ``jax.vmap``. Finally the trained model's
forces are checked against central finite differences of its energy, in float64.

    python examples/train_mace.py                  # about 3-5 minutes on a 2-core CPU
    python examples/train_mace.py --steps 2000 --atoms 32 --structures 100 --out results/

It needs ``pip install -e ".[examples]"`` (ASE, and matplotlib for the loss curve).
Writes to ``--out``: ``loss.csv`` (step, train loss, test loss), ``loss.png`` and
``summary.json`` (errors, the finite-difference check); exits non-zero if that check
fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from e3kernels.models import mace

ELEMENTS = ("Cu", "Ni")  # species 0 and 1
LATTICE_CONSTANT = 3.58  # Å, between copper's 3.61 and nickel's 3.52
ENERGY_WEIGHT, FORCE_WEIGHT = 100.0, 1.0  # per-atom energy errors are ~10x smaller than force errors


def parse(argv):
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--atoms", type=int, default=32, help="atoms per structure (default 32)")
    parser.add_argument("--structures", type=int, default=40, help="structures, a quarter for testing")
    parser.add_argument("--batch", type=int, default=4, help="structures per training step")
    parser.add_argument("--channels", type=int, default=32, help="MACE channels (default 32)")
    parser.add_argument("--l-max", type=int, default=2, help="spherical harmonics' l_max (default 2)")
    parser.add_argument("--correlation", type=int, default=3, help="product basis order (default 3)")
    parser.add_argument("--interactions", type=int, default=2, help="interaction layers (default 2)")
    parser.add_argument("--r-max", type=float, default=5.0, help="cutoff, Å (default 5)")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam's learning rate (default 5e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compilation-cache", type=Path, default=None, metavar="DIR",
                        help="JAX's persistent compilation cache in DIR: a later run with the same DIR "
                             "and sizes loads the compiled programs instead of compiling them")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "e3kernels-train-mace",
                        help="folder for loss.csv, loss.png and summary.json")
    args = parser.parse_args(argv)
    for name in ("steps", "atoms", "batch", "channels", "correlation", "interactions"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive int; got {getattr(args, name)}")
    if args.structures < 2:
        parser.error(f"--structures: expected at least 2 (to train on and to test); got {args.structures}")
    return args


# ---- data -------------------------------------------------------------------------------------


def supercell_repeats(atoms: int) -> tuple[int, int, int]:
    """The most cube-like (n1, n2, n3) with n1 * n2 * n3 == atoms (one atom per primitive cell)."""
    shapes = [(a, b, atoms // (a * b)) for a in range(1, atoms + 1) for b in range(1, atoms + 1)
              if atoms % (a * b) == 0]
    return min(shapes, key=lambda shape: max(shape) - min(shape))


def make_structures(count: int, atoms: int, seed: int) -> list[dict]:
    """Rattled, strained random Cu/Ni FCC alloys with EMT energies (eV) and forces (eV/Å)."""
    try:
        from ase.build import bulk
        from ase.calculators.emt import EMT
    except ImportError:
        sys.exit('train_mace.py needs ASE for its data: pip install -e ".[examples]" (or pip install ase)')
    rng = np.random.default_rng(seed)
    base = bulk("Cu", "fcc", a=LATTICE_CONSTANT).repeat(supercell_repeats(atoms))
    structures = []
    for _ in range(count):
        structure = base.copy()
        species = rng.integers(0, len(ELEMENTS), atoms)
        structure.set_chemical_symbols([ELEMENTS[s] for s in species])
        structure.set_cell(structure.cell * (1 + rng.uniform(-0.03, 0.03)), scale_atoms=True)
        structure.rattle(stdev=0.1, seed=int(rng.integers(2**31)))
        structure.calc = EMT()
        structures.append({
            "positions": structure.get_positions(), "cell": np.asarray(structure.cell), "species": species,
            "energy": structure.get_potential_energy(), "forces": structure.get_forces(),
        })
    return structures


def stack_graphs(structures: list[dict], r_max: float) -> tuple[dict, float]:
    """All structures' arrays stacked, their edge lists padded to one length
    (``mace.pad_edges``: edges from an out-of-range atom, which every op drops), and the mean
    edges per atom."""
    edges = [mace.neighbor_list(s["positions"], s["cell"], r_max) for s in structures]
    longest = max(len(senders) for senders, _, _ in edges)
    padded = [mace.pad_edges(*e, longest, num_atoms=len(s["species"])) for e, s in zip(edges, structures)]
    data = {key: np.stack([s[key] for s in structures])
            for key in ("positions", "species", "energy", "forces")}
    for k, key in enumerate(("senders", "receivers", "shifts")):
        data[key] = np.stack([p[k] for p in padded])
    atoms = sum(len(s["species"]) for s in structures)
    return data, sum(len(senders) for senders, _, _ in edges) / atoms


GRAPH = ("positions", "species", "senders", "receivers", "shifts")


def as_jax(data: dict, index) -> dict:
    return {key: jnp.asarray(value[index]) for key, value in data.items()}


# ---- training ---------------------------------------------------------------------------------


def progress_bar(step: int, total: int, loss: float, since_first: float) -> None:
    """One line on stderr, rewritten in place (about 100 times in all): a bar, the step, the
    batch loss, and steps per second after the first step (which waits for the compiler)."""
    if step % max(1, total // 100) and step != total:
        return
    width = 30
    done = int(width * step / total)
    rate = f"{(step - 1) / (time.perf_counter() - since_first):.1f} steps/s" if step > 1 else "compiled"
    end = "\n" if step == total else ""
    print(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} loss {loss:.4g} {rate}",
          end=end, file=sys.stderr, flush=True)


class CompilationCache:
    """JAX's persistent compilation cache in ``directory`` (every program, however quick to
    compile), counting the programs it served and those it compiled."""

    def __init__(self, directory: Path):
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        self.hits = self.misses = 0
        jax.monitoring.register_event_listener(self._count)

    def _count(self, event: str, **_):
        if event == "/jax/compilation_cache/cache_hits":
            self.hits += 1
        elif event == "/jax/compilation_cache/cache_misses":
            self.misses += 1


def main(argv=None) -> int:
    args = parse(argv)
    cache = None if args.compilation_cache is None else CompilationCache(args.compilation_cache)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        print("matplotlib is not installed: training without the loss curve (loss.png); "
              "pip install matplotlib to get it", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)

    structures = make_structures(args.structures, args.atoms, args.seed)
    num_test = max(1, args.structures // 4)
    data, avg_num_neighbors = stack_graphs(structures, args.r_max)
    train, test = np.arange(num_test, args.structures), np.arange(num_test)
    print(f"{args.structures} structures of {args.atoms} atoms (EMT), {len(train)} to train on, {num_test} "
          f"to test; {avg_num_neighbors:.1f} neighbours per atom within {args.r_max} Å", flush=True)

    # MACE's normalisation: fixed energies per species by least squares on the training
    # set, and the interactions' energies scaled by the RMS force
    counts = np.stack([np.bincount(data["species"][i], minlength=len(ELEMENTS)) for i in train])
    atomic_energies = np.linalg.lstsq(counts, data["energy"][train], rcond=None)[0]
    energy_scale = float(np.sqrt(np.mean(data["forces"][train] ** 2)))
    model = mace.make_mace(
        avg_num_neighbors, num_species=len(ELEMENTS), channels=args.channels, l_max=args.l_max,
        correlation=args.correlation, num_interactions=args.interactions, r_max=args.r_max,
        radial_neurons=(32, 32), atomic_energies=atomic_energies, energy_scale=energy_scale,
    )

    def predict(params, batch):
        """Energies and forces of a batch of structures."""
        one = lambda *graph: mace.energy_and_forces(model.apply, params, *graph)
        return jax.vmap(one)(*(batch[key] for key in GRAPH))

    def loss_fn(params, batch):
        energies, forces = predict(params, batch)
        energy_error = (energies - batch["energy"]) / args.atoms  # eV per atom
        force_error = forces - batch["forces"]  # eV/Å
        return ENERGY_WEIGHT * jnp.mean(energy_error**2) + FORCE_WEIGHT * jnp.mean(force_error**2)

    first = as_jax(data, 0)
    params = jax.jit(model.init)(jax.random.PRNGKey(args.seed), *(first[key] for key in GRAPH))
    optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.05))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    evaluate = jax.jit(predict)  # on batches of --batch structures: one more compile, not one per size

    def errors(params, indices) -> dict:
        """Energy MAE (meV/atom), force MAE and RMSE (meV/Å), and the loss, over ``indices``."""
        chunks = [indices[k:k + args.batch] for k in range(0, len(indices), args.batch)]
        energies, forces = [], []
        for chunk in chunks:  # the last chunk padded with its first structure, then dropped
            full = np.concatenate([chunk, np.full(args.batch - len(chunk), chunk[0])])
            e, f = evaluate(params, as_jax(data, full))
            energies.append(np.asarray(e)[: len(chunk)])
            forces.append(np.asarray(f)[: len(chunk)])
        de = (np.concatenate(energies) - data["energy"][indices]) / args.atoms
        df = np.concatenate(forces) - data["forces"][indices]
        return {"energy_mae_mev_per_atom": 1e3 * float(np.mean(np.abs(de))),
                "force_mae_mev_per_a": 1e3 * float(np.mean(np.abs(df))),
                "force_rmse_mev_per_a": 1e3 * float(np.sqrt(np.mean(df**2))),
                "loss": float(ENERGY_WEIGHT * np.mean(de**2) + FORCE_WEIGHT * np.mean(df**2))}

    rng = np.random.default_rng(args.seed + 1)
    evaluate_every = max(1, args.steps // 20)
    history = []  # (step, train batch loss, test loss or None)
    print(f"compiling, then {args.steps} steps (batches of {args.batch} structures)", file=sys.stderr)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = as_jax(data, rng.choice(train, args.batch, replace=len(train) < args.batch))
        params, opt_state, loss = train_step(params, opt_state, batch)
        test_loss = errors(params, test)["loss"] if step % evaluate_every == 0 or step == args.steps else None
        history.append((step, float(loss), test_loss))
        if step == 1:
            after_first = time.perf_counter()
            first_step_seconds = after_first - start  # mostly tracing and compiling
        progress_bar(step, args.steps, float(loss), after_first)

    results = {"train": errors(params, train), "test": errors(params, test)}
    for name, r in results.items():
        print(f"{name:5s}: energy MAE {r['energy_mae_mev_per_atom']:7.2f} meV/atom, force MAE "
              f"{r['force_mae_mev_per_a']:7.1f} meV/Å, RMSE {r['force_rmse_mev_per_a']:7.1f} meV/Å")
    rms = 1e3 * np.sqrt(np.mean(data["forces"][test] ** 2))
    print(f"(for scale: the test forces' RMS is {rms:.0f} meV/Å)")

    with open(args.out / "loss.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", "train_loss", "test_loss"])
        writer.writerows([(step, f"{train_loss:.6g}", "" if test_loss is None else f"{test_loss:.6g}")
                          for step, train_loss, test_loss in history])
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.semilogy([h[0] for h in history], [h[1] for h in history], lw=0.8, label="train (batch)")
        tested = [h for h in history if h[2] is not None]
        ax.semilogy([h[0] for h in tested], [h[2] for h in tested], "o-", label="test")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{ENERGY_WEIGHT:g} (ΔE/atom)² + {FORCE_WEIGHT:g} ΔF²  (eV², eV²/Å²)")
        ax.set_title(f"MACE on EMT Cu/Ni, {args.atoms} atoms, {args.channels} channels")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "loss.png", dpi=110)
        plt.close(fig)

    deviation, tolerance = finite_difference_check(model, params, data, int(test[0]))
    passed = deviation < tolerance
    print(f"forces vs central finite differences of the energy (float64, every coordinate of a "
          f"test structure): max deviation {deviation:.2e} eV/Å, tolerance {tolerance:.0e}: "
          f"{'OK' if passed else 'FAILED'}")
    summary = {**results, "finite_difference_max_deviation": deviation, "finite_difference_ok": passed,
               "steps": args.steps, "seconds": time.perf_counter() - start,
               "first_step_seconds": first_step_seconds}
    print(f"first step (tracing and compiling): {first_step_seconds:.1f} s", end="")
    if cache is not None:
        summary["compilation_cache"] = {"hits": cache.hits, "misses": cache.misses}
        print(f"; compilation cache {args.compilation_cache}: {cache.hits} programs loaded, "
              f"{cache.misses} compiled", end="")
    print()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}/loss.csv, summary.json" + (", loss.png" if plt is not None else ""))
    return 0 if passed else 1


def finite_difference_check(model, params, data, index: int, h: float = 1e-4) -> tuple[float, float]:
    """Max |F - (-dE/dx by central differences)| over every coordinate of one structure, in
    float64 (the derivative's truncation error ~h² E''' and round-off ~1e-16 E / h are both
    near 1e-9 eV/Å here), and the tolerance it must stay under."""
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
        positions = jnp.asarray(data["positions"][index], jnp.float64)
        graph = (jnp.asarray(data["species"][index]), jnp.asarray(data["senders"][index]),
                 jnp.asarray(data["receivers"][index]), jnp.asarray(data["shifts"][index], jnp.float64))
        # one compiled function for both (its forces are cheap next to a second compile)
        energy_forces = jax.jit(lambda p, x, *g: mace.energy_and_forces(model.apply, p, x, *g))
        energy = lambda x: energy_forces(params, x, *graph)[0]
        _, forces = energy_forces(params, positions, *graph)
        deviation = 0.0
        for atom, axis in np.ndindex(positions.shape):
            step = jnp.zeros_like(positions).at[atom, axis].set(h)
            derivative = (energy(positions + step) - energy(positions - step)) / (2 * h)
            deviation = max(deviation, abs(float(-derivative - forces[atom, axis])))
    return deviation, 1e-5


if __name__ == "__main__":
    sys.exit(main())
