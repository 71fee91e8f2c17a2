"""The self-supervised objectives: DINO (student/teacher, multi-crop) and SimCLR (contrastive), from ``lightly``.

Each method wraps the encoder being adapted (an :class:`~embedkit.encoders.Encoder`, unfrozen) with its
projection head and loss, and says which network is the result: DINO keeps the momentum teacher (as the
DINO paper evaluates it), SimCLR the trained backbone. Losses, heads and the momentum update come from
lightly; the backbones come from the encoder registry, so any registry encoder can be adapted.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ..encoders import Encoder
from ..errors import EmbedkitError

METHODS = ("dino", "simclr")


@dataclass(frozen=True)
class MethodConfig:
    """Head and loss settings (recorded with the adapted encoder)."""

    out_dim: int = 4096  # DINO prototypes; SimCLR projection size is proj_dim
    hidden_dim: int = 1024
    bottleneck_dim: int = 256
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    center_momentum: float = 0.9
    teacher_momentum: float = 0.99  # start of the cosine schedule to 1 (0.996 in DINO, for much longer runs)
    freeze_last_layer_epochs: int = 1
    proj_dim: int = 128
    temperature: float = 0.2  # SimCLR NT-Xent

    def to_dict(self) -> dict:
        return asdict(self)


def _enable_training(enc: Encoder) -> Encoder:
    enc.train()
    for p in enc.model.parameters():
        p.requires_grad_(True)
    return enc


class DINO(nn.Module):
    """Self-distillation: the student matches the momentum teacher's sharpened, centred output across crops."""

    name = "dino"
    kept = "teacher"

    def __init__(self, make_encoder: Callable[[], Encoder], cfg: MethodConfig):
        super().__init__()
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead

        self.cfg = cfg
        self.student = _enable_training(make_encoder())
        self.teacher = make_encoder()
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.train()  # batch-norm statistics follow the cells; its parameters follow the student by EMA
        dim = self.student.dim
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # lightly's head uses the older weight_norm
            self.student_head = DINOProjectionHead(dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim,
                                                   freeze_last_layer=cfg.freeze_last_layer_epochs)
            self.teacher_head = DINOProjectionHead(dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for p in list(self.teacher.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.criterion = DINOLoss(cfg.out_dim, warmup_teacher_temp=cfg.teacher_temp, teacher_temp=cfg.teacher_temp,
                                  student_temp=cfg.student_temp, center_momentum=cfg.center_momentum)

    def trainable(self) -> tuple[nn.Module, nn.Module]:
        """(backbone, head): the modules the optimiser trains."""
        return self.student, self.student_head

    def loss(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        with torch.no_grad():
            teacher_out = [self.teacher_head(self.teacher(v)).float() for v in views[:2]]
        student_out = [self.student_head(self.student(v)).float() for v in views]
        return self.criterion(teacher_out, student_out, teacher_temp=self.cfg.teacher_temp)

    def before_step(self, epoch: int) -> None:
        self.student_head.cancel_last_layer_gradients(epoch)

    def after_step(self, step: int, total_steps: int) -> None:
        """Move the teacher towards the student; momentum follows a cosine from its start value to 1."""
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(step, max(total_steps, 1), self.cfg.teacher_momentum, 1.0)
        update_momentum(self.student, self.teacher, m)
        update_momentum(self.student_head, self.teacher_head, m)

    def adapted(self) -> Encoder:
        return self.teacher


class SimCLR(nn.Module):
    """Contrastive: two views of one cell attract, views of the other cells in the batch repel (NT-Xent)."""

    name = "simclr"
    kept = "backbone"

    def __init__(self, make_encoder: Callable[[], Encoder], cfg: MethodConfig):
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        self.cfg = cfg
        self.backbone = _enable_training(make_encoder())
        self.head = SimCLRProjectionHead(self.backbone.dim, cfg.hidden_dim, cfg.proj_dim)
        self.criterion = NTXentLoss(temperature=cfg.temperature)

    def trainable(self) -> tuple[nn.Module, nn.Module]:
        """(backbone, head): the modules the optimiser trains."""
        return self.backbone, self.head

    def loss(self, views: list[torch.Tensor], epoch: int) -> torch.Tensor:
        z0, z1 = (self.head(self.backbone(v)).float() for v in views[:2])
        return self.criterion(z0, z1)

    def before_step(self, epoch: int) -> None:
        return None

    def after_step(self, step: int, total_steps: int) -> None:
        return None

    def adapted(self) -> Encoder:
        return self.backbone


def build_method(name: str, make_encoder: Callable[[], Encoder], cfg: MethodConfig) -> DINO | SimCLR:
    """The method module for ``name`` (dino or simclr) around freshly built encoders."""
    if name not in METHODS:
        raise EmbedkitError(f"--method {name!r}: choose one of {', '.join(METHODS)}")
    if importlib.util.find_spec("lightly") is None:
        raise EmbedkitError("embedkit adapt needs the lightly package: pip install 'embedkit[adapt]' (or lightly)")
    return (DINO if name == "dino" else SimCLR)(make_encoder, cfg)


def views_needed(name: str, n_local: int) -> tuple[int, int]:
    """(global, local) views per image: DINO uses multi-crop, SimCLR two views."""
    return (2, n_local) if name == "dino" else (2, 0)
