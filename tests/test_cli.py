"""The entry point as users meet it: config typos, bad input, sweeps, composition of every YAML."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import compose_config, run_posttrain
from omegaconf import OmegaConf

from posttrain.cli import CONF_DIR, run
from posttrain.config import undeclared_keys

FAST = ["data.num_train=64", "data.num_eval=8", "logger.progress_bar=false", "train.max_steps=2"]


def every_group_option():
    for group_dir in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        for option in sorted(group_dir.glob("*.yaml")):
            yield group_dir.name, option.stem


@pytest.mark.parametrize("group, option", list(every_group_option()))
def test_every_yaml_in_conf_composes(group, option, tmp_path):
    overrides = [f"{group}={option}", f"run_dir={tmp_path}"]
    if group == "model" and option == "hf":
        overrides.append("model.path=some/model")
    if group == "data" and option == "jsonl":
        overrides.append("data.train_files=[train.jsonl]")
    cfg = compose_config(overrides)
    assert undeclared_keys(cfg) == []
    if group == "recipe":  # recipes are global packages: they set keys across groups
        assert OmegaConf.load(CONF_DIR / group / f"{option}.yaml").defaults, "a recipe selects its algo / data groups"
        assert cfg.algo.name != "sft" or option.endswith("sft")
    else:
        assert cfg[group] is not None


def test_config_typo_fails_at_start_naming_the_key(tmp_path):
    result = run_posttrain("optim.lrr=1e-4", f"run_dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode != 0
    assert "lrr" in result.stderr and "OptimConfig" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# Each bad value, found before anything is read or written: (overrides, what the one error line says).
BAD_CONFIG_VALUES = {
    "negative_lr": (["optim.lr=-1"], "optim.lr=-1.0 must be >= 0"),
    "zero_micro_batch": (["train.micro_batch_size=0"], "train.micro_batch_size=0 must be >= 1"),
    "zero_accumulation": (["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps=0 must be >= 1"),
    "bogus_truncation": (["data.truncation=bogus"], "data.truncation='bogus' must be one of error, truncate, skip"),
    "bogus_loss_reduction": (["algo.loss_reduction=bogus"], "algo.loss_reduction='bogus' must be one of"),
    "cross_family_loss": (["algo=dpo", "algo.loss=bt"], "'bt' is a reward-model loss, not a preference-pair loss"),
    "missing_model_path": (["model.path={tmp}/no/such/model"], "model.path={tmp}/no/such/model is neither"),
    "not_a_model_dir": (["model.path={tmp}"], "model.path={tmp}: cannot load its tokenizer (the local directory"),
    "appended_unknown_key": (["+optim.lrr=1"], "unknown config key(s) optim.lrr: no schema"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIG_VALUES))
def test_bad_config_values_exit_2_before_anything_is_written(case, tmp_path, caplog):
    overrides, expected = BAD_CONFIG_VALUES[case]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("earlier: run\n")
    cfg = compose_config([o.format(tmp=tmp_path) for o in overrides] + [f"run_dir={run_dir}", *FAST])
    with pytest.raises(SystemExit) as exit_info:
        run(cfg)
    assert exit_info.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and expected.format(tmp=tmp_path) in errors[0], errors
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]
    assert (run_dir / "config.yaml").read_text() == "earlier: run\n"


# Through the CLI: Hydra composition errors and a late-found value, each one line on stderr and exit status 2.
CLI_ERRORS = {
    "unknown_algo": (
        ["algo=nope"],
        "unknown algo option 'nope' (algo=nope); known options: distill, dpo, gpo, online_dpo, pipeline",
    ),
    "unknown_recipe": (
        ["recipe=nope"],
        "unknown recipe option 'nope' (recipe=nope); known options: dapo_tiny, tiny_distill, tiny_dpo",
    ),
    "unknown_key": (["optim.lrr=1"], "Key 'lrr' not in 'OptimConfig'"),
    "appended_unknown_key": (["+optim.lrr=1"], "unknown config key(s) optim.lrr"),
    "bad_value": (["data.truncation=bogus"], "data.truncation='bogus' must be one of error, truncate, skip"),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_config_errors_are_one_line_with_exit_status_2(case, tmp_path):
    overrides, expected = CLI_ERRORS[case]
    result = run_posttrain(*overrides, f"run_dir={tmp_path / 'run'}", timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    assert "_schema" not in result.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # Hydra makes the dir, empty


def test_help_names_posttrain_and_lists_algorithms_and_recipes():
    from posttrain.trainers import load_algorithms

    result = run_posttrain("--help", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert text.startswith("posttrain: post-training") and "Usage: posttrain [group=option ...]" in text
    algorithms = text.split("== Algorithms (algo=NAME) ==")[1].split("==")[0]
    assert sorted(line.split()[0] for line in algorithms.strip().splitlines()) == load_algorithms().names()
    recipes = text.split("== Recipes")[1].split("== Config groups")[0]
    for recipe in (CONF_DIR / "recipe").glob("*.yaml"):
        assert f"  {recipe.stem} " in recipes
    assert "deepspeed  zero0, zero1, zero2, zero3, zero3_offload" in text
    assert "== Examples ==" in text and "posttrain recipe=tiny_dpo" in text
    assert "_schema" not in text and "cli" not in text.split()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


GOOD = {
    "messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "1 + 1 = 2\n#### 2"}]
}

BAD_INPUTS = {
    "missing_file": (None, "does not exist"),
    "no_messages": ([GOOD, {"text": "hello"}], 'row 2 of {file} has no "messages" field'),
    "unknown_role": (
        [GOOD, GOOD, {"messages": [{"role": "bot", "content": "x"}]}],
        "row 3 of {file}: message 0 has unknown role 'bot'",
    ),
    "no_assistant": (
        [{"messages": [{"role": "user", "content": "hi"}]}],
        "row 1 of {file}: the conversation has no assistant turn",
    ),
    "empty_dataset": ([], "the train data ({file}) holds no rows"),
    "too_long": (
        [GOOD, {"messages": [{"role": "user", "content": "7 " * 400}, {"role": "assistant", "content": "ok"}]}],
        "row 2 of {file} has",
    ),
    "bad_json": ([GOOD, "{not json"], "line 2 of {file} is not valid JSON"),
    "empty_assistant_turn": (
        [GOOD, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}],
        "row 2 of {file}: assistant message 1 is empty",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_one_clear_error_and_keeps_the_run_dir(case, tmp_path, caplog):
    rows, expected = BAD_INPUTS[case]
    data_file = tmp_path / "train.jsonl"
    if rows is not None:
        write_jsonl(data_file, rows)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run_dir / "config.yaml").write_text("earlier: run\n")
    cfg = compose_config(
        ["data=jsonl", f"data.train_files=[{data_file}]", "data.max_length=64", f"run_dir={run_dir}", *FAST]
    )
    with pytest.raises(SystemExit) as exit_info:
        run(cfg)
    assert exit_info.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and expected.format(file=data_file) in errors[0], errors
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert (run_dir / "config.yaml").read_text() == "earlier: run\n"


@pytest.mark.parametrize("case", ["directory", "non_utf8"])
def test_file_level_data_errors_are_one_line_and_keep_the_run_dir(case, tmp_path, caplog):
    data_file = tmp_path / "train.jsonl"
    if case == "directory":
        data_file.mkdir()
        expected = f"data file {data_file} is a directory"
    else:
        data_file.write_bytes(json.dumps(GOOD).encode() + b"\n" + json.dumps(GOOD).encode()[:-2] + b'\xff"}\n')
        expected = f"line 2 of {data_file} is not valid UTF-8 (byte 0xff"
    run_dir = tmp_path / "run"
    cfg = compose_config(["data=jsonl", f"data.train_files=[{data_file}]", f"run_dir={run_dir}", *FAST])
    with pytest.raises(SystemExit) as exit_info:
        run(cfg)
    assert exit_info.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and expected in errors[0], errors
    assert not run_dir.exists()


def test_bad_rows_can_be_skipped_and_counted(tmp_path):
    blank_answer = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
    data_file = write_jsonl(
        tmp_path / "train.jsonl",
        [GOOD] * 16 + [{"text": "x"}, {"messages": [{"role": "user", "content": "q"}]}, blank_answer, "{not json"],
    )
    from posttrain.data.loading import load_rows
    from posttrain.data.sft import build_sft_examples
    from posttrain.models.tokenizer import train_tokenizer

    cfg = compose_config(
        ["data=jsonl", f"data.train_files=[{data_file}]", "data.on_bad_row=skip", f"run_dir={tmp_path}"]
    )
    tokenizer = train_tokenizer(["What is 1 + 1? 2"], 300)
    examples, skipped = build_sft_examples(load_rows(cfg.data, "train"), tokenizer, cfg.data, "train")
    assert len(examples) == 16 and skipped.bad_row == 3  # the invalid JSON line is skipped (and logged) by load_rows


def test_bad_input_from_the_command_line_prints_no_traceback(tmp_path):
    result = run_posttrain(
        "data=jsonl", f"data.train_files=[{tmp_path / 'nope.jsonl'}]", f"run_dir={tmp_path / 'run'}", timeout=300
    )
    assert result.returncode == 2
    assert f"data file {tmp_path / 'nope.jsonl'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_multirun_sweep_gives_one_run_dir_per_job(tmp_path):
    result = run_posttrain("-m", "optim.lr=1e-3,3e-3", f"run_dir={tmp_path / 'sweep'}", *FAST, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        job_dir = tmp_path / "sweep" / job
        assert (job_dir / "final" / "model.safetensors").exists()
        config = yaml.safe_load((job_dir / "config.yaml").read_text())
        assert config["run_dir"] == str(job_dir)
    lrs = {yaml.safe_load((tmp_path / "sweep" / j / "config.yaml").read_text())["optim"]["lr"] for j in ("0", "1")}
    assert lrs == {1e-3, 3e-3}


CLOSE_WORLD = """
import torch.distributed as dist
from posttrain.cli import finished
from posttrain.engine.distributed import init_distributed
init_distributed()
status = int(__import__("sys").argv[1])
assert finished(status) == status
print("initialized" if dist.is_initialized() else "closed")
"""


@pytest.mark.parametrize(("status", "world"), [(0, "closed"), (2, "initialized")])
def test_a_successful_exit_closes_the_distributed_world_and_a_failed_one_leaves_it(status, world):
    """Gloo's threads left to interpreter shut-down can abort a finished rank (SIGABRT, seen in CI under torchrun):
    `main` closes the world after a success, and not after an error, when a peer may never reach the barrier."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, "-c", CLOSE_WORLD, str(status)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == world
