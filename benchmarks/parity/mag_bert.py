"""Numerical parity of msakit's MAG-BERT with MMSA's (thuiar/MMSA, models/singleTask/BERT_MAG.py and
the L1 criterion of trains/singleTask/BERT_MAG.py).

    git clone https://github.com/thuiar/MMSA /path/to/MMSA
    pip install --target /path/to/tf4 "transformers==4.46.3"
    PYTHONPATH=/path/to/tf4 python benchmarks/parity/mag_bert.py --official /path/to/MMSA

MMSA's BERT_MAG calls transformers 4 helpers that transformers 5 removed (`init_weights` as the
initialiser, `get_extended_attention_mask`, `get_head_mask`), so the check runs under transformers 4
(on both sides: msakit's model reads only BERT's embeddings, encoder and pooler, which both major
versions have). Builds MMSA's MAG_BertForSequenceClassification with `from_pretrained` (as its
BERT_MAG does) from the same tiny random BERT folder (tests/tiny_bert.py: 1 layer, width 32) that
msakit's `mag_bert` loads, with each dataset's settings from MMSA's config_regression.json (key
"bert_mag", the aligned feature widths), copies the official weights into msakit's model by name
with strict loading and feeds both the same random unpadded aligned inputs (every token attended,
audio and vision at the token steps). Compares the prediction in evaluation mode, then trains both
for three epochs over 16 samples in batches of 4 (the same shuffled order, the same dropout draws,
SGD on both): at every step the predictions, the L1 loss and every parameter's gradient. The last
row feeds zero audio and vision, where MMSA's gate takes its zero-norm branch (the displacement is
zero while the gate's biases are, as initialised; SGD makes them non-zero after the first step).
Writes benchmarks/results/parity/mag_bert.{json,md}.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from msakit_parity import (
    full_batch,
    gradient_difference,
    max_abs,
    official_commit,
    parameter_count,
    parse_args,
    rename_state,
    write_report,
)
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.models import create_model
from msakit.training.config import resolve_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from tiny_bert import make_tiny_bert  # noqa: E402  (the tests' tiny BERT, on both sides)

REPOSITORY = "thuiar/MMSA"
COMMIT = "a94e65d07fa1ae0d44e552390074b29b0898edfd"
DATASETS = ("mosi", "mosei", "sims")  # MMSA's bert_mag settings cover these three
SAMPLES, BATCH, EPOCHS, TEXT_LEN = 16, 4, 3, 12
TEXT_DIM = 32  # the tiny BERT's width

# official parameter name -> msakit's (the first matching rule)
RENAMES = [
    (r"^model\.bert\.MAG\.W_hv\.", "gate.gate_vision."),
    (r"^model\.bert\.MAG\.W_ha\.", "gate.gate_audio."),
    (r"^model\.bert\.MAG\.W_v\.", "gate.shift_vision."),
    (r"^model\.bert\.MAG\.W_a\.", "gate.shift_audio."),
    (r"^model\.bert\.MAG\.LayerNorm\.", "gate.norm."),
    (r"^model\.bert\.", "text_encoder.model."),
    (r"^model\.classifier\.", "head."),
]


def official_module(root: Path) -> types.ModuleType:
    """MMSA's BERT_MAG.py alone (MMSA/__init__ would import its whole runner)."""
    path = root / "src" / "MMSA" / "models" / "singleTask" / "BERT_MAG.py"
    spec = importlib.util.spec_from_file_location("mmsa_bert_mag", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_args(root: Path, dataset: str) -> types.SimpleNamespace:
    config = json.loads((root / "src" / "MMSA" / "config" / "config_regression.json").read_text())
    widths = config["datasetCommonParams"][dataset]  # MMSA's config.py: aligned where there is one
    params = {**config["bert_mag"]["commonParams"], **config["bert_mag"]["datasetParams"][dataset],
              **widths.get("aligned", widths["unaligned"])}
    params["feature_dims"] = [TEXT_DIM, *params["feature_dims"][1:]]
    params.update(device="cpu", train_mode="regression", dataset_name=dataset, model_name="bert_mag")
    return types.SimpleNamespace(**params)


def official_model(module: types.ModuleType, args: types.SimpleNamespace, bert: str) -> nn.Module:
    """MMSA's BERT_MAG wrapper around its MAG_BertForSequenceClassification, loaded from `bert`
    (its constructor hard-codes bert-base-uncased / bert-base-chinese)."""
    model = module.BERT_MAG.__new__(module.BERT_MAG)
    nn.Module.__init__(model)
    model.model = module.MAG_BertForSequenceClassification.from_pretrained(bert, args=args, num_labels=1)
    return model


class Pair:
    """MMSA's model beside msakit's, with the same weights and inputs."""

    def __init__(self, root: Path, dataset: str, bert: str, zero_nonverbal: bool) -> None:
        torch.manual_seed(0)
        self.args = official_args(root, dataset)
        self.official = official_model(official_module(root), self.args, bert)
        audio_dim, vision_dim = self.args.feature_dims[1:]
        dims = FeatureDims(text=None, audio=audio_dim, vision=vision_dim, text_len=TEXT_LEN,
                           audio_len=TEXT_LEN, vision_len=TEXT_LEN, has_text_ids=True)
        config = resolve_config("mag_bert", dataset, [f"model.text_encoder={bert}"])["model"]
        self.ours = create_model("mag_bert", config, dims)
        self.ours.load_state_dict(rename_state(self.official.state_dict(), RENAMES), strict=True)
        self.official_name = rename_state({k: k for k, _ in self.official.named_parameters()}, RENAMES)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(1000, 2000, (SAMPLES, TEXT_LEN), generator=generator)
        self.text = torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=1)
        scale = 0.0 if zero_nonverbal else 1.0
        self.audio = scale * torch.randn(SAMPLES, TEXT_LEN, audio_dim, generator=generator)
        self.vision = scale * torch.randn(SAMPLES, TEXT_LEN, vision_dim, generator=generator)
        self.labels = (torch.rand(SAMPLES, generator=generator) * 2 - 1) * 3
        self.order = torch.Generator().manual_seed(2)

    def batch(self, index: torch.Tensor) -> Batch:
        text = self.text[index]
        batch = full_batch(self.labels[index], audio=self.audio[index], vision=self.vision[index])
        return batch.with_updates(text_ids=text, text_mask=text[:, 1] > 0)

    def official_prediction(self, index: torch.Tensor) -> torch.Tensor:
        return self.official(self.text[index], self.audio[index], self.vision[index])["M"]


def worst(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: max(r[k] for r in rows) for k in rows[0]}


def compare(root: Path, dataset: str, bert: str, zero_nonverbal: bool = False) -> dict:
    """Evaluation predictions, then every training step with the same batches and dropout draws."""
    pair = Pair(root, dataset, bert, zero_nonverbal)
    official, ours = pair.official, pair.ours
    everything = torch.arange(SAMPLES)
    official.eval()
    ours.eval()
    with torch.no_grad():
        eval_diff = max_abs(pair.official_prediction(everything).squeeze(-1),
                            ours(pair.batch(everything)).pred)
    criterion = nn.L1Loss()  # MMSA's regression criterion, on (B, 1) outputs and labels
    sgd = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (official, ours)]
    steps, gradients, step = [], [], 0
    for _ in range(EPOCHS):
        for index in torch.randperm(SAMPLES, generator=pair.order).split(BATCH):
            official.train()
            ours.train()
            for optimizer in sgd:
                optimizer.zero_grad()
            step += 1
            torch.manual_seed(100 + step)
            theirs = pair.official_prediction(index)
            their_loss = criterion(theirs, pair.labels[index].view(-1, 1))
            torch.manual_seed(100 + step)
            mine = ours(pair.batch(index))
            my_loss = F.l1_loss(mine.pred, pair.labels[index])
            their_loss.backward()
            my_loss.backward()
            steps.append({"prediction (train)": max_abs(theirs.squeeze(-1), mine.pred),
                          "L1 loss": max_abs(their_loss, my_loss)})
            gradients.append(gradient_difference(official, ours, pair.official_name.__getitem__))
            for optimizer in sgd:
                optimizer.step()
    return {
        "dataset": f"{dataset}, zero audio and vision" if zero_nonverbal else dataset,
        "parameters": {"official": parameter_count(official), "msakit": parameter_count(ours)},
        "max_abs_diff": {"prediction (eval)": eval_diff, **worst(steps)},
        "gradients": max(gradients, key=lambda g: g["relative"]),
        "steps": step,
    }


def main() -> None:
    args = parse_args("mag_bert", REPOSITORY, COMMIT)
    if int(transformers.__version__.split(".")[0]) >= 5:
        sys.exit(f"MMSA's BERT_MAG needs transformers 4 (found {transformers.__version__}): "
                 "run with PYTHONPATH pointing at a transformers 4 install (see this file's docstring)")
    with tempfile.TemporaryDirectory() as folder:
        bert = str(make_tiny_bert(Path(folder)))
        rows = [compare(args.official, d, bert) for d in DATASETS]
        rows.append(compare(args.official, "mosi", bert, zero_nonverbal=True))
    print(write_report(
        "mag_bert", args.output, REPOSITORY, official_commit(args.official, COMMIT), rows, switches={},
        notes=(f"Both sides load the same tiny random BERT (tests/tiny_bert.py: 1 layer, width {TEXT_DIM}) "
               "in place of bert-base, under transformers "
               f"{transformers.__version__} (MMSA's code needs 4.x); parameter counts include it. "
               f"Inputs are unpadded and aligned ({TEXT_LEN} tokens, all attended, audio and vision at "
               f"the same {TEXT_LEN} steps), {SAMPLES} training samples, labels uniform in [-3, 3]. "
               f"Training rows: {EPOCHS} epochs of {SAMPLES // BATCH} batches of {BATCH} in the same "
               "shuffled order, dropout active with the same draws, SGD (lr 0.05) on both; every column "
               "is the largest difference over all steps (before each step's update). The official "
               "weights are MMSA's from_pretrained initialisation (gate and head normal(0, 0.02), zero "
               "biases), copied into msakit's model."),
    ))


if __name__ == "__main__":
    main()
