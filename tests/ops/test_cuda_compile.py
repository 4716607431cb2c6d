"""Compile checks of the CUDA sources in csrc/ on machines without a GPU.

Every .cu file includes only CUDA headers, so `nvcc -c` must compile it for Ampere (sm_80) and Hopper
(sm_90) with warnings as errors. The CUDA binding (.cpp) needs c10/cuda headers; CPU torch wheels ship them
without one generated header (c10/cuda/impl/cuda_cmake_macros.h), which is supplied here so the binding
can at least be type-checked (`-fsyntax-only`, no link) against the installed torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CUDA_SOURCES = sorted(CSRC.rglob("*.cu"))
CUDA_BINDINGS = sorted((CSRC / "cuda").glob("*.cpp"))
NVCC = shutil.which("nvcc")


def test_there_are_cuda_sources_to_check():
    assert CUDA_SOURCES, f"no .cu files under {CSRC}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda path: str(path.relative_to(CSRC)))
def test_cuda_source_compiles(source, arch, tmp_path):
    command = [NVCC, "-c", f"-arch={arch}", "-O3", "--Werror", "all-warnings", str(source)]
    command += ["-o", str(tmp_path / "k.o")]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, f"{' '.join(command)} failed:\n{completed.stdout}\n{completed.stderr}"
    assert (tmp_path / "k.o").stat().st_size > 0


def test_every_cuda_source_has_a_binding_and_is_built():
    from posttrain.ops import build

    built = set(build.CUDA_SOURCES)
    on_disk = {str(path.relative_to(CSRC)) for path in [*CUDA_SOURCES, *CUDA_BINDINGS]}
    assert CUDA_BINDINGS and on_disk == built, f"csrc/cuda files {sorted(on_disk)} vs build.CUDA_SOURCES {built}"


@pytest.mark.skipif(NVCC is None or shutil.which("c++") is None, reason="needs nvcc (CUDA headers) and c++")
@pytest.mark.parametrize("binding", CUDA_BINDINGS, ids=lambda path: path.name)
def test_cuda_binding_type_checks_against_installed_torch(binding, tmp_path):
    import torch.utils.cpp_extension as cpp_extension

    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    homes.append(Path(NVCC).resolve().parents[1])
    candidates = [Path(home) / "include" for home in homes if home]
    cuda_include = next((path for path in candidates if (path / "cuda_runtime_api.h").is_file()), None)
    if cuda_include is None:
        pytest.skip(f"no cuda_runtime_api.h in any of {candidates}")
    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [str(tmp_path), *cpp_extension.include_paths(), str(cuda_include), sysconfig.get_paths()["include"]]
    command = ["c++", "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", *(f"-I{path}" for path in includes)]
    command.append(str(binding))
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, f"{' '.join(command)} failed:\n{completed.stderr[-4000:]}"
