"""Complete models built from e3kernels' modules (Haiku; no Flax needed).

* :mod:`e3kernels.models.mace`: a MACE interatomic potential (energy and forces), the
  data helpers it needs (``random_liquid``, ``neighbor_list``) and the e3nn-jax baseline
  of its convolution.
"""

from e3kernels.models import mace

__all__ = ["mace"]
