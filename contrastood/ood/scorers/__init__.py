"""OOD scorers as plug-ins (see `base`), plus the numerical functions they are built from.

`REGISTRY` maps each name to its scorer; every module of this package is imported here, so a scorer is
one new file. `resolve(names)` expands "all" and rejects unknown names.
"""
from __future__ import annotations

import importlib
import pkgutil

from contrastood.ood.scorers.base import ALL, FEATURES, REGISTRY, FitContext, Scorer, register

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

from contrastood.ood.scorers.gaussian import (HIGHEST, SHRINKAGE_METHODS, GaussianParams,  # noqa: E402
                                              fit_gaussians, gaussian_log_densities, gaussian_score,
                                              mahalanobis_score, squared_mahalanobis)
from contrastood.ood.scorers.knn import KNNIndex, fit_knn, knn_score  # noqa: E402
from contrastood.ood.scorers.odin import odin_score  # noqa: E402
from contrastood.ood.scorers.softmax import energy_score, msp_score  # noqa: E402


def resolve(names) -> tuple[str, ...]:
    """Configured scorer names (a tuple, or 'a,b') -> registered names, "all" expanded, in order."""
    from contrastood.config_lib import as_names

    out: list[str] = []
    for name in as_names(names):
        expanded = sorted(REGISTRY, key=lambda n: (REGISTRY[n].rank, n)) if name == ALL else [name]
        for item in expanded:
            if item not in REGISTRY:
                raise ValueError(f"unknown scorer {item!r}; registered: {', '.join(REGISTRY)} (or 'all')")
            if item not in out:
                out.append(item)
    if not out:
        raise ValueError(f"no scorer configured; registered: {', '.join(REGISTRY)} (or 'all')")
    return tuple(out)
