"""Feature preprocessing fitted on train rows only, and class balancing of the training part.

The pipeline is: optional row-wise L2 normalisation, standardisation with train mean and scale, and
optional PCA whitening. Everything after the L2 step is affine, so a linear head can fold it into its
weights (see :meth:`Preprocessor.fold`) and never materialise transformed features.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..balance import normalise_balance
from ..errors import EmbedkitError

CHUNK_ROWS = 65536


#: Below this many feature values, solvers run single-threaded: threads only add overhead, and on a busy
#: machine spinning OpenMP/BLAS threads make small fits orders of magnitude slower.
SMALL_WORK = 1 << 24


@contextlib.contextmanager
def threads_for(n_values: int) -> Iterator[None]:
    """Limit torch, BLAS and OpenMP (FAISS) to one thread for small problems; leave large ones alone."""
    if n_values >= SMALL_WORK:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def iter_chunks(x: np.ndarray, idx: np.ndarray | None = None, rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """Float32 blocks of ``x[idx]`` (or of all of ``x``), so a float16 matrix is never copied whole."""
    n = len(x) if idx is None else len(idx)
    for s in range(0, n, rows):
        block = x[s:s + rows] if idx is None else x[idx[s:s + rows]]
        yield np.asarray(block, dtype=np.float32)


def l2_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


@dataclass
class Preprocessor:
    """L2 (optional) -> standardise with train statistics -> PCA whitening (optional).

    ``mean``/``scale`` have the raw dimension D; ``pca`` is a [D, D'] matrix whose columns are
    principal axes divided by the square root of their variance, so whitened features have unit variance.
    """

    standardise: bool = True
    l2: bool = False
    pca_whiten: bool = False
    pca_dim: int | None = None
    mean: np.ndarray | None = field(default=None, repr=False)
    scale: np.ndarray | None = field(default=None, repr=False)
    pca: np.ndarray | None = field(default=None, repr=False)

    @property
    def flags(self) -> dict:
        return {"standardise": self.standardise, "l2": self.l2, "pca_whiten": self.pca_whiten, "pca_dim": self.pca_dim}

    @property
    def out_dim(self) -> int:
        return int(self.pca.shape[1]) if self.pca is not None else int(len(self.mean))

    def _pre_affine(self, block: np.ndarray) -> np.ndarray:
        return l2_rows(block) if self.l2 else block

    def fit(self, x: np.ndarray, idx: np.ndarray) -> "Preprocessor":
        """Train statistics streamed over ``x[idx]`` in float64 accumulators (never a full float copy)."""
        d = x.shape[1]
        n = len(idx)
        if n < 2:
            raise EmbedkitError(f"only {n} training item(s); a probe needs more")
        total = np.zeros(d)
        sq = np.zeros(d)
        for block in iter_chunks(x, idx):
            b = self._pre_affine(block).astype(np.float64)
            total += b.sum(0)
            sq += (b * b).sum(0)
        mean = total / n
        var = np.maximum(sq / n - mean * mean, 0.0)
        scale = np.ones(d)
        if self.standardise:
            scale = np.sqrt(var)
            scale[scale < 1e-8 * max(1.0, float(scale.max(initial=0.0)))] = 1.0  # constant features stay put
        center = self.standardise or self.pca_whiten  # whitening always centres
        self.mean = (mean if center else np.zeros(d)).astype(np.float32)
        self.scale = scale.astype(np.float32)
        self.pca = self._fit_pca(x, idx) if self.pca_whiten else None
        return self

    def _fit_pca(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        d = x.shape[1]
        cov = np.zeros((d, d))
        for block in iter_chunks(x, idx):
            z = self._standardised(block).astype(np.float64)
            cov += z.T @ z
        cov /= max(1, len(idx) - 1)
        vals, vecs = np.linalg.eigh(cov)
        order = np.argsort(vals)[::-1]
        vals, vecs = vals[order], vecs[:, order]
        keep = int((vals > 1e-6 * max(vals[0], 1e-30)).sum())
        keep = min(keep, len(idx) - 1)
        if self.pca_dim:
            keep = min(keep, int(self.pca_dim))
        if keep < 1:
            raise EmbedkitError("PCA whitening found no feature variance in the training part")
        return (vecs[:, :keep] / np.sqrt(vals[:keep])).astype(np.float32)

    def _standardised(self, block: np.ndarray) -> np.ndarray:
        return (self._pre_affine(block) - self.mean) / self.scale

    def transform(self, x: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        """Preprocessed float32 features of ``x[idx]`` (all rows by default)."""
        out = []
        for block in iter_chunks(x, idx):
            z = self._standardised(block)
            if self.pca is not None:
                z = z @ self.pca
            out.append(z.astype(np.float32, copy=False))
        return np.concatenate(out) if out else np.zeros((0, self.out_dim), np.float32)

    def fold(self) -> tuple[np.ndarray, np.ndarray]:
        """(A [D, D'], shift [D']) with transform(x) == l2?(x) @ A + shift, for folding into linear heads."""
        inv = 1.0 / self.scale.astype(np.float64)
        shift = -(self.mean.astype(np.float64) * inv)
        if self.pca is None:
            return np.diag(inv), shift
        pca = self.pca.astype(np.float64)
        return inv[:, None] * pca, shift @ pca

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean, "scale": self.scale}
        if self.pca is not None:
            out["pca"] = self.pca
        return out

    @classmethod
    def from_saved(cls, flags: dict, arrays: dict[str, np.ndarray]) -> "Preprocessor":
        return cls(standardise=bool(flags.get("standardise", True)), l2=bool(flags.get("l2", False)),
                   pca_whiten=bool(flags.get("pca_whiten", False)), pca_dim=flags.get("pca_dim"),
                   mean=arrays["mean"], scale=arrays["scale"], pca=arrays.get("pca"))


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """'Balanced' weights n / (K * n_k) for the classes present (0 for absent ones)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return w


def balance(y: np.ndarray, mode: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Training positions (with repetition when oversampling) and optional per-position sample weights.

    ``weights`` keeps every item and weighs classes by n / (K * n_k); ``oversample`` draws the
    minority classes with replacement up to the largest class; ``undersample`` draws every class without
    replacement down to the smallest. Returned positions index into ``y``.
    """
    mode = normalise_balance(mode)
    pos = np.arange(len(y))
    if mode == "none":
        return pos, None
    classes, counts = np.unique(y, return_counts=True)
    if mode == "weights":
        w = class_weights(y, int(y.max()) + 1)
        return pos, w[y]
    target = counts.max() if mode == "oversample" else counts.min()
    picked = []
    for c, n in zip(classes, counts):
        members = pos[y == c]
        if mode == "oversample":
            extra = rng.choice(members, size=target - n, replace=True) if target > n else np.zeros(0, int)
            picked.append(np.concatenate([members, extra]))
        else:
            picked.append(rng.choice(members, size=target, replace=False))
    return np.sort(np.concatenate(picked)), None
