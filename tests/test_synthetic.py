"""The synthetic MOSI stand-in: layout, determinism and the planted multimodal signal."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from msakit.data import generate_synthetic, synthetic_dataset
from msakit.data.schema import SPLITS
from msakit.data.tokens import load_tokenizer
from msakit.errors import MsakitError

SMALL = {"n_train": 30, "n_valid": 10, "n_test": 12, "text_len": 24, "audio_len": 40,
         "vision_len": 35, "text_dim": 16}
KEYS = ["id", "raw_text", "text", "text_bert", "audio", "vision", "audio_lengths",
        "vision_lengths", "regression_labels"]


@pytest.fixture(scope="module")
def raw() -> dict:
    return generate_synthetic(**SMALL, seed=5)


def test_layout_shapes_and_types(raw):
    sizes = {"train": 30, "valid": 10, "test": 12}
    for split in SPLITS:
        s = raw[split]
        n = sizes[split]
        assert list(s) == KEYS
        assert s["text"].shape == (n, 24, 16) and s["text"].dtype == np.float32
        assert s["text_bert"].shape == (n, 3, 24) and s["text_bert"].dtype == np.int64
        assert s["audio"].shape == (n, 40, 5) and s["audio"].dtype == np.float32
        assert s["vision"].shape == (n, 35, 20) and s["vision"].dtype == np.float32
        assert s["regression_labels"].shape == (n,)
        assert s["regression_labels"].dtype == np.float32
        assert ((s["audio_lengths"] >= 40 // 5) & (s["audio_lengths"] <= 40)).all()
        assert ((s["vision_lengths"] >= 35 // 5) & (s["vision_lengths"] <= 35)).all()
        assert all(re.fullmatch(r"syn\d{4}\$_\$\d+", i) for i in s["id"])


def test_videos_do_not_span_splits(raw):
    videos = [{i.split("$_$")[0] for i in raw[split]["id"]} for split in SPLITS]
    assert not (videos[0] & videos[1]) and not (videos[0] & videos[2])
    assert not (videos[1] & videos[2])


def test_labels_look_like_mosi():
    labels = generate_synthetic(n_train=1500, n_valid=10, n_test=10, text_len=8, audio_len=5,
                                vision_len=5, text_dim=4, seed=1)["train"]["regression_labels"]
    assert labels.min() >= -3 and labels.max() <= 3
    np.testing.assert_allclose(labels * 5, np.round(labels * 5), atol=1e-4)  # 0.2 grid
    assert 1.3 < labels.std() < 1.7
    assert 0.01 < (labels == 0).mean() < 0.1


def test_same_seed_same_data_other_seed_other_data():
    a, b = generate_synthetic(**SMALL, seed=2), generate_synthetic(**SMALL, seed=2)
    c = generate_synthetic(**SMALL, seed=3)
    for split in SPLITS:
        for key in KEYS:
            np.testing.assert_array_equal(a[split][key], b[split][key])
        assert not np.array_equal(a[split]["regression_labels"], c[split]["regression_labels"])
        assert not np.array_equal(a[split]["audio"], c[split]["audio"])
        assert list(a[split]["raw_text"]) != list(c[split]["raw_text"])


def test_padding_is_zero_and_audio_has_planted_minus_inf(raw):
    s = raw["train"]
    steps = np.arange(40)
    past = steps[None, :] >= s["audio_lengths"][:, None]
    assert (s["audio"][past] == 0).all()
    past = np.arange(35)[None, :] >= s["vision_lengths"][:, None]
    assert (s["vision"][past] == 0).all()
    assert (s["text"][s["text_bert"][:, 1] == 0] == 0).all()
    all_audio = np.concatenate([raw[split]["audio"] for split in SPLITS])
    inf = np.argwhere(np.isinf(all_audio))
    assert len(inf) >= 1 and (all_audio[np.isinf(all_audio)] < 0).all()
    lengths = np.concatenate([raw[split]["audio_lengths"] for split in SPLITS])
    assert (inf[:, 1] < lengths[inf[:, 0]]).all()  # only on real frames
    assert not np.isnan(all_audio).any()


def test_cleaned_dataset_counts_the_planted_values():
    raw = generate_synthetic(**SMALL, seed=4)
    planted = sum(int(np.isinf(raw[s]["audio"]).sum()) for s in SPLITS)
    ds = synthetic_dataset(**SMALL, seed=4)
    assert ds.replaced_nonfinite == planted > 0
    assert ds.family == "synthetic" and ds.metric_family == "mosi"
    assert np.isfinite(ds.train.audio).all()


def test_dataset_forwards_to_the_generator_and_reports_its_parameters():
    raw = generate_synthetic(**SMALL, aligned=True, seed=6)
    ds = synthetic_dataset(**SMALL, aligned=True, seed=6)
    np.testing.assert_array_equal(ds.test.text_bert, raw["test"]["text_bert"])
    np.testing.assert_array_equal(ds.valid.labels, raw["valid"]["regression_labels"])
    assert ds.source == "synthetic(seed=6, aligned)"
    assert synthetic_dataset(**SMALL).source == "synthetic(seed=0, unaligned)"
    with pytest.raises(TypeError, match="n_trian"):
        synthetic_dataset(n_trian=5)


def test_text_bert_is_the_tokenizers_encoding_of_raw_text(raw):
    tokenizer = load_tokenizer("minilm")
    for split in SPLITS:
        s = raw[split]
        encoded = tokenizer(list(s["raw_text"]), padding="max_length", truncation=True,
                            max_length=24, return_tensors="np")
        np.testing.assert_array_equal(s["text_bert"][:, 0], encoded["input_ids"])
        np.testing.assert_array_equal(s["text_bert"][:, 1], encoded["attention_mask"])
        np.testing.assert_array_equal(s["text_bert"][:, 2], encoded["token_type_ids"])


def test_sentences_are_lowercase_english_with_graded_sentiment_words():
    ds = synthetic_dataset(n_train=300, n_valid=5, n_test=5, text_len=40, audio_len=5,
                           vision_len=5, text_dim=4, seed=0)
    texts, labels = ds.train.raw_text, ds.train.labels
    assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", t) for t in texts)
    positive = {"good", "great", "amazing", "brilliant", "loved", "excellent", "fantastic"}
    negative = {"bad", "terrible", "awful", "boring", "hated", "horrible", "dull"}

    def share(words: set[str], chosen: np.ndarray) -> float:
        return float(np.mean([bool(words & set(t.split())) for t in texts[chosen]]))

    top, bottom = labels > 1, labels < -1
    assert share(positive, top) > share(positive, bottom) + 0.2
    assert share(negative, bottom) > share(negative, top) + 0.2


def test_token_vectors_are_fixed_across_seeds():
    # the stand-in encoder does not depend on the dataset seed: [SEP] (no polarity) differs
    # between two datasets only by the small per-token noise
    def sep_vectors(seed: int) -> np.ndarray:
        s = generate_synthetic(**SMALL, seed=seed)["train"]
        last = s["text_bert"][:, 1].sum(1) - 1
        return s["text"][np.arange(len(last)), last]

    a, b = sep_vectors(0), sep_vectors(1)
    assert np.abs(a - b).max() < 1.0
    assert np.corrcoef(a[0], b[0])[0, 1] > 0.9


def test_aligned_layout_has_no_lengths_and_text_steps():
    raw = generate_synthetic(**SMALL, aligned=True)
    for split in SPLITS:
        s = raw[split]
        assert "audio_lengths" not in s and "vision_lengths" not in s
        assert s["audio"].shape[1] == s["vision"].shape[1] == s["text"].shape[1] == 24
        pad = s["text_bert"][:, 1] == 0
        assert (s["audio"][pad] == 0).all() and (s["vision"][pad] == 0).all()


@pytest.mark.parametrize("bad", [{"n_train": 0}, {"text_len": 2}, {"vision_dim": 1},
                                 {"audio_len": 2.5}])
def test_bad_sizes_are_user_errors(bad):
    with pytest.raises(MsakitError, match=next(iter(bad))):
        generate_synthetic(**{**SMALL, **bad})


def _pooled(split, modality: str) -> np.ndarray:
    x = getattr(split, modality)
    if modality == "text":
        mask = split.text_bert[:, 1] > 0
    else:
        mask = np.arange(x.shape[1]) < getattr(split, f"{modality}_lengths")[:, None]
    return (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)


def test_every_modality_carries_signal_and_all_three_beat_any_subset():
    ds = synthetic_dataset(n_train=600, n_valid=200, n_test=10, text_len=40, audio_len=60,
                           vision_len=60, text_dim=64, seed=0)

    def valid_mae(modalities: tuple[str, ...]) -> float:
        train = np.concatenate([_pooled(ds.train, m) for m in modalities], 1)
        valid = np.concatenate([_pooled(ds.valid, m) for m in modalities], 1)
        mean, std = train.mean(0), train.std(0) + 1e-6
        ridge = Ridge(alpha=10.0).fit((train - mean) / std, ds.train.labels)
        return float(np.abs(ridge.predict((valid - mean) / std) - ds.valid.labels).mean())

    baseline = float(np.abs(ds.valid.labels - ds.train.labels.mean()).mean())
    single = {m: valid_mae((m,)) for m in ("text", "audio", "vision")}
    pairs = {p: valid_mae(p) for p in (("text", "audio"), ("text", "vision"),
                                       ("audio", "vision"))}
    everything = valid_mae(("text", "audio", "vision"))
    assert all(mae < baseline - 0.1 for mae in single.values()), (single, baseline)
    assert everything < min(single.values()) - 0.08, (everything, single)
    assert everything < min(pairs.values()) - 0.015, (everything, pairs)


# --- domains: the domain generalization test bed -------------------------------------------------
DOMAINS = {**SMALL, "n_train": 150, "n_valid": 90, "n_test": 90, "domains": 3}


def test_domains_label_every_clip_and_follow_videos():
    raw = generate_synthetic(**DOMAINS, seed=1)
    for split in SPLITS:
        domains = raw[split]["domains"]
        assert domains.dtype == np.int64 and domains.shape == raw[split]["regression_labels"].shape
        assert set(domains.tolist()) == {0, 1, 2}  # every split holds every domain
        videos = np.array([i.split("$_$")[0] for i in raw[split]["id"]])
        for video in set(videos):
            assert len(set(domains[videos == video].tolist())) == 1
    again = generate_synthetic(**DOMAINS, seed=1)
    for split in SPLITS:
        np.testing.assert_array_equal(raw[split]["domains"], again[split]["domains"])
        np.testing.assert_array_equal(raw[split]["audio"], again[split]["audio"])
    assert "domains" not in generate_synthetic(**SMALL, seed=1)["train"]
    for split in SPLITS:  # shifts touch the valid steps only: padding stays zero
        s = raw[split]
        assert (s["audio"][np.arange(40)[None, :] >= s["audio_lengths"][:, None]] == 0).all()
        assert (s["vision"][np.arange(35)[None, :] >= s["vision_lengths"][:, None]] == 0).all()
        assert (s["text"][s["text_bert"][:, 1] == 0] == 0).all()


def test_zero_shift_leaves_the_data_as_without_domains():
    plain = generate_synthetic(**{**DOMAINS, "domains": 1}, seed=2)
    unshifted = generate_synthetic(**DOMAINS, domain_shift=0.0, seed=2)
    shifted = generate_synthetic(**DOMAINS, seed=2)
    for split in SPLITS:
        for key in KEYS:
            np.testing.assert_array_equal(plain[split][key], unshifted[split][key])
        # the label function is shared: shifts change the inputs, never the labels
        np.testing.assert_array_equal(plain[split]["regression_labels"],
                                      shifted[split]["regression_labels"])
        assert not np.array_equal(plain[split]["audio"], shifted[split]["audio"])
        assert not np.array_equal(plain[split]["text"], shifted[split]["text"])


def test_each_domain_shifts_the_feature_distribution():
    def domain_gaps(shift: float) -> list[float]:
        ds = synthetic_dataset(**{**DOMAINS, "n_train": 600}, domain_shift=shift, seed=3)
        gaps = []
        for modality in ("audio", "vision", "text"):
            pooled = _pooled(ds.train, modality)
            means = [pooled[ds.train.domains == d].mean(0) for d in range(3)]
            gaps.append(float(np.sqrt(((means[0] - means[1]) ** 2).mean())))
        return gaps

    # offsets of root mean square 1.0 (audio, vision) and 0.5 (text) per dim and domain: two
    # domains' means lie about sqrt(2) times that apart; without shift only speakers differ
    shifted, unshifted = domain_gaps(1.0), domain_gaps(0.0)
    assert shifted[0] > 0.6 and shifted[1] > 0.6 and shifted[2] > 0.3, shifted
    assert max(unshifted) < 0.3, unshifted


def test_unreliable_modality_says_less_about_the_label():
    ds = synthetic_dataset(**{**DOMAINS, "n_train": 900}, domain_shift=2.0, seed=0)
    audio = _pooled(ds.train, "audio")[:, 0]  # the "pitch" channel follows the audio view
    labels, domains = ds.train.labels, ds.train.domains

    def corr(d: int) -> float:
        rows = domains == d
        return float(np.corrcoef(audio[rows], labels[rows])[0, 1])

    # domain 2's unreliable modality is audio (domain 1's is text, domain 0 has none)
    assert corr(2) < corr(0) - 0.15 and corr(2) < corr(1) - 0.15, [corr(d) for d in range(3)]


def test_domains_reach_splits_and_batches():
    from msakit.data import make_batch

    ds = synthetic_dataset(**DOMAINS, seed=1)
    raw = generate_synthetic(**DOMAINS, seed=1)
    assert ds.source == "synthetic(seed=1, unaligned, domains=3, domain_shift=1)"
    for split in SPLITS:
        np.testing.assert_array_equal(ds.split(split).domains, raw[split]["domains"])
    picked = np.array([np.flatnonzero(ds.valid.domains == d)[-1] for d in (2, 0, 1)])
    batch = make_batch(ds.valid, picked)
    assert batch.domains.dtype == torch.long and batch.domains.tolist() == [2, 0, 1]
    assert batch.to("meta").domains.device.type == "meta"
    assert make_batch(synthetic_dataset(**SMALL).train, np.arange(3)).domains is None
    assert ds.valid.subset(np.array([2, 5])).domains.tolist() == ds.valid.domains[[2, 5]].tolist()


@pytest.mark.parametrize(("bad", "needle"), [
    ({"domains": 4, "n_valid": 10}, "domains=4"),
    ({"domains": 0}, "domains"),
    ({"domain_shift": -1.0}, "domain_shift"),
    ({"domain_shift": "big"}, "domain_shift"),
])
def test_bad_domain_options_are_user_errors(bad, needle):
    with pytest.raises(MsakitError, match=needle):
        generate_synthetic(**{**DOMAINS, **bad})


def test_catalog_test_bed_has_four_domains_of_short_sequences():
    from msakit.data import load_dataset

    ds = load_dataset("synthetic-dg", n_train=120, n_valid=120, n_test=120, seed=1)
    assert ds.name == "synthetic-dg" and ds.family == "synthetic"
    assert ds.dims.audio_len == ds.dims.vision_len == 50 and ds.dims.text == 64
    assert set(ds.test.domains.tolist()) == {0, 1, 2, 3}
