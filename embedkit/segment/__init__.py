"""Whole fields into cells (``segment``) or patches (``patches``), with full provenance, resumable.

Modules: ``backends`` (Cellpose 4, watershed), ``crops`` (cell geometry and crops), ``patches`` and
``filters`` (sliding windows, empty-patch filters), ``gmm_labels`` (labels from a paired channel),
``scoring`` (the DSB 2018 metric), ``pipeline`` / ``patch_pipeline`` (the resumable runs).
"""

from .backends import BACKENDS, create_segmenter
from .crops import CropParams, ScaleSpec, crop_cells, cut_crop, measure_cells
from .scoring import dsb_score, dsb_scores, mean_dsb_score

__all__ = ["BACKENDS", "create_segmenter", "CropParams", "ScaleSpec", "crop_cells", "cut_crop", "measure_cells",
           "dsb_score", "dsb_scores", "mean_dsb_score"]
