"""Load and save DeepSeek-V3 checkpoints (and the dense Llama / Qwen2 students') in the Hugging
Face safetensors layout.

Tensor names follow DeepSeek's official checkpoint: `model.layers.{i}.…` with one tensor per
routed expert, and MTP module k at `model.layers.{num_hidden_layers + k}.…`. `load` also takes
the fused expert tensors (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj`
[E, D, F]) that transformers >= 5 keeps in memory and writes with `save_original_format=False`.

Loading first checks every tensor's name and header shape against config.json (so a bad
checkpoint fails before any data is read), then reads one tensor at a time into preallocated
stacked numpy arrays. Block-quantized FP8 weights (`weight` float8_e4m3fn plus
`weight_scale_inv`, one scale per 128x128 block) are dequantized on the way in.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from model.config import ModelConfig
from model.hf_config import config_from_hf, config_to_hf, declared_mtp_depth, fp8_block_size
from model.hf_dense_config import DENSE_TYPES, dense_config_from_hf, dense_config_to_hf
from model.hf_layout import _CheckpointMap, _layout, _Leaf, _mtp_duplicates, _Slot

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# safetensors 0.8's numpy backend looks these up as `np.float8_*`, which numpy lacks; they are
# read from the raw file instead (see `_Reader.read`).
_RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn}
_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")


# --- reading ---------------------------------------------------------------------------------


class _Reader(contextlib.ExitStack):
    """Lazily opened checkpoint files; reads one tensor at a time as numpy."""

    def __init__(self, files: Mapping[str, Path]):
        super().__init__()
        self.files = dict(files)  # tensor name -> file
        self._open: dict[Path, Any] = {}
        self._data_offsets: dict[Path, tuple[int, dict]] = {}

    def _handle(self, name: str):
        path = self.files[name]
        if path not in self._open:
            self._open[path] = self.enter_context(_open_safetensors(path))
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handle(name).get_slice(name).get_dtype()

    def read(self, name: str) -> np.ndarray:
        dtype = self.dtype(name)
        if dtype not in _RAW_DTYPES:
            return self._handle(name).get_tensor(name)
        # Raw read per the safetensors format: u64 header size, JSON header, data block.
        path = self.files[name]
        with open(path, "rb") as f:
            if path not in self._data_offsets:
                (size,) = struct.unpack("<Q", f.read(8))
                self._data_offsets[path] = 8 + size, json.loads(f.read(size))
            base, header = self._data_offsets[path]
            start, end = header[name]["data_offsets"]
            f.seek(base + start)
            data = f.read(end - start)
        return np.frombuffer(data, _RAW_DTYPES[dtype]).reshape(self.shape(name))


def _open_safetensors(path: Path):
    """safe_open(path); a damaged file is a ValueError that names it."""
    try:
        return safe_open(str(path), framework="numpy")
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """[R, C] FP8 weight times its per-block scale [ceil(R/br), ceil(C/bc)], in float32."""
    (rows, cols), (br, bc) = w.shape, block
    out = w.astype(np.float32)
    for i in range(math.ceil(rows / br)):
        # Row block by row block keeps the expanded scale to one block-row, not the whole matrix.
        out[i * br : (i + 1) * br] *= np.repeat(scale_inv[i].astype(np.float32), bc)[:cols]
    return out


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`; a malformed file is a ValueError that names it."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _files(path: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index or the single file."""
    if (path / _INDEX).is_file():
        weight_map = _read_json(path / _INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(file, str) for file in weight_map.values()
        ):
            raise ValueError(
                f"{path / _INDEX}: needs a 'weight_map' object of tensor name -> shard file "
                f"name, got {weight_map!r:.200}"
            )
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{file} (listed in {path / _INDEX}) does not exist")
        return files
    if (path / _SINGLE).is_file():
        with _open_safetensors(path / _SINGLE) as f:
            return dict.fromkeys(f.keys(), path / _SINGLE)
    raise FileNotFoundError(f"no {_SINGLE} or {_INDEX} in {path}")


def _mtp_depth(hf: Mapping[str, Any], names: set[str]) -> int:
    """MTP modules actually present; a declared module with no tensors is not loaded."""
    declared, first = declared_mtp_depth(hf), int(hf.get("num_hidden_layers", 0))
    layers = {int(m[1]) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    present = [k for k in range(declared) if first + k in layers]
    if present and len(present) != declared:
        absent = sorted(set(range(first, first + declared)) - {first + k for k in present})
        raise ValueError(f"config.json declares {declared} MTP layers; layers {absent} are missing")
    # transformers (5.24 included) writes num_nextn_predict_layers=1 by default but never saves
    # MTP weights, so such a checkpoint loads as a model without MTP (mtp_depth=0).
    return declared if present else 0


def load(path: str | os.PathLike, *, param_dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """(cfg, variables) from a checkpoint directory (config.json + safetensors)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist")
    hf = _read_json(config_file)
    files = _files(path)
    try:
        if hf.get("model_type") in DENSE_TYPES:
            cfg = dense_config_from_hf(hf, param_dtype=param_dtype)
        else:
            depth = _mtp_depth(hf, set(files))
            cfg = config_from_hf(hf, mtp_depth=depth, param_dtype=param_dtype)
        block = fp8_block_size(hf)
    except ValueError as err:
        raise ValueError(f"{config_file}: {str(err).removeprefix('config.json: ')}") from err
    layout = _layout(cfg)
    with _Reader(files) as reader:
        plan = _plan(path, reader, cfg, layout, block)
        # Names and shapes are known good: only now read the data, one tensor at a time.
        dtype = jnp.dtype(param_dtype)
        arrays = {
            leaf: np.empty(shape, np.float32 if leaf[0] == "router_bias" else dtype)
            for leaf, shape in layout.shapes.items()
        }
        for name, slot in plan.items():
            x = reader.read(name)
            if reader.dtype(name) in _RAW_DTYPES:
                x = dequantize_fp8(x, reader.read(name + "_scale_inv"), block)
            for leaf, value in zip(slot.leaves, slot.map.to_jax(x), strict=True):
                arrays[leaf][slot.index] = value
    variables: dict[str, Any] = {}
    for leaf in list(arrays):
        collection, keys = leaf
        node = variables.setdefault(collection, {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = jnp.asarray(arrays.pop(leaf))  # host copy dropped once on device
    return cfg, variables


def _plan(
    path: Path, reader: _Reader, cfg: ModelConfig, layout: _CheckpointMap, block: tuple[int, int]
) -> dict[str, _Slot]:
    """Checkpoint name -> slot for every tensor to read; raises on unexpected/missing/bad shape."""
    fused = _layout(cfg, fused=True).slots
    ignored = set(_mtp_duplicates(cfg))
    if cfg.tie_embeddings:  # some tied checkpoints also store the head; the embedding is it
        ignored.add("lm_head.weight")
    plan, unexpected = {}, []
    for name in sorted(reader.files):
        slot = layout.slots.get(name) or fused.get(name)
        if slot is not None:
            plan[name] = slot
        elif not (name in ignored or name.endswith("rotary_emb.inv_freq")):
            base = name.removesuffix("_scale_inv")
            if base == name or base not in reader.files or reader.dtype(base) not in _RAW_DTYPES:
                unexpected.append(name)
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} unexpected tensors: {unexpected[:20]}")
    filled = {leaf: np.zeros(stack, bool) for leaf, stack in layout.stacks.items()}
    for name, slot in plan.items():
        _check_shape(reader, name, slot.hf_shape, block)
        for leaf in slot.leaves:
            if filled[leaf][slot.index].any():
                raise ValueError(f"{path}: {name} fills {'/'.join(leaf[1])} a second time")
            filled[leaf][slot.index] = True
    missing = [
        name
        for name, slot in layout.slots.items()
        if not all(filled[leaf][slot.index].all() for leaf in slot.leaves)
    ]
    if missing:
        raise ValueError(f"{path}: {len(missing)} missing tensors: {missing[:20]}")
    return plan


def _check_shape(reader: _Reader, name: str, want: tuple[int, ...], block: tuple[int, int]):
    got, dtype = reader.shape(name), reader.dtype(name)
    if got != want:
        raise ValueError(f"tensor {name!r} has shape {got}; config.json implies {want}")
    if dtype not in _FLOAT_DTYPES and dtype not in _RAW_DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {dtype} (valid: {_FLOAT_DTYPES}, F8_E4M3)")
    if dtype in _RAW_DTYPES:
        scale = name + "_scale_inv"
        if len(want) != 2 or scale not in reader.files:
            raise ValueError(f"FP8 tensor {name!r} needs a 2D weight and a {scale!r} tensor")
        blocks = tuple(math.ceil(n / b) for n, b in zip(want, block, strict=True))
        if reader.shape(scale) != blocks:
            raise ValueError(
                f"tensor {scale!r} has shape {reader.shape(scale)}; {want} in {block} blocks "
                f"implies {blocks}"
            )


# --- writing ---------------------------------------------------------------------------------


def _leaves(variables: Mapping[str, Any], shapes: Mapping[_Leaf, tuple]) -> dict[_Leaf, Any]:
    """The leaves of `variables`, checked to be exactly those (and the shapes) cfg implies."""
    flat = jax.tree_util.tree_flatten_with_path(dict(variables))[0]
    found = {(path[0].key, tuple(k.key for k in path[1:])): x for path, x in flat}
    for leaf in found.keys() - shapes.keys():
        raise ValueError(f"variables {leaf[0]}/{'/'.join(leaf[1])} has no checkpoint name")
    for leaf, shape in shapes.items():
        name = f"{leaf[0]}/{'/'.join(leaf[1])}"
        if leaf not in found:
            raise ValueError(f"variables lack {name} (cfg implies shape {shape})")
        if tuple(found[leaf].shape) != shape:
            raise ValueError(f"variables {name} has shape {found[leaf].shape}, cfg implies {shape}")
    return found


def save(
    cfg: ModelConfig,
    variables: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    max_shard_bytes: float = 5e9,
) -> None:
    """Write config.json and safetensors (sharded with an index when over max_shard_bytes)."""
    path = Path(path)
    layout = _layout(cfg)
    leaves = _leaves(variables, layout.shapes)
    param_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    sources = {name: name for name in layout.slots} | _mtp_duplicates(cfg)

    def dtype(name: str) -> np.dtype:
        # The router bias stays float32, as in DeepSeek's and transformers' checkpoints.
        collection = layout.slots[sources[name]].leaves[0][0]
        return np.dtype(np.float32) if collection == "router_bias" else param_dtype

    def tensor(name: str) -> np.ndarray:
        slot = layout.slots[sources[name]]
        (leaf,) = slot.leaves
        x = np.asarray(leaves[leaf][slot.index], dtype(name))  # one slice on host at a time
        return np.ascontiguousarray(slot.map.to_hf(x))

    nbytes = {
        n: math.prod(layout.slots[s].hf_shape) * dtype(n).itemsize for n, s in sources.items()
    }
    shards: list[list[str]] = [[]]
    size = 0
    for name in sources:
        if shards[-1] and size + nbytes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    n = len(shards)
    files = [_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    path.mkdir(parents=True, exist_ok=True)
    # Write everything into a scratch folder first: a failure half-way (disk full, a bad leaf)
    # leaves any checkpoint already in `path` untouched.
    with tempfile.TemporaryDirectory(dir=path, prefix=".saving-") as scratch:
        scratch = Path(scratch)
        for file, names in zip(files, shards, strict=True):
            tensors = {name: tensor(name) for name in names}
            save_file(tensors, str(scratch / file), metadata={"format": "pt"})
        if n > 1:
            weight_map = {
                name: file for file, names in zip(files, shards, strict=True) for name in names
            }
            index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
            (scratch / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
        hf = dense_config_to_hf(cfg) if cfg.gqa is not None else config_to_hf(cfg)
        (scratch / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        # Shards or an index left by an earlier save would be read together with the new files.
        for old in path.iterdir():
            if (old.name in (_SINGLE, _INDEX) or _SHARD.fullmatch(old.name)) and not (
                scratch / old.name
            ).exists():
                old.unlink()
        for new in scratch.iterdir():
            os.replace(new, path / new.name)
