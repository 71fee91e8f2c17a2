"""Labels from a paired fluorescence channel: a two-component Gaussian mixture on per-patch mean intensity.

With components (low, high) of means m and standard deviations s, a patch is the low class below
m_low + s_low, the high class above m_high - s_high, and discarded in between (ambiguous). The fitted
thresholds are saved as JSON and can be applied unchanged to another dataset.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..errors import EmbedkitError
from ..figures import pyplot, save_figure


@dataclass(frozen=True)
class GmmThresholds:
    """The rule: values below ``low`` -> ``classes[0]``, above ``high`` -> ``classes[1]``, else ambiguous."""

    low: float
    high: float
    classes: tuple[str, str] = ("live", "dead")
    means: tuple[float, float] | None = None     # of the fitted components (None for thresholds set by hand)
    sds: tuple[float, float] | None = None
    weights: tuple[float, float] | None = None
    n_fitted: int = 0
    bic: tuple[float, float] | None = None       # of one and of two Gaussians on the fitted values

    def __post_init__(self):
        if not self.low < self.high:
            raise EmbedkitError(f"GMM thresholds overlap (low-class mean + sd = {self.low:.4g} >= high-class mean - sd = "
                                f"{self.high:.4g}): the paired channel does not separate two populations; check the channel")
        if len(self.classes) != 2 or self.classes[0] == self.classes[1] or not all(self.classes):
            raise EmbedkitError(f"GMM classes {self.classes!r}: give two different names, low-intensity class first")

    def assign(self, values: np.ndarray) -> np.ndarray:
        """Class name per value; '' for the ambiguous middle."""
        v = np.asarray(values, np.float64)
        out = np.full(v.shape, "", dtype=object)
        out[v < self.low] = self.classes[0]
        out[v > self.high] = self.classes[1]
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        for k in ("means", "sds", "weights", "bic"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps({"format": "embedkit-gmm-thresholds", "version": 1, **self.to_dict()}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GmmThresholds":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise EmbedkitError(f"--gmm-thresholds {path}: cannot read it ({type(exc).__name__}: {exc})") from None
        if not isinstance(d, dict) or d.get("format") != "embedkit-gmm-thresholds":
            raise EmbedkitError(f"--gmm-thresholds {path}: not a thresholds file written by embedkit patches")
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "GmmThresholds":
        """Inverse of to_dict."""
        opt = {k: None if d.get(k) is None else tuple(float(v) for v in d[k]) for k in ("means", "sds", "weights", "bic")}
        return cls(low=float(d["low"]), high=float(d["high"]), classes=tuple(d["classes"]), n_fitted=int(d.get("n_fitted", 0)), **opt)


#: How much better (lower) the BIC of two Gaussians must be than that of one before two populations are believed.
MIN_BIC_GAIN = 10.0


def fit_thresholds(values: np.ndarray, classes: tuple[str, str] = ("live", "dead"), seed: int = 0) -> GmmThresholds:
    """Fit a 2-component Gaussian mixture to per-patch means and derive the two thresholds.

    Refuses when the values do not show two populations (one Gaussian explains them as well by BIC):
    a mixture fitted to a single population would split it at an arbitrary place.
    """
    from sklearn.mixture import GaussianMixture

    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    if len(v) < 10:
        raise EmbedkitError(f"a 2-component GMM needs at least 10 patch intensities; got {len(v)}")
    if np.ptp(v) == 0:
        raise EmbedkitError("every patch has the same paired-channel intensity; there is nothing to separate")
    gm = GaussianMixture(n_components=2, covariance_type="full", n_init=3, random_state=seed).fit(v[:, None])
    bic1 = float(GaussianMixture(n_components=1, random_state=seed).fit(v[:, None]).bic(v[:, None]))
    bic2 = float(gm.bic(v[:, None]))
    if bic2 > bic1 - MIN_BIC_GAIN:
        raise EmbedkitError(f"the paired-channel intensities of {len(v)} patches do not show two populations (BIC: one "
                            f"Gaussian {bic1:.1f}, two {bic2:.1f}; two must be lower by {MIN_BIC_GAIN:g}); check the "
                            f"channel, or apply thresholds fitted elsewhere with --gmm-thresholds")
    means = gm.means_.ravel()
    sds = np.sqrt(gm.covariances_.ravel())
    order = np.argsort(means)
    m, s, w = means[order], sds[order], gm.weights_[order]
    return GmmThresholds(low=float(m[0] + s[0]), high=float(m[1] - s[1]), classes=tuple(classes),
                         means=(float(m[0]), float(m[1])), sds=(float(s[0]), float(s[1])),
                         weights=(float(w[0]), float(w[1])), n_fitted=int(len(v)), bic=(bic1, bic2))


def plot_thresholds(values: np.ndarray, thr: GmmThresholds, path: str | os.PathLike) -> Path:
    """Histogram of the patch means with the two fitted Gaussians and the thresholds, for checking by eye."""
    plt = pyplot()
    v = np.asarray(values, np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(v, bins=60, density=True, color="0.75")
    xs = np.linspace(v.min(), v.max(), 400)
    for k, colour in zip(range(2) if thr.means else (), ("tab:green", "tab:red")):
        if thr.sds[k] > 0:
            pdf = thr.weights[k] * np.exp(-0.5 * ((xs - thr.means[k]) / thr.sds[k]) ** 2) / (thr.sds[k] * np.sqrt(2 * np.pi))
            ax.plot(xs, pdf, color=colour, label=f"{thr.classes[k]} component")
    ax.axvline(thr.low, color="tab:green", ls="--", label=f"{thr.classes[0]} < {thr.low:.4g}")
    ax.axvline(thr.high, color="tab:red", ls="--", label=f"{thr.classes[1]} > {thr.high:.4g}")
    ax.set_xlabel("paired-channel mean intensity per patch")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
