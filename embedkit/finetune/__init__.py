"""Full fine-tuning of timm models on the same group splits the probes use.

``finetune(source, out, model)`` trains and writes a result folder that ``embedkit compare`` reads like a
probe's; ``load_finetuned(dir)`` returns the best checkpoint as ``(model in eval mode, model.json dict)``.
"""

from .data import Augment, BalancedSampler, CellDataset, load_items
from .model import build_model, load_finetuned, preprocess_from, read_config
from .run import FinetuneResult, SplitOptions, SplitSpec, finetune
from .train import TrainConfig

__all__ = ["Augment", "BalancedSampler", "CellDataset", "FinetuneResult", "SplitOptions", "SplitSpec", "TrainConfig",
           "build_model", "finetune", "load_finetuned", "load_items", "preprocess_from", "read_config"]
