"""Numerical parity of msakit's HME with the official implementation (YetZzzzzz/HME).

    git clone https://github.com/YetZzzzzz/HME /path/to/HME   # plus einops and scikit-learn
    python benchmarks/parity/hme.py --official /path/to/HME

Builds the official model (HME_MSA/HME_model.py) with the settings of its own HME_main.py: the
argparse defaults, the README's MOSI and MOSEI commands and the per-dataset feature widths of
HME_main.py. The official code has no SIMS settings: the SIMS row is the MOSI command at SIMS's
feature widths (audio 33, vision 709, 39 steps), which is also what msakit's hme.yaml gives SIMS.
Its BERT is replaced by the identity, so both sides read the same 768-d text states (msakit:
`model.text_source=features`), and `init_weights` (BERT's initialiser, which the installed
transformers cannot run on this class) is skipped: every weight is copied anyway. The official
weights are copied into msakit's `hme` by name with strict loading (the 1x1 Conv1d projections as
linear maps). msakit's settings are first checked against the official ones they stand for.

Both sides get the same random unpadded inputs (aligned: every modality at the text's length) and
the same modality-presence matrix, drawn by the official `generate_missing_matrix` at MR 0.3, so
that the missing-modality paths (zeroed inputs, their positions, their retrieval) are exercised.
Per size it compares, in evaluation mode: the prediction, the pooled encoder outputs H_m and the
retrieval state (C_m, what each sample's cross-sample enhancement receives); in training mode
(every dropout off on both sides, the bottleneck noise drawn from one seeded stream in the same
order): the prediction, C_m, the task, unimodal and KL loss terms, their total and, after one
backward pass of the total, every parameter's gradient. msakit runs with its switches set to the
official behaviour (listed in the report).

Each size runs in float64 and in float32 with the same weights and inputs (float32 values, cast;
the float64 pass draws its noise in float32). Float32 gradients are compared on the branch of the
float64 pass (`Branches` in msakit_parity.py): which ReLU inputs are positive and which step each
max-pool over time takes are recorded per model in float64 and imposed on its float32 pass. Without
this the float32 gradients compare rounding at the kinks, not the two codes: both models compute
their float32 ReLU inputs with the same error (relative RMS 3-5e-7 of float64, at most ~3e-6), so
an input within that of 0 can land on either side of it, and one such unit moves its whole
contribution (at MOSI size one unit, 8.5e-8 below 0 in float64 and 1.1e-8 above it in msakit's
float32, makes the gradients differ by 2e-4 of the largest). The report gives the float32
gradients as computed too, with how many choices each float32 pass made off the float64 branch.
Writes benchmarks/results/parity/hme.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from msakit_parity import (
    OWN_BRANCHES,
    Branches,
    float32_draws,
    gradient_difference,
    import_official,
    max_abs,
    official_commit,
    parameter_count,
    parse_args,
    relus_through,
    rename_state,
    write_report,
)
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.models import create_model
from msakit.training.config import resolve_config

REPOSITORY = "YetZzzzzz/HME"
COMMIT = "6f0c9a7adeff47304a4a0337c366283c9a4bf221"
BATCH = 16
MISSING_RATE = 0.3
MODALITIES = ("text", "audio", "vision")
SHORT = {"text": "l", "audio": "a", "vision": "v"}
SIMS = {"ACOUSTIC_DIM": 33, "VISUAL_DIM": 709, "length": 39}

SWITCHES = {
    "model.retrieval=batch": "the official code retrieves from the current batch only",
    "model.retrieval_k=null": "every sample above the similarity threshold, no top-k",
    "model.retrieve_missing=true": "a sample missing a modality is an ordinary query and candidate",
    "model.retrieval_fallback=all": "the fallback mean is over the whole batch, the query included",
    "model.position_zero_steps=false": "steps whose projected input is exactly zero get no position",
    "model.uncertainty_gate=multiply": "the enhanced logit is multiplied by the certainty weight",
    "model.sample_at_eval=true": "the bottleneck samples at test time too",
}
# official name -> msakit name: the first matching prefix rule, then every structural rule
PREFIXES = [
    *[(rf"^proj_{s}_1\.", f"project.{m}.") for m, s in SHORT.items()],
    *[(rf"^{s}2{s}\.", f"encoders.{m}.") for m, s in SHORT.items()],
    *[(rf"^{SHORT[m]}2{SHORT[x]}\.", f"pair_hyper.{m}_{x}.") for m in MODALITIES for x in MODALITIES
      if m != x],
    *[(rf"^hyper_{s}\.", f"hyper.{m}.") for m, s in SHORT.items()],
    *[(rf"^latent_{m.replace('vision', 'video')}\.", f"enhancers.{m}.") for m in MODALITIES],
    (r"^latent_sample\.", "shared_enhancer."),
    *[(rf"^VIB_estimate_{s}_p\.decode\.0\.", f"bottlenecks.{m}.head.") for m, s in SHORT.items()],
    *[(rf"^VIB_estimate_{s}_p\.", f"bottlenecks.{m}.") for m, s in SHORT.items()],
    *[(rf"^ATTN_{s.upper()}\.attention_mlp\.attention_mlp\.", f"gates.{m}.mlp.0.")
      for m, s in (("text", "t"), ("audio", "a"), ("vision", "v"))],
    *[(rf"^ATTN_{s.upper()}\.fc_att\.", f"gates.{m}.mlp.3.")
      for m, s in (("text", "t"), ("audio", "a"), ("vision", "v"))],
    (r"^ATTN_hyper\.attention_mlp\.attention_mlp\.", "hyper_fusion.mlp.0."),
    (r"^ATTN_hyper\.fc_att\.", "hyper_fusion.mlp.3."),
    (r"^transformer_encoder_all\.", "fusion."),
    (r"^fusion_all\.fusion_layer_all\.", "head.0."),
    (r"^fusion_all\.fusion_layer_all_all\.", "head.3."),
]
ENC, HYP = r"^(encoders\.\w+\.)", r"^((?:pair_hyper|hyper)\.\w+\.)"
LAT = r"^((?:enhancers\.\w+|shared_enhancer)\.)"
STRUCTURE = [
    (ENC + r"layers\.(\d+)\.self_attn\.", r"\1layers.\2.attn."),
    (ENC + r"layers\.(\d+)\.layer_norms\.0\.", r"\1layers.\2.attn_norm."),
    (ENC + r"layers\.(\d+)\.layer_norms\.1\.", r"\1layers.\2.ffn_norm."),
    (ENC + r"layer_norm\.", r"\1norm."),
    *[(prefix + rf"layers\.(\d+)\.{where}", rf"\1{block}.\2.{part}")
      for prefix, block, layout in ((HYP, "blocks", ""), (LAT, "cross", ""), (LAT, "self_blocks", "2.0."))
      for where, part in ((rf"{layout}0\.norm_context\.", "context_norm."),
                          (rf"{layout}0\.norm\.", "norm."), (rf"{layout}0\.fn\.", "attn."),
                          (rf"{layout}1\.norm\.", "ff.norm."), (rf"{layout}1\.fn\.net\.0\.", "ff.up."),
                          (rf"{layout}1\.fn\.net\.2\.", "ff.down."))],
    (r"^((?:pair_hyper|hyper|enhancers)\.\w+\.|shared_enhancer\.)to_embedds\.1\.", r"\1norm."),
]


def official_args(root: Path, dataset: str) -> argparse.Namespace:
    """HME_main.py's own argparse (its defaults), fed the README's command for `dataset` (SIMS:
    MOSI's), then its per-dataset block (feature widths); the rest of the script is not run."""
    source = (root / "HME_MSA" / "HME_main.py").read_text()
    start, end = source.index("parser = argparse.ArgumentParser"), source.index("args = parser.parse_args()")
    parser_code = source[start:end]
    namespace: dict = {"argparse": argparse}
    exec(parser_code, namespace)  # the parser's definition only
    readme = (root / "README.md").read_text()
    flag = f"--dataset='{'mosi' if dataset == 'sims' else dataset}'"
    command = next(line for line in readme.splitlines()
                   if line.startswith("python3 HME_main.py") and flag in line)
    args = namespace["parser"].parse_args(shlex.split(command)[2:])
    block = source[source.index("if args.dataset == 'mosi':"):source.index("args.output_dim = 1")]
    exec(block, {"args": args})  # TEXT_DIM, ACOUSTIC_DIM, VISUAL_DIM, attn_dropout_a, lengths
    args.output_dim = 1
    args.length = args.max_seq_length
    if dataset == "sims":
        args.ACOUSTIC_DIM, args.VISUAL_DIM = SIMS["ACOUSTIC_DIM"], SIMS["VISUAL_DIM"]
        args.length = SIMS["length"]
    return args


def official_model(root: Path, args: argparse.Namespace) -> nn.Module:
    hme_model, = import_official(root / "HME_MSA", "HME_model")

    class Identity(nn.Module):  # the official BERT, minus BERT
        def __init__(self, *_: object, **__: object) -> None:
            super().__init__()

        def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
            return x

    from transformers import BertConfig

    hme_model.BERT_TM = Identity
    hme_model.HME.init_weights = lambda self: None
    return hme_model.HME(BertConfig(), args)


def check_settings(config: object, args: argparse.Namespace) -> None:
    """msakit's resolved settings are the official ones they stand for."""
    pairs = {"hidden": args.d_l, "heads": args.num_heads, "encoder_layers": args.layers,
             "latent_layers": args.latent_layers, "hyper_depth": args.hyper_depth,
             "num_latents": args.num_latents, "attn_dropout": args.attn_dropout,
             "relu_dropout": args.relu_dropout, "res_dropout": args.res_dropout,
             "embed_dropout": args.embed_dropout, "dropout": args.dropout,
             "similarity_threshold": args.similarity_threshold, "uncertainty_lower": args.uncertainty_LB,
             "uncertainty_upper": args.uncertainty_UB}
    wrong = {k: (getattr(config, k), v) for k, v in pairs.items() if getattr(config, k) != v}
    if wrong:
        raise SystemExit(f"msakit's hme settings differ from the official ones (msakit, official): {wrong}")


def msakit_state(official: nn.Module, ours: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in official.state_dict().items()
             if not k.endswith(("version", "_float_tensor"))}
    state = rename_state(state, PREFIXES, STRUCTURE)
    for m in MODALITIES:  # the 1x1 convolutions as linear maps
        state[f"project.{m}.weight"] = state[f"project.{m}.weight"].squeeze(-1)
    state.update({k: v for k, v in ours.state_dict().items() if k.startswith("bank")})
    return state


def no_dropout(model: nn.Module) -> None:
    """Every dropout off: nn.Dropout modules and the float rates that F.dropout calls read."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "attn_dropout", "relu_dropout", "res_dropout", "embed_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def capture(module: nn.Module, store: list) -> torch.utils.hooks.RemovableHandle:
    """Record the first positional input of every call of `module`."""
    return module.register_forward_pre_hook(lambda _, inputs: store.append(inputs[0].detach().clone()))


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


@contextmanager
def official_through(branches: Branches, official: nn.Module) -> Iterator[None]:
    """Every ReLU and max-pool of the official model through `branches`."""
    pools = [getattr(official, f"pool_{m}") for m in ("text", "audio", "video")]
    for pool in pools:
        pool.forward = lambda x, pool=pool: branches.max(
            x, -1, lambda: type(pool).forward(pool, x), keepdim=True)
    try:
        with relus_through(branches, official):
            yield
    finally:
        for pool in pools:
            del pool.forward


@contextmanager
def msakit_through(branches: Branches, ours: nn.Module) -> Iterator[None]:
    """Every ReLU and max-pool of msakit's model through `branches`."""
    module = sys.modules[type(ours).__module__]
    original = module.masked_max
    module.masked_max = lambda x, mask: branches.max(
        x.masked_fill(~mask.unsqueeze(-1), float("-inf")), 1, lambda: original(x, mask))
    try:
        with relus_through(branches, ours):
            yield
    finally:
        module.masked_max = original


def compare(root: Path, dataset: str) -> list[dict]:
    """The float32 and the float64 row of one size: the same weights and inputs, cast."""
    args = official_args(root, dataset)
    torch.manual_seed(0)
    official = official_model(root, args)
    with torch.no_grad():  # as after training: no bias or LayerNorm left at its initial 0 or 1
        for param in official.parameters():
            param.add_(0.02 * torch.randn_like(param))
    length = args.length
    dims = FeatureDims(text=args.TEXT_DIM, audio=args.ACOUSTIC_DIM, vision=args.VISUAL_DIM,
                       text_len=length, audio_len=length, vision_len=length, has_text_ids=False)
    overrides = ["model.text_source=features", *SWITCHES]
    config = resolve_config("hme", dataset, overrides)["model"]
    ours = create_model("hme", config, dims)
    check_settings(ours.config, args)
    ours.load_state_dict(msakit_state(official, ours), strict=True)

    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(BATCH, length, d, generator=generator)
              for d in (args.TEXT_DIM, args.ACOUSTIC_DIM, args.VISUAL_DIM)]
    labels = 6 * torch.rand(BATCH, generator=generator) - 3
    utils, = import_official(root / "HME_MSA", "utils")
    np.random.seed(0)
    ps = torch.from_numpy(utils.generate_missing_matrix(BATCH, 3, missing_rate=MISSING_RATE))

    branches = {"official": Branches(), "msakit": Branches()}
    rows = {}
    # float64 first: its pass records the branches the float32 gradients are compared on
    for dtype in (torch.float64, torch.float32):
        with default_dtype(dtype), float32_draws() if dtype == torch.float64 else nullcontext():
            pair = (copy.deepcopy(official).to(dtype), copy.deepcopy(ours).to(dtype))
            cast = [x.to(dtype) for x in (*inputs, labels)]
            rows[dtype] = compare_models(args, *pair, *cast, ps, branches, dataset)
    return [rows[torch.float32], rows[torch.float64]]


def compare_models(args: argparse.Namespace, official: nn.Module, ours: nn.Module, text: torch.Tensor,
                   audio: torch.Tensor, vision: torch.Tensor, labels: torch.Tensor, ps: torch.Tensor,
                   branches: dict[str, Branches], dataset: str) -> dict:
    """One size in the precision of the models and inputs given (the default dtype set to it)."""
    renamed = rename_state(official.state_dict(), PREFIXES, STRUCTURE)
    names = {new: old for old, new in zip(official.state_dict(), renamed, strict=True)}
    length = args.length
    batch = Batch(labels=labels, index=torch.arange(BATCH), ids=[str(i) for i in range(BATCH)],
                  presence=ps.bool(), text=text, audio=audio, vision=vision,
                  **{f"{m}_mask": torch.ones(BATCH, length, dtype=torch.bool) for m in MODALITIES})

    def run_official() -> dict:
        return official(text, vision, audio, ps)

    theirs_c: dict[str, list] = {m: [] for m in MODALITIES}
    ours_c: dict[str, list] = {m: [] for m in MODALITIES}
    theirs_h, ours_h = [], []
    for m in MODALITIES:
        capture(getattr(official, f"latent_{m.replace('vision', 'video')}"), theirs_c[m])
        capture(ours.enhancers[m], ours_c[m])
    capture(official.latent_sample, theirs_h)
    capture(ours.shared_enhancer, ours_h)

    def retrieval_diff() -> float:
        return max(max_abs(theirs_c[m][-1], ours_c[m][-1].squeeze(1)) for m in MODALITIES)

    official.eval()
    ours.eval()
    with torch.no_grad():
        torch.manual_seed(2)
        theirs = run_official()
        torch.manual_seed(2)
        mine = ours(batch)
    row = {"prediction (eval)": max_abs(theirs["predictions"].squeeze(-1), mine.pred),
           "encoder outputs H_m (eval)": max_abs(theirs_h[-1], ours_h[-1]),
           "retrieved C_m (eval)": retrieval_diff()}
    h = theirs_h[-1]
    cosine = F.cosine_similarity(h.unsqueeze(1), h.unsqueeze(0), dim=-1)
    found = ((cosine >= args.similarity_threshold) & ~torch.eye(BATCH, dtype=torch.bool).unsqueeze(-1)).any(1)

    official.train()
    ours.train()
    no_dropout(official)
    no_dropout(ours)
    y = labels.view(-1)
    float64 = labels.dtype == torch.float64

    def train_pass(mode: str) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
        """One training step's losses on both sides, then the backward pass of their totals.
        mode "free": the models as they are; "record"/"impose": through their `branches`."""
        official.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)
        for side in branches.values():
            if mode == "impose":
                side.impose()
        with official_through(branches["official"], official) if mode != "free" else nullcontext():
            torch.manual_seed(3)
            theirs = run_official()
        with msakit_through(branches["msakit"], ours) if mode != "free" else nullcontext():
            torch.manual_seed(3)
            mine = ours(batch)
        their_task = F.l1_loss(theirs["predictions"].view(-1), y)
        their_unimodal = sum(F.l1_loss(theirs[f"logits_{s}_p"].view(-1), y) for s in "lav") / 3.0
        their_total = their_task + 0.8 * their_unimodal + 0.01 * theirs["info_losses"]
        my_task = F.l1_loss(mine.pred, batch.labels)
        my_total = my_task + sum(mine.losses.values())
        their_total.backward()
        my_total.backward()
        their = {"task": their_task, "unimodal": their_unimodal, "total": their_total}
        my = {"task": my_task, "total": my_total}
        return theirs, mine, their, my

    theirs, mine, their, my = train_pass("record" if float64 else "free")
    row.update({
        "prediction (train)": max_abs(theirs["predictions"].squeeze(-1), mine.pred),
        "retrieved C_m (train)": retrieval_diff(),
        "task L1": abs(their["task"].item() - my["task"].item()),
        "unimodal loss (x0.8)": abs(0.8 * their["unimodal"].item() - mine.losses["unimodal"].item()),
        "KL loss (x0.01)": abs(0.01 * theirs["info_losses"].item() - mine.losses["kl"].item()),
        "total loss": abs(their["total"].item() - my["total"].item()),
    })
    gradients = gradient_difference(official, ours, lambda name: names[name])
    result = {
        "dataset": f"{dataset} ({str(labels.dtype).removeprefix('torch.')})",
        "parameters": {"official": parameter_count(official), "msakit": parameter_count(ours)},
        "max_abs_diff": row,
        "gradients": gradients,
    }
    if not float64:
        train_pass("impose")
        result["gradients"] = gradient_difference(official, ours, lambda name: names[name])
        result[OWN_BRANCHES] = {**gradients, "departures": {side: dict(b.departures)
                                                            for side, b in branches.items()}}
    result.update({
        "sizes": {"batch": BATCH, "steps": length, "widths (text, audio, vision)":
                  [args.TEXT_DIM, args.ACOUSTIC_DIM, args.VISUAL_DIM], "hidden": args.d_l,
                  "encoder layers": args.layers, "latent layers": args.latent_layers,
                  "hyper depth": args.hyper_depth},
        "missing": {"rate": MISSING_RATE, "modalities dropped": int((ps == 0).sum()),
                    "queries that retrieved (eval, per modality)": found.sum(0).tolist(),
                    "queries on the fallback mean": int((~found).sum())},
    })
    return result


def main() -> None:
    args = parse_args("hme", REPOSITORY, COMMIT)
    pairs = [compare(args.official, d) for d in ("mosi", "mosei", "sims")]
    rows = [pair[0] for pair in pairs] + [pair[1] for pair in pairs]
    notes = ("Parameters exclude BERT on both sides. Each size is run in float32 and in float64 with the "
             "same weights and inputs (every tensor of both models cast; the official attention still "
             "takes its softmax in float32; the float64 pass draws the bottleneck noise in float32). "
             "Training-mode columns run with every dropout off on both sides; the bottleneck noise is "
             "drawn in the same order from one seeded stream. Float32 gradients are judged on the "
             "branch of the float64 pass (each model's ReLU signs and max-pool steps recorded in float64 "
             "and imposed on its float32 pass); the column before the verdict gives them as computed, "
             "each model on its own float32 branches, and how many ReLU units and max-pool choices "
             "its float32 pass took off the float64 branch. The official code has no SIMS settings: "
             "the SIMS row is the MOSI command at SIMS feature widths. Inputs: a batch of 16, "
             "unpadded, with the official presence matrix at MR 0.3; the official weights are "
             "perturbed by N(0, 0.02^2) before copying, so that no bias is 0 (at initialisation a "
             "missing modality encodes to exactly 0 and the retrieval of missing samples would go "
             "untested). The retrieval state C_m is what each sample's enhancement receives. The "
             "deviations without a switch (padding masks; one embedding-dropout mask shared by keys and "
             "values) do not arise on unpadded inputs without dropout.")
    print(write_report("hme", args.output, REPOSITORY, official_commit(args.official, COMMIT), rows,
                       SWITCHES, notes))


if __name__ == "__main__":
    main()
