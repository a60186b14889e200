"""Numerical parity of msakit's LNLN with the official implementation (Haoyu-ha/LNLN).

    git clone https://github.com/Haoyu-ha/LNLN /path/to/LNLN   # plus `pip install einops`
    python benchmarks/parity/lnln.py --official /path/to/LNLN

Builds the official model from its own configs/train_{mosi,mosei,sims}.yaml (its BERT replaced by
the identity, so both models read the same 768-d text states), copies its weights into msakit's
`lnln` (text_source: features) by name with strict loading, and feeds both the same random
unpadded inputs (msakit's padding masks then hide nothing). Compares the prediction in evaluation
mode and, in training mode with a noisy and a clean input, the completeness score w, the
adversarial and reconstruction losses, the total loss and, after one backward pass of the total
loss, every parameter's gradient. The completeness target is set equal on both sides (it is
defined differently, see the model's docstring); the gradient reversal sits where the official
code has it (`gradient_reversal: proxy`, msakit's default). Writes
benchmarks/results/parity/lnln.{json,md}.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from almt import INNER, Identity  # LNLN's transformers and hyper layers are ALMT's, names too
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

REPOSITORY = "Haoyu-ha/LNLN"
COMMIT = "80a052c62b7b3b7a6cb6956846e9d9c121f56eda"

# official parameter name -> msakit's: the first matching rule, then every INNER rule in order
RENAMES = [
    (r"^h_hyper$", "hyper_init"),
    (r"^h_p$", "proxy_init"),
    (r"^proj_l\.0\.", "project.text."), (r"^proj_a\.0\.", "project.audio."),
    (r"^proj_v\.0\.", "project.vision."),
    (r"^proj_l\.1\.", "embed.text."), (r"^proj_a\.1\.", "embed.audio."),
    (r"^proj_v\.1\.", "embed.vision."),
    (r"^proxy_dominate_modality_generator\.", "proxy."),
    (r"^effective_discriminator\.", "discriminator."),
    (r"^completeness_check\.0\.", "checker."),
    (r"^completeness_check\.1\.", "checker_head.0."),
    (r"^reconstructor\.0\.", "reconstruct.audio."), (r"^reconstructor\.1\.", "reconstruct.vision."),
    (r"^reconstructor\.2\.", "reconstruct.text."),
    (r"^dmml\.0\.", "language."),
    (r"^dmml\.1\.layers\.(\d+)\.0\.", r"hyper.\1."),
    (r"^dmml\.2\.CrossTransformerEncoder\.layers\.", "fusion.blocks."),
    (r"^dmml\.2\.pos_embedding_s$", "fusion.source_positions"),
    (r"^dmml\.2\.pos_embedding_t$", "fusion.target_positions"),
    (r"^dmml\.2\.extra_token$", "fusion.token"),
    (r"^dmml\.3\.", "head."),
]


def official_model(root: Path, dataset: str) -> tuple[torch.nn.Module, dict]:
    bert, lnln = import_official(root, "models.bert", "models.lnln")
    bert.BertTextEncoder = lnln.BertTextEncoder = Identity
    args = yaml.safe_load((root / "configs" / f"train_{dataset}.yaml").read_text())
    return lnln.LNLN(args), args


def compare(root: Path, dataset: str, batch_size: int = 4) -> dict:
    torch.manual_seed(0)
    official, args = official_model(root, dataset)
    fe = args["model"]["feature_extractor"]
    text_len, vision_len, audio_len = fe["input_length"]
    text_dim, vision_dim, audio_dim = fe["input_dims"]
    dims = FeatureDims(text=text_dim, audio=audio_dim, vision=vision_dim, text_len=text_len,
                       audio_len=audio_len, vision_len=vision_len, has_text_ids=False)
    config = resolve_config("lnln", dataset, ["model.text_source=features"])["model"]
    ours = create_model("lnln", config, dims)
    ours.load_state_dict(rename_state(official.state_dict(), RENAMES, INNER), strict=True)
    # msakit name -> official name (the renamed state maps each new name to its old one)
    official_name = rename_state({k: k for k, _ in official.named_parameters()}, RENAMES, INNER)

    def inputs() -> dict[str, torch.Tensor]:
        return {"text": torch.randn(batch_size, text_len, text_dim),
                "audio": torch.randn(batch_size, audio_len, audio_dim),
                "vision": torch.randn(batch_size, vision_len, vision_dim)}

    noisy, clean = inputs(), inputs()
    labels = torch.zeros(batch_size)
    official.eval()
    ours.eval()
    with torch.no_grad():
        theirs = official((None, None, None), (noisy["vision"], noisy["audio"], noisy["text"]))
        mine = ours(full_batch(labels, **noisy))
    pred_diff = max_abs(theirs["sentiment_preds"].squeeze(-1), mine.pred)

    official.train()
    ours.train()
    theirs = official((clean["vision"], clean["audio"], clean["text"]),
                      (noisy["vision"], noisy["audio"], noisy["text"]))
    # every token and frame counts as dropped: msakit embeds each clean input again, as the official
    # code does, and its completeness target is 0, which is the label given to the official loss
    dropped = {m: torch.ones(v.shape[:2], dtype=torch.bool) for m, v in noisy.items()}
    mine = ours(full_batch(labels, clean=full_batch(labels, **clean), **noisy).with_updates(dropped=dropped))
    cfg = ours.config
    effective = torch.cat([torch.ones(batch_size * 8), torch.zeros(batch_size * 8)]).long()
    their_adv = F.cross_entropy(theirs["effectiveness_discriminator_out"], effective)
    their_rec = F.mse_loss(theirs["rec_feats"], theirs["complete_feats"])
    target = torch.randn(batch_size)
    their_total = (F.mse_loss(theirs["sentiment_preds"].squeeze(-1), target)
                   + cfg.completeness_weight * F.mse_loss(theirs["w"].squeeze(-1), torch.zeros(batch_size))
                   + cfg.adversarial_weight * their_adv + cfg.reconstruction_weight * their_rec)
    my_total = F.mse_loss(mine.pred, target) + sum(mine.losses.values())
    their_total.backward()
    my_total.backward()
    return {
        "dataset": dataset,
        "parameters": {"official": parameter_count(official), "msakit": parameter_count(ours)},
        "max_abs_diff": {
            "prediction (eval)": pred_diff,
            "completeness w (train)": max_abs(theirs["w"].squeeze(-1), mine.features["completeness"]),
            "adversarial loss": max_abs(their_adv, mine.losses["adversarial"] / cfg.adversarial_weight),
            "reconstruction loss": max_abs(their_rec,
                                           mine.losses["reconstruction"] / cfg.reconstruction_weight),
            "total loss": max_abs(their_total, my_total),
        },
        "gradients": gradient_difference(official, ours, official_name.__getitem__),
    }


def main() -> None:
    args = parse_args("lnln", REPOSITORY, COMMIT)
    rows = [compare(args.official, d) for d in ("mosi", "mosei", "sims")]
    print(write_report(
        "lnln", args.output, REPOSITORY, official_commit(args.official, COMMIT), rows,
        switches={},
        notes=("Parameters: the official model without BERT (replaced by the identity) against msakit's "
               "with `model.text_source=features`. The gradient reversal sits where the official code "
               "has it (`model.gradient_reversal: proxy`, msakit's default), so no setting is switched. "
               "The completeness target is 0 on both sides (every token and frame counts as dropped)."),
    ))


if __name__ == "__main__":
    main()
