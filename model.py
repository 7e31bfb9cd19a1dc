"""BLIP captioning model and processor: loading from the Hub or a folder, and a small fresh model.

`load_model` / `load_processor` take a Hub id (default `Salesforce/blip-image-captioning-base`)
or a local folder written by `save_pretrained`.

`python model.py init-small --data PATH --output-dir DIR` writes a small BLIP with fresh
weights that `from_pretrained(DIR)` loads like the Hub model: a WordPiece tokenizer built
from the data's training captions, a processor at the data's image size and a config small
enough to train on a CPU. The tests and the offline demo use it.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

import data as data_lib

LOG = logging.getLogger("rsicd_blip.model")

DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"
# BLIP's own image normalisation (the OpenAI CLIP statistics), as in the Hub processor.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> BlipForConditionalGeneration:
    """Load a BLIP captioning model; weights are cast to `dtype` (fp32 for training)."""
    return BlipForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype)


def load_processor(name_or_path: str = DEFAULT_MODEL) -> BlipProcessor:
    return BlipProcessor.from_pretrained(name_or_path)


def require_fp32_weights(model: torch.nn.Module) -> None:
    """Raise unless every parameter is fp32.

    Training keeps fp32 master weights and lets autocast run the matrix products in fp16 or
    bf16. An fp16 model would apply AdamW updates in fp16, where small updates round to zero
    and GradScaler cannot unscale fp16 gradients.
    """
    wrong = {str(p.dtype) for p in model.parameters() if p.dtype != torch.float32}
    if wrong:
        raise ValueError(
            f"the model has {', '.join(sorted(wrong))} parameters, but training needs fp32 master "
            "weights: load it with dtype=torch.float32 and pick the compute type with --precision"
        )


def build_wordpiece_tokenizer(captions: Sequence[str], vocab_size: int) -> BertTokenizer:
    """Build an uncased WordPiece tokenizer from captions, with BLIP's special tokens.

    The vocabulary is the special tokens, every character seen (alone and as a `##`
    continuation, so any word of these characters can be spelled) and then the most frequent
    whole words, ties broken alphabetically. Unlike the `tokenizers` WordPiece trainer, whose
    merges vary from run to run, this gives the same vocabulary every time.
    """
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts: Counter[str] = Counter()
    for caption in captions:
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption))
        word_counts.update(word for word, _ in words)

    characters = sorted({character for word in word_counts for character in word})
    vocab = list(SPECIAL_TOKENS) + characters + ["##" + character for character in characters]
    frequent = sorted(word_counts.items(), key=lambda item: (-item[1], item[0]))
    known = set(vocab)
    for word, _ in frequent:
        if len(vocab) >= vocab_size:
            break
        if word not in known:
            vocab.append(word)
            known.add(word)

    # BertTokenizer adds BERT's post-processing ([CLS] text [SEP]), which BLIP's processor
    # and the caption collator expect.
    return BertTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        do_lower_case=True,
        bos_token="[DEC]",
        extra_special_tokens=["[ENC]"],
        model_max_length=512,
    )


def small_config(tokenizer: BertTokenizer, image_size: int, patch_size: int, hidden_size: int,
                 layers: int, heads: int, max_positions: int) -> BlipConfig:
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    vision = dict(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden_size,
        image_size=image_size,
        patch_size=patch_size,
    )
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=hidden_size)


def init_small(args: argparse.Namespace) -> Path:
    """Write a fresh small BLIP, its tokenizer and processor to args.output_dir."""
    splits = data_lib.load_splits(args.data, ["train"], max_pixels=args.max_image_pixels)
    train = splits["train"]
    captions = [caption for image in train.images for caption in image.captions]
    image_size = args.image_size or train.load_image(0).size[0]

    torch.manual_seed(args.seed)
    tokenizer = build_wordpiece_tokenizer(captions, args.vocab_size)
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
    )
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = small_config(tokenizer, image_size, args.patch_size, args.hidden_size, args.layers,
                          args.heads, args.max_positions)
    model = BlipForConditionalGeneration(config)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    parameters = sum(p.numel() for p in model.parameters())
    LOG.info(
        "wrote a small BLIP to %s: %.1fM parameters, vocabulary %d, image %dpx, patch %dpx, "
        "%d layers of width %d",
        output_dir, parameters / 1e6, len(tokenizer), image_size, args.patch_size, args.layers, args.hidden_size,
    )
    return output_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    small = commands.add_parser("init-small", help="write a small BLIP with fresh weights and a trained tokenizer")
    small.add_argument("--data", required=True, help="data set whose training captions train the tokenizer")
    small.add_argument("--output-dir", required=True, help="folder to write the model, tokenizer and processor to")
    small.add_argument("--vocab-size", type=int, default=2000, help="max WordPiece vocabulary size (default: %(default)s)")
    small.add_argument("--image-size", type=int, default=None,
                       help="input size in pixels (default: the width of the first training image)")
    small.add_argument("--patch-size", type=int, default=32, help="ViT patch size in pixels (default: %(default)s)")
    small.add_argument("--hidden-size", type=int, default=128,
                       help="width of the vision and text transformers (default: %(default)s)")
    small.add_argument("--layers", type=int, default=2, help="layers in each transformer (default: %(default)s)")
    small.add_argument("--heads", type=int, default=4, help="attention heads per layer (default: %(default)s)")
    small.add_argument("--max-positions", type=int, default=64,
                       help="maximum token sequence length of the text decoder (default: %(default)s)")
    small.add_argument("--max-image-pixels", type=int, default=data_lib.DEFAULT_MAX_IMAGE_PIXELS,
                       help="images with more pixels are rejected (default: %(default)s)")
    small.add_argument("--seed", type=int, default=0, help="seed for the fresh weights (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        init_small(args)
    except data_lib.DataError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
