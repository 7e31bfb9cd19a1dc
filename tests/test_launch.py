"""launch.sh: the offline demo, and sbatch on a real one-node SLURM cluster started on localhost."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, RSICD_MINI


def launch_env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHON=sys.executable)
    env.update(extra)
    return env


def training_losses(event_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(event_dir))
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars("train/loss")]


# ----------------------------------------------------------------------------- demo


def test_demo_writes_outputs_and_learns(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        ["bash", str(REPO / "launch.sh"), "demo"],
        cwd=REPO, env=launch_env(DEMO_OUTPUT=str(out), DEMO_MAX_STEPS="40", DEMO_EVAL_EVERY="20"),
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for path in ("untrained/config.json", "train/last.pt", "train/best/model.safetensors",
                 "eval/metrics.json", "eval/report.md", "eval/report.html"):
        assert (out / path).exists(), path
    assert f"{out}/eval/report.html" in result.stderr

    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert [entry["name"] for entry in metrics["models"]] == ["untrained", "trained"]
    assert metrics["num_images"] == 16

    losses = training_losses(out / "train" / "tensorboard")
    assert len(losses) >= 3
    assert losses[-1] < losses[0]


def test_local_run_trains_then_evaluates(small_model_dir, tmp_path):
    output = tmp_path / "run"
    flags = ["--model", str(small_model_dir), "--data", str(RSICD_MINI), "--output-dir", str(output),
             "--device", "cpu", "--batch-size", "4", "--max-steps", "3", "--num-workers", "0"]
    result = subprocess.run(["bash", str(REPO / "launch.sh"), *flags], cwd=REPO, env=launch_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    gpus = torch.cuda.device_count()
    assert f"training with torchrun on {max(gpus, 1)} process(es) ({gpus} GPU(s) visible)" in result.stderr
    assert torch.load(output / "last.pt", weights_only=True)["args"]["resume"] == "auto"
    metrics = json.loads((output / "eval" / "metrics.json").read_text())
    assert [entry["name"] for entry in metrics["models"]] == ["base", "finetuned"]
    assert metrics["models"][0]["model"] == str(small_model_dir)
    assert metrics["models"][1]["model"] == f"{output}/best"


# ----------------------------------------------------------------------------- SLURM


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster on localhost, with its own configuration and ports."""
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm munge; .ci/run does this)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root to run slurmd")
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, SLURMCTLD_PORT="6917", SLURMD_PORT="6918")
    subprocess.run(["bash", str(REPO / "tests" / "slurm" / "start_cluster.sh"), str(state)],
                   env=env, check=True, timeout=120)
    yield state / "slurm.conf"
    subprocess.run(["bash", str(REPO / "tests" / "slurm" / "start_cluster.sh"), "--stop", str(state)], timeout=60)


def sbatch(slurm_conf: Path, log: Path, flags: list[str]) -> str:
    result = subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=2", f"--output={log}", "launch.sh", *flags],
        cwd=REPO, env=launch_env(SLURM_CONF=str(slurm_conf)), capture_output=True, text=True, timeout=60,
        check=True,
    )
    return result.stdout.strip().split(";")[0]


def job_state(slurm_conf: Path, job_id: str) -> str:
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=launch_env(SLURM_CONF=str(slurm_conf)),
                            capture_output=True, text=True, timeout=30)
    return result.stdout.strip()


def wait_for(condition, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(2)
    text = log.read_text() if log.exists() else "(no log)"
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; job log:\n{text[-4000:]}")


def train_flags(small_model_dir: Path, output: Path, max_steps: int) -> list[str]:
    return ["--model", str(small_model_dir), "--data", str(RSICD_MINI), "--output-dir", str(output),
            "--device", "cpu", "--precision", "fp32", "--batch-size", "4", "--max-steps", str(max_steps),
            "--num-workers", "0", "--log-every", "1"]


def test_sbatch_trains_then_evaluates(slurm_cluster, small_model_dir, tmp_path):
    log = tmp_path / "job.out"
    output = tmp_path / "run"
    job_id = sbatch(slurm_cluster, log, train_flags(small_model_dir, output, 4))
    wait_for(lambda: job_state(slurm_cluster, job_id) == "", 600, f"job {job_id} to finish", log)

    text = log.read_text()
    assert re.search(rf"job {job_id} \(restart 0\): 1 node\(s\) x 1 process\(es\), rendezvous \S+:\d+", text)
    assert (output / "last.pt").exists()
    assert (output / "best" / "model.safetensors").exists()
    metrics = json.loads((output / "eval" / "metrics.json").read_text())
    assert [entry["name"] for entry in metrics["models"]] == ["base", "finetuned"]


def test_sbatch_preemption_requeues_and_resumes(slurm_cluster, small_model_dir, tmp_path):
    log = tmp_path / "job.out"
    output = tmp_path / "run"
    job_id = sbatch(slurm_cluster, log, train_flags(small_model_dir, output, 100_000))
    env = launch_env(SLURM_CONF=str(slurm_cluster))

    # SLURM's --signal=B:USR1@180 delivers SIGUSR1 to the batch script; scancel --batch does the same now.
    wait_for(lambda: (output / "tensorboard").exists() and "step" in log.read_text(), 300, "training to start", log)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=env, check=True, timeout=30)
    wait_for(lambda: "requeueing job" in log.read_text(), 300, "the requeue", log)
    # SLURM holds a requeued job back for a while (Reason=BeginTime); release it now.
    wait_for(lambda: job_state(slurm_cluster, job_id) == "PENDING", 120, "the job to be pending again", log)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], env=env, check=True, timeout=30)
    wait_for(lambda: f"job {job_id} (restart 1)" in log.read_text(), 600, "the requeued job to start", log)
    wait_for(lambda: "resum" in log.read_text().split("(restart 1)")[-1].lower(), 300, "the resume", log)
    subprocess.run(["scancel", job_id], env=env, check=True, timeout=30)
    wait_for(lambda: job_state(slurm_cluster, job_id) == "", 300, f"job {job_id} to end", log)

    text = log.read_text()
    assert text.count("SIGUSR1 received") == 1
    assert "SIGTERM received" in text
    assert f"job {job_id} (restart 2)" not in text
    checkpoint = torch.load(output / "last.pt", weights_only=True)
    assert checkpoint["train_state"]["global_step"] > 0


def test_slurm_unresolvable_head_host_fails(tmp_path):
    if shutil.which("scontrol") is None:
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm; .ci/run does this)")
    # scontrol only parses this configuration to expand the host list; no daemon is contacted.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost\nPartitionName=p Nodes=localhost\n")
    env = launch_env(SLURM_JOB_ID="12345", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NODELIST="no-such-host-rsicd",
                     SLURM_NNODES="2", SLURM_CONF=str(conf))
    env.pop("SLURM_STEP_ID", None)
    result = subprocess.run(["bash", str(REPO / "launch.sh"), "--output-dir", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "'no-such-host-rsicd', does not resolve" in result.stderr
    assert "will not fall back to localhost" in result.stderr
    assert not (tmp_path / "last.pt").exists()
