"""Frozen, validated configuration dataclasses for the DeepSeek-V3 model family.

Each module reads only the small config it needs: `MLAConfig` for attention (with its RoPE /
YaRN settings), `MoEConfig` for the expert layers, and `ModelConfig` composes them with the
stack-level sizes. Invalid values fail at construction with a `ValueError` naming the field.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import jax.numpy as jnp


class RematPolicy(enum.Enum):
    """What a transformer block keeps for the backward pass."""

    NONE = "none"  # keep every activation
    FULL = "full"  # recompute the whole block
    DOTS = "dots"  # keep matmul outputs without batch dims, recompute the rest


class GroupedMatmul(enum.Enum):
    """How the routed experts are computed: the MoE backend (reference, XLA paths, Pallas)."""

    AUTO = "auto"  # ragged_dot on GPU/TPU; on CPU dense for few tokens, else tiled scan
    RAGGED_DOT = "ragged_dot"  # jax.lax.ragged_dot over expert-sorted rows
    TILED_SCAN = "tiled_scan"  # lax.scan over row tiles that each belong to one expert
    DENSE = "dense"  # every expert on every token, unchosen ones weighted 0 (cost ~ N x E)
    REFERENCE = "reference"  # Python loop over experts, each dense on every token (checks)
    # pallas_kernels: permute -> grouped_gemm (wi_gate, wi_up, wo) -> combine; interpreted
    # on CPU. No FP8 form yet.
    PALLAS = "pallas"


# Routed-expert paths with no FP8 form: ragged_dot and the reference loop (the Pallas path
# has one: pallas_kernels/fp8_grouped_gemm.py).
FP8_UNSUPPORTED = (GroupedMatmul.RAGGED_DOT, GroupedMatmul.REFERENCE)


class EPExchange(enum.Enum):
    """How token copies travel to their experts' devices and back under expert parallelism
    (model/expert_parallel.py). Every exchange gives the same values and gradients."""

    AUTO = "auto"  # RAGGED_ALL_TO_ALL on GPU/TPU, ALL_TO_ALL on CPU
    ALL_TO_ALL = "all_to_all"  # padded blocks through lax.all_to_all
    RAGGED_ALL_TO_ALL = "ragged_all_to_all"  # only the real rows (lax.ragged_all_to_all)
    REMOTE_DMA = "remote_dma"  # the padded exchange as a Pallas TPU remote-DMA kernel
    REMOTE_DMA_RAGGED = "remote_dma_ragged"  # the kernel moving only the used rows


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


def _non_negative(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be an int >= 0, got {value!r}")


def _positive_float(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be > 0, got {value!r}")


def _finite_at_least(obj, name: str, low: float, *, strict: bool = False) -> None:
    """A finite real number >= low (> low when strict); bools and strings are refused."""
    value = getattr(obj, name)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and (value > low if strict else value >= low)):
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(
            f"{type(obj).__name__}.{name} must be a finite number {bound}, got {value!r}"
        )


# Compute and parameter dtypes the layers are written and tested for; FP8 is not a dtype
# here but the GEMM recipe of ModelConfig.fp8 (E4M3 codes with f32 scales).
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension applied to the decoupled RoPE dims (V3: factor 40 from 4K)."""

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self):
        _positive(self, "original_max_position")
        _finite_at_least(self, "factor", 1.0)
        _finite_at_least(self, "beta_fast", 0.0, strict=True)
        _finite_at_least(self, "beta_slow", 0.0, strict=True)
        _finite_at_least(self, "mscale", 0.0)
        _finite_at_least(self, "mscale_all_dim", 0.0)
        if self.beta_fast <= self.beta_slow:
            raise ValueError(
                f"YarnConfig.beta_fast ({self.beta_fast}) must exceed beta_slow ({self.beta_slow})"
            )


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention: low-rank q (optional) and kv, decoupled shared RoPE key."""

    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_theta: float = 10000.0
    yarn: YarnConfig | None = None

    def __post_init__(self):
        _positive(self, "num_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim")
        _positive(self, "qk_rope_head_dim")
        if self.q_lora_rank is not None:
            _positive(self, "q_lora_rank")
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"MLAConfig.qk_rope_head_dim must be even (RoPE rotates pairs), "
                f"got {self.qk_rope_head_dim}"
            )
        # theta <= 1 makes every frequency >= 1 (and log(theta) <= 0 breaks YaRN's ramp).
        _finite_at_least(self, "rope_theta", 1.0, strict=True)
        if self.yarn is not None and not isinstance(self.yarn, YarnConfig):
            raise ValueError(f"MLAConfig.yarn must be a YarnConfig or None, got {self.yarn!r}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's RoPE frequency scaling (`rope_type: llama3`): wavelengths shorter than
    original / high_freq_factor are kept, longer than original / low_freq_factor divided by
    `factor`, and those between interpolated smoothly."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        _positive(self, "original_max_position")
        _finite_at_least(self, "factor", 1.0)
        _finite_at_least(self, "low_freq_factor", 0.0, strict=True)
        _finite_at_least(self, "high_freq_factor", 0.0, strict=True)
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"Llama3RopeScaling.high_freq_factor ({self.high_freq_factor}) must exceed "
                f"low_freq_factor ({self.low_freq_factor})"
            )


@dataclasses.dataclass(frozen=True)
class GQAConfig:
    """Grouped-query attention of the dense students (Llama 3, Qwen2 / Qwen2.5): num_heads
    query heads share num_kv_heads K/V heads; RoPE over the whole head in the rotate-half
    layout their checkpoints use; q/k/v biases for Qwen2."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    llama3_scaling: Llama3RopeScaling | None = None
    qkv_bias: bool = False

    def __post_init__(self):
        _positive(self, "num_heads", "num_kv_heads", "head_dim")
        if self.head_dim % 2:
            raise ValueError(f"GQAConfig.head_dim must be even (RoPE), got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"GQAConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        _finite_at_least(self, "rope_theta", 1.0, strict=True)
        if self.llama3_scaling is not None and not isinstance(
            self.llama3_scaling, Llama3RopeScaling
        ):
            raise ValueError(
                f"GQAConfig.llama3_scaling must be a Llama3RopeScaling or None, "
                f"got {self.llama3_scaling!r}"
            )
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"GQAConfig.qkv_bias must be a bool, got {self.qkv_bias!r}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE: fine-grained routed experts, shared experts, sigmoid group-limited routing."""

    num_experts: int
    num_shared_experts: int
    top_k: int
    expert_dim: int
    num_groups: int = 1
    top_groups: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    grouped_matmul: GroupedMatmul = GroupedMatmul.AUTO
    # Rows per tile of the CPU tiled-scan grouped matmul; None picks one from the routed rows.
    tile_rows: int | None = None
    # The expert-parallel exchange (used when the rules split experts over a mesh axis). A
    # static field, so a jitted function retraces when it changes.
    ep_exchange: EPExchange = EPExchange.AUTO

    def __post_init__(self):
        _positive(self, "num_experts", "top_k", "expert_dim", "num_groups", "top_groups")
        if self.tile_rows is not None:
            _positive(self, "tile_rows")
        _non_negative(self, "num_shared_experts")
        _positive_float(self, "routed_scaling_factor")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})"
            )
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"MoEConfig.num_experts ({self.num_experts}) must be divisible by "
                f"num_groups ({self.num_groups})"
            )
        if self.top_groups > self.num_groups:
            raise ValueError(
                f"MoEConfig.top_groups ({self.top_groups}) must be <= num_groups "
                f"({self.num_groups})"
            )
        per_group = self.num_experts // self.num_groups
        if self.num_groups > 1 and per_group < 2:
            raise ValueError(
                f"MoEConfig.num_groups ({self.num_groups}) leaves {per_group} expert per group; "
                "group scores sum the top-2 experts of a group, so each group needs >= 2"
            )
        if self.top_k > self.top_groups * per_group:
            raise ValueError(
                f"MoEConfig.top_k ({self.top_k}) exceeds the experts left in top_groups "
                f"({self.top_groups} x {per_group})"
            )
        if not isinstance(self.grouped_matmul, GroupedMatmul):
            raise ValueError(
                f"MoEConfig.grouped_matmul must be a GroupedMatmul, got {self.grouped_matmul!r}"
            )
        if not isinstance(self.ep_exchange, EPExchange):
            raise ValueError(
                f"MoEConfig.ep_exchange must be an EPExchange "
                f"({[e.value for e in EPExchange]}), got {self.ep_exchange!r}"
            )


@dataclasses.dataclass(frozen=True)
class FP8Config:
    """V3's FP8 GEMMs (pallas_kernels/fp8_linear.py) for the FFN and attention projections.

    On: MLA's q/kv down- and up-projections and output projection, the dense and shared
    experts' MLPs, the routed experts (tiled-scan, dense or Pallas grouped matmul). Kept in the
    compute dtype, as in V3: embedding, output head, router, norms, the attention core
    (scores, softmax, weighted sum), MTP's eh_proj, and decode's absorbed attention.
    """

    # The Pallas fp8_gemm (interpreted on CPU, slow) instead of the jnp reference for the
    # dense projections. The routed experts follow moe.grouped_matmul: PALLAS runs
    # pallas_kernels/fp8_grouped_gemm.py, TILED_SCAN / DENSE the reference GEMM per tile.
    use_kernel: bool = False
    pow2_scale: bool = False  # round each scale up to a power of two

    def __post_init__(self):
        for name in ("use_kernel", "pow2_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FP8Config.{name} must be a bool, got {getattr(self, name)!r}")


def rules_table(rules) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """rules as hashable (name, mesh axes) pairs (JSON gives lists; None and a bare str are
    accepted for the axes, as flax's tables write them)."""
    bad = ValueError(
        "ModelConfig.logical_rules must be (logical name, mesh axes) pairs, e.g. "
        f"(('embed', ('fsdp',)),), got {rules!r}"
    )
    if isinstance(rules, str | bytes) or not isinstance(rules, tuple | list):
        raise bad
    table = []
    for entry in rules:
        if not isinstance(entry, tuple | list) or len(entry) != 2 or not isinstance(entry[0], str):
            raise bad
        axes = entry[1]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        if not isinstance(axes, tuple | list) or not all(isinstance(a, str) for a in axes):
            raise bad
        table.append((entry[0], tuple(axes)))
    return tuple(table)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A DeepSeek-V3-style decoder: dense first layers, MoE layers, optional MTP modules.

    Attention is MLA (`mla`, V3) or grouped-query (`gqa`, the Llama / Qwen students): exactly
    one is set. A dense student is num_dense_layers = num_layers with moe None."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_dense_layers: int
    dense_dim: int
    mla: MLAConfig | None
    moe: MoEConfig | None
    mtp_depth: int = 0
    max_seq_len: int = 4096
    norm_eps: float = 1e-6
    init_std: float = 0.006
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: RematPolicy = RematPolicy.NONE
    fp8: FP8Config | None = None  # None: every matmul in `dtype`
    # (logical axis name, mesh axes) pairs the model lays its activations out by and that
    # decide whether the routed experts are split (model/expert_parallel.py). A static field,
    # so jit keys on it; the model never reads flax's ambient nn.logical_axis_rules. Trainers
    # set it from the mesh (sharding's Parallel.configure). Empty: no constraints.
    logical_rules: tuple[tuple[str, tuple[str, ...]], ...] = ()
    gqa: GQAConfig | None = None
    tie_embeddings: bool = False  # the output head is the input embedding (small Qwen models)

    def __post_init__(self):
        object.__setattr__(self, "logical_rules", rules_table(self.logical_rules))
        _positive(self, "vocab_size", "d_model", "num_layers", "dense_dim", "max_seq_len")
        _non_negative(self, "num_dense_layers", "mtp_depth")
        _positive_float(self, "norm_eps", "init_std")
        if self.num_dense_layers > self.num_layers:
            raise ValueError(
                f"ModelConfig.num_dense_layers ({self.num_dense_layers}) must be <= "
                f"num_layers ({self.num_layers})"
            )
        if self.num_moe_layers and self.moe is None:
            raise ValueError(
                f"ModelConfig.moe is None but num_layers - num_dense_layers = "
                f"{self.num_moe_layers} layers are MoE; set num_dense_layers = num_layers"
            )
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            try:
                dtype_name = jnp.dtype(value).name
            except TypeError:
                dtype_name = None
            if dtype_name not in FLOAT_DTYPES:
                raise ValueError(
                    f"ModelConfig.{name} must be one of {FLOAT_DTYPES}, got {value!r} "
                    "(V3's FP8 GEMMs are ModelConfig.fp8=FP8Config(), not a dtype)"
                )
        if not isinstance(self.remat, RematPolicy):
            raise ValueError(f"ModelConfig.remat must be a RematPolicy, got {self.remat!r}")
        if (self.mla is None) == (self.gqa is None):
            raise ValueError(
                "ModelConfig needs exactly one attention config: mla (MLAConfig) or gqa "
                f"(GQAConfig); got mla={self.mla!r}, gqa={self.gqa!r}"
            )
        if self.mla is not None and not isinstance(self.mla, MLAConfig):
            raise ValueError(f"ModelConfig.mla must be an MLAConfig, got {type(self.mla)}")
        if self.gqa is not None and not isinstance(self.gqa, GQAConfig):
            raise ValueError(f"ModelConfig.gqa must be a GQAConfig, got {type(self.gqa)}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(
                f"ModelConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}"
            )
        if self.fp8 is not None and not isinstance(self.fp8, FP8Config):
            raise ValueError(f"ModelConfig.fp8 must be an FP8Config or None, got {self.fp8!r}")
        impl = None if self.moe is None else self.moe.grouped_matmul
        if self.fp8 is not None and impl in FP8_UNSUPPORTED:
            raise ValueError(
                "ModelConfig.fp8 needs moe.grouped_matmul AUTO, TILED_SCAN, DENSE or PALLAS "
                f"(FP8 routed experts run per expert tile); got {impl.name}"
            )

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def mtp_uses_moe(self) -> bool:
        """MTP blocks are MoE blocks whenever the model has MoE layers (as in V3's layer 61)."""
        return self.moe is not None and self.num_moe_layers > 0

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """The config from its JSON form (nested dicts, enums by value), as runs store it."""
        try:
            fields = dict(data)
            mla = fields.pop("mla")
            if mla is not None:
                mla = dict(mla)
                yarn = mla.pop("yarn", None)
                mla = MLAConfig(**mla, yarn=None if yarn is None else YarnConfig(**yarn))
            fields["mla"] = mla
            gqa = fields.pop("gqa", None)
            if gqa is not None:
                gqa = dict(gqa)
                scaling = gqa.pop("llama3_scaling", None)
                scaling = None if scaling is None else Llama3RopeScaling(**scaling)
                gqa = GQAConfig(**gqa, llama3_scaling=scaling)
            fields["gqa"] = gqa
            moe = fields.pop("moe", None)
            if moe is not None:
                moe = dict(moe)
                moe["grouped_matmul"] = GroupedMatmul(moe.get("grouped_matmul", "auto"))
                moe["ep_exchange"] = EPExchange(moe.get("ep_exchange", "auto"))
                moe = MoEConfig(**moe)
            fields["remat"] = RematPolicy(fields.get("remat", "none"))
            fp8 = fields.pop("fp8", None)
            fields["fp8"] = None if fp8 is None else FP8Config(**fp8)
            return cls(moe=moe, **fields)
        except (TypeError, KeyError) as err:
            raise ValueError(f"not a ModelConfig in JSON form: {err}") from err
