"""Quantized checkpoints: what marks them, and reading them by memory-mapping.

A quantized checkpoint is an ordinary glmkit safetensors checkpoint (written by `loader.save_model`)
whose config.json holds a "quantization" object (`QuantConfig.to_dict()`) and whose every safetensors
file repeats it in its metadata under `glmkit.quantization`. Both must be present and agree; nothing is
ever inferred from a file name or from tensor shapes.

Reading maps each file and makes its tensors views of the mapping (copy-on-write, never written): the
integer weights are not copied, so loading takes about as long as checking the header, and the pages are
read from disk (or the page cache) the first time a kernel touches them. Every tensor is checked against
the quantized model's own buffers (name, shape, dtype), and scales against corruption (NaN, infinite or
negative), before anything is assigned.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..loader import (
    ALIGN,
    INV_FREQ,
    SAFETENSORS,
    CheckpointError,
    _check_missing,
    _check_unexpected,
    _find_weight_files,
    _names,
    map_safetensors,
)
from .. import cpu_kernels
from .scheme import QuantConfig, QuantConfigError, as_quant_config

CONFIG_KEY = "quantization"  # in config.json
METADATA_KEY = "glmkit.quantization"  # in each safetensors file's metadata
_SCALE_SUFFIXES = (".scales", ".scales_and_zeros", ".zeros")


def stored_quant_config(config: ModelConfig, where: Path) -> QuantConfig | None:
    """The quantization recorded in a checkpoint's config.json, or None for a float checkpoint."""
    recorded = config.extra.get(CONFIG_KEY)
    if recorded is None:
        return None
    try:
        return QuantConfig.from_dict(recorded)
    except QuantConfigError as e:
        raise CheckpointError(f"{where / 'config.json'} has an unusable {CONFIG_KEY!r} entry: {e}") from None


def with_quant_config(config: ModelConfig, quant: QuantConfig) -> ModelConfig:
    """`config` recording `quant`, so that saving the model writes a quantized checkpoint."""
    return dataclasses.replace(config, extra={**config.extra, CONFIG_KEY: quant.to_dict()})


def metadata_for(config: ModelConfig) -> dict[str, str]:
    """The safetensors metadata a checkpoint of this config carries (empty for a float model)."""
    recorded = config.extra.get(CONFIG_KEY)
    return {} if recorded is None else {METADATA_KEY: json.dumps(recorded, sort_keys=True)}


def check_metadata(path: Path, metadata: dict[str, str], quant: QuantConfig) -> None:
    recorded = metadata.get(METADATA_KEY)
    if recorded is None:
        raise CheckpointError(f"{path} has no {METADATA_KEY!r} metadata, but config.json says the weights are "
                              f"{quant.mode}: was the file written by `glmkit quantize`?")
    try:
        in_file = QuantConfig.from_dict(json.loads(recorded))
    except (json.JSONDecodeError, QuantConfigError) as e:
        raise CheckpointError(f"{path}: unreadable {METADATA_KEY!r} metadata ({e})") from None
    if in_file != quant:
        raise CheckpointError(f"{path} holds {describe(in_file)} weights but config.json says {describe(quant)}: "
                              "the files do not belong together")


def check_tensor(path: Path, name: str, tensor: torch.Tensor, expected: torch.Tensor) -> None:
    """A quantized checkpoint's tensor against the model's buffer of that name (a meta tensor)."""
    if list(tensor.shape) != list(expected.shape):
        raise CheckpointError(f"{path}: {name} is {list(tensor.shape)}, expected {list(expected.shape)} "
                              "(a checkpoint of another quantization mode or group size?)")
    if not expected.is_floating_point() and tensor.dtype != expected.dtype:
        raise CheckpointError(f"{path}: {name} is {tensor.dtype}, expected {expected.dtype} "
                              "(a checkpoint of another quantization mode?)")
    if name.endswith(_SCALE_SUFFIXES):
        if tensor.dtype != expected.dtype:
            raise CheckpointError(f"{path}: {name} is {tensor.dtype}, expected {expected.dtype}")
        values = tensor.float()
        if not torch.isfinite(values).all():
            raise CheckpointError(f"{path}: {name} holds NaN or infinite values: the scale tensor is corrupt")
        if not name.endswith(".zeros"):
            scales = values[..., 0] if name.endswith(".scales_and_zeros") else values
            if (scales < 0).any():
                raise CheckpointError(f"{path}: {name} holds negative scales: the scale tensor is corrupt")


def describe(quant: QuantConfig) -> str:
    """One line for people: mode, group size, symmetry, embedding and output layer."""
    group = "one group per row" if quant.group_size == 0 else f"group size {quant.group_size}"
    kind = "symmetric" if quant.symmetric else "asymmetric"
    return f"{quant.mode} ({group}, {kind}, embedding {quant.embedding}, output layer {quant.output})"


def check_request(stored: QuantConfig | None, requested: QuantConfig | str | None, where: Any) -> QuantConfig | None:
    """The quantization to load with: the checkpoint's, or the one requested for a float checkpoint.

    A request on a quantized checkpoint must match it (a mode name, its mode; a QuantConfig, all of it):
    a quantized checkpoint is never quantized again.
    """
    if requested is None or stored is None:
        return stored if requested is None else as_quant_config(requested)
    wanted = requested.mode if isinstance(requested, QuantConfig) else requested
    if wanted != stored.mode or (isinstance(requested, QuantConfig) and requested != stored):
        asked = describe(requested) if isinstance(requested, QuantConfig) else repr(requested)
        raise CheckpointError(f"{where} is already quantized: {describe(stored)}; it cannot be loaded as {asked}. "
                              "Load it without quantize, or quantize its float checkpoint instead")
    return stored


def load_quantized_weights(model, folder: Path, device: torch.device, skip: str | None = None,
                           progress=None) -> None:
    """Assign every buffer and parameter of the quantized `model` (on the meta device) from the quantized
    checkpoint in `folder`, file by file, memory-mapped. Names starting with `skip` are passed over."""
    quant = model.quant_config
    files = _find_weight_files(folder)
    if files.shards[0].suffix != ".safetensors":
        raise CheckpointError(f"{folder} is a {quant.mode} checkpoint (config.json) but holds {files.source.name}: "
                              f"quantized weights are read from safetensors files ({SAFETENSORS} or shards)")
    expected = {n: t for n, t in model.state_dict().items() if skip is None or not n.startswith(skip)}
    loaded: set[str] = set()
    for path in files.shards:
        metadata, tensors = map_safetensors(path)  # views of the file: the weights are not copied
        check_metadata(path, metadata, quant)
        names = [n for n in tensors if n != INV_FREQ and (skip is None or not n.startswith(skip))]
        if files.weight_map is not None:
            names = [n for n in names if files.weight_map.get(n) == path.name]
        foreign = [n for n in names if n not in expected and n.endswith(_SCALE_SUFFIXES)]
        if foreign:
            raise CheckpointError(f"{path} holds quantization tensors a {describe(quant)} model does not have "
                                  f"({_names(foreign)}): the weights are of another quantization mode than "
                                  "config.json says")
        _check_unexpected(path, names, expected)
        placed = {}
        for n in names:
            check_tensor(path, n, tensors[n], expected[n])
            placed[n] = _place(tensors[n], expected[n].dtype, device)
            if progress is not None:
                progress.update(1)
        model.load_state_dict(placed, strict=False, assign=True)
        loaded.update(placed)
    _check_missing(files.source, set(expected) - loaded, model.config, by_index=False)
    if device.type == "cpu":
        cpu_kernels.available()  # load (or build, once per machine) the CPU kernels now, not at the first prompt


def _place(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The mapped tensor as the model keeps it: integers and scales as stored (no copy on the CPU), other
    floats (norms, biases: the model's buffers say which) converted to the activations' dtype."""
    if t.dtype != dtype:
        t = t.to(dtype)
    if device.type != "cpu":
        return t.to(device)
    # Files from other writers may leave a tensor unaligned; the int8 kernel would crash on it.
    return t.clone() if t.data_ptr() % ALIGN else t
