"""Self-supervised adaptation of an encoder to the user's own unlabelled cells (DINO or SimCLR, via lightly).

``adapt(source, out, encoder)`` trains and saves ``out/encoder.safetensors`` + ``encoder.json``;
``create_encoder('local:<out>')`` loads the result like any registry encoder.
"""

from .methods import METHODS, MethodConfig
from .saved import load_adapted, read_adapted_config
from .train import AdaptConfig, AdaptResult, adapt
from .views import MicroscopyViews, ViewConfig

__all__ = ["METHODS", "AdaptConfig", "AdaptResult", "MethodConfig", "MicroscopyViews", "ViewConfig", "adapt",
           "load_adapted", "read_adapted_config"]
