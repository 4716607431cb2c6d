"""The SFT -> DPO -> RLVR pipeline (posttrain/pipeline.py): config checks, resume, table, and a tiny run end to end."""

import json

import pytest
from helpers import compose_config, run_posttrain

from posttrain import pipeline
from posttrain.errors import ConfigError


def pipeline_config(tmp_path, *overrides):
    return compose_config(["algo=pipeline", f"run_dir={tmp_path / 'pipe'}", *overrides])


def test_default_pipeline_chains_sft_dpo_rlvr(tmp_path):
    cfg = pipeline_config(tmp_path)
    assert [stage.name for stage in cfg.algo.stages] == ["sft", "dpo", "rlvr"]
    for stage in cfg.algo.stages:  # every stage's overrides compose into a valid config of its algorithm
        stage_cfg = compose_config([*stage.overrides, f"run_dir={tmp_path / stage.name}"])
        assert stage_cfg.algo.name == stage.name


@pytest.mark.parametrize(
    "stages, message",
    [
        ("[]", "algo.stages is empty"),
        ("[{name: a, overrides: []}, {name: a, overrides: []}]", "must be unique"),
        ("[{name: a, overrides: ['run_dir=x']}]", "sets \\['run_dir=x'\\]"),
    ],
)
def test_bad_stage_lists_fail_before_anything_runs(tmp_path, stages, message):
    cfg = pipeline_config(tmp_path, f"algo.stages={stages}")
    with pytest.raises(ConfigError, match=message):
        pipeline.main(cfg)
    assert not (tmp_path / "pipe").exists()


def fake_stage_runner(calls):
    """Stands in for the stage / eval processes: writes what they would and records the commands."""

    def run_logged(command, log_path, what):
        calls.append(what)
        if what.startswith("stage"):
            run_dir = next(a.split("=", 1)[1] for a in command if a.startswith("run_dir="))
            (pipeline.Path(run_dir) / "final").mkdir(parents=True)
            (pipeline.Path(run_dir) / "final" / "config.json").write_text("{}")
            (pipeline.Path(run_dir) / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
            first_stage = run_dir.endswith("sft")  # starts from the model config; later stages from the previous final/
            assert ("model.path=" in " ".join(command)) != first_stage
        else:
            out = pipeline.Path(command[command.index("--out") + 1])
            accuracy = 0.1 * len(calls)
            out.write_text(
                json.dumps(
                    {"tasks": {"arithmetic": {"num_prompts": 8, "pass@1": accuracy, "greedy_accuracy": accuracy}}}
                )
            )

    return run_logged


def test_a_rerun_skips_finished_stages_and_tables_every_stage(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(pipeline, "run_logged", fake_stage_runner(calls))
    cfg = pipeline_config(tmp_path)
    root = pipeline.main(cfg)
    assert calls == ["stage sft", "eval sft", "stage dpo", "eval dpo", "stage rlvr", "eval rlvr"]
    summary = json.loads((root / "pipeline.json").read_text())
    assert [row["stage"] for row in summary["stages"]] == ["sft", "dpo", "rlvr"]
    assert [row["arithmetic/pass@1"] for row in summary["stages"]] == pytest.approx([0.2, 0.4, 0.6])
    table = capsys.readouterr().out
    assert "arithmetic/pass@1" in table and "rlvr" in table
    # Killed after the DPO stage trained but before its eval: the rerun only evaluates DPO and runs RLVR.
    (root / "dpo" / "eval.json").unlink()
    for name in ("final", "eval.json"):
        path = root / "rlvr" / name
        path.unlink() if path.is_file() else __import__("shutil").rmtree(path)
    calls.clear()
    pipeline.main(cfg)
    assert calls == ["eval dpo", "stage rlvr", "eval rlvr"]


def test_a_failing_stage_names_its_log(tmp_path):
    cfg = pipeline_config(tmp_path, "algo.stages=[{name: broken, overrides: ['optim.lrr=1']}]")
    with pytest.raises(pipeline.StageFailed, match=r"stage broken failed \(exit \d+\); full log: .*broken/stage.log"):
        pipeline.main(cfg)


@pytest.mark.integration
def test_tiny_pipeline_end_to_end_writes_table_json_and_plot(tmp_path):
    """The real thing at a toy budget through the CLI: three stage processes, three evals, the table and the PNG."""

    def stage(name, *overrides):
        quoted = ", ".join(f"'{o}'" for o in overrides)
        return f"{{name: {name}, overrides: [{quoted}]}}"

    stages = (
        "["
        + ", ".join(
            [
                stage("sft", "algo=sft", "train.max_steps=20", "data.num_train=320", "data.num_eval=0"),
                stage("dpo", "recipe=tiny_dpo", "train.max_steps=3", "data.num_train=48", "data.num_eval=0"),
                stage(
                    "rlvr",
                    "algo=rlvr",
                    "train.max_steps=2",
                    "algo.prompts_per_step=4",
                    "algo.sampling.n=4",
                    "algo.sampling.max_tokens=16",
                    "data.num_eval=0",
                    "rollout=hf",
                ),
            ]
        )
        + "]"
    )
    result = run_posttrain(
        "algo=pipeline",
        f"run_dir={tmp_path / 'pipe'}",
        f"algo.stages={stages}",
        "algo.eval.num=8",
        "algo.eval.sampling.samples=2",
        "algo.eval.sampling.max_tokens=16",
        "algo.eval.backend=hf",
        "logger.progress_bar=false",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    root = tmp_path / "pipe"
    summary = json.loads((root / "pipeline.json").read_text())
    assert [row["stage"] for row in summary["stages"]] == ["sft", "dpo", "rlvr"]
    assert all(0.0 <= row["arithmetic/pass@1"] <= 1.0 for row in summary["stages"])
    assert (root / "rlvr" / "final" / "model.safetensors").is_file()
    assert (root / "pipeline.png").stat().st_size > 1000
    assert "arithmetic/pass@1" in result.stdout
