"""Missing-data protocols as pure, seeded masks: which tokens, frames or modalities are absent.

Protocols (REFERENCES.md §3):

- ``intra`` (LNLN): every text token that is not special ([CLS], [SEP], padding) is replaced by
  [UNK] with probability r, and every valid audio/vision frame is zeroed with probability r.
  Precomputed text features of a dropped token are zeroed too. Masks are left as they are.
- ``inter`` (HME, CyIN): a fraction MR of the (sample, modality) entries is dropped whole, and
  every sample keeps at least one modality.
- ``fixed``: only the modalities of a named subset ("t", "ta", ...) are kept.

Both whole-modality protocols work on the modalities the data really has (a text-only split has
one): the modality a sample is forced to keep is chosen among those, and a fixed subset that
keeps none of them is an error rather than a batch with nothing left in it.

Purity. Every random decision is read from a counter-based stream: a 64-bit key is the BLAKE2b
hash of (stream name, seed, epoch, modality, sample id), and the value at counter i is the
SplitMix64 output of ``key + i * golden_gamma``. A mask is therefore a function of the protocol,
rate, seed, sample id, modality (and epoch, for training noise) only: batch size, shuffling and
worker count cannot change it. The draws do not depend on the rate, so masks are nested: what is
dropped at r = 0.3 is also dropped at r = 0.5 (paired comparisons across rates). The uniform at
token position t does not depend on the padded length either. Samples are told apart by id
only, so two samples sharing an id within a split would share their masks.

Deviations from the authors' code, on purpose:

- LNLN keeps [CLS] and the last valid token by position; here special tokens are recognised by
  id (``special_ids``), which also protects [SEP] tokens in the middle of a pair.
- HME and CyIN draw one missing matrix per split (HME) or per batch (CyIN) and redraw it until the
  realised kept fraction is within 0.005 of 1 - MR, which ties a sample's pattern to its batch
  and position. Here each sample draws its own pattern with expectation exactly MR: one modality,
  chosen uniformly, is always kept and each of the other two is dropped with probability
  p = 3 MR / 2, capped at 1. This is HME's construction (one forced modality plus independent
  extra ones) without the rejection step, so the realised fraction over a finite split scatters
  around MR (standard deviation about 0.01 on MOSI's 686 test samples). For MR >= 2/3 exactly one
  modality is kept, as in both papers, so the realised fraction is 2/3 whatever MR above that.
  A sample with k < 3 modalities in the data uses the same draws: the forced one is chosen
  uniformly among its k and each other one is dropped with p = k MR / (k - 1), capped at 1
  (a single modality is never dropped). With all three, k = 3 gives back the rule above.
- A whole dropped modality: HME zeroes BERT's output states and CyIN replaces the modality's
  latent by a translation from the present ones, both inside the model. A data-level protocol
  must hide the text from models that never read ``presence`` too, so token ids have every valid
  non-special token replaced by [UNK] (intra-modal missing at r = 1) and feature tensors are
  zeroed for that sample; ``presence`` is set False so that presence-aware models can zero their
  encoded states as HME does. Masks are unchanged, so attention never sees an all-padding row.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from msakit.data.schema import MODALITIES, Batch
from msakit.data.tokens import BERT_SPECIAL_IDS, BERT_UNK_ID
from msakit.errors import MsakitError

PROTOCOLS = ("none", "intra", "inter", "fixed")
FIXED_SUBSETS = ("t", "a", "v", "ta", "tv", "av", "tav")
DEFAULT_RATES: dict[str, tuple[float, ...]] = {
    "intra": tuple(i / 10 for i in range(10)),
    "inter": tuple(i / 10 for i in range(1, 8)),
}

_LETTERS = "tav"  # subset letters, in MODALITIES order
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _check_rate(rate: object, what: str = "missing rate") -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise MsakitError(f"{what} must be a number in [0, 1), not {rate!r}")
    value = float(rate)
    if not 0.0 <= value < 1.0:  # NaN fails this too
        raise MsakitError(f"{what} {rate!r} is outside [0, 1)")
    return value


def canonical_subset(subset: str) -> str:
    """'at' -> 'ta': the subset's letters in text, audio, vision order; MsakitError if invalid."""
    letters = subset.lower() if isinstance(subset, str) else ""
    if not letters or len(set(letters)) != len(letters) or set(letters) - set(_LETTERS):
        raise MsakitError(
            f"unknown modality subset {subset!r}; expected one of {', '.join(FIXED_SUBSETS)} "
            "(letters in any order)"
        )
    return "".join(c for c in _LETTERS if c in letters)


@dataclass(frozen=True)
class MissingSpec:
    """One missing-data condition: protocol, rate (intra r or inter MR), fixed subset and seed.

    ``rate`` is read by "intra" and "inter", ``subset`` by "fixed"; ``subset`` is stored in
    canonical order ("at" becomes "ta").
    """

    protocol: str
    rate: float = 0.0
    subset: str = "tav"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise MsakitError(
                f"unknown missing protocol {self.protocol!r}; "
                f"expected one of {', '.join(PROTOCOLS)}"
            )
        object.__setattr__(self, "rate", _check_rate(self.rate))
        object.__setattr__(self, "subset", canonical_subset(self.subset))
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise MsakitError(f"missing-data seed must be an integer, not {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def label(self) -> str:
        """Short name for tables and logs, e.g. 'intra r=0.3', 'inter MR=0.5', 'fixed ta'."""
        if self.protocol == "intra":
            return f"intra r={self.rate:g}"
        if self.protocol == "inter":
            return f"inter MR={self.rate:g}"
        if self.protocol == "fixed":
            return f"fixed {self.subset}"
        return "none"


def parse_rates(text: str) -> list[float]:
    """Rates from "start:stop:step" (stop included) or a comma list "0.1,0.3"; each in [0, 1)."""
    bad = MsakitError(
        f"bad rate list {text!r}: expected start:stop:step (stop included) or a comma list"
    )
    try:
        if ":" in text:
            start, stop, step = (float(p) for p in text.split(":"))
            if not step > 0 or stop < start:
                raise bad
            # the epsilon keeps a stop that is a float-rounded multiple of step (0.9 = 9 * 0.1)
            count = math.floor((stop - start) / step + 1e-9) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(p) for p in text.split(",")]
    except ValueError:
        raise bad from None
    for value in values:
        _check_rate(value, f"missing rate in {text!r}:")
    return values


def _stream_keys(
    stream: str, seed: int, epoch: int | None, modality: str, ids: Sequence[str]
) -> np.ndarray:
    """(B,) uint64: one key per sample; a stable hash (Python's hash() is salted per process)."""
    prefix = f"msakit|{stream}|{seed}|{'-' if epoch is None else int(epoch)}|{modality}|"
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b((prefix + i).encode(), digest_size=8).digest(), "little")
            for i in ids
        ),
        dtype=np.uint64,
        count=len(ids),
    )


def uniforms(keys: np.ndarray, n: int) -> np.ndarray:
    """(B, n) float64 in [0, 1): SplitMix64 outputs 1..n of each key's stream."""
    counters = np.arange(1, n + 1, dtype=np.uint64)
    z = keys[:, None] + counters[None, :] * _GAMMA  # uint64 arithmetic wraps modulo 2**64
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (2.0**-53)


def sample_uniforms(
    stream: str, seed: int, ids: Sequence[str], modality: str, n: int, epoch: int | None = None
) -> np.ndarray:
    """(B, n) uniforms for the named stream: the one source of randomness of every protocol."""
    return uniforms(_stream_keys(stream, seed, epoch, modality, ids), n)


def _has(batch: Batch, modality: str) -> bool:
    if modality == "text":
        return batch.text is not None or batch.text_ids is not None
    return getattr(batch, modality) is not None


def _valid(batch: Batch, modality: str) -> torch.Tensor:
    """(B, L) bool: valid positions (all of them when a hand-built batch has no mask)."""
    mask = getattr(batch, f"{modality}_mask")
    if mask is not None:
        return mask.bool()
    if modality == "text":
        source = batch.text_ids[:, 0] if batch.text_ids is not None else batch.text[..., 0]
    else:
        source = getattr(batch, modality)[..., 0]
    return torch.ones(source.shape, dtype=torch.bool, device=source.device)


def droppable_positions(batch: Batch, modality: str, special_ids: Iterable[int]) -> torch.Tensor:
    """(B, L) bool: positions a protocol may drop; for text, valid tokens that are not special.

    Without token ids there is no way to tell [CLS]/[SEP] features apart, so every valid
    position of precomputed text features is droppable.
    """
    valid = _valid(batch, modality)
    if modality == "text" and batch.text_ids is not None:
        ids = batch.text_ids[:, 0]
        special = torch.as_tensor(list(special_ids), dtype=ids.dtype, device=ids.device)
        valid = valid & ~torch.isin(ids, special)
    return valid


def _zero_where(features: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """A new tensor with ``features`` zeroed where the broadcast ``drop`` is True.

    A 0/1 factor is used because CPU ``masked_fill`` with a broadcast mask is 10-30x slower;
    features are finite (the loader replaces -inf/NaN), so the product is exactly 0 there.
    """
    return features * (~drop).to(features.dtype)


def blank_out(
    batch: Batch, modality: str, token_drop: torch.Tensor | None, feature_drop: torch.Tensor,
    unk_id: int,
) -> dict[str, torch.Tensor]:
    """New tensors for one modality: token ids set to UNK where ``token_drop`` (B, L; text only),
    features zeroed where ``feature_drop`` broadcasts True. Nothing is copied when nothing is
    dropped. Shared by the missing-data protocols and models that thin their own inputs (MMSLF)."""
    changes = {}
    if modality == "text" and batch.text_ids is not None and bool(token_drop.any()):
        ids = batch.text_ids
        changes["text_ids"] = torch.cat(
            [ids[:, :1].masked_fill(token_drop.unsqueeze(1), unk_id), ids[:, 1:]], dim=1
        )
    features = getattr(batch, modality)
    if features is not None and bool(feature_drop.any()):
        changes[modality] = _zero_where(features, feature_drop)
    return changes


def _record(dropped: dict[str, torch.Tensor], modality: str, mask: torch.Tensor) -> None:
    previous = dropped.get(modality)
    dropped[modality] = mask if previous is None else previous | mask


def drop_within_modalities(
    batch: Batch,
    rates: Mapping[str, float | np.ndarray],
    *,
    stream: str,
    seed: int,
    epoch: int | None = None,
    unk_id: int = BERT_UNK_ID,
    special_ids: Iterable[int] = BERT_SPECIAL_IDS,
) -> Batch:
    """Intra-modal dropping at a rate per modality: a float, or a (B,) array (one per sample).

    Text: dropped tokens become ``unk_id`` in ``text_ids`` and zero vectors in ``text``.
    Audio/vision: dropped frames become zero vectors. Only droppable positions are touched,
    masks are kept, and ``dropped`` records (OR-ed with earlier protocols) what was dropped.
    """
    special_ids = tuple(special_ids)
    changes: dict[str, torch.Tensor] = {}
    dropped = dict(batch.dropped)
    for modality in MODALITIES:
        if modality not in rates or not _has(batch, modality):
            continue
        droppable = droppable_positions(batch, modality, special_ids)
        rate = np.asarray(rates[modality], dtype=np.float64).reshape(-1, 1)
        u = sample_uniforms(stream, seed, batch.ids, modality, droppable.shape[1], epoch)
        drop = torch.from_numpy(u < rate).to(droppable.device) & droppable
        changes.update(blank_out(batch, modality, drop, drop.unsqueeze(-1), unk_id))
        _record(dropped, modality, drop)
    return batch.with_updates(dropped=dropped, **changes)


def available_modalities(batch: Batch) -> np.ndarray:
    """(B, 3) bool: the modalities each sample of ``batch`` has, [text, audio, vision].

    A modality counts when its tensors exist and ``presence`` says it is there.
    """
    has = np.array([_has(batch, modality) for modality in MODALITIES])
    return batch.presence.cpu().numpy().astype(bool) & has


def _names(row: np.ndarray) -> str:
    return ", ".join(m for m, there in zip(MODALITIES, row, strict=True) if there) or "none"


def drop_whole_modalities(
    batch: Batch,
    keep: np.ndarray | torch.Tensor,
    *,
    unk_id: int = BERT_UNK_ID,
    special_ids: Iterable[int] = BERT_SPECIAL_IDS,
) -> Batch:
    """Drop whole modalities where ``keep`` (B, 3) [text, audio, vision] is False.

    Features of a dropped modality are zeroed for that sample, its token ids have every
    droppable token replaced by ``unk_id``, and its ``presence`` becomes False. ``dropped``
    marks the droppable positions (valid frames; valid non-special tokens) of dropped modalities.
    MsakitError when a sample would be left with none of the modalities it has: build ``keep``
    with ``modality_keep(..., available=available_modalities(batch))`` to respect that.
    """
    special_ids = tuple(special_ids)
    keep_np = np.asarray(keep.cpu() if isinstance(keep, torch.Tensor) else keep, dtype=bool)
    have = available_modalities(batch)
    emptied = have.any(axis=1) & ~(have & keep_np).any(axis=1)
    if emptied.any():
        b = int(np.flatnonzero(emptied)[0])
        raise MsakitError(
            f"dropping modalities would leave sample {batch.ids[b]!r} with none of the ones it "
            f"has ({_names(have[b])}); every sample keeps at least one"
        )
    keep_t = torch.from_numpy(keep_np.copy()).to(batch.presence.device)
    changes = {"presence": batch.presence & keep_t}
    dropped = dict(batch.dropped)
    for m, modality in enumerate(MODALITIES):
        if not _has(batch, modality):
            continue
        gone = ~keep_t[:, m]
        tokens = droppable_positions(batch, modality, special_ids) & gone.unsqueeze(1)
        changes.update(blank_out(batch, modality, tokens, gone.view(-1, 1, 1), unk_id))
        _record(dropped, modality, tokens)
    return batch.with_updates(dropped=dropped, **changes)


def modality_keep(
    spec: MissingSpec,
    ids: Sequence[str],
    *,
    epoch: int | None = None,
    available: np.ndarray | Sequence[bool] | None = None,
) -> np.ndarray:
    """(B, 3) bool: which of [text, audio, vision] each sample keeps under ``spec``.

    ``available`` ((3,) or (B, 3) bool) says which modalities the data has; None means all
    three. A modality the data lacks is never kept.

    "inter": one modality, picked uniformly among the k available, is always kept; each other
    one is dropped with probability p = min(1, k MR / (k - 1)), so the expected dropped fraction
    of the available entries is exactly MR up to (k - 1) / k. "fixed": the subset's modalities
    are kept; MsakitError when that leaves a sample that has data with none of it.
    """
    n = len(ids)
    have = np.ones((n, 3), dtype=bool) if available is None else np.broadcast_to(
        np.asarray(available, dtype=bool), (n, 3)
    )
    if spec.protocol == "fixed":
        keep = np.array([c in spec.subset for c in _LETTERS]) & have
        emptied = have.any(axis=1) & ~keep.any(axis=1)
        if emptied.any():
            raise MsakitError(
                f"fixed subset {spec.subset!r} keeps none of the modalities the data has "
                f"({_names(have[np.flatnonzero(emptied)[0]])})"
            )
        return keep
    if spec.protocol != "inter":
        return have.copy()
    u = sample_uniforms("inter", spec.seed, ids, "*", 4, epoch)
    count = have.sum(axis=1)
    # the forced modality is the j-th available one, j uniform in [0, k): with all three
    # available this is min(int(3 u), 2), the rule for complete data
    j = np.minimum((u[:, 0] * count).astype(np.int64), np.maximum(count - 1, 0))
    rank = np.cumsum(have, axis=1) - 1
    forced = have & (rank == j[:, None])
    others = np.maximum(count - 1, 1)
    # at k MR >= k - 1 every other modality goes; the tolerance absorbs rounding (2/3 * 3 < 2)
    p = np.where(count * spec.rate >= others - 1e-9, 1.0, count * spec.rate / others)
    return have & ((u[:, 1:] >= p[:, None]) | forced)


def apply_missing(
    batch: Batch,
    spec: MissingSpec,
    *,
    unk_id: int = BERT_UNK_ID,
    special_ids: Iterable[int] = BERT_SPECIAL_IDS,
    epoch: int | None = None,
) -> Batch:
    """The batch with ``spec`` applied: new tensors, the input batch left untouched.

    ``epoch`` enters the random streams (training noise resamples every epoch); evaluation
    leaves it None. ``unk_id`` and ``special_ids`` come from the tokenizer of the text ids
    (defaults: bert-base-uncased, whose vocabulary MiniLM shares).
    """
    if spec.protocol == "none":
        return batch
    if spec.protocol == "intra":
        return drop_within_modalities(
            batch, dict.fromkeys(MODALITIES, spec.rate), stream="intra", seed=spec.seed,
            epoch=epoch, unk_id=unk_id, special_ids=special_ids,
        )
    keep = modality_keep(spec, batch.ids, epoch=epoch, available=available_modalities(batch))
    return drop_whole_modalities(batch, keep, unk_id=unk_id, special_ids=special_ids)
