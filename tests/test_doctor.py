"""`posttrain doctor`: the table, exit statuses, GPU checks marked not run on CPU, kernel dispatch, the
CPU twin of the kernel, the all-reduce check's code path over gloo, and the kernel half's imports."""

import subprocess
import sys

import pytest
import torch
from helpers import REPO, cli_env

from posttrain import doctor
from posttrain.doctor import kernel, stack
from posttrain.doctor.report import FAILED, NOT_RUN, OK, Check, CheckResult, NotRun, render_table, run_checks


def passes(context):
    context["passed"] = True
    return "fine"


def fails(context):
    raise ValueError("the kernel returned\nnan")


def declines(context):
    raise NotRun("flash_attn is not importable")


def test_table_lists_every_check_with_its_result_and_a_summary():
    results = [
        CheckResult("kernel-cpu", OK, "within tolerance", 1.34),
        CheckResult("nccl", NOT_RUN, "needs a GPU"),
        CheckResult("sft", FAILED, "AssertionError: the loss did not fall", 12.0),
    ]
    lines = render_table(results).splitlines()
    assert lines[0].split("|")[1:4] == [" check      ", " result  ", " seconds "]
    assert lines[2] == "| kernel-cpu | ok      | 1.3     | within tolerance |"
    assert lines[3] == "| nccl       | not run |         | needs a GPU |"  # no time for what did not run
    assert lines[4] == "| sft        | FAIL    | 12.0    | AssertionError: the loss did not fall |"
    assert lines[-1] == "1 ok, 1 failed, 1 not run"


def test_failures_gpu_checks_prerequisites_and_declines():
    checks = [
        Check("a", passes),
        Check("b", fails),
        Check("c", passes, needs_gpu=True),
        Check("d", passes, after=("b",)),
        Check("e", declines),
        Check("f", passes, after=("a",)),
    ]
    context = {}
    results = {r.name: r for r in run_checks(checks, gpus=0, context=context)}
    assert {name: r.status for name, r in results.items()} == {
        "a": OK, "b": FAILED, "c": NOT_RUN, "d": NOT_RUN, "e": NOT_RUN, "f": OK,
    }  # fmt: skip
    assert results["b"].detail == "ValueError: the kernel returned nan"  # one line
    assert results["c"].detail == "needs a GPU" and results["d"].detail == "needs b to pass first"
    assert results["e"].detail == "flash_attn is not importable" and context == {"gpus": 0, "passed": True}
    assert run_checks([Check("c", passes, needs_gpu=True)], gpus=1)[0].status == OK


def test_exit_status_is_one_exactly_when_a_check_fails(capsys):
    assert doctor.main([], checks=[Check("a", passes), Check("c", fails, needs_gpu=True)], gpus=0) == 0
    assert "| c " in capsys.readouterr().out
    assert doctor.main([], checks=[Check("a", passes), Check("b", fails)], gpus=0) == 1
    assert doctor.main(["--skip", "b"], checks=[Check("a", passes), Check("b", fails)], gpus=0) == 0
    with pytest.raises(SystemExit) as error:
        doctor.main(["--skip", "nope"], checks=[Check("a", passes)], gpus=0)
    assert error.value.code == 2


def test_every_gpu_check_is_marked_not_run_without_a_gpu():
    skipped = [check.name for check in doctor.CHECKS if not check.needs_gpu]
    results = run_checks(doctor.CHECKS, gpus=0, skip=skipped)
    gpu_rows = [r for r in results if r.name not in skipped]
    assert {r.name for r in gpu_rows} == {
        "kernel-cuda",
        "kernel-speed",
        "flash-attn",
        "vllm-sleep",
        "nccl",
        "rlvr",
        "sharded-load",
    }
    assert all(r.status == NOT_RUN and r.detail == "needs a GPU" for r in gpu_rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU build's dispatch")
def test_kernel_dispatch_on_a_cpu_build(monkeypatch):
    assert kernel.kernel_path("cpu") == "fused"
    assert kernel.kernel_path("cuda") == "reference (the build has no cuda kernel)"
    with pytest.raises(AssertionError, match="would use the reference \\(the build has no cuda kernel\\) on cuda"):
        kernel.check_kernel_cuda({})
    monkeypatch.setenv("POSTTRAIN_DISABLE_FUSED", "1")
    assert kernel.kernel_path("cpu") == "reference (POSTTRAIN_DISABLE_FUSED is set)"


def test_kernel_cpu_twin_matches_the_reference_and_a_broken_kernel_fails(monkeypatch):
    assert "values and 5 gradients within tolerance" in kernel.check_kernel_cpu({})
    from posttrain.ops import fused

    real = fused.fused_linear_logprobs

    def off_by_a_little(*args):
        logprobs, entropy = real(*args)
        return logprobs * 1.001, entropy

    monkeypatch.setattr(fused, "fused_linear_logprobs", off_by_a_little)
    with pytest.raises(AssertionError, match="logprobs of torch.float32 aligned .* the tolerance on cpu"):
        kernel.check_kernel_cpu({})


def test_kernel_only_doctor_runs_and_imports_nothing_beyond_torch():
    """`posttrain doctor --kernel-only` in a fresh process: exit 0, the table, and no vLLM / DeepSpeed / Hydra /
    transformers imported (a GPU box may lack them)."""
    code = (
        "import sys; from posttrain.doctor import main; status = main(['--kernel-only']); "
        "heavy = [m for m in ('vllm', 'deepspeed', 'hydra', 'transformers') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(status)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=cli_env(), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HEAVY []" in done.stdout
    assert "| kernel-cpu   | ok " in done.stdout
    assert "| kernel-cuda  | not run |" in done.stdout or torch.cuda.is_available()


@pytest.mark.distributed
def test_all_reduce_check_over_gloo_with_two_processes():
    """The NCCL check's code path (spawned ranks, an exact sum, a timed 64 MiB all-reduce) on gloo."""
    detail = stack.all_reduce_across(2, "gloo")
    assert detail.startswith("gloo across 2 processes: sums exact; 64 MiB all-reduce ")


def test_peak_own_memory_of_a_process_tree_sees_a_grandchild_allocation():
    """The sharded-load check's probe: a grandchild (bash -> python) holding 300 MiB is seen, an idle one is not,
    a failing command raises with its output."""
    allocate = "import time; block = b'x' * (300 << 20); time.sleep(0.5)"
    idle = "import time; time.sleep(0.5)"
    big, _ = stack.peak_anon_rss(["bash", "-c", f'{sys.executable} -c "{allocate}"; true'], {}, timeout=60)
    small, _ = stack.peak_anon_rss(["bash", "-c", f'{sys.executable} -c "{idle}"; true'], {}, timeout=60)
    assert big >= 300 << 20 and small < 100 << 20, (big >> 20, small >> 20)
    with pytest.raises(AssertionError, match="exited 3: boom"):
        stack.peak_anon_rss(["bash", "-c", "echo boom; exit 3"], {}, timeout=60)


def test_cleanup_closes_the_rollout_service_a_check_started_and_removes_the_work_dir():
    class Service:
        closed = 0

        def close(self):
            Service.closed += 1

    context = {"rollout": Service()}
    directory = stack.work_dir(context)
    assert directory.is_dir()
    stack.cleanup(context)
    assert Service.closed == 1 and "rollout" not in context and not directory.exists()
    stack.cleanup(context)  # twice: nothing left to close
    assert Service.closed == 1
