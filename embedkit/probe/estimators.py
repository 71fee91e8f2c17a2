"""The probe heads as scikit-learn estimators: ``LogRegProbe``, ``SVMProbe`` and ``KNNProbe``.

They fit the same heads as ``embedkit probe`` (:mod:`embedkit.probe.heads`) with fixed hyper-parameters
(choose them with scikit-learn's ``GridSearchCV`` and ``GroupKFold``, or let ``ek.probe`` choose them on
its validation part), and save to the same folder format (probe.json + probe.safetensors).
Which ``check_estimator`` checks are skipped, and why, is listed in ``SKIPPED_CHECKS``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from ..errors import EmbedkitError
from .features import Preprocessor, class_weights
from .heads import DINO_TEMPERATURE, FitInput, HeadOptions, fit_head
from .saved import Probe, load_probe

#: check_estimator checks that do not apply, with the reason (also in docs/probe.md).
SKIPPED_CHECKS = {
    "check_sample_weight_equivalence_on_dense_data":
        "L-BFGS stops at a tolerance, so weights 2 and a duplicated row agree to ~1e-4, not to the check's 1e-7",
    "check_sample_weight_equivalence_on_sparse_data": "sparse input is not accepted (embeddings are dense)",
}


class _ProbeEstimator(ClassifierMixin, BaseEstimator):
    """Shared fit/predict/save of the three heads; subclasses set ``_head`` and the head's options."""

    _head = ""

    def _head_options(self, n_rows: int) -> HeadOptions:
        raise NotImplementedError

    def fit(self, X, y, groups=None, sample_weight=None) -> "_ProbeEstimator":
        """Fit the head on every row of ``X`` (``groups`` is accepted for group-aware pipelines and unused here)."""
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, yi = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"a probe needs at least two classes; y has only one class ({self.classes_[0]!r})")
        weight = None
        if sample_weight is not None:
            weight = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
            if not weight.any():
                raise ValueError("sample weights are all zero; at least one row must count")
        votes = self._class_weights(yi)
        if votes is not None:
            weight = votes[yi] * (1.0 if weight is None else weight)
        pre = Preprocessor(standardise=self.standardise, l2=self.l2).fit(X, np.arange(len(X)))
        data = FitInput(x=X, y=yi.astype(np.int64), train=np.arange(len(X)), train_weight=weight,
                        val=np.zeros(0, dtype=np.int64), classes=[str(c) for c in self.classes_], class_vote_weight=np.ones(len(self.classes_)) if votes is None else votes)
        self.probe_: Probe = fit_head(self._head, data, pre, self._head_options(len(X)))
        search = self.probe_.params.get("search") or [{}]
        if "iterations" in search[0]:
            self.n_iter_ = int(search[0]["iterations"])
        return self

    def _class_weights(self, yi: np.ndarray) -> np.ndarray | None:
        """Per-class weights: None, 'balanced' (n / (K n_k)) or a {class: weight} mapping."""
        if self.class_weight is None:
            return None
        if isinstance(self.class_weight, str) and self.class_weight == "balanced":
            return class_weights(yi, len(self.classes_))
        if isinstance(self.class_weight, dict):
            return np.array([float(self.class_weight.get(c, 1.0)) for c in self.classes_])
        raise ValueError(f"class_weight must be None, 'balanced' or a dict, got {self.class_weight!r}")

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities [N, K], columns in the order of ``classes_``."""
        check_is_fitted(self, "probe_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return self.probe_.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row."""
        check_is_fitted(self, "probe_")
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the fitted probe as probe.json + probe.safetensors (readable by ``ek.load_probe`` too)."""
        check_is_fitted(self, "probe_")
        self.probe_.provenance["estimator"] = {"class": type(self).__name__, "params": self.get_params()}
        return self.probe_.save(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "_ProbeEstimator":
        """Read a probe folder written by ``save`` or by ``embedkit probe`` (of this head)."""
        probe = load_probe(folder)
        if probe.head != cls._head:
            raise EmbedkitError(f"{folder}: a {probe.head} probe, not a {cls._head} one; use "
                                f"{ESTIMATORS[probe.head].__name__}.load")
        saved = probe.provenance.get("estimator", {}).get("params", {})
        est = cls(**{k: v for k, v in saved.items() if k in cls().get_params()})
        est.probe_ = probe
        est.classes_ = np.asarray(probe.classes)
        est.n_features_in_ = len(probe.pre.mean)
        return est

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        return tags


class LogRegProbe(_ProbeEstimator):
    """Multinomial logistic regression, ``0.5 |W|^2 + C * sum_i w_i CE_i`` (scikit-learn's objective), by L-BFGS."""

    _head = "logreg"

    def __init__(self, C: float = 1.0, standardise: bool = True, l2: bool = False, class_weight: str | dict | None = None,
                 max_iter: int = 300, tol: float = 1e-6, device: str = "cpu"):
        self.C = C
        self.standardise = standardise
        self.l2 = l2
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    def _head_options(self, n_rows: int) -> HeadOptions:
        return HeadOptions(c_grid=(float(self.C),), max_iter=self.max_iter, tol=self.tol, device=self.device)


class SVMProbe(LogRegProbe):
    """Linear SVM, one-vs-rest squared hinge with LinearSVC's objective; probabilities by softmax of the scores."""

    _head = "svm"


class KNNProbe(_ProbeEstimator):
    """Cosine kNN (FAISS): the k nearest training rows vote exp(similarity / temperature) for their class."""

    _head = "knn"

    def __init__(self, k: int = 20, temperature: float = DINO_TEMPERATURE, standardise: bool = True, l2: bool = False,
                 class_weight: str | dict | None = None):
        self.k = k
        self.temperature = temperature
        self.standardise = standardise
        self.l2 = l2
        self.class_weight = class_weight

    def _head_options(self, n_rows: int) -> HeadOptions:
        return HeadOptions(k_grid=(max(1, min(int(self.k), n_rows)),), temperature=float(self.temperature))


ESTIMATORS = {"logreg": LogRegProbe, "svm": SVMProbe, "knn": KNNProbe}

__all__ = ["ESTIMATORS", "KNNProbe", "LogRegProbe", "SKIPPED_CHECKS", "SVMProbe"]
