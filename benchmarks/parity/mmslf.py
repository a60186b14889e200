"""Numerical parity of msakit's MMSLF with the official implementation (LOGO-CUHKSZ/MMSLF).

    git clone https://github.com/LOGO-CUHKSZ/MMSLF /path/to/MMSLF   # plus `pip install einops`
    python benchmarks/parity/mmslf.py --official /path/to/MMSLF

Builds the official Teacher and Student (models/MMSLF.py) at MOSI, MOSEI and SIMS sizes with the
depths of its training scripts (teacher 6 + 6; student 2 + 2, SIMS 1 + 2 as its README's command),
its BERTs (text and prompt) replaced by the identity, so that both sides read the same 768-d text
and cue states. msakit's `mmslf` reads precomputed text features (`model.text_source=features`) and
the cue states are handed to it in place of its frozen prompt encoder's. The official weights are
copied into msakit's by name with strict loading (the parameters the official student allocates
but never reads, its prompt path, are left out; the official positions are allocated longer than
read and are copied up to msakit's length). Both sides get the same random unpadded inputs.

Per size it compares, for the teacher: the evaluation-mode prediction, fusion tokens and the last
cross layers' attention maps (unmodulated and modulated); in training mode (the cross layers'
dropout drawing the same masks from the same seed), the prediction, the L1 loss and, after one
backward pass, every teacher parameter's gradient. For the student: the evaluation-mode
prediction, fusion tokens and attention maps; in training mode against the frozen teacher in
training mode (the official train_student.py never switches it to eval), the student's and the
teacher's attention maps and fusion tokens, the three loss terms of core/losses.py (L1 task, beta x
attention, gamma x fusion tokens, beta = 60 and gamma = 8 as the README's command), their total,
and every student parameter's gradient. The official script runs the teacher before the student;
here, as in msakit, the student runs first: the order changes nothing but which dropout masks each
draws, and both sides then draw them in the same order from one seeded stream.
Writes benchmarks/results/parity/mmslf.{json,md}.
"""

from __future__ import annotations

import re
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

import msakit.models.mmslf as msakit_mmslf
from msakit.data.schema import FeatureDims
from msakit.models import create_model
from msakit.training.config import resolve_config

REPOSITORY = "LOGO-CUHKSZ/MMSLF"
COMMIT = "f35fa55526cb26385c59546ff5650298389e00f4"
BATCH = 3
PROMPT_LEN = 512  # the official code pads every cue text to 512 tokens
TEXT_WIDTH = 768  # BERT's, which both identities stand for

# models/MMSLF.py's feature widths and the sequence lengths its positions are built for
SIZES = {  # dataset: (audio dim, audio frames, vision dim, vision frames)
    "mosi": (5, 375, 20, 500),
    "mosei": (74, 500, 35, 500),
    "sims": (33, 400, 709, 55),
}
STUDENT_DEPTHS = {"mosi": (2, 2), "mosei": (2, 2), "sims": (1, 2)}  # build_student / README command
ALPHA, BETA, GAMMA = 1.0, 60.0, 8.0

# official parameter name -> msakit's (inside one network): the first matching rule, then INNER
RENAMES = [
    (r"^proj_l0\.", "project.text."), (r"^proj_a0\.", "project.audio."),
    (r"^proj_v0\.", "project.vision."), (r"^proj_p0\.", "prompt_project."),
    (r"^proj_p\.", "prompt_summary."), (r"^fusion_encoder\.", "fusion."), (r"^reg\.0\.", "head."),
    (r"^l_a_encoder\.", "cross.audio."), (r"^l_v_encoder\.", "cross.vision."),
]
INNER = [
    (r"pos_embedding_s$", "source_positions"), (r"pos_embedding_t$", "text_positions"),
    (r"pos_embedding_p$", "prompt_positions"),
    (r"CrossTransformerEncoder\.layers\.(\d+)\.0\.norm_qp\.", r"layers.\1.norm_prompt."),
    (r"CrossTransformerEncoder\.layers\.(\d+)\.0\.norm_([qkv])\.", r"layers.\1.norm_\2."),
    (r"CrossTransformerEncoder\.layers\.(\d+)\.0\.fn\.", r"layers.\1.attn."),
    (r"CrossTransformerEncoder\.layers\.(\d+)\.1\.norm\.", r"layers.\1.norm_ff."),
    (r"CrossTransformerEncoder\.layers\.(\d+)\.1\.fn\.net\.", r"layers.\1.ff."),
    (r"encoder\.layers\.", "blocks."),
    (r"pos_embedding$", "positions"), (r"extra_token$", "tokens"),
    (r"blocks\.(\d+)\.0\.norm_([qkv])\.", r"blocks.\1.norm_\2."),
    (r"blocks\.(\d+)\.0\.fn\.to_out\.0\.", r"blocks.\1.attn.to_out."),
    (r"blocks\.(\d+)\.0\.fn\.", r"blocks.\1.attn."),
    (r"blocks\.(\d+)\.1\.norm\.", r"blocks.\1.norm_ff."),
    (r"blocks\.(\d+)\.1\.fn\.net\.0\.", r"blocks.\1.ff.0."),
    (r"blocks\.(\d+)\.1\.fn\.net\.3\.", r"blocks.\1.ff.2."),
]
# allocated by the official Student (its class copies the Teacher's layers) but never read
STUDENT_UNUSED = r"(norm_qp|to_prompt_k|pos_embedding_p|^proj_p0)"


def official_models(root: Path, dataset: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    (official,) = import_official(root, "models.MMSLF")

    class Identity(torch.nn.Module):  # the official BERT wrapper, minus BERT
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    official.BertTextEncoder = Identity
    teacher = official.Teacher(dataset, encoder_depth=6, fusion_depth=6, bert_pretrained=None,
                               use_only_one_bert=False, bert_finetune=True, prompt_bert_finetune=False)
    cross, fusion = STUDENT_DEPTHS[dataset]
    student = official.Student(dataset, encoder_depth=cross, fusion_depth=fusion, bert_pretrained=None,
                               bert_finetune=False)
    return teacher, student


def copy_weights(official: torch.nn.Module, ours: torch.nn.Module, skip: str | None) -> tuple[dict, int]:
    """Load the official network's weights into msakit's (strict); returns msakit name -> official
    name and the number of official parameter values the forward reads."""
    state = {k: v for k, v in official.state_dict().items() if skip is None or not re.search(skip, k)}
    renamed = rename_state(state, RENAMES, INNER)
    names = dict(zip(renamed, state, strict=True))
    target = ours.state_dict()
    for name, value in renamed.items():
        shape = target[name].shape if name in target else value.shape
        if value.shape != shape:  # positions allocated for more steps than are read
            assert name.endswith("positions"), name
            renamed[name] = value[tuple(slice(0, n) for n in shape)]
    ours.load_state_dict(renamed, strict=True)
    return names, sum(v.numel() for v in renamed.values())


def compare(root: Path, dataset: str) -> list[dict]:
    torch.manual_seed(0)
    teacher, student = official_models(root, dataset)
    audio_dim, audio_len, vision_dim, vision_len = SIZES[dataset]
    dims = FeatureDims(text=TEXT_WIDTH, audio=audio_dim, vision=vision_dim, text_len=50,
                       audio_len=audio_len, vision_len=vision_len, has_text_ids=False)
    config = resolve_config("mmslf", dataset, ["model.text_source=features",
                                               "model.augment_min_keep=1"])["model"]
    msakit_mmslf._encoder_width = lambda name: TEXT_WIDTH  # the prompt "encoder" is the identity
    ours = create_model("mmslf", config, dims)
    assert ours.config.teacher_mode == "train" and ours.config.attention_target == "unmodulated"
    assert (ours.config.attention_weight, ours.config.fusion_weight) == (BETA, GAMMA)
    teacher_names, teacher_used = copy_weights(teacher, ours.teacher, None)
    student_names, student_used = copy_weights(student, ours.student, STUDENT_UNUSED)

    x = {"text": torch.randn(BATCH, 50, TEXT_WIDTH), "audio": torch.randn(BATCH, audio_len, audio_dim),
         "vision": torch.randn(BATCH, vision_len, vision_dim)}
    prompt = torch.randn(BATCH, PROMPT_LEN, TEXT_WIDTH)
    labels = torch.randn(BATCH)
    batch = full_batch(labels, **x)
    ours.prompts = lambda b: (prompt, torch.ones(BATCH, PROMPT_LEN, dtype=torch.bool))
    args = (x["vision"], x["audio"], x["text"])

    def maps(out: dict, mine: msakit_mmslf.NetOutput, modulated: bool = False) -> float:
        key, used = ("modulate_attn", mine.used_attention) if modulated else ("attn", mine.attention)
        return max(max_abs(out[f"h_l{m[0]}_{key}"][-1], used[m]) for m in ("audio", "vision"))

    rows = []
    # the teacher
    teacher.eval()
    ours.set_stage("teacher")
    ours.eval()
    with torch.no_grad():
        theirs = teacher(*args, prompt)
        mine = ours.teacher(batch, prompt, torch.ones(BATCH, PROMPT_LEN, dtype=torch.bool), maps=True)
        pred = ours(batch).pred
    eval_tokens = mine.fusion_tokens
    diff = {"eval prediction": max_abs(theirs["preds"].squeeze(-1), pred),
            "eval fusion tokens": max_abs(theirs["h_reg"], mine.fusion_tokens),
            "eval attention maps": maps(theirs, mine),
            "eval modulated attention maps": maps(theirs, mine, modulated=True)}
    teacher.train()
    ours.train()
    torch.manual_seed(1)
    theirs = teacher(*args, prompt)
    their_loss = F.l1_loss(theirs["preds"], labels.view(-1, 1))
    torch.manual_seed(1)
    out = ours(batch)
    loss = F.l1_loss(out.pred, labels) + sum(out.losses.values())
    their_loss.backward()
    loss.backward()
    assert max_abs(out.pred, pred) > 1e-4, "the training-mode comparison should have dropout on"
    diff.update({"train prediction": max_abs(theirs["preds"].squeeze(-1), out.pred),
                 "task loss": max_abs(their_loss, loss)})
    rows.append({"dataset": f"{dataset} teacher",
                 "parameters": {"official": teacher_used, "msakit": parameter_count(ours.teacher),
                                "official_allocated": parameter_count(teacher)},
                 "max_abs_diff": diff,
                 "gradients": gradient_difference(teacher, ours.teacher, teacher_names.__getitem__)})
    # the student, against the teacher the check just compared (its weights unchanged)
    (losses,) = import_official(root, "core.losses")
    student.eval()
    ours.set_stage("student")
    ours.eval()
    with torch.no_grad():
        theirs = student(*args)
        mine = ours.student(batch, maps=True)
        pred = ours(batch).pred
    diff = {"eval prediction": max_abs(theirs["preds"].squeeze(-1), pred),
            "eval fusion tokens": max_abs(theirs["h_reg"], mine.fusion_tokens),
            "eval attention maps": maps(theirs, mine)}
    student.train()
    teacher.train()  # train_student.py never calls the teacher's eval()
    torch.manual_seed(2)
    theirs = student(*args)
    with torch.no_grad():
        their_targets = teacher(*args, prompt)
    their_losses = losses.MultimodalLoss(ALPHA, BETA, GAMMA)(theirs, their_targets, labels.view(-1, 1))
    captured = {}

    def capture(student_out: msakit_mmslf.NetOutput, teacher_out: msakit_mmslf.NetOutput) -> dict:
        captured.update(student=student_out, teacher=teacher_out)
        return distillation_losses(student_out, teacher_out)

    distillation_losses = ours.distillation_losses
    ours.distillation_losses = capture
    ours.train()
    torch.manual_seed(2)
    out = ours(batch)
    task = F.l1_loss(out.pred, labels)
    loss = task + sum(out.losses.values())
    their_losses["loss"].backward()
    loss.backward()
    assert max_abs(out.pred, pred) > 1e-4, "the training-mode comparison should have dropout on"
    # what msakit's targets were before `teacher_mode` (the teacher in evaluation mode)
    ours.config.teacher_mode = "eval"
    ours.train()
    eval_mode_gap = max_abs(their_targets["h_reg"], eval_tokens)
    with torch.no_grad():
        assert max_abs(ours.run_teacher(batch).fusion_tokens, eval_tokens) < 1e-6
    ours.config.teacher_mode = "train"
    diff.update({
        "train prediction": max_abs(theirs["preds"].squeeze(-1), out.pred),
        "train attention maps": maps(theirs, captured["student"]),
        "teacher's target attention maps": maps(their_targets, captured["teacher"]),
        "train fusion tokens": max_abs(theirs["h_reg"], captured["student"].fusion_tokens),
        "teacher's target fusion tokens": max_abs(their_targets["h_reg"], captured["teacher"].fusion_tokens),
        "task loss": max_abs(ALPHA * their_losses["loss_reg"], task),
        "attention loss": max_abs(BETA * their_losses["loss_attn"], out.losses["attention"]),
        "fusion loss": max_abs(GAMMA * their_losses["loss_fusion"], out.losses["fusion"]),
        "total loss": max_abs(their_losses["loss"], loss),
    })
    rows.append({"dataset": f"{dataset} student",
                 "parameters": {"official": student_used, "msakit": parameter_count(ours.student),
                                "official_allocated": parameter_count(student)},
                 "max_abs_diff": diff,
                 "gradients": gradient_difference(student, ours.student, student_names.__getitem__),
                 "targets_with_teacher_mode_eval": {"fusion_tokens_max_abs_diff": eval_mode_gap}})
    return rows


def main() -> None:
    args = parse_args("mmslf", REPOSITORY, COMMIT)
    rows = [row for dataset in SIZES for row in compare(args.official, dataset)]
    gaps = ", ".join(f"{r['dataset'].split()[0]} {r['targets_with_teacher_mode_eval'][key]:.2f}"
                     for r in rows for key in r.get("targets_with_teacher_mode_eval", ()))
    notes = (
        "Rows: each network at each dataset's size (the student's depths: build_student's 2 + 2, "
        "SIMS 1 + 2 as the README's command). Parameters: the official values the forward reads "
        "(the official Student also allocates a prompt path it never uses, and both networks "
        "allocate positions for more steps than they read; `official_allocated` in the JSON) / "
        "msakit's. msakit's defaults already follow the official code where it has a choice: "
        "`model.teacher_mode=train` (the frozen teacher writes the targets with its dropout on), "
        "`model.attention_target=unmodulated`, `model.prompt_position_std=1`; padding masks hide "
        "nothing on these unpadded inputs. With `model.teacher_mode=eval` (msakit's behaviour before "
        f"the setting) the teacher's target fusion tokens differ from the official ones by up to {gaps}."
    )
    switches = {
        "model.text_source=features": "the text BERT replaced by the identity on both sides; msakit's "
                                      "frozen prompt encoder is likewise bypassed (the cue states are handed "
                                      "to the teacher as the official identity prompt BERT returns them)",
        "model.augment_min_keep=1": "the official teacher's input thinning happens in its training "
                                    "script with numpy's random numbers, not in the model; off on both sides",
    }
    text = write_report("mmslf", args.output, REPOSITORY, official_commit(args.official, COMMIT), rows,
                        switches=switches, notes=notes)
    print(text)


if __name__ == "__main__":
    main()
