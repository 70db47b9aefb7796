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

import json
import mmap
import struct
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from .scheme import QuantConfig, QuantConfigError

CONFIG_KEY = "quantization"  # in config.json
METADATA_KEY = "glmkit.quantization"  # in each safetensors file's metadata
_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
           "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64}
_SCALE_SUFFIXES = (".scales", ".scales_and_zeros", ".zeros")


def stored_quant_config(config: ModelConfig, where: Path) -> QuantConfig | None:
    """The quantization recorded in a checkpoint's config.json, or None for a float checkpoint."""
    from ..loader import CheckpointError

    recorded = config.extra.get(CONFIG_KEY)
    if recorded is None:
        return None
    try:
        return QuantConfig.from_dict(recorded)
    except QuantConfigError as e:
        raise CheckpointError(f"{where / 'config.json'} has an unusable {CONFIG_KEY!r} entry: {e}") from None


def with_quant_config(config: ModelConfig, quant: QuantConfig) -> ModelConfig:
    """`config` recording `quant`, so that saving the model writes a quantized checkpoint."""
    import dataclasses

    return dataclasses.replace(config, extra={**config.extra, CONFIG_KEY: quant.to_dict()})


def metadata_for(config: ModelConfig) -> dict[str, str]:
    """The safetensors metadata a checkpoint of this config carries (empty for a float model)."""
    recorded = config.extra.get(CONFIG_KEY)
    return {} if recorded is None else {METADATA_KEY: json.dumps(recorded, sort_keys=True)}


def map_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, name -> tensor) of a safetensors file, the tensors being views of its memory map."""
    from ..loader import CheckpointError

    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"the header claims {header_len} bytes, more than the file holds")
            header = json.loads(f.read(header_len))
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + header_len else b""
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: not a safetensors file, or a corrupt one ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
            count = 1
            for d in shape:
                count *= d
            if end - start != count * dtype.itemsize or not 0 <= start <= end <= size - 8 - header_len:
                raise ValueError(f"its bytes {start}..{end} do not fit its shape {shape} in this file")
            offset = 8 + header_len + start
            flat = (torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset) if count
                    else torch.empty(0, dtype=dtype))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a corrupt entry in the header ({e})") from None
        tensors[name] = flat.view(shape)
    return metadata, tensors


_ALIGN = 64  # bytes: torch's int8 kernel reads its weight with aligned loads (16 bytes at least)
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file whose tensors start at multiples of 64 bytes (where their sizes allow), so that
    memory-mapping it hands the kernels aligned weights. Standard safetensors: the header is padded with
    spaces, and the tensors whose size is a multiple of 64 bytes come first (`safetensors.save_file`
    orders by dtype, which leaves int8 weights unaligned)."""
    order = sorted(tensors, key=lambda n: (tensors[n].nbytes % _ALIGN != 0, n))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % _ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(tensors[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())


def check_metadata(path: Path, metadata: dict[str, str], quant: QuantConfig) -> None:
    from ..loader import CheckpointError

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
    from ..loader import CheckpointError

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
    from ..loader import CheckpointError
    from .scheme import as_quant_config

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
    from ..loader import (
        INV_FREQ,
        SAFETENSORS,
        CheckpointError,
        _check_missing,
        _check_unexpected,
        _find_weight_files,
        _names,
    )

    quant = model.quant_config
    files = _find_weight_files(folder)
    if files.shards[0].suffix != ".safetensors":
        raise CheckpointError(f"{folder} is a {quant.mode} checkpoint (config.json) but holds {files.source.name}: "
                              f"quantized weights are read from safetensors files ({SAFETENSORS} or shards)")
    expected = {n: t for n, t in model.state_dict().items() if skip is None or not n.startswith(skip)}
    loaded: set[str] = set()
    for path in files.shards:
        metadata, tensors = map_safetensors(path)
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


def _place(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The mapped tensor as the model keeps it: integers and scales as stored (no copy on the CPU), other
    floats (norms, biases: the model's buffers say which) converted to the activations' dtype."""
    if t.dtype != dtype:
        t = t.to(dtype)
    if device.type != "cpu":
        return t.to(device)
    # Files from other writers may leave a tensor unaligned; the int8 kernel would crash on it.
    return t.clone() if t.data_ptr() % _ALIGN else t
