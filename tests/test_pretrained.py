"""The pretrained models that ship with msakit (`text-mosi`, the default of `msakit predict`)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from msakit import api
from msakit.data import load_label_csv, make_batch
from msakit.errors import MsakitError
from msakit.features.config import FeatureConfig, load_feature_config
from msakit.inference.pretrained import (
    CARD,
    CONFIG,
    DEFAULT_MODEL,
    WEIGHTS,
    export_pretrained,
    list_pretrained,
    load_pretrained,
    pretrained_root,
)
from msakit.models.registry import build_config, create_model
from msakit.training.checkpoint import REQUIRED, load_checkpoint
from msakit.training.config import training_config
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer, build_optimizer

REAL_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mosi-text" / "label.csv"
BUDGET_BYTES = 5_000_000  # what the repository may hold for a shipped model


@pytest.fixture(scope="module")
def default_model():
    return load_pretrained()


def scores(model, texts: list[str], tmp_path: Path, tokenizer: str = "minilm") -> np.ndarray:
    """The model's scores of `texts`, tokenised as label.csv clips are."""
    rows = ["id,text,label,mode", *(f'c_{i},"{t}",0,test' for i, t in enumerate(texts)),
            "a_1,x,0,train", "b_1,x,0,dev"]
    (tmp_path / "label.csv").write_text("\n".join(rows) + "\n")
    split = load_label_csv(tmp_path / "label.csv", tokenizer=tokenizer, max_len=model.dims.text_len).test
    with torch.no_grad():
        return model(make_batch(split, np.arange(len(texts)))).pred.numpy()


def test_the_default_model_ships_small_and_loads_like_a_checkpoint(default_model):
    model, meta = default_model
    assert DEFAULT_MODEL in list_pretrained()
    folder = pretrained_root() / DEFAULT_MODEL
    assert sum(f.stat().st_size for f in folder.iterdir()) < BUDGET_BYTES
    assert not model.training and all(p.device.type == "cpu" for p in model.parameters())
    # what Predictor reads from a checkpoint's metadata
    assert set(REQUIRED) - {"state_dict"} <= set(meta)
    assert meta["model_name"] == "text_only" and meta["dataset"]["family"] == "mosi"
    features = FeatureConfig.from_dict(meta["dataset"]["features"]["config"])
    assert features.text.encoder == meta["model_config"]["text_encoder"] == "minilm"
    assert features.text.max_tokens == model.dims.text_len
    assert features.transcript.source == "auto"
    assert meta["normalization"] == {}
    assert meta["card"] == (folder / CARD).read_text() and meta["weights"]["sha256"] in meta["card"]
    # only the adapters and the head are stored, in the shapes the settings give
    config = model.config
    assert config.text_adapter == "lora"
    stored = json.loads((folder / CONFIG).read_text())["weights"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert stored["parameters"] == sum(p.numel() for p in trainable) < 1_000_000
    query = model.text_encoder.model.encoder.layer[0].attention.self.query
    assert query.lora_A["default"].weight.shape == (config.lora_rank, 384)
    assert query.lora_B["default"].weight.shape == (384, config.lora_rank)
    assert model.head[-1].weight.shape == (1, config.hidden)


def test_obviously_polar_sentences_score_on_their_side(default_model, tmp_path):
    model, _ = default_model
    positive, negative = scores(model, [
        "this movie was wonderful, i loved every minute of it",
        "this movie was terrible, a boring waste of time",
    ], tmp_path)
    assert np.isfinite([positive, negative]).all()
    assert positive > 1 and negative < -1


TINY_CLIPS = [("i loved it", 2.5), ("it was awful", -2.0), ("okay i guess", 0.2)]


def tiny_run(tmp_path: Path, tiny_bert: str, name: str) -> Path:
    rows = ["id,text,label,mode"] + [f"{split}{i}_1,{text},{label},{split}"
                                     for split in ("train", "dev", "test")
                                     for i, (text, label) in enumerate(TINY_CLIPS)]
    (tmp_path / "label.csv").write_text("\n".join(rows) + "\n")
    data = load_label_csv(tmp_path / "label.csv", tokenizer=tiny_bert, max_len=8)
    api.train("text_only", data, seeds=[3], epochs=2, output=tmp_path / name, progress=False, overrides=[
        f"model.text_encoder={tiny_bert}", "model.text_adapter=lora", "model.lora_rank=2",
        "training.batch_size=2"])
    return tmp_path / name / "seed-3.pt"


def test_lora_trains_only_the_adapters_at_the_encoder_rate(tmp_path, tiny_bert):
    rows = ["id,text,label,mode", "a_1,good,1,train", "b_1,bad,-1,dev", "c_1,ok,0,test"]
    (tmp_path / "label.csv").write_text("\n".join(rows) + "\n")
    dims = load_label_csv(tmp_path / "label.csv", tokenizer=tiny_bert, max_len=8).dims
    model = create_model("text_only", {"text_encoder": tiny_bert, "text_adapter": "lora", "lora_rank": 2},
                         dims)
    adapters = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert adapters == {id(p) for p in model.pretrained_parameters() if p.requires_grad}
    assert {id(p) for p in model.parameters() if p.requires_grad} == adapters | {
        id(p) for p in model.head.parameters()}
    optimizer = build_optimizer(model, TrainConfig(lr=0.1, encoder_lr=0.02))
    assert {id(p) for g in optimizer.param_groups if g["lr"] == 0.02 for p in g["params"]} == adapters
    with pytest.raises(MsakitError, match="model.text_adapter=lora adapts a text encoder"):
        build_config("text_only", {"text_source": "features", "text_adapter": "lora"})


def test_an_export_repeats_byte_for_byte_and_scores_as_its_checkpoint(tmp_path, tiny_bert):
    features = load_feature_config(overrides=[f"text.encoder={tiny_bert}", "text.max_tokens=8"]).to_dict()
    exports = []
    for name in ("a", "b"):
        checkpoint = tiny_run(tmp_path, tiny_bert, name)
        exports.append(export_pretrained(checkpoint, tmp_path / f"{name}-export", name="tiny",
                                         features=features))
    first, second = ((tmp_path / f"{n}-export" / WEIGHTS).read_bytes() for n in ("a", "b"))
    assert first == second and exports[0]["weights"] == exports[1]["weights"]
    trained, _ = load_checkpoint(checkpoint)
    loaded, meta = load_pretrained(tmp_path / "b-export")
    assert meta["card"] == "" and meta["text_encoder"]["name"] == tiny_bert
    texts = ["i loved it", "it was awful"]
    np.testing.assert_array_equal(scores(trained, texts, tmp_path, tiny_bert),
                                  scores(loaded, texts, tmp_path, tiny_bert))


def copy_of_default(tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(pretrained_root() / DEFAULT_MODEL, folder)
    return folder


def one_line_error(folder, match: str) -> None:
    with pytest.raises(MsakitError, match=match) as error:
        load_pretrained(folder)
    assert "\n" not in str(error.value)


def test_a_damaged_artifact_is_a_one_line_error(tmp_path):
    one_line_error("no-such-model", "no pretrained model 'no-such-model'.*available: .*text-mosi")
    folder = copy_of_default(tmp_path)
    weights, config = folder / WEIGHTS, folder / CONFIG
    good_weights, document = weights.read_bytes(), json.loads(config.read_text())
    weights.write_bytes(good_weights[:-1] + bytes([good_weights[-1] ^ 0xFF]))
    one_line_error(folder, "model.safetensors is damaged: its sha256")
    weights.unlink()
    one_line_error(folder, "model.safetensors is not readable")
    weights.write_bytes(b"not safetensors")
    config.write_text(json.dumps({**document, "weights": {
        **document["weights"], "sha256": hashlib.sha256(b"not safetensors").hexdigest()}}))
    one_line_error(folder, "not a readable safetensors file")
    weights.write_bytes(good_weights)
    config.write_text(json.dumps({**document, "model_config": None}))
    one_line_error(folder, "damaged pretrained-model configuration: it has a NoneType as 'model_config'")
    config.write_text(json.dumps({**document, "format": "something else"}))
    one_line_error(folder, "not an msakit pretrained-model configuration")
    config.write_text(json.dumps(document)[:50])
    one_line_error(folder, "config.json is not readable JSON")


@pytest.mark.skipif(not REAL_LABELS.is_file(), reason="the CMU-MOSI label.csv (../shared) is not here")
def test_the_recorded_dev_metrics_are_the_shipped_weights(default_model):
    model, meta = default_model
    data = load_label_csv(REAL_LABELS, max_len=model.dims.text_len)
    trainer = Trainer(model, training_config(meta["training_config"]), "mosi", progress=False)
    recorded = meta["build"]["metrics"]["valid"]
    measured = trainer.evaluate(data.valid)
    assert measured == pytest.approx(recorded, abs=1e-6)
