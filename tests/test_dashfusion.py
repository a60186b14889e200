"""DashFusion (models/dashfusion.py) beyond the model contract (tests/contract): every parameter
learns through the contrastive loss, absent modalities change nothing they should not, the
contrastive loss behaves as NT-Xent, the neighbour index retrieves the right samples and is rebuilt
on schedule, a short run learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model_inputs import N, contract_split, pad_noise, padded_longer
from msakit.data.batching import make_batch
from msakit.errors import MsakitError
from msakit.missing import MissingSpec, apply_missing, drop_whole_modalities
from msakit.models import create_model, dashfusion
from msakit.models.dashfusion import DashFusion, draw, neighbour_contrastive_loss
from msakit.models.layers.neighbours import label_buckets
from msakit.models.registry import build_config
from msakit.training.checkpoint import load_checkpoint, save_checkpoint
from msakit.training.config import resolve_config
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer, seed_everything
from resume_check import assert_resumed_fit_is_the_straight_fit

TINY = {"hidden": 8, "heads": 2, "encoder_layers": 1, "encoder_ffn": 8, "encoder_dropout": 0.0,
        "embed_dropout": 0.0, "align_heads": 2, "align_head_dim": 4, "fusion_depth": 2,
        "bottleneck_tokens": 4, "fusion_ffn": 8, "neighbour_pool": 3, "num_positives": 2,
        "num_negatives": 1}


def _model(dims, seed: int = 0, **settings) -> DashFusion:
    torch.manual_seed(seed)
    return create_model("dashfusion", {"text_source": "features", **TINY, **settings}, dims)


def _indexed(dims, split, **settings) -> DashFusion:
    """A model whose memory bank and neighbour index cover `split`, as after the epoch hook."""
    model = _model(dims, **settings)
    model.on_train_epoch_start(1, lambda: iter([make_batch(split, np.arange(N))]))
    return model


def test_shapes_and_every_parameter_learns(dims, split, batch):
    model = _indexed(dims, split).train()
    torch.manual_seed(0)
    out = model(batch)
    assert out.pred.shape == (N,)
    assert out.features["fused"].shape == (N, 4 * 8)
    assert set(out.losses) == {"contrastive"} and out.losses["contrastive"] > 0
    (out.pred.pow(2).mean() + out.losses["contrastive"]).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_no_contrastive_loss_without_an_index_or_in_evaluation(dims, split, batch):
    assert _model(dims).train()(batch).losses == {}
    model = _indexed(dims, split).eval()
    with torch.no_grad():
        assert model(batch).losses == {}
    assert _indexed(dims, split, contrastive_weight=0.0).bank is None


def test_bottleneck_halves_per_level(dims):
    model = _model(dims, fusion_depth=3, bottleneck_tokens=8)
    assert model.fusion.sizes == [8, 4, 2]


def test_padding_changes_nothing_with_a_text_shorter_than_the_bottleneck(dims, batch):
    """Values in padded frames, and more padding (these texts hold 8 steps, padded to 11, for 10
    bottleneck tokens), change nothing."""
    model = _model(dims, bottleneck_tokens=10).eval()
    with torch.no_grad():
        reference = model(batch).pred
        torch.testing.assert_close(model(pad_noise(batch)).pred, reference)
        torch.testing.assert_close(model(padded_longer(batch)).pred, reference)


def test_an_absent_stream_is_ignored_whatever_it_holds(dims, batch):
    model = _model(dims).eval()
    only_text = apply_missing(batch, MissingSpec("fixed", subset="t"))
    scrambled = only_text.with_updates(audio=torch.randn_like(batch.audio),
                                       vision=torch.randn_like(batch.vision))
    with torch.no_grad():
        kept = model(only_text).pred
        torch.testing.assert_close(model(scrambled).pred, kept)
        assert not torch.allclose(kept, model(batch).pred)


def test_absent_streams_take_no_part_in_the_contrastive_loss(dims, split, batch, monkeypatch):
    seen = {}

    def spy(anchors, positives, negatives, positive_mask, negative_mask, temperature, count):
        seen["mask"] = positive_mask.view(4, N, -1)  # views (text, audio, vision, fused) x samples
        return neighbour_contrastive_loss(anchors, positives, negatives, positive_mask, negative_mask,
                                          temperature, count)

    monkeypatch.setattr(dashfusion, "neighbour_contrastive_loss", spy)
    model = _indexed(dims, split, label_bucket=2.0).train()  # every bucket holds 3 samples
    keep = torch.ones(N, 3, dtype=torch.bool)
    keep[1, 1] = keep[2, 2] = False  # sample 1 without audio, sample 2 without vision
    model(drop_whole_modalities(batch, keep))
    mask = seen["mask"]  # per view: 2 neighbour positives, then (text view only) audio, vision
    assert not mask[1, 1].any() and not mask[2, 2].any()
    assert mask[0, 1].tolist() == [True, True, False, True]
    assert mask[0, 2].tolist() == [True, True, True, False]
    assert mask[0, 0].all() and mask[3, 1:3, :2].all() and not mask[1:, :, 2:].any()


def _reference_loss(anchors, positives, negatives, pos_ok, neg_ok, t):
    """NT-Xent written out pair by pair."""
    cos = torch.nn.functional.cosine_similarity
    terms = []
    for i in range(len(anchors)):
        negs = [math.exp(cos(anchors[i], negatives[i, n], dim=0) / t)
                for n in range(negatives.shape[1]) if neg_ok[i, n]]
        for p in range(positives.shape[1]):
            if pos_ok[i, p]:
                e = math.exp(cos(anchors[i], positives[i, p], dim=0) / t)
                terms.append(-math.log(e / (e + sum(negs))))
    return sum(terms) / len(terms)


def test_contrastive_loss_is_nt_xent_over_the_given_pairs():
    torch.manual_seed(0)
    a, p, n = torch.randn(5, 6), torch.randn(5, 3, 6), torch.randn(5, 4, 6)
    pos_ok, neg_ok = torch.rand(5, 3) > 0.3, torch.rand(5, 4) > 0.3
    pos_ok[0, 0] = neg_ok[0, 0] = True
    loss = neighbour_contrastive_loss(a, p, n, pos_ok, neg_ok, 0.5)
    assert loss.item() == pytest.approx(_reference_loss(a, p, n, pos_ok, neg_ok, 0.5), rel=1e-5)


def test_contrastive_loss_zero_gradient_for_one_class_of_identical_embeddings():
    same = torch.randn(1, 6).expand(4, 6)
    anchors = same.clone().requires_grad_()
    positives = same.unsqueeze(1).expand(4, 2, 6).clone().requires_grad_()
    # one class: every neighbour is a positive, no valid negative
    negatives = torch.randn(4, 3, 6)
    loss = neighbour_contrastive_loss(anchors, positives, negatives, torch.ones(4, 2, dtype=torch.bool),
                                      torch.zeros(4, 3, dtype=torch.bool), 0.5)
    loss.backward()
    assert loss.item() == 0.0
    assert (anchors.grad == 0).all() and (positives.grad == 0).all()


def test_contrastive_loss_is_positive_otherwise():
    torch.manual_seed(1)
    ok2, ok3 = torch.ones(4, 2, dtype=torch.bool), torch.ones(4, 3, dtype=torch.bool)
    same = torch.randn(1, 6).expand(4, 6)
    # identical embeddings but two classes: nothing separates positives from negatives
    loss = neighbour_contrastive_loss(same, same.unsqueeze(1).expand(4, 2, 6),
                                      same.unsqueeze(1).expand(4, 3, 6), ok2, ok3, 0.5)
    assert loss.item() == pytest.approx(math.log(4))
    # distinct embeddings: positive loss, and one gradient step lowers it
    anchors = torch.randn(4, 6, requires_grad=True)
    positives, negatives = torch.randn(4, 2, 6), torch.randn(4, 3, 6)
    loss = neighbour_contrastive_loss(anchors, positives, negatives, ok2, ok3, 0.5)
    loss.backward()
    assert loss > 0 and anchors.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = neighbour_contrastive_loss(anchors - 0.1 * anchors.grad, positives, negatives,
                                             ok2, ok3, 0.5)
    assert stepped < loss


def test_draw_takes_distinct_entries_of_the_pool():
    torch.manual_seed(0)
    pool = torch.tensor([[5, 7, 9], [4, -1, -1], [-1, -1, -1]])
    for _ in range(20):
        drawn = draw(pool, 2)
        assert set(drawn[0].tolist()) <= {5, 7, 9} and len(set(drawn[0].tolist())) == 2
        assert sorted(drawn[1].tolist()) == [-1, 4]
        assert drawn[2].tolist() == [-1, -1]


def test_retrieved_neighbours_are_the_right_training_samples(tiny_dataset):
    """The bank row of each sample is that sample's views, and its retrieved positives share its
    label bucket and are the most similar such samples (the official code keeps rank positions)."""
    train = tiny_dataset.train
    model = _model(tiny_dataset.dims, neighbour_pool=4)
    model.on_train_epoch_start(1, lambda: (make_batch(train, np.arange(s, min(s + 10, len(train))))
                                           for s in range(0, len(train), 10)))
    assert list(model.bank_ids) == list(train.ids)
    model.eval()
    rows = np.array([3, 17, 40])
    with torch.no_grad():
        torch.testing.assert_close(model.bank[rows], model.batch_views(make_batch(train, rows)))

    features = torch.nn.functional.normalize(model.bank[:, :3].flatten(1), dim=1)
    similarity = features @ features.T
    buckets = label_buckets(torch.from_numpy(train.labels))
    for i in range(len(train)):
        positives = model.neighbours.positives[i]
        found = positives[positives >= 0]
        candidates = [j for j in range(len(train)) if j != i and buckets[j] == buckets[i]]
        assert len(found) == min(4, len(candidates))
        assert (buckets[found] == buckets[i]).all()
        best = sorted(candidates, key=lambda j: -similarity[i, j].item())[: len(found)]
        torch.testing.assert_close(similarity[i, found], similarity[i, best])
        hard = model.neighbours.hard_negatives[i]
        assert (buckets[hard] != buckets[i]).all()
        assert similarity[i, hard].min() >= similarity[i, model.neighbours.easy_negatives[i]].max()


def _pre_sample(features: torch.Tensor, buckets: torch.Tensor, k: int) -> dict[str, list[list[int]]]:
    """The official `__pre_sample` (MOSI loader), loop for loop: rank positions, not samples."""
    unit = torch.nn.functional.normalize(features, dim=1)
    rank = (unit @ unit.T).argsort(dim=1, descending=True, stable=True)
    n = len(features)
    lists = {"ss": [], "sd": [], "dd": []}
    for i in range(n):
        ss, sd, dd = [], [], []
        for j in range(n):
            if i != j:
                (ss if buckets[i] == buckets[rank[i][j]] else sd).append(j)
        for j in range(-1, -n, -1):
            if buckets[i] != buckets[rank[i][j]]:
                dd.append(n + j)  # a negative position indexes the data from its end
        for key, found in (("ss", ss), ("sd", sd), ("dd", dd)):
            lists[key].append(found[:k] + [-1] * (k - len(found[:k])))
    return lists


def test_official_neighbour_index_keeps_rank_positions(tiny_dataset):
    train = tiny_dataset.train
    built = {}
    for mode in ("official", "fixed"):
        model = _model(tiny_dataset.dims, neighbour_pool=4, neighbour_index=mode)
        model.on_train_epoch_start(1, lambda: iter([make_batch(train, np.arange(len(train)))]))
        built[mode] = model.neighbours
    expected = _pre_sample(model.bank[:, :3].flatten(1), label_buckets(torch.from_numpy(train.labels)), 4)
    official = built["official"]
    assert official.positives.tolist() == expected["ss"]
    assert official.hard_negatives.tolist() == expected["sd"]
    assert official.easy_negatives.tolist() == expected["dd"]
    assert official.positives.tolist() != built["fixed"].positives.tolist()


def test_live_neighbour_views_carry_the_gradient_the_bank_does_not(dims, split, batch):
    """Without dropout and with the weights the index was built with, live views equal the bank's:
    the same loss, but only the live one reaches the weights through the neighbours."""
    losses, grads = {}, {}
    for mode in ("live", "bank"):
        model = _indexed(dims, split, neighbour_views=mode).train()
        torch.manual_seed(3)
        out = model(batch)
        out.losses["contrastive"].backward()
        losses[mode] = out.losses["contrastive"].item()
        grads[mode] = model.frames["audio"].project.weight.grad.clone()
    assert losses["live"] == pytest.approx(losses["bank"], rel=1e-5)
    assert not torch.allclose(grads["live"], grads["bank"])


def test_live_neighbour_views_need_the_training_split(dims, split, batch):
    model = _indexed(dims, split).train()
    model.store = None
    with pytest.raises(MsakitError, match="live neighbour views"):
        model(batch)


def test_contrastive_mean_all_pairs_divides_by_the_official_pair_count(dims, split, batch, monkeypatch):
    seen = {}

    def spy(*args):
        seen["pairs"] = args[3].sum().item()
        return neighbour_contrastive_loss(*args)

    monkeypatch.setattr(dashfusion, "neighbour_contrastive_loss", spy)
    losses = {}
    for mode in ("all_pairs", "loss_pairs"):
        model = _indexed(dims, split, contrastive_mean=mode).train()
        torch.manual_seed(3)
        losses[mode] = model(batch).losses["contrastive"].item()
    # per anchor: 4 views x 2 positives + 2 cross-modal pairs + each of the 2 + 2 x 1 neighbours'
    # own 2 cross-modal pairs
    official_pairs = N * (4 * 2 + 2 + 2 * (2 + 2 * 1))
    assert 0 < seen["pairs"] < official_pairs
    assert losses["all_pairs"] == pytest.approx(losses["loss_pairs"] * seen["pairs"] / official_pairs,
                                                rel=1e-5)


def test_attend_padding_lets_padding_change_the_prediction(dims, batch):
    official, ours = _model(dims, attend_padding=True).eval(), _model(dims).eval()
    unpadded = batch.with_updates(**{f"{m}_mask": torch.ones_like(getattr(batch, f"{m}_mask"))
                                     for m in ("text", "audio", "vision")})
    with torch.no_grad():
        # the same weights: with nothing to mask, the switch changes nothing
        torch.testing.assert_close(official(unpadded).pred, ours(unpadded).pred)
        assert not torch.allclose(official(padded_longer(batch)).pred, official(batch).pred)


def test_index_is_rebuilt_every_k_epochs(dims, split):
    model = _model(dims, refresh_every=2)
    built = []
    for epoch in range(1, 6):
        model.on_train_epoch_start(epoch, lambda: iter([make_batch(split, np.arange(N))]))
        built.append(id(model.bank))
    assert built[0] == built[1] != built[2] == built[3] != built[4]


def test_a_batch_from_another_split_is_refused(dims, split):
    model = _indexed(dims, split).train()
    other = make_batch(contract_split(seed=1), np.arange(N))
    other.ids[0] = "not-in-the-index"
    with pytest.raises(MsakitError, match="neighbour index"):
        model(other)


def test_short_training_reduces_the_loss(tiny_dataset):
    seed_everything(0)
    model = create_model("dashfusion", {"text_source": "features", **TINY, "hidden": 16,
                                        "encoder_ffn": 16, "fusion_ffn": 16}, tiny_dataset.dims)
    config = TrainConfig(epochs=10, batch_size=16, lr=3e-3, loss="mse", device="cpu", patience=None)
    trainer = Trainer(model, config, tiny_dataset.metric_family, progress=False)
    fit = trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=0)
    losses = [record.train_loss for record in fit.history]
    assert model.bank is not None and len(model.bank) == len(tiny_dataset.train)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2])


@pytest.mark.parametrize("family", ["mosi", "mosei", "sims", "simsv2", "synthetic"])
def test_yaml_resolves_for_every_family(family):
    resolved = resolve_config("dashfusion", family)
    config = build_config("dashfusion", resolved["model"])
    assert config.hidden == (32 if family == "synthetic" else 128)
    assert resolved["training"]["loss"] == "mse" and resolved["training"]["select_metric"] == "mae"


def test_yaml_holds_the_published_values():
    """Spot checks against ultramarineX/DashFusion src/config.py (and its README's depth note)."""
    mosi, mosei, sims = (resolve_config("dashfusion", f) for f in ("mosi", "mosei", "sims"))
    assert [c["model"]["encoder_layers"] for c in (mosi, mosei, sims)] == [2, 4, 2]
    assert [c["model"]["fusion_depth"] for c in (mosi, mosei, sims)] == [2, 3, 2]
    assert [c["training"]["lr"] for c in (mosi, mosei, sims)] == [5e-5, 2e-5, 5e-5]
    assert [c["training"]["batch_size"] for c in (mosi, mosei, sims)] == [16, 8, 16]
    assert mosi["training"]["encoder_lr"] == mosi["training"]["lr"]
    assert (mosi["training"]["weight_decay"], mosi["training"]["schedule"]) == (1e-3, "linear")
    assert (mosi["model"]["temperature"], mosi["model"]["contrastive_weight"]) == (0.5, 0.2)
    assert [c["model"]["label_bucket"] for c in (mosi, mosei, sims)] == [1.0, 1.0, 0.2]
    published = [build_config("dashfusion", c["model"]) for c in (mosi, mosei, sims)]
    assert {(c.neighbour_views, c.contrastive_mean, c.neighbour_index) for c in published} == {
        ("live", "all_pairs", "fixed")}
    synthetic = build_config("dashfusion", resolve_config("dashfusion", "synthetic")["model"])
    assert synthetic.neighbour_views == "bank"  # msakit's own CPU recipe


@pytest.mark.parametrize(
    ("settings", "key"),
    [({"hidden": 10, "heads": 4}, "heads"), ({"temperature": 0.0}, "temperature"),
     ({"num_positives": 11}, "num_positives"), ({"encoder_dropout": 1.0}, "encoder_dropout"),
     ({"fusion_depth": 0}, "fusion_depth"), ({"label_bucket": -1}, "label_bucket"),
     ({"neighbour_index": "ranks"}, "neighbour_index"), ({"neighbour_views": "cache"}, "neighbour_views"),
     ({"contrastive_mean": "mean"}, "contrastive_mean"), ({"attend_padding": "yes"}, "attend_padding")],
)
def test_bad_settings_are_user_errors(settings, key):
    with pytest.raises(MsakitError, match=key):
        build_config("dashfusion", settings)


def test_a_longer_valid_sequence_than_built_for_is_a_user_error(dims, batch):
    audio = torch.cat([batch.audio, batch.audio], dim=1)
    longer = batch.with_updates(audio=audio, audio_mask=torch.ones(audio.shape[:2], dtype=torch.bool))
    with pytest.raises(MsakitError, match="longer"):
        _model(dims).eval()(longer)


def test_a_checkpoint_holds_no_memory_bank(dims, split, batch, tmp_path):
    """The bank is rebuilt by training, never stored: predictions do not need it."""
    model = _indexed(dims, split).eval()
    save_checkpoint(tmp_path / "dashfusion.pt", model, training={}, dataset={})
    loaded, _ = load_checkpoint(tmp_path / "dashfusion.pt")
    assert model.bank is not None and loaded.bank is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).pred, model(batch).pred)


def test_a_resumed_training_keeps_the_bank_it_had_between_refreshes(tiny_dataset, tmp_path):
    def trainer() -> Trainer:
        seed_everything(0)
        model = create_model("dashfusion", {"text_source": "features", **TINY, "refresh_every": 2},
                             tiny_dataset.dims)
        config = TrainConfig(epochs=3, batch_size=16, lr=3e-3, loss="mse", device="cpu", patience=None)
        return Trainer(model, config, tiny_dataset.metric_family, progress=False)

    # killed after epoch 1: epoch 2 reuses epoch 1's bank
    assert_resumed_fit_is_the_straight_fit(trainer, tiny_dataset, 0, tmp_path / "state.pt", epochs=1)
