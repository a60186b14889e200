"""Numerical parity of msakit's ALMT with the official implementation (Haoyu-ha/ALMT) and, with
`--mmsa`, with MMSA's port of it.

    git clone https://github.com/Haoyu-ha/ALMT /path/to/ALMT   # plus `pip install einops`
    python benchmarks/parity/almt.py --official /path/to/ALMT [--mmsa /path/to/MMSA]
        [--official-2023 /path/to/ALMT-at-242261e]

Builds the official model from its own configs/{mosi,mosei,sims}.yaml, copies its weights into
msakit's `almt` by name with strict loading, and feeds both the same random unpadded inputs
(msakit's padding masks then hide nothing). The text encoder is the identity on both sides (both
read the same 768-d text states; msakit with `text_source: features`) or, in the `tiny BERT` row,
the same random 1-layer BERT folder (tests/tiny_bert.py), loaded by the official BertTextEncoder and
by msakit's TextEncoder. Compares the prediction in evaluation mode and in training mode, the MSE
loss (ALMT's only loss) and, after one backward pass of it, every parameter's gradient. With
`--mmsa` (a checkout of thuiar/MMSA), MMSA's models/singleTask/ALMT.py, built from its
config_regression.json, gets the same comparison. With `--official-2023` (a checkout of the
authors' 2023 release, commit 242261e, which cut audio and vision to 50 frames in its data loader),
that release's model reads the first 50 frames and msakit, with `max_frames: 50`, the whole
sequences. Writes benchmarks/results/parity/almt.{json,md}.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
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

from msakit.data.schema import FeatureDims
from msakit.models import create_model
from msakit.training.config import resolve_config

REPOSITORY = "Haoyu-ha/ALMT"
COMMIT = "da9461071f21e75eb8bf2bedff14ac23f5954605"
MMSA_COMMIT = "a94e65d07fa1ae0d44e552390074b29b0898edfd"
COMMIT_2023 = "242261e649f55f443e808c8da2d3a202ae086fc9"
FRAMES_2023 = 50  # its core/dataset.py cut audio and vision to this many frames
BATCH = 4

# official (or MMSA) parameter name -> msakit's: the first matching rule, then every INNER rule
RENAMES = [
    (r"^h_hyper$", "hyper_init"),
    (r"^bertmodel\.model\.", "text_encoder.model."),
    (r"^(proj|embedding)_l\.0\.", "project.text."), (r"^(proj|embedding)_a\.0\.", "project.audio."),
    (r"^(proj|embedding)_v\.0\.", "project.vision."),
    (r"^(proj|embedding)_l\.1\.", "embed.text."), (r"^(proj|embedding)_a\.1\.", "embed.audio."),
    (r"^(proj|embedding)_v\.1\.", "embed.vision."),
    (r"^l_encoder\.", "language."),
    (r"^h_hyper_layer\.layers\.(\d+)\.0\.", r"hyper.\1."),
    (r"^fusion_layer\.CrossTransformerEncoder\.layers\.", "fusion.blocks."),
    (r"^fusion_layer\.pos_embedding_s$", "fusion.source_positions"),
    (r"^fusion_layer\.pos_embedding_t$", "fusion.target_positions"),
    (r"^fusion_layer\.extra_token$", "fusion.token"),
    (r"^regression_layer\.0\.", "head."), (r"^regression_head\.", "head."),
    # the 2023 release: the linear maps and the transformers apart, other names for two modules
    (r"^proj_l0\.", "project.text."), (r"^proj_a0\.", "project.audio."), (r"^proj_v0\.", "project.vision."),
    (r"^proj_l\.", "embed.text."), (r"^proj_a\.", "embed.audio."), (r"^proj_v\.", "embed.vision."),
    (r"^text_encoder\.", "language."), (r"^cls_head\.0\.", "head."),
]
INNER = [  # inside a transformer / hyper layer
    (r"encoder\.layers\.", "blocks."),
    (r"pos_embedding$", "positions"), (r"extra_token$", "tokens"),
    (r"blocks\.(\d+)\.0\.norm_([qkv])\.", r"blocks.\1.norm_\2."),
    (r"blocks\.(\d+)\.0\.fn\.to_out\.0\.", r"blocks.\1.attn.to_out."),
    (r"blocks\.(\d+)\.0\.fn\.", r"blocks.\1.attn."),
    (r"blocks\.(\d+)\.1\.norm\.", r"blocks.\1.norm_ff."),
    (r"blocks\.(\d+)\.1\.fn\.net\.0\.", r"blocks.\1.ff.0."),
    (r"blocks\.(\d+)\.1\.fn\.net\.3\.", r"blocks.\1.ff.2."),
    (r"(hyper\.\d+\.)norm1\.", r"\1norm_language."), (r"(hyper\.\d+\.)norm2\.", r"\1norm_audio."),
    (r"(hyper\.\d+\.)norm3\.", r"\1norm_vision."), (r"(hyper\.\d+\.)norm4\.", r"\1norm_hyper."),
    (r"(hyper\.\d+\.)fn\.to_out\.0\.", r"\1to_out."),
    (r"(hyper\.\d+\.)fn\.to_k_ta\.", r"\1to_k_audio."), (r"(hyper\.\d+\.)fn\.to_k_tv\.", r"\1to_k_vision."),
    (r"(hyper\.\d+\.)fn\.to_v_ta\.", r"\1to_v_audio."), (r"(hyper\.\d+\.)fn\.to_v_tv\.", r"\1to_v_vision."),
    (r"(hyper\.\d+\.)fn\.to_q\.", r"\1to_q."),
]


class Identity(torch.nn.Module):
    """The official BERT wrapper, minus BERT: it hands the text states on unchanged."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def namespace(values: object) -> object:
    """The official train.py's dict_to_namespace: nested dicts as attribute namespaces."""
    if isinstance(values, dict):
        return types.SimpleNamespace(**{k: namespace(v) for k, v in values.items()})
    return values


def fresh_import(root: Path, *modules: str) -> list:
    """`modules` of the checkout at `root`, whatever another checkout's `models` package left behind."""
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        del sys.modules[name]
    return import_official(root, *modules)


def official_model(root: Path, dataset: str, bert: Path | None) -> tuple[torch.nn.Module, dict]:
    """The official ALMT from configs/<dataset>.yaml; BERT the identity, or the folder `bert`."""
    bert_module, almt = fresh_import(root, "models.bert", "models.almt")
    almt.BertTextEncoder = Identity if bert is None else bert_module.BertTextEncoder
    config = yaml.safe_load((root / "configs" / f"{dataset}.yaml").read_text())
    if bert is not None:
        config["model"].update(bert_pretrained=str(bert), l_input_dim=bert_width(bert))
    return almt.ALMT(namespace(config)), config["model"]


def mmsa_model(root: Path, dataset: str) -> torch.nn.Module:
    """MMSA's models/singleTask/ALMT.py from its config_regression.json, its BertTextEncoder the
    identity; its relative import is served by stand-in packages (the real __init__ files import
    every model and MMSA's runner)."""
    src = root / "src" if (root / "src" / "MMSA").is_dir() else root
    for name in [n for n in sys.modules if n == "MMSA" or n.startswith("MMSA.")]:
        del sys.modules[name]
    for name in ("MMSA", "MMSA.models", "MMSA.models.subNets", "MMSA.models.singleTask"):
        package = types.ModuleType(name)
        package.__path__ = [str(src.joinpath(*name.split(".")))]
        sys.modules[name] = package
    sys.modules["MMSA.models.subNets"].BertTextEncoder = Identity
    config = json.loads((src / "MMSA" / "config" / "config_regression.json").read_text())["almt"]
    args = types.SimpleNamespace(**config["commonParams"], **config["datasetParams"][dataset])
    return importlib.import_module("MMSA.models.singleTask.ALMT").ALMT(args)


def model_2023(root: Path, dataset: str, fusion_depth: int) -> torch.nn.Module:
    """The 2023 release's ALMT (its settings are constructor arguments), BERT the identity."""
    (almt,) = fresh_import(root, "models.almt")
    almt.BertTextEncoder = Identity
    return almt.ALMT(dataset, fusion_layer_depth=fusion_depth)


def leading_parts(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` with each tensor allocated longer than `model`'s (positions built for more steps
    than the model reads) cut to `model`'s leading part."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return {k: v[tuple(slice(0, n) for n in shapes[k])] if k in shapes and v.shape != shapes[k] else v
            for k, v in state.items()}


def bert_width(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["hidden_size"])


def tiny_bert(folder: Path) -> Path:
    """The test suite's random 1-layer BERT (tests/tiny_bert.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from tiny_bert import make_tiny_bert

    return make_tiny_bert(folder)


def compare(reference: torch.nn.Module, label: str, lengths: tuple[int, int, int],
            widths: tuple[int, int, int], fusion_depth: int, bert: Path | None = None,
            max_frames: int | None = None) -> dict:
    """One row: `reference` (official or MMSA, called as forward(vision, audio, text) or
    forward(text, audio, vision)) against msakit's ALMT with its weights. With `max_frames`, the
    reference reads only the first max_frames audio and vision frames (as the 2023 release's data
    loader cut them) and msakit, with that setting, the whole sequences."""
    text_len, audio_len, vision_len = lengths
    text_dim, audio_dim, vision_dim = widths
    dims = FeatureDims(text=None if bert else text_dim, audio=audio_dim, vision=vision_dim,
                       text_len=text_len, audio_len=audio_len, vision_len=vision_len,
                       has_text_ids=bert is not None)
    # null: every frame, as the 2025 release and MMSA (the dataset sections cut to 50: docstring)
    overrides = [f"model.fusion_depth={fusion_depth}",
                 f"model.max_frames={'null' if max_frames is None else max_frames}"]
    overrides += [f"model.text_encoder={bert}"] if bert else ["model.text_source=features"]
    ours = create_model("almt", resolve_config("almt", "mosi", overrides)["model"], dims)
    ours.load_state_dict(leading_parts(rename_state(reference.state_dict(), RENAMES, INNER), ours),
                         strict=True)
    # msakit name -> reference name (the renamed state maps each new name to its old one)
    reference_name = rename_state({k: k for k, _ in reference.named_parameters()}, RENAMES, INNER)

    torch.manual_seed(1)
    audio, vision = torch.randn(BATCH, audio_len, audio_dim), torch.randn(BATCH, vision_len, vision_dim)
    if bert is None:
        text = torch.randn(BATCH, text_len, text_dim)
        batch = full_batch(torch.zeros(BATCH), text=text, audio=audio, vision=vision)
    else:  # token ids, an all-ones attention mask (unpadded), segment ids 0
        ids = torch.randint(1000, 5000, (BATCH, text_len))
        text = torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=1)
        batch = full_batch(torch.zeros(BATCH), audio=audio, vision=vision).with_updates(
            text_ids=text, text_mask=torch.ones(BATCH, text_len, dtype=torch.bool))
    mmsa_order = "regression_head" in dict(reference.named_children())

    cut = slice(0, max_frames)  # the whole sequence when None

    def theirs() -> torch.Tensor:
        if mmsa_order:
            return reference(text, audio, vision).squeeze(-1)
        return reference(vision[:, cut], audio[:, cut], text.float()).squeeze(-1)

    reference.eval()
    ours.eval()
    with torch.no_grad():
        pred_eval = max_abs(theirs(), ours(batch).pred)
    reference.train()
    ours.train()
    # BERT's dropout draws: both sides start from the same generator state and call BERT first
    torch.manual_seed(2)
    their_pred = theirs()
    torch.manual_seed(2)
    my_pred = ours(batch).pred
    target = torch.randn(BATCH)
    their_loss, my_loss = F.mse_loss(their_pred, target), F.mse_loss(my_pred, target)
    their_loss.backward()
    my_loss.backward()
    return {
        "dataset": label,
        "parameters": {"official": parameter_count(reference), "msakit": parameter_count(ours)},
        "max_abs_diff": {"prediction (eval)": pred_eval, "prediction (train)": max_abs(their_pred, my_pred),
                         "MSE loss": max_abs(their_loss, my_loss)},
        "gradients": gradient_difference(reference, ours, reference_name.__getitem__),
    }


def official_row(root: Path, dataset: str, bert: Path | None = None) -> dict:
    torch.manual_seed(0)
    model, config = official_model(root, dataset, bert)
    label = dataset if bert is None else f"{dataset}, tiny BERT"
    lengths = (config["l_input_length"], config["a_input_length"], config["v_input_length"])
    widths = (config["l_input_dim"], config["a_input_dim"], config["v_input_dim"])
    return compare(model, label, lengths, widths, config["fusion_layer_depth"], bert)


def mmsa_row(root: Path, dataset: str) -> dict:
    torch.manual_seed(0)
    model = mmsa_model(root, dataset)
    return compare(model, f"{dataset}, MMSA's port", tuple(getattr(model, f"orig_length_{m}") for m in "lav"),
                   tuple(getattr(model, f"orig_d_{m}") for m in "lav"), model.fusion_layer_depth)


def row_2023(root: Path, official: Path, dataset: str) -> dict:
    """The 2023 release on the input lengths and widths of the 2025 configs (the MMSA pickles')."""
    config = yaml.safe_load((official / "configs" / f"{dataset}.yaml").read_text())["model"]
    torch.manual_seed(0)
    model = model_2023(root, dataset, config["fusion_layer_depth"])
    lengths = (config["l_input_length"], config["a_input_length"], config["v_input_length"])
    widths = (config["l_input_dim"], config["a_input_dim"], config["v_input_dim"])
    return compare(model, f"{dataset}, 2023 release, max_frames 50", lengths, widths,
                   config["fusion_layer_depth"], max_frames=FRAMES_2023)


def main() -> None:
    command = sys.argv
    sys.argv, mmsa = take_folder(command, "--mmsa", "thuiar/MMSA")
    sys.argv, release_2023 = take_folder(sys.argv, "--official-2023", f"{REPOSITORY} at {COMMIT_2023[:7]}")
    args = parse_args("almt", REPOSITORY, COMMIT)
    sys.argv = command  # the report names the whole command
    with tempfile.TemporaryDirectory() as folder:
        rows = [official_row(args.official, d) for d in ("mosi", "mosei", "sims")]
        rows.append(official_row(args.official, "mosi", tiny_bert(Path(folder) / "bert")))
    if mmsa is not None:
        rows += [mmsa_row(mmsa, d) for d in ("mosi", "mosei", "sims")]
    if release_2023 is not None:
        rows += [row_2023(release_2023, args.official, d) for d in ("mosi", "mosei", "sims")]
    mmsa_note = ("" if mmsa is None else
                 f" The rows named MMSA's port compare msakit with thuiar/MMSA @ "
                 f"{official_commit(mmsa, MMSA_COMMIT)} (src/MMSA/models/singleTask/ALMT.py, settings "
                 "from src/MMSA/config/config_regression.json, BERT the identity); its `official` "
                 "parameter count is MMSA's.")
    note_2023 = ("" if release_2023 is None else
                 f" The rows named 2023 release compare msakit (`model.max_frames=50`, fed the whole "
                 f"sequences) with {REPOSITORY} @ {official_commit(release_2023, COMMIT_2023)} fed "
                 "their first 50 audio and vision frames (what its data loader kept); that release "
                 "builds its text positions for 50 steps, so on SIMS (39 tokens) it has 11 x 128 "
                 "position parameters more, never read, and compared on the leading part.")
    print(write_report(
        "almt", args.output, REPOSITORY, official_commit(args.official, COMMIT), rows,
        switches={"model.max_frames": "null (every frame, as the 2025 release and MMSA feed them) in the "
                  "official and MMSA rows; 50, the YAML's dataset sections' value, in the 2023 release rows"},
        notes=("Parameters: the official model with BERT replaced by the identity (msakit's with "
               "`model.text_source=features`), or, in the tiny BERT row, both with the same random "
               "1-layer, 32-wide BERT of tests/tiny_bert.py (msakit with `model.text_encoder` set to "
               "its folder; the official text width `l_input_dim` set to 32). Inputs are unpadded, at "
               "the official configs' input lengths, so msakit's padding masks (`model.mask_padding`, "
               "on by default) hide nothing. ALMT has no dropout; in the "
               "tiny BERT row both BERTs draw the same dropout masks (the same generator state). "
               "The loss is MSE against random targets, a batch of 4." + mmsa_note + note_2023),
    ))


def take_folder(argv: list[str], flag: str, what: str) -> tuple[list[str], Path | None]:
    """`flag PATH` taken out of the arguments the shared parser reads."""
    if flag not in argv:
        return argv, None
    at = argv.index(flag)
    if at + 1 >= len(argv) or not Path(argv[at + 1]).is_dir():
        raise SystemExit(f"{flag} needs a folder: a checkout of {what}")
    return argv[:at] + argv[at + 2:], Path(argv[at + 1])


if __name__ == "__main__":
    main()
