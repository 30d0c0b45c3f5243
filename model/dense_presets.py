"""Dense student presets: the six bases DeepSeek distilled R1 into, and CPU-sized students.

R1-Distill-Qwen-1.5B / 7B / 14B / 32B (Qwen2.5-Math-1.5B, Qwen2.5-Math-7B, Qwen2.5-14B,
Qwen2.5-32B) and R1-Distill-Llama-8B / 70B (Llama-3.1-8B, Llama-3.3-70B-Instruct), with the
shapes of their published config.json files. The distilled 1.5B keeps an untied head (its
base ties it), which is why it holds 1.78B parameters.
"""

from __future__ import annotations

from model.config import GQAConfig, Llama3RopeScaling, ModelConfig

_QWEN_VOCAB, _LLAMA_VOCAB = 152064, 128256


def _dense(
    vocab: int, d: int, layers: int, ffn: int, heads: int, kv_heads: int, **kw
) -> ModelConfig:
    gqa_kw = {k: kw.pop(k) for k in ("rope_theta", "llama3_scaling", "qkv_bias") if k in kw}
    return ModelConfig(
        vocab_size=vocab,
        d_model=d,
        num_layers=layers,
        num_dense_layers=layers,
        dense_dim=ffn,
        mla=None,
        moe=None,
        gqa=GQAConfig(heads, kv_heads, d // heads, **gqa_kw),
        **kw,
    )


def _qwen(vocab, d, layers, ffn, heads, kv_heads, theta, eps) -> ModelConfig:
    return _dense(
        vocab, d, layers, ffn, heads, kv_heads, rope_theta=theta, qkv_bias=True, norm_eps=eps,
        max_seq_len=131072, init_std=0.02, dtype="bfloat16",
    )  # fmt: skip


def _llama(d, layers, ffn, heads) -> ModelConfig:
    return _dense(
        _LLAMA_VOCAB, d, layers, ffn, heads, 8, rope_theta=500000.0,
        llama3_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 8192), norm_eps=1e-5,
        max_seq_len=131072, init_std=0.02, dtype="bfloat16",
    )  # fmt: skip


def _tiny(kind: str) -> ModelConfig:
    """CPU-sized students of the v3-tiny scale (~1M parameters besides the embedding)."""
    if kind == "qwen":  # q/k/v biases, tied head, GQA 2:1
        return _dense(2048, 128, 4, 384, 4, 2, qkv_bias=True, tie_embeddings=True,
                      max_seq_len=512, init_std=0.02)  # fmt: skip
    return _dense(2048, 128, 4, 384, 4, 1, rope_theta=500000.0, max_seq_len=512, init_std=0.02,
                  llama3_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 64))  # fmt: skip


DENSE_PRESETS = {
    "r1-distill-qwen-1.5b": lambda: _qwen(151936, 1536, 28, 8960, 12, 2, 10000.0, 1e-6),
    "r1-distill-qwen-7b": lambda: _qwen(_QWEN_VOCAB, 3584, 28, 18944, 28, 4, 10000.0, 1e-6),
    "r1-distill-qwen-14b": lambda: _qwen(_QWEN_VOCAB, 5120, 48, 13824, 40, 8, 1e6, 1e-5),
    "r1-distill-qwen-32b": lambda: _qwen(_QWEN_VOCAB, 5120, 64, 27648, 40, 8, 1e6, 1e-5),
    "r1-distill-llama-8b": lambda: _llama(4096, 32, 14336, 32),
    "r1-distill-llama-70b": lambda: _llama(8192, 80, 28672, 64),
    "qwen-tiny": lambda: _tiny("qwen"),
    "llama-tiny": lambda: _tiny("llama"),
}

# Parameter counts of the published checkpoints (their safetensors, every tensor).
PUBLISHED_PARAMS = {
    "r1-distill-qwen-1.5b": 1_777_088_000,
    "r1-distill-qwen-7b": 7_615_616_512,
    "r1-distill-qwen-14b": 14_770_033_664,
    "r1-distill-qwen-32b": 32_763_876_352,
    "r1-distill-llama-8b": 8_030_261_248,
    "r1-distill-llama-70b": 70_553_706_496,
}
