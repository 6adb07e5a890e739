"""fusedopt: torch.optim's Adam, AdamW, RMSprop and SGD as one fused multi-tensor pass per step.

opt = fusedopt.AdamW(model.parameters(), lr=fusedopt.Noam(d_model=512, warmup=4000))
"""

from . import schedules
from .adam import Adam, AdamW
from .backends import NAMES as BACKENDS
from .clip import clip_grad_norm_
from .rmsprop import RMSprop
from .schedule import Noam, NoamLR
from .sgd import SGD

__all__ = [
    "Adam",
    "AdamW",
    "RMSprop",
    "SGD",
    "Noam",
    "NoamLR",
    "schedules",
    "BACKENDS",
    "clip_grad_norm_",
]
__version__ = "0.1.0"
