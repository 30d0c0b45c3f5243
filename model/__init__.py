"""DeepSeek-V3 as pure Flax Linen modules: MLA, DeepSeekMoE, MTP, YaRN, HF checkpoint I/O."""

from model import presets
from model.api import Output, ParamCount, count_params, forward, init, init_boxed, logical_axes
from model.config import (
    GroupedMatmul,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    RematPolicy,
    YarnConfig,
)

__all__ = [
    "GroupedMatmul",
    "MLAConfig",
    "MoEConfig",
    "ModelConfig",
    "Output",
    "ParamCount",
    "RematPolicy",
    "YarnConfig",
    "count_params",
    "forward",
    "init",
    "init_boxed",
    "logical_axes",
    "presets",
]
