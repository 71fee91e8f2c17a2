"""Applying one saved probe to the items of a store: the predictions table ``embedkit predict`` writes."""

from __future__ import annotations

from dataclasses import dataclass

from ..store import Store
from .proportions import apply_probes
from .saved import Probe


@dataclass
class Predictions:
    """The table (id, group, true, pred, run, p_<class>...) and the embedding key it was computed from."""

    frame: object
    key: str


def predict_store(store: Store, probe: Probe, key: str | None = None) -> Predictions:
    """Predict every finished row of ``store`` with ``probe`` (refusing another encoder configuration)."""
    from ..results import predictions_frame

    rows, proba, classes, keys = apply_probes(store, [probe], key)
    labels = [lab if lab in classes else "" for lab in store.labels[rows]]
    frame = predictions_frame(store.ids[rows], store.groups[rows], labels, proba, classes,
                              run=probe.provenance.get("run", 0))
    return Predictions(frame, keys[0])
