"""HME: Hyper-Modality Enhancement (Zhuang et al., "Hyper-Modality Enhancement for Multimodal
Sentiment Analysis with Missing Modalities", NeurIPS 2025; official code YetZzzzzz/HME @6f0c9a7).

Every width below is d (`hidden`); a modality m is one of text l, audio a, vision v. The paper
trained on the word-aligned 50-step pickles, so msakit reads aligned_*.pkl for this model unless
told `--unaligned` (`aligned_input`).

1. Encoders. Text states (a fine-tuned BERT-style encoder or precomputed features), audio and
   vision frames: a missing modality (`presence` False) is zeroed whole, then a bias-free linear
   map to d (the official 1x1 Conv1d), a MulT-style transformer (`CrossModalEncoder`: sqrt(d)
   scaling, sinusoidal positions numbered from 1, pre-LN layers) and a max-pool over time: H_m
   (B, d). With `encoder_attention: input` (the default, and what the published numbers used:
   the official code calls `l2l(x, x, x)`) every layer's keys and values are the embedded input
   X_0 and only the queries evolve: X_{i+1} = X_i + Attn(LN_i(X_i), LN_i(X_0), LN_i(X_0)) + FFN.
   `encoder_attention: self` is ordinary self-attention (keys and values = X_i).
2. Cross-sample enhancement. Each H_m is the query of a cosine search over OTHER samples' H_m,
   among samples where m is present: the mean of the retrieved representations whose similarity is
   at least `similarity_threshold` (the `retrieval_k` most similar, or all of them when
   `retrieval_k` is null) is C_m. When nothing passes the threshold, or m is missing for the
   query, C_m is the fallback mean over the candidates (samples where m is present, the query
   excluded).
3. Latent enhancement. A Perceiver-style latent array (`num_latents` learned latents, depth
   `latent_layers`: cross-attention to the input, GEGLU feed-forward, latent self-attention,
   feed-forward; mean over latents, LayerNorm) per modality reads C_m: E_m. A shared one reads the
   three originals [H_l, H_a, H_v]: E_S.
4. Hyper-modality. Cross-attention stacks (depth `hyper_depth`, pre-LN, GEGLU feed-forward):
   E_{m->x} = XAttn(E_m, E_x) for the six ordered pairs, R_m = XAttn(E_S, [E_{m->x}, E_{m->y}]).
5. Variational information bottleneck per modality: MLP(d -> 2d -> 2d -> 2d) gives mu and
   sigma = softplus(s - 5); Z_m = mu + eps * sigma; a unimodal head Linear(d -> 1) reads Z_m.
6. Uncertainty-aware fusion. S_m mixes the original H_m and the enhanced Z_m with softmax weights
   from an MLP over [H_m; Z_m] (scaled by 1/sqrt(d)), the enhanced one down-weighted by
   w_m = clamp(1 / mean(sigma_m), `uncertainty_lower`, `uncertainty_upper`). S_H mixes Z_l, Z_a, Z_v
   with MLP logits multiplied by softmax_m(1 / mean(sigma_m)) (official rule). A 2-layer post-LN
   transformer over [S_l, S_a, S_v, S_H], then Linear(4d -> 2d)-ReLU-Linear(2d -> 1).
7. Loss: L1(y_hat, y) + 0.8 mean_m L1(y_m, y) + 0.01 mean_m KL(N(mu_m, sigma_m) || N(0, 1)): the
   task loss is the trainer's (`training.loss: l1`), the other two are `losses["unimodal"]` and
   `losses["kl"]`, already weighted. Training at missing rate MR is `training.noise: inter` with
   `training.noise_rate: MR`; the paper trains one model per MR, selects it on validation dropped
   at that MR and tests it at that MR (the YAML's `reproduce:` recipe, `one_model_per_rate`).

Where this differs from the official code, and the switch that restores the official behaviour
(benchmarks/parity/hme.py sets every one of them and matches the official model):
- Retrieval source (`retrieval: batch`, `retrieval_k: null`). The official `get_similar_embeddings`
  searches only the current batch (every sample of the batch with cosine >= 0.6, the query
  excluded), so a sample's enhancement depends on which samples share its batch, and a batch of one
  has nothing to retrieve. The published numbers were obtained with that in-batch rule. The
  default here (`retrieval: bank`) searches a memory bank of the whole training split: H_m of every
  training sample, its presence and a hash of its id, recomputed (eval mode, no gradient) before
  the first epoch and after every `refresh_every`-th epoch (`on_train_epoch_end`, before
  validation, so validation, test and the saved checkpoint use the bank of the weights they
  score), stored as buffers so that a checkpoint predicts alone, a single sample with a missing
  modality included. The bank holds the CLEAN training split (the hook's batches carry no training
  noise) and a sample never retrieves itself (matched by id, so its clean modalities cannot leak
  into its own noisy batch); bank entries carry no gradient, the in-batch ones do (as in the
  official code). Retrieval is a blocked cosine top-k (`layers/neighbours.py`), never a dense
  N x N matrix. Before the first refresh (an untrained model) the bank is empty and the in-batch
  rule is used.
- Missing queries and candidates (`retrieve_missing: true`). In the official code a missing
  modality is zeroed before the encoder, so its H_m is the encoder's response to zeros: the same
  vector for every sample missing m, an ordinary query that retrieves (and is retrieved by) the
  other samples missing m. Here a candidate must have m present, and a query missing m takes the
  fallback mean, which is what the official fallback intends for zero vectors.
- Fallback mean (`retrieval_fallback: all`). Here the mean over the candidates (m present, the
  query excluded); the official code averages the whole batch, the query and the samples missing m
  included, but not the all-zero vectors (an untrained encoder, its biases still 0, maps a missing
  modality to exactly 0).
- Positions on a missing modality (`position_zero_steps: false`). The official MulT code gives no
  position to a step whose projected input's first channel is exactly 0, i.e. to every step of a
  zeroed modality (and to the zero steps of the aligned pickles); msakit adds positions to every
  valid step, so a missing modality's steps carry positions only.
- Uncertainty gate (`uncertainty_gate: multiply`). The official `Attention_Uncertainty_2`
  MULTIPLIES the enhanced logit by w_m, which moves weight TOWARDS the enhanced representation
  whenever that logit is negative. Here (`log`) log(w_m) is added to it, i.e. the enhanced softmax
  weight is multiplied by w_m before renormalising: higher uncertainty always moves the mix
  towards the original H_m.
- Bottleneck at test time (`sample_at_eval: true`). The bottleneck samples Z_m = mu + eps * sigma
  in training only; in evaluation Z_m = mu, so a prediction is deterministic (the official code
  samples at test time too).
- Padding (no switch). Attention masks hide padded tokens and frames, and the max-pool runs over
  valid steps only (the official aligned 50-step inputs are attended and pooled over padding too;
  the parity check feeds unpadded inputs).
- Embedding dropout (no switch; random draws only). The official encoder draws separate
  embedding-dropout masks for the queries, the keys and the values; here the keys and values
  share one.
- Not differences, but easy to miss: the official audio/vision/text encoders all use the text's
  attention dropout (its per-modality choice is computed and then ignored), and the Perceiver and
  hyper-modality cross-attentions over a single context vector (C_m, E_x) reduce to a projection
  of that vector (a softmax over one key is 1), so their query projections, query LayerNorms
  and key projections never receive a gradient. Both are kept.
- Training loop (not model settings): the official code re-creates AdamW every epoch (resetting
  Adam's moments), clips gradient VALUES at 0.8 and selects on the validation loss; msakit builds
  AdamW once, clips no gradients for HME and selects on validation MAE (hme.yaml). The official
  AdamW is transformers' (eps 1e-8), w <- (1 - lr wd) (w - lr m^ / (sqrt(v^) + eps / c_t)) with
  c_t = sqrt(1 - b2^t); torch's, here, decays before the step and adds eps itself, so the
  official eps is larger by 1 / c_t (about 32x at each epoch's first step and still 4x at its
  64th, as the moments restart every epoch) and no constant `training.adam_eps` matches it.
  Weight decay spares every parameter named `bias` or `LayerNorm.weight`: BERT's biases and
  LayerNorm parameters (as msakit's default) and the model's own biases (norm biases included);
  `decay_norms_and_biases: true` decays the model's own norm gains, as the official code does,
  and its biases too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msakit.data.schema import MODALITIES, Batch, FeatureDims
from msakit.errors import MsakitError
from msakit.models.base import (
    FLAG,
    POSITIVE,
    RATE,
    SIZE,
    WEIGHT,
    ModelConfig,
    MSAModel,
    Output,
    Rule,
    one_of,
    setting,
)
from msakit.models.layers.attention import multi_head_attention
from msakit.models.layers.neighbours import DEFAULT_BLOCK, masked_topk, similarity_blocks
from msakit.models.layers.pooling import masked_max
from msakit.models.layers.text import TextEncoder
from msakit.models.layers.transformer import CrossModalEncoder
from msakit.models.registry import register_model

RETRIEVALS = ("bank", "batch")
ENCODER_ATTENTIONS = ("input", "self")
FALLBACKS = ("candidates", "all")
GATES = ("log", "multiply")
COSINE = Rule("a cosine in [-1, 1]", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
              and -1 <= v <= 1)
PAIRS = {"text": ("audio", "vision"), "audio": ("text", "vision"), "vision": ("text", "audio")}


@dataclass
class HMEConfig(ModelConfig):
    """HME's settings; the defaults are the official MOSI command (README, HME_main.py)."""

    hidden: int = setting(192, SIZE, divisible_by="heads")  # d_l
    heads: int = setting(16, SIZE)  # num_heads, used by every attention
    encoder_layers: int = setting(4, SIZE)  # layers: 4 MOSI, 2 MOSEI
    attn_dropout: float = setting(0.5, RATE)
    relu_dropout: float = setting(0.3, RATE)
    res_dropout: float = setting(0.3, RATE)
    embed_dropout: float = setting(0.2, RATE)
    num_latents: int = setting(5, SIZE)
    latent_layers: int = setting(4, SIZE)  # 4 MOSI, 3 MOSEI
    hyper_depth: int = setting(3, SIZE)
    gate_dropout: float = setting(0.3, RATE)  # inside the uncertainty-aware fusion MLPs
    # nn.TransformerEncoderLayer's default, which the official code keeps
    fusion_ffn: int = setting(2048, SIZE)
    dropout: float = setting(0.1, RATE)  # fusion transformer and output MLP
    similarity_threshold: float = setting(0.6, COSINE)
    uncertainty_lower: float = setting(0.2, POSITIVE, at_most="uncertainty_upper")  # uncertainty_LB
    uncertainty_upper: float = setting(1.0, POSITIVE)  # uncertainty_UB
    unimodal_weight: float = setting(0.8, WEIGHT)
    kl_weight: float = setting(0.01, WEIGHT)
    # bank (training-set memory bank) | batch (the official in-batch rule)
    retrieval: str = setting("bank", one_of(*RETRIEVALS))
    # neighbours kept per query; null = every one above the threshold
    retrieval_k: int | None = setting(32, SIZE.or_null())
    refresh_every: int = setting(1, SIZE)  # epochs between memory-bank refreshes
    retrieval_block: int = setting(DEFAULT_BLOCK, SIZE)  # query rows per block of the bank search
    # the official behaviour of each switch is in the class docstring's list of differences
    # input (official: keys/values = the embedded input) | self
    encoder_attention: str = setting("input", one_of(*ENCODER_ATTENTIONS))
    # true: a sample missing m is an ordinary query and candidate
    retrieve_missing: bool = setting(False, FLAG)
    # candidates | all (official: the whole batch)
    retrieval_fallback: str = setting("candidates", one_of(*FALLBACKS))
    position_zero_steps: bool = setting(True, FLAG)  # false: zero (missing) steps get no position (official)
    uncertainty_gate: str = setting("log", one_of(*GATES))  # log | multiply (official)
    sample_at_eval: bool = setting(False, FLAG)  # true: the bottleneck samples at test time too (official)


def id_hashes(ids: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
    """(B,) int64 stable hashes of sample ids: how a query recognises itself in a memory bank."""
    values = [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little", signed=True)
              for i in ids]
    return torch.tensor(values, dtype=torch.long, device=device)


def retrieve(
    queries: torch.Tensor,
    query_ids: torch.Tensor,
    query_present: torch.Tensor,
    keys: torch.Tensor,
    key_ids: torch.Tensor,
    key_present: torch.Tensor,
    threshold: float,
    k: int | None,
    block_size: int = DEFAULT_BLOCK,
    fallback_all: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What each query retrieves from `keys` (N, D): (means (Q, D), counts (Q,)).

    A key is a candidate for a query when `key_present` and its id differs from the query's. The
    retrieved keys are the `k` most cosine-similar candidates (all of them for k=None) with
    similarity >= `threshold`, and the mean is theirs. A query retrieving nothing, or one whose
    `query_present` is False, gets the mean of all its candidates instead, and count 0. With
    `fallback_all` (the official rule) that mean is over every key that is not zero, the query
    included (the official test for a zero vector: its sum is 0).
    """
    means, counts = [], []
    for rows, scores in similarity_blocks(queries, keys, block_size):
        candidates = key_present.unsqueeze(0) & (query_ids[rows].unsqueeze(1) != key_ids.unsqueeze(0))
        if k is None:
            weights = (candidates & (scores >= threshold)).to(keys.dtype)
            found = weights @ keys
        else:
            index, values = masked_topk(scores, candidates, k)
            weights = ((index >= 0) & (values >= threshold)).to(keys.dtype)  # NaN compares False
            found = (keys[index.clamp(min=0)] * weights.unsqueeze(-1)).sum(1)
        count = weights.sum(1) * query_present[rows].to(keys.dtype)
        every = ((keys.sum(-1) != 0).expand_as(candidates) if fallback_all else candidates).to(keys.dtype)
        fallback = every @ keys / every.sum(1, keepdim=True).clamp(min=1)
        mean = found / weights.sum(1, keepdim=True).clamp(min=1)
        means.append(torch.where((count > 0).unsqueeze(1), mean, fallback))
        counts.append(count)
    return torch.cat(means), torch.cat(counts)


class Attention(nn.Module):
    """Multi-head attention of queries (B, Lq, d) over a context (B, Lk, d); no q/k/v biases."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k, v = self.to_kv(context).chunk(2, dim=-1)
        return self.to_out(multi_head_attention(self.to_q(x), k, v, self.heads))


class GEGLUFeedForward(nn.Module):
    """LayerNorm, then d -> 8d, GELU-gated to 4d, -> d (the Perceiver's feed-forward)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 8 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.up(self.norm(x)).chunk(2, dim=-1)
        return self.down(value * F.gelu(gate))


class CrossBlock(nn.Module):
    """x <- x + Attn(LN(x), LN(context)); x <- x + FF(x)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x), self.context_norm(context))
        return x + self.ff(x)


class SelfBlock(nn.Module):
    """x <- x + Attn(LN(x), LN(x)); x <- x + FF(x)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm(x)
        x = x + self.attn(normed, normed)
        return x + self.ff(x)


class LatentEnhancer(nn.Module):
    """Perceiver-style: learned latents read a context (B, n, d), then attend among themselves;
    the mean over latents, LayerNorm -> (B, d)."""

    def __init__(self, dim: int, heads: int, num_latents: int, depth: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.cross = nn.ModuleList(CrossBlock(dim, heads) for _ in range(depth))
        self.self_blocks = nn.ModuleList(SelfBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        x = self.latents.expand(context.shape[0], -1, -1)
        for cross, self_block in zip(self.cross, self.self_blocks, strict=True):
            x = self_block(cross(x, context))
        return self.norm(x.mean(dim=1))


class HyperCross(nn.Module):
    """A query vector (B, d) reads a context (B, n, d) through `depth` cross blocks -> (B, d)."""

    def __init__(self, dim: int, heads: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CrossBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = query.unsqueeze(1)
        for block in self.blocks:
            x = block(x, context)
        return self.norm(x.squeeze(1))


class Bottleneck(nn.Module):
    """Variational information bottleneck: (mu, sigma, Z, unimodal prediction, KL) of a (B, d) input."""

    def __init__(self, dim: int, sample_at_eval: bool = False) -> None:
        super().__init__()
        self.sample_at_eval = sample_at_eval
        self.encode = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.ReLU(),
            nn.Linear(2 * dim, 2 * dim), nn.ReLU(),
            nn.Linear(2 * dim, 2 * dim),
        )
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, s = self.encode(x).chunk(2, dim=-1)
        sigma = F.softplus(s - 5.0)
        z = mu + torch.randn_like(sigma) * sigma if self.training or self.sample_at_eval else mu
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 2 * sigma.log() - 1).mean()
        return sigma, z, self.head(z).squeeze(-1), kl


def _gate_mlp(inputs: int, dim: int, outputs: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(inputs * dim, dim), nn.Dropout(dropout), nn.ReLU(), nn.Linear(dim, outputs)
    )


class UncertaintyGate(nn.Module):
    """S = a_0 H + a_1 Z, (a_0, a_1) = softmax(logits / sqrt(d) + (0, log w)),
    w = clamp(1 / mean(sigma), lower, upper): the more uncertain Z, the more weight on H.
    rule "multiply" (official): (a_0, a_1) = softmax((logit_0, w logit_1) / sqrt(d))."""

    def __init__(self, dim: int, lower: float, upper: float, dropout: float, rule: str = "log") -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.lower, self.upper = lower, upper
        self.rule = rule
        self.mlp = _gate_mlp(2, dim, 2, dropout)

    def weights(self, original: torch.Tensor, enhanced: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """(B, 2) softmax weights of (original, enhanced)."""
        certainty = (1.0 / (sigma.mean(dim=1) + 1e-8)).clamp(self.lower, self.upper)
        logits = self.mlp(torch.cat([original, enhanced], dim=-1))
        if self.rule == "multiply":
            factor = torch.stack([torch.ones_like(certainty), certainty], dim=1)
            return (logits * factor * self.scale).softmax(dim=1)
        shift = torch.stack([torch.zeros_like(certainty), certainty.log()], dim=1)
        return (logits * self.scale + shift).softmax(dim=1)

    def forward(self, original: torch.Tensor, enhanced: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        a = self.weights(original, enhanced, sigma)
        return a[:, :1] * original + a[:, 1:] * enhanced


class HyperFusion(nn.Module):
    """S_H = sum_m a_m Z_m, a = softmax(MLP([Z_l; Z_a; Z_v]) * softmax_m(1 / mean sigma_m) / sqrt(d))."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.mlp = _gate_mlp(3, dim, 3, dropout)

    def forward(self, encodings: list[torch.Tensor], sigmas: list[torch.Tensor]) -> torch.Tensor:
        certainty = torch.stack([1.0 / (s.mean(dim=1) + 1e-8) for s in sigmas], dim=1).softmax(dim=1)
        logits = self.mlp(torch.cat(encodings, dim=-1)) * certainty * self.scale
        return (logits.softmax(dim=1).unsqueeze(-1) * torch.stack(encodings, dim=1)).sum(1)


@register_model("hme")
class HME(MSAModel):
    """Cross-sample enhancement, hyper-modalities, bottlenecks and uncertainty-aware fusion."""

    config_class = HMEConfig
    aligned_input = True  # the official code reads aligned_{mosi,mosei}.pkl only

    def __init__(self, config: HMEConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        d, heads = config.hidden, config.heads
        self.text_encoder = TextEncoder(config, dims)
        widths = {"text": self.text_encoder.out_dim, "audio": dims.audio, "vision": dims.vision}
        self.project = nn.ModuleDict({m: nn.Linear(widths[m], d, bias=False) for m in MODALITIES})
        self.encoders = nn.ModuleDict({
            m: CrossModalEncoder(d, heads, config.encoder_layers, config.attn_dropout, config.relu_dropout,
                                 config.res_dropout, config.embed_dropout, first_position=1,
                                 position_zero_steps=config.position_zero_steps)
            for m in MODALITIES
        })
        enhancer = (heads, config.num_latents, config.latent_layers)
        self.enhancers = nn.ModuleDict({m: LatentEnhancer(d, *enhancer) for m in MODALITIES})
        self.shared_enhancer = LatentEnhancer(d, *enhancer)
        self.pair_hyper = nn.ModuleDict({
            f"{m}_{x}": HyperCross(d, heads, config.hyper_depth) for m in MODALITIES for x in PAIRS[m]
        })
        self.hyper = nn.ModuleDict({m: HyperCross(d, heads, config.hyper_depth) for m in MODALITIES})
        self.bottlenecks = nn.ModuleDict({m: Bottleneck(d, config.sample_at_eval) for m in MODALITIES})
        self.gates = nn.ModuleDict({
            m: UncertaintyGate(d, config.uncertainty_lower, config.uncertainty_upper, config.gate_dropout,
                               config.uncertainty_gate)
            for m in MODALITIES
        })
        self.hyper_fusion = HyperFusion(d, config.gate_dropout)
        layer = nn.TransformerEncoderLayer(d, heads, config.fusion_ffn, config.dropout, batch_first=True)
        self.fusion = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Sequential(
            nn.Linear(4 * d, 2 * d), nn.Dropout(config.dropout), nn.ReLU(), nn.Linear(2 * d, 1)
        )
        # the memory bank of training-set representations: buffers, so a checkpoint carries it
        self.register_buffer("bank", torch.zeros(len(MODALITIES), 0, d))  # (3, N, d) H_m
        self.register_buffer("bank_present", torch.zeros(len(MODALITIES), 0, dtype=torch.bool))
        self.register_buffer("bank_ids", torch.zeros(0, dtype=torch.long))  # id hashes
        self.register_load_state_dict_pre_hook(self._fit_bank_to_state)

    def _fit_bank_to_state(self, module: nn.Module, state: dict, prefix: str, *args: object) -> None:
        """Resize the bank buffers to a stored bank before loading it (their size is the split's)."""
        for name in ("bank", "bank_present", "bank_ids"):
            stored = state.get(prefix + name)
            current = getattr(self, name)
            if isinstance(stored, torch.Tensor) and stored.shape != current.shape:
                setattr(self, name, torch.empty(stored.shape, dtype=current.dtype, device=current.device))

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(H (B, 3, d) pooled per-modality representations, present (B, 3))."""
        text, text_mask = self.text_encoder(batch)
        inputs = {"text": (text, text_mask), "audio": (batch.audio, batch.audio_mask),
                  "vision": (batch.vision, batch.vision_mask)}
        pooled, present = [], []
        for column, m in enumerate(MODALITIES):
            x, mask = inputs[m]
            available = batch.presence[:, column]
            # as in the official code a missing modality is zeroed whole, and still encoded
            x = self.project[m](x.masked_fill(~(mask & available.unsqueeze(1)).unsqueeze(-1), 0.0))
            # "input": the embedded input is every layer's keys and values (the official l2l(x, x, x))
            source = (x, mask) if self.config.encoder_attention == "input" else ()
            pooled.append(masked_max(self.encoders[m](x, mask, *source), mask))
            present.append(available & mask.any(dim=1))
        return torch.stack(pooled, dim=1), torch.stack(present, dim=1)

    def retrieved(self, h: torch.Tensor, present: torch.Tensor, ids: Sequence[str]) -> torch.Tensor:
        """C (B, 3, d): per modality, the mean of the similar samples' representations."""
        cfg = self.config
        query_ids = id_hashes(ids, h.device)
        use_bank = cfg.retrieval == "bank" and self.bank.shape[1] > 0
        out = []
        if cfg.retrieve_missing:  # the official rule: presence plays no part in retrieval
            present = torch.ones_like(present)
        for column in range(len(MODALITIES)):
            if use_bank:
                keys, key_ids, key_present = self.bank[column], self.bank_ids, self.bank_present[column]
                if cfg.retrieve_missing:
                    key_present = torch.ones_like(key_present)
            else:
                keys, key_ids, key_present = h[:, column], query_ids, present[:, column]
            means, _ = retrieve(h[:, column], query_ids, present[:, column], keys, key_ids, key_present,
                                cfg.similarity_threshold, cfg.retrieval_k, cfg.retrieval_block,
                                fallback_all=cfg.retrieval_fallback == "all")
            out.append(means)
        return torch.stack(out, dim=1)

    def forward(self, batch: Batch) -> Output:
        h, present = self.encode(batch)
        c = self.retrieved(h, present, batch.ids)
        e = {m: self.enhancers[m](c[:, i : i + 1]) for i, m in enumerate(MODALITIES)}
        shared = self.shared_enhancer(h)
        sigmas, encodings, unimodal, kls, fused = [], [], [], [], []
        for i, m in enumerate(MODALITIES):
            pairs = [self.pair_hyper[f"{m}_{x}"](e[m], e[x].unsqueeze(1)) for x in PAIRS[m]]
            hyper = self.hyper[m](shared, torch.stack(pairs, dim=1))
            sigma, z, pred_m, kl = self.bottlenecks[m](hyper)
            sigmas.append(sigma)
            encodings.append(z)
            unimodal.append(pred_m)
            kls.append(kl)
            fused.append(self.gates[m](h[:, i], z, sigma))
        tokens = torch.stack([*fused, self.hyper_fusion(encodings, sigmas)], dim=1)
        pred = self.head(self.fusion(tokens).flatten(1)).squeeze(-1)
        features = {"fused": tokens.flatten(1), "unimodal": torch.stack(unimodal, dim=1)}
        if not self.training:
            return Output(pred=pred, features=features)
        cfg = self.config
        unimodal_l1 = torch.stack([F.l1_loss(p, batch.labels) for p in unimodal]).mean()
        losses = {
            "unimodal": cfg.unimodal_weight * unimodal_l1,
            "kl": cfg.kl_weight * torch.stack(kls).mean(),
        }
        return Output(pred=pred, losses=losses, features=features)

    @torch.no_grad()
    def refresh_bank(self, batches: Iterator[Batch]) -> None:
        """Recompute the memory bank over a whole split (eval mode, no gradient)."""
        was_training = self.training
        self.eval()
        reps, present, ids = [], [], []
        for batch in batches:
            h, p = self.encode(batch)
            reps.append(h)
            present.append(p)
            ids.extend(batch.ids)
        self.train(was_training)
        if not reps:
            raise MsakitError("hme: the training split is empty; no memory bank can be built from it")
        self.bank = torch.cat(reps).transpose(0, 1).contiguous()
        self.bank_present = torch.cat(present).T.contiguous()
        self.bank_ids = id_hashes(ids, self.bank.device)

    def on_train_epoch_start(self, epoch: int, train_batches: Callable[[], Iterator[Batch]]) -> None:
        """Build the memory bank before the first epoch (from the untrained model)."""
        if self.config.retrieval == "bank" and epoch == 1:
            self.refresh_bank(train_batches())

    def on_train_epoch_end(self, epoch: int, train_batches: Callable[[], Iterator[Batch]]) -> None:
        """Refresh the memory bank after epochs K, 2K, ... (K = refresh_every), before validation:
        validation and the checkpoint then hold the bank of their own weights, and the next
        epochs train with it."""
        if self.config.retrieval == "bank" and epoch % self.config.refresh_every == 0:
            self.refresh_bank(train_batches())

