"""Tests for eval_bleu.py: the BLEU reference layout, the COCO metrics, sharding over ranks and the outputs."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch

import data as data_lib
import eval_bleu
import model as model_lib
from conftest import REPO, RSICD_MINI, UCM_MINI

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs a Java runtime")
RUN_TIMEOUT_S = 240  # one eval_bleu.py run on the fixture takes 10-40 s on 2 CPU cores


def fixture_captions(count: int | None = None) -> tuple[list[str], list[list[str]]]:
    """Use each test image's first human caption as the hypothesis and the others as its references."""
    images = data_lib.load_splits(str(RSICD_MINI), ["test"])["test"].images[:count]
    return [image.captions[0] for image in images], [list(image.captions[1:]) for image in images]


def run_eval(args: list[str], nproc: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run eval_bleu.py as a user would, under torchrun when nproc > 1."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = launcher + [str(REPO / "eval_bleu.py"), "--data", str(RSICD_MINI), "--num-workers", "0", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tuned_model_dir(small_model_dir, tmp_path_factory) -> Path:
    """The small BLIP overfitted on the first 10 test images, so its captions differ from image to image.

    The fresh model writes the same caption for every image, which would hide a mix-up of
    image order across ranks. 25 epochs gave 10 different captions for the 10 images.
    """
    torch.manual_seed(0)
    processor = model_lib.load_processor(str(small_model_dir))
    model = model_lib.load_model(str(small_model_dir))
    split = data_lib.load_splits(str(RSICD_MINI), ["test"])["test"]
    first_images = data_lib.CaptionSplit(split.name, split.images[:10], split.read_image, split.stats)
    pairs = data_lib.CaptionPairs(first_images, processor.image_processor)
    collator = data_lib.CaptionCollator(processor.tokenizer, model.config.text_config.bos_token_id)
    loader = torch.utils.data.DataLoader(pairs, batch_size=10, shuffle=True, collate_fn=collator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(25):
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    output_dir = tmp_path_factory.mktemp("tuned-blip")
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


# ----------------------------------------------------------------------------- BLEU


def test_bleu_matches_sacrebleu_by_hand():
    hypotheses, references = fixture_captions()
    streams = [[refs[k] for refs in references] for k in range(4)]  # 4 references left per image

    expected = sacrebleu.corpus_bleu(hypotheses, streams)
    result = eval_bleu.corpus_bleu(hypotheses, references)

    assert result["score"] == expected.score
    assert result["signature"].startswith("nrefs:4|case:mixed|eff:no|tok:13a|smooth:exp|")
    assert 0 < result["score"] < 100


@needs_java
def test_bleu_matches_coco_same_tokens():
    """sacrebleu and pycocoevalcap agree on BLEU-4 when they score the same tokens.

    On raw captions they differ by design: 13a keeps the final "." as a token while the PTB
    tokenizer removes punctuation, and sacrebleu smooths. Given PTB-tokenised text, no further
    tokenisation and no smoothing, both compute corpus BLEU-4 with the closest reference length
    (shorter on ties), so only pycocoevalcap's epsilon terms (1e-15, 1e-9) remain.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    hypotheses, references = fixture_captions()
    tokenizer = PTBTokenizer()
    references_ptb = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    hypotheses_ptb = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hypotheses)})
    coco_bleu, _ = Bleu(4).compute_score(references_ptb, hypotheses_ptb, verbose=0)

    ours = eval_bleu.corpus_bleu(
        [hypotheses_ptb[i][0] for i in range(len(hypotheses))],
        [references_ptb[i] for i in range(len(references))],
        tokenize="none",
        smooth_method="none",
    )
    coco = eval_bleu.coco_metrics(hypotheses, references)

    assert ours["score"] / 100 == pytest.approx(coco_bleu[3], abs=1e-6)
    assert coco["Bleu_4"] == pytest.approx(coco_bleu[3], abs=1e-12)
    assert 0 < coco["Bleu_4"] < 1


def test_reference_layout_permutation():
    hypotheses, references = fixture_captions(3)
    references = [list(refs) + [hyp] for hyp, refs in zip(hypotheses, references)]  # 5 references each
    hypotheses = [references[0][4], "a tennis court next to a road .", "many boats in a harbour ."]

    score = eval_bleu.corpus_bleu(hypotheses, references)["score"]
    order = [2, 0, 1]
    permuted = eval_bleu.corpus_bleu([hypotheses[i] for i in order], [references[i] for i in order])["score"]

    assert all(len(refs) == 5 for refs in references)
    assert score < 100
    assert score > 0
    assert permuted == score


def test_reference_streams_pad_with_none():
    streams = eval_bleu.reference_streams([["a", "b", "c"], ["d"], ["e", "f"]])

    assert streams == [["a", "d", "e"], ["b", None, "f"], ["c", None, None]]


def test_none_padding_equals_repeat():
    hypotheses, references = fixture_captions(3)
    short = [references[0][:4], references[1][:2], references[2][:3]]
    repeated = [refs + [refs[0]] * (4 - len(refs)) for refs in short]

    padded_score = eval_bleu.corpus_bleu(hypotheses, short)["score"]
    repeated_score = eval_bleu.corpus_bleu(hypotheses, repeated)["score"]

    assert [len(refs) for refs in short] == [4, 2, 3]
    assert padded_score == repeated_score


def test_empty_string_padding_differs():
    """Why streams are padded with None: an empty string is a zero-length reference.

    A four-word hypothesis is closer in length to it than to an 11-word caption, so the
    brevity penalty shrinks and the score rises.
    """
    hypotheses = ["a playground is next", "many buildings are near"]
    references = [["a playground is next to a green meadow and several buildings ."],
                  ["many buildings are near a road .", "some buildings are in a dense area ."]]
    streams_empty = [[references[0][0], references[1][0]], ["", references[1][1]]]

    with_none = eval_bleu.corpus_bleu(hypotheses, references)["score"]
    with_empty = sacrebleu.corpus_bleu(hypotheses, streams_empty).score

    assert with_empty > with_none


def test_empty_hypothesis_counts():
    hypotheses, references = fixture_captions(4)
    with_empty = hypotheses[:3] + [""]

    full = eval_bleu.corpus_bleu(hypotheses[:3], references[:3])["score"]
    lowered = eval_bleu.corpus_bleu(with_empty, references)["score"]

    assert lowered < full


# ----------------------------------------------------------------------------- COCO metrics


@needs_java
def test_coco_metrics_keys_and_ranges():
    hypotheses, references = fixture_captions(6)
    hypotheses[5] = ""  # an empty caption must be scored, not crash the PTB tokenizer or METEOR

    scores = eval_bleu.coco_metrics(hypotheses, references)

    assert list(scores) == list(eval_bleu.COCO_KEYS)
    assert all(isinstance(value, float) for value in scores.values())
    assert all(0 < scores[key] < 1 for key in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L"))
    assert scores["CIDEr"] > 0


def test_coco_skipped_without_java(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))
    eval_bleu.find_java.cache_clear()
    hypotheses, references = fixture_captions(2)

    with caplog.at_level(logging.WARNING, logger="rsicd_blip.eval"):
        first = eval_bleu.coco_metrics(hypotheses, references)
        second = eval_bleu.coco_metrics(hypotheses, references)
    eval_bleu.find_java.cache_clear()
    warnings = [record for record in caplog.records if "java was not found" in record.getMessage()]

    assert first is None
    assert second is None
    assert len(warnings) == 1


# ----------------------------------------------------------------------------- helpers


def test_shard_batches_cover_once():
    shards = [eval_bleu.shard_batches(10, 2, rank, 3) for rank in range(3)]
    images = sorted(index for shard in shards for batch in shard for index in batch)

    assert shards[0] == [[0, 1], [6, 7]]
    assert shards[1] == [[2, 3], [8, 9]]
    assert shards[2] == [[4, 5]]
    assert images == list(range(10))
    assert eval_bleu.shard_batches(3, 4, 1, 2) == []


def test_model_specs_names():
    specs = eval_bleu.parse_model_specs(
        ["base=Salesforce/blip-image-captioning-base", "runs/a/best/", "runs/b/best", "org/my model"]
    )

    assert [spec.name for spec in specs] == ["base", "best", "best-2", "my-model"]
    assert specs[0].source == "Salesforce/blip-image-captioning-base"
    assert specs[1].source == "runs/a/best/"


def test_model_specs_duplicate_name():
    with pytest.raises(ValueError, match="given twice"):
        eval_bleu.parse_model_specs(["a=x/one", "a=x/two"])


def test_strip_prompt():
    assert eval_bleu.strip_prompt("a satellite image of a harbour", "a satellite image of") == "a harbour"
    assert eval_bleu.strip_prompt("boats in a harbour", "a satellite image of") == "boats in a harbour"
    assert eval_bleu.strip_prompt(" boats ", "") == "boats"


def test_prompt_is_cut_from_captions(tuned_model_dir):
    processor = model_lib.load_processor(str(tuned_model_dir))
    model = model_lib.load_model(str(tuned_model_dir)).eval()
    split = data_lib.load_splits(str(RSICD_MINI), ["test"])["test"]
    pixel_values = torch.stack([data_lib.CaptionImages(split, processor.image_processor)[i]["pixel_values"]
                                for i in range(2)])
    prompt_ids = eval_bleu.encode_prompt(processor.tokenizer, "a satellite image of ")

    captions = eval_bleu.caption_batch(model, processor.tokenizer, pixel_values, prompt_ids, 1, 8, 2)

    assert len(captions) == 2
    assert not any(caption.startswith("a satellite image of") for caption in captions)
    assert all(caption for caption in captions)


# ----------------------------------------------------------------------------- whole runs


def test_torchrun_matches_one_process(tuned_model_dir, tmp_path):
    common = ["--model", f"tuned={tuned_model_dir}", "--max-images", "10", "--batch-size", "2", "--gallery", "2"]

    single = run_eval(common + ["--output-dir", str(tmp_path / "one")])
    sharded = run_eval(common + ["--output-dir", str(tmp_path / "three")], nproc=3)
    single_predictions = read_jsonl(tmp_path / "one" / "predictions-tuned.jsonl")
    sharded_predictions = read_jsonl(tmp_path / "three" / "predictions-tuned.jsonl")
    metrics_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    metrics_three = json.loads((tmp_path / "three" / "metrics.json").read_text())

    assert single.returncode == 0, single.stderr
    assert sharded.returncode == 0, sharded.stderr
    assert len(sharded_predictions) == 10
    assert [line["index"] for line in sharded_predictions] == list(range(10))
    assert len({line["caption"] for line in single_predictions}) > 1, "equal captions would hide a mix-up"
    assert sharded_predictions == single_predictions
    assert metrics_three == metrics_one


def test_end_to_end_two_models(small_model_dir, tuned_model_dir, tmp_path):
    output_dir = tmp_path / "out"
    result = run_eval(["--model", f"fresh={small_model_dir}", "--model", str(tuned_model_dir),
                       "--max-images", "6", "--batch-size", "4", "--gallery", "6", "--output-dir", str(output_dir)])
    tuned_name = eval_bleu.parse_model_specs([str(small_model_dir), str(tuned_model_dir)])[1].name
    metrics = json.loads((output_dir / "metrics.json").read_text())
    report = (output_dir / "report.md").read_text()
    page = (output_dir / "report.html").read_text()

    assert result.returncode == 0, result.stderr
    assert list(metrics) == ["data", "split", "num_images", "models"]
    assert metrics["data"] == str(RSICD_MINI)
    assert metrics["split"] == "test"
    assert metrics["num_images"] == 6
    assert [m["name"] for m in metrics["models"]] == ["fresh", tuned_name]
    for entry in metrics["models"]:
        assert list(entry) == ["name", "model", "sacrebleu", "coco"]
        assert isinstance(entry["name"], str)
        assert isinstance(entry["model"], str)
        assert list(entry["sacrebleu"]) == ["score", "signature"]
        assert isinstance(entry["sacrebleu"]["score"], float)
        assert isinstance(entry["sacrebleu"]["signature"], str)
        if shutil.which("java"):
            assert list(entry["coco"]) == list(eval_bleu.COCO_KEYS)
            assert all(isinstance(value, float) for value in entry["coco"].values())
    assert metrics["models"][1]["sacrebleu"]["score"] > 0
    assert "| metric | fresh | " + tuned_name + " |" in report
    assert report in result.stdout
    assert "(+" in report
    assert page.count("data:image/jpeg;base64,") == 6
    for name in ("fresh", tuned_name):
        predictions = read_jsonl(output_dir / f"predictions-{name}.jsonl")
        assert len(predictions) == 6
        assert list(predictions[0]) == ["index", "filename", "caption", "references"]
        for line in predictions:
            assert f"<td>{eval_bleu.html.escape(line['caption'])}</td>" in page


def test_end_to_end_without_java(small_model_dir, tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # the interpreter is started by absolute path
    result = run_eval(["--model", str(small_model_dir), "--max-images", "3", "--gallery", "1",
                       "--output-dir", str(tmp_path / "out")], env=env)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())

    assert result.returncode == 0, result.stderr
    assert metrics["models"][0]["coco"] is None
    assert result.stderr.count("java was not found") == 1
    assert "skipped" in (tmp_path / "out" / "report.md").read_text()


def test_bad_image_stops_every_rank(small_model_dir, tmp_path):
    """A bad image on rank 1's shard stops both ranks with its name instead of leaving rank 0 waiting."""
    data_dir = tmp_path / "ucm"
    shutil.copytree(UCM_MINI, data_dir)
    split = data_lib.load_splits(str(data_dir), ["test"])["test"]
    (data_dir / "imgs" / split.images[1].filename).write_bytes(b"not an image")

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "eval_bleu.py"), "--data", str(data_dir), "--model", str(small_model_dir),
               "--batch-size", "1", "--num-workers", "1", "--output-dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)

    assert result.returncode != 0
    assert "[rank 0] ERROR" in result.stderr
    assert "[rank 1] ERROR" in result.stderr
    assert f"ERROR rsicd_blip.eval: split test, {split.images[1].filename}: not an image" in result.stderr
    assert "Traceback" not in result.stderr.split("ERROR rsicd_blip.eval")[1]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_missing_model_folder(tmp_path):
    result = run_eval(["--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "out")])

    assert result.returncode != 0
    assert f"no-such-model={tmp_path / 'no-such-model'}: no such folder" in result.stderr


def test_invalid_model_folder(tmp_path):
    result = run_eval(["--model", f"empty={tmp_path}", "--output-dir", str(tmp_path / "out")])

    assert result.returncode != 0
    assert f"--model empty={tmp_path}: could not load the model or its processor" in result.stderr


def test_fixed_caption_is_best_candidate():
    images = data_lib.load_splits(str(RSICD_MINI), ["train"])["train"].images
    references = [list(image.captions) for image in images]
    candidates = [caption for refs in references for caption in refs]
    caption, score = eval_bleu.best_fixed_caption(candidates, references)
    # Brute force: every distinct candidate scored by sacrebleu itself.
    scores = {c: eval_bleu.corpus_bleu([c] * len(references), references)["score"] for c in set(candidates)}
    assert caption in candidates
    assert score == pytest.approx(scores[caption], abs=1e-9)
    assert scores[caption] == max(scores.values())


def test_fixed_caption_baseline_listed_first(small_model_dir, tmp_path):
    output_dir = tmp_path / "out"
    result = run_eval(["--model", f"fresh={small_model_dir}", "--fixed-caption-baseline", "--max-images", "4",
                       "--num-beams", "1", "--output-dir", str(output_dir)])
    assert result.returncode == 0, result.stderr
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert [m["name"] for m in metrics["models"]] == ["fixed-caption", "fresh"]
    predictions = read_jsonl(output_dir / "predictions-fixed-caption.jsonl")
    assert len(predictions) == 4
    assert len({line["caption"] for line in predictions}) == 1
    assert predictions[0]["caption"] in metrics["models"][0]["model"]
