"""Checkpoints: find them, read them into a model, write them back.

This module owns the files, not the math: resolving a local folder or a Hugging Face Hub id to a folder,
choosing the weight files (sharded or single `.safetensors` / `.bin`), streaming them shard by shard into a
model built on the meta device, P-Tuning v2 prefixes, and saving in the official layout. Because module
names equal the checkpoint's tensor names (model.py), reading is `load_state_dict(assign=True)` per shard
with no renaming.

Invariants:
- No code is ever unpickled: `.bin` shards go through `torch.load(weights_only=True)`, safetensors has no
  code to run.
- No second copy of the model exists while loading: the model starts on the meta device and each shard's
  tensors are converted straight into the parameters, so peak memory is the final weights plus one shard.
- Nothing is dropped or guessed silently: a missing, unexpected or misshapen tensor is an error that
  names it. The one exception is `transformer.rotary_pos_emb.inv_freq`, derived from the config.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import os
import pickle
import shutil
import struct
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import (
    HfApi,
    get_cached_repo_tree,
    is_offline_mode,
    snapshot_download,
)
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import save_file

from .config import ModelConfig
from .model import ChatGLMForCausalLM

__all__ = ["CheckpointError", "load_model", "resolve_model_dir", "save_model", "save_prefix"]


class CheckpointError(ValueError):
    """A checkpoint glmkit cannot load, with the file or tensor at fault named."""


CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
SAFETENSORS_INDEX, SAFETENSORS = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN = "pytorch_model.bin.index.json", "pytorch_model.bin"
# The official checkpoints store this buffer, but it is derived from the config (rope_ratio), never loaded.
INV_FREQ = "transformer.rotary_pos_emb.inv_freq"
PREFIX = "transformer.prefix_encoder."

# Files fetched from the Hub besides the weights: nothing else in a repo is run or read.
_HUB_FILES = [CONFIG, TOKENIZER]
_HUB_SAFETENSORS = [SAFETENSORS_INDEX, "model*.safetensors"]
_HUB_BIN = [BIN_INDEX, "pytorch_model*.bin"]

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


# ---- finding a checkpoint ------------------------------------------------------------------------------

def resolve_model_dir(name_or_path: str | os.PathLike, *, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder holding a checkpoint: `name_or_path` itself if it is a folder, else the Hub snapshot.

    A Hub id is fetched (or found in the cache) with huggingface_hub, which honours HF_HUB_OFFLINE, HF_HOME
    and HF_HUB_CACHE; only config.json, tokenizer.model and one format of weights are fetched.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint folder (with config.json) or a Hub id")
    name = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or not _is_repo_id(name):
        raise CheckpointError(f"no folder at {name!r}, and it is not a Hugging Face Hub id "
                              "(like 'THUDM/chatglm3-6b')")
    return _hub_snapshot(name, revision, cache_dir)


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> Path:
    patterns = _HUB_FILES + _hub_weight_patterns(_hub_listing(repo_id, revision, cache_dir))
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"no local folder {repo_id!r}, and the Hugging Face Hub has no repo of that name "
                              f"that you may read (private or gated repos need `hf auth login`): {e}") from e
    except LocalEntryNotFoundError as e:
        # huggingface_hub's own offline handling (HF_HUB_OFFLINE=1, or the Hub unreachable) ends here.
        raise CheckpointError(f"{repo_id!r} is not a local folder, and the Hugging Face cache holds no complete "
                              f"copy of it while the Hub cannot be used (offline or unreachable): {e}") from e
    return Path(folder)


def _hub_listing(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> list[str] | None:
    """The repo's file names: from the Hub when online, else from the cache's listing; None when unknown."""
    if not is_offline_mode():
        try:
            return HfApi().list_repo_files(repo_id, revision=revision)
        except Exception:  # unreachable, missing, gated: snapshot_download tries the cache and reports why
            pass
    try:
        return [f.path for f in get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir)]
    except CachedRepoTreeNotFoundError:
        return None


def _hub_weight_patterns(listing: list[str] | None) -> list[str]:
    """Fetch one weight format only: THUDM/chatglm3-6b holds both, 12.5 GB each. Safetensors first."""
    if listing is None:  # offline with no cached listing: accept whichever format the cache holds
        return _HUB_SAFETENSORS + _HUB_BIN
    if any(name.startswith("model") and name.endswith(".safetensors") for name in listing):
        return _HUB_SAFETENSORS
    return _HUB_BIN


def _read_config(folder: Path) -> ModelConfig:
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG} in {folder}: not a ChatGLM checkpoint folder")
    return ModelConfig.from_json(path)  # its ConfigError (unsupported model) passes through


@dataclass
class _WeightFiles:
    """The weight files of one folder, and which of them holds which tensor (None: a single file)."""
    source: Path  # the index, or the one weight file: named in errors
    shards: list[Path]
    weight_map: dict[str, str] | None


def _find_weight_files(folder: Path) -> _WeightFiles:
    # Safetensors first: it cannot hold code and is read without unpickling.
    for index, single in ((SAFETENSORS_INDEX, SAFETENSORS), (BIN_INDEX, BIN)):
        if (folder / index).is_file():
            return _read_index(folder / index)
        if (folder / single).is_file():
            return _WeightFiles(folder / single, [folder / single], None)
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"no weights in {folder}: expected {SAFETENSORS_INDEX}, {SAFETENSORS}, {BIN_INDEX} or "
                          f"{BIN}; found {found}")


def _read_index(path: Path) -> _WeightFiles:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f'{path} has no "weight_map" object of tensor name -> shard file name')
    files = sorted(set(weight_map.values()))
    outside = [f for f in files if Path(f).name != f]  # a shard is a file beside the index, nowhere else
    if outside:
        raise CheckpointError(f"{path} names shard files outside its folder: {outside}")
    missing = [f for f in files if not (path.parent / f).is_file()]
    if missing:
        raise CheckpointError(f"{path.name} refers to shard file(s) missing from {path.parent}: {missing}")
    return _WeightFiles(path, [path.parent / f for f in files], weight_map)


# ---- reading shards ------------------------------------------------------------------------------------

class _Shard:
    """One weight file read lazily: names and shapes from its header, each tensor on demand."""

    def __init__(self, path: Path):
        self.path = path
        with self._reading():  # either format: tensors memory-mapped, read when used
            if path.suffix == ".safetensors":
                self._tensors = map_safetensors(path)[1]
            else:
                self._tensors = _torch_load(path)
        self.names = list(self._tensors)

    def shape(self, name: str) -> list[int]:
        return list(self._tensors[name].shape)

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def release(self, name: str) -> None:
        """Give back the pages of a memory-mapped tensor that has been copied out (they count in this
        process's memory until the whole shard is unmapped; the file keeps them)."""
        _release_pages(self._tensors[name])

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Re-raise the library's error on a corrupt or truncated file as one that names the file."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read {self.path}: the file is corrupt or truncated "
                                  f"({type(e).__name__}: {e})") from e


_MADV_DONTNEED = 4  # Linux: drop the pages; a later read of a file mapping reads the file again


def _release_pages(t: torch.Tensor) -> None:
    if not sys.platform.startswith("linux"):
        return
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:  # whole pages only: a page shared with a neighbouring tensor stays
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap: the shard's bytes stay in the page cache instead of a second in-memory copy.
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        # torch's message ends with how to load it unsafely; keep only the reason (the offending global).
        reason = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line),
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise CheckpointError(f"refusing to load {path}: it holds pickled objects other than tensors, which "
                              f"could run code ({reason})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of tensor name -> tensor")
    odd = [k for k, v in data.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if odd:
        raise CheckpointError(f"{path} holds entries that are not named tensors: {_names(map(str, odd))}")
    return data


_SAFETENSORS_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
                       "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F32": torch.float32, "F64": torch.float64}


def map_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, name -> tensor) of a safetensors file, the tensors being views of its memory map
    (copy-on-write: writing to one never reaches the file). Nothing is read until a tensor is used."""
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
        raise CheckpointError(f"cannot read {path}: the file is corrupt or truncated ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
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
            raise CheckpointError(f"cannot read {path}: the file is corrupt or truncated "
                                  f"(tensor {name!r}: {e})") from None
        tensors[name] = flat.view(shape)
    return metadata, tensors


ALIGN = 64  # bytes: torch's int8 kernel reads its weight with aligned loads (16 bytes at least)
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def write_aligned_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file whose tensors start at multiples of 64 bytes (where their sizes allow), so that
    memory-mapping it hands the kernels aligned weights. Standard safetensors: the header is padded with
    spaces, and the tensors whose size is a multiple of 64 bytes come first (`safetensors.save_file`
    orders by dtype, which leaves int8 weights unaligned)."""
    order = sorted(tensors, key=lambda n: (tensors[n].nbytes % ALIGN != 0, n))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(tensors[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())


def _names(names: Iterable[str], limit: int = 10) -> str:
    """A compact list for error messages: the first `limit` names and how many there are in all."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def _load_weights(model: ChatGLMForCausalLM, folder: Path, wanted: dict[str, list[int]],
                  dtype: torch.dtype, device: torch.device, skip: str | None = None,
                  transform=None, progress=None) -> None:
    """Assign every tensor in `wanted` (name -> shape) from the checkpoint in `folder`, shard by shard.

    Names starting with `skip` are passed over (a base checkpoint's prefix, when a separate one is given).
    `transform` (glmkit.quant's QuantizingTransform) turns the float weights it handles into the tensors
    that replace them, straight from the shard, one at a time; `progress` (a tqdm bar) counts tensors.
    """
    files = _find_weight_files(folder)

    def ignored(name: str) -> bool:
        return name == INV_FREQ or (skip is not None and name.startswith(skip))

    if files.weight_map is not None:  # check the table of contents before reading gigabytes
        listed = {n for n in files.weight_map if not ignored(n)}
        _check_unexpected(files.source, listed, wanted)
        _check_missing(files.source, set(wanted) - listed, model.config, by_index=True)
    loaded: set[str] = set()
    for path in files.shards:
        shard = _Shard(path)
        names = [n for n in shard.names if not ignored(n)]
        _check_unexpected(path, names, wanted)
        if files.weight_map is not None:
            claimed = {n for n, f in files.weight_map.items() if f == path.name and not ignored(n)}
            absent = claimed - set(names)
            if absent:
                raise CheckpointError(f"{files.source.name} maps {len(absent)} tensor(s) to {path.name}, which "
                                      f"does not hold them: {_names(absent)}")
            names = sorted(claimed)  # the index decides which copy of a duplicated tensor counts
        _check_shapes(path, {n: shard.shape(n) for n in names}, wanted)
        tensors = {}
        for n in names:
            if transform is not None and transform.handles(n):
                tensors.update(transform(n, shard.tensor(n).to(device)))  # quantized from the stored precision
            else:
                tensors[n] = _place(shard.tensor(n), dtype, device)
            shard.release(n)  # peak memory: the weights plus one tensor of the shard, not the whole shard
            if progress is not None:
                progress.update(1)
        del shard  # release the shard's file mapping before the next one
        model.load_state_dict(tensors, strict=False, assign=True)
        loaded.update(names)
    _check_missing(files.source, set(wanted) - loaded, model.config, by_index=False)


def _place(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`t` converted for the model, in memory of its own (not the shard's mapping, which is released)."""
    if not t.is_floating_point():
        return t.to(device=device, copy=True)
    if device.type == "cpu":
        return t.to(dtype=dtype, copy=True)
    return t.to(device=device).to(dtype)  # convert on the accelerator, which is faster than the CPU


def _check_unexpected(where: Path, names: Iterable[str], wanted: dict[str, list[int]]) -> None:
    unexpected = [n for n in names if n not in wanted]
    if unexpected:
        raise CheckpointError(f"{where} holds {len(unexpected)} tensor(s) this model does not have: "
                              f"{_names(unexpected)}; does its config.json describe these weights?")


def _check_missing(where: Path, missing: set[str], config: ModelConfig, by_index: bool) -> None:
    if not missing:
        return
    what = f"{where.name} maps no shard to" if by_index else f"{where} lacks"
    hint = ""
    if all(n.startswith(PREFIX) for n in missing):
        hint = (f"; config.json sets pre_seq_len={config.pre_seq_len} but the checkpoint holds no P-Tuning "
                "prefix: pass prefix=<the P-Tuning checkpoint folder>")
    raise CheckpointError(f"{what} {len(missing)} tensor(s) the model needs: {_names(missing)}{hint}")


def _check_shapes(where: Path, shapes: dict[str, list[int]], wanted: dict[str, list[int]]) -> None:
    wrong = [f"{n} is {got}, expected {wanted[n]}" for n, got in shapes.items() if got != wanted[n]]
    if not wrong:
        return
    hint = ""
    if any(n.startswith(PREFIX) for n in shapes if shapes[n] != wanted[n]):
        hint = ("; the P-Tuning prefix does not fit this base model (rows are pre_seq_len x num_layers*2*"
                "multi_query_group_num*kv_channels): was it trained on another model?")
    raise CheckpointError(f"{where}: {len(wrong)} tensor(s) of the wrong shape: {'; '.join(wrong[:10])}{hint}")


# ---- loading ---------------------------------------------------------------------------------------------

def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype | str = torch.bfloat16,
               device: torch.device | str = "cpu",
               prefix: str | os.PathLike | None = None, quantize=None,
               progress: bool = False) -> ChatGLMForCausalLM:
    """A ChatGLM3 model in eval mode, from a checkpoint folder or a Hugging Face Hub id.

    `prefix` names a P-Tuning v2 checkpoint (a folder or Hub id holding only `transformer.prefix_encoder.*`
    and a config.json with pre_seq_len / prefix_projection) to load on top of the base model.

    A quantized checkpoint (glmkit.quant; config.json says so) is memory-mapped, not copied. `quantize`
    ("int8", "int4" or a glmkit.quant.QuantConfig) quantizes a float checkpoint while it is read, tensor
    by tensor, so memory never holds the float model; on a quantized checkpoint it must name its mode.
    dtype is then the activations' dtype. `progress` shows a progress bar on stderr.
    """
    from .quant.checkpoint import check_request, load_quantized_weights, stored_quant_config
    from .quant.convert import QuantizingTransform, quantize_model

    dtype, device = as_dtype(dtype), torch.device(device)
    folder = resolve_model_dir(name_or_path)
    config = _read_config(folder)
    stored = stored_quant_config(config, folder)
    quant = check_request(stored, quantize, folder)
    prefix_folder = resolve_model_dir(prefix) if prefix is not None else None
    if prefix_folder is not None:
        config = _with_prefix_config(config, prefix_folder)

    with torch.device("meta"):  # shapes only: the checkpoint's tensors become the parameters
        model = ChatGLMForCausalLM(config)
    shapes = {n: list(t.shape) for n, t in model.state_dict().items()}
    if quant is not None:
        model = quantize_model(model, quant, dtype)  # still on the meta device: the quantized shapes
    base = {n: s for n, s in shapes.items() if prefix_folder is None or not n.startswith(PREFIX)}
    skip = None if prefix_folder is None else PREFIX  # the given prefix replaces any in the base checkpoint
    total = len(base) if stored is None else sum(skip is None or not n.startswith(skip) for n in model.state_dict())
    with _progress_bar(progress, total, f"loading {folder.name}") as bar:
        if stored is not None:
            load_quantized_weights(model, folder, device, skip=skip, progress=bar)
        else:
            transform = QuantizingTransform(model) if quant is not None else None
            _load_weights(model, folder, base, dtype, device, skip=skip, transform=transform, progress=bar)
    if prefix_folder is not None:
        _load_weights(model, prefix_folder, {n: s for n, s in shapes.items() if n.startswith(PREFIX)},
                      dtype, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # cannot happen after the checks above; a model with unloaded weights must never escape
        raise CheckpointError(f"tensors left unloaded: {_names(left)}")
    return model.eval()


def _progress_bar(enabled: bool, total: int, description: str):
    """A tqdm bar on stderr counting tensors, or a context that does nothing."""
    if not enabled:
        return nullcontext()
    from huggingface_hub.utils import tqdm

    return tqdm(total=total, desc=description, unit="tensor", leave=False)


def _with_prefix_config(base: ModelConfig, prefix_folder: Path) -> ModelConfig:
    """The base config with the P-Tuning checkpoint's prefix length and projection."""
    prefix_config = _read_config(prefix_folder)
    if not prefix_config.pre_seq_len:
        raise CheckpointError(f"{prefix_folder / CONFIG} has no pre_seq_len: not a P-Tuning v2 checkpoint")
    return dataclasses.replace(base, pre_seq_len=prefix_config.pre_seq_len,
                               prefix_projection=prefix_config.prefix_projection)


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating-point type")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)} or a torch.dtype")
    return _DTYPES[name]


# ---- saving ----------------------------------------------------------------------------------------------

def save_model(model: ChatGLMForCausalLM, out_dir: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3,
               tokenizer_path: str | os.PathLike | None = None) -> Path:
    """Write `model` in the official layout: config.json, safetensors shards and their index.

    One `model.safetensors` when the weights fit in `max_shard_bytes`, else
    `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`. Earlier safetensors weights in
    `out_dir` are removed first, so a stale shard or index cannot be mistaken for these weights.
    `tokenizer_path` (tokenizer.model, or a folder holding it) is copied beside them.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from .quant.checkpoint import metadata_for

    state = {n: t.contiguous() for n, t in model.state_dict().items()}
    _write_config(model.config, model.dtype, out)
    _write_safetensors(state, out, max_shard_bytes, metadata_for(model.config))  # a quantized model says so
    if tokenizer_path is not None:
        _copy_tokenizer(Path(tokenizer_path), out)
    return out


def save_prefix(model: ChatGLMForCausalLM, out_dir: str | os.PathLike) -> Path:
    """Write only the P-Tuning v2 prefix: config.json and a model.safetensors of `transformer.prefix_encoder.*`."""
    if not model.config.pre_seq_len:
        raise ValueError("the model has no P-Tuning prefix (config.pre_seq_len is not set)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {n: t.contiguous() for n, t in model.state_dict().items() if n.startswith(PREFIX)}
    _write_config(model.config, state[PREFIX + "embedding.weight"].dtype, out)
    _write_safetensors(state, out, max_shard_bytes=None)
    return out


def _write_config(config: ModelConfig, dtype: torch.dtype, out: Path) -> None:
    dtype_name = str(dtype).removeprefix("torch.")
    dataclasses.replace(config, extra={**config.extra, "torch_dtype": dtype_name}).save_json(out / CONFIG)


def _write_safetensors(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None,
                       metadata: dict[str, str] | None = None) -> None:
    for stale in [out / SAFETENSORS_INDEX, out / SAFETENSORS, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    groups = _plan_shards(state, max_shard_bytes)
    if len(groups) == 1:
        _save_safetensors(state, out / SAFETENSORS, metadata)
        return
    weight_map = {}
    for i, names in enumerate(groups, start=1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        _save_safetensors({n: state[n] for n in names}, out / file, metadata)  # one shard in memory at a time
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    metadata = {"format": "pt", **(metadata or {})}  # transformers refuses safetensors without "format"
    if len(metadata) > 1:  # quantized: aligned for memory-mapping straight into the kernels
        write_aligned_safetensors(tensors, path, metadata)
    else:
        save_file(tensors, path, metadata=metadata)
    # safetensors creates the file owner-only (0600); give it the permissions config.json got from the umask.
    shutil.copymode(path.parent / CONFIG, path)


def _plan_shards(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    """Names grouped in order into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        if max_bytes is not None and groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += t.nbytes
    return groups


def _copy_tokenizer(src: Path, out: Path) -> None:
    if src.is_dir():
        src = src / TOKENIZER
    if not src.is_file():
        raise FileNotFoundError(f"no tokenizer at {src}")
    if src.resolve() != (out / TOKENIZER).resolve():
        shutil.copyfile(src, out / TOKENIZER)
