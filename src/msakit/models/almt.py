"""ALMT: Adaptive Language-guided Multimodal Transformer (Zhang, Xu, Wang, Zhou and Yu, "Learning
Language-guided Adaptive Hyper-modality Representation for Multimodal Sentiment Analysis", EMNLP
2023; official code Haoyu-ha/ALMT @ da94610, ported to MMSA as models/singleTask/ALMT.py @ a94e65d).

Notation of the paper (Sec. 3); every sequence below is (B, T, d) with T = 8 tokens and d = 128.

1. Modality embedding: per modality m in {l, a, v}, a linear map to d, then a transformer (depth 1)
   with T learnable extra tokens prepended; their T outputs are kept:
       H1_m = E_m([H0_m; W_m X_m])[:T]
2. Adaptive Hyper-modality Learning (AHL, Sec. 3.2): a language transformer of depth K - 1 keeps its
   hidden states H1_l, ..., HK_l (its input with positions added first; K = 3); a learned
   H0_hyper (initialised to ones) is updated once per language state, language as the query:
       Hi_hyper = LN(H(i-1)_hyper) + W_o (softmax(Q K_a^T / sqrt(d_h)) V_a + softmax(Q K_v^T / sqrt(d_h)) V_v)
       Q = LN(Hi_l) W_q,   K_m = LN(H1_m) W_k^m,   V_m = LN(H1_m) W_v^m   (m in {a, v}, 8 heads, d_h = 16)
   so the hyper-modality reads audio and vision only through attention weights that the language
   chooses.
3. Multimodal fusion (Sec. 3.3): a cross transformer (depth 2 for MOSI, 4 for MOSEI and SIMS) in
   which the last language state HK_l queries H_hyper, one shared extra token prepended to both
   and learned positions added; the extra token's output, through Linear(d -> 1), is y_hat.
4. Loss: MSE(y_hat, y) only (`training.loss: mse`); ALMT has no auxiliary loss.

Which implementation the published numbers came from: the authors' first release. The paper's
tables (EMNLP 2023), which later papers cite for ALMT, were made with the authors' code
(Haoyu-ha/ALMT; its README up to commit 242261e names PyTorch 1.11 as the paper's environment) a
year before MMSA's port (added October 2024, MMSA commit e2c097e). The authors' code exists in two
releases with the same network: the first (2023; last commit 242261e) cut audio and vision to 50
frames (from each clip's first frame that is not all zeros) before the model and built every
embedding's positions for 50 steps; the 2025 re-release (0392903 "fix issues", then da94610) feeds
every frame (MOSI: 375 audio, 500 vision). MMSA's port is the 2025 network: the same modules and
settings (config_regression.json "almt" repeats the official widths and depths; its hyper-modality
head width, 128 / 8, is the official `ahl_dim_head` 16), every frame fed. So the dataset sections
of the YAML set `max_frames: 50` (the input that produced the published numbers; msakit keeps each
clip's first 50 frames, the same unless a clip opens with all-zero frames), and
`--set model.max_frames=null` gives the 2025 release's and MMSA's input. benchmarks/parity/almt.py checks
msakit against the 2025 code and MMSA's port (every frame) and against the first release
(`max_frames: 50`): they agree to float32 rounding. The official and MMSA trainers differ: the
official train.py runs 200 epochs and reports each metric from its best TEST epoch; MMSA stops
after 32 epochs without a lower validation loss. The YAML follows the official recipe (200 epochs,
no early stop, warm-up then cosine), with checkpoints chosen on validation (below).

Deviations from the official code, each with its reason:
- Padding. The official transformers attend to padded frames and to the text encoder's states at
  padded tokens; here padded positions are masked out of the embedding transformers' attention
  (and zeroed, so that what padding holds never reaches a key), so padding cannot change a
  prediction. Frames that a missing-data protocol DROPPED stay visible (as zeros), as they would be
  in the official code. `mask_padding: false` restores the official behaviour (and then needs
  sequences no longer than the lengths the model was built for).
- Selection. The official code keeps, for each metric, the epoch that scored best on the test
  split (README, note 4); msakit chooses checkpoints on validation (`training.select_metric`).
  `msakit train --reproduce` reports each metric from its own checkpoint, chosen on validation
  (the YAML's `reproduce:` section).
- Schedule. The official scheduler steps once per epoch (linear warm-up over the first 10% of the
  epochs, starting at a learning rate of 0 for the first epoch, then cosine to 0 over the other
  90%); msakit's steps per batch: the same curve at a finer grain.
- Weight decay. The official AdamW decays every parameter; here biases and norms of ALMT decay too
  (`decay_norms_and_biases: true`), and in the dataset settings those of the text encoder as well
  (`encoder_decay_norms_and_biases: true`; the synthetic settings leave them undecayed).
- Text width and positions. The text width is the encoder's (the official code reads it from its
  config, 768 for BERT-base); the embedding transformers' positions are built for the data's
  padded lengths (audio and vision cut to `max_frames`): the 2025 configs' input lengths, which
  equal them for the MMSA pickles. The first release built 50 text positions whatever the text
  length (SIMS has 39 tokens: 11 position rows that no input reaches are left out here).
- Text encoder. The official code fine-tunes bert-base-uncased (SIMS: bert-base-chinese); msakit's
  default is the packaged MiniLM (`--set model.text_encoder=PATH` for any BERT folder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.models.base import FLAG, SIZE, ModelConfig, MSAModel, Output, setting
from msakit.models.layers.prenorm import CrossTransformer, HyperLayer, TokenTransformer, widths_of
from msakit.models.layers.text import TextEncoder
from msakit.models.registry import register_model


@dataclass
class ALMTConfig(ModelConfig):
    """ALMT's settings; the defaults are the official MOSI configuration (configs/mosi.yaml)."""

    hidden_dim: int = setting(128, SIZE, divisible_by="heads")  # d, the width of every token
    num_tokens: int = setting(8, SIZE)  # T, extra tokens kept per modality
    heads: int = setting(8, SIZE)  # every transformer's and the hyper-modality layers'
    # per-head width of the embedding, language and fusion transformers (inside: heads x dim_head)
    dim_head: int = setting(64, SIZE)
    hyper_dim_head: int = setting(16, SIZE)  # per-head width of the hyper-modality layers
    mlp_dim: int = setting(128, SIZE)  # feed-forward width of every transformer block
    embed_depth: int = setting(1, SIZE)  # the embedding transformers (text, audio, vision)
    hyper_depth: int = setting(3, SIZE)  # K hyper-modality layers; the language transformer has K - 1
    fusion_depth: int = setting(2, SIZE)  # cross transformer: 2 for MOSI, 4 for MOSEI and SIMS
    mask_padding: bool = setting(True, FLAG)  # false: attend to padding, as the official code does
    # audio and vision cut to their first max_frames frames (the 2023 release: 50); null: all
    max_frames: int | None = setting(None, SIZE.or_null())


@register_model("almt")
class ALMT(MSAModel):
    """Adaptive Language-guided Multimodal Transformer: a hyper-modality learned under language's guidance."""

    config_class = ALMTConfig

    def __init__(self, config: ALMTConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        d, n = config.hidden_dim, config.num_tokens
        self.text_encoder = TextEncoder(config, dims)
        widths = {"text": self.text_encoder.out_dim, "audio": dims.audio, "vision": dims.vision}
        lengths = {"text": dims.text_len, "audio": dims.audio_len, "vision": dims.vision_len}
        if config.max_frames is not None:
            lengths.update({m: min(lengths[m], config.max_frames) for m in ("audio", "vision")})
        self.project = nn.ModuleDict({m: nn.Linear(w, d) for m, w in widths.items()})
        self.embed = nn.ModuleDict({
            m: TokenTransformer(lengths[m], n, config.embed_depth, **widths_of(config)) for m in widths
        })
        self.language = TokenTransformer(n, 0, config.hyper_depth - 1, **widths_of(config))
        self.hyper_init = nn.Parameter(torch.ones(1, n, d))
        self.hyper = nn.ModuleList(
            HyperLayer(d, config.heads, config.hyper_dim_head) for _ in range(config.hyper_depth)
        )
        self.fusion = CrossTransformer(n, config.fusion_depth, **widths_of(config))
        self.head = nn.Linear(d, 1)

    def embed_one(self, modality: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """H1_m (B, num_tokens, d) of one modality's (B, L, D_m) sequence."""
        if modality != "text" and self.config.max_frames is not None:
            x = x[:, : self.config.max_frames]
            mask = None if mask is None else mask[:, : self.config.max_frames]
        if not self.config.mask_padding:
            mask = None
        elif mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # whatever padding holds must not reach a key
        return self.embed[modality](self.project[modality](x), mask, keep=self.config.num_tokens)[-1]

    def forward(self, batch: Batch) -> Output:
        text, text_mask = self.text_encoder(batch)
        h1 = {
            "text": self.embed_one("text", text, text_mask),
            "audio": self.embed_one("audio", batch.audio, batch.audio_mask),
            "vision": self.embed_one("vision", batch.vision, batch.vision_mask),
        }
        language_states = self.language(h1["text"])
        hyper = self.hyper_init.expand(h1["text"].shape[0], -1, -1)
        for layer, state in zip(self.hyper, language_states, strict=True):
            hyper = layer(state, h1["audio"], h1["vision"], hyper)
        fused = self.fusion(hyper, language_states[-1])[:, 0]
        return Output(pred=self.head(fused).squeeze(-1), features={"fused": fused, "hyper": hyper})
