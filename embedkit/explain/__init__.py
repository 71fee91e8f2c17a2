"""Explanations: class activation maps for fine-tuned networks and for frozen encoders with probe heads.

``load_model(folder)`` -> :class:`ExplainModel`; ``explain(model, items, out_dir, methods=...)`` writes
maps, overlays, a grid figure and faithfulness scores. ``compute_cam`` is the single-batch primitive.
"""

from .cams import METHOD_NAMES, CamResult, compute_cam, parse_methods
from .faithfulness import Curves, deletion_insertion
from .items import SELECTIONS, choose_items, find_predictions, resolve_items, select_items, select_rows
from .models import EncoderWithHead, ExplainModel, compose, load_model, wrap_classifier
from .pipeline import ExplainResult, explain
from .reshape import TokensToGrid, to_image_geometry, token_layout
from .targets import default_layer, layer_table, resolve_layer, trace_layers

__all__ = ["METHOD_NAMES", "CamResult", "compute_cam", "parse_methods", "Curves", "deletion_insertion", "SELECTIONS",
           "choose_items", "find_predictions", "resolve_items", "select_items", "select_rows", "EncoderWithHead",
           "ExplainModel", "compose", "load_model", "wrap_classifier", "ExplainResult", "explain", "TokensToGrid",
           "to_image_geometry", "token_layout", "default_layer", "layer_table", "resolve_layer", "trace_layers"]
