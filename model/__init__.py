"""DeepSeek-V3 as pure Flax Linen modules: MLA, DeepSeekMoE, MTP, YaRN, HF checkpoint I/O."""

from model import decode, hf, presets
from model.api import (
    Output,
    ParamCount,
    check_inputs,
    count_params,
    forward,
    init,
    init_boxed,
    logical_axes,
)
from model.cache import KVCache, cache_bytes_per_token, mha_cache_bytes_per_token
from model.config import (
    EPExchange,
    FP8Config,
    GroupedMatmul,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    RematPolicy,
    YarnConfig,
)
from model.generate import FinishReason, Generation, generate
from model.sampling import Sampling
from model.speculative import SpeculativeStats, generate_speculative

__all__ = [
    "EPExchange",
    "FP8Config",
    "FinishReason",
    "Generation",
    "GroupedMatmul",
    "KVCache",
    "MLAConfig",
    "MoEConfig",
    "ModelConfig",
    "Output",
    "ParamCount",
    "RematPolicy",
    "Sampling",
    "SpeculativeStats",
    "YarnConfig",
    "cache_bytes_per_token",
    "check_inputs",
    "count_params",
    "decode",
    "forward",
    "generate",
    "generate_speculative",
    "hf",
    "init",
    "init_boxed",
    "logical_axes",
    "mha_cache_bytes_per_token",
    "presets",
]
