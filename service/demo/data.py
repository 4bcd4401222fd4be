"""The demo's data: a scikit-learn data set that ships with the package, split non-IID.

Nothing is downloaded: ``load_breast_cancer`` (569 x 30, 2 classes, tabular) and
``load_digits`` (1797 x 64, 10 classes) are files inside scikit-learn.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DATASETS", "FloatArray", "IntArray", "Split", "load_split"]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

DATASETS = {"breast_cancer": "load_breast_cancer", "digits": "load_digits"}
"""``--dataset`` choices and the scikit-learn loader of each."""


@dataclass(frozen=True)
class Split:
    """Train and test sets, and each site's share of the training set."""

    name: str
    x_train: FloatArray
    y_train: IntArray
    x_test: FloatArray
    y_test: IntArray
    sites: tuple[tuple[FloatArray, IntArray], ...]
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def describe(self) -> list[dict[str, Any]]:
        """Per site: sample count and class histogram (shows how skewed the split is)."""
        return [
            {
                "samples": len(y),
                "classes": np.bincount(y, minlength=self.n_classes).tolist(),
            }
            for _, y in self.sites
        ]


def _sklearn(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the demo needs scikit-learn: pip install 'secagg[demo]'") from exc


def load_split(
    name: str,
    sites: int,
    *,
    seed: int,
    alpha: float = 0.5,
    test_fraction: float = 0.3,
    min_samples: int = 10,
) -> Split:
    """Load ``name``, hold out a stratified test set, and split the rest over ``sites``.

    The split is non-IID in labels and size: each class is spread over the sites with
    proportions drawn from Dirichlet(``alpha``) (smaller is more skewed), redrawn until every
    site has ``min_samples``. Features are standardized with the training set's statistics
    (in a deployment those would come from a secure aggregation round of their own).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    datasets = _sklearn("sklearn.datasets")
    selection = _sklearn("sklearn.model_selection")
    x, y = getattr(datasets, DATASETS[name])(return_X_y=True)
    x_tr, x_te, y_tr, y_te = selection.train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std == 0] = 1.0
    x_tr = ((x_tr - mean) / std).astype(np.float32)
    x_te = ((x_te - mean) / std).astype(np.float32)
    y_tr, y_te = y_tr.astype(np.int64), y_te.astype(np.int64)
    n_classes = int(max(y_tr.max(), y_te.max()) + 1)
    if len(y_tr) < sites * min_samples:
        raise ValueError(f"{len(y_tr)} training samples cannot give {sites} sites {min_samples}")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(sites)]
        for c in range(n_classes):
            idx = rng.permutation(np.flatnonzero(y_tr == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * sites)) * len(idx)).astype(int)[:-1]
            for s, chunk in enumerate(np.split(idx, cuts)):
                parts[s].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            break
    else:  # pragma: no cover - only for absurd alpha / site counts
        raise ValueError("could not draw a split with enough samples per site; raise --alpha")
    shares = tuple((x_tr[np.sort(p)], y_tr[np.sort(p)]) for p in parts)
    return Split(name, x_tr, y_tr, x_te, y_te, shares, n_classes)
