"""Measure training throughput (pairs/s) and peak memory of train_ddp.py's optimizer step.

    python bench/train_throughput.py --size base --device cuda --precision fp16 --batch-size 32
    python bench/train_throughput.py --size small --device cpu --precision bf16 --batch-size 16

`--size base` is the architecture of Salesforce/blip-image-captioning-base (ViT-B/16 at
384 px, BERT-base decoder, built from BlipConfig's defaults) with fresh weights, so no
download is needed and the speed matches the Hub model. `--size small` is the model.py
init-small shape used in docs/results.md (width 256, 4 layers, 224 px, patch 32).
Inputs are random pixels and 20-token captions, so the numbers exclude image decoding.
One process: multiply by the number of GPUs for an estimate of a DDP run's rate.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as model_lib  # noqa: E402
import train_ddp  # noqa: E402
from distributed import DistributedContext, pick_device  # noqa: E402

CAPTION_TOKENS = 20  # RSICD captions: median 11 words, about 15 tokens with [DEC] and [SEP]


def build_model(size: str) -> tuple[BlipForConditionalGeneration, int]:
    if size == "base":
        config = BlipConfig()  # the defaults are blip-image-captioning-base's architecture
        return BlipForConditionalGeneration(config), config.vision_config.image_size
    vocab = {token: index for index, token in enumerate(model_lib.SPECIAL_TOKENS + [f"w{i}" for i in range(1223)])}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    config = model_lib.small_config(tokenizer, image_size=224, patch_size=32, hidden_size=256, layers=4, heads=4,
                                    max_positions=64)
    return BlipForConditionalGeneration(config), 224


def random_batch(batch_size: int, image_size: int, vocab_size: int, bos: int) -> dict:
    input_ids = torch.randint(10, vocab_size, (batch_size, CAPTION_TOKENS))
    input_ids[:, 0] = bos
    return {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["base", "small"], default="base", help="model shape: base is the Hub model's, small is docs/results.md's (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device to run on; auto picks CUDA when available (default: %(default)s)")
    parser.add_argument("--precision", choices=sorted(train_ddp.PRECISIONS), default="fp32",
                        help="autocast compute type (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per step (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 keeps torch's choice")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = pick_device(args.device, 0)
    ctx = DistributedContext(rank=0, local_rank=0, world_size=1, device=device)
    torch.manual_seed(0)
    model, image_size = build_model(args.size)
    model.to(device).train()
    train_args = argparse.Namespace(label_smoothing=0.1, precision=args.precision, max_grad_norm=1.0,
                                    weight_decay=0.05, lr=1e-5)
    optimizer = train_ddp.build_optimizer(model, train_args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    text_config = model.config.text_config
    batch = random_batch(args.batch_size, image_size, text_config.vocab_size, text_config.bos_token_id)
    tokens = train_ddp.count_label_tokens(batch)

    def step() -> None:
        train_ddp.train_step(model, [batch], tokens, optimizer, scaler, train_args, ctx)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    result = {
        "size": args.size,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "precision": args.precision,
        "batch_size": args.batch_size,
        "ms_per_step": round(1000 * seconds / args.steps, 1),
        "pairs_per_s": round(args.batch_size * args.steps / seconds, 1),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
