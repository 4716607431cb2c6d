"""The native ZIP-FIT sizes (csrc/zipfit_ncd.cpp): lazy build with `torch.utils.cpp_extension.load`, one warning
if that fails, and an environment switch to the Python scorer.

`load_native_sizes()` returns the compiled module, whose `compressed_sizes(chunks, rows, level, window_bits,
mem_level, threads=1)` gives (C(t) [chunks], C(x) [rows], C(t x) [chunks, rows]) as int64 numpy arrays, the
sizes `CompressionScorer` computes from Python, byte for byte (same zlib calls, same order). The first call
compiles it (~10-20 s once; a C++ compiler, ninja and zlib's header and library needed), cached in
`$TORCH_EXTENSIONS_DIR/posttrain_zipfit_ncd` (default `~/.cache/posttrain/torch_extensions/...`). A failed build
warns once, naming the reason, and returns None: the Python scorer is used. POSTTRAIN_DISABLE_ZIPFIT_NATIVE=1
chooses the Python scorer silently.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

DISABLE_ENV_VAR = "POSTTRAIN_DISABLE_ZIPFIT_NATIVE"
SOURCE = "zipfit_ncd.cpp"  # in posttrain/csrc/ (package data; the checkout's csrc/ links there)
EXTENSION_NAME = "posttrain_zipfit_ncd"

_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None  # full error text of a failed build; set at most once per process


def native_disabled_by_env() -> bool:
    """True when POSTTRAIN_DISABLE_ZIPFIT_NATIVE is set to anything but '', '0', 'false' or 'no'."""
    return os.environ.get(DISABLE_ENV_VAR, "").strip().lower() not in ("", "0", "false", "no")


def build_failure() -> str | None:
    """The full error text of this process's failed build (compiler output included), or None."""
    return _failure


def load_native_sizes() -> ModuleType | None:
    """The compiled module (built the first time), or None: disabled by the environment, or the build failed
    (warned once per process)."""
    global _module, _failure
    if native_disabled_by_env():
        return None
    with _lock:
        if _module is not None or _failure is not None:
            return _module
        try:
            _module = _build_and_load()
        except Exception as error:  # any failure (compiler, ninja, zlib missing, dlopen) means: the Python scorer
            from posttrain.ops.build import _summarise  # the fused kernel's loader words its warning the same way

            _failure = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"native ZIP-FIT scorer unavailable ({_summarise(_failure)}); ZIP-FIT uses the Python scorer (same "
                "selections, slower: ~1.2x with --codec zlib, ~25x with the default fixed codec). Full build log: "
                f"data_recipes.zipfit_native.build_failure(). Set {DISABLE_ENV_VAR}=1 to choose the Python scorer "
                "silently.",
                RuntimeWarning,
                stacklevel=3,
            )
        return _module


def _build_and_load() -> ModuleType:
    from torch.utils import cpp_extension

    import posttrain
    from posttrain.ops.build import build_directory, build_lock

    source = Path(posttrain.__file__).resolve().parent / "csrc" / SOURCE
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found (posttrain/csrc/ ships inside the package)")
    directory = build_directory(EXTENSION_NAME)
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("loading the native ZIP-FIT scorer (compiles on first use, cached in %s)", directory)
    with build_lock(directory):  # a killed process's leftover baton would block this load forever
        return cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(source)],
            extra_cflags=["-O3"],
            extra_ldflags=["-lz"],
            build_directory=str(directory),
            with_cuda=False,
        )
