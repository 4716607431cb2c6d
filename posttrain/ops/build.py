"""Lazy JIT build of the fused log-prob extension in csrc/ with `torch.utils.cpp_extension.load`.

Nothing is compiled when `posttrain` is imported: the first `load_fused_extension()` call builds the
library (about 20-60 s once; ninja and a C++ compiler needed) or loads it from the cache in
`$TORCH_EXTENSIONS_DIR/<name>` (default `~/.cache/posttrain/torch_extensions/<name>`), and loading it
registers the `posttrain::fused_linear_logprobs_*` and `posttrain::fused_linear_cross_entropy` ops. The CUDA
sources are added when `torch.cuda.is_available()` and CUDA_HOME is set. A failed build emits one warning
naming the reason and returns None, so callers fall back to the PyTorch reference.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parents[1] / "csrc"  # package data (the checkout's csrc/ links here)
DISABLE_ENV_VAR = "POSTTRAIN_DISABLE_FUSED"
CPU_SOURCES = ("fused_logprobs.cpp", "linear_cross_entropy.cpp")
CUDA_SOURCES = (
    "cuda/fused_logprobs_kernel.cu",
    "cuda/fused_logprobs_cuda.cpp",
    "cuda/linear_cross_entropy_kernel.cu",
    "cuda/linear_cross_entropy_cuda.cpp",
)


@dataclass(frozen=True)
class FusedExtension:
    """A loaded build: where its shared library is and which device types it registered kernels for."""

    library_path: str
    device_types: frozenset[str]


_lock = threading.Lock()
_extension: FusedExtension | None = None
_failure: str | None = None  # full error text of a failed build; set at most once per process


def fused_disabled_by_env() -> bool:
    """True when POSTTRAIN_DISABLE_FUSED is set to anything but '', '0', 'false' or 'no'."""
    return os.environ.get(DISABLE_ENV_VAR, "").strip().lower() not in ("", "0", "false", "no")


def build_directory(name: str) -> Path:
    """Where the build named `name` is compiled and cached: $TORCH_EXTENSIONS_DIR/name, or the posttrain cache."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "posttrain" / "torch_extensions"
    return Path(root) / name


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on `directory`/posttrain.lock around `cpp_extension.load` (build or load).

    torch serialises builds with a baton: a plain file, `directory`/lock, that every load creates and deletes
    (ninja checks the build even when nothing is stale). A process killed in between (a SIGKILLed run) leaves the
    file behind, and every later load in that directory waits for it forever. An flock dies with its holder, so
    while this one is held no other posttrain process is inside torch's load: a baton file found then is such a
    leftover and is removed."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "posttrain.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            baton = directory / "lock"
            if baton.exists():
                logger.warning("removing %s, left by a process killed while it built or loaded the extension", baton)
                baton.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_failure() -> str | None:
    """The full error text of this process's failed build (compiler output included), or None."""
    return _failure


def load_fused_extension() -> FusedExtension | None:
    """Build (first time) or load the fused log-prob extension; None, after one warning, if that fails."""
    global _extension, _failure
    with _lock:
        if _extension is not None or _failure is not None:
            return _extension
        try:
            _extension = _build_and_load()
        except Exception as error:  # any failure (compiler, ninja, headers, dlopen) means: use the reference
            _failure = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"posttrain fused log-prob kernel unavailable ({_summarise(_failure)}); linear_logprobs(fused=True) "
                "falls back to the PyTorch reference, which materialises the [N, V] logits. Full build log: "
                f"posttrain.ops.build.build_failure(). Set {DISABLE_ENV_VAR}=1 to choose the reference silently.",
                RuntimeWarning,
                stacklevel=3,
            )
        return _extension


def _build_and_load() -> FusedExtension:
    import torch
    from torch.utils import cpp_extension

    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    relative_sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    sources = [SOURCE_DIR / relative for relative in relative_sources]
    missing = [str(path) for path in sources if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"extension sources not found: {missing} (posttrain/csrc/ ships inside the package)")
    # Separate names keep the CPU-only and CUDA builds from overwriting each other's cache.
    name = "posttrain_fused_logprobs_cuda" if with_cuda else "posttrain_fused_logprobs"
    directory = build_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("loading fused log-prob extension %s (compiles on first use, cached in %s)", name, directory)
    # -fopenmp: at::parallel_for is an inline OpenMP template (without it the kernel runs on one thread), and it
    # enables the kernel's `omp simd` loops; -fno-trapping-math (as torch itself uses) lets them vectorise.
    with build_lock(directory):
        library_path = cpp_extension.load(
            name=name,
            sources=[str(path) for path in sources],
            extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math"],
            extra_cuda_cflags=["-O3"],
            build_directory=str(directory),
            with_cuda=with_cuda,
            is_python_module=False,  # the library only registers torch ops; loading it is enough
        )
    return FusedExtension(str(library_path), frozenset({"cpu", "cuda"} if with_cuda else {"cpu"}))


def _summarise(error_text: str) -> str:
    """First line of the error plus the first compiler 'error' line, if any, to keep the warning readable."""
    lines = [line.strip() for line in error_text.splitlines() if line.strip()]
    first_error = next((line for line in lines[1:] if "error" in line.lower()), None)
    return lines[0] + (f" ... {first_error}" if first_error else "") if lines else "unknown error"
