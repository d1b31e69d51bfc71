"""longrope: extend the context window of pretrained RoPE language models with LongRoPE."""

from . import scaling
from .errors import UsageError
from .models import attach, export, load, rope_info, scaling_from_hf_config
from .facade import LongRoPEModel
from .rotary import ScaledRotaryEmbedding
from .scaling import LongRoPEScaling, Scaling, ScalingError

__version__ = "0.1.0"
__all__ = ["LongRoPEModel", "scaling", "Scaling", "LongRoPEScaling", "ScalingError", "UsageError", "ScaledRotaryEmbedding",
           "attach", "export", "load", "rope_info", "scaling_from_hf_config"]
