"""Exact parameter conversion between Haiku, Flax linen and NNX.

An NNX model is the map: its e3kernels modules know their own parameters, and each one's
place in the other frameworks' trees is its NNX path (``"interaction/linear"``), or what
``names`` maps that path to. The leaf names inside each module are those of e3nn-jax's
module in that framework:

=====================  ==========================  ================================  ========================
module                 NNX                         Haiku                             linen
=====================  ==========================  ================================  ========================
Linear                 ``weights[name]``           ``params[mod][name]``             ``params/…/name``
SymmetricTensorProd.   ``weights[name]``           ``params[mod][name]``             ``params/…/name``
MultiLayerPerceptron   ``layers[k].kernel, bias``  ``params[mod/linear_k][w, b]``    ``params/…/Dense_k/…``
BatchNorm              ``weights, biases``         ``params[mod][weight, bias]``     ``params/…/weights, …``
BatchNorm statistics   ``mean, var``               ``state[mod][running_mean, …]``   ``batch_stats/…/mean, …``
=====================  ==========================  ================================  ========================

A ``MessagePassingConvolution`` holds a ``MultiLayerPerceptron``, ``radial_mlp``, whose
place is under the convolution's: ``{conv}/multi_layer_perceptron`` in Haiku,
``{conv}/MultiLayerPerceptron_0`` in linen (``names`` may map the convolution's NNX path,
or the network's own, ``"conv/radial_mlp"``).

Values are copied exactly (same dtype, no arithmetic). Every leaf of the source tree must
land in the model and every variable of the model's e3kernels modules must be found;
otherwise a ``ValueError`` lists what is missing or left over. Variables of modules that
are not e3kernels' (your own ``nnx.Linear`` readout, say) are yours to copy.

>>> import e3kernels, e3nn_jax as e3nn, haiku as hk, jax
>>> from flax import nnx
>>> x = e3nn.normal("2x0e + 1o", jax.random.PRNGKey(0), (5,))
>>> f = hk.without_apply_rng(hk.transform(lambda x: e3kernels.haiku.Linear("0e + 1o")(x)))
>>> params = f.init(jax.random.PRNGKey(1), x)
>>> model = e3kernels.nnx.Linear("2x0e + 1o", "0e + 1o", rngs=nnx.Rngs(0))
>>> e3kernels.nnx.load_haiku(model, params)
>>> bool((model(x).array == f.apply(params, x).array).all())
True
>>> variables = e3kernels.nnx.to_linen(model)
>>> bool((e3kernels.flax.Linear("0e + 1o").apply(variables, x).array == model(x).array).all())
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import jax
from flax import nnx

from e3kernels.nnx import modules

# Haiku's default module names, for an e3kernels module that is the whole model.
_HAIKU_DEFAULT_NAMES = {
    modules.Linear: "linear",
    modules.MultiLayerPerceptron: "multi_layer_perceptron",
    modules.BatchNorm: "batch_norm",
    modules.Dropout: "dropout",
    modules.SymmetricTensorProduct: "symmetric_tensor_product",
    modules.MessagePassingConvolution: "message_passing_convolution",
}

# A MessagePassingConvolution's radial network: its NNX attribute, and its module name
# under the convolution's in Haiku (created in __call__: no "~") and in linen (compact).
_CONV_MLP = ("radial_mlp", "multi_layer_perceptron", "MultiLayerPerceptron_0")


@dataclasses.dataclass(frozen=True)
class _Leaf:
    variable: nnx.Variable
    nnx_path: str
    haiku: tuple[str, str, str]  # ("params" or "state", module name, leaf name)
    linen: tuple[str, ...]  # collection, then the path of keys


def _leaves(model: nnx.Module, names: Mapping[str, str] | None) -> Iterator[_Leaf]:
    """The variables of the e3kernels modules in ``model`` and their places elsewhere."""
    names = dict(names or {})
    found = False
    all_modules = {tuple(path): module for path, module in nnx.iter_modules(model)}

    def places(path: tuple) -> tuple[str, tuple[str, ...]]:
        """A module's Haiku name and linen path."""
        nnx_path = "/".join(str(p) for p in path)
        parent = all_modules.get(path[:-1]) if path else None
        if (nnx_path not in names and isinstance(parent, modules.MessagePassingConvolution)
                and path[-1] == _CONV_MLP[0]):
            haiku_parent, linen_parent = places(path[:-1])
            return f"{haiku_parent}/{_CONV_MLP[1]}", (*linen_parent, _CONV_MLP[2])
        default = nnx_path or _HAIKU_DEFAULT_NAMES[type(all_modules[path])]
        linen_path = tuple(p for p in names.get(nnx_path, nnx_path).split("/") if p)
        return names.get(nnx_path, default), linen_path

    for path, module in all_modules.items():
        if type(module) not in _HAIKU_DEFAULT_NAMES:
            continue
        found = True
        nnx_path = "/".join(str(p) for p in path)
        haiku_name, linen_path = places(path)
        here = f"{nnx_path or '(model)'}"
        if isinstance(module, modules.Linear | modules.SymmetricTensorProduct):
            for key, variable in module.weights.items():
                yield _Leaf(variable, f"{here}.weights[{key!r}]", ("params", haiku_name, key),
                            ("params", *linen_path, key))
        elif isinstance(module, modules.MultiLayerPerceptron):
            for k, layer in enumerate(module.layers):
                pairs = [("kernel", "w")] + ([("bias", "b")] if layer.bias is not None else [])
                for attribute, haiku_leaf in pairs:
                    yield _Leaf(getattr(layer, attribute), f"{here}.layers[{k}].{attribute}",
                                ("params", f"{haiku_name}/linear_{k}", haiku_leaf),
                                ("params", *linen_path, f"Dense_{k}", attribute))
        elif isinstance(module, modules.BatchNorm):
            if module.affine:
                for attribute, haiku_leaf in (("weights", "weight"), ("biases", "bias")):
                    yield _Leaf(getattr(module, attribute), f"{here}.{attribute}",
                                ("params", haiku_name, haiku_leaf), ("params", *linen_path, attribute))
            if not module.instance:
                for attribute in ("mean", "var"):
                    yield _Leaf(getattr(module, attribute), f"{here}.{attribute}",
                                ("state", haiku_name, f"running_{attribute}"),
                                ("batch_stats", *linen_path, attribute))
    if not found:
        raise ValueError(f"convert: {type(model).__name__} holds no e3kernels.nnx module")


def _assign(leaf: _Leaf, value, where: str) -> None:
    old = leaf.variable[...]
    if getattr(value, "shape", None) != old.shape:
        raise ValueError(
            f"convert: {where} has shape {getattr(value, 'shape', None)}; the model's "
            f"{leaf.nnx_path} has shape {old.shape}"
        )
    leaf.variable[...] = jax.numpy.asarray(value, dtype=value.dtype)


def _check_all_used(used: set, available: set, source: str) -> None:
    left = sorted("/".join(k) for k in available - used)
    if left:
        raise ValueError(
            f"convert: {source} has leaves that no e3kernels module of the model takes: {left}. "
            "Map NNX paths to the source's module names with `names=`, or copy your own modules' "
            "parameters yourself."
        )


def load_haiku(model: nnx.Module, params, state=None, *, names: Mapping[str, str] | None = None) -> None:
    """Set ``model``'s parameters (and BatchNorm statistics) from Haiku ``params`` and ``state``.

    Args:
      model: an NNX model holding e3kernels modules (or one e3kernels module).
      params, state: what ``hk.transform[_with_state](f).init`` gave.
      names: NNX path (``"block/linear"``) to Haiku module name (``"block/~/linear"``);
        by default the path itself, or Haiku's default name for a module that is the model.
    """
    params, state = params or {}, state or {}
    trees = {"params": params, "state": state}
    used = set()
    for leaf in _leaves(model, names):
        collection, module_name, key = leaf.haiku
        try:
            value = trees[collection][module_name][key]
        except KeyError:
            raise ValueError(
                f"convert: Haiku {collection} have no {module_name!r}/{key!r} for {leaf.nnx_path}; "
                f"their modules are {sorted(trees[collection])}. Pass names={{nnx path: haiku name}}."
            ) from None
        _assign(leaf, value, f"Haiku {collection}[{module_name!r}][{key!r}]")
        used.add((collection, module_name, key))
    available = {(c, m, k) for c, tree in trees.items() for m, leaves in tree.items() for k in leaves}
    _check_all_used(used, available, "the Haiku tree")


def to_haiku(model: nnx.Module, *, names: Mapping[str, str] | None = None) -> tuple[dict, dict]:
    """``(params, state)`` for the Haiku form of ``model``'s e3kernels modules (see
    :func:`load_haiku` for ``names``)."""
    trees = {"params": {}, "state": {}}
    for leaf in _leaves(model, names):
        collection, module_name, key = leaf.haiku
        trees[collection].setdefault(module_name, {})[key] = leaf.variable[...]
    return trees["params"], trees["state"]


def load_linen(model: nnx.Module, variables, *, names: Mapping[str, str] | None = None) -> None:
    """Set ``model``'s parameters and statistics from linen ``variables``
    (``{"params": ..., "batch_stats": ...}``); ``names`` maps NNX paths to linen module
    paths (``"block/Linear_0"``), by default the same."""
    used = set()
    for leaf in _leaves(model, names):
        node = variables
        for depth, key in enumerate(leaf.linen):
            if not isinstance(node, Mapping) or key not in node:
                raise ValueError(
                    f"convert: linen variables have no {'/'.join(leaf.linen[:depth + 1])!r} for "
                    f"{leaf.nnx_path}. Pass names={{nnx path: linen module path}}."
                )
            node = node[key]
        _assign(leaf, node, f"linen {'/'.join(leaf.linen)}")
        used.add(leaf.linen)
    available = {tuple(str(getattr(k, "key", k)) for k in path)
                 for path, _ in jax.tree_util.tree_leaves_with_path(dict(variables))}
    _check_all_used(used, available, "the linen variables")


def to_linen(model: nnx.Module, *, names: Mapping[str, str] | None = None) -> dict:
    """linen ``variables`` for ``model``'s e3kernels modules (see :func:`load_linen`)."""
    variables: dict = {}
    for leaf in _leaves(model, names):
        node = variables
        for key in leaf.linen[:-1]:
            node = node.setdefault(key, {})
        node[leaf.linen[-1]] = leaf.variable[...]
    return variables
