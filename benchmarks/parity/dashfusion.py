"""Numerical parity of msakit's DashFusion with the official implementation (ultramarineX/DashFusion).

    git clone https://github.com/ultramarineX/DashFusion /path/to/DashFusion
    git -C /path/to/DashFusion checkout 37ba417
    pip install einops pytorch-metric-learning==0.9.99 --no-deps   # the versions its code was written for
    python benchmarks/parity/dashfusion.py --official /path/to/DashFusion

Builds the official model at MOSI, MOSEI and SIMS sizes from its own src/config.py (its `dataset`
line set to each in turn), its BERT and tokenizer replaced by the identity (the projection to 128
and the LayerNorm after BERT are kept), so both models read the same 768-d text states; msakit's
`dashfusion` runs with `model.text_source=features`. The weights are copied by name (strict
loading; the official modules that its forward never calls are left out and counted apart).

On a training split of random unpadded inputs (every frame valid, so the padding masks of either
side hide nothing), it compares:
- the pooled views both models compute for the neighbour index (eval mode) and the neighbour
  lists built from them: the official `__pre_sample` (run from the official data loader class) and
  msakit's with `model.neighbour_index=official`;
- eval-mode predictions of a batch;
- in training mode, with the drawn neighbours fixed to the first two of each list on both sides:
  the prediction, the MSE task loss, the contrastive loss (the official NT-Xent of
  pytorch-metric-learning over its 22 pairs per anchor, the neighbours run through the model with
  gradient), the total loss, and every parameter's gradient after one backward pass of it.
Dropout is off on both sides in training mode: the official audio and vision encoders run
sequence-first, so the same random stream would drop different elements. Writes
benchmarks/results/parity/dashfusion.{json,md}.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from msakit_parity import (
    full_batch,
    gradient_difference,
    import_official,
    max_abs,
    official_commit,
    parameter_count,
    parse_args,
    rename_state,
    write_report,
)
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.models import create_model, dashfusion
from msakit.training.config import resolve_config

REPOSITORY = "ultramarineX/DashFusion"
COMMIT = "37ba4177ba4be7db6ef2a8ae0ce916f2d6f99426"
# per dataset: text tokens (MMSA's text_bert lengths), audio frames and width, vision frames and
# width (the official position tables fix the frame counts), its loader class
SHAPES = {
    "mosi": (50, 375, 5, 500, 20, ("dataloader.MOSI", "MOSIDataset")),
    "mosei": (50, 500, 74, 500, 35, ("dataloader.MOSEI", "MOSEIDataset")),
    "sims": (39, 400, 33, 55, 709, ("dataloader.SIMS", "SIMSDataset")),
}
SPLIT_SIZE = 400  # training samples behind the neighbour index
ANCHORS = [3, 17, 42, 100]  # the training batch, positions in the split
SWITCHES = {"model.neighbour_index=official": (
    "the official neighbour lists hold rank positions used as sample ids (msakit's default, "
    "`fixed`, holds the samples at those positions)")}
UNUSED = r"^(audio|vision)_encoder\.(fc\.|dense\.|cls_embedding$)|^temporal_alignment\.(ffn|norm1|norm2)\."

# official parameter name -> msakit's: the first matching rule, then every INNER rule in order
RENAMES = [
    # the projector's layers are registered twice, as `proj` and as `MLP`
    (r"^text_encoder\.projector\.(proj|MLP)\.", "text_project."),
    (r"^text_encoder\.projector\.layernorm\.", "text_project.4."),
    (r"^(audio|vision)_encoder\.encoder\.pos_encoder\.cls_token$", r"frames.\1.cls"),
    (r"^(audio|vision)_encoder\.encoder\.pos_encoder\.proj\.", r"frames.\1.project."),
    (r"^(audio|vision)_encoder\.encoder\.pos_encoder\.position_embeddings$", r"frames.\1.positions"),
    (r"^(audio|vision)_encoder\.encoder\.transformer_encoder\.layers\.", r"frames.\1.layers."),
    (r"^(audio|vision)_encoder\.layernorm\.", r"frames.\1.norm."),
    (r"^temporal_alignment\.to_([kv])_ta\.", r"align.to_\1.audio."),
    (r"^temporal_alignment\.to_([kv])_tv\.", r"align.to_\1.vision."),
    (r"^temporal_alignment\.", "align."),
    (r"^HBF\.encoder_q\.(\d+)\.layers\.0\.", r"fusion.levels.\1.select."),
    (r"^HBF\.encoder_q2tav\.(\d+)\.", r"fusion.levels.\1.gather."),
    (r"^HBF\.encoder_t\.(\d+)\.layers\.0\.", r"fusion.levels.\1.update.text."),
    # the official HBF is called as HBF(x_m, t, v, a): its `_a` modules read vision, its `_v` audio
    (r"^HBF\.encoder_a\.(\d+)\.layers\.0\.", r"fusion.levels.\1.update.vision."),
    (r"^HBF\.encoder_v\.(\d+)\.layers\.0\.", r"fusion.levels.\1.update.audio."),
    (r"^classifier\.MLP\.", "head."),
]
INNER = [
    (r"self_attn\.in_proj_(weight|bias)$", r"qkv.\1"), (r"self_attn\.out_proj\.", "out."),
    (r"\.linear1\.", ".ff.0."), (r"\.linear2\.", ".ff.3."),
    (r"\.0\.fn\.to_query\.", ".attn.to_q."), (r"\.0\.fn\.to_key\.", ".attn.to_k."),
    (r"\.0\.fn\.to_value\.", ".attn.to_v."), (r"\.0\.norm\.", ".attn_norm."),
    (r"\.1\.fn\.net\.", ".ff."), (r"\.1\.norm\.", ".ff_norm."),
    (r"gather\.to_([kv])_t\.", r"gather.to_\1.text."), (r"gather\.to_([kv])_a\.", r"gather.to_\1.vision."),
    (r"gather\.to_([kv])_v\.", r"gather.to_\1.audio."), (r"gather\.ffn\.net\.", "gather.ff."),
]


class _Encoded(dict):
    """What the official text encoder gets from its tokenizer: here the text states themselves."""

    def to(self, device: torch.device) -> _Encoded:
        return self


class IdentityTokenizer:
    @classmethod
    def from_pretrained(cls, *args: object, **kwargs: object) -> IdentityTokenizer:
        return cls()

    def __call__(self, text: torch.Tensor, **kwargs: object) -> _Encoded:
        return _Encoded(states=text, attention_mask=torch.ones(text.shape[:2], dtype=torch.long))


class IdentityBert(nn.Module):
    @classmethod
    def from_pretrained(cls, *args: object, **kwargs: object) -> IdentityBert:
        return cls()

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"last_hidden_state": states}


def official_modules(root: Path, dataset: str) -> tuple[types.ModuleType, type]:
    """The official `model.dashfusion` module and data set class with src/config.py's `dataset` set
    to `dataset` (the config module picks its depths when it is executed, and every official module
    binds it at import, so all of them are imported afresh)."""
    src = root / "src"
    for name in list(sys.modules):
        if name in ("config", "utils") or name.split(".")[0] in ("model", "dataloader"):
            del sys.modules[name]
    text = (src / "config.py").read_text()
    patched, found = re.subn(r"^dataset = '\w+'", f"dataset = '{dataset}'", text, flags=re.M)
    if found != 1:
        raise SystemExit(f"{src / 'config.py'}: no `dataset = '...'` line to set")
    sys.path.insert(0, str(src))
    config = types.ModuleType("config")
    config.__file__ = str(src / "config.py")
    sys.modules["config"] = config
    exec(compile(patched, config.__file__, "exec"), config.__dict__)  # noqa: S102 (the official config)
    loader_module, loader_class = SHAPES[dataset][-1]
    text_encoder, model, loader = import_official(src, "model.text_encoder", "model.dashfusion",
                                                  loader_module)
    text_encoder.BertTokenizer, text_encoder.BertModel = IdentityTokenizer, IdentityBert
    return model, getattr(loader, loader_class)


def head_layout(name: str, value: torch.Tensor) -> torch.Tensor:
    """An official tensor in msakit's layout: the official head reads [B, t, v, a] (HBF is called
    with vision and audio exchanged), msakit's [B, t, a, v]; the first layer's columns follow."""
    if name != "head.0.weight":
        return value
    d = value.shape[1] // 4
    return torch.cat([value[:, : 2 * d], value[:, 3 * d:], value[:, 2 * d: 3 * d]], dim=1)


def no_dropout(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0


def first_entries(pool: torch.Tensor, count: int) -> torch.Tensor:
    """msakit's neighbour draw, fixed to the first `count` entries of each list (see `sample2`)."""
    return pool[:, :count]


def compare(root: Path, dataset: str) -> dict:
    text_len, audio_len, audio_dim, vision_len, vision_dim, _ = SHAPES[dataset]
    module, loader_class = official_modules(root, dataset)
    torch.manual_seed(0)
    official = module.DashFusion(config=module.default_config)
    dims = FeatureDims(text=768, audio=audio_dim, vision=vision_dim, text_len=text_len,
                       audio_len=audio_len, vision_len=vision_len, has_text_ids=False)
    config = resolve_config("dashfusion", dataset, ["model.text_source=features", *SWITCHES,
                                                    "model.encoder_dropout=0", "model.embed_dropout=0"])
    ours = create_model("dashfusion", config["model"], dims)
    no_dropout(official)
    state = {k: v for k, v in official.state_dict().items() if not re.search(UNUSED, k)}
    ours.load_state_dict({k: head_layout(k, v) for k, v in rename_state(state, RENAMES, INNER).items()},
                         strict=True)
    names = [k for k, _ in official.named_parameters() if not re.search(UNUSED, k)]
    official_name = rename_state({k: k for k in names}, RENAMES, INNER)  # msakit name -> official

    n = SPLIT_SIZE
    data = {"text": torch.randn(n, text_len, 768), "audio": torch.randn(n, audio_len, audio_dim),
            "vision": torch.randn(n, vision_len, vision_dim)}
    # SIMS labels are multiples of 0.2, which its loader compares as they are
    labels = torch.randint(-5, 6, (n,)).float() * 0.2 if dataset == "sims" else torch.rand(n) * 4.8 - 2.4

    def sample(rows: torch.Tensor) -> dict:
        return {"raw_text": data["text"][rows], "vision": data["vision"][rows],
                "audio": data["audio"][rows], "regression_labels": labels[rows],
                "vision_padding_mask": torch.zeros(len(rows), vision_len + 1, dtype=torch.bool),
                "audio_padding_mask": torch.zeros(len(rows), audio_len + 1, dtype=torch.bool)}

    def batch(rows: torch.Tensor) -> Batch:
        return full_batch(labels[rows], **{m: v[rows] for m, v in data.items()}).with_updates(
            index=rows, ids=[str(i) for i in rows.tolist()])

    chunks = [torch.arange(s, min(s + 50, n)) for s in range(0, n, 50)]
    # the neighbour index: the official update_matrix on its own eval-mode views, msakit's epoch hook
    official.eval()
    with torch.no_grad():
        t, v, a = (torch.cat(x) for x in zip(*(official(sample(c), None, return_loss=False) for c in chunks),
                                              strict=True))
    index = object.__new__(loader_class)  # the official loader's methods, without its data file
    index.size, index.data = n, {"regression_labels": labels.numpy()}
    index.update_matrix(t, v, a)
    theirs_lists = index.M_retrieve
    ours.on_train_epoch_start(1, lambda: (batch(c) for c in chunks))
    ours_lists = ours.neighbours
    pool = ours.config.neighbour_pool

    def official_ids(kind: str) -> torch.Tensor:
        # negative entries (the easy negatives' positions from the end) index the data from its end
        return torch.tensor([[j % n for j in lst[:pool]] + [-1] * (pool - len(lst[:pool]))
                             for lst in theirs_lists[kind]])

    # near-ties: the two sides compute the same cosines in different orders of summation, so two
    # samples nearly as similar to an anchor can swap ranks; where the lists differ, the rank
    # positions they name must hold equally similar samples (float64 cosines, sorted)
    unit = F.normalize(torch.cat([t, a, v], dim=1).double(), dim=1)
    ordered = (unit @ unit.T).sort(dim=1, descending=True).values
    differing, gap = 0, 0.0
    for key, field in (("ss", ours_lists.positives), ("sd", ours_lists.hard_negatives),
                       ("dd", ours_lists.easy_negatives)):
        theirs_ids = official_ids(key)
        where = (theirs_ids != field).nonzero(as_tuple=True)
        differing += len(where[0])
        if len(where[0]):
            if (theirs_ids[where] < 0).any() or (field[where] < 0).any():
                gap = float("inf")  # one list is shorter
            else:
                gap = max(gap, (ordered[where[0], theirs_ids[where]]
                                - ordered[where[0], field[where]]).abs().max().item())
    views_diff = max_abs(torch.stack([t, a, v], dim=1), ours.bank[:, :3])

    rows = torch.tensor(ANCHORS)
    ours.eval()
    with torch.no_grad():
        their_eval = official(sample(rows), None, return_loss=True)[0]
        my_eval = ours(batch(rows)).pred

    # training mode: both sides take the first two positives, easy and hard negatives of each anchor
    official.train()
    ours.train()
    lists = {k: official_ids(k) for k in ("ss", "dd", "sd")}
    neighbours = torch.cat([lists[k][rows, :2] for k in ("ss", "dd", "sd")], dim=1).flatten()
    pred, their_total, their_task, their_con = official(sample(rows), sample(neighbours), return_loss=True)
    dashfusion.draw = first_entries
    out = ours(batch(rows))
    my_task = F.mse_loss(out.pred, labels[rows])
    my_con = out.losses["contrastive"] / ours.config.contrastive_weight
    my_total = my_task + out.losses["contrastive"]
    their_total.backward()
    my_total.backward()
    unused = sorted(k for k, p in official.named_parameters() if p.grad is None)
    if unused != sorted(k for k, _ in official.named_parameters() if re.search(UNUSED, k)):
        raise SystemExit(f"{dataset}: official parameters without a gradient, not the unused ones: {unused}")
    used = sum(p.numel() for k, p in official.named_parameters() if p.grad is not None)
    return {
        "dataset": dataset,
        "parameters": {"official": used, "msakit": parameter_count(ours),
                       "official_all": parameter_count(official)},
        "max_abs_diff": {
            "index views (eval)": views_diff,
            "neighbour lists (similarity gap where they differ)": gap,
            "prediction (eval)": max_abs(their_eval, my_eval),
            "prediction (train)": max_abs(pred, out.pred),
            "task loss": max_abs(their_task, my_task),
            "contrastive loss": max_abs(their_con, my_con),
            "total loss": max_abs(their_total, my_total),
        },
        "gradients": gradient_difference(official, ours, official_name.__getitem__, transform=head_layout),
        "neighbour_entries": {"compared": 3 * n * pool, "differing": differing},
        "contrastive_loss": their_con.item(),
    }


def main() -> None:
    args = parse_args("dashfusion", REPOSITORY, COMMIT)
    try:
        version = importlib.metadata.version("pytorch-metric-learning")
    except importlib.metadata.PackageNotFoundError:
        version = "none"
    if not version.startswith("0.9."):  # the official loss overrides 0.9's method signatures
        print(f"dashfusion parity: the official loss needs pytorch-metric-learning 0.9.x, found {version} "
              "(pip install pytorch-metric-learning==0.9.99 --no-deps)", file=sys.stderr)
        sys.exit(2)
    rows = [compare(args.official, d) for d in ("mosi", "mosei", "sims")]
    counts = ", ".join(f"{r['dataset']} {r['parameters']['official_all']:,}" for r in rows)
    differing = ", ".join(f"{r['dataset']} {r['neighbour_entries']['differing']} of "
                          f"{r['neighbour_entries']['compared']:,}" for r in rows)
    print(write_report(
        "dashfusion", args.output, REPOSITORY, official_commit(args.official, COMMIT), rows,
        switches={k.removeprefix("model."): v for k, v in SWITCHES.items()},
        notes=(
            f"Parameters: those the official forward uses, BERT excluded (all of them: {counts}; its "
            "forward never calls the audio and vision encoders' `fc`, `dense` and `cls_embedding` nor the "
            "temporal alignment's `ffn`, `norm1`, `norm2`, and these are the only parameters without a "
            "gradient) against msakit's with `model.text_source=features`. "
            f"A training split of {SPLIT_SIZE} random unpadded samples (labels uniform in [-2.4, 2.4]; "
            "SIMS: multiples of 0.2 in [-1, 1]) behind the neighbour index; a batch of "
            f"{len(ANCHORS)} of them. Neighbour lists: the official `ss`, `sd`, `dd` (each entry as "
            "the official loader uses it, a sample id) against msakit's `positives`, `hard_negatives`, "
            "`easy_negatives`; where they differ, the column gives the largest difference between "
            "the cosine similarities (float64) of the rank positions the two name, i.e. near-ties "
            "that the two orders of summation rank differently (0: the same lists). Entries "
            f"differing: {differing}. In training "
            "mode both sides use the first two entries of each list and no dropout. msakit's "
            "`neighbour_views: live` and `contrastive_mean: all_pairs` (the official behaviour) are "
            "its defaults; `attend_padding` stays off, as unpadded inputs leave nothing to mask. The "
            "official fusion is called as HBF(H, X_t, X_v, X_a): its modules named for audio are "
            "copied into msakit's vision ones and the other way round, and its head's first layer "
            "with the audio and vision input columns exchanged (gradients compared the same way)."
        ),
    ))


if __name__ == "__main__":
    main()
