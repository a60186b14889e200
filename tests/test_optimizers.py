"""`training.optimizer` (AdamW or Adam with L2 decay), `adam_eps`, `encoder_decay_norms_and_biases` and
`training.plateau` (ReduceLROnPlateau on the validation MAE): the update against torch and by hand,
which parameters are decayed, when the rate drops, exact resume, bad values."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch

from msakit.errors import MsakitError
from msakit.metrics import METRIC_KEYS
from msakit.models import create_model
from msakit.training.config import resolve_config, training_config
from msakit.training.settings import ADDED_SETTINGS, Stage, TrainConfig, without_added_settings
from msakit.training.trainer import Trainer, build_optimizer, build_scheduler, seed_everything
from resume_check import assert_same_fit, fit_until_interrupted

FEATURES = {"text_source": "features", "hidden": 16}


def _trainer(dataset, seed: int = 3, dropout: float = 0.0, **settings) -> Trainer:
    seed_everything(seed)
    model = create_model("text_only", {**FEATURES, "dropout": dropout}, dataset.dims)
    config = TrainConfig(**{"epochs": 3, "batch_size": 16, "lr": 1e-2, "device": "cpu", "state_every": 1,
                            "patience": None, **settings})
    return Trainer(model, config, dataset.metric_family, progress=False)


def _hand_adam(weight: torch.Tensor, grads: list[torch.Tensor], lr: float, decay: float,
               eps: float = 1e-8) -> torch.Tensor:
    """Adam's update written out (betas 0.9, 0.999) with `decay` as L2: g + decay w."""
    w, m, v = weight.double().clone(), torch.zeros_like(weight.double()), torch.zeros_like(weight.double())
    for t, grad in enumerate(grads, start=1):
        g = grad.double() + decay * w
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w - lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + eps)
    return w


def test_adam_adds_the_weight_decay_to_the_gradient(tiny_dataset):
    """Three steps of `optimizer: adam` against torch.optim.Adam built by hand over the same two
    groups and against Adam written out; AdamW at the same settings ends elsewhere."""
    lr, decay = 0.05, 0.5
    model = create_model("text_only", FEATURES, tiny_dataset.dims)
    torch.manual_seed(0)
    grads = {name: [torch.randn_like(p) for _ in range(3)] for name, p in model.named_parameters()}
    start = copy.deepcopy(model.state_dict())

    def three_steps(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]) -> dict:
        for t in range(3):
            for name, param in params.items():
                param.grad = grads[name][t].clone()
            optimizer.step()
        return {name: param.detach().clone() for name, param in params.items()}

    settings = TrainConfig(lr=lr, weight_decay=decay, optimizer="adam")
    ours = build_optimizer(model, settings)
    assert type(ours) is torch.optim.Adam
    ours_after = three_steps(ours, dict(model.named_parameters()))

    reference = create_model("text_only", FEATURES, tiny_dataset.dims)
    reference.load_state_dict(start)
    named = dict(reference.named_parameters())
    decayed = [p for p in named.values() if p.ndim >= 2]  # biases and norms are not decayed
    torch_adam = torch.optim.Adam([{"params": decayed, "weight_decay": decay},
                                   {"params": [p for p in named.values() if p.ndim < 2]}], lr=lr)
    assert three_steps(torch_adam, named).keys() == ours_after.keys()
    for name, value in ours_after.items():
        assert torch.equal(value, named[name].detach()), name
        by_hand = _hand_adam(start[name], grads[name], lr, decay if value.ndim >= 2 else 0.0)
        torch.testing.assert_close(value.double(), by_hand, rtol=1e-5, atol=1e-6)

    model.load_state_dict(start)
    adamw_after = three_steps(build_optimizer(model, dataclasses.replace(settings, optimizer="adamw")),
                              dict(model.named_parameters()))
    assert any(not torch.allclose(adamw_after[n], ours_after[n], atol=1e-4) for n in ours_after
               if ours_after[n].ndim >= 2), "decoupled and L2 decay differ"
    assert all(torch.equal(adamw_after[n], ours_after[n]) for n in ours_after if ours_after[n].ndim < 2)


def test_without_decay_adam_and_adamw_train_the_same_weights(tiny_dataset):
    """At weight decay 0 the two are the same update (MISA's and MAG-BERT's MMSA settings)."""
    weights = []
    for optimizer in ("adamw", "adam"):
        trainer = _trainer(tiny_dataset, dropout=0.2, optimizer=optimizer, epochs=2,
                           encoder_weight_decay=0.0)
        trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=3)
        weights.append(trainer.model.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def _decayed(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """The weight decay of each parameter `optimizer` decays, by parameter id."""
    return {id(p): g["weight_decay"] for g in optimizer.param_groups if g["weight_decay"] > 0
            for p in g["params"]}


@pytest.mark.parametrize(("own", "encoder"), itertools.product((False, True), repeat=2))
def test_encoder_decay_norms_and_biases_decays_the_encoders_biases_and_norms(tiny_bert, dims, own, encoder):
    """Each flag moves its side's biases and norms (fewer than two dimensions, `.bias`, `norm`) into
    its decayed group, at its side's decay; weight matrices are decayed either way; both false
    (the defaults) is msakit's grouping before the encoder flag existed."""
    model = create_model("mult", {"text_source": "encoder", "text_encoder": tiny_bert, "embed_dim": 8,
                                  "num_heads": 2, "layers": 1}, dims)
    pretrained = {id(p) for p in model.pretrained_parameters()}
    exempt = {n for n, p in model.named_parameters()
              if p.ndim < 2 or n.endswith(".bias") or "norm" in n.lower()}
    assert {n for n in exempt if "LayerNorm" in n} and {n for n in exempt if n.endswith(".bias")}
    settings = TrainConfig(weight_decay=0.1, encoder_weight_decay=0.2, decay_norms_and_biases=own,
                           encoder_decay_norms_and_biases=encoder)
    decayed = _decayed(build_optimizer(model, settings))
    for name, param in model.named_parameters():
        is_encoder = id(param) in pretrained
        expected = name not in exempt or (encoder if is_encoder else own)
        assert (id(param) in decayed) == expected, name
        if expected:
            assert decayed[id(param)] == (0.2 if is_encoder else 0.1), name
    if not (own or encoder):  # today's groups: (encoder | rest) x (decayed | not), in that order
        groups = build_optimizer(model, settings).param_groups
        assert [(g["pretrained"], g["weight_decay"]) for g in groups] == [
            (True, 0.2), (True, 0.0), (False, 0.1), (False, 0.0)]


def test_adam_eps_reaches_every_group_and_extra_phase(tiny_dataset, dims):
    """`adam_eps` is each optimiser's eps (AdamW's and Adam's, MMIM's bound phase's too), torch's
    1e-8 by default, and Adam steps with it."""
    for optimizer in ("adamw", "adam"):
        for eps in (None, 3e-8):
            settings = {"optimizer": optimizer} | ({} if eps is None else {"adam_eps": eps})
            trainer = Trainer(create_model("mmim", {"text_source": "features", "audio_hidden": 3,
                                                    "vision_hidden": 3, "fusion_hidden": 6}, dims),
                              TrainConfig(epochs=1, device="cpu", **settings), "mosi", progress=False)
            loop = trainer._start_stage(Stage("main", 1), 1, None, None)
            optimizers = [loop.optimizer, *loop.phase_optimizers.values()]
            assert len(optimizers) == 2
            for group in (g for o in optimizers for g in o.param_groups):
                assert group["eps"] == (1e-8 if eps is None else eps), (optimizer, eps)
    lr, eps = 0.05, 0.5  # an eps large enough to move the step
    model = create_model("text_only", FEATURES, tiny_dataset.dims)
    start = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    grads = {name: [torch.randn_like(p) for _ in range(2)] for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, TrainConfig(lr=lr, optimizer="adam", adam_eps=eps))
    for t in range(2):
        for name, param in model.named_parameters():
            param.grad = grads[name][t].clone()
        optimizer.step()
    for name, param in model.named_parameters():
        by_hand = _hand_adam(start[name], grads[name], lr, 0.0, eps)
        torch.testing.assert_close(param.detach().double(), by_hand, rtol=1e-5, atol=1e-6)


def _scripted_fit(dataset, maes: list[float], **settings) -> list[float]:
    """The main learning rate each epoch trained at, when validation scores the MAEs `maes` in turn."""
    trainer = _trainer(dataset, epochs=len(maes), **settings)
    scores, rates = iter(maes), []
    other = dict.fromkeys(METRIC_KEYS[dataset.metric_family], 0.0)
    trainer.evaluate = lambda split, transform=None: {**other, "mae": next(scores)}
    original = trainer.train_epoch

    def train_epoch(split, optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return original(split, optimizer, *args, **kwargs)

    trainer.train_epoch = train_epoch
    trainer.fit(dataset.train, dataset.valid, seed=3)
    return rates


def test_plateau_lowers_the_rate_after_patience_epochs_without_improvement(tiny_dataset):
    # best 0.8 at epoch 2; epochs 3-5 do not beat it (0.8 again is no improvement): the third of
    # them, more than patience 2, lowers the rate for epoch 6; 0.7 is a new best, 7-9 lower it again
    maes = [1.0, 0.8, 0.9, 0.85, 0.8, 0.7, 0.75, 0.75, 0.7, 0.7]
    rates = _scripted_fit(tiny_dataset, maes, plateau={"factor": 0.5, "patience": 2})
    assert rates == [1e-2] * 5 + [5e-3] * 4 + [2.5e-3]
    assert _scripted_fit(tiny_dataset, maes) == [1e-2] * 10  # no plateau, no change


def test_plateau_multiplies_the_warm_up_and_schedule(tiny_dataset):
    """The schedule's factor at each epoch's first step, times factor per reduction."""
    maes = [1.0, 1.0, 1.0, 0.5, 1.0, 1.0]
    settings = {"warmup_ratio": 0.4, "schedule": "linear"}
    rates = _scripted_fit(tiny_dataset, maes, plateau={"factor": 0.1, "patience": 1}, **settings)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    schedule = build_scheduler(optimizer, TrainConfig(**settings), total_steps=3 * len(maes))
    plain = []
    for _ in range(len(maes)):
        plain.append(optimizer.param_groups[0]["lr"])
        for _ in range(3):  # 48 samples in batches of 16
            schedule.step()
    # epoch 3 is the second without improvement: lowered from epoch 4; 0.5 resets the count, epoch
    # 6 is again the second after it, so nothing more within the run
    assert rates == pytest.approx([*plain[:3], *(r * 0.1 for r in plain[3:])], rel=1e-12)


@pytest.mark.parametrize(("stages", "patience", "stop_after"), [
    (None, 1, 3), (None, 1, 4),
    ([{"name": "a", "epochs": 2}, {"name": "b", "epochs": 4}], 1, 4),
    ([{"name": "a", "epochs": 2}, {"name": "b", "epochs": 4, "start": "continue"}], 0, 4),
])
def test_an_interrupted_fit_with_a_plateau_resumes_exactly(tiny_dataset, tmp_path, stages, patience,
                                                           stop_after):
    """lr 0.1 bounces on this data: the plateau lowers the rate within the (last) stage, after
    epoch 5 (one stage), 5 (restore_best, patience 1) or 4 (continue, patience 0); stopped after
    epoch 4, the resumed fit must keep the count of epochs without improvement, or the lowered rate
    and the schedule's lowered base rate."""
    settings = {"epochs": 6} if stages is None else {"stages": stages}
    settings = {**settings, "lr": 0.1, "optimizer": "adam", "weight_decay": 1e-2, "warmup_ratio": 0.2,
                "plateau": {"factor": 0.5, "patience": patience}}
    rates = []
    straight = _trainer(tiny_dataset, dropout=0.3, **settings)
    straight.on_epoch = lambda record, number, lrs: rates.append((record.stage, lrs[0]))
    straight_fit = straight.fit(tiny_dataset.train, tiny_dataset.valid, seed=3)
    # after its warm-up a stage's rate is constant unless the plateau lowers it
    assert any(stage == later_stage and later < rate
               for (stage, rate), (later_stage, later) in itertools.pairwise(rates)), "the plateau acted"
    state = tmp_path / "seed-3.state.pt"
    fit_until_interrupted(_trainer(tiny_dataset, dropout=0.3, **settings), tiny_dataset, 3, state,
                          stop_after)
    resumed = _trainer(tiny_dataset, dropout=0.3, **settings)
    resumed_fit = resumed.fit(tiny_dataset.train, tiny_dataset.valid, seed=3, state_file=state)
    assert_same_fit(straight, straight_fit, resumed, resumed_fit)


@pytest.mark.parametrize(("key", "value"), [
    ("optimizer", "sgd"), ("optimizer", None), ("plateau", 5), ("plateau", {"factor": 0.1}),
    ("plateau", {"factor": 0.1, "patience": 2, "min_lr": 0}), ("plateau.factor", 1.0),
    ("plateau.factor", 0), ("plateau.factor", True), ("plateau.patience", -1),
    ("plateau.patience", 1.5), ("adam_eps", 0), ("adam_eps", -1e-8), ("adam_eps", True),
    ("adam_eps", None), ("adam_eps", "small"), ("adam_eps", float("inf")), ("adam_eps", float("nan")),
    ("encoder_decay_norms_and_biases", "yes"), ("encoder_decay_norms_and_biases", 1),
    ("encoder_decay_norms_and_biases", "all"),
])
def test_bad_optimizer_and_plateau_values_are_one_line_errors_naming_the_key(key, value):
    name, _, inner = key.partition(".")
    if inner:
        value = {"factor": 0.1, "patience": 2, inner: value}
    with pytest.raises(MsakitError, match=rf"^training\.{key} must be [^\n]*$"):
        TrainConfig(**{name: value})


def test_the_settings_are_set_from_yaml_and_left_out_of_identities_at_their_defaults():
    config = resolve_config("text_only", "mosi", ["training.optimizer=adam",
                                                  "training.plateau={factor: 0.1, patience: 5}",
                                                  "training.adam_eps=3e-8",
                                                  "training.encoder_decay_norms_and_biases=true"])
    settings = training_config(config["training"])
    assert (settings.optimizer, settings.plateau) == ("adam", {"factor": 0.1, "patience": 5})
    assert (settings.adam_eps, settings.encoder_decay_norms_and_biases) == (3e-8, True)
    assert (TrainConfig().optimizer, TrainConfig().plateau) == ("adamw", None)
    assert (TrainConfig().adam_eps, TrainConfig().encoder_decay_norms_and_biases) == (1e-8, False)
    defaults = {"training": dataclasses.asdict(TrainConfig())}
    added = {"optimizer", "plateau", "adam_eps", "encoder_decay_norms_and_biases"}
    assert added <= set(ADDED_SETTINGS["training"])
    assert not added & set(without_added_settings(defaults)["training"])
    assert {key: value for key, value in without_added_settings(
        {"training": dataclasses.asdict(settings)})["training"].items() if key in added} == {
        "optimizer": "adam", "plateau": {"factor": 0.1, "patience": 5}, "adam_eps": 3e-8,
        "encoder_decay_norms_and_biases": True}


# MMSA's trainers (trains/singleTask/{MULT,MMIM,CENET,BERT_MAG,MISA}.py, multiTask/SELF_MM.py,
# missingTask/TFR_NET.py) and config_regression.json: Adam everywhere, ReduceLROnPlateau in three,
# factor from the trainer, patience from the settings (MMIM's `when`); SIMSv2 repeats SIMS where
# MMSA publishes none. ALMT's trainer keeps AdamW and its own warm-up and cosine schedule. CENet's
# Adam has its own eps (adam_epsilon); MMIM's and ALMT's decay every BERT parameter.
MMSA_EPS = {"cenet": {"mosi": 3e-8, "mosei": 1e-8, "sims": 2e-8, "simsv2": 3e-8}}
MMSA_DECAY_ALL_OF_BERT = ("mmim", "almt")
MMSA_PLATEAUS = {
    "mult": {"mosi": (0.1, 5), "mosei": (0.1, 20), "sims": (0.1, 10), "simsv2": (0.1, 10)},
    "mmim": dict.fromkeys(("mosi", "mosei", "sims", "simsv2"), (0.5, 20)),
    "tfr_net": {"mosi": (0.1, 5), "mosei": (0.1, 5), "sims": (0.1, 10), "simsv2": (0.1, 10)},
}


@pytest.mark.parametrize("model", ["mult", "mmim", "tfr_net", "cenet", "mag_bert", "misa", "self_mm", "almt"])
def test_the_mmsa_sections_train_with_mmsas_optimizer_and_plateau(model):
    for family in ("mosi", "mosei", "sims", "simsv2"):
        settings = training_config(resolve_config(model, family)["training"])
        plateau = MMSA_PLATEAUS.get(model, {}).get(family)
        expected = None if plateau is None else dict(zip(("factor", "patience"), plateau, strict=True))
        assert (settings.optimizer, settings.plateau) == ("adamw" if model == "almt" else "adam",
                                                          expected), family
        assert settings.adam_eps == MMSA_EPS.get(model, {}).get(family, 1e-8), family
        assert settings.encoder_decay_norms_and_biases == (model in MMSA_DECAY_ALL_OF_BERT), family
    for family in ("synthetic", "tiny"):  # msakit's own sections train as before
        settings = training_config(resolve_config(model, family)["training"])
        assert (settings.optimizer, settings.plateau, settings.adam_eps,
                settings.encoder_decay_norms_and_biases) == ("adamw", None, 1e-8, False), family


# The other official trainers (LNLN train.py, HME HME_MSA/HME_main.py, CyIN @ da04a3d
# trains/generationBased/CyIN.py, MMSLF train_teacher.py and train_student.py, DashFusion
# src/train.py): AdamW at eps 1e-8 (HME's is transformers', which msakit cannot match: hme.py), no
# plateau. LNLN's and MMSLF's decay every parameter, the fine-tuned BERT's biases and LayerNorm
# parameters too; HME's, CyIN's and DashFusion's spare those, as msakit's default does. The model's
# own biases and norms: decayed by all but DashFusion's (and HME's, whose biases msakit decays too).
OFFICIAL_SECTIONS = {"lnln": ("mosi", "mosei", "sims"), "hme": ("mosi", "mosei"),
                     "cyin": ("mosi", "mosei", "sims"), "mmslf": ("mosi", "mosei", "sims"),
                     "dashfusion": ("mosi", "mosei", "sims")}
OFFICIAL_DECAY_ALL_OF_BERT = ("lnln", "mmslf")


@pytest.mark.parametrize("model", sorted(OFFICIAL_SECTIONS))
def test_the_paper_sections_decay_as_the_official_trainers(model):
    for family in OFFICIAL_SECTIONS[model]:
        settings = training_config(resolve_config(model, family)["training"])
        assert (settings.optimizer, settings.plateau, settings.adam_eps) == ("adamw", None, 1e-8), family
        assert settings.decay_norms_and_biases == (model != "dashfusion"), family
        assert settings.encoder_decay_norms_and_biases == (model in OFFICIAL_DECAY_ALL_OF_BERT), family
    for family in ("synthetic", "tiny"):  # msakit's own sections train as before
        settings = training_config(resolve_config(model, family)["training"])
        assert (settings.optimizer, settings.plateau, settings.adam_eps,
                settings.encoder_decay_norms_and_biases) == ("adamw", None, 1e-8, False), family


def test_cenets_mmsa_sections_decay_the_enhancements_biases_and_not_the_heads(tiny_dataset):
    """MMSA's CENET trainer decays every parameter but BERT's and the head's biases and LayerNorm
    gains: the enhancement's biases are decayed, through CENet's own optimiser group."""
    for family in ("mosi", "mosei", "sims", "simsv2"):
        assert resolve_config("cenet", family)["model"]["decay_enhancement_biases"], family
    for family in ("synthetic", "tiny"):  # msakit's own sections train as before
        assert not resolve_config("cenet", family)["model"].get("decay_enhancement_biases"), family
    # at its default, a run's identity is the one it had before the setting existed
    assert ADDED_SETTINGS["model"]["decay_enhancement_biases"] is False

    def decays(flag: bool) -> dict[str, float]:
        config = resolve_config("cenet", "tiny", [f"model.decay_enhancement_biases={str(flag).lower()}"])
        model = create_model("cenet", config["model"], tiny_dataset.dims)
        optimizer = build_optimizer(model, TrainConfig(weight_decay=0.01, optimizer="adam"))
        by_param = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
        return {name: by_param[id(p)] for name, p in model.named_parameters() if id(p) in by_param}

    on, off = decays(True), decays(False)
    enhancement_biases = [n for n in on if n.startswith("enhancement.") and n.endswith(".bias")]
    head_biases = [n for n in on if n.startswith("head.") and n.endswith(".bias")]
    assert enhancement_biases and head_biases
    assert all(on[n] == 0.01 and off[n] == 0.0 for n in enhancement_biases)
    assert all(on[n] == 0.0 == off[n] for n in head_biases)
    assert {n: v for n, v in on.items() if n not in enhancement_biases} == {
        n: v for n, v in off.items() if n not in enhancement_biases}
