"""LNLN: Language-dominated Noise-resistant Learning Network (Zhang, Wang and Yu, "Towards Robust
Multimodal Sentiment Analysis with Incomplete Data", NeurIPS 2024; official code Haoyu-ha/LNLN).

Notation of the paper (Sec. 3); every sequence below is (B, 8, d) with d = 128 unless noted.

1. Embedding (Sec. 3.2): per modality m, a linear map to d, then a transformer with 8 learnable
   extra tokens prepended; the 8 token outputs are kept:  H1_m = E_m([H0_m; W_m X_m])[:8].
2. Dominant Modality Correction (Sec. 3.3):
   - completeness check: a transformer with one extra token over H1_l, then 128-64-1 + sigmoid:
       w = sigmoid(MLP(T_cc([H_cc; H1_l])[0]))        trained by  L_cc = MSE(w, 1 - r_l)
     where r_l is the fraction of the sample's text tokens that were dropped;
   - proxy dominant feature generator: a transformer over [H0_p; H1_a; H1_v] (its own 8 extra tokens
     are its output):  H1_p = T_p([H0_p; H1_a; H1_v])[:8]
   - corrected language:  H1_d = (1 - w) H1_p + w H1_l
   - effectiveness discriminator D (128-64-2) tells H1_d from the language tokens of the CLEAN input,
     token by token: L_adv = CE(D(H1_d), 1) + CE(D(H1_l_clean), 0), with gradient reversal (below).
3. Dominant-modality-based multimodal learning (Sec. 3.4):
   - a language transformer keeps its hidden states H1_d, H2_d, H3_d (depth 2);
   - the hyper-modality learner updates a learned H0_hyper, one layer per language state:
       H^i_hyper = LN(H^(i-1)_hyper) + W_o (Attn(q=H^i_d, kv=H1_a) + Attn(q=H^i_d, kv=H1_v))
   - a cross transformer (H3_d queries H_hyper; depth 2 for MOSI, 4 for MOSEI/SIMS), mean of its
     outputs (its extra token excluded), Linear(d -> 1):  y_hat.
4. Reconstructor (Sec. 3.5): per modality a transformer (depth 2) maps the noisy H1_m towards the
   clean H1_m:  L_rec = MSE([R_a(H1_a); R_v(H1_v); R_l(H1_l)], [H1_a; H1_v; H1_l]_clean).
5. Loss: L = alpha L_cc + beta L_adv + gamma L_rec + L_sp, L_sp = MSE(y_hat, y); the published
   weights are alpha 0.9, beta 0.8 (SIMS 0.6), gamma 0.1 (`configs/lnln.yaml`).

The clean-input targets (discriminator, reconstructor) need the clean version of each noisy batch:
the trainer attaches it as `batch.clean` (this class sets `needs_clean_input`), so no second read
of the data is needed. Without `batch.clean` (evaluation, prediction) only y_hat is computed.

Where the paper and the official code differ, and what is followed here:
- Gradient reversal. The adversarial game of Sec. 3.3 trains D to separate corrected from clean
  language tokens and the correction to defeat it. The official code puts the reversal layer on
  H1_p itself, before the weighted mix, so EVERY loss downstream, the sentiment loss included,
  reaches the proxy generator with its sign flipped, and D's gradient reaches the language
  embedding un-reversed. `gradient_reversal: proxy` (the default, so that the published settings
  mean what they meant) does exactly that; `gradient_reversal: discriminator` puts the reversal
  where a domain-adversarial objective has it: in front of D, on both of D's inputs.
- Reconstructor target. The paper speaks of reconstructing the complete data; the official code
  reconstructs the clean input's embedded tokens H1_m, produced by the same, trainable embedding
  (no stop-gradient on the target). That is followed.
- Completeness target. The official code regresses w on the missing rate r it SAMPLED for the
  sample; here the target is the fraction actually dropped, read from the batch's masks (it is
  what the checker can observe, and it is also right for evaluation protocols and hand-made
  masks). The two differ by the binomial noise of the draw.
- Padding. The official transformers attend to padded frames and padded text states; here padded
  positions are masked out of every attention, so padding cannot change a prediction. Frames that
  a protocol DROPPED stay visible (as zeros), as in the paper.
- The completeness checker's output keeps its batch dimension for a batch of one (the official
  `.squeeze()` drops it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.data.tokens import BERT_SPECIAL_IDS
from msakit.missing.masks import droppable_positions
from msakit.models.base import SIZE, WEIGHT, ModelConfig, MSAModel, Output, one_of, setting
from msakit.models.layers.prenorm import CrossTransformer, HyperLayer, TokenTransformer, widths_of
from msakit.models.layers.text import TextEncoder, special_token_ids
from msakit.models.registry import register_model

REVERSAL_PLACES = ("proxy", "discriminator")


@dataclass
class LNLNConfig(ModelConfig):
    """LNLN's settings; the defaults are the official MOSI configuration (configs/train_mosi.yaml)."""

    hidden_dim: int = setting(128, SIZE, divisible_by="heads")  # d, the width of every token
    num_tokens: int = setting(8, SIZE)  # extra tokens kept per modality
    heads: int = setting(8, SIZE)
    # per-head width of the transformers (inner width heads * dim_head = 512)
    dim_head: int = setting(64, SIZE)
    mlp_dim: int = setting(128, SIZE)  # feed-forward width of every transformer block
    embed_depth: int = setting(2, SIZE)  # embedding transformers (text, audio, vision)
    checker_depth: int = setting(2, SIZE)  # completeness checker
    proxy_depth: int = setting(2, SIZE)  # proxy dominant feature generator
    reconstructor_depth: int = setting(2, SIZE)
    language_depth: int = setting(2, SIZE)  # the hyper-modality learner has language_depth + 1 layers
    fusion_depth: int = setting(2, SIZE)  # cross transformer: 2 for MOSI, 4 for MOSEI and SIMS
    discriminator_hidden: int = setting(64, SIZE)
    checker_hidden: int = setting(64, SIZE)
    completeness_weight: float = setting(0.9, WEIGHT)  # alpha
    adversarial_weight: float = setting(0.8, WEIGHT)  # beta (SIMS: 0.6)
    reconstruction_weight: float = setting(0.1, WEIGHT)  # gamma
    # "proxy" (official code) or "discriminator"
    gradient_reversal: str = setting("proxy", one_of(*REVERSAL_PLACES))
    reversal_strength: float = setting(1.0, WEIGHT)  # the reversed gradient is scaled by this


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Identity forward; the gradient passes backwards multiplied by -strength."""
    return _ReverseGradient.apply(x, strength)


def _mlp(dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, out))


@register_model("lnln")
class LNLN(MSAModel):
    """Language-dominated Noise-resistant Learning Network: corrects language, then fuses around it."""

    config_class = LNLNConfig
    needs_clean_input = True

    def __init__(self, config: LNLNConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        d, n = config.hidden_dim, config.num_tokens
        self.text_encoder = TextEncoder(config, dims)
        self.special_ids = special_token_ids(config).get("special_ids", BERT_SPECIAL_IDS)
        widths = {"text": self.text_encoder.out_dim, "audio": dims.audio, "vision": dims.vision}
        lengths = {"text": dims.text_len, "audio": dims.audio_len, "vision": dims.vision_len}
        self.project = nn.ModuleDict({m: nn.Linear(w, d) for m, w in widths.items()})
        self.embed = nn.ModuleDict({
            m: TokenTransformer(lengths[m], n, config.embed_depth, **widths_of(config)) for m in widths
        })
        self.checker = TokenTransformer(n, 1, config.checker_depth, **widths_of(config))
        self.checker_head = nn.Sequential(_mlp(d, config.checker_hidden, 1), nn.Sigmoid())
        self.proxy_init = nn.Parameter(torch.ones(1, n, d))
        self.proxy = TokenTransformer(3 * n, n, config.proxy_depth, **widths_of(config))
        self.discriminator = _mlp(d, config.discriminator_hidden, 2)
        self.language = TokenTransformer(n, 0, config.language_depth, **widths_of(config))
        self.hyper_init = nn.Parameter(torch.ones(1, n, d))
        self.hyper = nn.ModuleList(HyperLayer(d, config.heads) for _ in range(config.language_depth + 1))
        self.fusion = CrossTransformer(n, config.fusion_depth, **widths_of(config))
        self.head = nn.Linear(d, 1)
        self.reconstruct = nn.ModuleDict({
            m: TokenTransformer(n, 0, config.reconstructor_depth, **widths_of(config)) for m in widths
        })

    def embed_one(self, modality: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """H1_m (B, num_tokens, d) of one modality's (B, L, D_m) sequence."""
        n = self.config.num_tokens
        if mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # whatever padding holds must not reach a key
        return self.embed[modality](self.project[modality](x), mask, keep=n)[-1]

    def embed_tokens(self, batch: Batch) -> dict[str, torch.Tensor]:
        """H1_m (B, num_tokens, d) for text, audio and vision."""
        text, text_mask = self.text_encoder(batch)
        return {
            "text": self.embed_one("text", text, text_mask),
            "audio": self.embed_one("audio", batch.audio, batch.audio_mask),
            "vision": self.embed_one("vision", batch.vision, batch.vision_mask),
        }

    def clean_tokens(self, batch: Batch, noisy: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """H1_m of `batch.clean`. Audio and vision are embedded again only for the samples that
        lost frames: their embedding is deterministic, so the others' noisy H1_m already is the
        clean one. Text always goes through the encoder again (its dropout makes it stochastic)."""
        clean = batch.clean
        text, text_mask = self.text_encoder(clean)
        out = {"text": self.embed_one("text", text, text_mask)}
        for m in ("audio", "vision"):
            dropped = batch.dropped.get(m)
            rows = None if dropped is None else dropped.any(1).nonzero().squeeze(1)
            if rows is None or rows.numel() == 0:
                out[m] = noisy[m]
                continue
            x, mask = getattr(clean, m), getattr(clean, f"{m}_mask")
            again = self.embed_one(m, x[rows], None if mask is None else mask[rows])
            out[m] = noisy[m].index_put((rows,), again)
        return out

    def text_completeness(self, batch: Batch) -> torch.Tensor:
        """(B,) 1 - the fraction of each sample's droppable text tokens that were dropped; 0 where
        the whole text is marked absent (`presence`), 1 where nothing could be dropped."""
        reference = batch.clean if batch.clean is not None else batch
        droppable = droppable_positions(reference, "text", self.special_ids)
        kept = torch.ones(droppable.shape[0], device=droppable.device)
        dropped = batch.dropped.get("text")
        if dropped is not None:
            lost = (dropped & droppable).sum(1).float()
            kept = kept - lost / droppable.sum(1).clamp(min=1).float()
        return kept * batch.presence[:, 0].to(kept)

    def forward(self, batch: Batch) -> Output:
        cfg = self.config
        n = cfg.num_tokens
        h1 = self.embed_tokens(batch)
        batch_size = h1["text"].shape[0]

        checked = self.checker(h1["text"], keep=1)[-1][:, 0]
        w = self.checker_head(checked)  # (B, 1)
        proxy_in = torch.cat([self.proxy_init.expand(batch_size, -1, -1), h1["audio"], h1["vision"]], 1)
        h1_p = self.proxy(proxy_in, keep=n)[-1]
        if cfg.gradient_reversal == "proxy":
            h1_p = reverse_gradient(h1_p, cfg.reversal_strength)
        h1_d = (1 - w).unsqueeze(-1) * h1_p + w.unsqueeze(-1) * h1["text"]

        language_states = self.language(h1_d)
        hyper = self.hyper_init.expand(batch_size, -1, -1)
        for layer, state in zip(self.hyper, language_states, strict=True):
            hyper = layer(state, h1["audio"], h1["vision"], hyper)
        fused = self.fusion(hyper, language_states[-1])[:, 1:].mean(1)
        pred = self.head(fused).squeeze(-1)

        features = {"fused": fused, "completeness": w.squeeze(-1)}
        if not self.training or batch.clean is None:
            return Output(pred=pred, features=features)
        return Output(pred=pred, losses=self._auxiliary_losses(batch, h1, h1_d, w), features=features)

    def _auxiliary_losses(
        self, batch: Batch, h1: dict[str, torch.Tensor], h1_d: torch.Tensor, w: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        clean = self.clean_tokens(batch, h1)
        completeness = F.mse_loss(w.squeeze(-1), self.text_completeness(batch))

        judged = torch.cat([h1_d, clean["text"]], dim=0)
        if cfg.gradient_reversal == "discriminator":
            judged = reverse_gradient(judged, cfg.reversal_strength)
        logits = self.discriminator(judged)
        # 1 = corrected (from noisy input), 0 = clean language, for every token
        truth = torch.cat([torch.ones(h1_d.shape[:2]), torch.zeros(h1_d.shape[:2])]).long()
        adversarial = F.cross_entropy(logits.flatten(0, 1), truth.flatten().to(logits.device))

        order = ("audio", "vision", "text")
        rebuilt = torch.cat([self.reconstruct[m](h1[m])[-1] for m in order], dim=1)
        target = torch.cat([clean[m] for m in order], dim=1)
        reconstruction = F.mse_loss(rebuilt, target)
        return {
            "completeness": cfg.completeness_weight * completeness,
            "adversarial": cfg.adversarial_weight * adversarial,
            "reconstruction": cfg.reconstruction_weight * reconstruction,
        }
