"""Numerical parity of msakit's CyIN with the official implementation (RH-Lin/CyIN @ da04a3d).

    # a checkout of RH-Lin/CyIN at da04a3d (the repository's HEAD now holds only a README)
    python benchmarks/parity/cyin.py --official /path/to/CyIN

Imports the official models/generationBased/CyIN.py (with its transformers_encoder and AlignNets;
the package __init__ files, which load the whole toolkit and BERT, are bypassed) and builds the
model from config/config_regression.json at MOSI and MOSEI sizes, and at SIMS size (the official
configs have no SIMS entry: MOSI's settings, as cyin.yaml uses, with MMSA's SIMS feature widths).
BERT is replaced by the identity on both sides (msakit: `text_source: features`). The official
weights are copied into msakit's `cyin` by name with strict loading (1x1 convolutions into linear
layers, and the fusion head's columns permuted: the official fused vector is [text, vision,
audio], msakit's [text, audio, vision]). Every modality has the text's number of steps, so the
alignment step passes the inputs through on both sides (the two alignments differ on purpose,
see the model's docstring).

Both sides read the same bottleneck noise (the official code draws it once per decoder pair, msakit
once per modality: with one draw per modality both are the same function) and, in the translation
stage, the same choice of fusion input (the official code draws one per batch and modality,
msakit per sample: each of the four choices is checked for the whole batch). Compared: predictions
in evaluation mode at the official dropout settings, complete and under each of the six missing-
modality patterns (a missing bottleneck replaced by translations); in training mode with every
dropout 0 (random masks cannot be matched), for the informative stage and the translation stage,
the prediction, every loss term (task L1, KL / beta, reconstruction, label-level L1, gamma x
translation, total), the 12 cross-modal translations (6 forward, 6 back) and, after one backward
pass of the total loss, every parameter's gradient. Writes benchmarks/results/parity/cyin.{json,md}.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
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

import msakit.models.cyin as msakit_cyin
from msakit.data.schema import MODALITIES, FeatureDims
from msakit.models import create_model
from msakit.training.config import resolve_config

REPOSITORY = "RH-Lin/CyIN"
COMMIT = "da04a3d88ec37e31fb8dd7f627e1f95857701e23"
BATCH = 4
LETTERS = {"l": "text", "a": "audio", "v": "vision"}
# the official configs have no SIMS entry; MMSA's SIMS features: 39 text steps, 33-d audio, 709-d vision
SIMS_FEATURES = {"feature_dims": [768, 33, 709], "seq_lens": [39, 39, 39]}
SWITCHES = {
    "model.decoder_output=sigmoid": "the official bottleneck decoders end in a sigmoid",
    "model.conv_padding=valid": "the official temporal convolution (padding 0) drops k - 1 steps",
}
DROPOUTS = ("attn_dropout_l", "attn_dropout_a", "attn_dropout_v", "attn_dropout_mem", "embed_dropout",
            "output_dropout")

# official parameter name -> msakit's: the first matching rule, then every INNER rule in order
RENAMES = [
    *((rf"^encoder_{k}\.net\.", f"ib_encoders.{m}.") for k, m in LETTERS.items()),
    *((rf"^mlp_{k}\.net\.", f"ib_decoders.{m}.") for k, m in LETTERS.items()),
    *((rf"^out_layer_{k}\.", f"label_heads.{m}.") for k, m in LETTERS.items()),
    *((rf"^proj_{k}\.", f"proj.{m}.") for k, m in LETTERS.items()),
    *((rf"^trans_{t}_with_{s}\.", f"cross.{LETTERS[s]}_to_{LETTERS[t]}.")
      for t in LETTERS for s in LETTERS if s != t),
    *((rf"^trans_{k}_mem\.", f"memory.{m}.") for k, m in LETTERS.items()),
    (r"^netRAE_LA\.", "translators.text_audio."), (r"^netRAE_LV\.", "translators.text_vision."),
    (r"^netRAE_AV\.", "translators.audio_vision."),
    (r"^out_layer\.", "out."),
]
INNER = [
    (r"\.self_attn\.", ".attn."), (r"\.layer_norms\.0\.", ".attn_norm."),
    (r"\.layer_norms\.1\.", ".ffn_norm."), (r"\.layer_norm\.", ".norm."),
    *((rf"\.(en|de)coder_(\d+)\.{2 * i}\.", rf".\1coders.\2.convs.{i}.") for i in range(4)),
    (r"\.transition\.0\.", ".transition.convs.0."), (r"\.transition\.2\.", ".transition.convs.1."),
]


class _Tokenizer:
    """The official code tokenizes raw text for BERT; here the text states come in directly."""

    @classmethod
    def from_pretrained(cls, **_: object) -> _Tokenizer:
        return cls()

    def __call__(self, states: torch.Tensor, **_: object) -> mock.Mock:
        return mock.Mock(to=lambda device: {"states": states})


class _Identity(nn.Module):
    """BERT replaced by the identity: last_hidden_state is the input."""

    @classmethod
    def from_pretrained(cls, **_: object) -> _Identity:
        return cls()

    def forward(self, states: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(last_hidden_state=states)


def official_module(root: Path) -> types.ModuleType:
    """models/generationBased/CyIN.py, its relative imports served from the checkout by stand-in
    packages (the real __init__ files import every model of the toolkit and BERT)."""
    for name in ("models", "models.subNets", "models.subNets.transformers_encoder",
                 "models.generationBased"):
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = package
    sys.modules["models.subNets"].AlignSubNet = importlib.import_module(
        "models.subNets.AlignNets").AlignSubNet
    module = importlib.import_module("models.generationBased.CyIN")
    module.TRANSFORMERS_MAP = {"bert": (_Identity, _Tokenizer)}
    return module


def official_args(root: Path, dataset: str, dropout: bool) -> types.SimpleNamespace:
    config = json.loads((root / "config" / "config_regression.json").read_text())
    family = "mosi" if dataset == "sims" else dataset
    args = {**config["cyin"]["commonParams"], **config["cyin"]["datasetParams"][family],
            **config["datasetCommonParams"][family]["unaligned"],
            "device": "cpu", "train_mode": "regression"}
    if dataset == "sims":
        args.update(SIMS_FEATURES)
    if not dropout:
        args.update({k: 0.0 for k in DROPOUTS})
    args["seq_lens"] = [args["seq_lens"][0]] * 3  # every modality has the text's steps
    return types.SimpleNamespace(**args)


def fused_order(width: int) -> torch.Tensor:
    """Index into the official fused vector [l, v, a] (2d each) giving msakit's [l, a, v]."""
    block = width // 3
    return torch.cat([torch.arange(0, block), torch.arange(2 * block, 3 * block),
                      torch.arange(block, 2 * block)])


def to_msakit_layout(name: str, value: torch.Tensor) -> torch.Tensor:
    """An official weight (or gradient), renamed to `name`, in msakit's layout."""
    if name in ("proj1.weight", "out.weight"):
        return value[:, fused_order(value.shape[1])]
    if name in ("proj2.weight", "proj2.bias"):
        return value[fused_order(value.shape[0])]
    return value


def build(root: Path, module: types.ModuleType, dataset: str, dropout: bool) -> tuple[nn.Module, nn.Module]:
    """The official model and msakit's with the official weights."""
    args = official_args(root, dataset, dropout)
    torch.manual_seed(0)
    official = module.CyIN(args)
    text_dim, audio_dim, vision_dim = args.feature_dims
    steps = args.seq_lens[0]
    dims = FeatureDims(text=text_dim, audio=audio_dim, vision=vision_dim, text_len=steps,
                       audio_len=steps, vision_len=steps, has_text_ids=False)
    overrides = ["model.text_source=features", *SWITCHES]
    if not dropout:
        overrides += [f"model.{k}=0" for k in ("attn_dropout_text", "attn_dropout_audio",
                                                "attn_dropout_vision", "attn_dropout_memory",
                                                "embed_dropout", "output_dropout")]
    ours = create_model("cyin", resolve_config("cyin", "mosi" if dataset == "sims" else dataset,
                                               overrides)["model"], dims)
    state = {k: v for k, v in official.state_dict().items()
             if not k.endswith((".version", "._float_tensor"))}
    state = rename_state(state, RENAMES, INNER)
    mine = ours.state_dict()
    for name, value in state.items():
        value = to_msakit_layout(name, value)
        state[name] = value.reshape(mine[name].shape) if name in mine else value  # 1x1 convolutions
    ours.load_state_dict(state, strict=True)
    return official, ours


class Noise:
    """One standard-normal draw per modality (B, C_B, L), given to both sides: the official code
    samples each modality three times in training (once per decoder) and once in evaluation;
    msakit once, in (B, L, C_B) layout."""

    def __init__(self, batch: int, width: int, steps: int) -> None:
        generator = torch.Generator().manual_seed(1)
        self.eps = [torch.randn(batch, width, steps, generator=generator) for _ in MODALITIES]

    def official(self, model: nn.Module) -> None:
        calls = []

        def reparameterise(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
            index = len(calls) // 3 if model.training else len(calls)
            calls.append(1)
            return mu + self.eps[index] * torch.exp(logvar / 2)

        model.reparameterise = reparameterise

    def msakit(self, stack: ExitStack) -> None:
        calls = []

        def randn_like(like: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return self.eps[len(calls) - 1].transpose(1, 2)

        stack.enter_context(mock.patch.object(torch, "randn_like", randn_like))
        stack.enter_context(mock.patch.object(
            msakit_cyin, "sample_noise",
            lambda ids, modality, like: self.eps[MODALITIES.index(modality)].transpose(1, 2)))


def fixed_choice(stack: ExitStack, module: types.ModuleType, choice: int) -> None:
    """The fusion input of the translation stage: option `choice` of [from the first other
    modality, from the second, their sum, the modality's own] for every sample, on both sides.
    The official lists name vision's sources in the order (audio, text), msakit's (text, audio)."""
    calls = []

    def sample(options: list, count: int) -> list:
        calls.append(1)
        swap = len(calls) == 3 and choice < 2  # the third call is vision's
        return [options[1 - choice if swap else choice]]

    stack.enter_context(mock.patch.object(module, "sample", sample))
    stack.enter_context(mock.patch.object(
        torch, "randint", lambda low, high, size, device=None: torch.full(size, choice, device=device)))


def record_outputs(modules: list[nn.Module], first: bool) -> tuple[list, list]:
    """Hooks that keep each call's output (the first element of a tuple when `first`)."""
    seen = [[] for _ in modules]
    hooks = [m.register_forward_hook(lambda _m, _a, out, i=i: seen[i].append(out[0] if first else out))
             for i, m in enumerate(modules)]
    return seen, hooks


def record_kl(model: nn.Module) -> list[torch.Tensor]:
    """Keep each KL term the official model computes (one per decoder pair)."""
    seen, original = [], type(model).kl_loss

    def kl_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        seen.append(original(model, mu, logvar))
        return seen[-1]

    model.kl_loss = kl_loss
    return seen


def compare(root: Path, module: types.ModuleType, dataset: str) -> dict:
    official, ours = build(root, module, dataset, dropout=True)
    args = official_args(root, dataset, dropout=True)
    text_dim, audio_dim, vision_dim = args.feature_dims
    steps = args.seq_lens[0]
    generator = torch.Generator().manual_seed(2)
    inputs = {"text": torch.randn(BATCH, steps, text_dim, generator=generator),
              "audio": torch.randn(BATCH, steps, audio_dim, generator=generator),
              "vision": torch.randn(BATCH, steps, vision_dim, generator=generator)}
    labels = torch.randn(BATCH, generator=generator)
    batch = full_batch(labels, **inputs)
    noise = Noise(BATCH, args.IB_btnk_dim, steps)
    diffs: dict[str, float] = {}

    # evaluation: complete, then each pattern of missing modalities (1 = present)
    official.eval()
    ours.eval()
    patterns = [[1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    worst_missing = 0.0
    for pattern in patterns:
        present = torch.tensor([pattern] * BATCH)
        noise.official(official)
        with torch.no_grad(), ExitStack() as stack:
            noise.msakit(stack)
            theirs = official(inputs["text"], inputs["audio"], inputs["vision"], mask_matrix=present,
                              generation_stage=True)["M"].squeeze(-1)
            mine = ours(batch.with_updates(presence=present.bool())).pred
        if pattern == [1, 1, 1]:
            diffs["prediction (eval)"] = max_abs(theirs, mine)
        else:
            worst_missing = max(worst_missing, max_abs(theirs, mine))
    diffs["prediction (eval, 6 missing patterns)"] = worst_missing

    # training, dropout 0: the informative stage, then the translation stage for each fusion input
    official, ours = build(root, module, dataset, dropout=False)
    official.train()
    ours.train()
    grads = {"max_abs_diff": 0.0, "largest_gradient": 0.0, "relative": 0.0}
    names = {}
    for name in dict(official.named_parameters()):
        names[next(iter(rename_state({name: None}, RENAMES, INNER)))] = name
    terms = ("prediction (train)", "task L1", "KL / beta", "reconstruction", "label-level L1",
             "gamma x translation", "total loss", "translations (6 forward, 6 back)")
    diffs.update({t: 0.0 for t in terms})
    for stage, choice in (("informative", None), *(("translation", c) for c in range(4))):
        official.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)
        ours.set_stage(stage)
        noise.official(official)
        kls = record_kl(official)
        mses, mse_hooks = record_outputs([official.MSE_loss], first=False)
        their_translations, their_hooks = record_outputs(
            [official.netRAE_LA, official.netRAE_LV, official.netRAE_AV], first=True)
        my_translations, my_hooks = record_outputs(
            [ours.translators[k] for k in ("text_audio", "text_vision", "audio_vision")], first=False)
        with ExitStack() as stack:
            noise.msakit(stack)
            if choice is not None:
                fixed_choice(stack, module, choice)
            theirs = official(inputs["text"], inputs["audio"], inputs["vision"],
                              generation_stage=stage == "translation")
            mine = ours(batch)
        for hook in (*mse_hooks, *their_hooks, *my_hooks):
            hook.remove()
        del official.kl_loss
        y = labels.view(-1, 1)
        their_terms = {
            "task L1": F.l1_loss(theirs["M"], y),
            "KL / beta": torch.stack(kls).mean() / args.p_eta,
            "reconstruction": torch.stack(mses[0][:9]).mean(),
            "label-level L1": sum(F.l1_loss(theirs[m], y) for m in "LAV"),
            "gamma x translation": args.w_imgaine * theirs["TRANSLATE_loss"],
        }
        their_total = (their_terms["task L1"] + their_terms["label-level L1"]
                       + theirs["IB_loss"] / args.p_eta + their_terms["gamma x translation"])
        my_terms = {
            "task L1": F.l1_loss(mine.pred, labels),
            "KL / beta": mine.losses["kl"],
            "reconstruction": mine.losses["reconstruction"],
            "label-level L1": mine.losses["unimodal"],
            "gamma x translation": mine.losses.get("translation", torch.tensor(0.0)),
        }
        my_total = my_terms["task L1"] + sum(mine.losses.values())
        diffs["prediction (train)"] = max(diffs["prediction (train)"],
                                          max_abs(theirs["M"].squeeze(-1), mine.pred))
        for term in my_terms:
            diffs[term] = max(diffs[term], max_abs(their_terms[term], my_terms[term]))
        diffs["total loss"] = max(diffs["total loss"], max_abs(their_total, my_total))
        for theirs_seen, mine_seen in zip(their_translations, my_translations, strict=True):
            if len(theirs_seen) != len(mine_seen):
                raise AssertionError(f"{len(theirs_seen)} official translations, {len(mine_seen)} msakit")
            for a, b in zip(theirs_seen, mine_seen, strict=True):
                key = "translations (6 forward, 6 back)"
                diffs[key] = max(diffs[key], max_abs(a.transpose(1, 2), b))
        their_total.backward()
        my_total.backward()
        step = gradient_difference(official, ours, names.__getitem__, to_msakit_layout)
        grads["largest_gradient"] = max(grads["largest_gradient"], step["largest_gradient"])
        if step["relative"] >= grads["relative"]:
            grads.update(max_abs_diff=step["max_abs_diff"], relative=step["relative"])
    return {"dataset": dataset,
            "parameters": {"official": parameter_count(official), "msakit": parameter_count(ours)},
            "max_abs_diff": diffs, "gradients": grads}


def main() -> None:
    args = parse_args("cyin", REPOSITORY, COMMIT)
    module = official_module(args.official)
    rows = [compare(args.official, module, d) for d in ("mosi", "mosei", "sims")]
    notes = (
        "Official model from config/config_regression.json (MOSI, MOSEI; SIMS: MOSI's settings with "
        "MMSA's SIMS widths 768/33/709 and 39 steps), BERT replaced by the identity on both sides; "
        f"batch {BATCH}, every modality with the text's steps (alignment passes through). "
        "Evaluation at the official dropouts, complete and under the 6 missing patterns; training "
        "with every dropout 0, the informative stage and the translation stage with each of the 4 "
        "fusion inputs fixed for the batch (worst case reported; gradients: the case with the "
        "largest relative difference). Both sides read the same bottleneck noise. The official "
        "fused vector is [text, vision, audio]: the head's weights are copied permuted. The results "
        "committed with this script were produced from a checkout rebuilt from the stored index of "
        "RH-Lin/CyIN at da04a3d, where transformers_encoder/transformer.py and position_embedding.py "
        "exist only as .pyc files: those two came from thuiar/MMSA, the code CyIN builds on, "
        "transformer.py as of MMSA 177bc04 (every encoder adds sinusoidal positions; from 1dea18d "
        "on, MMSA's encoders add none unless asked, and the predictions then differ by ~0.1).")
    print(write_report("cyin", args.output, REPOSITORY, official_commit(args.official, COMMIT), rows,
                       SWITCHES, notes))


if __name__ == "__main__":
    main()
