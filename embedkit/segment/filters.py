"""Empty-patch filters: ``simple`` (foreground fraction and variance) and ``learned`` (an SVM on embeddings).

A learned filter is saved as plain arrays (``filter.npz``, read without pickle) plus ``filter.json``
(the encoder it needs, with its weights fingerprint), so it can be reused on another dataset and is
refused if the encoder at hand differs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, atomic_write_json
from ..errors import EmbedkitError

EMPTY, KEPT = "empty", "kept"


@dataclass(frozen=True)
class SimpleFilter:
    """Keep a patch when enough of it departs from the field's background and it is not flat.

    Intensities are in [0, 1]; the background level is the field's median (most of a field is background).
    """

    min_foreground: float = 0.01   # fraction of pixels at least ``delta`` away from the background level
    min_std: float = 0.02          # standard deviation of the patch's gray values
    delta: float = 0.1

    name = "simple"

    @property
    def config(self) -> dict:
        return {"filter": "simple", **asdict(self)}

    @staticmethod
    def gray(patches: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, C] patches -> float [N, S, S] gray values in [0, 1]."""
        return patches.astype(np.float32).mean(axis=-1) / 255.0

    def measure(self, patches: np.ndarray, background: float) -> tuple[np.ndarray, np.ndarray]:
        """(foreground fraction, standard deviation) of each patch."""
        g = self.gray(patches)
        if len(g) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        fg = (np.abs(g - background) >= self.delta).mean(axis=(1, 2))
        return fg.astype(np.float32), g.std(axis=(1, 2)).astype(np.float32)

    def keep(self, patches: np.ndarray, background: float) -> np.ndarray:
        fg, sd = self.measure(patches, background)
        return (fg >= self.min_foreground) & (sd >= self.min_std)


@dataclass
class LearnedFilter:
    """A linear SVM on frozen-encoder embeddings separating empty from kept patches."""

    encoder_config: dict
    conversion: dict
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    info: dict = field(default_factory=dict)
    _encoder: object = None

    name = "learned"

    @property
    def fingerprint(self) -> str:
        from ..store import fingerprint

        return fingerprint({"encoder": self.encoder_config.get("weights_fingerprint"), "coef": self.coef.round(6).tolist(),
                            "intercept": round(float(self.intercept), 6), "mean": self.mean.round(6).tolist()})

    @property
    def config(self) -> dict:
        return {"filter": "learned", "encoder": self.encoder_config.get("encoder"),
                "weights_fingerprint": self.encoder_config.get("weights_fingerprint"), "fingerprint": self.fingerprint}

    # fitting ---------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, examples: str | os.PathLike, encoder, conv=None, device: str = "cpu", batch_size: int = 32) -> "LearnedFilter":
        """Fit on a folder with ``empty/`` and ``kept/`` sub-folders of example patches (a few of each)."""
        from ..embed import embed_images
        from ..images import Conversion
        from ..sources import discover

        conv = conv or Conversion()
        src = discover(examples)
        labels = np.array([it.label for it in src.items])
        unknown = sorted(set(labels) - {EMPTY, KEPT})
        counts = {c: int((labels == c).sum()) for c in (EMPTY, KEPT)}
        if unknown or min(counts.values()) < 2:
            raise EmbedkitError(f"--filter-examples {examples}: needs sub-folders 'empty' and 'kept' with at least 2 "
                                f"patches each (found {counts}{', and unexpected ' + ', '.join(unknown) if unknown else ''})")
        x = embed_images(encoder, [src.abspath(it) for it in src.items], conv, device=device, batch_size=batch_size)
        y = (labels == KEPT).astype(int)
        return cls.fit_arrays(x, y, encoder.config, conv.to_dict(), encoder=encoder)

    @classmethod
    def fit_arrays(cls, x: np.ndarray, y: np.ndarray, encoder_config: dict, conversion: dict, encoder=None) -> "LearnedFilter":
        """Fit on embeddings ``x`` with ``y`` = 1 for kept, 0 for empty."""
        from sklearn.model_selection import LeaveOneOut, StratifiedKFold, cross_val_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        x = np.asarray(x, np.float64)
        y = np.asarray(y, int)
        model = make_pipeline(StandardScaler(), SVC(kernel="linear", C=1.0, class_weight="balanced"))
        model.fit(x, y)
        n_min = int(min((y == 0).sum(), (y == 1).sum()))
        cv = LeaveOneOut() if len(y) <= 100 else StratifiedKFold(5, shuffle=True, random_state=0)
        cv_acc = float(cross_val_score(model, x, y, cv=cv).mean()) if n_min >= 2 else float("nan")
        scaler, svm = model[0], model[1]
        info = {"n_empty": int((y == 0).sum()), "n_kept": int((y == 1).sum()), "train_accuracy": float(model.score(x, y)),
                "cv_accuracy": cv_acc, "cv": "leave-one-out" if len(y) <= 100 else "5-fold"}
        return cls(encoder_config=encoder_config, conversion=conversion, mean=scaler.mean_.astype(np.float64),
                   scale=scaler.scale_.astype(np.float64), coef=svm.coef_[0].astype(np.float64),
                   intercept=float(svm.intercept_[0]), info=info, _encoder=encoder)

    # applying --------------------------------------------------------------------------------------
    def decision(self, embeddings: np.ndarray) -> np.ndarray:
        """Signed distance to the SVM boundary: positive = kept."""
        z = (np.asarray(embeddings, np.float64) - self.mean) / self.scale
        return z @ self.coef + self.intercept

    def encoder(self):
        if self._encoder is None:
            from ..encoders import encoder_from_config

            self._encoder = encoder_from_config(self.encoder_config)
        return self._encoder

    def scores(self, patches: np.ndarray, device: str = "cpu", batch_size: int = 32) -> np.ndarray:
        """Decision values of uint8 [N, S, S, C] patches."""
        from ..embed import embed_images
        from ..images import Conversion

        if len(patches) == 0:
            return np.zeros(0)
        x = embed_images(self.encoder(), list(patches), Conversion.from_dict(self.conversion), device=device, batch_size=batch_size)
        return self.decision(x)

    def keep(self, patches: np.ndarray, device: str = "cpu", batch_size: int = 32) -> np.ndarray:
        return self.scores(patches, device, batch_size) > 0

    # saving ----------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write filter.json + filter.npz into ``folder`` (atomically, each file)."""
        folder = Path(folder)
        meta = {"format": "embedkit-learned-filter", "version": 1, "encoder_config": self.encoder_config,
                "conversion": self.conversion, "intercept": self.intercept, "info": self.info,
                "fingerprint": self.fingerprint, "classes": [EMPTY, KEPT]}
        with atomic_path(folder / "filter.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, mean=self.mean, scale=self.scale, coef=self.coef)
        atomic_write_json(folder / "filter.json", meta)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "LearnedFilter":
        folder = Path(folder)
        if not (folder / "filter.json").is_file() or not (folder / "filter.npz").is_file():
            raise EmbedkitError(f"--filter-model {folder}: no saved filter (filter.json + filter.npz); "
                                f"fit one with --filter-examples DIR (sub-folders empty/ and kept/)")
        try:
            meta = json.loads((folder / "filter.json").read_text())
        except (OSError, ValueError) as exc:
            raise EmbedkitError(f"{folder / 'filter.json'}: unreadable ({type(exc).__name__}: {exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != "embedkit-learned-filter":
            raise EmbedkitError(f"{folder / 'filter.json'}: not an embedkit learned filter")
        try:
            with np.load(folder / "filter.npz", allow_pickle=False) as z:
                arrays = {k: np.asarray(z[k], dtype=np.float64) for k in ("mean", "scale", "coef")}
            if not (arrays["mean"].ndim == 1 and arrays["mean"].shape == arrays["scale"].shape == arrays["coef"].shape):
                raise ValueError(f"arrays of shapes {[a.shape for a in arrays.values()]}; expected three equal vectors")
            filt = cls(encoder_config=dict(meta["encoder_config"]), conversion=meta["conversion"],
                       intercept=float(meta["intercept"]), info=meta.get("info", {}), **arrays)
        except Exception as exc:  # a torn zip, missing or pickled arrays, wrong shapes: all one line
            raise EmbedkitError(f"{folder}: filter.npz / filter.json are damaged ({type(exc).__name__}: "
                                f"{str(exc)[:160]}); refit the filter with --filter-examples") from None
        if filt.fingerprint != meta.get("fingerprint"):
            raise EmbedkitError(f"{folder}: filter.npz does not match filter.json (fingerprint differs); refit the filter")
        return filt



def make_filter(name: str, *, min_foreground: float = 0.01, min_std: float = 0.02, delta: float = 0.1,
                model_dir: str | None = None, examples: str | None = None, encoder: str = "efficientnet_lite0",
                conv=None, device: str = "auto", batch_size: int = 32) -> SimpleFilter | LearnedFilter | None:
    """The empty-patch filter ``name`` (none, simple, learned). A learned one is fitted on ``examples`` and
    saved in ``model_dir``, or, without examples, loaded from ``model_dir``."""
    if name == "none":
        return None
    if name == "simple":
        return SimpleFilter(min_foreground=min_foreground, min_std=min_std, delta=delta)
    if name != "learned":
        raise EmbedkitError(f"--filter {name!r}: choose none, simple or learned")
    if not model_dir:
        raise EmbedkitError("--filter learned needs --filter-model DIR (where the fitted filter is, or is to be saved)")
    if not examples:
        return LearnedFilter.load(model_dir)
    if (Path(model_dir) / "filter.json").exists():
        raise EmbedkitError(f"--filter-model {model_dir} already holds a fitted filter; reuse it without "
                            f"--filter-examples, or give a new folder")
    from ..encoders import create_encoder

    filt = LearnedFilter.fit(examples, create_encoder(encoder), conv, device=device, batch_size=batch_size)
    filt.save(model_dir)
    return filt


def decide(filt, patches: np.ndarray, background: float, device: str = "cpu",
           batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(foreground fraction, std, learned score or NaN, keep) of each patch under ``filt`` (None keeps all)."""
    simple = filt if isinstance(filt, SimpleFilter) else SimpleFilter()
    fg, sd = simple.measure(patches, background)
    score = np.full(len(patches), np.nan, np.float32)
    if isinstance(filt, SimpleFilter):
        keep = filt.keep(patches, background)
    elif isinstance(filt, LearnedFilter):
        score = filt.scores(patches, device=device, batch_size=batch_size).astype(np.float32)
        keep = score > 0
    else:
        keep = np.ones(len(patches), bool)
    return fg, sd, score, keep
