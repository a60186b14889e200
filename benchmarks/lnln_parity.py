"""Numerical parity of msakit's LNLN with the official implementation (Haoyu-ha/LNLN).

    git clone https://github.com/Haoyu-ha/LNLN /path/to/LNLN   # plus `pip install einops`
    python benchmarks/lnln_parity.py --official /path/to/LNLN

Builds the official model from its own configs/train_{mosi,mosei,sims}.yaml (its BERT replaced by
the identity, so both models read the same 768-d text states), copies its weights into msakit's
`lnln` (text_source: features) by name, and feeds both the same random unpadded inputs (msakit's
padding masks then hide nothing). Compares the parameter counts, the prediction in evaluation
mode, and, in training mode with a noisy and a clean input, the completeness score w, the
adversarial and reconstruction losses, and, after one backward pass of the whole loss (the
completeness target set equal on both sides: it is defined differently, see the model's
docstring), every parameter's gradient: the gradient reversal sits where the official code has
it (`gradient_reversal: proxy`). Writes benchmarks/results/lnln_parity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from msakit.config import resolve_config
from msakit.data.schema import Batch, FeatureDims
from msakit.fileio import atomic_write_text
from msakit.models import create_model

# official parameter name -> msakit name, applied in order (first match wins per rule)
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


def msakit_name(name: str) -> str:
    for pattern, repl in RENAMES:
        if re.search(pattern, name):
            name = re.sub(pattern, repl, name)
            break
    for pattern, repl in INNER:
        name = re.sub(pattern, repl, name)
    return name


def official_model(root: Path, dataset: str) -> tuple[torch.nn.Module, dict]:
    sys.path.insert(0, str(root))
    import models.bert
    import models.lnln

    class Identity(torch.nn.Module):  # the official BERT wrapper, minus BERT
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    models.bert.BertTextEncoder = Identity
    models.lnln.BertTextEncoder = Identity
    args = yaml.safe_load((root / "configs" / f"train_{dataset}.yaml").read_text())
    return models.lnln.LNLN(args), args


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
    state = {msakit_name(k): v for k, v in official.state_dict().items()}
    ours.load_state_dict(state, strict=True)

    def inputs() -> dict[str, torch.Tensor]:
        return {"text": torch.randn(batch_size, text_len, text_dim),
                "audio": torch.randn(batch_size, audio_len, audio_dim),
                "vision": torch.randn(batch_size, vision_len, vision_dim)}

    def batch(x: dict[str, torch.Tensor], clean: Batch | None = None) -> Batch:
        masks = {f"{m}_mask": torch.ones(v.shape[:2], dtype=torch.bool) for m, v in x.items()}
        return Batch(labels=torch.zeros(batch_size), index=torch.arange(batch_size),
                     ids=[str(i) for i in range(batch_size)],
                     presence=torch.ones(batch_size, 3, dtype=torch.bool), clean=clean, **x, **masks)

    noisy, clean = inputs(), inputs()
    official.eval()
    ours.eval()
    with torch.no_grad():
        theirs = official((None, None, None), (noisy["vision"], noisy["audio"], noisy["text"]))
        mine = ours(batch(noisy))
    pred_diff = (theirs["sentiment_preds"].squeeze(-1) - mine.pred).abs().max().item()

    official.train()
    ours.train()
    theirs = official((clean["vision"], clean["audio"], clean["text"]),
                      (noisy["vision"], noisy["audio"], noisy["text"]))
    # every token and frame counts as dropped: msakit embeds each clean input again, as the official
    # code does, and its completeness target is 0, which is the label given to the official loss
    dropped = {m: torch.ones(v.shape[:2], dtype=torch.bool) for m, v in noisy.items()}
    mine = ours(batch(noisy, clean=batch(clean)).with_updates(dropped=dropped))
    cfg = ours.config
    labels = torch.cat([torch.ones(batch_size * 8), torch.zeros(batch_size * 8)]).long()
    their_adv = F.cross_entropy(theirs["effectiveness_discriminator_out"], labels)
    their_rec = F.mse_loss(theirs["rec_feats"], theirs["complete_feats"])
    target = torch.randn(batch_size)
    their_total = (F.mse_loss(theirs["sentiment_preds"].squeeze(-1), target)
                   + cfg.completeness_weight * F.mse_loss(theirs["w"].squeeze(-1), torch.zeros(batch_size))
                   + cfg.adversarial_weight * their_adv + cfg.reconstruction_weight * their_rec)
    my_total = F.mse_loss(mine.pred, target) + sum(mine.losses.values())
    their_total.backward()
    my_total.backward()
    their_grads = {msakit_name(k): p.grad for k, p in official.named_parameters()}
    grad_diff = max((p.grad - their_grads[k]).abs().max().item() for k, p in ours.named_parameters())
    grad_scale = max(g.abs().max().item() for g in their_grads.values())
    w_diff = (theirs["w"].squeeze(-1) - mine.features["completeness"]).abs().max().item()
    return {
        "dataset": dataset,
        "parameters": {"official_without_bert": sum(p.numel() for p in official.parameters()),
                       "msakit_features": sum(p.numel() for p in ours.parameters())},
        "max_abs_diff": {
            "prediction (eval)": pred_diff,
            "completeness w (train)": w_diff,
            "adversarial loss": abs(their_adv.item()
                                    - mine.losses["adversarial"].item() / cfg.adversarial_weight),
            "reconstruction loss": abs(their_rec.item() - mine.losses["reconstruction"].item()
                                       / cfg.reconstruction_weight),
            "total loss": abs(their_total.item() - my_total.item()),
            "every parameter's gradient": grad_diff,
        },
        "largest gradient": grad_scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="a checkout of Haoyu-ha/LNLN")
    parser.add_argument("--output", default="benchmarks/results/lnln_parity")
    args = parser.parse_args()
    rows = [compare(args.official, d) for d in ("mosi", "mosei", "sims")]
    command = shlex.join(["python", *sys.argv])
    out = Path(args.output)
    record = {"command": command, "rows": rows}
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    keys = list(rows[0]["max_abs_diff"])
    lines = ["| dataset | parameters (official without BERT / msakit) | " + " | ".join(keys)
             + " | largest gradient |", "|---" * (len(keys) + 3) + "|"]
    for row in rows:
        p = row["parameters"]
        lines.append(f"| {row['dataset']} | {p['official_without_bert']:,} / {p['msakit_features']:,} | "
                     + " | ".join(f"{row['max_abs_diff'][k]:.1e}" for k in keys)
                     + f" | {row['largest gradient']:.1e} |")
    lines += ["", f"Command: `{command}` (max absolute differences, float32, CPU)"]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
