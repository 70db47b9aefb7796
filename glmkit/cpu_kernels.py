"""glmkit's AVX-512 CPU kernels (csrc/): built on first use, cached, or absent with a warning.

    from glmkit import cpu_kernels
    if cpu_kernels.available():  # builds (once per machine and torch version) or loads the library
        y = torch.ops.glmkit_cpu.int4_linear(x, weight, scales_and_zeros, group_size, out_features)

One library, ops `glmkit_cpu::*`, holds them all: the int8 / int4 linears (vnni_linear.cpp), the bfloat16
linear over oneDNN's packed weight that glmkit.packed uses (bf16_linear.cpp), and the model's RMSNorm and
one-query attention for inference (layer_ops.cpp).
The library is compiled with torch.utils.cpp_extension (g++ and ninja) into a cache folder named after the
source, the flags and the torch version, so a later process only loads it. It is not built where it cannot
run: the CPU must have AVX-512 F/BW/VL with VNNI and VBMI (checked before compiling; the flags are explicit,
not -march=native, so the cached library does not depend on the machine that built it). Without a compiler,
on another CPU, or when the build fails, `available()` warns once and returns False, and everything runs on
torch's kernels (for the quantized linears, see `glmkit.quant.kernels`). GLMKIT_CPU_KERNELS=0 turns the
kernels off without a warning.

Cache folder: $GLMKIT_KERNEL_CACHE, else $XDG_CACHE_HOME/glmkit (default ~/.cache/glmkit).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("vnni_linear.cpp", "bf16_linear.cpp", "layer_ops.cpp")]
NAME = "glmkit_cpu"
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512vbmi"]
LDFLAGS = ["-fopenmp"]  # resolves to the libgomp torch has loaded already (same soname): one thread pool
# CPU features the library needs, as torch.cpu.get_capabilities() and /proc/cpuinfo name them.
FEATURES = {"avx512_f": "avx512f", "avx512_bw": "avx512bw", "avx512_vl": "avx512vl", "avx512_vnni": "avx512_vnni",
            "avx512_vbmi": "avx512vbmi"}
DISABLE_VARIABLE = "GLMKIT_CPU_KERNELS"
STALE_LOCK_SECONDS = 600  # a build killed midway leaves cpp_extension's lock file, which would block forever


@functools.cache
@torch.compiler.assume_constant_result  # torch.compile sees through the cache: evaluate, do not trace
def available() -> bool:
    """Whether torch.ops.glmkit_cpu is usable; the first call builds or loads the library."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return False
    reason = missing_cpu_features()
    if reason is None:
        try:
            load()
            return True
        except Exception as e:  # noqa: BLE001 (no compiler or ninja, a compile error: fall back, never crash)
            reason = f"building {', '.join(s.name for s in SOURCES)} failed ({_first_line(e)})"
    warnings.warn(f"glmkit: the model runs on torch's slower CPU kernels: {reason}. Set "
                  f"{DISABLE_VARIABLE}=0 to silence this.", RuntimeWarning, stacklevel=2)
    return False


def missing_cpu_features() -> str | None:
    """None when this CPU runs the library, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"they need an x86-64 CPU with AVX-512 VNNI, this is {platform.machine()}"
    have = _cpu_features()
    if have is None:
        return "this system does not tell which AVX-512 features its CPU has"
    missing = [name for name in FEATURES if name not in have]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def _cpu_features() -> set[str] | None:
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.7
    if capabilities is not None:
        return {name for name, present in capabilities().items() if present is True}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return {name for name, flag in FEATURES.items() if flag in flags}


def build_dir() -> Path:
    """Where the library is built: one folder per source, flags and torch version."""
    base = os.environ.get("GLMKIT_KERNEL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "glmkit"
    files = sorted(SOURCES[0].parent.glob("*.[ch]*"))  # the sources and the header they share
    key = hashlib.sha256(b"".join(f.read_bytes() for f in files) + " ".join(CFLAGS + LDFLAGS).encode()
                         + torch.__version__.encode())
    tag = f"{NAME}-torch{torch.__version__.split('+')[0]}-py{sys.version_info[0]}{sys.version_info[1]}"
    return Path(base).expanduser() / f"{tag}-{key.hexdigest()[:12]}"


def load() -> Path:
    """Load the library, compiling it first if this cache folder has none; returns its path."""
    folder = build_dir()
    library = folder / f"{NAME}.so"
    if not library.is_file():
        library = _compile(folder)
    torch.ops.load_library(str(library))
    _register_fakes()
    return library


@functools.cache
def _register_fakes() -> None:
    """Output shapes of the ops without running them, so that torch.compile can trace a model that calls them."""

    @torch.library.register_fake(f"{NAME}::int4_linear")
    def _int4(x, weight, scales_and_zeros, group_size, out_features, amx=True):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake(f"{NAME}::int8_linear")
    def _int8(x, weight, scales, zeros, group_size, amx=True):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake(f"{NAME}::bf16_linear")
    def _bf16(x, pairs):
        return x.new_empty(x.shape[0], pairs.shape[0] * pairs.shape[2], dtype=torch.bfloat16)

    @torch.library.register_fake(f"{NAME}::rms_norm")
    def _rms_norm(x, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{NAME}::attention_decode")
    def _attention(q, k, v, mask, slots=None):
        return q.new_empty(q.shape[0], 1, q.shape[1] * q.shape[3])


def _compile(folder: Path) -> Path:
    from torch.utils import cpp_extension

    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        lock.unlink(missing_ok=True)
    print(f"glmkit: compiling the CPU kernels into {folder} (once, 20-60 s)", file=sys.stderr,
          flush=True)
    start = time.perf_counter()
    # (copies of the flag lists: cpp_extension appends to them)
    path = cpp_extension.load(NAME, [str(s) for s in SOURCES], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                              build_directory=str(folder), is_python_module=False, verbose=False)
    print(f"glmkit: compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return Path(path)


def _first_line(e: Exception) -> str:
    """The gist of a build error: its first line, without the compiler command cpp_extension appends."""
    lines = str(e).strip().splitlines()
    text = lines[0].split(": [", 1)[0] if lines else ""
    return f"{type(e).__name__}: {text[:200]}"
