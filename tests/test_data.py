"""data.py on the real fixtures: layouts, image modes, bad images, captions and batches."""

import io
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

import data
from conftest import REPO, RSICD_MINI, UCM_MINI

RSICD_SIZES = {"train": 48, "valid": 12, "test": 16}
UCM_SIZES = {"train": 4, "valid": 2, "test": 3}


# ----------------------------------------------------------------------------- layouts


def test_parquet_folder_split_sizes():
    splits = data.load_splits(str(RSICD_MINI))
    for name, images in RSICD_SIZES.items():
        assert len(splits[name]) == images
        assert splits[name].num_pairs == 5 * images
    assert data.detect_layout(str(RSICD_MINI)) == "parquet"


def test_pairs_index_covers_every_caption():
    split = data.load_splits(str(RSICD_MINI), ["train"])["train"]
    pairs = data.CaptionPairs(split, image_processor=None)
    assert len(pairs) == 240
    assert len(set(pairs.pairs)) == 240
    assert pairs.pairs[:6] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0)]


def test_save_to_disk_folder_loads(tmp_path):
    import datasets

    datasets.load_dataset(str(RSICD_MINI)).save_to_disk(str(tmp_path / "saved"))
    assert data.detect_layout(str(tmp_path / "saved")) == "saved"
    splits = data.load_splits(str(tmp_path / "saved"))
    for name, images in RSICD_SIZES.items():
        assert len(splits[name]) == images
    assert splits["train"].load_image(0).size == (224, 224)


def test_karpathy_ucm_folder_and_json():
    for path in (UCM_MINI, UCM_MINI / "dataset.json"):
        assert data.detect_layout(str(path)) == "karpathy"
        splits = data.load_splits(str(path), ["train", "val", "test"])
        assert set(splits) == {"train", "valid", "test"}
        for name, images in UCM_SIZES.items():
            assert len(splits[name]) == images
            assert splits[name].num_pairs == 5 * images


def test_karpathy_rsicd_names(tmp_path):
    shutil.copytree(UCM_MINI / "imgs", tmp_path / "RSICD_images")
    shutil.copyfile(UCM_MINI / "dataset.json", tmp_path / "dataset_rsicd.json")
    splits = data.load_splits(str(tmp_path), ["valid"])
    assert len(splits["valid"]) == 2
    assert splits["valid"].load_image(0).mode == "RGB"


def test_off_size_ucm_tiffs_load():
    splits = data.load_splits(str(UCM_MINI))
    processor = BlipImageProcessor(size={"height": 64, "width": 64})
    sizes = set()
    for split in splits.values():
        for index in range(len(split)):
            image = split.load_image(index)
            sizes.add(image.size)
            pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
            assert pixels.shape == (3, 64, 64)
    assert (254, 256) in sizes
    assert (256, 254) in sizes


def test_hub_id_offline_error_is_clear():
    assert data.detect_layout("arampacha/rsicd") == "hub"
    with pytest.raises(data.DataError, match="Offline, pass a local folder"):
        data.load_splits("no-such-user/no-such-dataset", ["train"])


def test_missing_local_path_is_clear():
    with pytest.raises(data.DataError, match="no such file or folder"):
        data.load_splits("./not-here", ["train"])


def test_missing_split_is_named():
    with pytest.raises(data.DataError, match="no split 'holdout'"):
        data.load_splits(str(RSICD_MINI), ["holdout"])


# ----------------------------------------------------------------------------- captions


def write_karpathy(tmp_path, entries, images):
    """Write a Karpathy-style data set; `images` maps file name to bytes."""
    (tmp_path / "imgs").mkdir()
    for name, content in images.items():
        (tmp_path / "imgs" / name).write_bytes(content)
    payload = {"images": [{"filename": name, "split": split, "sentences": [{"raw": c} for c in captions]}
                          for name, split, captions in entries]}
    (tmp_path / "dataset.json").write_text(json.dumps(payload))
    return tmp_path


def png_bytes(mode="RGB", size=(32, 32), color=0):
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_caption_cleaning_counts(tmp_path):
    entries = [
        ("a.png", "train", ["  many   trees\tnear a river . ", "", "   ", None, "many trees near a river ."]),
        ("b.png", "train", ["", "  "]),
        ("c.png", "train", ["a bridge ."]),
    ]
    write_karpathy(tmp_path, entries, {name: png_bytes() for name, _, _ in entries})
    split = data.load_splits(str(tmp_path), ["train"])["train"]
    assert [image.filename for image in split.images] == ["a.png", "c.png"]
    assert split.images[0].captions == ("many trees near a river .", "many trees near a river .")
    assert split.stats.captions_dropped == 5
    assert split.stats.images_dropped == 1
    assert split.num_pairs == 3

    deduped = data.load_splits(str(tmp_path), ["train"], dedupe=True)["train"]
    assert deduped.images[0].captions == ("many trees near a river .",)
    assert deduped.stats.duplicates_dropped == 1


# ----------------------------------------------------------------------------- image modes


def high_bit_image():
    # A 16-bit scene in the low range that PIL's own conversion would turn all white.
    values = np.linspace(1000, 4000, 32 * 32, dtype=np.uint16).reshape(32, 32)
    return Image.fromarray(values)


MODE_IMAGES = {
    "L": lambda: Image.new("L", (40, 30), 128),
    "LA": lambda: Image.new("LA", (40, 30), (128, 50)),
    "P": lambda: Image.new("RGB", (40, 30), (10, 200, 30)).convert("P"),
    "RGBA": lambda: Image.new("RGBA", (40, 30), (10, 20, 30, 0)),
    "CMYK": lambda: Image.new("CMYK", (40, 30), (0, 50, 100, 0)),
    "I;16": high_bit_image,
    "I": lambda: Image.fromarray(np.arange(1200, dtype=np.int32).reshape(30, 40) * 1000),
    "F": lambda: Image.fromarray(np.linspace(-1.5, 2.5, 1200, dtype=np.float32).reshape(30, 40)),
}


@pytest.mark.parametrize("mode", sorted(MODE_IMAGES))
def test_image_mode_gives_rgb_tensor(mode):
    image = MODE_IMAGES[mode]()
    assert image.mode == mode
    rgb = data.to_rgb(image)
    assert rgb.mode == "RGB"
    pixels = BlipImageProcessor(size={"height": 48, "width": 48})(images=rgb, return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, 48, 48)
    assert torch.isfinite(pixels).all()


def test_sixteen_bit_image_not_white():
    rgb = np.asarray(data.to_rgb(high_bit_image()))
    assert rgb.min() == 0
    assert rgb.max() == 255
    assert (rgb == 255).mean() < 0.01
    assert len(np.unique(rgb)) > 100


def test_sixteen_bit_tiff_file_loads(tmp_path):
    high_bit_image().save(tmp_path / "scene.tif")
    image = data.decode_image(None, tmp_path / "scene.tif", data.DEFAULT_MAX_IMAGE_PIXELS)
    assert image.mode == "RGB"
    assert np.asarray(image).mean() < 200


# ----------------------------------------------------------------------------- bad images


def bad_image_dataset(tmp_path):
    good = png_bytes()
    truncated = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated, format="JPEG")
    entries = [
        ("good1.png", "train", ["fine ."]),
        ("truncated.jpg", "train", ["cut ."]),
        ("empty.png", "train", ["empty ."]),
        ("missing.png", "train", ["gone ."]),
        ("notes.png", "train", ["text ."]),
        ("huge.png", "train", ["big ."]),
        ("../outside.png", "train", ["escape ."]),
        ("good2.png", "train", ["fine too ."]),
    ]
    images = {
        "good1.png": good,
        "truncated.jpg": truncated.getvalue()[:200],
        "empty.png": b"",
        "notes.png": b"this is a text file, not an image\n",
        "huge.png": png_bytes(mode="L", size=(300, 300)),
        "good2.png": good,
    }
    (tmp_path / "outside.png").write_bytes(good)
    return write_karpathy(tmp_path, entries, images)


def test_scan_names_each_bad_image(tmp_path):
    bad_image_dataset(tmp_path)
    split = data.load_splits(str(tmp_path), ["train"], max_pixels=250 * 250)["train"]
    reasons = {item.filename: item.reason for item in split.scan()}
    assert set(reasons) == {"truncated.jpg", "empty.png", "missing.png", "notes.png", "huge.png", "../outside.png"}
    assert "truncated" in reasons["truncated.jpg"].lower()
    assert reasons["empty.png"] == "not an image or an unsupported format"
    assert reasons["missing.png"] == "file not found"
    assert reasons["notes.png"] == "not an image or an unsupported format"
    assert "90,000 pixels is over the limit" not in reasons["huge.png"]
    assert "300x300 pixels is over the limit of 62,500" in reasons["huge.png"]
    assert "outside the image folder" in reasons["../outside.png"]


def test_bad_images_stop_by_default(tmp_path):
    bad_image_dataset(tmp_path)
    split = data.load_splits(str(tmp_path), ["train"], max_pixels=250 * 250)["train"]
    with pytest.raises(data.DataError) as error:
        data.drop_bad_images(split, split.scan(), skip=False)
    message = str(error.value)
    for name in ("truncated.jpg", "empty.png", "missing.png", "notes.png", "huge.png", "../outside.png"):
        assert name in message
    assert "--skip-bad-images" in message


def test_load_image_error_names_file(tmp_path):
    bad_image_dataset(tmp_path)
    split = data.load_splits(str(tmp_path), ["train"])["train"]
    with pytest.raises(data.DataError, match="missing.png: file not found"):
        split.load_image(3)


SCAN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import data, distributed
    context = distributed.setup_distributed("cpu", timeout_s=60)
    split = data.load_splits(sys.argv[2], ["train"], max_pixels=250 * 250)["train"]
    bad = data.scan_sharded(split, context.rank, context.world_size, distributed.all_gather_objects)
    kept = data.drop_bad_images(split, bad, skip=True)
    with open(f"{sys.argv[3]}/rank{context.rank}.json", "w") as handle:
        json.dump({"kept": [image.row for image in kept.images], "bad": [item.row for item in bad]}, handle)
    distributed.teardown_distributed()
    """
)


def test_skipping_drops_same_rows_on_two_ranks(tmp_path):
    bad_image_dataset(tmp_path)
    script = tmp_path / "scan.py"
    script.write_text(SCAN_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    subprocess.run(torchrun + [str(script), str(REPO), str(tmp_path), str(tmp_path)], check=True, timeout=180)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1
    assert rank0["kept"] == [0, 7]
    assert rank0["bad"] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- batches and labels


@pytest.fixture(scope="module")
def small_model(small_model_dir):
    model = BlipForConditionalGeneration.from_pretrained(small_model_dir, dtype=torch.float32).eval()
    processor = BlipProcessor.from_pretrained(small_model_dir)
    return model, processor


def caption_items(processor, captions):
    pixels = processor.image_processor(images=Image.new("RGB", (224, 224), (90, 120, 60)), return_tensors="pt")
    return [{"pixel_values": pixels["pixel_values"][0], "caption": caption} for caption in captions]


def token_mean_loss(model, batch):
    logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


def test_dynamic_padding_same_loss(small_model):
    model, processor = small_model
    items = caption_items(processor, ["airport", "many green trees are around a white building near a road ."])
    bos = model.config.text_config.bos_token_id
    dynamic = data.CaptionCollator(processor.tokenizer, bos)(items)
    padded = data.CaptionCollator(processor.tokenizer, bos, pad_to=40)(items)
    assert dynamic["input_ids"].shape[1] < 40
    assert padded["input_ids"].shape[1] == 40
    with torch.no_grad():
        difference = (token_mean_loss(model, dynamic) - token_mean_loss(model, padded)).abs().item()
    assert difference < 1e-6


def test_batch_starts_with_bos_and_masks_padding(small_model):
    model, processor = small_model
    tokenizer = processor.tokenizer
    items = caption_items(processor, ["airport", "many green trees are around a white building ."])
    batch = data.CaptionCollator(tokenizer, model.config.text_config.bos_token_id)(items)
    assert (batch["input_ids"][:, 0] == tokenizer.convert_tokens_to_ids("[DEC]")).all()
    assert (batch["input_ids"][:, 0] != tokenizer.cls_token_id).all()
    padding = batch["attention_mask"] == 0
    assert padding[0].any()
    assert (batch["labels"][padding] == -100).all()
    assert (batch["labels"][~padding][1:] != -100).any()
    short_length = int(batch["attention_mask"][0].sum())
    assert batch["input_ids"][0, short_length - 1] == tokenizer.sep_token_id


def test_prompt_positions_masked(small_model):
    model, processor = small_model
    tokenizer = processor.tokenizer
    prompt = "a picture of "
    collator = data.CaptionCollator(tokenizer, model.config.text_config.bos_token_id, prompt=prompt)
    batch = collator(caption_items(processor, ["a bridge over a river ."]))
    prompt_ids = tokenizer(prompt)["input_ids"][1:-1]
    assert collator.prompt_length == 1 + len(prompt_ids)
    assert batch["input_ids"][0, 1 : collator.prompt_length].tolist() == prompt_ids
    assert (batch["labels"][0, : collator.prompt_length] == -100).all()
    caption_ids = tokenizer("a bridge over a river .")["input_ids"][1:]
    assert batch["labels"][0, collator.prompt_length :].tolist() == caption_ids


def test_long_caption_truncated_with_sep(small_model):
    model, processor = small_model
    tokenizer = processor.tokenizer
    long_caption = " ".join(["many buildings and green trees"] * 20)
    collator = data.CaptionCollator(tokenizer, model.config.text_config.bos_token_id, max_tokens=40)
    batch = collator(caption_items(processor, [long_caption, "airport ."]))
    assert batch["input_ids"].shape[1] == 40
    assert batch["input_ids"][0, -1] == tokenizer.sep_token_id
    split = data.load_splits(str(RSICD_MINI), ["train"])["train"]
    lengths = data.caption_token_lengths(tokenizer, split)
    assert data.count_truncated(tokenizer, split, 12) == int((lengths > 12).sum())
    assert data.count_truncated(tokenizer, split, 12) > 0
    assert data.count_truncated(tokenizer, split, 200) == 0


def test_inspect_command_reports_splits():
    result = subprocess.run(
        [sys.executable, str(REPO / "data.py"), "inspect", "--data", str(UCM_MINI)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert "layout: karpathy" in result.stdout
    assert "split valid: 2 images, 10 pairs" in result.stdout
    assert "bad images: 0" in result.stdout
    assert "caption length in words: p50" in result.stdout
    assert "repeated captions of the same image, kept:" in result.stdout
