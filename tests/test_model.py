"""model.py: the small fresh BLIP loads like the Hub model and captions a real image."""

import json

import pytest
import torch
from transformers import BlipForConditionalGeneration, BlipProcessor

import data
import model
from conftest import RSICD_MINI


def test_init_small_loads_and_captions(small_model_dir):
    blip = BlipForConditionalGeneration.from_pretrained(small_model_dir)
    processor = BlipProcessor.from_pretrained(small_model_dir)
    image = data.load_splits(str(RSICD_MINI), ["test"])["test"].load_image(0)
    inputs = processor(images=image, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    output = blip.generate(**inputs, max_new_tokens=8, min_new_tokens=3)
    assert output.shape[1] > 3
    assert output[0, 0] == blip.config.text_config.bos_token_id
    assert processor.decode(output[0], skip_special_tokens=True).strip()


def test_init_small_tokenizer_has_blip_tokens(small_model_dir):
    processor = BlipProcessor.from_pretrained(small_model_dir)
    tokenizer = processor.tokenizer
    config = json.loads((small_model_dir / "config.json").read_text())
    decoder_start = tokenizer.convert_tokens_to_ids("[DEC]")
    assert tokenizer.bos_token == "[DEC]"
    assert config["text_config"]["bos_token_id"] == decoder_start
    assert config["text_config"]["sep_token_id"] == tokenizer.sep_token_id
    assert config["text_config"]["pad_token_id"] == tokenizer.pad_token_id
    assert config["text_config"]["vocab_size"] == len(tokenizer)
    assert tokenizer.unk_token_id not in tokenizer("many buildings and green trees .")["input_ids"]


def test_load_model_keeps_fp32(small_model_dir):
    blip = model.load_model(str(small_model_dir))
    model.require_fp32_weights(blip)
    assert all(p.dtype == torch.float32 for p in blip.parameters())


def test_fp16_model_rejected_for_training(small_model_dir):
    blip = model.load_model(str(small_model_dir), dtype=torch.float16)
    with pytest.raises(ValueError, match="fp32 master weights"):
        model.require_fp32_weights(blip)


def test_init_small_is_reproducible(small_model_dir, tmp_path):
    model.main(["init-small", "--data", str(RSICD_MINI), "--output-dir", str(tmp_path)])
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (tmp_path / name).read_bytes() == (small_model_dir / name).read_bytes(), name
