"""Regularisation baselines that a user would pick instead of LWF, as a ``Trainer`` mixin.

* :class:`L2SP`: L2-SP (Li, Grandvalet & Davoine, ICML 2018), ``alpha/2 * ||theta - theta_0||^2`` towards the
  starting point.
* :class:`BSS`: Batch Spectral Shrinkage (Chen et al., NeurIPS 2019), ``eta * sum of the k smallest squared
  singular values`` of the batch's final-layer features.

Use them with :class:`RegularizedTrainer` (or mix :class:`RegularizationMixin` into another Trainer class)::

    trainer = RegularizedTrainer(model=model, args=args, train_dataset=ds, regularizers=[L2SP(L2SPConfig())])
"""

from .bss import BSS, BSSConfig, bss_penalty
from .l2sp import L2SP, L2SPConfig, l2sp_penalty
from .mixin import RegularizationMixin, RegularizedTrainer, Regularizer


__all__ = [
    "BSS", "BSSConfig", "bss_penalty", "L2SP", "L2SPConfig", "l2sp_penalty",
    "RegularizationMixin", "RegularizedTrainer", "Regularizer",
]
