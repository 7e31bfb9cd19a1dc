"""Caption one split with one or more BLIP models and score them: sacrebleu BLEU and COCO metrics.

    python eval_bleu.py --model base=Salesforce/blip-image-captioning-base --model OUTPUT/best \
        --data arampacha/rsicd --split test --output-dir OUT
    torchrun --nproc_per_node=N eval_bleu.py ...   # same outputs, images shared among N processes

The headline score is sacrebleu's corpus BLEU (0-100) against every reference of every image.
BLEU-1..4, METEOR, ROUGE-L and CIDEr come from pycocoevalcap with its PTB tokenisation, as
remote-sensing captioning papers report them. They need a Java runtime and are skipped with a
warning without one.

Writes OUT/metrics.json, OUT/predictions-NAME.jsonl (one line per image), OUT/report.md (also
printed) and OUT/report.html (sample images with their references and every model's caption).

Under torchrun, the images are cut into consecutive batches and rank r captions batches r, r+W,
r+2W, ... (W processes). Batches are the same whatever W is, so fp32 predictions do not depend
on the number of processes. There is no collective inside the generation loop, so uneven shards
cannot hang. Per model, the ranks exchange only their loading errors and then, in one gather,
their captions (or the error that stopped them).

train_ddp.py may import `corpus_bleu`, `coco_metrics`, `caption_batch` and `shard_batches`.
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import io
import json
import logging
import re
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import sacrebleu
import torch
from tqdm import tqdm

import data as data_lib
import distributed
import model as model_lib

LOG = logging.getLogger("rsicd_blip.eval")

DEFAULT_SPLIT = "test"
DEFAULT_OUTPUT_DIR = "outputs/eval"
DEFAULT_BATCH_SIZE = 32  # images per process and batch, and beam search multiplies its memory by --num-beams
# Beam search with 3 beams and 5 to 20 tokens, as salesforce/BLIP configs/caption_coco.yaml sets.
# BLIP passes them as max_length and min_length, which also count its prompt tokens. Here they
# count only the new tokens, so a prompt does not shorten the caption.
DEFAULT_NUM_BEAMS = 3
DEFAULT_MAX_NEW_TOKENS = 20
DEFAULT_MIN_NEW_TOKENS = 5
DEFAULT_GALLERY = 24  # images shown in report.html
THUMBNAIL_PX = 256  # max width and height of a gallery thumbnail, in pixels
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
FIXED_CAPTION_NAME = "fixed-caption"
COCO_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


class EvaluationError(RuntimeError):
    """A failure that stops the evaluation on every rank, with a message that names the fix."""


# ----------------------------------------------------------------------------- scores


def reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Turn per-image reference lists into sacrebleu's reference streams.

    Stream k holds the k-th reference of every image, so each stream is as long as the
    hypothesis list. Images with fewer references are padded with None, which sacrebleu
    skips. An empty string would instead count as a zero-length reference and could
    become the closest reference length of a short hypothesis.
    """
    empty = [position for position, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"images at positions {empty[:10]} have no reference, so drop them before scoring")
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], **bleu_options) -> dict:
    """Score hypotheses against all their references with sacrebleu's corpus BLEU.

    Returns {"score": 0-100, "signature": str}. `bleu_options` go to sacrebleu.metrics.BLEU
    (default: 13a tokenisation, exponential smoothing, case-sensitive).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    # RSICD captions end in a detached " .", and 13a splits "road." into "road ." as well. Both
    # forms score the same, so sacrebleu's "forgot to detokenize" warning is only noise here.
    bleu = sacrebleu.metrics.BLEU(force=True, **bleu_options)
    score = bleu.corpus_score(list(hypotheses), reference_streams(references))
    return {"score": float(score.score), "signature": str(bleu.get_signature())}


def best_fixed_caption(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[str, float]:
    """Return the candidate that, given as the caption of every image, scores the highest corpus BLEU.

    This is the no-vision baseline: a model that ignores the image can do no better with a
    training caption. Each candidate is scored exactly as `corpus_bleu` would score it, but
    from per-n-gram match totals precomputed over all images, so thousands of candidates take
    seconds. Ties go to the candidate that sorts first.
    """
    # NOTE: uses sacrebleu's private helpers (_preprocess_segment, _extract_reference_info,
    # _get_closest_ref_len) of the pinned 2.6.0; test_eval checks the result against corpus_bleu.
    from collections import defaultdict

    from sacrebleu.metrics.helpers import extract_all_word_ngrams

    bleu = sacrebleu.metrics.BLEU(force=True)
    infos = [bleu._extract_reference_info([bleu._preprocess_segment(ref) for ref in refs]) for refs in references]
    ref_counts_by_ngram = defaultdict(list)  # n-gram -> its max reference count in each image that has it
    for info in infos:
        for ngram, count in info["ref_ngrams"].items():
            ref_counts_by_ngram[ngram].append(count)

    images = len(references)
    matches_cache: dict[tuple, int] = {}
    ref_length_cache: dict[int, int] = {}
    best_caption, best_score = "", -1.0
    for candidate in sorted(set(candidates)):
        ngrams, length = extract_all_word_ngrams(bleu._preprocess_segment(candidate), 1, bleu.max_ngram_order)
        correct = [0] * bleu.max_ngram_order
        total = [0] * bleu.max_ngram_order
        for ngram, count in ngrams.items():
            order = len(ngram) - 1
            total[order] += count * images
            key = (ngram, count)
            if key not in matches_cache:
                matches_cache[key] = sum(min(count, ref) for ref in ref_counts_by_ngram.get(ngram, ()))
            correct[order] += matches_cache[key]
        if length not in ref_length_cache:
            ref_length_cache[length] = sum(bleu._get_closest_ref_len(length, info["ref_lens"]) for info in infos)
        score = sacrebleu.metrics.BLEU.compute_bleu(
            correct, total, length * images, ref_length_cache[length], smooth_method=bleu.smooth_method
        ).score
        if score > best_score:
            best_caption, best_score = candidate, score
    return best_caption, best_score


@functools.cache
def find_java() -> str | None:
    """Return the java executable on PATH, warning once per process when there is none."""
    java = shutil.which("java")
    if java is None:
        LOG.warning(
            "java was not found on PATH, so the COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, "
            "CIDEr) are skipped and reported as null; install a Java runtime (for example "
            "apt-get install default-jre-headless) to compute them"
        )
    return java


def coco_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float] | None:
    """Compute pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L and CIDEr, or None without Java.

    Both sides go through the PTB tokenizer first (lower case, punctuation removed), as the
    COCO caption evaluation does. BLEU, METEOR and ROUGE-L are in 0-1, and CIDEr is unscaled.
    """
    if find_java() is None:
        return None
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    references_tokenized = tokenizer.tokenize(
        {i: [{"caption": ref} for ref in refs] for i, refs in enumerate(references)}
    )
    hypotheses_tokenized = tokenizer.tokenize({i: [{"caption": hyp}] for i, hyp in enumerate(hypotheses)})

    bleu, _ = Bleu(4).compute_score(references_tokenized, hypotheses_tokenized, verbose=0)
    scores = {f"Bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)}
    scores["METEOR"] = meteor_score(references_tokenized, hypotheses_tokenized)
    scores["ROUGE_L"] = float(Rouge().compute_score(references_tokenized, hypotheses_tokenized)[0])
    scores["CIDEr"] = float(Cider().compute_score(references_tokenized, hypotheses_tokenized)[0])
    return {key: scores[key] for key in COCO_KEYS}


def meteor_score(references: dict, hypotheses: dict) -> float:
    """Run pycocoevalcap's METEOR and always stop its Java process afterwards.

    pycocoevalcap 1.2 only stops the process in `Meteor.__del__`, which may run late or never.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    process = meteor.meteor_p
    try:
        return float(meteor.compute_score(references, hypotheses)[0])
    except (ValueError, BrokenPipeError) as error:
        # A dead METEOR process shows up as an empty line that float() rejects, or a broken pipe.
        process.kill()
        stderr = process.stderr.read().decode(errors="replace").strip()
        raise EvaluationError(
            f"METEOR failed ({error}): java exited with code {process.wait()}. Its error output: {stderr[-2000:]}"
        ) from error
    finally:
        process.stdin.close()
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


def score_captions(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    return {"sacrebleu": corpus_bleu(hypotheses, references), "coco": coco_metrics(hypotheses, references)}


# ----------------------------------------------------------------------------- generation


def shard_batches(num_images: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Cut images 0..num_images-1 into consecutive batches and return rank's share.

    Rank r takes batches r, r+W, r+2W, ... Unlike DistributedSampler nothing is padded or
    repeated, so each image is captioned exactly once, and a batch contains the same images
    whatever the number of processes.
    """
    starts = range(0, num_images, batch_size)
    batches = [list(range(start, min(start + batch_size, num_images))) for start in starts]
    return batches[rank::world_size]


def encode_prompt(tokenizer, prompt: str) -> list[int] | None:
    """Return the prompt's token ids, [CLS] and [SEP] included, or None without a prompt.

    BLIP's generate() replaces the first id with [DEC] and drops the final [SEP] itself.
    """
    return tokenizer(prompt)["input_ids"] if prompt else None


def strip_prompt(caption: str, prompt_text: str) -> str:
    if prompt_text and caption.startswith(prompt_text):
        caption = caption[len(prompt_text):]
    return caption.strip()


@torch.inference_mode()
def caption_batch(
    model,
    tokenizer,
    pixel_values: torch.Tensor,
    prompt_ids: list[int] | None,
    num_beams: int,
    max_new_tokens: int,
    min_new_tokens: int,
) -> list[str]:
    """Caption a batch of images. A prompt is fed to the decoder and cut from the captions."""
    input_ids = None
    if prompt_ids is not None:
        input_ids = torch.tensor([prompt_ids] * len(pixel_values), device=pixel_values.device)
    output = model.generate(
        pixel_values=pixel_values,
        input_ids=input_ids,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
    )
    captions = tokenizer.batch_decode(output, skip_special_tokens=True)

    # Decoding the prompt ids gives the prompt as the tokenizer normalised it (lower case for BLIP).
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True) if prompt_ids else ""
    return [strip_prompt(caption, prompt_text) for caption in captions]


def autocast_for(device: torch.device, precision: str):
    if device.type != "cuda" or PRECISIONS[precision] is None:
        return nullcontext()
    return torch.autocast("cuda", dtype=PRECISIONS[precision])


def caption_shard(
    model, processor, split: data_lib.CaptionSplit, batches: list[list[int]],
    args: argparse.Namespace, ctx: distributed.DistributedContext, name: str,
) -> list[tuple[int, str]]:
    """Caption this rank's batches and return (image index, caption) pairs."""
    dataset = data_lib.CaptionImages(split, processor.image_processor)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=args.num_workers, collate_fn=data_lib.collate_images,
        multiprocessing_context=data_lib.worker_start_method(args.num_workers),
    )
    prompt_ids = encode_prompt(processor.tokenizer, args.prompt)
    captions = []
    progress = tqdm(loader, desc=f"{name} (rank 0 share)", unit="batch", disable=not ctx.is_main)
    for batch in progress:
        pixel_values = batch["pixel_values"].to(ctx.device)
        with autocast_for(ctx.device, args.precision):
            texts = caption_batch(model, processor.tokenizer, pixel_values, prompt_ids,
                                  args.num_beams, args.max_new_tokens, args.min_new_tokens)
        captions.extend(zip(batch["index"].tolist(), texts))
    return captions


# ----------------------------------------------------------------------------- ranks


def raise_for_failures(errors: Sequence[str | None]) -> None:
    """Raise EvaluationError naming each failed rank, given one error or None per rank."""
    failures = [(rank, message) for rank, message in enumerate(errors) if message is not None]
    if not failures:
        return
    messages = {message for _, message in failures}
    if len(errors) == 1:
        raise EvaluationError(failures[0][1])
    if len(messages) == 1:
        ranks = ", ".join(str(rank) for rank, _ in failures)
        raise EvaluationError(f"{messages.pop()} (rank {ranks})")
    raise EvaluationError("\n".join(f"rank {rank}: {message}" for rank, message in failures))


def raise_if_any_rank_failed(error: str | None) -> None:
    """Gather every rank's error (None when it succeeded) and raise on every rank if any failed.

    Each rank calls this at the same point, so a rank that failed joins the collective
    instead of leaving the others waiting in it until the timeout.
    """
    raise_for_failures(distributed.all_gather_objects(error))


def gather_captions(local: list[tuple[int, str]], error: str | None, num_images: int) -> list[str]:
    """Collect every rank's captions, or its error, in one gather and return them in image order."""
    gathered = distributed.all_gather_objects((local, error))
    raise_for_failures([message for _, message in gathered])

    pairs = sorted(pair for captions, _ in gathered for pair in captions)
    indices = [index for index, _ in pairs]
    if indices != list(range(num_images)):
        raise EvaluationError(
            f"expected exactly one caption for each of {num_images} images, got {len(indices)} "
            f"captions for image indices {indices[:20]}"
        )
    return [caption for _, caption in pairs]


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    name: str  # file-name safe and unique, used in predictions-NAME.jsonl and the reports
    source: str  # Hub id or folder


def parse_model_specs(values: Sequence[str]) -> list[ModelSpec]:
    """Parse --model values (`NAME=SOURCE` or `SOURCE`) into specs with unique names.

    A value that is an existing path is always a source, even when it contains '='.
    Derived names are the last path component with unsafe characters replaced by '-'
    and a numeric suffix when two collide.
    """
    named, derived = [], []
    for position, value in enumerate(values):
        name, separator, source = value.partition("=")
        if separator and not Path(value).exists() and MODEL_NAME_PATTERN.fullmatch(name) and source:
            named.append((position, name, source))
        else:
            derived.append((position, value))

    names = {}
    for position, name, source in named:
        if name in names:
            raise ValueError(f"--model name {name!r} is given twice, so give each model its own name")
        names[name] = (position, source)
    for position, source in derived:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source.rstrip("/")).name).strip("-") or "model"
        name, suffix = base, 2
        while name in names:
            name, suffix = f"{base}-{suffix}", suffix + 1
        names[name] = (position, source)
    ordered = sorted(names.items(), key=lambda item: item[1][0])
    return [ModelSpec(name, source) for name, (_, source) in ordered]


def load_for_eval(spec: ModelSpec, device: torch.device):
    """Load the model in fp32 (autocast picks the compute type) and its processor."""
    looks_like_path = spec.source.startswith((".", "/", "~")) or spec.source.count("/") > 1
    if looks_like_path and not Path(spec.source).expanduser().is_dir():
        raise EvaluationError(f"--model {spec.name}={spec.source}: no such folder. Pass a Hub id or a "
                              "folder written by save_pretrained (for example OUTPUT/best).")
    try:
        model = model_lib.load_model(spec.source, torch.float32).to(device).eval()
        processor = model_lib.load_processor(spec.source)
    except (OSError, ValueError) as error:
        raise EvaluationError(
            f"--model {spec.name}={spec.source}: could not load the model or its processor ({error}). "
            "Pass a Hub id or a folder written by save_pretrained (for example OUTPUT/best)."
        ) from error
    return model, processor


def data_error_message(error: data_lib.DataError) -> str:
    """Return a DataError's own message without the traceback a DataLoader worker wraps it in."""
    text = str(error)
    marker = f"{type(error).__module__}.{type(error).__name__}: "
    if text.startswith("Caught ") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


def caption_with_model(spec: ModelSpec, split, args, ctx) -> list[str]:
    """Load one model on every rank, caption this rank's shard and gather all captions."""
    model, error = None, None
    try:
        model, processor = load_for_eval(spec, ctx.device)
    except EvaluationError as failure:
        error = str(failure)
    raise_if_any_rank_failed(error)

    batches = shard_batches(len(split), args.batch_size, ctx.rank, ctx.world_size)
    LOG.info("%s: captioning %d images, %d batches on rank 0", spec.name, len(split), len(batches))
    local, error = [], None
    try:
        local = caption_shard(model, processor, split, batches, args, ctx, spec.name)
    except data_lib.DataError as failure:
        error = data_error_message(failure)
    except torch.OutOfMemoryError as failure:
        error = f"{spec.name}: out of GPU memory at --batch-size {args.batch_size}, so lower it ({failure})"
    del model
    return gather_captions(local, error, len(split))


# ----------------------------------------------------------------------------- data


def load_eval_split(args: argparse.Namespace) -> data_lib.CaptionSplit:
    """Load the split and keep its first --max-images images.

    load_splits drops images with no reference left after cleaning and logs how many.
    """
    splits = data_lib.load_splits(args.data, [args.split], max_pixels=args.max_image_pixels)
    split = next(iter(splits.values()))
    if args.max_images is not None:
        split = data_lib.CaptionSplit(split.name, split.images[: args.max_images], split.read_image,
                                      split.stats, split.max_pixels)
    if len(split) == 0:
        raise data_lib.DataError(f"--data {args.data}, split {split.name}: no images with references to score")
    return split


def prepare_on_every_rank(args: argparse.Namespace, ctx) -> data_lib.CaptionSplit:
    """Load the split and create the output folder, failing on every rank together."""
    split, error = None, None
    try:
        split = load_eval_split(args)
        if ctx.is_main:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    except (data_lib.DataError, OSError) as failure:
        error = str(failure)
    raise_if_any_rank_failed(error)
    return split


# ----------------------------------------------------------------------------- outputs


def write_predictions(path: Path, split: data_lib.CaptionSplit, captions: Sequence[str]) -> None:
    with path.open("w") as file:
        for index, (record, caption) in enumerate(zip(split.images, captions, strict=True)):
            line = {"index": index, "filename": record.filename, "caption": caption,
                    "references": list(record.captions)}
            file.write(json.dumps(line, ensure_ascii=False) + "\n")


def metric_rows(models: list[dict]) -> list[tuple[str, list[float | None], int]]:
    """Return (label, one value per model, decimals) for every metric in report.md."""
    rows = [("BLEU, sacrebleu (0-100)", [m["sacrebleu"]["score"] for m in models], 2)]
    labels = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
              "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}
    for key in COCO_KEYS:
        scale = "unscaled" if key == "CIDEr" else "0-1"
        values = [m["coco"][key] if m["coco"] is not None else None for m in models]
        rows.append((f"{labels[key]}, COCO ({scale})", values, 4))
    return rows


def format_cell(value: float | None, first: float | None, decimals: int, show_change: bool) -> str:
    if value is None:
        return "skipped"
    text = f"{value:.{decimals}f}"
    if show_change and first is not None:
        text += f" ({value - first:+.{decimals}f})"
    return text


def render_report(metrics: dict) -> str:
    """Render report.md: one row per metric, one column per model, changes from the first model."""
    models = metrics["models"]
    lines = [
        f"# Caption scores: {metrics['data']}, split {metrics['split']}, {metrics['num_images']} images",
        "",
        "Brackets give the change from the first model. sacrebleu BLEU is 0-100, and the COCO metrics are "
        "as pycocoevalcap returns them (BLEU-n, METEOR and ROUGE-L in 0-1, CIDEr unscaled).",
        "",
        "| metric | " + " | ".join(m["name"] for m in models) + " |",
        "| --- |" + " ---: |" * len(models),
    ]
    for label, values, decimals in metric_rows(models):
        cells = [format_cell(v, values[0], decimals, position > 0) for position, v in enumerate(values)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for m in models:
        lines.append(f"- {m['name']}: `{m['model']}`, sacrebleu signature `{m['sacrebleu']['signature']}`")
    if any(m["coco"] is None for m in models):
        lines.append("- COCO metrics skipped: java was not found on PATH.")
    return "\n".join(lines) + "\n"


def gallery_indices(num_images: int, count: int) -> list[int]:
    """Pick `count` images spread evenly over the split, first and last included."""
    if count <= 0:
        return []
    if count >= num_images:
        return list(range(num_images))
    if count == 1:
        return [0]
    return sorted({round(k * (num_images - 1) / (count - 1)) for k in range(count)})


def thumbnail_data_uri(split: data_lib.CaptionSplit, index: int) -> str:
    image = split.load_image(index)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_gallery(metrics: dict, split: data_lib.CaptionSplit, captions: dict[str, list[str]], count: int) -> str:
    """Render report.html: sample images with their references and each model's caption."""
    escape = html.escape
    names = list(captions)
    header = "".join(f"<th>{escape(name)}</th>" for name in names)
    rows = []
    for index in gallery_indices(len(split), count):
        record = split.images[index]
        references = "".join(f"<li>{escape(ref)}</li>" for ref in record.captions)
        model_cells = "".join(f"<td>{escape(captions[name][index])}</td>" for name in names)
        rows.append(
            f'<tr><td><img src="{thumbnail_data_uri(split, index)}" alt="{escape(record.filename)}"><br>'
            f"{escape(record.filename)}</td><td><ul>{references}</ul></td>{model_cells}</tr>"
        )
    title = f"Captions: {metrics['data']}, split {metrics['split']}"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{escape(title)}</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:6px;vertical-align:top;max-width:320px}</style></head><body>"
        f"<h1>{escape(title)}</h1>"
        f"<p>{len(rows)} of {metrics['num_images']} images. Scores are in report.md and metrics.json.</p>"
        f"<table><tr><th>image</th><th>references</th>{header}</tr>\n" + "\n".join(rows) + "\n</table></body></html>\n"
    )


def write_outputs(args, split, specs: list[ModelSpec], captions: dict[str, list[str]]) -> dict:
    """Score every model, write metrics.json, report.md and report.html, and return the metrics."""
    output_dir = Path(args.output_dir)
    references = [record.captions for record in split.images]
    models = []
    for spec in specs:
        scores = score_captions(captions[spec.name], references)
        models.append({"name": spec.name, "model": spec.source, **scores})
    metrics = {"data": args.data, "split": split.name, "num_images": len(split), "models": models}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    report = render_report(metrics)
    (output_dir / "report.md").write_text(report)
    print(report, flush=True)
    (output_dir / "report.html").write_text(render_gallery(metrics, split, captions, args.gallery))
    LOG.info("wrote metrics.json, report.md, report.html and predictions-*.jsonl to %s", output_dir)
    return metrics


# ----------------------------------------------------------------------------- main


def evaluate(args: argparse.Namespace, ctx: distributed.DistributedContext) -> dict | None:
    """Caption the split with every model, then score and write the reports on rank 0."""
    specs = parse_model_specs(args.model)
    split = prepare_on_every_rank(args, ctx)
    captions = {}
    for spec in specs:
        captions[spec.name] = caption_with_model(spec, split, args, ctx)
        if ctx.is_main:
            # Written before scoring, so the captions survive a failure in the metrics.
            write_predictions(Path(args.output_dir) / f"predictions-{spec.name}.jsonl", split, captions[spec.name])
    if not ctx.is_main:
        return None
    if args.fixed_caption_baseline:
        spec, caption = fixed_caption_baseline(args)
        specs.insert(0, spec)
        captions = {spec.name: [caption] * len(split), **captions}  # listed first in every report
        write_predictions(Path(args.output_dir) / f"predictions-{spec.name}.jsonl", split, captions[spec.name])
    return write_outputs(args, split, specs, captions)


def fixed_caption_baseline(args: argparse.Namespace) -> tuple[ModelSpec, str]:
    """Pick the no-vision baseline caption from the training split of --data."""
    train = data_lib.load_splits(args.data, ["train"], max_pixels=args.max_image_pixels)["train"]
    references = [record.captions for record in train.images]
    candidates = [caption for refs in references for caption in refs]
    caption, score = best_fixed_caption(candidates, references)
    LOG.info("fixed-caption baseline: %r scores sacrebleu BLEU %.2f on the %d training images",
             caption, score, len(train))
    source = f"the training caption with the best BLEU on the train split: {caption!r}"
    return ModelSpec(FIXED_CAPTION_NAME, source), caption


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=None, metavar="[NAME=]SOURCE",
                        help="model to score: Hub id or save_pretrained folder, optionally named NAME=SOURCE. Repeat "
                             f"for several, the first is the baseline (default: {model_lib.DEFAULT_MODEL})")
    parser.add_argument("--data", default=data_lib.DEFAULT_DATA,
                        help="Hub data set id, local folder or Karpathy JSON (default: %(default)s)")
    parser.add_argument("--split", default=DEFAULT_SPLIT, help="split to caption and score (default: %(default)s)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help="folder for metrics.json, predictions and reports (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="score only the first N images of the split, for smoke runs (default: all)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="images per batch on each process (default: %(default)s)")
    parser.add_argument("--num-beams", type=int, default=DEFAULT_NUM_BEAMS,
                        help="beam width, where 1 decodes greedily (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="max tokens generated per caption, prompt excluded (default: %(default)s)")
    parser.add_argument("--min-new-tokens", type=int, default=DEFAULT_MIN_NEW_TOKENS,
                        help="min tokens generated per caption, prompt excluded (default: %(default)s)")
    parser.add_argument("--prompt", default="",
                        help="text the decoder starts from, cut from each caption. Use the training "
                             "--prompt (default: none)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="autocast compute type on CUDA, while the CPU always runs fp32 (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto picks this rank's GPU when CUDA is available (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=4,
                        help="DataLoader worker processes per rank that decode images (default: %(default)s)")
    parser.add_argument("--gallery", type=int, default=DEFAULT_GALLERY,
                        help="images shown in report.html (default: %(default)s)")
    parser.add_argument("--max-image-pixels", type=int, default=data_lib.DEFAULT_MAX_IMAGE_PIXELS,
                        help="images with more pixels are rejected as bad (default: %(default)s)")
    parser.add_argument("--fixed-caption-baseline", action="store_true",
                        help="also score a no-vision baseline, listed first: the training caption of --data "
                             "with the best corpus BLEU on the train split, given to every image (default: off)")
    parser.add_argument("--timeout-s", type=int, default=distributed.DEFAULT_TIMEOUT_S,
                        help="seconds a rank waits for the others at a gather before failing (default: %(default)s)")
    args = parser.parse_args(argv)

    args.model = args.model or [model_lib.DEFAULT_MODEL]
    for flag in ("batch_size", "num_beams", "max_new_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} is invalid; it must be at least 1")
    if args.min_new_tokens < 0 or args.min_new_tokens > args.max_new_tokens:
        parser.error(f"--min-new-tokens {args.min_new_tokens} must be between 0 and --max-new-tokens")
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max-images {args.max_images} is invalid; it must be at least 1")
    if args.num_workers < 0 or args.gallery < 0:
        parser.error("--num-workers and --gallery must be 0 or more")
    try:
        specs = parse_model_specs(args.model)
    except ValueError as error:
        parser.error(str(error))
    if args.fixed_caption_baseline and FIXED_CAPTION_NAME in {spec.name for spec in specs}:
        parser.error(f"--model name {FIXED_CAPTION_NAME!r} is reserved for --fixed-caption-baseline")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = distributed.setup_distributed(args.device, args.timeout_s)
    distributed.setup_logging(ctx.rank)
    if ctx.device.type != "cuda" and args.precision != "fp32":
        LOG.warning("--precision %s applies on CUDA only; running fp32 on %s", args.precision, ctx.device)
    try:
        evaluate(args, ctx)
    except (EvaluationError, data_lib.DataError) as error:
        LOG.error("%s", error)  # on every rank, each record tagged with its rank
        raise SystemExit(1) from None
    finally:
        distributed.teardown_distributed()


if __name__ == "__main__":
    main()
