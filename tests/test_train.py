"""train_ddp.py through real torchrun processes on the CPU (gloo) with the small BLIP.

Each run trains for a few optimizer steps on the RSICD fixture. The whole file took 2 min 20 s
on two CPU cores (pytest, torch 2.14.1). Every subprocess has a timeout, so a hung
collective fails the test instead of stalling it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, RSICD_MINI

import train_ddp

TORCHRUN = Path(sys.executable).with_name("torchrun")
RUN_TIMEOUT_S = 180


def train_command(model_dir: Path, output_dir: Path, *flags: str, nproc: int = 2) -> list[str]:
    launcher = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    common = ["--model", str(model_dir), "--data", str(RSICD_MINI), "--output-dir", str(output_dir),
              "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--log-every", "1"]
    return launcher + [str(REPO / "train_ddp.py")] + common + list(flags)


def train(model_dir: Path, output_dir: Path, *flags: str, nproc: int = 2) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(model_dir, output_dir, *flags, nproc=nproc), cwd=REPO,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def load_last(output_dir: Path) -> dict:
    return torch.load(output_dir / "last.pt", map_location="cpu", weights_only=True)


def read_scalars(output_dir: Path):
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(str(output_dir / "tensorboard"))
    accumulator.Reload()
    return accumulator


def worker_pids(launcher_pid: int) -> list[int]:
    """Return the direct children of the torchrun process: one worker per rank."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def wait_for_text(path: Path, text: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            pytest.fail(f"training exited with {process.returncode} before {text!r}:\n{path.read_text()[-4000:]}")
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"no {text!r} in the training log after {timeout_s} s")


@pytest.fixture(scope="module")
def two_rank_run(small_model_dir, tmp_path_factory) -> Path:
    """Eight steps on two ranks, validating every two steps with a fast-reacting plateau scheduler."""
    output_dir = tmp_path_factory.mktemp("two-rank-run")
    train(small_model_dir, output_dir, "--max-steps", "8", "--eval-every", "2", "--lr", "1e-3",
          "--lr-plateau-patience", "0", "--lr-plateau-factor", "0.5")
    return output_dir


def test_two_ranks_lower_training_loss(two_rank_run):
    losses = [event.value for event in read_scalars(two_rank_run).Scalars("train/loss")]
    assert len(losses) == 8
    assert losses[-1] < losses[0]


def test_two_ranks_write_outputs(two_rank_run):
    assert (two_rank_run / "last.pt").is_file()
    assert (two_rank_run / "best" / "model.safetensors").is_file()
    assert (two_rank_run / "best" / "processor_config.json").is_file()
    assert not (two_rank_run / "best.tmp").exists()
    assert not (two_rank_run / "last.pt.tmp").exists()


def test_tensorboard_tags(two_rank_run):
    accumulator = read_scalars(two_rank_run)
    scalar_tags = set(accumulator.Tags()["scalars"])
    for tag in ["train/loss", "train/lr", "train/grad_norm", "train/loss_scale", "train/pairs_per_sec",
                "train/skipped_steps", "val/loss"]:
        assert tag in scalar_tags, tag
    assert len(accumulator.Scalars("val/loss")) == 4
    assert "_hparams_/experiment" in accumulator.PluginTagToContent("hparams")


def test_checkpoint_contents(two_rank_run):
    checkpoint = load_last(two_rank_run)
    assert checkpoint["train_state"]["global_step"] == 8
    assert checkpoint["train_state"]["step_in_epoch"] == 8
    assert len(checkpoint["rng"]) == 2
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    assert checkpoint["args"]["max_steps"] == 8


def test_ranks_same_lr_after_validation(two_rank_run):
    history = load_last(two_rank_run)["train_state"]["lr_history"]
    assert [step for step, _ in history] == [2, 4, 6, 8]
    for step, lrs in history:
        assert len(lrs) == 2, step
        assert lrs[0] == lrs[1], step
        assert 0 < lrs[0] <= 1e-3, step


def test_best_model_captions_image(two_rank_run):
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    import data as data_lib

    model = BlipForConditionalGeneration.from_pretrained(two_rank_run / "best")
    processor = BlipProcessor.from_pretrained(two_rank_run / "best")
    image = data_lib.load_splits(str(RSICD_MINI), ["test"])["test"].load_image(0)
    assert isinstance(image, Image.Image)
    inputs = processor(images=image, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=12)
    assert generated.shape[0] == 1
    assert generated.shape[1] > 1
    assert isinstance(processor.decode(generated[0], skip_special_tokens=True), str)


def test_best_model_loads_in_pipeline(two_rank_run):
    from transformers import pipeline

    import data as data_lib

    # transformers 5 replaced the "image-to-text" task with "image-text-to-text" (the old name
    # still maps to it, but its deprecation warning fails to format under pytest's log capture).
    # The text argument is the prompt, and an empty one requests a plain caption.
    captioner = pipeline("image-text-to-text", model=str(two_rank_run / "best"))
    image = data_lib.load_splits(str(RSICD_MINI), ["test"])["test"].load_image(0)
    output = captioner(image, text="", max_new_tokens=12)
    assert len(output) == 1
    assert isinstance(output[0]["generated_text"], str)
    assert output[0]["generated_text"].strip()


def test_resume_matches_straight_run(small_model_dir, tmp_path):
    flags = ["--eval-every", "3", "--lr", "1e-3", "--lr-plateau-patience", "0"]
    train(small_model_dir, tmp_path / "straight", "--max-steps", "6", *flags)
    train(small_model_dir, tmp_path / "split", "--max-steps", "3", *flags)
    train(small_model_dir, tmp_path / "split", "--max-steps", "6", "--resume", "auto", *flags)

    straight, split = load_last(tmp_path / "straight"), load_last(tmp_path / "split")
    assert split["train_state"]["global_step"] == 6
    assert straight["train_state"]["lr_history"] == split["train_state"]["lr_history"]
    assert straight["model"].keys() == split["model"].keys()
    different = [name for name in straight["model"] if not torch.equal(straight["model"][name], split["model"][name])]
    assert different == []


def test_fp16_overflow_step_skipped(small_model_dir, tmp_path):
    # A loss scale of 1e30 overflows the fp16 gradients of the first step for certain.
    train(small_model_dir, tmp_path, "--max-steps", "1", "--precision", "fp16", "--init-loss-scale", "1e30")

    checkpoint = load_last(tmp_path)
    initial = load_file(small_model_dir / "model.safetensors")
    assert checkpoint["train_state"]["skipped_steps"] == 1
    assert checkpoint["scaler"]["scale"] < 1e30
    changed = [name for name, value in initial.items() if not torch.equal(value, checkpoint["model"][name])]
    assert changed == []
    assert checkpoint["optimizer"]["state"] == {}


def test_grad_accum_matches_single_batch(small_model_dir, tmp_path):
    flags = ["--max-steps", "1", "--max-grad-norm", "0"]
    train(small_model_dir, tmp_path / "8x1", *flags, "--batch-size", "8", "--grad-accum", "1")
    train(small_model_dir, tmp_path / "2x4", *flags, "--batch-size", "2", "--grad-accum", "4")

    # AdamW's first update is nearly sign(gradient), which hides a wrongly scaled loss, so the
    # logged loss and gradient norm are compared first.
    one_batch, accumulated = read_scalars(tmp_path / "8x1"), read_scalars(tmp_path / "2x4")
    assert accumulated.Scalars("train/loss")[0].value == pytest.approx(one_batch.Scalars("train/loss")[0].value,
                                                                       rel=1e-6)
    assert accumulated.Scalars("train/grad_norm")[0].value == pytest.approx(
        one_batch.Scalars("train/grad_norm")[0].value, rel=1e-5)

    # Padding to a different length changes fp32 rounding, and AdamW divides by |gradient|, so
    # weights with near-zero gradients can differ by a small part of the learning rate (1e-5).
    one_batch, accumulated = load_last(tmp_path / "8x1")["model"], load_last(tmp_path / "2x4")["model"]
    initial = load_file(small_model_dir / "model.safetensors")
    largest_update = max((one_batch[name] - value).abs().max().item() for name, value in initial.items())
    largest_difference = max((one_batch[name] - accumulated[name]).abs().max().item() for name in initial)
    assert largest_update > 5e-6
    assert largest_difference < 1e-6


def test_sigusr1_checkpoints_and_requeues(small_model_dir, tmp_path):
    output_dir = tmp_path / "run"
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(train_command(small_model_dir, output_dir, "--max-steps", "1000"), cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_text(log_path, "step 3/", process, timeout_s=120)
        # Only rank 1 gets the signal: rank 0 must still stop at the same step boundary.
        os.kill(worker_pids(process.pid)[1], signal.SIGUSR1)
        process.wait(timeout=120)
    finally:
        process.kill()
    log_text = log_path.read_text()

    marker = json.loads((output_dir / "requeue.json").read_text())
    assert marker["exit_code"] == train_ddp.REQUEUE_EXIT_CODE
    assert marker["signals_by_rank"] == [None, "SIGUSR1"]
    # torchrun exits 1 on any failed worker, but its report lists each worker's own status.
    assert process.returncode != 0
    assert log_text.count(f"exitcode  : {train_ddp.REQUEUE_EXIT_CODE} ") == 2

    stopped_at = load_last(output_dir)["train_state"]["global_step"]
    assert stopped_at == marker["global_step"]
    assert 3 <= stopped_at < 1000
    train(small_model_dir, output_dir, "--max-steps", str(stopped_at + 1), "--resume", "auto")
    assert load_last(output_dir)["train_state"]["global_step"] == stopped_at + 1
    assert not (output_dir / "requeue.json").exists()


def test_single_process_sigterm_exit_status(small_model_dir, tmp_path):
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(train_command(small_model_dir, tmp_path, "--max-steps", "1000", nproc=1),
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_text(log_path, "step 2/", process, timeout_s=120)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        process.kill()
    assert process.returncode == train_ddp.REQUEUE_EXIT_CODE
    assert load_last(tmp_path)["train_state"]["global_step"] >= 2


def test_data_error_stops_every_rank(small_model_dir, tmp_path):
    command = train_command(small_model_dir, tmp_path, "--max-steps", "1")
    command[command.index(str(RSICD_MINI))] = str(tmp_path / "missing")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode != 0
    assert "[rank 0] ERROR rsicd_blip.train: --data" in result.stderr
    assert "[rank 1] ERROR rsicd_blip.train: --data" in result.stderr
    assert "DataError" not in result.stderr  # the message alone, no worker traceback


def test_missing_model_folder_message(tmp_path):
    command = train_command(tmp_path / "no-such-model", tmp_path / "out", "--max-steps", "1", nproc=1)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == train_ddp.ERROR_EXIT_CODE
    assert f"ERROR rsicd_blip.train: --model {tmp_path / 'no-such-model'}: could not load" in result.stderr
    assert "model.py init-small" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_processes_train_and_resume(small_model_dir, tmp_path):
    # DataLoader workers start through forkserver and stay up across epochs.
    first = train(small_model_dir, tmp_path, "--max-steps", "4", "--epochs", "2", "--num-workers", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = train(small_model_dir, tmp_path, "--max-steps", "6", "--epochs", "2", "--num-workers", "2",
                    "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "steps 5 to 6 in this run" in resumed.stderr
    assert load_last(tmp_path)["train_state"]["global_step"] == 6


def test_early_stopping_after_patience(small_model_dir, tmp_path):
    # With --lr 0 the weights never change, so no validation after the first one improves.
    result = train(small_model_dir, tmp_path, "--lr", "0", "--eval-every", "1", "--early-stopping-patience", "2",
                   "--max-steps", "10", nproc=1)
    history = load_last(tmp_path)["train_state"]["lr_history"]
    assert [step for step, _ in history] == [1, 2, 3]
    assert "finished at step 3 (early stop)" in result.stderr


def test_nonfinite_losses_stop_run(small_model_dir, tmp_path):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    broken_dir = tmp_path / "nan-model"
    model = BlipForConditionalGeneration.from_pretrained(small_model_dir)
    with torch.no_grad():
        model.text_decoder.cls.predictions.decoder.weight[0, 0] = float("nan")
    model.save_pretrained(broken_dir)
    BlipProcessor.from_pretrained(small_model_dir).save_pretrained(broken_dir)

    command = train_command(broken_dir, tmp_path / "out", "--max-steps", "10", "--max-nonfinite-steps", "2", nproc=1)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == train_ddp.ERROR_EXIT_CODE
    assert "non-finite loss at step 1" in result.stderr
    assert "2 optimizer steps in a row had a non-finite loss or gradient, the last at step 2" in result.stderr
    assert "Traceback" not in result.stderr
