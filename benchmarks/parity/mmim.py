"""Numerical parity of msakit's MMIM with MMSA's (thuiar/MMSA, models/singleTask/MMIM.py and
trains/singleTask/MMIM.py).

    git clone https://github.com/thuiar/MMSA /path/to/MMSA
    python benchmarks/parity/mmim.py --official /path/to/MMSA

Builds MMSA's model from its own config_regression.json (key "mmim", each dataset's settings and
feature widths), with the same tiny random BERT (tests/tiny_bert.py) loaded on both sides in place
of bert-base (so MMSA's `d_tout` is its width, 32), copies the weights into msakit's `mmim` by
name with strict loading and feeds both the same random unpadded inputs. Compares the predictions
in evaluation mode, then trains both for two epochs over 64 samples in batches of 16: MMSA with its
own trainer's `train_mmilb` and `train_others` (its two optimisers built as its `do_train` builds
them), msakit with `Trainer.train_epoch` (the bound phase, then the main phase), the batches in the
order msakit's loop draws, dropout active with the same draws. At every step: the prediction, every
loss term (bound phase: -lld; main phase: the task loss, alpha NCE, -beta lld, -beta H from the
third batch of an epoch on, their total) and every parameter's gradient as the optimiser steps
it (after clipping the whole model's norm); after the two epochs, every weight. Both sides step
Adam with L2 weight decay (MMSA's `optim`, msakit's MMSA settings' `optimizer: adam`, which the
bound phase's optimiser follows) at each side's configured decays (1e-4 for the bound, the rest
and BERT on both), every parameter decayed on both sides (msakit's MMSA settings'
`decay_norms_and_biases` and `encoder_decay_norms_and_biases`), checked parameter by parameter
before training. Rows, in float64: MOSI, MOSEI (the bound phase over half the batches) and SIMS, MMSA's
three published settings, and MOSI with the vision-audio bound (`add_va` / `va_bound`); then MOSI
in float32.
Writes benchmarks/results/parity/mmim.{json,md}.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from msakit_parity import (
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
from msakit.data.schema import FeatureDims, MultimodalDataset, Split
from msakit.models import create_model
from msakit.models.mmim import MMIM
from msakit.training.config import resolve_config
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer, build_optimizer, build_phase_optimizers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from tiny_bert import make_tiny_bert  # noqa: E402  (the tests' tiny BERT, on both sides)

REPOSITORY = "thuiar/MMSA"
COMMIT = "a94e65d07fa1ae0d44e552390074b29b0898edfd"
SAMPLES, BATCH, EPOCHS = 64, 16, 2
TEXT_LEN, AUDIO_LEN, VISION_LEN = 12, 20, 15
TEXT_DIM = 32  # the tiny BERT's width

# official parameter name -> msakit's (the first matching rule), then the inner renames
RENAMES = [
    (r"^bertmodel\.", "text_encoder."),
    (r"^acoustic_enc\.linear_1\.", "audio.linear."), (r"^acoustic_enc\.", "audio."),
    (r"^visual_enc\.linear_1\.", "vision.linear."), (r"^visual_enc\.", "vision."),
    (r"^mi_(tv|ta|va)\.", r"bounds.\1."),
    (r"^cpc_zt\.", "cpc.text."), (r"^cpc_zv\.", "cpc.vision."), (r"^cpc_za\.", "cpc.audio."),
    (r"^fusion_prj\.linear_1\.", "fusion_1."), (r"^fusion_prj\.linear_2\.", "fusion_2."),
    (r"^fusion_prj\.linear_3\.", "head."),
]
INNER = [(r"\.mlp_mu\.", ".mu."), (r"\.mlp_logvar\.", ".logvar."),
         (r"\.entropy_prj\.", ".entropy_projection.")]


def official_modules(root: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """MMSA's model and trainer modules, imported without MMSA/__init__ (which loads its whole
    runner and every model's dependencies): package stand-ins hold the two files' relative imports."""
    mmsa_packages(root, "MMSA", "MMSA.models", "MMSA.models.subNets", "MMSA.models.singleTask", "MMSA.trains",
                  "MMSA.trains.singleTask")
    sys.modules["MMSA.models.subNets"].BertTextEncoder = importlib.import_module(
        "MMSA.models.subNets.BertTextEncoder").BertTextEncoder
    return (importlib.import_module("MMSA.models.singleTask.MMIM"),
            importlib.import_module("MMSA.trains.singleTask.MMIM"))


def official_args(root: Path, dataset: str, bert: str, add_va: bool) -> types.SimpleNamespace:
    """MMSA's settings for `dataset`."""
    config = json.loads((root / "src" / "MMSA" / "config" / "config_regression.json").read_text())
    params = {**config["mmim"]["commonParams"], **config["mmim"]["datasetParams"][dataset],
              **config["datasetCommonParams"][dataset]["unaligned"]}
    params["feature_dims"] = [TEXT_DIM, *params["feature_dims"][1:]]
    params.update(pretrained=bert, train_samples=SAMPLES, device="cpu", train_mode="regression",
                  dataset_name=dataset, model_name="mmim", add_va=add_va)
    return types.SimpleNamespace(**params)


def random_split(audio_dim: int, vision_dim: int, dtype: torch.dtype) -> Split:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (SAMPLES, TEXT_LEN), generator=generator)
    ids[:, 0], ids[:, -1] = 101, 102
    text_bert = torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=1)
    labels = torch.rand(SAMPLES, generator=generator) * 6 - 3
    return Split(
        ids=np.array([f"clip{i}" for i in range(SAMPLES)]), labels=labels.numpy(), text=None,
        text_bert=text_bert.numpy(),
        audio=torch.randn(SAMPLES, AUDIO_LEN, audio_dim, generator=generator).to(dtype).numpy(),
        vision=torch.randn(SAMPLES, VISION_LEN, vision_dim, generator=generator).to(dtype).numpy(),
        audio_lengths=torch.full((SAMPLES,), AUDIO_LEN).numpy(),
        vision_lengths=torch.full((SAMPLES,), VISION_LEN).numpy(),
    )


def official_batch(split: Split, index: torch.Tensor) -> dict:
    """A batch as MMSA's data loader yields it."""
    index = index.numpy()
    return {"text": torch.as_tensor(split.text_bert[index]).float(),
            "audio": torch.as_tensor(split.audio[index]), "vision": torch.as_tensor(split.vision[index]),
            "labels": {"M": torch.as_tensor(split.labels[index])},
            "audio_lengths": torch.as_tensor(split.audio_lengths[index]),
            "vision_lengths": torch.as_tensor(split.vision_lengths[index])}


def recording_steps(optimizer: torch.optim.Optimizer, model: nn.Module, steps: list) -> None:
    """Keep, at each step of `optimizer`, every gradient of `model` as the step reads it."""
    step = optimizer.step

    def record(*args, **kwargs):
        steps.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
        return step(*args, **kwargs)

    optimizer.step = record
    # the LR scheduler's check that step() was not replaced: here it was, on purpose
    optimizer.step._wrapped_by_lr_sched = True


def recording_forward(model: nn.Module, calls: list) -> None:
    forward = model.forward

    def record(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(out)
        return out

    model.forward = record


def decay_by_parameter(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
    """The weight decay each of `optimizers` applies to each parameter of `model`, by name."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group["weight_decay"] for o in optimizers for group in o.param_groups
            for p in group["params"]}


def compare(root: Path, dataset: str, bert: str, add_va: bool = False,
            dtype: torch.dtype = torch.float64) -> dict:
    """One row."""
    model_module, trainer_module = official_modules(root)
    args = official_args(root, dataset, bert, add_va)
    torch.manual_seed(0)
    official = model_module.MMIM(args)
    for name, param in official.named_parameters():  # MMSA's do_train: Xavier-normal outside BERT
        if "bert" not in name and param.dim() > 1:
            nn.init.xavier_normal_(param)
    audio_dim, vision_dim = args.feature_dims[1:]
    split = random_split(audio_dim, vision_dim, dtype)
    data = MultimodalDataset("parity", "mosi", split, split, split)
    dims = FeatureDims(text=None, audio=audio_dim, vision=vision_dim, text_len=TEXT_LEN,
                       audio_len=AUDIO_LEN, vision_len=VISION_LEN, has_text_ids=True)
    resolved = resolve_config("mmim", dataset, [f"model.text_encoder={bert}", f"model.va_bound={add_va}"])
    decays = {"bound": (args.weight_decay_mmilb, resolved["model"]["bound_weight_decay"]),
              "rest": (args.weight_decay_main, resolved["training"]["weight_decay"]),
              "BERT": (args.weight_decay_bert, resolved["training"]["encoder_weight_decay"])}
    if any(theirs != mine for theirs, mine in decays.values()):
        raise RuntimeError(f"MMSA's and msakit's weight decays differ (MMSA, msakit): {decays}")
    ours: MMIM = create_model("mmim", resolved["model"], dims)
    ours.load_state_dict(rename_state(official.state_dict(), RENAMES, INNER), strict=True)
    official.to(dtype)
    ours.to(dtype)
    official_name = rename_state({k: k for k, _ in official.named_parameters()}, RENAMES, INNER)
    training = {**resolved["training"], "batch_size": BATCH, "device": "cpu", "epochs": EPOCHS}
    trainer = Trainer(ours, TrainConfig(**training), "mosi", progress=False)

    official.eval()
    ours.eval()
    everything = torch.arange(SAMPLES)
    with torch.no_grad():
        batch = official_batch(split, everything)
        theirs = official(batch["text"], (batch["audio"], batch["audio_lengths"]),
                          (batch["vision"], batch["vision_lengths"]))["M"].squeeze(-1)
        mine = ours(next(iter(trainer._plain_batches(data.train)))).pred
    eval_diff = max_abs(theirs, mine)

    # the official trainer's optimisers, as its do_train builds them
    official_trainer = trainer_module.MMIM(args)
    official_trainer.model = official
    groups = {"bert": [], "mmilb": [], "main": []}
    for name, param in official.named_parameters():
        groups["bert" if "bert" in name else "mmilb" if "mi" in name else "main"].append(param)
    optim = getattr(torch.optim, args.optim)
    official_trainer.optimizer_mmilb = optim(groups["mmilb"], lr=args.lr_mmilb,
                                             weight_decay=args.weight_decay_mmilb)
    official_trainer.optimizer_main = optim([
        {"params": groups["bert"], "weight_decay": args.weight_decay_bert, "lr": args.lr_bert},
        {"params": groups["main"], "weight_decay": args.weight_decay_main, "lr": args.lr_main}])
    optimizer = build_optimizer(ours, trainer.config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    phase_optimizers = build_phase_optimizers(ours, trainer.config.optimizer, trainer.config.adam_eps)
    theirs_decay = decay_by_parameter(official, [official_trainer.optimizer_mmilb,
                                                 official_trainer.optimizer_main])
    mine_decay = decay_by_parameter(ours, [optimizer, *phase_optimizers.values()])
    # a parameter one side's optimisers leave out counts as unequal too
    unequal = sorted(n for n in official_name if mine_decay.get(n) != theirs_decay.get(official_name[n]))
    if unequal:
        raise RuntimeError(f"MMSA and msakit decay these parameters differently: {unequal}")
    their_steps, my_steps, their_calls, my_calls, phases = [], [], [], [], []
    for o in (official_trainer.optimizer_mmilb, official_trainer.optimizer_main):
        recording_steps(o, official, their_steps)
    for o in (optimizer, *phase_optimizers.values()):
        recording_steps(o, ours, my_steps)
    recording_forward(official, their_calls)
    recording_forward(ours, my_calls)
    original_forward = ours.forward
    ours.forward = lambda batch: phases.append((ours.phase, batch.labels)) or original_forward(batch)

    generator = torch.Generator().manual_seed(3)
    for epoch in range(1, EPOCHS + 1):
        # the batch orders msakit's loop draws for the bound phase, then the main phase
        replay = torch.Generator()
        replay.set_state(generator.get_state())
        orders = [[b.index for b, _ in training_shards(split, BATCH, replay)] for _ in range(2)]
        torch.manual_seed(100 + epoch)
        official_trainer.train_mmilb({"train": [official_batch(split, i) for i in orders[0]]})
        official_trainer.train_others({"train": [official_batch(split, i) for i in orders[1]]})
        torch.manual_seed(100 + epoch)
        ours.on_train_epoch_start(epoch, lambda: trainer._plain_batches(data.train))
        trainer.train_epoch(split, optimizer, scheduler, generator, epoch=epoch,
                            phase_optimizers=phase_optimizers)

    terms = compare_terms(args, their_calls, my_calls, phases)
    gradients = [step_gradients(official, ours, official_name, t, m) for t, m in zip(their_steps, my_steps,
                                                                                   strict=True)]
    theirs_final = dict(official.named_parameters())
    weights = max(max_abs(p, theirs_final[official_name[n]]) for n, p in ours.named_parameters())
    return {
        "dataset": dataset + (", add_va / va_bound" if add_va else "") + f", {str(dtype)[6:]}",
        "optimizers": sorted({type(o).__name__ for o in (optimizer, *phase_optimizers.values())}),
        "weight_decays (MMSA = msakit)": {k: theirs for k, (theirs, _) in decays.items()},
        "parameters": {"official": parameter_count(official), "msakit": parameter_count(ours)},
        "max_abs_diff": {"prediction (eval)": eval_diff, **terms, "weights after training": weights},
        "gradients": max(gradients, key=lambda g: g["relative"]),
        "steps": {"bound phase": sum(p == "bound" for p, _ in phases),
                  "main phase": sum(p == "main" for p, _ in phases)},
    }


def compare_terms(args: types.SimpleNamespace, their_calls: list, my_calls: list, phases: list) -> dict:
    """Every step's prediction and loss terms, MMSA's (from its forward's results, weighted as its
    trainer weights them) against msakit's."""
    worst: dict[str, float] = {}

    def keep(key: str, value: float) -> None:
        worst[key] = max(worst.get(key, 0.0), value)

    main_index = 0
    for theirs, mine, (phase, labels) in zip(their_calls, my_calls, phases, strict=True):
        keep("prediction (train)", max_abs(theirs["M"].squeeze(-1), mine.pred))
        if phase == "bound":
            main_index = 0
            keep("bound loss -lld", max_abs(-theirs["lld"], mine.losses["bound"]))
            continue
        task_theirs = F.l1_loss(theirs["M"], labels.view(-1, 1))
        total_theirs = task_theirs + args.alpha * theirs["nce"] - args.beta * theirs["lld"]
        keep("task loss", max_abs(task_theirs, F.l1_loss(mine.pred, labels)))
        keep("alpha NCE", max_abs(args.alpha * theirs["nce"], mine.losses["nce"]))
        keep("-beta lld", max_abs(-args.beta * theirs["lld"], mine.losses["lld"]))
        if main_index > args.mem_size:
            total_theirs = total_theirs - args.beta * theirs["H"]
            keep("-beta H", max_abs(-args.beta * theirs["H"], mine.losses["entropy"]))
        else:
            assert "entropy" not in mine.losses
        total_mine = F.l1_loss(mine.pred, labels) + sum(mine.losses.values())
        keep("total loss", max_abs(total_theirs, total_mine))
        main_index += 1
    return worst


def step_gradients(official: nn.Module, ours: nn.Module, official_name: dict[str, str],
                   theirs: dict, mine: dict) -> dict[str, float]:
    """`gradient_difference` on the gradients two steps recorded."""
    for model, grads in ((official, theirs), (ours, mine)):
        for name, param in model.named_parameters():
            param.grad = grads[name]
    return gradient_difference(official, ours, official_name.__getitem__)


def main() -> None:
    args = parse_args("mmim", REPOSITORY, COMMIT)
    with tempfile.TemporaryDirectory() as folder:
        bert = str(make_tiny_bert(Path(folder)))
        rows = [compare(args.official, d, bert) for d in ("mosi", "mosei", "sims")]
        rows.append(compare(args.official, "mosi", bert, add_va=True))
        rows.append(compare(args.official, "mosi", bert, dtype=torch.float32))
    print(write_report(
        "mmim", args.output, REPOSITORY, official_commit(args.official, COMMIT), rows, switches={},
        notes=(f"Both sides load the same tiny random BERT (tests/tiny_bert.py: 1 layer, width 32) in "
               f"place of bert-base, so MMSA's `d_tout` is 32; parameter counts include it. Inputs "
               f"are unpadded ({TEXT_LEN} tokens, {AUDIO_LEN} audio and {VISION_LEN} vision frames), "
               f"{SAMPLES} training samples, labels uniform in [-3, 3]. {EPOCHS} epochs of "
               f"{SAMPLES // BATCH} batches of {BATCH}, each epoch MMSA's train_mmilb then "
               "train_others against msakit's Trainer.train_epoch (bound phase, main phase), in the "
               "order msakit's loop draws, weights and features in float64 (the last row: float32), "
               "dropout active with the same draws, each side's own Adam "
               "optimisers (L2 decay: MMSA's `optim` Adam, msakit's `optimizer: adam`, the bound "
               "phase's too) at each side's configured decays, equal on both (the bound "
               "(weight_decay_mmilb / bound_weight_decay) and the rest (weight_decay_main / "
               "weight_decay) and BERT (weight_decay_bert / encoder_weight_decay) 1e-4, biases and "
               "LayerNorm gains included on both sides: MMSA's `optim` decays every parameter, "
               "msakit's MMSA settings set decay_norms_and_biases and "
               "encoder_decay_norms_and_biases; each parameter's decay checked equal), and "
               "gradient clipping (norm 1.0 over the whole model). Every column is "
               "the largest difference over all steps; gradients are compared as each optimiser "
               "step reads them (after clipping); the entropy term enters from the third batch of "
               "each epoch (MMSA's mem_size 1). Batches of 16 (MMSA's are 32): with 8 the entropy estimate's "
               "covariances come from about 8 samples per mixture component, nearly singular, and "
               "their log-determinants' gradients magnify rounding (float32 MOSI then differs by "
               "4e-4 after 16 steps, float64 by 4e-12). MMSA has no SIMSv2 setting for MMIM."),
    ))


if __name__ == "__main__":
    main()
