"""Finding copies of one cell among many: augmented copies (rotated, shifted, sheared, zoomed, brightened,
re-compressed) that make a random split leak.

* :mod:`.prepare`: grey square canvases with a mask of real pixels (edge padding, never zeros);
* :mod:`.descriptors`: stage 1, small rotation-invariant descriptors for FAISS candidates;
* :mod:`.align`: stage 2, alignment of a candidate onto the query and the scores that prove a copy;
* :mod:`.search`: the two stages together, for a split (:func:`find_copies`) or all items
  (:func:`duplicate_pairs`, :func:`components`);
* :mod:`.augment`: seeded augmented copies, to measure all this.

:mod:`embedkit.leaks` applies it to a store and its splits.
"""

from .search import Catalog, Thresholds, Verified, build_catalog, components, duplicate_pairs, find_copies

__all__ = ["Catalog", "Thresholds", "Verified", "build_catalog", "components", "duplicate_pairs", "find_copies"]
