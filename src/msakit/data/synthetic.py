"""A synthetic stand-in for CMU-MOSI: the toolkit's default dataset, demo and test fixture.

It has MOSI's exact MMSA layout and sizes (1284/229/686 clips, text 50 tokens, audio 375x5,
vision 500x20) and behaves like the real task: every modality carries part of the answer, so a
trimodal model beats the best unimodal one and dropping any modality hurts.

Per sample there is a shared sentiment `s` and a modality-specific part `u_t`, `u_a`, `u_v`
(all N(0, 1)). The label mixes them,

    y = round_0.2(clip(c * (W_S s + W_T u_t + W_A u_a + W_V u_v + e), -3, 3)),  e ~ N(0, 0.3^2),

with `c` setting the label's spread to MOSI's (std about 1.5) and labels on a 0.2 grid like
MOSI's averaged ratings. Each modality sees only its own view z_m = (s + u_m)/sqrt(2) + noise:

- text: lowercase spoken-style English sentences about a film, built from templates whose
  sentiment words (graded from "terrible" to "brilliant", with intensifiers and negation) follow
  z_t; `text_bert` is the bert-base-uncased WordPiece encoding; `text` is a deterministic
  stand-in for frozen BERT features (NOT BERT): a fixed pseudo-random vector per token id plus a
  sentiment direction scaled by the word's polarity in context, plus noise;
- audio: 5 COVAREP-like dims; z_a shifts the mean of two of them ("pitch", "energy") over the
  valid frames under per-frame noise, with per-speaker offsets and a few -inf values as
  COVAREP writes them (the loader sets them to 0);
- vision: 20 FACET-like dims; z_v drives a "smile" and a "frown" action unit during a random
  burst of frames.

Clips are grouped into videos ("syn0007$_$3"); a video never spans two splits.

`domains=K` (K > 1) makes a test bed for domain generalization: every video (a speaker) belongs to
one of K domains, each split holds videos of every domain, and `Split.domains` says which. The label
function above is the same in every domain, so what is learnt on some domains can carry over to the
others; what changes is the input (`domain_shift` scales every shift, 0 turns them off):

- feature distribution: per domain and modality, the valid frames/tokens of the audio, vision and
  text features become g * x + o, with a gain log g ~ N(0, (0.2 shift)^2) and an offset o in a
  random direction whose root mean square per feature dim is c * shift (c = 1.0 for audio and
  vision, 0.5 for text: larger than the per-speaker offsets), like another microphone, camera or
  topic;
- modality reliability: domain d >= 1 has one unreliable modality, text, audio, vision in turn
  (d = 1, 2, 3, 4, ...); its view z_m gets extra noise of std shift, so that modality says less
  about the label there. Domain 0 has none.

The shifts come from their own generator seeded by (seed, domain stream), so `domains=1` data is
exactly the data without the option.

`real_scale=True` makes the features look like raw utterance features of a real corpus, which are
neither normalised nor on one scale (time-averaged COVAREP and OpenFace): every audio and vision
feature dimension d becomes s_d * x + o_d on the valid frames, with magnitudes m_d spread evenly (in
log) over [1e-2, 1e3], an offset o_d uniform in [-m_d, m_d] and a spread s_d between 1% and 100% of m_d (so
some dimensions sit nearly constant far from zero; OpenFace values reach about 1,200); one audio
dimension is -inf in most clips (COVAREP's unvoiced columns); the labels keep their order but
shrink to a small range (standard deviation about 0.13, like a user's own ratings on a narrow
scale). Text features are left as they are (frozen BERT states are on one scale). This is the test
bed on which every model must stay finite and non-constant; its draws come from their own generator
seeded by (seed, real-scale stream), so the data without the option is unchanged.
"""

from __future__ import annotations

import inspect
import random
from typing import Any

import numpy as np

from msakit.data.mmsa import dataset_from_raw
from msakit.data.schema import SPLITS, MultimodalDataset
from msakit.data.tokens import load_tokenizer
from msakit.errors import MsakitError

# Label mix: the shared part dominates, each modality adds what only it sees.
W_SHARED, W_TEXT, W_AUDIO, W_VISION = 1.0, 1.1, 0.9, 0.9
LABEL_NOISE = 0.3
LABEL_STD = 1.5  # CMU-MOSI's label standard deviation
LABEL_STEP = 0.2
VIEW_NOISE = {"text": 0.3, "audio": 0.35, "vision": 0.3}  # noise on each modality's view z_m

# Text: clause polarity = TEXT_GAIN * (z_t + per-clause jitter), rendered with graded words.
TEXT_GAIN = 0.5
CLAUSE_JITTER = 0.35
NEUTRAL_BELOW = 0.08  # |target polarity| under this gives a clause without sentiment words
EMBEDDING_SEED = 20240917  # fixed: the stand-in "encoder" is the same for every dataset seed
TOKEN_SCALE, SENTIMENT_SCALE, TEXT_NOISE = 0.5, 0.6, 0.1

# Audio and vision planting.
AUDIO_GAIN = (0.8, 0.5)  # mean shift per unit z_a of dims 0 ("pitch") and 1 ("energy")
AUDIO_SPEAKER_STD = 0.5
INF_FRACTION = 0.02  # share of clips with one -inf frame value
VISION_GAIN = 2.0
VISION_SPEAKER_STD = 0.3
BURST = (0.2, 0.6)  # fraction of the valid frames the expression lasts

_TOKEN_CHUNK = 16384  # tokens per step when building text features

# Domains (see the module docstring); each scaled by `domain_shift`.
DOMAIN_STREAM = 7919  # second seed word of the domain generator, apart from the data's own stream
DOMAIN_OFFSET = {"text": 0.5, "audio": 1.0, "vision": 1.0}  # root mean square of the offset per dim
DOMAIN_GAIN_STD = 0.2  # std of the log gain
UNRELIABLE_NOISE = 1.0  # std of the extra noise on the unreliable modality's view

# Real-scale features (see the module docstring).
REAL_SCALE_STREAM = 104729
REAL_SCALE_RANGE = (1e-2, 1e3)  # per-dimension scales, log-uniform
REAL_SCALE_INF_ROWS = 0.7  # share of clips whose first audio dimension is -inf on every valid frame
REAL_SCALE_LABEL_STD = 0.13
_MODALITIES = ("text", "audio", "vision")

_ADJECTIVES = (
    (-1.0, ("terrible", "awful", "horrible", "dreadful", "pathetic")),
    (-0.8, ("bad", "stupid", "painful", "annoying")),
    (-0.6, ("boring", "dull", "disappointing", "weak")),
    (-0.4, ("mediocre", "forgettable", "slow", "predictable")),
    (-0.2, ("bland", "ordinary", "uneven")),
    (0.2, ("okay", "fine", "decent", "alright")),
    (0.4, ("good", "nice", "solid", "enjoyable")),
    (0.6, ("great", "fun", "funny", "entertaining")),
    (0.8, ("excellent", "fantastic", "wonderful", "beautiful")),
    (1.0, ("amazing", "brilliant", "incredible", "perfect", "outstanding")),
)
_VERBS = (
    (-1.0, ("hated", "despised")),
    (-0.6, ("disliked",)),
    (0.5, ("liked", "enjoyed")),
    (0.8, ("loved",)),
    (1.0, ("adored",)),
)
# (multiplier, words usable with negative adjectives, with positive adjectives, with verbs)
_MODIFIERS = (
    (1.0, ("",), ("",), ("",)),
    (1.25, ("really", "very", "so", "extremely"), ("really", "very", "so", "extremely"),
     ("really", "absolutely")),
    (0.7, ("a bit", "kind of", "somewhat"), ("pretty", "fairly", "kind of"), ("kind of",)),
)
_SUBJECTS = (
    ("the plot", False), ("the acting", False), ("the ending", False), ("the story", False),
    ("the movie", False), ("this film", False), ("the dialogue", False), ("the soundtrack", False),
    ("the pacing", False), ("the script", False), ("the second half", False),
    ("the cinematography", False), ("the main character", False), ("the humor", False),
    ("the characters", True), ("the special effects", True), ("the actors", True),
    ("the fight scenes", True), ("the jokes", True),
)
_NOUNS = ("movie", "film", "story", "experience", "sequel")
_OPENERS = ("", "", "", "", "so", "um", "uh", "well", "honestly", "i mean", "you know",
            "basically", "overall", "anyway", "okay so")
_FILLERS = (
    "i saw it last weekend", "i went with my friends", "it is about a guy who moves to the city",
    "it came out last year", "it is a comedy", "it is based on a book", "i watched it at home",
    "there is a scene at the beginning", "the main character is a cop",
    "it is about two hours long",
    "my brother wanted to see it", "it is the second one in the series", "um", "uh", "so yeah",
    "i think", "to be honest", "i guess",
)
_NEUTRAL_CLAUSES = (
    "{subj} {be} what i expected", "i have mixed feelings about {subj}",
    "{subj} {be} different from the trailer", "i do not know what to say about {subj}",
    "{subj} {be} about what you would think",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(options: list[tuple[Any, ...]], target: float, r: random.Random) -> tuple[Any, ...]:
    """The option whose polarity (first item) is nearest to `target`, near-ties broken at random."""
    return min(options, key=lambda option: abs(option[0] - target) + 0.1 * r.random())


def _clause(r: random.Random, target: float) -> tuple[list[tuple[str, bool]], float]:
    """One clause whose sentiment follows `target` in [-1.25, 1.25].

    Returns (text, carries sentiment) segments and the clause's polarity.
    """
    subj, plural = r.choice(_SUBJECTS)
    be = "were" if plural else "was"
    if abs(target) < NEUTRAL_BELOW:
        return [(r.choice(_NEUTRAL_CLAUSES).format(subj=subj, be=be), False)], 0.0
    if abs(target) <= 0.5 and r.random() < 0.15:
        # negation softens and flips: "not great" is mildly negative, "not bad" mildly positive
        value, words = _pick([(-0.5 * level, words) for level, words in _ADJECTIVES], target, r)
        return [(f"{subj} {be}", False), (f"not {r.choice(words)}", True)], value
    positive = target > 0
    if r.random() < 0.2:
        value, verbs, mods = _pick(
            [(level * mult, words, verb_mods) for level, words in _VERBS if (level > 0) == positive
             for mult, _, _, verb_mods in _MODIFIERS],
            target, r,
        )
        verb = f"{r.choice(mods)} {r.choice(verbs)}".strip()
        return [("i", False), (verb, True), (subj, False)], value
    value, adjectives, mods = _pick(
        [(level * mult, words, pos if positive else neg)
         for level, words in _ADJECTIVES if (level > 0) == positive
         for mult, neg, pos, _ in _MODIFIERS],
        target, r,
    )
    phrase = f"{r.choice(mods)} {r.choice(adjectives)}".strip()
    heads = (
        f"it was {_article(phrase)}", f"i thought {subj} {be}", f"i found {subj}",
        f"{subj} {'are' if plural else 'is'}", f"{subj} {be}",
    )
    form = r.randrange(len(heads))
    clause = [(heads[form], False), (phrase, True)]
    if form == 0:
        clause.append((r.choice(_NOUNS), False))
    return clause, value


def _sentence(r: random.Random, z: float) -> tuple[list[str], list[float], float]:
    """Words, each word's polarity in context, and the mean polarity of the sentence's clauses."""
    segments: list[tuple[str, float]] = []
    opener = r.choice(_OPENERS)
    if opener:
        segments.append((opener, 0.0))
    n_clauses = r.choices((1, 2, 3), weights=(0.5, 0.35, 0.15))[0]
    filler_at = r.randrange(n_clauses + 1) if r.random() < 0.4 else -1
    values: list[float] = []
    for i in range(n_clauses):
        if i == filler_at:
            segments.append((r.choice(_FILLERS), 0.0))
        target = min(1.25, max(-1.25, TEXT_GAIN * (z + r.gauss(0.0, CLAUSE_JITTER))))
        clause, value = _clause(r, target)
        if i:
            contrast = any(v * value < 0 for v in values[-1:])
            connectors = ("but", "but then", "although") if contrast else (
                "and", "and also", "also", "plus")
            segments.append((r.choice(connectors), 0.0))
        segments.extend((text, value if sentiment else 0.0) for text, sentiment in clause)
        values.append(value)
    if filler_at == n_clauses:
        segments.append((r.choice(_FILLERS), 0.0))
    words: list[str] = []
    polarity: list[float] = []
    for text, value in segments:
        for word in text.split():
            words.append(word)
            polarity.append(value)
    return words, polarity, sum(values) / len(values)


def _encode_text(
    sentences: list[list[str]], polarities: list[list[float]], overall: list[float], length: int
) -> tuple[np.ndarray, np.ndarray]:
    """`text_bert` (N, 3, L) and each token's polarity (N, L).

    The sentences are lowercase words without punctuation, so encoding each distinct word once
    and joining the pieces equals the tokenizer's output on the sentence, and tells which word
    every piece came from.
    """
    tokenizer = load_tokenizer("minilm")
    vocab = sorted({word for words in sentences for word in words})
    pieces = dict(zip(vocab, tokenizer(vocab, add_special_tokens=False)["input_ids"], strict=True))
    n = len(sentences)
    ids = np.full((n, length), tokenizer.pad_token_id, dtype=np.int64)
    polarity = np.zeros((n, length), dtype=np.float32)
    for i, (words, values) in enumerate(zip(sentences, polarities, strict=True)):
        row = [tokenizer.cls_token_id]
        row_polarity = [overall[i]]  # [CLS] summarises the sentence, as in BERT
        for word, value in zip(words, values, strict=True):
            row.extend(pieces[word])
            row_polarity.extend([value] * len(pieces[word]))
        row = row[:length - 1] + [tokenizer.sep_token_id]
        row_polarity = row_polarity[:length - 1] + [0.0]
        ids[i, :len(row)] = row
        polarity[i, :len(row)] = row_polarity
    mask = (ids != tokenizer.pad_token_id).astype(np.int64)
    return np.stack([ids, mask, np.zeros_like(ids)], axis=1), polarity


def _text_features(
    rng: np.random.Generator, ids: np.ndarray, polarity: np.ndarray, mask: np.ndarray, dim: int
) -> np.ndarray:
    """A stand-in for frozen BERT states (NOT BERT): token vector + polarity direction + noise."""
    used = np.unique(ids)
    # one generator per token id: a token's vector is the same whatever else the data holds
    table = np.stack([
        np.random.default_rng([EMBEDDING_SEED, int(t)]).standard_normal(dim, dtype=np.float32)
        for t in used
    ]) * np.float32(TOKEN_SCALE)
    direction = np.random.default_rng([EMBEDDING_SEED, 1 << 20]).standard_normal(
        dim, dtype=np.float32
    )
    index = np.searchsorted(used, ids).reshape(-1)
    flat_polarity = polarity.reshape(-1)
    out = np.zeros((*ids.shape, dim), dtype=np.float32)
    flat = out.reshape(-1, dim)
    positions = np.flatnonzero(mask)  # padding stays zero, and costs nothing
    for start in range(0, len(positions), _TOKEN_CHUNK):
        rows = positions[start:start + _TOKEN_CHUNK]
        block = table[index[rows]]
        block += np.outer(SENTIMENT_SCALE * flat_polarity[rows], direction)
        block += TEXT_NOISE * rng.standard_normal(block.shape, dtype=np.float32)
        flat[rows] = block
    return out


def _audio(
    rng: np.random.Generator, z: np.ndarray, video: np.ndarray, lengths: np.ndarray,
    steps: int, dim: int,
) -> np.ndarray:
    n = len(z)
    out = rng.standard_normal((n, steps, dim), dtype=np.float32)
    speaker = rng.normal(0.0, AUDIO_SPEAKER_STD, (video.max() + 1, dim)).astype(np.float32)
    out += speaker[video][:, None, :]
    for d, gain in enumerate(AUDIO_GAIN[:dim]):
        out[:, :, d] += (gain * z).astype(np.float32)[:, None]
    out *= (np.arange(steps) < lengths[:, None])[..., None]
    n_inf = max(1, round(INF_FRACTION * n))
    rows = rng.choice(n, n_inf, replace=False)
    frames = (rng.random(n_inf) * lengths[rows]).astype(np.int64)
    out[rows, frames, rng.integers(0, dim, n_inf)] = -np.inf
    return out


def _vision(
    rng: np.random.Generator, z: np.ndarray, video: np.ndarray, lengths: np.ndarray,
    steps: int, dim: int,
) -> np.ndarray:
    n = len(z)
    out = rng.standard_normal((n, steps, dim), dtype=np.float32)
    speaker = rng.normal(0.0, VISION_SPEAKER_STD, (video.max() + 1, dim)).astype(np.float32)
    out += speaker[video][:, None, :]
    burst = np.maximum(1, np.rint(rng.uniform(*BURST, n) * lengths)).astype(np.int64)
    start = (rng.random(n) * (lengths - burst + 1)).astype(np.int64)
    t = np.arange(steps)
    active = (t >= start[:, None]) & (t < (start + burst)[:, None])
    # a "smile" unit for positive views, a "frown" unit for negative ones
    out[:, :, 0] += VISION_GAIN * np.maximum(z, 0).astype(np.float32)[:, None] * active
    out[:, :, 1] += VISION_GAIN * np.maximum(-z, 0).astype(np.float32)[:, None] * active
    out *= (t < lengths[:, None])[..., None]
    return out


def _clip_ids(rng: np.random.Generator, sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """"syn<video>$_$<clip>" ids and each clip's video number; no video spans two splits."""
    ids: list[str] = []
    video: list[int] = []
    v = 0
    for size in sizes:
        done = 0
        while done < size:
            clips = min(int(rng.integers(5, 31)), size - done)
            ids.extend(f"syn{v:04d}$_${clip}" for clip in range(1, clips + 1))
            video.extend([v] * clips)
            v += 1
            done += clips
    return np.array(ids, dtype=object), np.array(video, dtype=np.int64)


def _video_domains(
    rng: np.random.Generator, video: np.ndarray, sizes: tuple[int, ...], domains: int
) -> np.ndarray:
    """Each clip's domain: the videos of every split are dealt to the domains in a seeded order."""
    of_video = np.zeros(video.max() + 1, dtype=np.int64)
    bounds = np.cumsum((0, *sizes))
    for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
        videos = np.unique(video[lo:hi])
        if len(videos) < domains:
            raise MsakitError(
                f"synthetic domains={domains} needs at least {domains} videos in every split, but "
                f"n_{name}={hi - lo} gives {len(videos)} (a video has 5 to 30 clips)"
            )
        of_video[videos] = rng.permutation(len(videos)) % domains
    return of_video[video]


def _shift_features(
    rng: np.random.Generator, features: dict[str, tuple[np.ndarray, np.ndarray]], domain: np.ndarray,
    domains: int, shift: float,
) -> None:
    """x -> g x + o on the valid steps of every domain, in place; padding stays zero, -inf stays -inf."""
    for d in range(domains):
        rows = np.flatnonzero(domain == d)
        for name in _MODALITIES:
            x, valid = features[name]
            gain = np.float32(np.exp(rng.normal(0.0, DOMAIN_GAIN_STD * shift)))
            # a random direction with a fixed length: every domain is shifted by the same amount
            direction = rng.standard_normal(x.shape[-1])
            offset = (DOMAIN_OFFSET[name] * shift * np.sqrt(x.shape[-1]) * direction
                      / np.linalg.norm(direction)).astype(np.float32)
            block = x[rows] * gain
            block += valid[rows][..., None] * offset
            x[rows] = block


def _real_scale(
    rng: np.random.Generator, labels: np.ndarray, features: dict[str, tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """Raw, mixed feature scales in place (padding stays zero) and the labels on a small range."""
    low, high = np.log10(REAL_SCALE_RANGE)
    for x, valid in features.values():
        # evenly spread over the range, so that every modality has dims at both ends
        magnitude = 10.0 ** rng.permutation(np.linspace(low, high, x.shape[-1]))
        # the spread is 1% to 100% of the magnitude: some dims are nearly constant far from zero,
        # like a face's position in pixels
        spread = (magnitude * 10.0 ** rng.uniform(-2.0, 0.0, x.shape[-1])).astype(np.float32)
        offset = (magnitude * rng.uniform(-1.0, 1.0, x.shape[-1])).astype(np.float32)
        x *= spread
        x += valid[..., None] * offset
    audio, valid = features["audio"]
    rows = rng.random(len(audio)) < REAL_SCALE_INF_ROWS
    audio[rows, :, 0] = np.where(valid[rows], -np.inf, 0.0)
    return (labels * (REAL_SCALE_LABEL_STD / LABEL_STD)).astype(np.float32)


def _check_sizes(sizes: dict[str, int]) -> None:
    minimum = {"text_len": 3, "audio_dim": 1, "vision_dim": 2}
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise MsakitError(f"synthetic size {key} must be an integer, not {value!r}")
        if value < minimum.get(key, 1):
            raise MsakitError(f"synthetic size {key} must be at least {minimum.get(key, 1)}, "
                              f"not {value}")


def generate_synthetic(
    n_train: int = 1284,
    n_valid: int = 229,
    n_test: int = 686,
    text_len: int = 50,
    audio_len: int = 375,
    audio_dim: int = 5,
    vision_len: int = 500,
    vision_dim: int = 20,
    text_dim: int = 768,
    domains: int = 1,
    domain_shift: float = 1.0,
    real_scale: bool = False,
    aligned: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """A MOSI-like dataset in the raw MMSA layout (what `save_mmsa` writes), the same for a seed.

    `aligned=True` puts every modality at `text_len` steps without `*_lengths` keys, like
    `aligned_50.pkl`. Audio keeps its planted -inf values: loading cleans them. With `domains` > 1
    each split also has a `domains` array (N,) of domain indexes, shifted as the module describes.
    `real_scale` gives audio and vision raw, mixed feature scales and the labels a small range.

    (Longer than the usual 80 lines on purpose: it reads top to bottom as the generative story of
    one dataset, from the latent factors and labels through each modality to the options.)
    """
    sizes = (n_train, n_valid, n_test)
    _check_sizes({"n_train": n_train, "n_valid": n_valid, "n_test": n_test, "text_len": text_len,
                  "audio_len": audio_len, "audio_dim": audio_dim, "vision_len": vision_len,
                  "vision_dim": vision_dim, "text_dim": text_dim, "domains": domains})
    if isinstance(domain_shift, bool) or not isinstance(domain_shift, (int, float)) or not (
            0 <= domain_shift < float("inf")):
        raise MsakitError(f"synthetic domain_shift must be a number >= 0, not {domain_shift!r}")
    if not isinstance(real_scale, (bool, np.bool_)) and real_scale not in (0, 1):
        raise MsakitError(f"synthetic real_scale must be true or false, not {real_scale!r}")
    n = sum(sizes)
    rng = np.random.default_rng(seed)
    shared, u_text, u_audio, u_vision = rng.standard_normal((4, n))
    mix = (W_SHARED * shared + W_TEXT * u_text + W_AUDIO * u_audio + W_VISION * u_vision
           + LABEL_NOISE * rng.standard_normal(n))
    scale = LABEL_STD / np.sqrt(W_SHARED**2 + W_TEXT**2 + W_AUDIO**2 + W_VISION**2 + LABEL_NOISE**2)
    labels = np.clip(np.round(mix * scale / LABEL_STEP) * LABEL_STEP, -3.0, 3.0).astype(np.float32)
    views = {
        name: (shared + own) / np.sqrt(2.0) + VIEW_NOISE[name] * rng.standard_normal(n)
        for name, own in (("text", u_text), ("audio", u_audio), ("vision", u_vision))
    }
    ids, video = _clip_ids(rng, sizes)
    domain = None
    if domains > 1:
        shifts = np.random.default_rng([seed, DOMAIN_STREAM])
        domain = _video_domains(shifts, video, sizes, domains)
        for d in range(1, domains):
            rows = domain == d
            views[_MODALITIES[(d - 1) % 3]][rows] += (
                UNRELIABLE_NOISE * domain_shift * shifts.standard_normal(int(rows.sum())))

    r = random.Random(int(rng.integers(2**63)))
    sentences, polarities, overall = [], [], []
    for z in views["text"]:
        words, polarity, mean = _sentence(r, float(z))
        sentences.append(words)
        polarities.append(polarity)
        overall.append(mean)
    text_bert, token_polarity = _encode_text(sentences, polarities, overall, text_len)
    text = _text_features(rng, text_bert[:, 0], token_polarity, text_bert[:, 1], text_dim)

    if aligned:
        # word-aligned features share the text's steps; padding stays zero
        audio_len = vision_len = text_len
        audio_lengths = vision_lengths = text_bert[:, 1].sum(axis=1)
    else:
        audio_lengths = rng.integers(max(1, audio_len // 5), audio_len + 1, n)
        vision_lengths = rng.integers(max(1, vision_len // 5), vision_len + 1, n)
    audio = _audio(rng, views["audio"], video, audio_lengths, audio_len, audio_dim)
    vision = _vision(rng, views["vision"], video, vision_lengths, vision_len, vision_dim)
    if domain is not None:
        _shift_features(shifts, {
            "text": (text, text_bert[:, 1] > 0),
            "audio": (audio, np.arange(audio_len) < audio_lengths[:, None]),
            "vision": (vision, np.arange(vision_len) < vision_lengths[:, None]),
        }, domain, domains, domain_shift)
    if real_scale:
        labels = _real_scale(np.random.default_rng([seed, REAL_SCALE_STREAM]), labels, {
            "audio": (audio, np.arange(audio_len) < audio_lengths[:, None]),
            "vision": (vision, np.arange(vision_len) < vision_lengths[:, None]),
        })

    columns: dict[str, np.ndarray] = {
        "id": ids,
        "raw_text": np.array([" ".join(words) for words in sentences], dtype=object),
        "text": text,
        "text_bert": text_bert,
        "audio": audio,
        "vision": vision,
    }
    if not aligned:
        columns["audio_lengths"] = audio_lengths.astype(np.int64)
        columns["vision_lengths"] = vision_lengths.astype(np.int64)
    columns["regression_labels"] = labels
    if domain is not None:
        columns["domains"] = domain
    raw: dict[str, Any] = {}
    bounds = np.cumsum((0, *sizes))
    for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
        raw[name] = {key: value[lo:hi] for key, value in columns.items()}
    return raw


def synthetic_dataset(*, name: str = "synthetic", **options: Any) -> MultimodalDataset:
    """`generate_synthetic(**options)` loaded with the same checks and cleaning as an MMSA pickle.

    `options` are `generate_synthetic`'s keyword arguments (sizes, `domains`, `aligned`, `seed`);
    each split's `domains` array, when there is one, becomes `Split.domains`.
    """
    bound = inspect.signature(generate_synthetic).bind(**options)
    bound.apply_defaults()
    raw = generate_synthetic(**bound.arguments)
    args = bound.arguments
    source = f"synthetic(seed={args['seed']}, {'aligned' if args['aligned'] else 'unaligned'}"
    if args["domains"] > 1:
        source += f", domains={args['domains']}, domain_shift={args['domain_shift']:g}"
    if args["real_scale"]:
        source += ", real_scale"
    return dataset_from_raw(raw, source=source + ")", family="synthetic", name=name,
                            family_source="the synthetic generator")
