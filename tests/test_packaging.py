"""A built wheel works outside the checkout: configs (pkg://posttrain.conf) and kernel sources ship inside it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, cli_env

pytestmark = pytest.mark.integration

NOT_SOURCES = shutil.ignore_patterns(
    ".git", "runs", "outputs", "multirun", "wandb", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"
)


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_installed_in_a_fresh_venv_trains_from_an_unrelated_directory(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_SOURCES)  # build from a copy: no build/ in the checkout
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "-q"])
    (wheel,) = (tmp_path / "dist").glob("posttrain-*.whl")
    venv = tmp_path / "venv"
    # torch and the other dependencies come from this interpreter's site-packages; only posttrain from the wheel.
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    python, posttrain = venv / "bin" / "python", venv / "bin" / "posttrain"
    _run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)])

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in cli_env().items() if key != "PYTHONPATH"}
    env.pop("POSTTRAIN_CONF_DIR", None)
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")
    site = _run([str(python), "-c", "import posttrain; print(posttrain.__file__)"], cwd=elsewhere, env=env).stdout
    assert Path(site.strip()).is_relative_to(venv), site

    help_text = _run([str(posttrain), "--help"], cwd=elsewhere, env=env).stdout
    assert "Usage: posttrain" in help_text and "tiny_dpo" in help_text and "_schema" not in help_text

    run_dir = elsewhere / "run"
    overrides = ["train.max_steps=2", "data.num_train=64", "data.num_eval=8", "logger.progress_bar=false"]
    _run([str(posttrain), *overrides, f"run_dir={run_dir}"], cwd=elsewhere, env=env)
    assert (run_dir / "final" / "model.safetensors").exists()
    assert '"step": 2' in (run_dir / "metrics.jsonl").read_text()
    # The fused kernel was compiled from the sources inside the installed package.
    (build_file,) = (tmp_path / "extensions").glob("*/build.ninja")
    assert str(venv) in build_file.read_text() and str(REPO) not in build_file.read_text()
