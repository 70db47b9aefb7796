"""LoRA: low-rank adapters injected into a model's linears by a function, merged back by another.

`apply_lora(model, targets, r, alpha)` replaces each module whose last name part is in `targets`
(`query_key_value`, `dense`, `dense_h_to_4h`, `dense_4h_to_h`) by a `LoRALinear` that holds it:

    y = base_layer(x) + (alpha / r) * lora_B(lora_A(dropout(x)))

The base module is only called, never looked into, so any module with `in_features`,
`out_features` and a forward `x -> y` can be adapted: `nn.Linear`, the packed bf16 linears of
`glmkit.packed`, quantized linears. `merge_lora` folds the adapters into float base weights and
puts the plain modules back, so a merged model is the unmodified architecture again.

Adapters are saved in the PEFT layout (`adapter_config.json` + `adapter_model.safetensors`, tensor
names `base_model.model.<module>.lora_A.weight`): glmkit's module names are the official ones, so
the files are interchangeable with PEFT adapters of the official model.

Invariants: lora_B starts at zero, so a freshly adapted model computes exactly what the base did;
LoRA weights are float32 whatever the base dtype (their update is tiny next to bf16 rounding).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

__all__ = [
    "DEFAULT_TARGETS",
    "LoRALinear",
    "adapter_config",
    "apply_lora",
    "load_adapter",
    "lora_state_dict",
    "merge_lora",
    "read_adapter_config",
    "save_adapter",
]

DEFAULT_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how PEFT names an adapted model's modules in its files


class LoRALinear(nn.Module):
    """A module `base_layer` (x -> y) plus a trainable low-rank update of its output."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, device: torch.device):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        self.scaling = alpha / r
        # nn.Linear's own init (Kaiming-uniform) for A, zeros for B: the update starts at exactly 0.
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense (out_features, in_features) float32 matrix."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout_p}"


def apply_lora(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS, r: int = 8, alpha: float = 16,
               dropout: float = 0.0) -> nn.Module:
    """Wrap every module of `model` whose last name part is in `targets`; return `model`, changed in place.

    Every other parameter of the model is frozen (requires_grad False): only the adapters train.
    Raises ValueError when no module matches, or when a matching module has no in/out features.
    """
    targets = _check_targets(targets)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r={r!r} must be a positive integer")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha={alpha!r} must be positive")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout={dropout!r} must be in [0, 1)")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters: merge them (merge_lora) before adding others")
    found = [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"no module named {', '.join(targets)} in the model: nothing to adapt")
    plain = [name for name, m in found if not (hasattr(m, "in_features") and hasattr(m, "out_features"))]
    if plain:
        raise ValueError(f"LoRA targets must be linear layers (with in_features/out_features); these are not: "
                         f"{', '.join(plain[:5])}")
    for p in model.parameters():
        p.requires_grad_(False)
    device = _device_of(model)
    for name, module in found:
        _set_submodule(model, name, LoRALinear(module, r, alpha, dropout, device))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight and put the base module back; return `model`.

    The base must hold a float `weight` of shape (out_features, in_features) (nn.Linear); a quantized
    base cannot take the update: merge into the float model, then quantize.
    """
    for name, module in _adapters(model):
        base = module.base_layer
        weight = getattr(base, "weight", None)
        if not (isinstance(weight, torch.Tensor) and weight.is_floating_point()
                and tuple(weight.shape) == (module.out_features, module.in_features)):
            raise ValueError(f"cannot merge the LoRA adapter of {name} into its {type(base).__name__}: it has no "
                             "float weight matrix; merge into the float model first, then quantize")
        with torch.no_grad():
            weight.copy_((weight.float() + module.delta_weight().to(weight.device)).to(weight.dtype))
        _set_submodule(model, name, base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights, named `<module>.lora_A.weight` / `<module>.lora_B.weight`."""
    state = {}
    for name, module in _adapters(model):
        state[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return state


def adapter_config(model: nn.Module, base_model: str | None = None) -> dict[str, Any]:
    """The PEFT adapter_config.json of `model`'s adapters (which must share r, alpha and dropout)."""
    adapters = _adapters(model)
    if not adapters:
        raise ValueError("the model has no LoRA adapters")
    settings = {(m.r, m.alpha, m.dropout_p) for _, m in adapters}
    if len(settings) != 1:
        raise ValueError(f"the adapters differ in (r, alpha, dropout): {sorted(settings)}; one file holds one setting")
    r, alpha, dropout = settings.pop()
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
            "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in adapters}), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_model}


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (PEFT layout) into `out_dir`."""
    config = adapter_config(model, base_model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + n: t.to("cpu").contiguous() for n, t in lora_state_dict(model).items()}
    save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Add the adapters saved in `adapter_dir` to `model` (unless it already has them) and load their weights.

    Every tensor must match a module of the model in name and shape, and every adapter of the model
    must be in the file: anything else is a ValueError that names it.
    """
    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    if not _adapters(model):
        apply_lora(model, config["target_modules"], config["r"], config["lora_alpha"], config["lora_dropout"])
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {folder}")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {name.removeprefix(PEFT_PREFIX): f.get_tensor(name) for name in f.keys()}
    wanted = lora_state_dict(model)
    unexpected = sorted(set(tensors) - set(wanted))
    missing = sorted(set(wanted) - set(tensors))
    wrong = [f"{n} is {list(tensors[n].shape)}, expected {list(wanted[n].shape)}"
             for n in sorted(set(tensors) & set(wanted)) if tensors[n].shape != wanted[n].shape]
    for problem, names in (("holds tensors this model has no adapter for", unexpected),
                           ("lacks adapter tensors this model needs", missing),
                           ("has tensors of the wrong shape (another base model or rank?)", wrong)):
        if names:
            raise ValueError(f"{path} {problem}: {'; '.join(names[:5])}" + (
                f" ... ({len(names)} in all)" if len(names) > 5 else ""))
    with torch.no_grad():
        for name, t in tensors.items():
            wanted[name].copy_(t)
    return model


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The checked adapter_config.json of `folder`: a plain LoRA that glmkit computes as PEFT does."""
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {folder}: not a LoRA adapter folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter (peft_type {config['peft_type']!r})")
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save")
                   if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ValueError(f"{path}: LoRA variants glmkit does not implement: {', '.join(unsupported)}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{path} lacks {key!r}")
    targets = config["target_modules"]
    config["target_modules"] = [targets] if isinstance(targets, str) else targets
    config.setdefault("lora_dropout", 0.0)
    return config


# ---- helpers ---------------------------------------------------------------------------------------

def _adapters(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = [targets]
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"LoRA targets must be module names like {DEFAULT_TARGETS[0]!r}, got {targets!r}")
    return targets


def _device_of(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)

