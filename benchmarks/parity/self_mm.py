"""Numerical parity of msakit's Self-MM with MMSA's (thuiar/MMSA, models/multiTask/SELF_MM.py and
trains/multiTask/SELF_MM.py).

    git clone https://github.com/thuiar/MMSA /path/to/MMSA
    python benchmarks/parity/self_mm.py --official /path/to/MMSA

Builds MMSA's model and trainer from its own config_regression.json (key "self_mm", each dataset's
settings), with the same tiny random BERT (tests/tiny_bert.py) loaded on both sides in place of
bert-base (so `text_out` is its width, 32), copies the weights into msakit's `self_mm` by name with
strict loading and feeds both the same random unpadded inputs. Compares the predictions in
evaluation mode, then trains both for three epochs over 16 samples in batches of 4 (the same
shuffled order, the same dropout draws, SGD on both): at every step the four predictions, the
fusion loss, each unimodal loss (MMSA's `weighted_loss` on its label map), the total, every
parameter's gradient, and after the step's ULGM update (MMSA's `update_labels`, `update_features`,
`update_centers`) the generated labels and the centres of the whole memory. The loop row runs
MMSA's own training loop (trains/multiTask/SELF_MM.py `do_train`: its five Adam parameter groups,
four batches' gradients summed per step, an epoch's last incomplete group dropped, the ULGM after
every batch) against msakit's (`Trainer.train_epoch` with the YAML's `accumulate_steps`, the
model's `parameter_groups` and `optimizer: adam`) over the same batches, each group at its
configured rate and weight decay (L2 on both sides), in float64 with every dropout off, and
compares the gradients each optimiser step reads, the generated labels and the weights after
training.
Writes benchmarks/results/parity/self_mm.{json,md}.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from mmsa_loop import float64_split, loop_row, recording_steps, run_do_train, run_msakit_loop, without_dropout
from msakit_parity import (
    full_batch,
    gradient_difference,
    max_abs,
    mmsa_packages,
    official_commit,
    parameter_count,
    parse_args,
    rename_state,
    write_report,
)

from msakit.data.batching import training_shards
from msakit.data.schema import Batch, FeatureDims
from msakit.models import create_model
from msakit.models.self_mm import HEADS, UNIMODAL, SelfMM
from msakit.training.config import resolve_config
from msakit.training.settings import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from tiny_bert import make_tiny_bert  # noqa: E402  (the tests' tiny BERT, on both sides)

REPOSITORY = "thuiar/MMSA"
COMMIT = "a94e65d07fa1ae0d44e552390074b29b0898edfd"
DATASETS = ("mosi", "mosei", "sims", "simsv2")
SAMPLES, BATCH, EPOCHS = 16, 4, 3
LOOP_SAMPLES = 18  # 5 batches of 4 an epoch: one group of 4 accumulated, the fifth dropped
TEXT_LEN, AUDIO_LEN, VISION_LEN = 12, 20, 15
TASK = {"fusion": "M", "text": "T", "audio": "A", "vision": "V"}

# official parameter name -> msakit's (the first matching rule)
RENAMES = [
    (r"^text_model\.", "text_encoder."),
    (r"^audio_model\.linear_1\.", "audio.linear."), (r"^audio_model\.", "audio."),
    (r"^video_model\.linear_1\.", "vision.linear."), (r"^video_model\.", "vision."),
    (r"^post_video_layer_(\d)\.", r"heads.vision.layer_\1."),
    (r"^post_(fusion|text|audio)_layer_(\d)\.", r"heads.\1.layer_\2."),
]


def official_modules(root: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """MMSA's model and trainer modules, imported without MMSA/__init__ (which loads its whole
    runner and every model's dependencies): package stand-ins hold the two files' relative imports."""
    mmsa_packages(root, "MMSA", "MMSA.models", "MMSA.models.subNets", "MMSA.models.multiTask", "MMSA.trains",
                  "MMSA.trains.multiTask")
    sys.modules["MMSA.models.subNets"].BertTextEncoder = importlib.import_module(
        "MMSA.models.subNets.BertTextEncoder").BertTextEncoder
    return (importlib.import_module("MMSA.models.multiTask.SELF_MM"),
            importlib.import_module("MMSA.trains.multiTask.SELF_MM"))


def official_args(root: Path, dataset: str, bert: str, text_dim: int,
                  samples: int = SAMPLES) -> types.SimpleNamespace:
    config = json.loads((root / "src" / "MMSA" / "config" / "config_regression.json").read_text())
    params = {**config["self_mm"]["commonParams"], **config["self_mm"]["datasetParams"][dataset],
              **config["datasetCommonParams"][dataset]["unaligned"]}
    params["feature_dims"] = [text_dim, *params["feature_dims"][1:]]
    params.update(text_out=text_dim, pretrained=bert, train_samples=samples, device="cpu",
                  train_mode="regression", dataset_name=dataset, model_name="self_mm")
    return types.SimpleNamespace(**params)


class Pair:
    """MMSA's model and trainer beside msakit's model, with the same weights and inputs."""

    def __init__(self, root: Path, dataset: str, bert: str, dtype: torch.dtype = torch.float32,
                 **settings: object) -> None:
        model_module, trainer_module = official_modules(root)
        torch.manual_seed(0)
        text_dim = 32  # the tiny BERT's width
        self.args = official_args(root, dataset, bert, text_dim)
        self.official = model_module.SELF_MM(self.args)
        self.trainer = trainer_module.SELF_MM(self.args)
        audio_dim, vision_dim = self.args.feature_dims[1:]
        dims = FeatureDims(text=None, audio=audio_dim, vision=vision_dim, text_len=TEXT_LEN,
                           audio_len=AUDIO_LEN, vision_len=VISION_LEN, has_text_ids=True)
        overrides = [f"model.text_encoder={bert}", *(f"model.{k}={v}" for k, v in settings.items())]
        config = resolve_config("self_mm", dataset, overrides)["model"]
        self.ours: SelfMM = create_model("self_mm", config, dims)
        self.ours.load_state_dict(rename_state(self.official.state_dict(), RENAMES), strict=True)
        self.official.to(dtype)
        self.ours.to(dtype)
        for table in (self.trainer.feature_map, self.trainer.label_map):
            for key in table:
                table[key] = table[key].to(dtype)
        self.official_name = rename_state({k: k for k, _ in self.official.named_parameters()}, RENAMES)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(1000, 2000, (SAMPLES, TEXT_LEN), generator=generator)
        self.text = torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=1)
        self.audio = torch.randn(SAMPLES, AUDIO_LEN, audio_dim, generator=generator).to(dtype)
        self.vision = torch.randn(SAMPLES, VISION_LEN, vision_dim, generator=generator).to(dtype)
        self.labels = ((torch.rand(SAMPLES, generator=generator) * 2 - 1) * self.args.H).to(dtype)
        self.order = torch.Generator().manual_seed(2)

    def batch(self, index: torch.Tensor) -> Batch:
        text = self.text[index]
        batch = full_batch(self.labels[index], audio=self.audio[index], vision=self.vision[index])
        return batch.with_updates(index=index, ids=[str(i) for i in index.tolist()], text_ids=text,
                                  text_mask=text[:, 1] > 0)

    def official_outputs(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        size = len(index)
        return self.official(self.text[index], (self.audio[index], torch.full((size,), AUDIO_LEN)),
                             (self.vision[index], torch.full((size,), VISION_LEN)))

    def start(self) -> None:
        """Both label memories from the labels (MMSA's `init_labels`, msakit's epoch hook)."""
        everything = torch.arange(SAMPLES)
        self.trainer.init_labels(everything, self.labels)
        self.ours.on_train_epoch_start(1, lambda: iter([self.batch(everything)]))

    def official_losses(self, outputs: dict[str, torch.Tensor],
                        index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {head: self.trainer.weighted_loss(
            outputs[TASK[head]], self.trainer.label_map[head][index], indexes=index,
            mode=head) for head in HEADS}

    def official_update(self, outputs: dict[str, torch.Tensor], index: torch.Tensor, epoch: int) -> None:
        """MMSA's ULGM step, in its trainer's order."""
        features = [outputs[f"Feature_{k}"].detach() for k in ("f", "t", "a", "v")]
        if epoch > 1:
            self.trainer.update_labels(*features, epoch, index, outputs)
        self.trainer.update_features(*features, index)
        self.trainer.update_centers()

    def memory_difference(self) -> dict[str, float]:
        memory = self.ours.memory
        return {
            "generated labels": max(max_abs(self.trainer.label_map[h], memory.labels[h])
                                    for h in HEADS),
            "centres": max(max_abs(torch.stack([self.trainer.center_map[h]["pos"],
                                                self.trainer.center_map[h]["neg"]]),
                                   memory.centres[h]) for h in HEADS),
        }


def worst(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: max(r[k] for r in rows) for k in rows[0]}


def compare_steps(root: Path, dataset: str, bert: str) -> dict:
    """Evaluation predictions, then every training step with MMSA's batches (dropout active)."""
    pair = Pair(root, dataset, bert)
    official, ours = pair.official, pair.ours
    everything = torch.arange(SAMPLES)
    official.eval()
    ours.eval()
    with torch.no_grad():
        eval_diff = max_abs(pair.official_outputs(everything)["M"].squeeze(-1),
                            ours(pair.batch(everything)).pred)
    pair.start()
    sgd = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (official, ours)]
    steps, gradients, step = [], [], 0
    for epoch in range(1, EPOCHS + 1):
        ours.on_train_epoch_start(epoch, lambda: iter([pair.batch(everything)]))
        for index in torch.randperm(SAMPLES, generator=pair.order).split(BATCH):
            official.train()
            ours.train()
            for optimizer in sgd:
                optimizer.zero_grad()
            step += 1
            torch.manual_seed(100 + step)
            theirs = pair.official_outputs(index)
            their_losses = pair.official_losses(theirs, index)
            their_total = sum(their_losses.values())
            torch.manual_seed(100 + step)
            mine = ours(pair.batch(index))
            my_losses = {"fusion": F.l1_loss(mine.pred, pair.labels[index]), **mine.losses}
            my_total = sum(my_losses.values())
            their_total.backward()
            my_total.backward()
            pair.official_update(theirs, index, epoch)
            row = {
                "prediction (train)": max_abs(theirs["M"].squeeze(-1), mine.pred),
                "unimodal predictions": max(max_abs(theirs[TASK[h]].squeeze(-1), mine.features[f"pred_{h}"])
                                            for h in UNIMODAL),
                **{f"{h} loss": max_abs(their_losses[h], my_losses[h]) for h in HEADS},
                "total loss": max_abs(their_total, my_total),
                **pair.memory_difference(),
            }
            steps.append(row)
            gradients.append(gradient_difference(official, ours, pair.official_name.__getitem__))
            for optimizer in sgd:
                optimizer.step()
    return {
        "dataset": dataset,
        "parameters": {"official": parameter_count(official), "msakit": parameter_count(ours)},
        "max_abs_diff": {"prediction (eval)": eval_diff, **worst(steps)},
        "gradients": max(gradients, key=lambda g: g["relative"]),
        "steps": step,
        # how far the generated labels went from the given ones: what the label columns compare
        "largest_generated_shift": max(max_abs(pair.trainer.label_map[h], pair.labels) for h in UNIMODAL),
    }


def bert_without_dropout(folder: Path) -> str:
    """A copy of the tiny BERT of `folder` with its hidden and attention dropout at 0 (MMSA's loop
    puts BERT in training mode, and the two sides would draw its masks differently)."""
    copy = folder.with_name(folder.name + "-without-dropout")
    shutil.copytree(folder, copy, dirs_exist_ok=True)
    config = json.loads((copy / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


def compare_loop(root: Path, dataset: str, bert: str) -> dict:
    """MMSA's do_train against msakit's loop for EPOCHS epochs, float64, no dropout."""
    model_module, trainer_module = official_modules(root)
    torch.manual_seed(0)
    args = official_args(root, dataset, bert, 32, samples=LOOP_SAMPLES)
    official = model_module.SELF_MM(args)
    audio_dim, vision_dim = args.feature_dims[1:]
    dims = FeatureDims(text=None, audio=audio_dim, vision=vision_dim, text_len=TEXT_LEN,
                       audio_len=AUDIO_LEN, vision_len=VISION_LEN, has_text_ids=True)
    resolved = resolve_config("self_mm", dataset, [f"model.text_encoder={bert}"])
    our_model, our_training = resolved["model"], resolved["training"]
    decays = {"BERT": (args.weight_decay_bert, our_training["encoder_weight_decay"]),
              "audio": (args.weight_decay_audio, our_model["audio_weight_decay"]),
              "vision": (args.weight_decay_video, our_model["vision_weight_decay"]),
              "rest": (args.weight_decay_other, our_training["weight_decay"])}
    if any(theirs != mine for theirs, mine in decays.values()):
        raise RuntimeError(f"MMSA's and msakit's weight decays differ (MMSA, msakit): {decays}")
    ours: SelfMM = create_model("self_mm", resolved["model"], dims)
    ours.load_state_dict(rename_state(official.state_dict(), RENAMES), strict=True)
    official_name = rename_state({k: k for k, _ in official.named_parameters()}, RENAMES)
    for model in (official, ours):
        without_dropout(model)
        model.double()

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (LOOP_SAMPLES, TEXT_LEN), generator=generator)
    text = torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=1)
    split = float64_split(((torch.rand(LOOP_SAMPLES, generator=generator) * 2 - 1) * args.H).numpy(),
                          text.numpy(), (AUDIO_LEN, VISION_LEN), (audio_dim, vision_dim), generator)

    def official_batch(index: torch.Tensor) -> dict:
        return {"text": text[index], "audio": torch.as_tensor(split.audio[index.numpy()]),
                "vision": torch.as_tensor(split.vision[index.numpy()]), "index": index,
                "id": [str(i) for i in index.tolist()],
                "labels": {"M": torch.as_tensor(split.labels[index.numpy()]).double()},
                "audio_lengths": torch.full((len(index),), AUDIO_LEN),
                "vision_lengths": torch.full((len(index),), VISION_LEN)}

    replay = torch.Generator().manual_seed(3)  # the orders msakit's loop draws below
    epochs = [[official_batch(torch.arange(LOOP_SAMPLES))]]  # do_train's first pass: init_labels
    epochs += [[official_batch(b.index) for b, _ in training_shards(split, BATCH, replay)]
               for _ in range(EPOCHS)]
    official_trainer = trainer_module.SELF_MM(args)
    for table in (official_trainer.feature_map, official_trainer.label_map):
        for key in table:  # MMSA's index_put needs its features' dtype
            table[key] = table[key].double()
    their_steps = []
    with recording_steps(torch.optim.Adam, official, their_steps):
        run_do_train(official_trainer, official, epochs, EPOCHS)

    config = TrainConfig(**{**resolved["training"], "batch_size": BATCH, "epochs": EPOCHS, "device": "cpu"})
    my_steps, optimizer = run_msakit_loop(ours, config, split, EPOCHS, seed=3)
    labels = max(max_abs(official_trainer.label_map[h], ours.memory.labels[h]) for h in HEADS)
    return {**loop_row(f"{dataset}, MMSA's training loop (float64)", official, ours, official_name,
                       their_steps, my_steps, differences={"generated labels": labels}),
            "optimizer": type(optimizer).__name__,
            "learning_rates": sorted({g["lr"] for g in optimizer.param_groups}),
            "weight_decays (MMSA = msakit)": {k: theirs for k, (theirs, _) in decays.items()}}


def main() -> None:
    args = parse_args("self_mm", REPOSITORY, COMMIT)
    with tempfile.TemporaryDirectory() as folder:
        bert = str(make_tiny_bert(Path(folder) / "bert"))
        rows = [compare_steps(args.official, d, bert) for d in DATASETS]
        rows += [compare_loop(args.official, d, bert_without_dropout(Path(bert))) for d in ("mosi", "mosei")]
    shifts = ", ".join(f"{r['dataset']} {r['largest_generated_shift']:.2f}" for r in rows[:len(DATASETS)])
    print(write_report(
        "self_mm", args.output, REPOSITORY, official_commit(args.official, COMMIT), rows,
        switches={},
        notes=(f"Both sides load the same tiny random BERT (tests/tiny_bert.py: 1 layer, width 32) in "
               f"place of bert-base, so MMSA's `text_out` is 32; parameter counts include it. "
               f"Inputs are unpadded ({TEXT_LEN} tokens, {AUDIO_LEN} audio and {VISION_LEN} vision "
               f"frames), {SAMPLES} training samples, labels uniform in [-H, H]. Per-step rows: "
               f"{EPOCHS} epochs of {SAMPLES // BATCH} batches of {BATCH} in the same shuffled order, "
               "dropout active with the same draws, SGD (lr 0.05) on both; every column is the "
               "largest difference over all steps (losses, predictions and gradients before the "
               "step's update; generated labels and centres over the whole memory after it; labels "
               "are generated from epoch 2 on). Loop rows: "
               f"{LOOP_SAMPLES} samples, {EPOCHS} epochs of 5 batches of {BATCH} (one step on the "
               "first four, the fifth dropped), each side's own loop and optimiser (MMSA: do_train, "
               "Adam over its five groups; msakit: its MMSA settings' Adam, `optimizer: adam`, over "
               "the encoder's, the model's audio and vision groups and the rest), learning rates and "
               "weight decays (L2, biases decayed except BERT's and its LayerNorm gains, on both "
               "sides) from each side's config, equal on both: "
               + "; ".join(f"{r['dataset'].split(',')[0]} rates "
                           f"{', '.join(f'{x:g}' for x in r['learning_rates'])}, decays "
                           + ", ".join(f"{k} {v:g}" for k, v in r["weight_decays (MMSA = msakit)"].items())
                           for r in rows if "learning_rates" in r)
               + "; the tiny BERT with its dropout at 0, weights and inputs in float64 (MMSA's label "
               "memory too; "
               "msakit's keeps the float32 of the labels its loop reads); the gradients column is the "
               "largest over every step, as the step reads them. The generated labels moved from the given "
               "ones by up to "
               f"{shifts} (largest |y_s - y_m| after the last step)."),
    ))


if __name__ == "__main__":
    main()
