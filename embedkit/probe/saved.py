"""A fitted probe: its preprocessing, head arrays and provenance, saved as JSON plus safetensors (never pickle).

Folder layout::

    probe.json           format, version, head, classes, encoder key and full config, config fingerprint,
                         preprocessing flags, hyper-parameters, calibration, validation summary
    probe.safetensors    mean, scale, [pca], weight [K, D'], bias [K]  (linear heads)
                         mean, scale, [pca], bank [M, D'], bank_labels [M], vote_weight [K]  (kNN)
                         val_proba [V, K], val_labels [V]  (validation predictions, for adjusted counts)

``load_probe(DIR)`` returns a :class:`Probe` whose ``predict_proba`` takes raw encoder features.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__
from ..atomic import atomic_path, atomic_write_bytes, atomic_write_text
from ..errors import EmbedkitError
from ..results import json_text
from ..store import comparable_config, fingerprint
from .features import Preprocessor, iter_chunks, l2_rows

FORMAT = "embedkit-probe"
VERSION = 1
LINEAR_HEADS = ("logreg", "svm")
HEADS = ("logreg", "svm", "knn")


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def folded_linear(pre: Preprocessor, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights [D, K] and bias [K] acting on (optionally L2-normalised) raw features, preprocessing included."""
    a, shift = pre.fold()
    w = weight.astype(np.float64)
    return (a @ w.T).astype(np.float32), (shift @ w.T + bias.astype(np.float64)).astype(np.float32)


def linear_scores(x: np.ndarray, pre: Preprocessor, weight: np.ndarray, bias: np.ndarray,
                  idx: np.ndarray | None = None) -> np.ndarray:
    """Decision scores [N, K] of a linear head on raw features ``x[idx]``, in float32 chunks."""
    w_eff, b_eff = folded_linear(pre, weight, bias)
    out = [(l2_rows(block) if pre.l2 else block) @ w_eff + b_eff for block in iter_chunks(x, idx)]
    return np.concatenate(out) if out else np.zeros((0, len(bias)), np.float32)


def knn_proba(sims: np.ndarray, nbr: np.ndarray, bank_labels: np.ndarray, k: int, temperature: float,
              vote_weight: np.ndarray) -> np.ndarray:
    """DINO-style kNN probabilities: each of the k nearest votes exp(similarity / T) for its class."""
    n_classes = len(vote_weight)
    s, i = sims[:, :k], nbr[:, :k]
    valid = i >= 0
    w = np.where(valid, np.exp((np.where(valid, s, 0.0) - 1.0) / temperature), 0.0)  # shift by max cosine 1: stable
    lab = bank_labels[np.where(valid, i, 0)]
    votes = np.zeros((len(s), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(s)), k), lab.ravel()), w.ravel())
    votes *= vote_weight[None, :]
    total = votes.sum(axis=1, keepdims=True)
    return np.where(total > 0, votes / np.where(total > 0, total, 1.0), 1.0 / n_classes)


@dataclass
class Probe:
    """A fitted head plus everything needed to apply it to new embeddings of the same encoder."""

    head: str
    classes: list[str]
    pre: Preprocessor
    params: dict
    arrays: dict[str, np.ndarray]
    calibration: dict = field(default_factory=lambda: {"method": "none"})
    encoder_key: str = ""
    encoder_config: dict = field(default_factory=dict)
    config_fingerprint: str = ""
    validation: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    # -- applying -------------------------------------------------------------------------------
    def decision_function(self, x: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        """Uncalibrated scores [N, K] of a linear head."""
        if self.head not in LINEAR_HEADS:
            raise EmbedkitError(f"a {self.head} probe has no linear decision function")
        return linear_scores(x, self.pre, self.arrays["weight"], self.arrays["bias"], idx)

    def predict_proba(self, x: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
        """Class probabilities [N, K] for raw encoder features ``x`` (rows ``idx``; all by default)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != len(self.pre.mean):
            raise EmbedkitError(f"features have shape {x.shape}; this probe expects [N, {len(self.pre.mean)}]")
        if self.head in LINEAR_HEADS:
            return softmax(self.decision_function(x, idx) / self._temperature())
        from ..neighbors import search

        q = self.pre.transform(x, idx)
        sims, nbr = search(self.arrays["bank"], q, int(self.params["k"]))
        return knn_proba(sims, nbr, self.arrays["bank_labels"], int(self.params["k"]),
                         float(self.params["temperature"]), self.arrays["vote_weight"])

    def predict(self, x: np.ndarray) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(x).argmax(axis=1)]

    def _temperature(self) -> float:
        return float(self.calibration.get("temperature", 1.0)) if self.calibration.get("method") == "temperature" else 1.0

    def torch_module(self):
        """An ``nn.Module`` mapping raw features [B, D] to calibrated logits [B, K], preprocessing folded in.

        ``softmax(module(x))`` equals ``predict_proba(x)``; it is differentiable, so an encoder followed by
        this module is one network that CAM methods can explain.
        """
        if self.head not in LINEAR_HEADS:
            raise EmbedkitError(f"a {self.head} probe is not differentiable (votes of neighbours); "
                                f"fit a logreg or svm probe to explain a frozen encoder with CAMs")
        import torch

        from .folded import FoldedLinear

        w_eff, b_eff = folded_linear(self.pre, self.arrays["weight"], self.arrays["bias"])
        t = self._temperature()
        return FoldedLinear(torch.from_numpy(w_eff.T / t), torch.from_numpy(b_eff / t), l2=self.pre.l2)

    # -- provenance checks -------------------------------------------------------------------------
    def check_config(self, store_config: dict) -> None:
        """Refuse embeddings made with another encoder configuration than the one this probe was fitted on."""
        got = fingerprint(comparable_config(store_config))
        if got != self.config_fingerprint:
            diffs = [f"{k}: {self.encoder_config.get(k)!r} for the probe vs {store_config.get(k)!r} here"
                     for k in comparable_config(store_config) if self.encoder_config.get(k) != store_config.get(k)]
            raise EmbedkitError(f"this {self.head} probe was fitted on embeddings from another encoder configuration "
                                f"({'; '.join(diffs)[:300] or 'fingerprints differ'}); embed these items with the "
                                f"probe's encoder settings, or fit a new probe")

    @property
    def name(self) -> str:
        return f"{self.encoder_key}/{self.head}"

    # -- saving ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "head": self.head, "classes": list(self.classes),
                "encoder_key": self.encoder_key, "encoder_config": self.encoder_config,
                "config_fingerprint": self.config_fingerprint, **self.pre.flags,
                "hyperparameters": self.params, "calibration": self.calibration, "validation": self.validation,
                "provenance": {"embedkit_version": __version__, **self.provenance}}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the probe folder atomically: a temp folder, filled, then renamed over the old one."""
        from safetensors.numpy import save

        folder = Path(folder)
        arrays = {k: np.ascontiguousarray(v) for k, v in {**self.pre.arrays(), **self.arrays}.items()}
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        with atomic_path(folder) as tmp:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            atomic_write_bytes(tmp / "probe.safetensors", save(arrays))
            atomic_write_text(tmp / "probe.json", json_text(self.to_json()))
            if folder.exists():
                os.replace(folder, old)
        shutil.rmtree(old, ignore_errors=True)
        return folder


def load_probe(folder: str | os.PathLike) -> Probe:
    """Read a probe folder written by ``embedkit probe`` (checks format, version and array shapes)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    meta_path, arr_path = folder / "probe.json", folder / "probe.safetensors"
    if not meta_path.exists() or not arr_path.exists():
        raise EmbedkitError(f"{folder}: not a saved probe (needs probe.json and probe.safetensors); "
                            f"'embedkit probe --out DIR' writes them to DIR/<head>/probe")
    try:
        meta = json.loads(meta_path.read_text())
        arrays = load_file(str(arr_path))
    except Exception as exc:  # corrupt JSON or tensors
        raise EmbedkitError(f"{folder}: unreadable probe ({type(exc).__name__}: {str(exc)[:200]})") from None
    _check_meta(folder, meta)
    head = meta["head"]
    try:
        pre = Preprocessor.from_saved(meta, arrays)
    except (KeyError, TypeError, ValueError) as exc:
        raise EmbedkitError(f"{folder}: probe.safetensors lacks its preprocessing arrays ({exc})") from None
    own = set(pre.arrays())
    k = len(meta["classes"])
    body = {n: a for n, a in arrays.items() if n not in own}
    needed = ("weight", "bias") if head in LINEAR_HEADS else ("bank", "bank_labels", "vote_weight")
    missing = [n for n in needed if n not in body]
    if missing:
        raise EmbedkitError(f"{folder}: probe.safetensors lacks {', '.join(missing)}")
    width = body["weight"].shape if head in LINEAR_HEADS else (k, body["bank"].shape[1])
    if width != (k, pre.out_dim):
        raise EmbedkitError(f"{folder}: head arrays {width} do not match {k} classes x {pre.out_dim} features")
    return Probe(head=head, classes=list(meta["classes"]), pre=pre, params=meta.get("hyperparameters", {}),
                 arrays=body, calibration=meta.get("calibration", {"method": "none"}),
                 encoder_key=meta.get("encoder_key", ""), encoder_config=meta.get("encoder_config", {}),
                 config_fingerprint=meta.get("config_fingerprint", ""), validation=meta.get("validation", {}),
                 provenance=meta.get("provenance", {}))


def _check_meta(folder: Path, meta) -> None:
    """Refuse a probe.json that is not an object of this format with a head and a list of class names."""
    where = f"{folder / 'probe.json'}"
    if not isinstance(meta, dict):
        raise EmbedkitError(f"{where}: expected a JSON object, found a {type(meta).__name__}; not a saved probe")
    if meta.get("format") != FORMAT:
        raise EmbedkitError(f"{where}: not an embedkit probe (format {meta.get('format')!r})")
    try:
        version = int(meta.get("version", 0))
    except (TypeError, ValueError):
        raise EmbedkitError(f"{where}: version {meta.get('version')!r} is not a number") from None
    if version > VERSION:
        raise EmbedkitError(f"{folder}: probe format version {version} is newer than this embedkit "
                            f"understands ({VERSION}); upgrade embedkit")
    if meta.get("head") not in HEADS:
        raise EmbedkitError(f"{folder}: unknown probe head {meta.get('head')!r}")
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise EmbedkitError(f"{where}: 'classes' must list the probe's class names (found {str(classes)[:80]})")
    for name in ("hyperparameters", "calibration", "encoder_config", "validation", "provenance"):
        if not isinstance(meta.get(name, {}), dict):
            raise EmbedkitError(f"{where}: {name!r} must be a JSON object")


def align_classes(probes: Sequence[Probe]) -> list[str]:
    """The shared class list of an ensemble (same classes, any order), or a clear error."""
    first = probes[0].classes
    for p in probes[1:]:
        if sorted(p.classes) != sorted(first):
            raise EmbedkitError(f"probes disagree on classes ({', '.join(first)} vs {', '.join(p.classes)}); "
                                f"an ensemble needs probes of the same classes")
    return list(first)


__all__ = ["Probe", "load_probe", "align_classes", "softmax", "linear_scores", "knn_proba"]
