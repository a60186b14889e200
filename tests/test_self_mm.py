"""Self-MM: the ULGM's generated labels against the paper's rule, its memory across a resume (with
accumulated batches), its optimiser groups, and the published settings. The registry-wide
contract covers the rest."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model_inputs import N, contract_split
from msakit.data.batching import make_batch
from msakit.data.schema import Batch, MultimodalDataset, Split
from msakit.errors import MsakitError
from msakit.models import create_model
from msakit.models.registry import build_config
from msakit.models.self_mm import HEADS, UNIMODAL, SelfMM
from msakit.training import distributed
from msakit.training.config import resolve_config
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer, build_optimizer, seed_everything
from resume_check import assert_resumed_fit_is_the_straight_fit

TINY = {"audio_hidden": 4, "vision_hidden": 4, "audio_out": 4, "vision_out": 4, "post_fusion_dim": 8,
        "post_text_dim": 4, "post_audio_dim": 4, "post_vision_dim": 4}
NO_DROPOUT = {f"post_{s}_dropout": 0.0 for s in ("fusion", "text", "audio", "vision")}


def _signed_split() -> Split:
    """The contract split with labels of both signs (and a zero, which neither centre counts)."""
    labels = np.array([2.0, -1.5, 0.5, -0.5, 0.0, -2.0], dtype=np.float32)
    return dataclasses.replace(contract_split(), labels=labels)


@pytest.fixture(scope="module")
def split() -> Split:
    return _signed_split()


@pytest.fixture(scope="module")
def batch(split: Split) -> Batch:
    return make_batch(split, np.arange(N))


def _model(dims, **settings) -> SelfMM:
    torch.manual_seed(0)
    return create_model("self_mm", {"text_source": "features", **TINY, **NO_DROPOUT, **settings}, dims)


def _hook(model: SelfMM, epoch: int, split: Split) -> None:
    model.on_train_epoch_start(epoch, lambda: iter([make_batch(split, np.arange(N))]))


def _numpy(values: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy().copy() for k, v in values.items()}


def papers_labels(labels: dict[str, np.ndarray], centres: dict[str, np.ndarray],
                  representations: dict[str, np.ndarray], epoch: int, bound: float) -> dict[str, np.ndarray]:
    """Yu et al. 2021, eqs. (5)-(9): alpha_s = (D_n - D_p) / D_p from the distances to the positive
    and negative centres; y_s = y_m alpha_s / (2 alpha_m) + (y_m + alpha_s - alpha_m) / 2, clipped
    to [-H, H]; then the momentum y^(n) = (n-1)/(n+1) y^(n-1) + 2/(n+1) y_s."""
    def alpha(head: str) -> np.ndarray:
        positive = np.linalg.norm(representations[head] - centres[head][0], axis=1)
        negative = np.linalg.norm(representations[head] - centres[head][1], axis=1)
        return (negative - positive) / (positive + 1e-8)

    y_m, a_m = labels["fusion"], alpha("fusion")
    out = {}
    for head in UNIMODAL:
        a_s = alpha(head)
        new = np.clip(y_m * a_s / (2 * (a_m + 1e-8)) + (y_m + a_s - a_m) / 2, -bound, bound)
        out[head] = (epoch - 1) / (epoch + 1) * labels[head] + 2 / (epoch + 1) * new
    return out


def test_epoch_one_keeps_the_labels_and_centres_the_representations(dims, split, batch):
    model = _model(dims)
    _hook(model, 1, split)
    out = model.train()(batch)
    memory = model.memory
    for head in HEADS:
        torch.testing.assert_close(memory.labels[head], batch.labels, rtol=0, atol=0)
        assert out.losses.get(head, torch.tensor(0.0)) == 0  # tanh(|y_s - y_m|) = 0 in epoch 1
        features = memory.features[head].double().numpy()
        labels = batch.labels.numpy()
        expected = np.stack([features[labels > 0].mean(0), features[labels < 0].mean(0)])
        np.testing.assert_allclose(memory.centres[head].numpy(), expected, rtol=1e-6)
    torch.testing.assert_close(memory.features["text"], out.features["text"])


def test_generated_labels_follow_the_papers_rule(dims, split, batch):
    model = _model(dims)
    _hook(model, 1, split)
    model.train()(batch)
    memory = model.memory
    with torch.no_grad():
        representations = model.eval()(batch).features
    # a constructed case: sample 0's fused representation is twice as far from the negative fusion
    # centre as from the positive one (alpha_m = 1) and its text representation sits on the
    # positive text centre (alpha_t -> infinity); the generated labels start at 0.3
    fused, unit = representations["fused"][0], torch.ones_like(representations["fused"][0])
    unit = unit / unit.norm()
    memory.centres["fusion"][0], memory.centres["fusion"][1] = fused + unit, fused - 2 * unit
    memory.centres["text"][0] = representations["text"][0]
    memory.labels["text"][:] = 0.3
    labels, centres = _numpy(memory.labels), _numpy(memory.centres)
    epoch = 3
    _hook(model, epoch, split)
    out = model.train()(batch)
    reps = _numpy({s: out.features["fused" if s == "fusion" else s] for s in HEADS})
    expected = papers_labels(labels, centres, reps, epoch, bound=3.0)
    for head in UNIMODAL:
        np.testing.assert_allclose(memory.labels[head].double().numpy(), expected[head], rtol=1e-5, atol=1e-6)
        # the losses read the labels as they were before this update
        weight = np.tanh(np.abs(labels[head] - labels["fusion"]))
        loss = np.mean(weight * np.abs(out.features[f"pred_{head}"].detach().double().numpy() - labels[head]))
        np.testing.assert_allclose(out.losses[head].item(), loss, rtol=1e-5)
    # y_m = 2, alpha_m = 1, alpha_t -> infinity: the target is +H, reached at weight 2 / (n + 1)
    assert memory.labels["text"][0].item() == pytest.approx(0.5 * 0.3 + 0.5 * 3.0)
    # and each label moves toward its target by the momentum (n - 1) / (n + 1)
    for head in UNIMODAL:
        target = (expected[head] - (epoch - 1) / (epoch + 1) * labels[head]) * (epoch + 1) / 2
        before, after = np.abs(labels[head] - target), np.abs(memory.labels[head].numpy() - target)
        np.testing.assert_allclose(after, (epoch - 1) / (epoch + 1) * before, rtol=1e-4, atol=1e-6)


def test_the_audio_and_vision_subnetworks_train_at_their_own_rates(dims):
    """MMSA's groups on MOSEI: audio 5e-3 without decay, vision 1e-4 without decay, the rest 1e-3 with
    1e-2, biases included (the encoder's group is the pretrained one, absent on text features)."""
    resolved = resolve_config("self_mm", "mosei", ["model.text_source=features"])
    model = create_model("self_mm", {**resolved["model"], **TINY}, dims)
    optimizer = build_optimizer(model, TrainConfig(**resolved["training"]))
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        expected = {"audio": (5e-3, 0.0), "vision": (1e-4, 0.0)}.get(name.split(".")[0], (1e-3, 1e-2))
        assert rate[id(param)] == expected, name


def test_the_label_memory_survives_a_resume(tiny_dataset, tmp_path):
    trainers: list[Trainer] = []

    def trainer() -> Trainer:
        seed_everything(0)
        model = create_model("self_mm", {"text_source": "features", **TINY}, tiny_dataset.dims)
        # 3 batches an epoch: one group of 2 accumulated, the third computed (the ULGM runs) and dropped
        config = TrainConfig(epochs=4, batch_size=16, accumulate_steps=2, lr=3e-3, device="cpu",
                             patience=None)
        trainers.append(Trainer(model, config, tiny_dataset.metric_family, progress=False))
        return trainers[-1]

    # killed after epoch 2: epochs 3 and 4 update the labels the first two generated
    assert_resumed_fit_is_the_straight_fit(trainer, tiny_dataset, 0, tmp_path / "state.pt", epochs=2)
    straight, resumed = trainers[0].model.memory, trainers[2].model.memory
    given = torch.as_tensor(tiny_dataset.train.labels)
    assert not torch.equal(straight.labels["text"], given)  # the ULGM did generate labels
    for key in ("labels", "features", "centres"):
        for head in HEADS:
            assert torch.equal(getattr(straight, key)[head], getattr(resumed, key)[head]), (key, head)


def _memory_of_rank(rank: int, world: int, init_file: str, out_file: str) -> None:
    """One rank of `world` (gloo, CPU): two epochs, each one batch of which it holds its part."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    split = _signed_split()
    model = _model(MultimodalDataset("tiny", "synthetic", split, split, split).dims)
    for epoch in (1, 2):
        _hook(model, epoch, split)
        model.train()(make_batch(split, np.array_split(np.arange(N), world)[rank]))
    if rank == 0:
        torch.save(model.training_state(), out_file)
    distributed.close()


@pytest.mark.slow  # two spawned processes, each importing torch and msakit
def test_ranks_keep_the_memory_one_process_keeps(dims, split, batch, tmp_path):
    """Two ranks, each with half of every batch, end with the memory of one process with the
    whole batches (torchrun)."""
    single = _model(dims)
    for epoch in (1, 2):
        _hook(single, epoch, split)
        single.train()(batch)
    files = (str(tmp_path / "init"), str(tmp_path / "memory.pt"))
    torch.multiprocessing.spawn(_memory_of_rank, args=(2, *files), nprocs=2)
    ranks = torch.load(tmp_path / "memory.pt")
    assert ranks["ids"] == single.memory.ids.tolist()
    for key in ("labels", "features", "centres"):
        for head in HEADS:
            torch.testing.assert_close(ranks[key][head], getattr(single.memory, key)[head])


def test_a_batch_from_another_split_is_refused(dims, split):
    model = _model(dims)
    _hook(model, 1, split)
    other = make_batch(contract_split(seed=1), np.arange(N))
    other.ids[0] = "not-in-the-memory"
    with pytest.raises(MsakitError, match="label memory"):
        model.train()(other)


def test_no_unimodal_losses_without_a_memory_or_in_evaluation(dims, split, batch: Batch):
    model = _model(dims)
    assert model.train()(batch).losses == {}
    _hook(model, 1, split)
    assert set(model.train()(batch).losses) == set(UNIMODAL)
    assert model.eval()(batch).losses == {}


@pytest.mark.parametrize("family", ["mosi", "mosei", "sims", "simsv2", "synthetic"])
def test_yaml_resolves_for_every_family(family):
    resolved = resolve_config("self_mm", family)
    build_config("self_mm", resolved["model"])
    assert resolved["training"]["loss"] == "l1" and resolved["training"]["patience"] == 8


def test_yaml_holds_the_published_values():
    """Spot checks against MMSA's config_regression.json (self_mm) @a94e65d: batch sizes 16/32/32/16
    with update_epochs 4, H 3/3/1/3, post_text_dim 32/32/64/64, the groups' rates and decays."""
    families = ("mosi", "mosei", "sims", "simsv2")
    configs = [resolve_config("self_mm", f) for f in families]
    assert [c["training"]["batch_size"] for c in configs] == [16, 32, 32, 16]
    assert {c["training"]["accumulate_steps"] for c in configs} == {4}
    assert [c["model"]["audio_lr"] for c in configs] == [5e-3, 5e-3, 5e-3, 1e-3]
    assert [c["model"]["vision_lr"] for c in configs] == [5e-3, 1e-4, 5e-3, 1e-3]
    assert [c["model"]["audio_weight_decay"] for c in configs] == [1e-3, 0.0, 1e-2, 0.0]
    assert [c["model"]["vision_weight_decay"] for c in configs] == [1e-3, 0.0, 1e-2, 0.0]
    assert [c["model"]["label_bound"] for c in configs] == [3.0, 3.0, 1.0, 3.0]
    assert [c["model"]["post_text_dim"] for c in configs] == [32, 32, 64, 64]
    assert [c["training"]["weight_decay"] for c in configs] == [1e-3, 1e-2, 1e-3, 1e-3]
    assert [c["training"]["encoder_weight_decay"] for c in configs] == [1e-3, 1e-3, 1e-3, 1e-2]
    assert {c["training"]["encoder_lr"] for c in configs} == {5e-5}
