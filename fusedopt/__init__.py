"""fusedopt: torch.optim's Adam, AdamW and RMSprop as one fused multi-tensor pass per step.

opt = fusedopt.AdamW(model.parameters(), lr=fusedopt.Noam(d_model=512, warmup=4000))
"""

from . import schedules
from .adam import Adam, AdamW
from .backends import NAMES as BACKENDS
from .clip import clip_grad_norm_
from .rmsprop import RMSprop
from .schedule import Noam, NoamLR

__all__ = [
    "Adam",
    "AdamW",
    "RMSprop",
    "Noam",
    "NoamLR",
    "schedules",
    "BACKENDS",
    "clip_grad_norm_",
]
__version__ = "0.1.0"
