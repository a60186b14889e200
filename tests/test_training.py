"""The training loop: schedules, optimiser groups, validation selection, determinism, checkpoints."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from msakit.errors import MsakitError
from msakit.metrics import METRIC_KEYS
from msakit.models import create_model
from msakit.training.checkpoint import check_dims_match, load_checkpoint, save_checkpoint
from msakit.training.config import resolve_config, training_config
from msakit.training.settings import Stage, TrainConfig, scale_stages
from msakit.training.trainer import (
    Trainer,
    best_weight_files,
    build_optimizer,
    build_scheduler,
    seed_everything,
)
from resume_check import assert_same_fit, fit_until_interrupted

FEATURES = {"text_source": "features", "hidden": 16}


def _trainer(dataset, seed: int = 0, **settings) -> Trainer:
    seed_everything(seed)
    model = create_model("text_only", FEATURES, dataset.dims)
    config = TrainConfig(**{"epochs": 3, "batch_size": 16, "lr": 1e-2, "device": "cpu", "state_every": 1,
                            **settings})
    return Trainer(model, config, dataset.metric_family, progress=False)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedule_warms_up_then_follows_its_shape(schedule):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    config = TrainConfig(warmup_ratio=0.1, schedule=schedule)
    scheduler = build_scheduler(optimizer, config, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    expected_end = {"constant": 1.0, "linear": 1 - 89 / 90, "cosine": 0.5 * (1 + math.cos(math.pi * 89 / 90))}
    assert lrs[99] == pytest.approx(expected_end[schedule])
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:], strict=False)), "no increase after warm-up"


def test_unknown_schedule_is_a_user_error():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(MsakitError, match="schedule"):
        build_scheduler(optimizer, TrainConfig(schedule="step"), 10)


def test_optimizer_excludes_biases_and_norms_from_weight_decay(tiny_dataset):
    model = create_model("text_only", FEATURES, tiny_dataset.dims)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in decayed) == (param.ndim >= 2), name


def test_decay_norms_and_biases_moves_the_models_own_into_the_decayed_group(tiny_dataset, tiny_bert,
                                                                            dims):
    model = create_model("mult", {"text_source": "encoder", "text_encoder": tiny_bert, "embed_dim": 8,
                                  "num_heads": 2, "layers": 1}, dims)
    encoder = {id(p) for p in model.text_encoder.model.parameters()}
    exempt = {n for n, p in model.named_parameters() if p.ndim < 2 or "norm" in n.lower()}
    assert any("norm" in n for n in exempt) and any(n.endswith(".bias") for n in exempt)
    for setting in (False, True):
        groups = build_optimizer(model, TrainConfig(weight_decay=0.1, encoder_weight_decay=0.2,
                                                    decay_norms_and_biases=setting)).param_groups
        decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        for name, param in model.named_parameters():
            own = id(param) not in encoder
            expected = name not in exempt or (setting and own)  # the encoder's keep their exemption
            assert (id(param) in decayed) == expected, (setting, name)
    with pytest.raises(MsakitError, match="training.decay_norms_and_biases"):
        TrainConfig(decay_norms_and_biases="yes")


def test_fit_selects_on_validation_and_restores_the_best_weights(tiny_dataset):
    trainer = _trainer(tiny_dataset, epochs=4)
    fit = trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=1)
    best = min(r.valid["mae"] for r in fit.history)
    assert fit.best_valid["mae"] == pytest.approx(best)
    assert trainer.evaluate(tiny_dataset.valid)["mae"] == pytest.approx(best, abs=1e-6)
    assert [r.epoch for r in fit.history if r.improved][-1] == fit.best_epoch


def test_early_stopping_stops_after_patience(tiny_dataset):
    trainer = _trainer(tiny_dataset, epochs=10, lr=0.0, patience=2)
    fit = trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=1)
    assert fit.epochs_run == 3  # epoch 1 is the best; nothing can improve with lr 0
    assert fit.best_epoch == 1


def test_training_reduces_validation_error(tiny_dataset):
    trainer = _trainer(tiny_dataset, epochs=1, lr=0.0)
    before = trainer.evaluate(tiny_dataset.valid)["mae"]
    trainer = _trainer(tiny_dataset, epochs=15, lr=3e-3, patience=None)
    trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=1)
    assert trainer.evaluate(tiny_dataset.valid)["mae"] < before


def test_same_seed_same_result_other_seed_other_result(tiny_dataset):
    runs = []
    for seed in (5, 5, 6):
        trainer = _trainer(tiny_dataset, seed=seed)
        trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=seed)
        runs.append(trainer.predict(tiny_dataset.test)[0])
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_stages_run_in_order_with_the_models_hook(tiny_dataset):
    trainer = _trainer(tiny_dataset, stages=[{"name": "warm", "epochs": 1},
                                             Stage(name="main", epochs=2, lr=1e-3)])
    seen = []
    trainer.model.set_stage = seen.append
    fit = trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=1)
    assert seen == ["warm", "main"]
    assert [(r.stage, r.epoch) for r in fit.history] == [("warm", 1), ("main", 1), ("main", 2)]


def test_each_finished_stage_is_handed_over_with_its_own_learning_rates(tiny_dataset, tiny_bert, dims):
    trainer = _trainer(tiny_dataset, stages=[{"name": "a", "epochs": 1, "lr": 1e-2, "encoder_lr": 1e-5},
                                             {"name": "b", "epochs": 2}])
    rates, finished = [], []
    original = trainer.train_epoch

    def spy(split, optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["initial_lr"])
        return original(split, optimizer, *args, **kwargs)

    trainer.train_epoch = spy
    fit = trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=1, after_stage=finished.append)
    assert [(r.stage, r.epochs_run) for r in finished] == [("a", 1), ("b", 2)]
    assert finished[-1] is fit and rates == [1e-2, trainer.config.lr, trainer.config.lr]
    model = create_model("text_only", {"text_source": "encoder", "text_encoder": tiny_bert}, dims)
    groups = build_optimizer(model, TrainConfig(), lr=1e-2, encoder_lr=1e-5).param_groups
    encoder = {id(p) for p in model.text_encoder.model.parameters()}
    assert {(all(id(p) in encoder for p in g["params"]), g["lr"]) for g in groups} == {
        (True, 1e-5), (False, 1e-2)}
    with pytest.raises(MsakitError, match=r"stages\[a\].encoder_lr"):
        TrainConfig(stages=[{"name": "a", "epochs": 1, "encoder_lr": -1}])


@pytest.mark.parametrize("noisy", [True, False])
def test_models_that_ask_get_the_clean_batch_beside_the_noisy_one(tiny_dataset, noisy):
    seen = []

    def noise(batch, epoch):
        return batch.with_updates(audio=batch.audio * 0.0)

    trainer = _trainer(tiny_dataset, epochs=1)
    trainer.train_transform = noise if noisy else None
    forward = trainer.model.forward

    def spy(batch):
        seen.append(batch)
        return forward(batch)

    trainer.model.forward = spy
    trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=1)
    assert all(b.clean is None for b in seen)  # text_only does not ask for it
    seen.clear()
    trainer.model.needs_clean_input = True
    trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=1)
    training = [b for b in seen if b.clean is not None]
    assert len(training) == math.ceil(len(tiny_dataset.train) / 16)  # evaluation batches get none
    for batch in training:
        assert torch.equal(batch.clean.labels, batch.labels)
        assert batch.clean.audio.abs().sum() > 0
        assert (batch.audio.abs().sum() == 0) == noisy
    assert len(seen) > len(training)


def test_each_tracked_metric_keeps_its_best_validation_epoch(tiny_dataset):
    seed_everything(0)
    model = create_model("text_only", FEATURES, tiny_dataset.dims)
    config = TrainConfig(epochs=6, batch_size=16, lr=3e-3, device="cpu", patience=None)
    calls = []

    def valid_transform(batch):
        calls.append(len(batch))
        return batch.with_updates(text=batch.text * 0.5)

    trainer = Trainer(model, config, "mosi", progress=False, valid_transform=valid_transform,
                      track_metrics=("mae", "corr", "acc7"))
    fit = trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=1)
    assert sum(calls) == 6 * len(tiny_dataset.valid)  # every validation sample, every epoch
    for metric, snapshot in trainer.best_by_metric.items():
        values = [record.valid[metric] for record in fit.history]
        best = min(values) if metric == "mae" else max(values)
        assert snapshot.epoch == values.index(best) + 1
        trainer.model.load_state_dict(snapshot.state)
        assert trainer.evaluate(tiny_dataset.valid, valid_transform)[metric] == pytest.approx(best)


def test_the_model_sees_the_whole_clean_training_split_before_each_epoch(tiny_dataset):
    trainer = _trainer(tiny_dataset, stages=[{"name": "a", "epochs": 1}, {"name": "b", "epochs": 2}])
    trainer.train_transform = lambda batch, epoch: batch.with_updates(audio=batch.audio * 0.0)
    seen = []

    def hook(epoch, train_batches):
        batches = list(train_batches())
        seen.append((epoch, torch.cat([b.index for b in batches]).tolist(),
                     all(b.audio.abs().sum() > 0 for b in batches)))

    trainer.model.on_train_epoch_start = hook
    trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=1)
    everyone = list(range(len(tiny_dataset.train)))
    assert seen == [(1, everyone, True), (2, everyone, True), (3, everyone, True)]


def test_bad_select_metric_is_a_user_error(tiny_dataset):
    with pytest.raises(MsakitError, match="select_metric"):
        _trainer(tiny_dataset, select_metric="acc3")
    model = create_model("text_only", FEATURES, tiny_dataset.dims)
    with pytest.raises(MsakitError, match="acc3"):
        Trainer(model, TrainConfig(device="cpu"), "mosi", track_metrics=("acc3",))


def test_checkpoint_round_trip_rebuilds_the_same_model(tiny_dataset, tmp_path: Path):
    trainer = _trainer(tiny_dataset, epochs=1)
    trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=1)
    path = tmp_path / "run" / "model.pt"
    save_checkpoint(path, trainer.model, training={}, dataset={"name": "tiny"})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"], "no temp file left behind"
    model, meta = load_checkpoint(path)
    assert meta["model_name"] == "text_only" and meta["msakit_version"]
    assert meta["model_config"]["hidden"] == 16
    batch_preds = trainer.predict(tiny_dataset.test)[0]
    trainer.model = model
    np.testing.assert_allclose(trainer.predict(tiny_dataset.test)[0], batch_preds, rtol=1e-6)


def test_loading_a_file_that_is_no_checkpoint_fails_cleanly(tmp_path: Path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MsakitError, match="bad.pt"):
        load_checkpoint(bad)
    torch.save({"weights": 1}, bad)
    with pytest.raises(MsakitError, match="not an msakit checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(MsakitError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_dims_check_names_the_modality(tiny_dataset):
    model = create_model("text_only", FEATURES, tiny_dataset.dims)
    other = type(tiny_dataset.dims)(**{**tiny_dataset.dims.to_dict(), "text": 7})
    with pytest.raises(MsakitError, match="text width"):
        check_dims_match("x.pt", model, other)
    check_dims_match("x.pt", model, tiny_dataset.dims)


def test_config_layers_and_overrides():
    config = resolve_config("text_only", "mosi", ["training.lr=0.5", "model.hidden=8"])
    assert config["training"]["lr"] == 0.5 and config["model"]["hidden"] == 8
    assert training_config(config["training"]).lr == 0.5
    with pytest.raises(MsakitError, match="nonsense"):
        resolve_config("text_only", "mosi", ["model.nonsense=1"])
    with pytest.raises(MsakitError, match="lrr"):
        resolve_config("text_only", "mosi", ["training.lrr=1"])
    with pytest.raises(MsakitError, match="bad --set"):
        resolve_config("text_only", "mosi", ["lr=1"])
    with pytest.raises(MsakitError, match="unknown model 'nope'"):
        resolve_config("nope", "mosi")


@pytest.mark.parametrize(("key", "value"), [
    ("batch_size", 0), ("epochs", 0), ("epochs", 2.5), ("lr", "abc"), ("lr", -1.0),
    ("warmup_ratio", 1.5), ("patience", 0), ("grad_clip", True),
])
def test_bad_training_values_are_named(key, value):
    with pytest.raises(MsakitError, match=f"training.{key}"):
        TrainConfig(**{key: value})


def test_stages_need_a_name_and_epochs():
    with pytest.raises(MsakitError, match="stages"):
        TrainConfig(stages=[{"epochs": 3}])
    with pytest.raises(MsakitError, match=r"stages\[b\].start must be one of restore_best, continue"):
        TrainConfig(stages=[{"name": "a", "epochs": 1}, {"name": "b", "epochs": 1, "start": "best"}])
    with pytest.raises(MsakitError, match=r"stages\[a\].start: continue needs a stage before it"):
        TrainConfig(stages=[{"name": "a", "epochs": 1, "start": "continue"}])


@pytest.mark.parametrize(("epochs", "total", "expected"), [
    ([3, 27], 10, [1, 9]), ([3, 27], 2, [1, 1]), ([3, 27], 30, [3, 27]), ([9, 21], 7, [2, 5]),
    ([1, 1, 1], 4, [2, 1, 1]), ([3, 27], 5, [1, 4]),
])
def test_scaled_stages_keep_their_proportions_and_one_epoch_each(epochs, total, expected):
    stages = [Stage(name=str(i), epochs=e, start="continue" if i else "restore_best")
              for i, e in enumerate(epochs)]
    scaled = scale_stages(stages, total)
    assert [s.epochs for s in scaled] == expected
    assert [(s.name, s.start) for s in scaled] == [(s.name, s.start) for s in stages]
    with pytest.raises(MsakitError, match="need at least"):
        scale_stages(stages, len(stages) - 1)


def test_a_continued_stage_keeps_the_last_weights_and_the_optimizer(tiny_dataset):
    trainer = _trainer(tiny_dataset, patience=None, stages=[
        {"name": "a", "epochs": 3}, {"name": "b", "epochs": 1, "start": "continue"}])
    seen, original = [], trainer.train_epoch

    def spy(split, optimizer, *args, **kwargs):
        weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        seen.append((weights, optimizer, moments))
        loss = original(split, optimizer, *args, **kwargs)
        seen.append(({k: v.clone() for k, v in trainer.model.state_dict().items()}, optimizer,
                     {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}))
        return loss

    trainer.train_epoch = spy
    trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=1)
    (end_weights, end_optimizer, end_moments), (start_weights, start_optimizer, start_moments) = seen[5:7]
    assert start_optimizer is end_optimizer and start_moments.keys() == end_moments.keys()
    for key, value in end_weights.items():
        assert torch.equal(start_weights[key], value), key
    for param, state in end_moments.items():
        for key, value in state.items():
            assert torch.equal(start_moments[param][key], value), key
    assert all(s["step"] == 3 * 3 for s in end_moments.values())  # 48 clips / 16, three epochs


@pytest.mark.parametrize(("stages", "stop_after"), [
    (None, 2),
    ([{"name": "a", "epochs": 2}, {"name": "b", "epochs": 3, "lr": 1e-3}], 1),
    ([{"name": "a", "epochs": 2}, {"name": "b", "epochs": 3, "lr": 1e-3}], 2),
    ([{"name": "a", "epochs": 2}, {"name": "b", "epochs": 3, "lr": 1e-3}], 3),
    ([{"name": "a", "epochs": 2}, {"name": "b", "epochs": 2, "lr": 1e-3, "start": "continue"}], 2),
    ([{"name": "a", "epochs": 2}, {"name": "b", "epochs": 2, "lr": 1e-3, "start": "continue"}], 3),
])
def test_an_interrupted_fit_resumes_to_exactly_the_uninterrupted_result(tiny_dataset, tmp_path, stages,
                                                                        stop_after):
    settings = {"epochs": 4, "patience": None} if stages is None else {"stages": stages}

    def trainer() -> Trainer:
        seed_everything(3)
        model = create_model("text_only", {**FEATURES, "dropout": 0.3}, tiny_dataset.dims)
        config = TrainConfig(batch_size=16, lr=1e-2, device="cpu", warmup_ratio=0.3, state_every=1,
                             **settings)
        return Trainer(model, config, "mosi", progress=False, track_metrics=("mae", "corr"),
                       train_transform=lambda batch, epoch: batch.with_updates(text=batch.text * epoch))

    def report(result):
        return {"stage": result.stage, "epochs": result.epochs_run}

    straight = trainer()
    straight_fit = straight.fit(tiny_dataset.train, tiny_dataset.valid, seed=3, after_stage=report)
    state = tmp_path / "seed-3.state.pt"
    fit_until_interrupted(trainer(), tiny_dataset, 3, state, stop_after, after_stage=report,
                          state_meta={"run": 1})
    resumed = trainer()
    epochs = []
    original = resumed.train_epoch
    resumed.train_epoch = lambda *a, **k: epochs.append(k["epoch"]) or original(*a, **k)
    resumed_fit = resumed.fit(tiny_dataset.train, tiny_dataset.valid, seed=3, after_stage=report,
                              state_file=state, state_meta={"run": 1})
    assert epochs == list(range(stop_after + 1, len(straight_fit.history) + 1)), "only what was left"
    assert_same_fit(straight, straight_fit, resumed, resumed_fit)
    names = [s["name"] for s in stages] if stages else ["main"]
    assert [r["stage"] for r in resumed_fit.stage_reports] == names


def test_a_stage_that_stopped_early_is_not_trained_further_on_resume(tiny_dataset, tmp_path):
    state = tmp_path / "state.pt"
    stages = [{"name": "a", "epochs": 6}, {"name": "b", "epochs": 1}]
    fit_until_interrupted(_trainer(tiny_dataset, lr=0.0, patience=2, stages=stages), tiny_dataset, 1,
                          state, epochs=3)  # stage a stopped after 3 epochs; b was about to start
    resumed = _trainer(tiny_dataset, lr=0.0, patience=2, stages=stages)
    fit = resumed.fit(tiny_dataset.train, tiny_dataset.valid, seed=1, state_file=state)
    assert [(r.stage, r.epoch) for r in fit.history] == [("a", 1), ("a", 2), ("a", 3), ("b", 1)]


def test_a_state_file_from_other_settings_or_no_state_at_all_is_refused(tiny_dataset, tmp_path):
    state = tmp_path / "seed-1.state.pt"
    fit_until_interrupted(_trainer(tiny_dataset), tiny_dataset, 1, state, epochs=1,
                          state_meta={"config": {"training": {"lr": 0.01}}})
    with pytest.raises(MsakitError, match=r"seed-1.state.pt .*other settings \(config.training.lr: "
                                          r"0.01 then, 0.02 now\)"):
        _trainer(tiny_dataset).fit(tiny_dataset.train, tiny_dataset.valid, seed=1, state_file=state,
                                   state_meta={"config": {"training": {"lr": 0.02}}})
    state.write_bytes(b"half a file")
    with pytest.raises(MsakitError, match="not a readable training state"):
        _trainer(tiny_dataset).fit(tiny_dataset.train, tiny_dataset.valid, seed=1, state_file=state)
    fit_until_interrupted(_trainer(tiny_dataset, stages=[{"name": "a", "epochs": 1},
                                                         {"name": "b", "epochs": 2}]),
                          tiny_dataset, 1, tmp_path / "two.pt", epochs=2)
    with pytest.raises(MsakitError, match="from stage 2, this run has 1"):
        _trainer(tiny_dataset).fit(tiny_dataset.train, tiny_dataset.valid, seed=1,
                                   state_file=tmp_path / "two.pt")


@pytest.mark.parametrize(("every", "written_after"), [(1, [1, 2, 3, 4]), (2, [2, 4]), ("auto", [1])])
def test_the_training_state_is_written_as_often_as_it_is_worth(tiny_dataset, tmp_path, monkeypatch,
                                                                every, written_after):
    written = []
    original = Trainer._write_state

    def slow_write(self, *args, **kwargs):
        written.append(len(args[5]))  # the history: epochs done
        time.sleep(0.2)  # a write that costs far more than a tiny epoch: "auto" writes it once
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_write_state", slow_write)
    seed_everything(3)
    model = create_model("text_only", FEATURES, tiny_dataset.dims)
    trainer = Trainer(model, TrainConfig(epochs=4, batch_size=16, device="cpu", patience=None,
                                         state_every=every), "mosi", progress=False)
    trainer.fit(tiny_dataset.train, tiny_dataset.valid, 3, state_file=tmp_path / "s.pt", state_meta={})
    assert written == written_after
    with pytest.raises(MsakitError, match="state_every must be auto or an integer"):
        TrainConfig(state_every=0)


def test_best_weights_are_written_once_when_they_change_and_read_back(tiny_dataset, tmp_path, monkeypatch):
    trainer = _trainer(tiny_dataset, epochs=4, patience=None)
    saved = []
    original = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: saved.append(sorted(obj)) or original(obj, f))
    # the validation MAE gets worse after epoch 1, so epochs 2-4 keep epoch 1's weights as the best
    scores = iter([0.5, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    monkeypatch.setattr(trainer, "evaluate", lambda split, transform=None: {
        **dict.fromkeys(METRIC_KEYS["mosi"], 0.0), "mae": next(scores)})
    state = tmp_path / "s.pt"
    trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=1, state_file=state, state_meta={})
    best_writes = [keys for keys in saved if keys == ["format", "state"]]
    assert len(best_writes) == 1, "epoch 1's weights are written once, at epoch 2, not at 3 and 4"
    assert [p.name for p in best_weight_files(state)] == ["s.best-0-1.pt"]
    resumed = _trainer(tiny_dataset, epochs=4, patience=None)._read_state(state, {})
    expected = trainer.model.state_dict()  # fit ends on the best (epoch 1) weights
    assert all(torch.equal(resumed["best_state"][k], v) for k, v in expected.items())
