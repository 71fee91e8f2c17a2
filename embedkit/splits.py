"""Group-aware, stratified splits: the one place every stage (probe, finetune, leaks) gets its splits from.

A split never puts one group (source image, movie, well, patient) in two parts. Splits are saved as JSON
lists of item ids, so other encoders and fine-tuning reuse exactly the same items.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import EmbedkitError

SPLITS_VERSION = 1
PARTS = ("train", "val", "test")


@dataclass
class Fold:
    """Item ids of each part of one split."""

    train: list[str]
    val: list[str]
    test: list[str]

    def part(self, name: str) -> list[str]:
        return getattr(self, name)


@dataclass
class Splits:
    """One or more folds over the same items, with how they were made."""

    folds: list[Fold]
    group_by: str = "group"
    seed: int = 0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"version": SPLITS_VERSION, "group_by": self.group_by, "seed": self.seed, "meta": self.meta,
                "folds": [{p: list(f.part(p)) for p in PARTS} for f in self.folds]}

    def fingerprint(self) -> str:
        """Hash of the folds' item ids: results with equal fingerprints were scored on identical splits."""
        from .store import fingerprint

        return fingerprint([{p: sorted(f.part(p)) for p in PARTS} for f in self.folds])

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically."""
        from .atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Splits":
        try:
            with open(path) as fh:
                d = json.load(fh)
            folds = [Fold(**{p: [str(i) for i in f[p]] for p in PARTS}) for f in d["folds"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EmbedkitError(f"{path}: not an embedkit splits file ({type(exc).__name__}: {exc})") from None
        return cls(folds, d.get("group_by", "group"), int(d.get("seed", 0)), d.get("meta", {}))


def _sgkf(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise EmbedkitError(f"only {n_groups} groups for {n_splits} parts; every part needs whole groups. "
                            f"Use fewer folds, a smaller test fraction, or a finer --group-by")
    return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups)


def make_splits(ids: Sequence[str], labels: Sequence[str], groups: Sequence[str], *, test_size: float = 0.2,
                val_size: float = 0.2, folds: int | None = None, seed: int = 0, group_by: str = "group") -> Splits:
    """Stratified group splits of the labelled items: one train/val/test split, or ``folds`` folds.

    With folds, each fold's test part is one of K group folds and validation is carved from the rest.
    Unlabelled items ('' label) are left out of every part.
    """
    ids = np.asarray(ids, dtype=object)
    labels = np.asarray(labels, dtype=object)
    groups = np.asarray(groups, dtype=object)
    keep = labels != ""
    if keep.sum() == 0:
        raise EmbedkitError("no labelled items: probes need labels (class folders, or a 'label' column in the manifest)")
    ids, labels, groups = ids[keep], labels[keep], groups[keep]
    classes = np.unique(labels)
    if len(classes) < 2:
        raise EmbedkitError(f"only one class ({classes[0]!r}) among the labelled items; a probe needs at least two")
    if not 0 < test_size < 1 or not 0 < val_size < 1:
        raise EmbedkitError("test and validation fractions must lie between 0 and 1")
    out = []
    # StratifiedGroupKFold's shuffle only breaks ties between groups of equal class spread, so on real data
    # every seed gives the same partition. Seeds s of one block of K (0..K-1, K..2K-1, ...) share the partition
    # shuffled with the block's first seed and test its fold s mod K (validating on inner fold s mod k): the
    # seeds of a block test disjoint sets of groups, as K-fold grouped cross-validation does.
    if folds:
        if folds < 2:
            raise EmbedkitError("--folds needs at least 2")
        outer = list(_sgkf(labels, groups, folds, seed))
    else:
        k = max(2, round(1 / test_size))
        outer = [list(_sgkf(labels, groups, k, seed - seed % k))[seed % k]]
    for rest, test in outer:
        inner_k = max(2, round((1 - (test_size if not folds else 1 / folds)) / val_size))
        inner = list(_sgkf(labels[rest], groups[rest], inner_k, seed + 1))
        tr, va = inner[seed % len(inner)]
        out.append(Fold(train=list(ids[rest][tr]), val=list(ids[rest][va]), test=list(ids[test])))
    s = Splits(out, group_by=group_by, seed=seed,
               meta={"n_labelled": int(keep.sum()), "classes": [str(c) for c in classes], "test_size": test_size,
                     "val_size": val_size, "folds": folds or 1})
    check_splits(s, dict(zip(ids, groups)), dict(zip(ids, labels)))
    return s


@dataclass
class SplitSpec:
    """How a stage gets its splits: a saved splits.json, or new ones (one per seed; K group folds or one split).

    ``seeds=None`` is the stage's default: one split for finetune and leaks; :func:`repeated` makes probe's five.
    """

    splits_file: str | None = None
    test_size: float = 0.2
    val_size: float = 0.2
    folds: int | None = None
    seeds: int | None = None
    seed: int = 0
    group_by: str | None = None

    @property
    def n_seeds(self) -> int:
        """How many seeds are drawn (None counts as one)."""
        return self.seeds or 1

    def repeated(self, n: int = 5) -> "SplitSpec":
        """The spec with ``n`` seeds where none was asked for and nothing else fixes the runs (a file, K folds)."""
        if self.seeds is not None or self.splits_file or self.folds:
            return self
        from dataclasses import replace

        return replace(self, seeds=n)

    @property
    def single_quick_look(self) -> bool:
        """One split only (no folds, one seed, no file): a quick look, not an estimate of split-to-split variance."""
        return not self.splits_file and not self.folds and self.n_seeds == 1


def run_names(splits: Splits) -> list[str]:
    """The name of each fold's run: the splits file's own names (as 'embedkit probe' records them) or fold<k>."""
    names = splits.meta.get("runs") or []
    return [str(n) for n in names] if len(names) == len(splits.folds) else [f"fold{k}" for k in range(len(splits.folds))]


def load_or_make_splits(ids: Sequence[str], labels: Sequence[str], groups: Sequence[str], spec: SplitSpec,
                        group_by: str = "group") -> tuple[Splits, list[str]]:
    """The splits of ``spec`` and each run's name: its saved file, or new runs (seed<s>, fold<k>) as probe names them.

    The one place probe, finetune and leaks get splits from; callers check them against their own items.
    """
    if spec.splits_file:
        if spec.folds or spec.n_seeds > 1:
            raise EmbedkitError("--splits fixes the runs; leave out --seeds and --folds when reusing a splits file")
        splits = Splits.load(spec.splits_file)
        return splits, run_names(splits)
    folds, names, meta = [], [], {}
    for i in range(spec.n_seeds):
        sp = make_splits(ids, labels, groups, test_size=spec.test_size, val_size=spec.val_size, folds=spec.folds,
                         seed=spec.seed + i, group_by=group_by)
        meta = sp.meta
        for j, f in enumerate(sp.folds):
            folds.append(f)
            names.append("-".join(([f"seed{spec.seed + i}"] if spec.n_seeds > 1 or not spec.folds else [])
                                  + ([f"fold{j}"] if spec.folds else [])))
    meta = {**meta, "seeds": spec.n_seeds, "runs": names}
    return Splits(folds, group_by=group_by, seed=spec.seed, meta=meta), names


def check_splits(splits: Splits, group_of: dict[str, str], label_of: dict[str, str] | None = None) -> list[str]:
    """Refuse splits that leak a group across parts or name unknown items; return warnings worth printing."""
    warnings = []
    for k, fold in enumerate(splits.folds):
        seen: dict[str, str] = {}
        for part in PARTS:
            for i in fold.part(part):
                if i not in group_of:
                    raise EmbedkitError(f"splits fold {k}: item {i!r} is not in the store; were these splits made for another store?")
                prev = seen.setdefault(i, part)
                if prev != part:
                    raise EmbedkitError(f"splits fold {k}: item {i!r} is in both {prev} and {part}")
        leaks: dict[str, set[str]] = {}
        for part in PARTS:
            for i in fold.part(part):
                leaks.setdefault(group_of[i], set()).add(part)
        bad = sorted(g for g, parts in leaks.items() if len(parts) > 1)
        if bad:
            shown = ", ".join(f"{g} ({'/'.join(sorted(leaks[g]))})" for g in bad[:5])
            raise EmbedkitError(f"splits fold {k} leak {len(bad)} group(s) across parts: {shown}"
                                f"{' ...' if len(bad) > 5 else ''}; cells of one group must stay in one part")
        if label_of is not None:
            train_classes = {label_of[i] for i in fold.train}
            for part in ("val", "test"):
                missing = {label_of[i] for i in fold.part(part)} - train_classes
                if missing:
                    warnings.append(f"fold {k}: classes {sorted(missing)} appear in {part} but not in train")
    return warnings
