"""Remote-sensing caption data for BLIP: loading, cleaning, bad-image scan, batching.

`--data` accepts three layouts and detects which one it is given:

1. a Hub data set id such as `arampacha/rsicd` (columns `filename`, `captions`, `image`),
   loaded with `datasets.load_dataset`;
2. a local folder in the same layout (parquet shards under `data/`) or one written by
   `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
3. a Karpathy-style JSON with an image folder beside it: `dataset_rsicd.json` +
   `RSICD_images/`, or `dataset.json` + `imgs/` as UCM-Captions and Sydney-Captions ship.
   The path may name the folder or the JSON file. Its `val` split is served as `valid`.

Training rows are caption-expanded (image, caption) pairs; evaluation rows are images with
all their references. Images are decoded lazily, in DataLoader workers.

Run `python data.py inspect --data PATH` to see what a data set contains.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

LOG = logging.getLogger("rsicd_blip.data")

DEFAULT_DATA = "arampacha/rsicd"
DEFAULT_MAX_CAPTION_TOKENS = 40  # BLIP's caption fine-tuning setting, [DEC] and [SEP] included
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # about 7,000 x 7,000; larger files are reported as bad
SPLIT_ALIASES = {"val": "valid", "validation": "valid", "dev": "valid"}
KARPATHY_JSON_NAMES = ("dataset_rsicd.json", "dataset.json")
KARPATHY_IMAGE_FOLDERS = ("RSICD_images", "imgs", "images")
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class DataError(ValueError):
    """A data set that cannot be used as given; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CaptionedImage:
    """One image of a split with its cleaned reference captions."""

    row: int  # row in the source (parquet/Arrow row or JSON entry), stable across ranks
    filename: str
    captions: tuple[str, ...]


@dataclass
class CleaningStats:
    """Counts of what caption cleaning removed from one split."""

    captions_dropped: int = 0  # empty, blank or not a string
    duplicates_dropped: int = 0  # only with dedupe
    images_dropped: int = 0  # no caption left

    def log(self, split: str) -> None:
        if self.captions_dropped or self.duplicates_dropped or self.images_dropped:
            LOG.warning(
                "split %s: dropped %d empty or missing captions, %d duplicate captions, "
                "%d images with no caption left",
                split,
                self.captions_dropped,
                self.duplicates_dropped,
                self.images_dropped,
            )


@dataclass(frozen=True)
class BadImage:
    """An image row that cannot be decoded, with the reason."""

    row: int
    filename: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row} ({self.filename}): {self.reason}"


def clean_caption(caption: object) -> str | None:
    """Return the caption stripped with inner whitespace collapsed, or None when nothing is left."""
    if not isinstance(caption, str):
        return None
    text = " ".join(caption.split())
    return text or None


def clean_captions(raw: Sequence[object] | None, dedupe: bool, stats: CleaningStats) -> tuple[str, ...]:
    """Clean one image's captions, updating `stats` with what was dropped."""
    captions: list[str] = []
    for caption in raw or ():
        text = clean_caption(caption)
        if text is None:
            stats.captions_dropped += 1
        elif dedupe and text in captions:
            stats.duplicates_dropped += 1
        else:
            captions.append(text)
    return tuple(captions)


# ----------------------------------------------------------------------------- images


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16-bit, 32-bit integer and float images are rescaled by their own value range (min to
    max), because PIL's own conversion clips them and turns most 16-bit scenes white.
    Alpha is dropped, and palette images are expanded first.
    """
    if image.mode in HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(values)
        scaled = np.zeros(values.shape, dtype=np.uint8)
        if finite.any():
            low, high = values[finite].min(), values[finite].max()
            if high > low:
                scaled[finite] = np.round((values[finite] - low) / (high - low) * 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_image(data: bytes | None, path: Path | None, max_pixels: int) -> Image.Image:
    """Decode image bytes or a file to RGB; raise OSError or ValueError with the reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(
                    f"{width}x{height} pixels is over the limit of {max_pixels:,} "
                    "(raise --max-image-pixels if the image is genuine)"
                )
            image.load()
            return to_rgb(image)


def describe_image_error(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, UnidentifiedImageError):
        return "not an image or an unsupported format"
    if isinstance(error, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"too many pixels: {error}"
    return f"{type(error).__name__}: {error}"


# ----------------------------------------------------------------------------- splits


class CaptionSplit:
    """One split: images with their captions and a lazy way to load each image.

    `read_image` is a picklable callable `row -> (bytes | None, Path | None)` that DataLoader
    workers call to fetch the encoded image of a source row.
    """

    def __init__(
        self,
        name: str,
        images: list[CaptionedImage],
        read_image: Callable[[int], tuple[bytes | None, Path | None]],
        stats: CleaningStats,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        self.name = name
        self.images = images
        self.read_image = read_image
        self.stats = stats
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_pairs(self) -> int:
        return sum(len(image.captions) for image in self.images)

    def load_image(self, index: int) -> Image.Image:
        """Decode image `index` of this split to RGB; raise DataError naming the file on failure."""
        record = self.images[index]
        try:
            data, path = self.read_image(record.row)
            return decode_image(data, path, self.max_pixels)
        except (OSError, ValueError, Image.DecompressionBombWarning) as error:
            raise DataError(
                f"split {self.name}, {record.filename}: {describe_image_error(error)}. "
                "Run the bad-image scan (python data.py inspect --data ...) to list every such row."
            ) from error

    def scan(self, indices: Iterable[int] | None = None) -> list[BadImage]:
        """Decode each image in `indices` (default: all) and return those that fail."""
        bad = []
        for index in range(len(self.images)) if indices is None else indices:
            record = self.images[index]
            try:
                data, path = self.read_image(record.row)
                decode_image(data, path, self.max_pixels)
            except (OSError, ValueError, Image.DecompressionBombWarning) as error:
                bad.append(BadImage(record.row, record.filename, describe_image_error(error)))
        return bad

    def without_rows(self, rows: Iterable[int]) -> CaptionSplit:
        """Return a copy of this split without the images of the given source rows."""
        drop = set(rows)
        remaining = [image for image in self.images if image.row not in drop]
        return CaptionSplit(self.name, remaining, self.read_image, self.stats, self.max_pixels)


class _ArrowImageReader:
    """Fetch encoded image bytes from a `datasets.Dataset` whose image column is not decoded."""

    def __init__(self, dataset, column: str):
        self.dataset = dataset
        self.column = column

    def __call__(self, row: int) -> tuple[bytes | None, Path | None]:
        value = self.dataset[row][self.column]
        if value is None:
            raise ValueError("image cell is empty")
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return value["bytes"], None
            if value.get("path"):
                return None, Path(value["path"])
            raise ValueError("image cell has neither bytes nor a path")
        raise ValueError(f"image cell is a {type(value).__name__}, expected an Image feature")


class _FolderImageReader:
    """Fetch image files from one folder; names that resolve outside it are rejected."""

    def __init__(self, folder: Path, filenames: list[str]):
        self.folder = folder.resolve()
        self.filenames = filenames

    def __call__(self, row: int) -> tuple[bytes | None, Path | None]:
        path = (self.folder / self.filenames[row]).resolve()
        if not path.is_relative_to(self.folder):
            raise ValueError(f"path points outside the image folder {self.folder}")
        return None, path


# ----------------------------------------------------------------------------- layouts


def detect_layout(data: str) -> str:
    """Return 'karpathy', 'saved', 'parquet' or 'hub' for a --data value."""
    path = Path(data)
    if path.is_file():
        if path.suffix == ".json":
            return "karpathy"
        raise DataError(f"--data {data}: a file must be a Karpathy-style .json caption file")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "saved"
        if any(path.glob("data/*.parquet")) or any(path.glob("*.parquet")):
            return "parquet"
        if any((path / name).exists() for name in KARPATHY_JSON_NAMES):
            return "karpathy"
        raise DataError(
            f"--data {data}: folder found, but it has no parquet shards (data/*.parquet), no "
            f"save_to_disk files (dataset_dict.json) and no {' or '.join(KARPATHY_JSON_NAMES)}"
        )
    if data.startswith((".", "/", "~")) or data.count("/") > 1:
        raise DataError(f"--data {data}: no such file or folder")
    return "hub"


def normalise_split_name(name: str) -> str:
    return SPLIT_ALIASES.get(name, name)


def load_splits(
    data: str,
    splits: Sequence[str] = ("train", "valid", "test"),
    dedupe: bool = False,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, CaptionSplit]:
    """Load and clean the requested splits of a data set in any supported layout."""
    layout = detect_layout(data)
    wanted = [normalise_split_name(name) for name in splits]
    if layout == "karpathy":
        loaded = _load_karpathy(Path(data), wanted, dedupe)
    else:
        loaded = _load_hf(data, layout, wanted, dedupe)
    for split in loaded.values():
        split.max_pixels = max_pixels
        split.stats.log(split.name)
    LOG.info(
        "loaded %s (%s layout): %s",
        data,
        layout,
        ", ".join(f"{s.name} {len(s):,} images / {s.num_pairs:,} pairs" for s in loaded.values()),
    )
    return loaded


def _load_hf(data: str, layout: str, wanted: list[str], dedupe: bool) -> dict[str, CaptionSplit]:
    import datasets

    try:
        if layout == "saved":
            dataset_dict = datasets.load_from_disk(data)
            if isinstance(dataset_dict, datasets.Dataset):
                dataset_dict = datasets.DatasetDict({"train": dataset_dict})
        else:
            dataset_dict = datasets.load_dataset(data)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise DataError(
            f"--data {data}: could not load the data set ({error}). Offline, pass a local folder "
            "(parquet shards under data/, save_to_disk output, or a Karpathy JSON with its images)."
        ) from error

    available = {normalise_split_name(name): name for name in dataset_dict}
    splits = {}
    for name in wanted:
        if name not in available:
            raise DataError(f"--data {data}: no split {name!r}; the data set has {sorted(available)}")
        dataset = dataset_dict[available[name]]
        missing = {"captions", "image"} - set(dataset.column_names)
        if missing:
            raise DataError(
                f"--data {data}, split {name}: missing columns {sorted(missing)}; expected "
                f"'captions' (list of strings), 'image' (Image) and optionally 'filename', "
                f"found {dataset.column_names}"
            )
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
        captions = dataset["captions"]
        if "filename" in dataset.column_names:
            filenames = [str(name) for name in dataset["filename"]]
        else:
            filenames = [f"{name}[{row}]" for row in range(len(dataset))]
        stats = CleaningStats()
        images = _build_records(filenames, captions, dedupe, stats)
        splits[name] = CaptionSplit(name, images, _ArrowImageReader(dataset, "image"), stats)
    return splits


def _find_karpathy_files(path: Path) -> tuple[Path, Path]:
    if path.is_file():
        json_path, folder = path, path.parent
    else:
        json_path = next((path / name for name in KARPATHY_JSON_NAMES if (path / name).exists()), None)
        folder = path
        if json_path is None:
            raise DataError(f"--data {path}: no {' or '.join(KARPATHY_JSON_NAMES)} in this folder")
    image_folder = next((folder / name for name in KARPATHY_IMAGE_FOLDERS if (folder / name).is_dir()), None)
    if image_folder is None:
        raise DataError(
            f"--data {path}: no image folder next to {json_path.name}; expected one of "
            f"{', '.join(KARPATHY_IMAGE_FOLDERS)} in {folder}"
        )
    return json_path, image_folder


def _load_karpathy(path: Path, wanted: list[str], dedupe: bool) -> dict[str, CaptionSplit]:
    json_path, image_folder = _find_karpathy_files(path)
    try:
        entries = json.loads(json_path.read_text())["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{json_path}: not a Karpathy caption file with an 'images' list ({error})") from error

    by_split: dict[str, list[int]] = {}
    filenames: list[str] = []
    raw_captions: list[list[object]] = []
    for row, entry in enumerate(entries):
        if not isinstance(entry, dict) or "filename" not in entry or "split" not in entry:
            raise DataError(f"{json_path}: entry {row} has no 'filename' or 'split'; fix or remove it")
        filenames.append(str(entry["filename"]))
        sentences = entry.get("sentences") or []
        raw_captions.append([s.get("raw") if isinstance(s, dict) else None for s in sentences])
        by_split.setdefault(normalise_split_name(str(entry["split"])), []).append(row)

    reader = _FolderImageReader(image_folder, filenames)
    splits = {}
    for name in wanted:
        if name not in by_split:
            raise DataError(f"{json_path}: no images in split {name!r}; the file has {sorted(by_split)}")
        stats = CleaningStats()
        rows = by_split[name]
        images = _build_records(
            [filenames[row] for row in rows], [raw_captions[row] for row in rows], dedupe, stats, rows
        )
        splits[name] = CaptionSplit(name, images, reader, stats)
    return splits


def _build_records(
    filenames: list[str],
    captions: list,
    dedupe: bool,
    stats: CleaningStats,
    rows: list[int] | None = None,
) -> list[CaptionedImage]:
    records = []
    for position, (filename, raw) in enumerate(zip(filenames, captions, strict=True)):
        cleaned = clean_captions(raw, dedupe, stats)
        if not cleaned:
            stats.images_dropped += 1
            continue
        records.append(CaptionedImage(rows[position] if rows else position, filename, cleaned))
    return records


# ----------------------------------------------------------------------------- bad images


def format_bad_images(split: str, bad: Sequence[BadImage]) -> str:
    lines = [f"split {split}: {len(bad)} bad images:"] + [f"  {item}" for item in bad]
    return "\n".join(lines)


def scan_sharded(split: CaptionSplit, rank: int, world_size: int, gather: Callable[[list], list]) -> list[BadImage]:
    """Scan images rank, rank + world_size, ... and merge every rank's findings.

    `gather` is an all-gather of Python objects (distributed.all_gather_objects), so every
    rank returns the same list, sorted by row, and later drops the same rows.
    """
    local = split.scan(range(rank, len(split), world_size))
    merged = [item for found in gather(local) for item in found]
    return sorted(merged, key=lambda item: item.row)


def drop_bad_images(split: CaptionSplit, bad: Sequence[BadImage], skip: bool) -> CaptionSplit:
    """Stop with the list of bad images, or with `skip` drop them and log the count.

    Every rank calls this with the same gathered list, so every rank keeps the same rows.
    """
    if not bad:
        return split
    if not skip:
        raise DataError(
            format_bad_images(split.name, bad)
            + "\nFix or remove these files, or pass --skip-bad-images to train without them."
        )
    LOG.warning("%s\nskipping them (--skip-bad-images)", format_bad_images(split.name, bad))
    return split.without_rows(item.row for item in bad)


# ----------------------------------------------------------------------------- torch datasets


class CaptionPairs(torch.utils.data.Dataset):
    """Caption-expanded training rows: one item per (image, caption) pair."""

    def __init__(self, split: CaptionSplit, image_processor):
        self.split = split
        self.image_processor = image_processor
        self.pairs = [
            (index, caption)
            for index, image in enumerate(split.images)
            for caption in range(len(image.captions))
        ]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: int) -> dict:
        index, caption = self.pairs[item]
        image = self.split.load_image(index)
        pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixel_values, "caption": self.split.images[index].captions[caption]}


class CaptionImages(torch.utils.data.Dataset):
    """Evaluation rows: one item per image; references stay in `split.images`."""

    def __init__(self, split: CaptionSplit, image_processor, indices: Sequence[int] | None = None):
        self.split = split
        self.image_processor = image_processor
        self.indices = list(range(len(split))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict:
        index = self.indices[item]
        image = self.split.load_image(index)
        pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixel_values, "index": index}


def worker_start_method(num_workers: int) -> str | None:
    """Return the multiprocessing start method for DataLoader workers: forkserver, or None without workers.

    A worker forked from a rank that already runs gloo, OpenMP or tqdm threads can inherit a lock
    that one of those threads held, and then hang at start. This was seen with eval_bleu.py under
    torchrun, where the other ranks then waited at the next gather until the timeout. forkserver
    forks workers from a clean single-threaded server process instead.
    """
    return "forkserver" if num_workers > 0 else None


def collate_images(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "index": torch.tensor([item["index"] for item in items]),
    }


@dataclass
class CaptionCollator:
    """Batch (image, caption) pairs for BLIP's decoder with dynamic padding.

    Each caption becomes `[DEC] prompt caption [SEP]`, cut to `max_tokens` with [SEP] kept.
    `[DEC]` (text_config.bos_token_id) replaces the tokenizer's `[CLS]` because `generate()`
    starts from it. `labels` equal `input_ids` with padding and the prompt (BOS included)
    set to -100. Padding goes to the longest caption of the batch.
    """

    tokenizer: object
    bos_token_id: int
    max_tokens: int = DEFAULT_MAX_CAPTION_TOKENS
    prompt: str = ""
    pad_to: int | None = None  # pad every batch to this length instead (tests only)
    prompt_length: int = field(init=False)

    def __post_init__(self):
        self.prompt_length = prompt_token_count(self.tokenizer, self.prompt)
        if self.prompt_length + 1 >= self.max_tokens:
            raise ValueError(
                f"--prompt {self.prompt!r} takes {self.prompt_length} tokens, which leaves no room "
                f"for a caption within --max-caption-tokens {self.max_tokens}"
            )

    def encode(self, captions: Sequence[str]) -> list[list[int]]:
        encoded = self.tokenizer([self.prompt + caption for caption in captions])["input_ids"]
        sep = self.tokenizer.sep_token_id
        return [ids if len(ids) <= self.max_tokens else ids[: self.max_tokens - 1] + [sep] for ids in encoded]

    def __call__(self, items: list[dict]) -> dict:
        sequences = self.encode([item["caption"] for item in items])
        length = self.pad_to or max(len(ids) for ids in sequences)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for position, ids in enumerate(sequences):
            input_ids[position, : len(ids)] = torch.tensor(ids)
            attention_mask[position, : len(ids)] = 1
        input_ids[:, 0] = self.bos_token_id
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, : self.prompt_length] = -100
        return {
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }


def prompt_token_count(tokenizer, prompt: str) -> int:
    """Return how many leading tokens the prompt takes, counting the start token."""
    if not prompt:
        return 1
    return len(tokenizer(prompt)["input_ids"]) - 1  # [CLS]/[DEC] + prompt tokens, no [SEP]


def caption_token_lengths(tokenizer, split: CaptionSplit, prompt: str = "") -> np.ndarray:
    """Return the token length of every caption of a split, special tokens and prompt included."""
    captions = [prompt + caption for image in split.images for caption in image.captions]
    return np.array([len(ids) for ids in tokenizer(captions)["input_ids"]], dtype=np.int64)


def count_truncated(tokenizer, split: CaptionSplit, max_tokens: int, prompt: str = "") -> int:
    lengths = caption_token_lengths(tokenizer, split, prompt)
    return int((lengths > max_tokens).sum())


# ----------------------------------------------------------------------------- inspect


def inspect(args: argparse.Namespace) -> None:
    layout = detect_layout(args.data)
    splits = load_splits(args.data, args.splits, dedupe=args.dedupe_captions, max_pixels=args.max_image_pixels)
    tokenizer = None
    if args.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    print(f"data:   {args.data}")
    print(f"layout: {layout}")
    for split in splits.values():
        words = np.array([len(caption.split()) for image in split.images for caption in image.captions])
        per_image = Counter(len(image.captions) for image in split.images)
        print(f"\nsplit {split.name}: {len(split):,} images, {split.num_pairs:,} pairs")
        print(f"  captions per image: {dict(sorted(per_image.items()))}")
        print(
            f"  dropped: {split.stats.captions_dropped} empty or missing captions, "
            f"{split.stats.duplicates_dropped} duplicates, {split.stats.images_dropped} images with no caption"
        )
        if not args.dedupe_captions:
            repeats = sum(len(image.captions) - len(set(image.captions)) for image in split.images)
            print(f"  repeated captions of the same image, kept: {repeats} (--dedupe-captions drops them)")
        percentiles = np.percentile(words, [50, 90, 99, 100]).astype(int)
        print(f"  caption length in words: p50 {percentiles[0]}, p90 {percentiles[1]}, "
              f"p99 {percentiles[2]}, max {percentiles[3]}")
        if tokenizer is not None:
            tokens = caption_token_lengths(tokenizer, split)
            percentiles = np.percentile(tokens, [50, 90, 99, 100]).astype(int)
            print(f"  caption length in tokens: p50 {percentiles[0]}, p90 {percentiles[1]}, "
                  f"p99 {percentiles[2]}, max {percentiles[3]}; "
                  f"over {args.max_caption_tokens}: {int((tokens > args.max_caption_tokens).sum())}")
        if args.skip_scan:
            print("  bad images: not scanned (--skip-scan)")
            continue
        bad = split.scan()
        print(f"  bad images: {len(bad)}")
        for item in bad:
            print(f"    {item}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    parser_inspect = commands.add_parser("inspect", help="print layout, sizes, caption lengths and bad images")
    parser_inspect.add_argument("--data", default=DEFAULT_DATA,
                                help="Hub data set id, local folder or Karpathy JSON (default: %(default)s)")
    parser_inspect.add_argument("--splits", nargs="+", default=["train", "valid", "test"],
                                help="splits to inspect (default: %(default)s)")
    parser_inspect.add_argument("--model", default=None,
                                help="Hub id or folder whose tokenizer measures caption tokens (default: words only)")
    parser_inspect.add_argument("--max-caption-tokens", type=int, default=DEFAULT_MAX_CAPTION_TOKENS,
                                help="token limit to count truncations against (default: %(default)s)")
    parser_inspect.add_argument("--dedupe-captions", action="store_true",
                                help="drop repeated captions of the same image")
    parser_inspect.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                                help="images with more pixels are reported as bad (default: %(default)s)")
    parser_inspect.add_argument("--skip-scan", action="store_true", help="do not decode every image")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        inspect(args)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
