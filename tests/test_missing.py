"""Missing-data protocols and training noise: rates, purity, what is (never) touched, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msakit.data.batching import make_batch
from msakit.data.schema import Batch, Split
from msakit.errors import MsakitError
from msakit.missing import (
    DEFAULT_RATES,
    FIXED_SUBSETS,
    InterModalNoise,
    LNLNNoise,
    MissingSpec,
    apply_missing,
    build_noise,
    drop_whole_modalities,
    list_noises,
    modality_keep,
    parse_rates,
)
from msakit.missing.masks import available_modalities

UNK, CLS, SEP, PAD = 100, 101, 102, 0
SPECIAL = (PAD, CLS, SEP)


def make_split(n: int = 40, seed: int = 0, text_len: int = 16, audio_len: int = 20,
               vision_len: int = 12) -> Split:
    """Random arrays shaped like an unaligned MMSA split, with [CLS] ... [SEP] and padding."""
    rng = np.random.default_rng(seed)
    text_bert = np.zeros((n, 3, text_len), dtype=np.int64)
    for i, k in enumerate(rng.integers(3, text_len + 1, n)):
        text_bert[i, 0, 0] = CLS
        text_bert[i, 0, 1:k - 1] = rng.integers(1000, 30000, k - 2)
        text_bert[i, 0, k - 1] = SEP
        text_bert[i, 1, :k] = 1
        if i % 5 == 0 and k >= 6:  # a sentence pair: a [SEP] in the middle, segment ids 1 after it
            text_bert[i, 0, k // 2] = SEP
            text_bert[i, 2, k // 2 + 1:k] = 1
    # padding features and frames are non-zero on purpose: a protocol must leave them alone
    return Split(
        ids=np.array([f"vid{i // 4}$_${i % 4}" for i in range(n)]),
        labels=rng.uniform(-3, 3, n).astype(np.float32),
        text=rng.standard_normal((n, text_len, 6)).astype(np.float32) + 5.0,
        text_bert=text_bert,
        audio=rng.standard_normal((n, audio_len, 5)).astype(np.float32) + 5.0,
        vision=rng.standard_normal((n, vision_len, 7)).astype(np.float32) + 5.0,
        audio_lengths=rng.integers(1, audio_len + 1, n),
        vision_lengths=rng.integers(1, vision_len + 1, n),
    )


def full_batch(split: Split) -> Batch:
    return make_batch(split, np.arange(len(split)))


def content_ids(batch: Batch) -> torch.Tensor:
    """(B, L) bool: valid text tokens that are not special."""
    ids = batch.text_ids[:, 0]
    return batch.text_mask & ~torch.isin(ids, torch.tensor(SPECIAL))


def per_sample(batch: Batch) -> dict[str, dict[str, torch.Tensor]]:
    """Everything a protocol produces, keyed by sample id, for order/batch-size comparisons."""
    out = {}
    for b, sid in enumerate(batch.ids):
        out[sid] = {
            "text_ids": batch.text_ids[b], "text": batch.text[b], "audio": batch.audio[b],
            "vision": batch.vision[b], "presence": batch.presence[b],
            **{f"dropped_{m}": d[b] for m, d in batch.dropped.items()},
        }
    return out


def assert_same_per_sample(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for sid in a:
        assert a[sid].keys() == b[sid].keys()
        for key in a[sid]:
            assert torch.equal(a[sid][key], b[sid][key]), (sid, key)


SPECS = [
    MissingSpec("intra", 0.4, seed=3),
    MissingSpec("inter", 0.3, seed=3),
    MissingSpec("inter", 0.7, seed=1),
    MissingSpec("fixed", subset="av"),
]


# ---------- intra-modal ----------

@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_intra_drop_rate_matches_r(rate: float) -> None:
    batch = full_batch(make_split(n=600, text_len=40, audio_len=60, vision_len=50))
    out = apply_missing(batch, MissingSpec("intra", rate, seed=7))
    content = content_ids(batch)
    text_rate = out.dropped["text"][content].float().mean().item()
    assert abs(text_rate - rate) < 0.02
    assert torch.equal((out.text_ids[:, 0] == UNK) & content, out.dropped["text"])
    for m in ("audio", "vision"):
        valid = getattr(batch, f"{m}_mask")
        assert abs(out.dropped[m][valid].float().mean().item() - rate) < 0.02


def test_intra_never_touches_special_tokens_padding_or_masks() -> None:
    batch = full_batch(make_split(n=200))
    out = apply_missing(batch, MissingSpec("intra", 0.9, seed=1))
    ids, new = batch.text_ids, out.text_ids
    special = ~content_ids(batch)
    assert torch.equal(new[:, 0][special], ids[:, 0][special])  # [CLS], [SEP], [PAD] kept
    assert torch.equal(new[:, 1:], ids[:, 1:])  # attention mask and segment ids unchanged
    assert (ids[:, 0] == SEP).sum() > len(batch)  # the mid-sentence [SEP]s are in the test
    assert not (out.dropped["text"] & special).any()
    for name in ("text_mask", "audio_mask", "vision_mask", "presence"):
        assert torch.equal(getattr(out, name), getattr(batch, name))


def test_intra_zeroes_exactly_the_dropped_features_and_frames() -> None:
    batch = full_batch(make_split(n=100))
    out = apply_missing(batch, MissingSpec("intra", 0.5, seed=2))
    for m in ("text", "audio", "vision"):
        drop = out.dropped[m]
        assert drop.any() and not drop.all()
        new, old = getattr(out, m), getattr(batch, m)
        assert (new[drop] == 0).all()
        assert torch.equal(new[~drop], old[~drop])  # incl. padding frames beyond the valid length
    for m in ("audio", "vision"):
        assert not (out.dropped[m] & ~getattr(batch, f"{m}_mask")).any()


def test_features_only_text_drops_valid_tokens() -> None:
    split = make_split(n=200)
    split.text_bert = None
    split.text[:, -3:] = 0.0  # padding, recognised by make_batch from all-zero vectors
    batch = full_batch(split)
    out = apply_missing(batch, MissingSpec("intra", 0.5, seed=0))
    drop = out.dropped["text"]
    assert out.text_ids is None
    assert not (drop & ~batch.text_mask).any()
    assert abs(drop[batch.text_mask].float().mean().item() - 0.5) < 0.05
    assert (out.text[drop] == 0).all() and torch.equal(out.text[~drop], batch.text[~drop])


def test_custom_unk_and_special_ids() -> None:
    batch = full_batch(make_split(n=50))
    out = apply_missing(batch, MissingSpec("intra", 0.9), unk_id=3, special_ids=(PAD, CLS))
    drop = out.dropped["text"]
    assert (out.text_ids[:, 0][drop] == 3).all()
    assert drop[batch.text_ids[:, 0] == SEP].any()  # [SEP] no longer protected


def test_intra_masks_are_nested_across_rates() -> None:
    batch = full_batch(make_split(n=60))
    previous = None
    for rate in DEFAULT_RATES["intra"]:
        out = apply_missing(batch, MissingSpec("intra", rate, seed=4))
        if previous is not None:
            for m, drop in out.dropped.items():
                assert not (previous[m] & ~drop).any()
        previous = out.dropped
    assert not any(d.any() for d in apply_missing(
        batch, MissingSpec("intra", 0.0)).dropped.values())


# ---------- inter-modal and fixed ----------

@pytest.mark.parametrize("rate", DEFAULT_RATES["inter"])
def test_inter_fraction_and_at_least_one_modality(rate: float) -> None:
    ids = [f"clip{i}" for i in range(6000)]
    keep = modality_keep(MissingSpec("inter", rate, seed=5), ids)
    expected = min(rate, 2 / 3)
    assert abs(1 - keep.mean() - expected) < 0.015
    assert keep.any(axis=1).all()
    if rate >= 2 / 3:
        assert (keep.sum(axis=1) == 1).all()
    assert np.abs(1 - keep.mean(axis=0) - expected).max() < 0.03  # no modality favoured


def test_inter_exactly_one_kept_at_two_thirds() -> None:
    keep = modality_keep(MissingSpec("inter", 2 / 3), [str(i) for i in range(2000)])
    assert (keep.sum(axis=1) == 1).all()


def test_inter_batch_zeroes_dropped_modalities_only() -> None:
    batch = full_batch(make_split(n=120))
    out = apply_missing(batch, MissingSpec("inter", 0.5, seed=9))
    keep = torch.from_numpy(modality_keep(MissingSpec("inter", 0.5, seed=9), batch.ids))
    assert torch.equal(out.presence, keep)
    assert out.presence.any(dim=1).all()
    for m, name in enumerate(("text", "audio", "vision")):
        gone = ~keep[:, m]
        assert gone.any() and not gone.all()
        assert (getattr(out, name)[gone] == 0).all()
        assert torch.equal(getattr(out, name)[~gone], getattr(batch, name)[~gone])
        assert torch.equal(getattr(out, f"{name}_mask"), getattr(batch, f"{name}_mask"))
    gone = ~keep[:, 0]
    content = content_ids(batch)
    ids = out.text_ids[:, 0]
    assert (ids[gone][content[gone]] == UNK).all()
    assert torch.equal(ids[gone][~content[gone]], batch.text_ids[gone][:, 0][~content[gone]])
    assert torch.equal(out.text_ids[~gone], batch.text_ids[~gone])
    assert torch.equal(out.text_ids[:, 1:], batch.text_ids[:, 1:])
    assert torch.equal(out.dropped["text"], content & gone.unsqueeze(1))
    assert torch.equal(out.dropped["audio"], batch.audio_mask & ~keep[:, 1:2])


@pytest.mark.parametrize("subset", FIXED_SUBSETS)
def test_fixed_subset_keeps_exactly_its_modalities(subset: str) -> None:
    batch = full_batch(make_split(n=10))
    out = apply_missing(batch, MissingSpec("fixed", subset=subset[::-1]))
    for m, (letter, name) in enumerate(zip("tav", ("text", "audio", "vision"), strict=True)):
        kept = letter in subset
        assert out.presence[:, m].tolist() == [kept] * len(batch)
        if kept:
            assert torch.equal(getattr(out, name), getattr(batch, name))
        else:
            assert (getattr(out, name) == 0).all()
    assert torch.equal(out.text_ids[:, 0] == UNK, ("t" not in subset) & content_ids(batch))


def test_none_protocol_returns_the_batch() -> None:
    batch = full_batch(make_split(n=5))
    assert apply_missing(batch, MissingSpec("none")) is batch


def test_missing_modality_in_data_is_skipped() -> None:
    split = make_split(n=30)
    split.vision = split.vision_lengths = None
    batch = full_batch(split)
    out = apply_missing(batch, MissingSpec("inter", 0.5))
    assert out.vision is None and "vision" not in out.dropped
    assert not out.presence[:, 2].any()
    out = apply_missing(batch, MissingSpec("intra", 0.5))
    assert out.vision is None and set(out.dropped) == {"text", "audio"}


def text_only_split(n: int = 40) -> Split:
    """A split with text (token ids and features) only, like the MOSI transcripts."""
    split = make_split(n=n)
    split.audio = split.vision = split.audio_lengths = split.vision_lengths = None
    return split


@pytest.mark.parametrize("rate", DEFAULT_RATES["inter"])
def test_inter_on_text_only_data_keeps_the_text(rate: float) -> None:
    batch = full_batch(text_only_split())
    out = apply_missing(batch, MissingSpec("inter", rate, seed=2))
    assert out.presence[:, 0].all() and not out.presence[:, 1:].any()
    assert torch.equal(out.text_ids, batch.text_ids) and torch.equal(out.text, batch.text)
    assert not out.dropped["text"].any()


@pytest.mark.parametrize("subset", ["t", "ta", "tv", "tav"])
def test_fixed_subsets_with_text_keep_text_only_data(subset: str) -> None:
    batch = full_batch(text_only_split())
    out = apply_missing(batch, MissingSpec("fixed", subset=subset))
    assert out.presence[:, 0].all() and not out.presence[:, 1:].any()
    assert torch.equal(out.text_ids, batch.text_ids) and torch.equal(out.text, batch.text)


@pytest.mark.parametrize("subset", ["a", "v", "av"])
def test_fixed_subset_without_the_datas_modalities_raises(subset: str) -> None:
    batch = full_batch(text_only_split())
    with pytest.raises(MsakitError) as info:
        apply_missing(batch, MissingSpec("fixed", subset=subset))
    message = str(info.value)
    assert f"'{subset}'" in message and "(text)" in message and "\n" not in message


def test_inter_on_two_modalities_drops_mr_of_what_is_there() -> None:
    ids = [f"clip{i}" for i in range(6000)]
    have = np.array([True, True, False])
    keep = modality_keep(MissingSpec("inter", 0.3, seed=5), ids, available=have)
    assert not keep[:, 2].any() and keep.any(axis=1).all()
    assert abs(1 - keep[:, :2].mean() - 0.3) < 0.015
    assert abs(keep[:, 0].mean() - keep[:, 1].mean()) < 0.03  # no modality favoured
    at_half = modality_keep(MissingSpec("inter", 0.5, seed=5), ids, available=have)
    assert (at_half.sum(axis=1) == 1).all()


def test_availability_does_not_change_masks_of_complete_data() -> None:
    ids = [f"clip{i}" for i in range(500)]
    for spec in (MissingSpec("inter", 0.4, seed=1), MissingSpec("fixed", subset="tv")):
        plain = modality_keep(spec, ids)
        assert np.array_equal(modality_keep(spec, ids, available=[True, True, True]), plain)
        assert np.array_equal(modality_keep(spec, ids, available=np.ones((500, 3), bool)), plain)
    batch = full_batch(make_split(n=30))
    assert available_modalities(batch).all()


def test_drop_whole_modalities_refuses_to_empty_a_sample() -> None:
    batch = full_batch(text_only_split(n=6))
    keep = np.array([[True, True, True]] * 5 + [[False, True, True]])
    with pytest.raises(MsakitError, match=r"vid1\$_\$1.*\(text\)"):
        drop_whole_modalities(batch, keep)


# ---------- purity ----------

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_masks_do_not_depend_on_batching_or_order(spec: MissingSpec) -> None:
    split = make_split(n=45)
    reference = per_sample(apply_missing(full_batch(split), spec))
    order = np.random.default_rng(0).permutation(len(split))
    for size in (1, 7, len(split)):
        for index in (np.arange(len(split)), order):
            pieces: dict = {}
            for start in range(0, len(split), size):
                batch = make_batch(split, index[start:start + size])
                pieces.update(per_sample(apply_missing(batch, spec)))
            assert_same_per_sample(pieces, reference)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_masks_are_deterministic_and_seeded(spec: MissingSpec) -> None:
    split = make_split(n=60)
    first = apply_missing(full_batch(split), spec)
    again = apply_missing(full_batch(split), MissingSpec(spec.protocol, spec.rate, spec.subset,
                                                         spec.seed))
    assert_same_per_sample(per_sample(first), per_sample(again))
    if spec.protocol != "fixed":
        other = apply_missing(full_batch(split), MissingSpec(spec.protocol, spec.rate,
                                                             seed=spec.seed + 1))
        assert any(not torch.equal(first.dropped[m], other.dropped[m]) for m in first.dropped)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_input_batch_and_dataset_are_not_modified(spec: MissingSpec) -> None:
    split = make_split(n=30)
    arrays = {k: getattr(split, k).copy() for k in ("text", "text_bert", "audio", "vision")}
    batch = full_batch(split)
    before = {k: getattr(batch, k).clone() for k in (
        "text", "text_ids", "text_mask", "audio", "audio_mask", "vision", "vision_mask",
        "presence")}
    out = apply_missing(batch, spec)
    assert out is not batch and batch.dropped == {}
    for k, v in before.items():
        assert torch.equal(getattr(batch, k), v), k
    for k, v in arrays.items():
        assert np.array_equal(getattr(split, k), v), k


# ---------- spec validation and rate lists ----------

@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), "0.3", True])
def test_bad_rate_raises(rate: object) -> None:
    with pytest.raises(MsakitError, match="rate"):
        MissingSpec("intra", rate)  # type: ignore[arg-type]


def test_bad_protocol_and_subset_raise_listing_valid_ones() -> None:
    with pytest.raises(MsakitError, match="none, intra, inter, fixed"):
        MissingSpec("random", 0.1)
    for subset in ("", "x", "tt", "tavx", "modalities"):
        with pytest.raises(MsakitError, match="t, a, v, ta, tv, av, tav"):
            MissingSpec("fixed", subset=subset)
    with pytest.raises(MsakitError, match="seed"):
        MissingSpec("inter", 0.1, seed=1.5)  # type: ignore[arg-type]


def test_spec_canonicalises_subset_and_labels() -> None:
    assert MissingSpec("fixed", subset="VAT").subset == "tav"
    assert MissingSpec("fixed", subset="at").label == "fixed ta"
    assert MissingSpec("intra", 0.3).label == "intra r=0.3"
    assert MissingSpec("inter", 0.5).label == "inter MR=0.5"


def test_parse_rates() -> None:
    assert parse_rates("0:0.9:0.1") == list(DEFAULT_RATES["intra"])
    assert parse_rates("0.1:0.7:0.1") == list(DEFAULT_RATES["inter"])
    assert parse_rates("0.1, 0.3,0.5") == [0.1, 0.3, 0.5]
    assert parse_rates("0.2") == [0.2]
    assert len(DEFAULT_RATES["intra"]) == 10 and len(DEFAULT_RATES["inter"]) == 7
    for bad in ("0:1:0.5", "0:0.5", "a,b", "", "0.5:0.1:0.1", "0:0.5:0", "0.1,1.2"):
        with pytest.raises(MsakitError):
            parse_rates(bad)


# ---------- training noise ----------

def test_lnln_noise_half_clean_and_uniform_rates() -> None:
    noise = LNLNNoise(seed=11)
    ids = [f"s{i}" for i in range(4000)]
    for rates in noise.rates(ids, epoch=1).values():
        clean = rates == 0
        assert abs(clean.mean() - 0.5) < 0.03
        assert abs(rates[~clean].mean() - 0.5) < 0.03 and rates.max() < 1
        assert abs((rates[~clean] < 0.25).mean() - 0.25) < 0.03


def test_lnln_noise_drops_at_the_sampled_rates() -> None:
    noise = LNLNNoise(seed=2)
    batch = full_batch(make_split(n=300, text_len=40, audio_len=60, vision_len=50))
    out = noise(batch, epoch=3)
    rates = noise.rates(batch.ids, epoch=3)
    content = {"text": content_ids(batch), "audio": batch.audio_mask,
               "vision": batch.vision_mask}
    for m, drop in out.dropped.items():
        r = torch.from_numpy(rates[m])
        assert not drop[r == 0].any()  # clean samples untouched
        realised = drop.sum(1) / content[m].sum(1).clamp(min=1)
        # realised per-sample rates follow the drawn ones
        assert torch.corrcoef(torch.stack([realised, r.float()]))[0, 1] > 0.8
    assert torch.equal(out.text_ids[:, 1:], batch.text_ids[:, 1:])


def _registered_noise(name: str, seed: int = 1):
    """The registered noise `name`, at rate 0.4 or, for a noise that draws its own rates, none."""
    try:
        return build_noise(name, 0.4, seed)
    except MsakitError:
        return build_noise(name, 0.0, seed)


@pytest.mark.parametrize("name", list_noises()[1:])
def test_every_noise_resamples_each_epoch_and_keeps_a_samples_mask_whatever_the_batch(name) -> None:
    noise = _registered_noise(name)
    split = make_split(n=80)
    first = noise(full_batch(split), 1)
    again = noise(make_batch(split, np.arange(len(split))[::-1].copy()), 1)
    assert_same_per_sample(per_sample(first), per_sample(again))
    batches = [make_batch(split, rows) for rows in np.split(np.arange(80), [7, 40])]  # 7, 33, 40 samples
    pieces = [per_sample(noise(batch, 1)) for batch in batches]
    assert_same_per_sample(per_sample(first), {k: v for piece in pieces for k, v in piece.items()})
    assert any(d.any() for d in first.dropped.values()), "the noise drops something"
    second = noise(full_batch(split), 2)
    assert any(not torch.equal(first.dropped[m], second.dropped[m]) for m in first.dropped)
    evaluation = apply_missing(full_batch(split), MissingSpec("inter", 0.4, seed=1))
    if isinstance(noise, InterModalNoise):  # another stream than the evaluation protocol's
        assert not torch.equal(first.presence, evaluation.presence)
        assert first.presence.any(dim=1).all()


def test_build_noise() -> None:
    assert list_noises() == ["none", "lnln", "inter"]
    assert build_noise(None, 0.0, 0) is None
    assert build_noise("none", 0.0, 0) is None
    assert isinstance(build_noise("lnln", 0.0, 3), LNLNNoise)
    noise = build_noise("inter", 0.3, 3)
    assert isinstance(noise, InterModalNoise) and noise.rate == 0.3
    for name, rate in (("dropout", 0.0), ("inter", 0.0), ("inter", 1.2), ("lnln", 0.5)):
        with pytest.raises(MsakitError):
            build_noise(name, rate, 0)


@pytest.mark.parametrize("name", ["lnln", "inter"])
def test_build_noise_passes_the_tokenizers_ids(name: str) -> None:
    noise = build_noise(name, 0.3 if name == "inter" else 0.0, 1, unk_id=3, special_ids=[PAD, CLS])
    assert (noise.unk_id, noise.special_ids) == (3, (PAD, CLS))
    default = build_noise(name, 0.3 if name == "inter" else 0.0, 1)
    assert (default.unk_id, default.special_ids) == (UNK, SPECIAL)
    batch = full_batch(make_split(n=200))
    out = noise(batch, 1)
    drop = out.dropped["text"]
    assert drop.any() and (out.text_ids[:, 0][drop] == 3).all()
    assert drop[batch.text_ids[:, 0] == SEP].any()  # [SEP] is not special any more
