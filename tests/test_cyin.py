"""CyIN (models/cyin.py): a missing modality's fusion input is a translation, the bottleneck terms
learn, the translation stage switches on at the configured epoch, and padding changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from model_inputs import N, contract_split, pad_noise, padded_longer
from msakit import api
from msakit.cli import cli
from msakit.data import generate_synthetic, save_mmsa
from msakit.data.batching import make_batch
from msakit.data.schema import MODALITIES
from msakit.errors import MsakitError
from msakit.models import create_model
from msakit.models.cyin import CyIN, align_to_steps, sample_noise
from msakit.training.config import resolve_config, training_config
from msakit.training.settings import Stage, TrainConfig, scale_stages
from msakit.training.trainer import Trainer

TINY = {"common_dim": 8, "ib_hidden_dim": 8, "bottleneck_dim": 6, "num_heads": 2, "layers": 1,
        "memory_layers": 1, "translator_blocks": 2, "translator_dims": [6, 4, 3]}


def _cyin(dims, seed: int = 0, **settings) -> CyIN:
    torch.manual_seed(seed)
    return create_model("cyin", {"text_source": "features", **TINY, **settings}, dims)


def _fusion_inputs(model: CyIN, batch) -> dict[str, torch.Tensor]:
    """What each modality's temporal convolution (the first layer of fusion) reads."""
    seen = {}
    hooks = [model.proj[m].register_forward_hook(
        lambda _mod, args, _out, m=m: seen.__setitem__(m, args[0].transpose(1, 2)))
        for m in MODALITIES]
    try:
        model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _with_missing(batch, modality: str, rows: list[int]):
    presence = batch.presence.clone()
    presence[rows, MODALITIES.index(modality)] = False
    return batch.with_updates(presence=presence)


def _reference_align(x, mask, step_mask):
    """A loop over samples and steps: the window of step j of n is frames [j f / n, (j+1) f / n)."""
    out = torch.zeros(x.shape[0], step_mask.shape[1], x.shape[2])
    for b in range(x.shape[0]):
        frames = max(1, int(mask[b].sum()))
        steps = max(1, int(step_mask[b].sum()))
        for j in range(steps):
            start = min(j * frames // steps, frames - 1)
            end = min(max((j + 1) * frames // steps, start + 1), frames)
            out[b, j] = x[b, start:end].mean(0)
    return out


def test_alignment_averages_contiguous_windows_of_valid_frames(batch):
    for name in ("audio", "vision"):  # 10 and 7 frames at most, against up to 8 text steps
        x, mask = getattr(batch, name), getattr(batch, f"{name}_mask")
        got = align_to_steps(x, mask, batch.text_mask)
        torch.testing.assert_close(got, _reference_align(x, mask, batch.text_mask))
    # a sample with as many frames as steps is unchanged
    x = torch.randn(2, 5, 3)
    full = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(align_to_steps(x, full, full), x)


def test_every_branch_gets_a_gradient_in_the_translation_stage(dims, batch):
    model = _cyin(dims).train()
    model.set_stage("translation")
    out = model(batch)
    assert out.pred.shape == (N,)
    assert set(out.losses) == {"kl", "reconstruction", "unimodal", "translation"}
    assert all(torch.isfinite(v) and v > 0 for v in out.losses.values())
    (out.pred.pow(2).mean() + sum(out.losses.values())).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient for {name}"


def test_the_informative_stage_leaves_the_translators_alone(dims, batch):
    model = _cyin(dims).train()
    model.set_stage("informative")
    out = model(batch)
    assert set(out.losses) == {"kl", "reconstruction", "unimodal"}
    (out.pred.pow(2).mean() + sum(out.losses.values())).backward()
    for name, param in model.named_parameters():
        assert (param.grad is None) == name.startswith("translators."), name


def test_one_translator_serves_both_directions_of_a_pair(dims):
    model = _cyin(dims)
    assert len(model.translators) == 3
    latent, mask = torch.randn(2, 4, 6), torch.ones(2, 4, dtype=torch.bool)
    expected = model.translators["text_audio"](latent, mask)
    torch.testing.assert_close(model.translate("audio", "text", latent, mask), expected)
    torch.testing.assert_close(model.translate("text", "audio", latent, mask), expected)


def test_a_missing_modality_is_fed_to_fusion_as_a_translation_not_zeros(dims, batch):
    model = _cyin(dims, eval_bottleneck="mean").eval()  # fusion then reads mu: easy to rebuild
    rows = [1, 4]
    with torch.no_grad():
        inputs, mask = model._inputs(batch)
        # fusion reads zeros at padded steps
        mu = {m: model.ib_encoders[m](inputs[m]).chunk(2, dim=-1)[0] * mask.unsqueeze(-1)
              for m in MODALITIES}
        from_text = model.translate("text", "audio", mu["text"], mask)
        from_vision = model.translate("vision", "audio", mu["vision"], mask)

        # audio missing, text and vision present: the SUM of the two translations (Eq. 19)
        seen = _fusion_inputs(model, _with_missing(batch, "audio", rows))
        torch.testing.assert_close(seen["audio"][rows], (from_text + from_vision)[rows])
        assert seen["audio"][rows].abs().sum() > 0
        kept = [r for r in range(N) if r not in rows]
        torch.testing.assert_close(seen["audio"][kept], mu["audio"][kept])
        torch.testing.assert_close(seen["text"], mu["text"])

        # only text left: audio and vision both come from text alone
        only_text = _with_missing(_with_missing(batch, "audio", rows), "vision", rows)
        seen = _fusion_inputs(model, only_text)
        torch.testing.assert_close(seen["audio"][rows], from_text[rows])
        torch.testing.assert_close(
            seen["vision"][rows], model.translate("text", "vision", mu["text"], mask)[rows])

        # what the missing modality's features hold cannot change the prediction
        scrambled = only_text.with_updates(audio=torch.randn_like(batch.audio),
                                           vision=torch.randn_like(batch.vision))
        torch.testing.assert_close(model(scrambled).pred[rows], model(only_text).pred[rows])


def _sampled_latents(model: CyIN, batch, seed: int) -> dict[str, torch.Tensor]:
    """The bottlenecks a training forward pass draws after `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    inputs, _ = model._inputs(batch)
    out = {}
    for m in MODALITIES:
        mu, logvar = model.ib_encoders[m](inputs[m]).chunk(2, dim=-1)
        out[m] = (mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)) * batch.text_mask[..., None]
    return out


@pytest.mark.parametrize("substitute", [False, True])
def test_the_translation_stage_feeds_fusion_translated_bottlenecks(dims, batch, substitute):
    model = _cyin(dims, translated_fusion_inputs=substitute).train()
    model.set_stage("translation")
    torch.manual_seed(5)
    seen = _fusion_inputs(model, batch)["audio"]
    with torch.no_grad():
        latents = _sampled_latents(model, batch, seed=5)
        mask = batch.text_mask
        one = model.translate("text", "audio", latents["text"], mask)
        two = model.translate("vision", "audio", latents["vision"], mask)
    options = [one, two, one + two, latents["audio"]]
    picked = [next(i for i, o in enumerate(options) if torch.allclose(seen[r], o[r]))
              for r in range(N)]
    if substitute:  # each sample reads one of the four; with this seed not all read their own
        assert set(picked) != {3}
    else:
        assert picked == [3] * N


def test_evaluation_samples_the_bottleneck_with_noise_fixed_by_the_sample_id(dims, batch):
    model = _cyin(dims).eval()
    with torch.no_grad():
        first = model(batch).pred
        torch.manual_seed(123)  # the global generator plays no part
        torch.testing.assert_close(model(batch).pred, first)
        # a sample scores the same alone, in another batch order, or beside other samples
        for rows in ([2], [4, 0, 3]):
            sub = make_batch(contract_split(), np.array(rows))
            torch.testing.assert_close(model(sub).pred, first[rows])
        model.config.eval_bottleneck = "mean"
        assert not torch.allclose(model(batch).pred, first)
    noise = sample_noise(batch.ids, "audio", torch.zeros(N, 200, 50))
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02


def test_padding_changes_nothing_with_the_official_decoders_and_convolution(dims, batch):
    """The contract test checks the default switches; these are the official code's."""
    model = _cyin(dims, conv_padding="valid", decoder_output="sigmoid").eval()
    with torch.no_grad():
        reference = model(batch).pred
        torch.testing.assert_close(model(pad_noise(batch)).pred, reference)
        torch.testing.assert_close(model(padded_longer(batch)).pred, reference)
        missing = _with_missing(batch, "vision", [0, 2])
        torch.testing.assert_close(model(padded_longer(missing)).pred, model(missing).pred)


def test_bottleneck_and_translation_terms_decrease_on_tiny_data(tiny_dataset):
    from msakit.data.batching import iterate_batches

    model = _cyin(tiny_dataset.dims).train()
    model.set_stage("translation")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(12):
        for batch in iterate_batches(tiny_dataset.train, 48):
            out = model(batch)
            loss = (out.pred - batch.labels).abs().mean() + sum(out.losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append({k: v.item() for k, v in out.losses.items()})
    for key in ("kl", "reconstruction", "translation", "unimodal"):
        assert all(torch.isfinite(torch.tensor(h[key])) for h in history), key
        assert history[-1][key] < history[0][key], f"{key}: {history[0][key]} -> {history[-1][key]}"


def test_translation_switches_on_at_the_configured_epoch(tiny_dataset):
    model = _cyin(tiny_dataset.dims)
    seen: list[tuple[int, str, bool]] = []
    epoch = [0]
    original_forward, original_hook = model.forward, model.on_train_epoch_start

    def on_epoch(number, batches):
        epoch[0] = number
        original_hook(number, batches)

    def forward(batch):
        out = original_forward(batch)
        if model.training:
            seen.append((epoch[0], model.stage, "translation" in out.losses))
        return out

    model.forward, model.on_train_epoch_start = forward, on_epoch
    config = TrainConfig(batch_size=24, patience=None, stages=[
        Stage("informative", 2), Stage("translation", 3)])
    Trainer(model, config, tiny_dataset.metric_family, progress=False).fit(
        tiny_dataset.train, tiny_dataset.valid, seed=0)
    by_epoch = {e: (stage, on) for e, stage, on in seen}
    assert by_epoch == {1: ("informative", False), 2: ("informative", False),
                        3: ("translation", True), 4: ("translation", True),
                        5: ("translation", True)}


@pytest.mark.slow
def test_train_runs_both_stages_and_the_checkpoint_scores_the_same(tiny_dataset, tmp_path):
    stages = "[{name: informative, epochs: 1}, {name: translation, epochs: 2}]"
    result = api.train("cyin", tiny_dataset, progress=False, output=tmp_path / "run", overrides=[
        *(f"model.{k}={v}" for k, v in TINY.items()), "model.text_source=features",
        f"training.stages={stages}", "training.batch_size=16"])
    run = result["seeds"][0]
    assert [s["stage"] for s in run["stages"]] == ["informative", "translation"]
    evaluated = api.evaluate(tmp_path / "run" / run["checkpoint"], tiny_dataset)
    assert evaluated["metrics"]["mae"] == pytest.approx(run["test"]["mae"], abs=1e-6)
    fixed = api.robustness(tmp_path / "run" / run["checkpoint"], tiny_dataset, protocol="fixed")
    assert len(fixed["rows"]) == 7


@pytest.mark.parametrize("family", ["mosi", "mosei", "sims", "synthetic"])
def test_configs_resolve_with_the_published_stage_split(family):
    config = resolve_config("cyin", family)
    stages = config["training"]["stages"]
    assert [s["name"] for s in stages] == ["informative", "translation"]
    first = stages[0]["epochs"] / sum(s["epochs"] for s in stages)
    assert first == pytest.approx(0.3 if family == "mosei" else 0.1)


@pytest.mark.parametrize("settings", [
    {"translator_dims": []}, {"translator_dims": [4, 0]}, {"beta": 0}, {"gamma": -1},
    {"common_dim": 9, "num_heads": 2}, {"output_dropout": 1.5}, {"eval_bottleneck": "median"},
    {"decoder_output": "tanh"}, {"conv_padding": "full"},
])
def test_bad_settings_are_one_line_errors(dims, settings):
    with pytest.raises(MsakitError, match="cyin: model"):
        _cyin(dims, **settings)


def test_the_own_fill_feeds_fusion_the_missing_modality_s_own_bottleneck(dims, batch):
    model = _cyin(dims, eval_bottleneck="mean", missing_fill="own").eval()
    rows = [0, 3]
    missing = _with_missing(batch, "vision", rows)
    with torch.no_grad():
        inputs, mask = model._inputs(missing)
        own = model.ib_encoders["vision"](inputs["vision"]).chunk(2, dim=-1)[0] * mask.unsqueeze(-1)
        torch.testing.assert_close(_fusion_inputs(model, missing)["vision"], own)
        model.config.missing_fill = "translation"
        assert not torch.allclose(_fusion_inputs(model, missing)["vision"][rows], own[rows])


def test_the_translation_stage_continues_from_the_informative_stage_s_last_weights_and_moments(
        tiny_dataset):
    stages = training_config(resolve_config("cyin", "synthetic")["training"]).stages
    assert [s.start for s in stages] == ["restore_best", "continue"]  # as the official code runs
    model = _cyin(tiny_dataset.dims)
    trainer = Trainer(model, TrainConfig(batch_size=24, patience=None, device="cpu",
                                         stages=scale_stages(stages, 3)),
                      tiny_dataset.metric_family, progress=False)
    seen, original = [], trainer.train_epoch

    def snapshot(optimizer):
        return ({k: v.clone() for k, v in model.state_dict().items()}, optimizer,
                {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()})

    def spy(split, optimizer, *args, **kwargs):
        seen.append((model.stage, snapshot(optimizer)))
        loss = original(split, optimizer, *args, **kwargs)
        seen.append((model.stage, snapshot(optimizer)))
        return loss

    trainer.train_epoch = spy
    trainer.fit(tiny_dataset.train, tiny_dataset.valid, seed=0)
    (stage, (weights, optimizer, moments)), (next_stage, (start, start_optimizer, start_moments)) = seen[1:3]
    assert (stage, next_stage) == ("informative", "translation")
    for key, value in weights.items():
        assert torch.equal(start[key], value), key
    assert start_optimizer is optimizer and start_moments.keys() == moments.keys() and moments
    for param, state in moments.items():
        for key, value in state.items():
            assert torch.equal(start_moments[param][key], value), key


def test_epochs_scale_the_stages_and_training_epochs_is_refused(tiny_dataset, tmp_path):
    settings = [*(f"model.{k}={v}" for k, v in TINY.items()), "model.text_source=features",
                "training.batch_size=24"]
    result = api.train("cyin", tiny_dataset, epochs=2, progress=False, overrides=settings)
    training = result["config"]["training"]
    assert training["epochs"] == 2 and [s["epochs"] for s in training["stages"]] == [1, 1]
    assert [(r["stage"], r["epoch"]) for r in result["seeds"][0]["history"]] == [
        ("informative", 1), ("translation", 1)]
    save_mmsa(generate_synthetic(seed=3, n_train=8, n_valid=4, n_test=4, text_len=6, audio_len=8,
                                 vision_len=8), tmp_path / "tiny.pkl")
    for args, message in ((["--epochs", "1"], "--epochs 1: the 2 training.stages need at least 2"),
                          (["--set", "training.epochs=5"], "training.epochs does not apply to cyin")):
        run = CliRunner().invoke(cli, ["train", "cyin", "--dataset", str(tmp_path / "tiny.pkl"), *args])
        assert run.exit_code == 2 and message in run.output, run.output
        assert len(run.output.strip().splitlines()) == 1, run.output
