"""Fine-tune BLIP captioning on remote-sensing captions with DistributedDataParallel.

    torchrun --nproc_per_node=N train_ddp.py --data arampacha/rsicd --output-dir runs/blip
    python train_ddp.py ...        # one process, no torchrun

Every step is written out by hand where Hugging Face accelerate would hide it: the
sampler, autocast and GradScaler, `no_sync` on accumulation steps, rank-0-only logging,
checkpoints with every RNG, and a clean stop on SIGUSR1/SIGTERM.

Outputs in --output-dir:
  last.pt       full training state, `torch.load(weights_only=True)`; `--resume auto` reads it
  best/         lowest validation loss so far, `save_pretrained` model + processor
  tensorboard/  train/* and val/* scalars and the hyper-parameters (rank 0 only)

Exit status: 0 when training ends, 1 on an error (bad data, too many non-finite losses),
REQUEUE_EXIT_CODE (3) after a SIGUSR1 or SIGTERM stop that wrote last.pt. Under torchrun
the launcher reports any non-zero worker status as its own failure, so rank 0 also writes
`requeue.json` to the output folder on such a stop.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import data as data_lib
import model as model_lib
from distributed import (
    DEFAULT_TIMEOUT_S,
    DistributedContext,
    all_gather_objects,
    all_reduce_sum,
    setup_distributed,
    setup_logging,
    teardown_distributed,
)

LOG = logging.getLogger("rsicd_blip.train")

REQUEUE_EXIT_CODE = 3  # stopped by SIGUSR1/SIGTERM after writing last.pt: requeue and resume
ERROR_EXIT_CODE = 1
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
CHECKPOINT_NAME = "last.pt"
BEST_DIR_NAME = "best"
REQUEUE_MARKER_NAME = "requeue.json"
CHECKPOINT_FORMAT = 1
IGNORE_INDEX = -100  # label value of padding and prompt tokens (CaptionCollator)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(RuntimeError):
    """Training cannot go on as configured; the message states why and what to change."""


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])

    group = parser.add_argument_group("model and data")
    group.add_argument("--model", default=model_lib.DEFAULT_MODEL,
                       help="Hub id or save_pretrained folder (default: %(default)s)")
    group.add_argument("--data", default=data_lib.DEFAULT_DATA,
                       help="Hub data set id, local parquet or save_to_disk folder, or Karpathy JSON "
                            "(default: %(default)s)")
    group.add_argument("--output-dir", default="runs/blip",
                       help="folder for last.pt, best/ and tensorboard/ (default: %(default)s)")
    group.add_argument("--prompt", default="",
                       help="text put before every caption; its tokens get no loss (default: empty)")
    group.add_argument("--max-caption-tokens", type=int, default=data_lib.DEFAULT_MAX_CAPTION_TOKENS,
                       help="token limit per caption, including the decoder start token [DEC], the prompt "
                            "and [SEP]; longer ones are cut "
                            "(default: %(default)s)")
    group.add_argument("--dedupe-captions", action="store_true",
                       help="drop repeated captions of the same image (default: off)")
    group.add_argument("--skip-bad-images", action="store_true",
                       help="train without images that fail to decode instead of stopping with their list "
                            "(default: off)")
    group.add_argument("--max-image-pixels", type=int, default=data_lib.DEFAULT_MAX_IMAGE_PIXELS,
                       help="images with more pixels count as bad (default: %(default)s)")

    group = parser.add_argument_group("optimization")
    group.add_argument("--epochs", type=int, default=5, help="passes over the training pairs (default: %(default)s)")
    group.add_argument("--max-steps", type=int, default=0,
                       help="stop after this many optimizer steps in total, resumed steps included; "
                            "0 = no limit (default: 0)")
    group.add_argument("--batch-size", type=int, default=16,
                       help="(image, caption) pairs per rank per micro-batch (default: %(default)s)")
    group.add_argument("--grad-accum", type=int, default=1,
                       help="micro-batches per optimizer step; the global batch is batch-size x grad-accum x "
                            "ranks (default: %(default)s)")
    group.add_argument("--lr", type=float, default=1e-5,
                       help="AdamW learning rate; BLIP's caption fine-tuning uses 1e-5, the RSICD notebook "
                            "this project replaces used 5e-7, and fresh weights (model.py init-small) need "
                            "about 3e-4 (default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=0.05,
                       help="AdamW weight decay, not applied to biases and LayerNorm weights (default: %(default)s)")
    group.add_argument("--lr-plateau-factor", type=float, default=0.5,
                       help="ReduceLROnPlateau multiplies the learning rate by this factor (default: %(default)s)")
    group.add_argument("--lr-plateau-patience", type=int, default=1,
                       help="validations without improvement tolerated before the learning rate is reduced "
                            "(default: %(default)s)")
    group.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                       help="autocast compute type; weights stay fp32, and fp16 adds a GradScaler "
                            "(default: %(default)s)")
    group.add_argument("--init-loss-scale", type=float, default=2.0**16,
                       help="GradScaler's first loss scale, fp16 only (default: 65536, the torch default)")
    group.add_argument("--max-grad-norm", type=float, default=1.0,
                       help="clip the global gradient L2 norm to this value; 0 = no clipping, the norm is still "
                            "logged (default: %(default)s)")
    group.add_argument("--label-smoothing", type=float, default=0.1,
                       help="label smoothing of the training loss, as in BLIP's fine-tuning; validation never "
                            "smooths (default: %(default)s)")
    group.add_argument("--seed", type=int, default=42,
                       help="seed of the sample order and of every RNG; rank r seeds its own RNGs with seed + r "
                            "(default: %(default)s)")

    group = parser.add_argument_group("validation, stopping and checkpoints")
    group.add_argument("--eval-every", type=int, default=0,
                       help="validate every this many optimizer steps; 0 = at the end of every epoch (default: 0)")
    group.add_argument("--early-stopping-patience", type=int, default=3,
                       help="stop after this many validations without a lower loss; 0 = never (default: %(default)s)")
    group.add_argument("--max-nonfinite-steps", type=int, default=5,
                       help="stop after this many optimizer steps in a row with a NaN or infinite loss "
                            "(default: %(default)s)")
    group.add_argument("--resume", default=None,
                       help="'auto' continues from OUTPUT/last.pt when it exists, a path continues from that "
                            "checkpoint (default: start fresh)")
    group.add_argument("--log-every", type=int, default=10,
                       help="optimizer steps between log lines and TensorBoard points (default: %(default)s)")

    group = parser.add_argument_group("processes and loading")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="auto takes this rank's GPU when CUDA is available, else the CPU (default: %(default)s)")
    group.add_argument("--dist-timeout", type=int, default=DEFAULT_TIMEOUT_S,
                       help="seconds a collective waits for the other ranks before it fails (default: %(default)s)")
    group.add_argument("--num-workers", type=int, default=4,
                       help="DataLoader worker processes per rank (default: %(default)s)")
    group.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, default=True,
                       help="pin host memory of batches, CUDA only (default: on)")
    group.add_argument("--prefetch-factor", type=int, default=2,
                       help="batches each DataLoader worker loads ahead; needs --num-workers > 0 "
                            "(default: %(default)s)")

    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = ["epochs", "batch_size", "grad_accum", "log_every", "max_nonfinite_steps", "prefetch_factor"]
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    not_negative = ["max_steps", "eval_every", "early_stopping_patience", "num_workers", "max_grad_norm",
                    "lr_plateau_patience"]
    for name in not_negative:
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if not 0.0 <= args.label_smoothing < 1.0:
        parser.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")


# ----------------------------------------------------------------------------- stop signals


class StopRequest:
    """Record SIGUSR1/SIGTERM; the training loop acts on it at the next step boundary.

    The handler only sets a flag, because a signal can arrive inside a collective, and
    leaving it there would hang the other ranks.
    """

    def __init__(self):
        self.signal_name: str | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def ignore_further_signals(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


# ----------------------------------------------------------------------------- data


def load_data(args: argparse.Namespace, ctx: DistributedContext) -> dict[str, data_lib.CaptionSplit]:
    """Load train and valid, then drop the images that any rank's share of the scan could not decode."""
    splits = data_lib.load_splits(args.data, ["train", "valid"], dedupe=args.dedupe_captions,
                                  max_pixels=args.max_image_pixels)
    for name, split in splits.items():
        # Each rank decodes every world_size-th image. The gathered list is the same on all
        # ranks, so all of them keep the same rows or all stop with the same error.
        bad = data_lib.scan_sharded(split, ctx.rank, ctx.world_size, all_gather_objects)
        splits[name] = data_lib.drop_bad_images(split, bad, args.skip_bad_images)
        if len(splits[name]) == 0:
            raise data_lib.DataError(f"--data {args.data}: split {name} has no usable image left")
    return splits


class ResumableSampler(Sampler):
    """DistributedSampler that can start an epoch after the samples a resumed run already used.

    The order depends only on the seed and the epoch, so skipping the first samples of the
    epoch gives the resumed run exactly the batches the interrupted run would have seen next.
    """

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler
        self.skip = 0
        self.order: list[int] = []

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        self.order = list(self.sampler)
        return iter(self.order[self.skip:])

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


def build_train_loader(pairs: data_lib.CaptionPairs, collator, args: argparse.Namespace,
                       ctx: DistributedContext) -> DataLoader:
    # Disjoint shards that together cover every pair. DistributedSampler pads the last shard with
    # repeated pairs, so all ranks run the same number of steps, as accelerate's prepared DataLoader does.
    sampler = DistributedSampler(pairs, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=args.seed, drop_last=False)
    return DataLoader(
        pairs,
        batch_size=args.batch_size,
        sampler=ResumableSampler(sampler),
        collate_fn=collator,
        num_workers=args.num_workers,
        pin_memory=args.pin_memory and ctx.device.type == "cuda",
        prefetch_factor=args.prefetch_factor if args.num_workers > 0 else None,
        multiprocessing_context=data_lib.worker_start_method(args.num_workers),
        persistent_workers=args.num_workers > 0,  # start the workers once, not every epoch
        drop_last=False,
    )


def build_valid_loader(pairs: data_lib.CaptionPairs, collator, args: argparse.Namespace,
                       ctx: DistributedContext) -> DataLoader:
    # Every world_size-th pair, without DistributedSampler's padding, so no pair is counted twice.
    shard = Subset(pairs, range(ctx.rank, len(pairs), ctx.world_size))
    return DataLoader(shard, batch_size=args.batch_size, shuffle=False, collate_fn=collator,
                      num_workers=args.num_workers, pin_memory=args.pin_memory and ctx.device.type == "cuda",
                      multiprocessing_context=data_lib.worker_start_method(args.num_workers),
                      persistent_workers=args.num_workers > 0)


def describe_batch(loader: DataLoader, pairs: data_lib.CaptionPairs, batch_in_epoch: int) -> str:
    """Name the images of one training micro-batch of this rank, counted from the epoch's start."""
    start = batch_in_epoch * loader.batch_size
    indices = loader.sampler.order[start: start + loader.batch_size]
    names = [pairs.split.images[pairs.pairs[index][0]].filename for index in indices]
    return f"pairs {indices} (images {', '.join(names)})"


# ----------------------------------------------------------------------------- model and optimizer


def load_model_and_processor(source: str):
    """Load the processor and the fp32 model, turning a missing or broken model into a TrainingError."""
    try:
        processor = model_lib.load_processor(source)
        model = model_lib.load_model(source, torch.float32)
    except (OSError, ValueError) as error:
        raise TrainingError(
            f"--model {source}: could not load the model or its processor "
            f"({str(error).splitlines()[0]}). Pass a Hub id (needs the network, so not with "
            "HF_HUB_OFFLINE=1) or a folder written by save_pretrained, such as OUTPUT/best or the "
            "output of model.py init-small."
        ) from error
    model_lib.require_fp32_weights(model)
    return processor, model


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with weight decay on every weight except biases and LayerNorm weights."""
    no_decay = {id(p) for module in model.modules() if isinstance(module, torch.nn.LayerNorm)
                for p in module.parameters()}
    no_decay |= {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}
    decay_params = [p for p in model.parameters() if p.requires_grad and id(p) not in no_decay]
    other_params = [p for p in model.parameters() if p.requires_grad and id(p) in no_decay]
    groups = [{"params": decay_params, "weight_decay": args.weight_decay},
              {"params": other_params, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr)


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def check_precision(device: torch.device, precision: str) -> None:
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                            "use --precision fp16")


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on non-final micro-steps (accelerate's `accumulate`)."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return nullcontext()


def caption_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Sum of token cross-entropies; position t predicts token t + 1, and -100 labels count nothing."""
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)), shifted_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing)


def count_label_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


# ----------------------------------------------------------------------------- train and validate


@dataclass
class TrainState:
    """Position and history of a run; saved in last.pt as plain data."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already done in `epoch`
    global_step: int = 0
    best_val_loss: float = math.inf
    validations_since_best: int = 0
    last_validated_step: int = -1
    skipped_steps: int = 0  # fp16 overflows and non-finite losses, whose updates were not applied
    nonfinite_in_row: int = 0
    lr_history: list = field(default_factory=list)  # [global step, [lr of rank 0, rank 1, ...]]


@dataclass
class StepResult:
    loss: float  # token mean of the training loss over all ranks, label smoothing included
    grad_norm: float  # before clipping, unscaled
    loss_scale: float
    pairs: int
    applied: bool


def agree_on_step(micro_batches: list[dict], stop: StopRequest, device: torch.device) -> tuple[int, int, bool]:
    """Sum the step's label tokens and pairs over all ranks, and whether any rank got a stop signal.

    One small all-reduce per optimizer step gives the exact loss denominator before the
    forward passes and lets every rank stop at the same step boundary.
    """
    tokens = sum(count_label_tokens(batch) for batch in micro_batches)
    pairs = sum(len(batch["input_ids"]) for batch in micro_batches)
    totals = all_reduce_sum(torch.tensor([tokens, pairs, int(stop.requested)], dtype=torch.float64, device=device))
    return int(totals[0]), int(totals[1]), bool(totals[2] > 0)


def train_step(model, micro_batches: list[dict], global_tokens: int, optimizer, scaler,
               args: argparse.Namespace, ctx: DistributedContext) -> tuple[StepResult, list[bool]]:
    """Run the forward and backward passes of one optimizer step and apply it unless it is not finite.

    Each micro-batch's summed loss is divided by the step's token count over all ranks and
    multiplied by world_size, because DDP averages gradients. So batch 8 x 1 and batch 2 x 4
    give the same update, padding aside.
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    finite_batches = []
    for index, batch in enumerate(micro_batches):
        batch = to_device(batch, ctx.device)
        with gradient_sync(model, sync=index == len(micro_batches) - 1):
            with autocast(ctx.device, args.precision):
                logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
            batch_loss = caption_loss_sum(logits, batch["labels"], args.label_smoothing)
            scaler.scale(batch_loss * (ctx.world_size / max(global_tokens, 1))).backward()
        loss_sum += batch_loss.detach()
        finite_batches.append(bool(torch.isfinite(batch_loss)))
    global_loss = all_reduce_sum(loss_sum).item() / max(global_tokens, 1)

    # accelerate's clip_grad_norm_: unscale first, so the norm and the clipping see true gradients.
    scaler.unscale_(optimizer)
    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    loss_scale = scaler.get_scale()
    result = StepResult(global_loss, grad_norm, loss_scale, 0, applied=False)
    if not math.isfinite(global_loss) or (not scaler.is_enabled() and not math.isfinite(grad_norm)):
        # Gradients are identical on all ranks after the all-reduce, so every rank skips together.
        optimizer.zero_grad(set_to_none=True)
        scaler.update()
        return result, finite_batches

    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # accelerate's `optimizer_step_was_skipped`: GradScaler lowers the scale only when it skipped.
    result.applied = not (scaler.is_enabled() and scaler.get_scale() < loss_scale)
    return result, finite_batches


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, args: argparse.Namespace, ctx: DistributedContext) -> float:
    """Token-weighted mean NLL over all ranks' shards of the valid split, without label smoothing."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for batch in loader:
        batch = to_device(batch, ctx.device)
        with autocast(ctx.device, args.precision):
            logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
        totals[0] += caption_loss_sum(logits, batch["labels"], label_smoothing=0.0)
        totals[1] += count_label_tokens(batch)
    model.train()
    all_reduce_sum(totals)
    return (totals[0] / totals[1]).item()


# ----------------------------------------------------------------------------- checkpoints


def capture_rng_state(device: torch.device) -> dict:
    """This rank's RNG states as tensors and plain Python values, so weights_only loading accepts them."""
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng_state(state: dict, device: torch.device) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def save_checkpoint(path: Path, model, optimizer, scaler, scheduler, state: TrainState,
                    args: argparse.Namespace, ctx: DistributedContext) -> None:
    """Write last.pt from rank 0 with every rank's RNG state; all ranks must call this.

    The file is written next to its final name and renamed, so a crash mid-write leaves the
    previous checkpoint intact (accelerate's `save_state`, in one file).
    """
    rng_states = all_gather_objects(capture_rng_state(ctx.device))
    if ctx.is_main:
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "scheduler": scheduler.state_dict(),
            "train_state": asdict(state),
            "rng": rng_states,
            "world_size": ctx.world_size,
            "args": vars(args),
        }
        temporary = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, temporary)
        os.replace(temporary, path)
        LOG.info("wrote %s at step %d", path, state.global_step)
    wait_for_all_ranks()


def resume_path(args: argparse.Namespace) -> Path | None:
    if args.resume is None:
        return None
    if args.resume == "auto":
        path = Path(args.output_dir) / CHECKPOINT_NAME
        return path if path.exists() else None
    path = Path(args.resume)
    if not path.is_file():
        raise TrainingError(f"--resume {args.resume}: no such checkpoint file")
    return path


def check_resumable(checkpoint: dict, args: argparse.Namespace, ctx: DistributedContext, path: Path) -> None:
    """Reject a resume whose sample order would differ from the interrupted run's."""
    saved = checkpoint["args"]
    current = vars(args) | {"world_size": ctx.world_size}
    saved = saved | {"world_size": checkpoint["world_size"]}
    changed = [name for name in ("world_size", "batch_size", "grad_accum", "seed", "data") if saved[name] != current[name]]
    if changed:
        details = ", ".join(f"{name} {saved[name]} -> {current[name]}" for name in changed)
        raise TrainingError(f"--resume {path}: {details}. Resume with the saved values, "
                            "or start fresh in another --output-dir, because the sample order would change.")


def load_checkpoint(path: Path, model, optimizer, scaler, scheduler, args: argparse.Namespace,
                    ctx: DistributedContext) -> TrainState:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    check_resumable(checkpoint, args, ctx, path)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    restore_rng_state(checkpoint["rng"][ctx.rank], ctx.device)
    state = TrainState(**checkpoint["train_state"])
    LOG.info("resumed from %s: epoch %d, step %d of the epoch, global step %d",
             path, state.epoch, state.step_in_epoch, state.global_step)
    return state


def save_best(model, processor, output_dir: Path, val_loss: float) -> None:
    """Replace best/ with the current weights; the old folder is removed only after the new one is complete."""
    best = output_dir / BEST_DIR_NAME
    temporary = output_dir / (BEST_DIR_NAME + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    old = output_dir / (BEST_DIR_NAME + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        best.rename(old)
    temporary.rename(best)
    shutil.rmtree(old, ignore_errors=True)
    LOG.info("new best validation loss %.4f: wrote %s", val_loss, best)


def wait_for_all_ranks() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- progress


class ProgressLog:
    """Log lines, TensorBoard scalars and the progress bar, all on rank 0 only."""

    def __init__(self, args: argparse.Namespace, ctx: DistributedContext, total_steps: int, state: TrainState):
        self.enabled = ctx.is_main
        self.log_every = args.log_every
        self.total_steps = total_steps
        self.writer = None
        self.window: list[tuple[StepResult, float]] = []
        self.last_state, self.last_lr = state, 0.0
        self.bar = tqdm(total=total_steps, initial=state.global_step, unit="step", dynamic_ncols=True,
                        disable=not self.enabled)
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events an interrupted run logged after its checkpoint.
            self.writer = SummaryWriter(Path(args.output_dir) / "tensorboard", purge_step=state.global_step or None)
            self.write_hparams(args)

    def write_hparams(self, args: argparse.Namespace) -> None:
        from torch.utils.tensorboard.summary import hparams

        values = {name: value if isinstance(value, (int, float, str, bool)) else str(value)
                  for name, value in vars(args).items()}
        for summary in hparams(values, {"val/loss": math.nan}):
            self.writer.file_writer.add_summary(summary)

    def step(self, result: StepResult, seconds: float, state: TrainState, lr: float) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{result.loss:.4f}", refresh=False)
        self.window.append((result, seconds))
        self.last_state, self.last_lr = state, lr
        if state.global_step % self.log_every == 0:
            self.flush(state, lr)

    def flush(self, state: TrainState, lr: float) -> None:
        losses = [result.loss for result, _ in self.window]
        seconds = sum(seconds for _, seconds in self.window)
        pairs_per_sec = sum(result.pairs for result, _ in self.window) / max(seconds, 1e-9)
        last = self.window[-1][0]
        scalars = {"train/loss": sum(losses) / len(losses), "train/lr": lr, "train/grad_norm": last.grad_norm,
                   "train/loss_scale": last.loss_scale, "train/pairs_per_sec": pairs_per_sec,
                   "train/skipped_steps": state.skipped_steps}
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, state.global_step)
        LOG.info("step %d/%d | epoch %d | loss %.4f | lr %.2e | grad norm %.3f | %.0f pairs/s | %.0f ms/step",
                 state.global_step, self.total_steps, state.epoch, scalars["train/loss"], lr, last.grad_norm,
                 pairs_per_sec, 1000 * seconds / len(self.window))
        self.window.clear()

    def validation(self, val_loss: float, state: TrainState, lr: float) -> None:
        if self.enabled:
            self.writer.add_scalar("val/loss", val_loss, state.global_step)
            self.writer.flush()
            LOG.info("step %d | validation loss %.4f (best %.4f) | lr %.2e",
                     state.global_step, val_loss, state.best_val_loss, lr)

    def close(self) -> None:
        if self.window:
            self.flush(self.last_state, self.last_lr)
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- main


@dataclass
class Run:
    """Everything one training run works with, so the loop's helpers take one argument."""

    args: argparse.Namespace
    ctx: DistributedContext
    stop: StopRequest
    model: torch.nn.Module  # unwrapped: checkpoints, validation and save_pretrained use it
    ddp_model: torch.nn.Module  # the DDP wrapper, or `model` itself in a single process
    processor: object
    train_pairs: data_lib.CaptionPairs
    train_loader: DataLoader
    valid_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    state: TrainState
    steps_per_epoch: int
    total_steps: int
    progress: ProgressLog | None = None

    def save(self) -> None:
        save_checkpoint(Path(self.args.output_dir) / CHECKPOINT_NAME, self.model, self.optimizer, self.scaler,
                        self.scheduler, self.state, self.args, self.ctx)


def validate(run: Run) -> bool:
    """Validate, step ReduceLROnPlateau, keep best/ and write last.pt; return True when early stopping ends the run."""
    state = run.state
    val_loss = evaluate(run.model, run.valid_loader, run.args, run.ctx)
    # Every rank gets the same global loss, so every rank's scheduler makes the same decision
    # (accelerate would step it once per process on each process's own value).
    run.scheduler.step(val_loss)
    state.last_validated_step = state.global_step
    lrs = all_gather_objects(run.optimizer.param_groups[0]["lr"])
    state.lr_history.append([state.global_step, lrs])
    if len(set(lrs)) != 1:
        raise TrainingError(f"step {state.global_step}: the ranks' learning rates differ: {lrs}")

    if val_loss < state.best_val_loss:
        state.best_val_loss = val_loss
        state.validations_since_best = 0
        if run.ctx.is_main:
            save_best(run.model, run.processor, Path(run.args.output_dir), val_loss)
    else:
        state.validations_since_best += 1
    run.progress.validation(val_loss, state, lrs[0])
    run.save()
    patience = run.args.early_stopping_patience
    return patience > 0 and state.validations_since_best >= patience


def record_step(run: Run, result: StepResult, finite_batches: list[bool]) -> None:
    """Count skipped steps and report non-finite losses; raise after too many in a row."""
    state, args = run.state, run.args
    batch_start = state.step_in_epoch * args.grad_accum
    for offset, finite in enumerate(finite_batches):
        if not finite:
            LOG.warning("non-finite loss at step %d, epoch %d, micro-batch %d: %s", state.global_step + 1,
                        state.epoch, offset, describe_batch(run.train_loader, run.train_pairs, batch_start + offset))
    overflow_only = run.scaler.is_enabled() and math.isfinite(result.loss)
    if result.applied or overflow_only:
        state.nonfinite_in_row = 0
    else:
        state.nonfinite_in_row += 1
        LOG.warning("step %d: loss %s, gradient norm %s; update skipped (%d in a row)", state.global_step + 1,
                    result.loss, result.grad_norm, state.nonfinite_in_row)
    if not result.applied:
        state.skipped_steps += 1
    if state.nonfinite_in_row >= args.max_nonfinite_steps:
        raise TrainingError(
            f"{state.nonfinite_in_row} optimizer steps in a row had a non-finite loss or gradient, the last at "
            f"step {state.global_step + 1} (epoch {state.epoch}). Lower --lr, use --precision bf16 or fp32, "
            "or check the data.")


def run_epoch(run: Run) -> str:
    """Train from the saved position in the current epoch; return why it ended.

    The result is "epoch_end", "max_steps", "early_stop" or "stop_signal".
    """
    state, args = run.state, run.args
    run.train_loader.sampler.set_epoch(state.epoch, skip=state.step_in_epoch * args.grad_accum * args.batch_size)
    batches = iter(run.train_loader)
    while state.step_in_epoch < run.steps_per_epoch:
        if state.global_step >= run.total_steps:
            return "max_steps"
        started = time.perf_counter()
        micro_batches = list(itertools.islice(batches, args.grad_accum))
        if not micro_batches:  # every rank has the same batch count, so all of them end here together
            break
        global_tokens, global_pairs, stop_now = agree_on_step(micro_batches, run.stop, run.ctx.device)
        if stop_now:
            return "stop_signal"

        result, finite_batches = train_step(run.ddp_model, micro_batches, global_tokens, run.optimizer, run.scaler,
                                            args, run.ctx)
        result.pairs = global_pairs
        record_step(run, result, finite_batches)
        state.global_step += 1
        state.step_in_epoch += 1
        run.progress.step(result, time.perf_counter() - started, state, run.optimizer.param_groups[0]["lr"])
        if args.eval_every and state.global_step % args.eval_every == 0 and validate(run):
            return "early_stop"
    return "epoch_end"


def train(run: Run) -> int:
    """Run epochs until the step limit, the epoch limit, early stopping or a stop signal; return the exit status."""
    state, args = run.state, run.args
    outcome = "epoch_end"
    while state.epoch < args.epochs and state.global_step < run.total_steps:
        outcome = run_epoch(run)
        if outcome == "stop_signal":
            return stop_for_requeue(run)
        if outcome == "early_stop":
            break
        if outcome == "epoch_end":
            state.epoch += 1
            state.step_in_epoch = 0
            if not args.eval_every and validate(run):
                outcome = "early_stop"
                break

    if outcome == "epoch_end" and args.max_steps and state.global_step >= args.max_steps:
        outcome = "max_steps"  # the step limit fell on an epoch boundary
    # A run cut short by --max-steps still validates its last weights, so best/ is never stale.
    if state.last_validated_step != state.global_step:
        validate(run)
    LOG.info("finished at step %d (%s): best validation loss %.4f", state.global_step,
             outcome.replace("_", " "), state.best_val_loss)
    return 0


def stop_for_requeue(run: Run) -> int:
    """Write last.pt and the requeue marker, then return REQUEUE_EXIT_CODE."""
    signals = all_gather_objects(run.stop.signal_name)
    # From here on another signal changes nothing. Ignoring it (rather than keeping the
    # Python handler, which interpreter shutdown resets to the default action) keeps a rank
    # that torchrun terminates while it exits from dying with -SIGTERM instead of status 3.
    run.stop.ignore_further_signals()
    run.save()
    if run.ctx.is_main:
        marker = {"signals_by_rank": signals, "global_step": run.state.global_step, "exit_code": REQUEUE_EXIT_CODE}
        (Path(run.args.output_dir) / REQUEUE_MARKER_NAME).write_text(json.dumps(marker) + "\n")
    wait_for_all_ranks()
    LOG.warning("stopping at step %d on a stop signal (by rank: %s): wrote last.pt, exiting with status %d "
                "so the job is requeued", run.state.global_step, signals, REQUEUE_EXIT_CODE)
    return REQUEUE_EXIT_CODE


def main(args: argparse.Namespace, ctx: DistributedContext, stop: StopRequest) -> int:
    """Set up data, model and optimizer, resume if asked, and train; return the exit status."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed, ctx.rank)
    check_precision(ctx.device, args.precision)
    LOG.info("%d rank(s) on %s, precision %s, global batch %d pairs", ctx.world_size, ctx.device.type,
             args.precision, args.batch_size * args.grad_accum * ctx.world_size)

    # Data: caption-expanded pairs for training, sharded pairs for validation.
    processor, model = load_model_and_processor(args.model)
    splits = load_data(args, ctx)
    collator = data_lib.CaptionCollator(processor.tokenizer, model.config.text_config.bos_token_id,
                                        args.max_caption_tokens, args.prompt)
    truncated = data_lib.count_truncated(processor.tokenizer, splits["train"], args.max_caption_tokens, args.prompt)
    if truncated:
        LOG.warning("%d training captions are longer than --max-caption-tokens %d and will be cut",
                    truncated, args.max_caption_tokens)
    train_pairs = data_lib.CaptionPairs(splits["train"], processor.image_processor)
    train_loader = build_train_loader(train_pairs, collator, args, ctx)
    valid_pairs = data_lib.CaptionPairs(splits["valid"], processor.image_processor)
    valid_loader = build_valid_loader(valid_pairs, collator, args, ctx)

    # Model, optimizer, scaler and scheduler, then the saved state when resuming.
    model.to(ctx.device)
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(ctx.device.type, init_scale=args.init_loss_scale,
                                  enabled=args.precision == "fp16")
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=args.lr_plateau_factor,
                                                           patience=args.lr_plateau_patience)
    state = TrainState()
    checkpoint_path = resume_path(args)
    if checkpoint_path is not None:
        state = load_checkpoint(checkpoint_path, model, optimizer, scaler, scheduler, args, ctx)
    if ctx.is_main:
        (output_dir / REQUEUE_MARKER_NAME).unlink(missing_ok=True)
    # DDP broadcasts rank 0's weights at construction, so every rank starts from the same ones.
    ddp_model = model
    if ctx.is_distributed:
        ddp_model = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)

    # The loop: epochs of optimizer steps, validation, checkpoints.
    batches_per_epoch = math.ceil(len(train_loader.sampler.sampler) / args.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    LOG.info("%d training pairs, %d optimizer steps per epoch, steps %d to %d in this run", len(train_pairs),
             steps_per_epoch, state.global_step + 1, total_steps)
    run = Run(args, ctx, stop, model, ddp_model, processor, train_pairs, train_loader, valid_loader, optimizer,
              scaler, scheduler, state, steps_per_epoch, total_steps)
    run.progress = ProgressLog(args, ctx, total_steps, state)
    try:
        with logging_redirect_tqdm():
            return train(run)
    finally:
        run.progress.close()


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse flags, join the process group, train, and turn known errors into a one-line message."""
    args = parse_args(argv)
    stop = StopRequest()
    ctx = setup_distributed(args.device, args.dist_timeout)
    setup_logging(ctx.rank)
    try:
        return main(args, ctx, stop)
    except (data_lib.DataError, TrainingError) as error:
        # Every rank logs its own error; torchrun then stops any rank still waiting in a collective.
        LOG.error("%s", error)
        return ERROR_EXIT_CODE
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(run_cli())
