"""MMSLF (models/mmslf.py): the teacher reads cues, the student has no prompt path, distillation
targets are right, the two stages are one recipe of the training loop and both are reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model_inputs import N, write_cues
from msakit import api
from msakit.cues import attach_cues, load_cue_texts, with_cues
from msakit.data.batching import make_batch
from msakit.data.schema import Batch, MultimodalDataset
from msakit.errors import MsakitError
from msakit.models import create_model
from msakit.models.mmslf import MMSLF

TINY = {"hidden_dim": 8, "dim_head": 4, "cross_heads": 2, "cross_mlp_dim": 8,
        "teacher_fusion_heads": 2, "student_fusion_heads": 2, "fusion_mlp_dim": 8,
        "fusion_tokens": 2, "prompt_heads": 2, "prompt_mlp_dim": 8, "prompt_depth": 1,
        "teacher_cross_depth": 2, "teacher_fusion_depth": 2, "student_cross_depth": 1,
        "student_fusion_depth": 1, "prompt_max_len": 64, "dropout": 0.0}


@pytest.fixture(scope="module")
def cues(split, tmp_path_factory) -> str:
    return write_cues(tmp_path_factory.mktemp("cues") / "cues.jsonl", {"train": split})


def _cued_batch(split, path) -> Batch:
    """The split's batch with the cue file's texts attached, as a run attaches them."""
    return make_batch(with_cues(split, load_cue_texts(path)), np.arange(len(split)))


@pytest.fixture(scope="module")
def batch(split, cues) -> Batch:
    return _cued_batch(split, cues)


def _mmslf(dims, tiny_bert: str, cues: str | None, seed: int = 0, **settings) -> MMSLF:
    torch.manual_seed(seed)
    return create_model("mmslf", {"text_source": "features", "prompt_encoder": tiny_bert,
                                  "cues": cues, **TINY, **settings}, dims)


def test_the_student_has_no_prompt_path_and_predicts_without_cues(dims, batch, tiny_bert):
    model = _mmslf(dims, tiny_bert, cues=None).eval()
    assert not [n for n, _ in model.student.named_parameters() if "prompt" in n]
    assert [n for n, _ in model.teacher.named_parameters() if "prompt" in n]
    assert model(batch).pred.shape == (N,)  # a fresh or loaded model predicts with the student
    model.set_stage("teacher")
    with pytest.raises(MsakitError, match="model.cues"):
        model(batch.with_updates(side={}))  # no cues attached: the teacher cannot read any


def test_the_prompt_modulates_the_teacher(dims, batch, tiny_bert, cues):
    # one cross layer: its queries come straight from the text, so only the modulation differs
    model = _mmslf(dims, tiny_bert, cues, teacher_cross_depth=1).eval()
    with torch.no_grad():
        with_prompt = model.run_teacher(batch, maps=True)
        without = model.teacher(batch, maps=True)
    assert not torch.allclose(with_prompt.pred, without.pred)
    for m in ("audio", "vision"):
        # the unmodulated map does not depend on the prompt; the map the teacher used does
        torch.testing.assert_close(with_prompt.attention[m], without.attention[m])
        assert not torch.allclose(with_prompt.used_attention[m], with_prompt.attention[m])
        rows = with_prompt.used_attention[m].sum(-1)
        torch.testing.assert_close(rows, torch.ones_like(rows))


@pytest.mark.parametrize("target", ["unmodulated", "modulated"])
def test_distillation_is_zero_when_the_student_is_the_teachers_prompt_free_path(
    dims, batch, tiny_bert, cues, target
):
    same_shape = {"student_cross_depth": TINY["teacher_cross_depth"],
                  "student_fusion_depth": TINY["teacher_fusion_depth"]}
    model = _mmslf(dims, tiny_bert, cues, attention_target=target, **same_shape).eval()
    missing = model.student.load_state_dict(model.teacher.state_dict(), strict=False)
    assert not missing.missing_keys and all("prompt" in k for k in missing.unexpected_keys)
    with torch.no_grad():
        student = model.student(batch, maps=True)
        losses = model.distillation_losses(student, model.teacher(batch, maps=True))
        assert set(losses) == {"attention", "fusion"}
        assert all(v.item() == 0 for v in losses.values())
        with_prompt = model.distillation_losses(student, model.run_teacher(batch, maps=True))
    assert with_prompt["fusion"] > 0 and with_prompt["attention"] > 0  # the same check can fail


def _grads(model: MMSLF, batch: Batch) -> dict[str, bool]:
    model.zero_grad()
    out = model(batch)
    (out.pred.pow(2).mean() + sum(out.losses.values())).backward()
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}


def test_each_stage_trains_its_own_network_only(dims, batch, tiny_bert, cues):
    model = _mmslf(dims, tiny_bert, cues).train()
    model.set_stage("teacher")
    grads = _grads(model, batch)
    assert all(grads[n] for n in grads if n.startswith("teacher.")), [n for n in grads if not grads[n]]
    assert not any(grads[n] for n in grads if n.startswith("student."))
    model.set_stage("student")
    assert model.student.training is True  # the teacher's mode: test_teacher_mode_decides_...
    out = model(batch)
    assert set(out.losses) == {"attention", "fusion"}
    assert all(torch.isfinite(v) and v > 0 for v in out.losses.values())
    grads = _grads(model, batch)
    assert all(grads[n] for n in grads if n.startswith("student."))
    assert not any(grads[n] for n in grads if n.startswith("teacher."))
    with pytest.raises(MsakitError, match="teacher, student"):
        model.set_stage("main")


def test_without_distillation_weights_the_student_trains_alone(dims, batch, tiny_bert):
    model = _mmslf(dims, tiny_bert, cues=None, attention_weight=0, fusion_weight=0).train()
    assert model(batch).losses == {}  # no teacher run, so no cue file is needed


def test_teacher_augmentation_thins_inputs_but_keeps_special_tokens(dims, batch, tiny_bert):
    model = _mmslf(dims, tiny_bert, cues=None, text_source="encoder", text_encoder=tiny_bert)
    torch.manual_seed(1)
    thinned = model.augment(batch)
    assert (thinned.audio == 0).float().mean() > (batch.audio == 0).float().mean()
    ids, new_ids = batch.text_ids[:, 0], thinned.text_ids[:, 0]
    special = torch.isin(ids, torch.tensor([0, 101, 102]))
    assert torch.equal(new_ids[special], ids[special])
    assert (new_ids[~special] == model.unk_id).any()
    off = _mmslf(dims, tiny_bert, cues=None, augment_min_keep=1.0)
    assert off.augment(batch) is batch


def test_a_cue_file_without_an_id_of_the_batch_is_named(dims, tiny_bert, tmp_path, split):
    path = write_cues(tmp_path / "partial.jsonl", {"train": split.subset([0, 1])})
    model = _mmslf(dims, tiny_bert, path).eval()
    model.set_stage("teacher")
    with pytest.raises(MsakitError, match="partial.jsonl: no cues for 4 sample"):
        model(_cued_batch(split, path))


def test_train_runs_the_teacher_then_the_student_and_reports_both(tiny_dataset, tiny_bert, tmp_path):
    data = tiny_dataset
    path = write_cues(tmp_path / "cues.jsonl", {s: data.split(s) for s in ("train", "valid", "test")})
    stages = "[{name: teacher, epochs: 3, lr: 1.0e-3}, {name: student, epochs: 3, lr: 1.0e-3}]"
    result = api.train("mmslf", data, progress=False, output=tmp_path / "run", overrides=[
        f"model.cues={path}", f"model.prompt_encoder={tiny_bert}", "model.prompt_max_len=64",
        *(f"model.{k}={v}" for k, v in TINY.items() if k != "prompt_max_len"),
        f"training.stages={stages}", "training.batch_size=16",
    ])
    run = result["seeds"][0]
    assert [s["stage"] for s in run["stages"]] == ["teacher", "student"]
    assert run["test"] == run["stages"][-1]["test"]
    assert set(result["stages"]) == {"teacher", "student"}
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["inputs"]["cues"] == {
        "path": path, "backends": ["test"], "samples_without_cues": 0,
        "sources": [{"backend": "test", "model": "none", "prompt_version": "1",
                     "samples": sum(len(data.split(s)) for s in ("train", "valid", "test"))}],
    }
    history = {stage: [h["train_loss"] for h in run["history"] if h["stage"] == stage]
               for stage in ("teacher", "student")}
    assert all(len(losses) == 3 and losses[-1] < losses[0] for losses in history.values()), history
    # the saved checkpoint predicts with the student, without the cue file
    evaluated = api.evaluate(tmp_path / "run" / run["checkpoint"], data)
    assert evaluated["metrics"]["mae"] == pytest.approx(run["test"]["mae"], abs=1e-5)


def test_the_teachers_text_encoder_is_fine_tuned_and_the_students_is_not(dims, batch, tiny_bert, cues):
    model = _mmslf(dims, tiny_bert, cues, text_source="encoder", text_encoder=tiny_bert).train()
    for stage, net in (("teacher", model.teacher), ("student", model.student)):
        model.set_stage(stage)
        grads = _grads(model, batch)
        # the pooler is never read, so "some gradient" rather than "every parameter"
        encoder = [grads[n] for n in grads if n.startswith(f"{stage}.text_encoder.model.")]
        assert encoder and any(encoder) == (stage == "teacher")
        assert net.text_encoder.model.training == (stage == "teacher")


def test_prompt_position_std_scales_only_the_prompt_positions(dims, tiny_bert, cues):
    official = _mmslf(dims, tiny_bert, cues)
    small = _mmslf(dims, tiny_bert, cues, prompt_position_std=0.02)
    for name, value in official.state_dict().items():
        scaled = "prompt_positions" in name or name == "teacher.prompt_summary.positions"
        # the same random numbers are drawn, so the student (and all else) is the same network
        torch.testing.assert_close(small.state_dict()[name], 0.02 * value if scaled else value)
    assert any("prompt_positions" in name for name in official.state_dict())


@pytest.mark.parametrize("value", [0, -1.0, True, "small"])
def test_a_bad_prompt_position_std_is_named(dims, tiny_bert, value):
    with pytest.raises(MsakitError, match="model.prompt_position_std"):
        _mmslf(dims, tiny_bert, None, prompt_position_std=value)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_teacher_mode_decides_whether_the_targets_have_dropout(dims, batch, tiny_bert, cues, mode):
    model = _mmslf(dims, tiny_bert, cues, dropout=0.5, teacher_mode=mode, text_source="encoder",
                   text_encoder=tiny_bert).train()
    model.set_stage("student")
    assert model.teacher.training == (mode == "train") and model.student.training
    assert not model.teacher.text_encoder.model.training  # the official BERT stays in eval mode
    with torch.no_grad():
        first, second = (model.run_teacher(batch, maps=True) for _ in range(2))
        model.eval()
        plain = model.run_teacher(batch, maps=True)
    for target in (second, plain):
        same = torch.allclose(first.fusion_tokens, target.fusion_tokens) and all(
            torch.allclose(first.attention[m], target.attention[m]) for m in ("audio", "vision"))
        assert same == (mode == "eval")
    assert not model.teacher.training


def test_a_bad_teacher_mode_is_named(dims, tiny_bert):
    with pytest.raises(MsakitError, match="model.teacher_mode"):
        _mmslf(dims, tiny_bert, None, teacher_mode="frozen")


def test_the_run_records_which_backends_wrote_the_cues_it_read(split, tmp_path):
    path = write_cues(tmp_path / "cues.jsonl", {"train": split.subset([0, 1, 2])}, backend="offline")
    later = write_cues(tmp_path / "b.jsonl", {"train": split.subset([2])}, "openai")
    with open(path, "a") as f:  # a later line for an id replaces the earlier one
        f.write(Path(later).read_text())
    config = {"model": {"cues": path, "attention_weight": 60.0, "fusion_weight": 8.0},
              "training": {"stages": [{"name": "student"}]}}
    assert MMSLF.side_inputs(config, training=True) == {"cues": path}
    data = MultimodalDataset("tiny", "synthetic", split.subset([0, 1, 2, 3]), split.subset([4]),
                             split.subset([5]))
    attached, cues = attach_cues(data, path)
    assert attached.train.side["cues"][3] is None and attached.train.side["cues"][0].startswith("Visual")
    assert cues["backends"] == ["offline", "openai"] and cues["samples_without_cues"] == 3
    assert [(s["backend"], s["samples"]) for s in cues["sources"]] == [("offline", 2), ("openai", 1)]
    # a student trained without distillation reads no cues, nor does a saved model being scored
    plain = {**config["model"], "attention_weight": 0, "fusion_weight": 0}
    assert MMSLF.side_inputs({**config, "model": plain}, training=True) == {}
    assert MMSLF.side_inputs(config, training=False) == {}
