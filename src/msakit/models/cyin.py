"""CyIN: Cyclic Informative Latent Space (Lin et al., "Cyclic Informative Latent Space for Bridging
Complete and Incomplete Multimodal Learning", NeurIPS 2025). The public repository RH-Lin/CyIN now
holds only a README; the design follows the paper (Eqs. 6-23) and the authors' earlier code
snapshot (commit da04a3d: models/generationBased/CyIN.py, trains/generationBased/CyIN.py).

A modality m is one of text l, audio a, vision v; C_B is `bottleneck_dim`, d is `common_dim`.

0. Alignment. Token-level bottlenecks pair step i of one modality with step i of another, so every
   modality must have the same steps. Text states come from the text encoder (B, L, D_l); audio and
   vision frames are averaged into the text's L steps (step j of a sample with n valid text steps
   and f valid frames averages frames floor(j f / n) .. floor((j + 1) f / n)); all three then share
   the text's mask.
1. Token-level information bottleneck (Eqs. 6-9). Per modality a per-token encoder
   (Linear D_m -> `ib_hidden_dim`, ReLU, Linear -> 2 C_B; the official 1x1 convolutions) gives mu
   and log sigma^2, and B_m = mu + sigma * eps. A decoder per TARGET modality T (Linear C_B ->
   `ib_hidden_dim`, ReLU, Linear -> D_T) maps every source's B_S back to T's input features:
       L_tib = mean_S KL(N(mu_S, sigma_S^2) || N(0, I)) + beta * mean_{S, T} ||X_T - Dec_T(B_S)||^2
   over all nine (S, T) pairs, S = T included (the "cyclic interaction").
2. Label-level bottleneck (Eqs. 10-11): a linear head on the time-mean of each B_m, L1 to the label.
3. Total (Eq. 23): L = L_task + (1/beta)(L_tib + L_lib) + gamma L_tran. As in the official code,
   the label term's beta cancels the 1/beta, so it enters at weight 1 (`losses["unimodal"]`, the
   sum over the three modalities); the token term enters as KL / beta (`losses["kl"]`) plus the
   mean reconstruction error (`losses["reconstruction"]`).
4. Cross-modal cyclic translation (Eqs. 13-20). One cascaded residual autoencoder (CRA) per pair of
   modalities translates between bottlenecks in BOTH directions (the paper: the reverse translator
   shares the forward one's weights). A CRA is `translator_blocks` residual autoencoders (1-D
   convolutions along time, widths `translator_dims`, LeakyReLU encoder, ReLU decoder), block i
   reading the input plus the previous block's output, then a two-convolution transition:
       x_1 = B_S;  x_(i+1) = x_i + RA_i(x_i);  B_(S->T) = Transition(x_n + RA_n(x_n))
   For a target T with sources S1, S2 the forward terms are B_(S1->T), B_(S2->T) and their sum
   B_(S1->T) + B_(S2->T) (Eq. 19: translations from several present modalities are ADDED), each
   against B_T; the reverse terms translate B_(S->T) back and compare with B_S (the two single
   ones and their sum). L_tran = mean of the nine forward + mean of the nine reverse MSEs.
5. Fusion (Eqs. 21-22): MulT over the bottlenecks (msakit's `CrossModalEncoder`): a temporal
   convolution to d per modality, six crossmodal stacks (`layers`), a self-attention memory stack
   per target (`memory_layers`), the mean over time (not MulT's last step), then
   y = W_o(h + W_2 Dropout(ReLU(W_1 h))).
6. Missing modalities (presence False): the modality's own bottleneck is discarded and replaced by
   the translation from the one present modality, or by the SUM of the translations from the two
   present ones (Eq. 19). This happens in every mode, so one model serves complete and incomplete
   input; trained on complete data it still fills in what a protocol removes at test time.
   `missing_fill: own` (a diagnostic, not the method) keeps the bottleneck the encoder gives the
   missing modality's zeroed features, to measure what the translations add.
7. Two stages (`training.stages`): "informative" trains 1-3 with gamma = 0 (no translation);
   "translation" adds 4, and, as the official code does, feeds fusion a translated bottleneck in
   place of a modality's own one 3 times out of 4 (chosen uniformly among: from the first other
   modality, from the second, their sum, its own), so that the fusion network learns to read
   translations before it meets them at test time. MOSI switches after 10% of the epochs, MOSEI
   after 30%.

Where this differs from the official code, and why:
- Decoder output. The official decoders end in a sigmoid, whose output cannot match BERT states or
  features with negative values; here the last layer is linear (`decoder_output: sigmoid` is the
  official one). The reconstruction targets X_T are detached (a fine-tuned text encoder is not
  pulled towards states that are easy to decode).
- Token weighting. Eq. 9 gives the cross-modal directions weight 1/2 against 1 for S = T; the
  official code averages the nine terms equally, which is followed. The official code re-encodes
  and re-samples a modality for each of its three pairs; here each modality is sampled once per
  step and feeds all three of its decoders.
- Alignment. The official code aligns with MMSA's `AlignSubNet(avg_pool)`, which pads each
  modality (text included, padded to 128 tokens) and averages STRIDED steps (j, j + 50, ...), so
  one aligned step mixes the start, middle and end of a clip; here each step averages a
  contiguous window of the sample's valid frames, and text is not resampled.
- Padding. Padded steps are zeroed before every convolution of the CRA and masked out of every
  attention and mean, so padding cannot change a prediction (the official code reads it).
- Evaluation samples B_m = mu + sigma eps as the official code does (translators and fusion only
  ever saw sampled bottlenecks in training), but eps comes from a counter-based stream keyed by the
  sample id (`msakit.missing.sample_uniforms`), so a prediction repeats exactly and does not
  depend on the batch or the padding (the official code draws fresh noise at every evaluation).
  `eval_bottleneck: mean` uses mu instead; on the synthetic default that was worse on every seed,
  on validation as on test (docs/models/cyin.md).
- Training-time substitution is drawn per sample and modality (the official code draws once per
  batch and modality). A sample with a modality missing during training (`training.noise`) uses
  the test-time rule for it, and the bottleneck, label and translation terms skip the pairs that
  involve a missing modality.
- Model selection on validation MAE with early stopping (`patience`); the official code keeps the
  last epoch. As in the official code, the translation stage goes on from the informative stage's
  last weights and AdamW state (`start: continue` in training.stages), not from its selected epoch.
- The temporal convolution keeps the sequence length ("same" padding; the official one shortens
  it by k - 1: `conv_padding: valid`, where a step's mask is that of the last input step it reads).
- The fused vector is [text, audio, vision] (official: [text, vision, audio]); the same function
  with the head's weights permuted, so no switch.
- msakit clips the global gradient norm; the official code clips each gradient value.
- The log-variance is clamped to [-LOGVAR_BOUND, LOGVAR_BOUND] before use (the official code uses
  it as it comes): on raw, unnormalised features (values in the thousands) the first forward pass
  gave log-variances near 30, so exp(logvar) in the KL term overflowed and no learning rate could
  train the model. Inside the bound, values and gradients are the official ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msakit.data.schema import MODALITIES, Batch, FeatureDims
from msakit.errors import MsakitError
from msakit.missing import sample_uniforms
from msakit.models.base import (
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
from msakit.models.layers.pooling import masked_mean, valid_lengths
from msakit.models.layers.text import TextEncoder
from msakit.models.layers.transformer import (
    crossmodal_stacks,
    crossmodal_summaries,
    memory_stacks,
)
from msakit.models.registry import register_model

LOGVAR_BOUND = 10.0  # sigma between e^-5 and e^5: a KL term that cannot overflow (see the docstring)
STAGES = ("informative", "translation")
PAIRS = (("text", "audio"), ("text", "vision"), ("audio", "vision"))
EVAL_BOTTLENECKS = ("sample", "mean")
MISSING_FILLS = ("translation", "own")
DECODER_OUTPUTS = ("linear", "sigmoid")
CONV_PADDINGS = ("same", "valid")
SIZES = Rule("a list of positive integers",
             lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(SIZE.ok(w) for w in v))


@dataclass
class CyINConfig(ModelConfig):
    """CyIN's settings; the defaults are the official MOSI values."""

    common_dim: int = setting(256, SIZE, divisible_by="num_heads")  # d: MulT's width (paper C_U)
    ib_hidden_dim: int = setting(256, SIZE)  # hidden width of the bottleneck encoders and decoders (C_ib)
    bottleneck_dim: int = setting(128, SIZE)  # C_B
    num_heads: int = setting(8, SIZE)
    layers: int = setting(2, SIZE)  # crossmodal blocks per stack (official nlevels)
    memory_layers: int = setting(3, SIZE)  # self-attention blocks per memory stack (official max(nlevels, 3))
    attn_dropout_text: float = setting(0.1, RATE)  # by the SOURCE modality of a crossmodal stack, as in MulT
    attn_dropout_audio: float = setting(0.3, RATE)
    attn_dropout_vision: float = setting(0.0, RATE)
    attn_dropout_memory: float = setting(0.4, RATE)
    embed_dropout: float = setting(0.0, RATE)
    output_dropout: float = setting(0.3, RATE)
    conv_kernel: int = setting(3, SIZE)
    causal_mask: bool = True  # MulT's future mask (official attn_mask: true)
    beta: float = setting(16.0, POSITIVE)  # the bottleneck trade-off: the IB terms enter as 1/beta
    gamma: float = setting(10.0, WEIGHT)  # weight of the translation losses in the "translation" stage
    translator_blocks: int = setting(8, SIZE)  # residual autoencoders per CRA
    translator_dims: list[int] = setting([64, 32, 16], SIZES)
    translator_kernel: int = setting(3, SIZE)
    reverse_translation: bool = True  # the cyclic (back-translation) terms
    translated_fusion_inputs: bool = True  # stage 2 feeds fusion translated bottlenecks
    # outside training: sample (official, per-id noise) | mean
    eval_bottleneck: str = setting("sample", one_of(*EVAL_BOTTLENECKS))
    # translation (the method) | own: a missing modality keeps the bottleneck its encoder gives its
    # zeroed features, a diagnostic that shows what the translations add
    missing_fill: str = setting("translation", one_of(*MISSING_FILLS))
    # linear | sigmoid (official: the decoders end in a sigmoid)
    decoder_output: str = setting("linear", one_of(*DECODER_OUTPUTS))
    # same | valid (official: the fusion's temporal convolution drops k - 1 steps)
    conv_padding: str = setting("same", one_of(*CONV_PADDINGS))


def align_to_steps(x: torch.Tensor, mask: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """Average each sample's valid frames of `x` (B, L, D) into the valid steps of `step_mask`
    (B, S) -> (B, S, D): contiguous windows, at least one frame each; zeros at padded steps."""
    frames = valid_lengths(mask).clamp(min=1)[:, None]
    steps = valid_lengths(step_mask).clamp(min=1)[:, None]
    j = torch.arange(step_mask.shape[1], device=x.device)[None]
    start = torch.minimum((j * frames).div(steps, rounding_mode="floor"), frames - 1)
    end = torch.maximum(((j + 1) * frames).div(steps, rounding_mode="floor"), start + 1)
    end = torch.minimum(end, frames)
    sums = F.pad(x.masked_fill(~mask.unsqueeze(-1), 0.0).cumsum(1), (0, 0, 1, 0))
    width = x.shape[-1]
    total = (sums.gather(1, end.unsqueeze(-1).expand(-1, -1, width))
             - sums.gather(1, start.unsqueeze(-1).expand(-1, -1, width)))
    out = total / (end - start).unsqueeze(-1).to(x.dtype)
    return out.masked_fill(~step_mask.unsqueeze(-1), 0.0)


class MaskedConvStack(nn.Module):
    """1-D convolutions along time (bias-free, as the official CRA) with an activation between
    them; padded steps are zeroed before every convolution so they never reach a valid one."""

    def __init__(self, widths: list[int], kernels: list[int], activation: type[nn.Module]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(a, b, k, padding=k // 2, bias=False)
            for a, b, k in zip(widths[:-1], widths[1:], kernels, strict=True)
        )
        self.activation = activation()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, L) -> (B, C', L); mask (B, 1, L) float."""
        for i, conv in enumerate(self.convs):
            x = conv(x * mask)
            if i < len(self.convs) - 1:
                x = self.activation(x)
        return x * mask


class CascadedResidualAutoencoder(nn.Module):
    """The translator Gamma between two bottlenecks (Eq. 14), used in both directions."""

    def __init__(self, width: int, hidden: list[int], blocks: int, kernel: int) -> None:
        super().__init__()
        down = [width, *hidden]
        up = [*reversed(hidden), width]
        self.encoders = nn.ModuleList(
            MaskedConvStack(down, [kernel] * len(hidden), nn.LeakyReLU) for _ in range(blocks)
        )
        # the decoder's last layer is a 1x1 convolution, as in the official ResidualAE
        self.decoders = nn.ModuleList(
            MaskedConvStack(up, [kernel] * (len(hidden) - 1) + [1], nn.ReLU) for _ in range(blocks)
        )
        self.transition = MaskedConvStack([width, width, width], [kernel, kernel], nn.ReLU)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, L, C); mask (B, L) bool."""
        m = mask.unsqueeze(1).to(x.dtype)
        x_in, x_out = x.transpose(1, 2), torch.zeros_like(x.transpose(1, 2))
        for encoder, decoder in zip(self.encoders, self.decoders, strict=True):
            x_in = x_in + x_out
            x_out = decoder(encoder(x_in, m), m)
        return self.transition(x_in + x_out, m).transpose(1, 2)


# the draws are numpy streams keyed by sample id, made on the host: nothing for torch.compile to
# fuse, and its numpy tracing fails on them
@torch.compiler.disable
def sample_noise(ids: list[str], modality: str, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like `like` (B, L, C), a function of each sample's id only:
    the value at step t, channel c is the (t C + c)-th draw of the sample's stream."""
    batch, steps, width = like.shape
    uniform = sample_uniforms("cyin-bottleneck", 0, ids, modality, steps * width)
    uniform = torch.from_numpy(uniform).clamp(1e-12, 1 - 1e-12)  # ndtri(0) is -inf
    return torch.special.ndtri(uniform).view(batch, steps, width).to(like.device, like.dtype)


def _token_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean squared error per token (B, L), averaged over the tokens where `weight` (B, L) is 1."""
    error = (pred - target).pow(2).mean(-1)
    return (error * weight).sum() / weight.sum().clamp(min=1.0)


@register_model("cyin")
class CyIN(MSAModel):
    """Informative bottlenecks per modality, translators between them, MulT fusion on top."""

    config_class = CyINConfig
    # "informative" trains without translation (gamma = 0); "translation" switches it on
    stages = STAGES

    def __init__(self, config: CyINConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        self.text_encoder = TextEncoder(config, dims)
        widths = {"text": self.text_encoder.out_dim, "audio": dims.audio, "vision": dims.vision}
        c_b, c_ib, d = config.bottleneck_dim, config.ib_hidden_dim, config.common_dim
        self.ib_encoders = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(widths[m], c_ib), nn.ReLU(), nn.Linear(c_ib, 2 * c_b))
            for m in MODALITIES
        })
        squash = [nn.Sigmoid()] if config.decoder_output == "sigmoid" else []
        self.ib_decoders = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(c_b, c_ib), nn.ReLU(), nn.Linear(c_ib, widths[m]), *squash)
            for m in MODALITIES
        })
        self.label_heads = nn.ModuleDict({m: nn.Linear(c_b, 1) for m in MODALITIES})
        self.translators = nn.ModuleDict({
            f"{a}_{b}": CascadedResidualAutoencoder(
                c_b, list(config.translator_dims), config.translator_blocks, config.translator_kernel
            )
            for a, b in PAIRS
        })
        padding = "same" if config.conv_padding == "same" else 0
        self.proj = nn.ModuleDict({
            m: nn.Conv1d(c_b, d, config.conv_kernel, padding=padding, bias=False) for m in MODALITIES
        })
        attn_dropout = {
            "text": config.attn_dropout_text,
            "audio": config.attn_dropout_audio,
            "vision": config.attn_dropout_vision,
        }
        # positions numbered from 1, as MulT's code numbers them
        shared = dict(embed_dropout=config.embed_dropout, causal=config.causal_mask, first_position=1)
        self.cross = crossmodal_stacks(MODALITIES, d, config.num_heads, config.layers,
                                       attn_dropout, **shared)
        self.memory = memory_stacks(MODALITIES, d, config.num_heads, config.memory_layers,
                                    config.attn_dropout_memory, **shared)
        combined = 6 * d
        self.proj1 = nn.Linear(combined, combined)
        self.proj2 = nn.Linear(combined, combined)
        self.out = nn.Linear(combined, 1)

    def translate(self, source: str, target: str, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """B_(source -> target): the pair's one translator serves both directions."""
        key = f"{source}_{target}" if f"{source}_{target}" in self.translators else f"{target}_{source}"
        return self.translators[key](latent, mask)

    def _inputs(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        text, mask = self.text_encoder(batch)
        return {
            "text": text.masked_fill(~mask.unsqueeze(-1), 0.0),
            "audio": align_to_steps(batch.audio, batch.audio_mask, mask),
            "vision": align_to_steps(batch.vision, batch.vision_mask, mask),
        }, mask

    def forward(self, batch: Batch) -> Output:
        inputs, mask = self._inputs(batch)
        present = {m: batch.presence[:, i] for i, m in enumerate(MODALITIES)}
        token = mask.to(inputs["text"].dtype)
        latents, losses = {}, {}
        kl = []
        for m in MODALITIES:
            mu, logvar = self.ib_encoders[m](inputs[m]).chunk(2, dim=-1)
            logvar = logvar.clamp(-LOGVAR_BOUND, LOGVAR_BOUND)
            if self.training:
                latents[m] = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
                weight = token * present[m][:, None]
                per_token = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean(-1)
                kl.append((per_token * weight).sum() / weight.sum().clamp(min=1.0))
            elif self.config.eval_bottleneck == "sample":
                latents[m] = mu + sample_noise(batch.ids, m, mu) * torch.exp(0.5 * logvar)
            else:
                latents[m] = mu
        translating = self.training and self.stage == "translation"
        complete = bool(batch.presence.all())
        translated = {} if complete and not translating else {
            (s, t): self.translate(s, t, latents[s], mask)
            for t in MODALITIES for s in MODALITIES if s != t
        }
        if self.training:
            losses.update(self._bottleneck_losses(inputs, latents, present, token, kl, batch.labels))
            if translating:
                losses["translation"] = self.config.gamma * self._translation_loss(
                    latents, translated, present, mask, token)
        fusion_inputs = self._fill_in(latents, translated, present) if translated else latents
        pred, features = self._fuse(fusion_inputs, mask)
        return Output(pred=pred, losses=losses, features=features)

    def _bottleneck_losses(
        self, inputs: dict[str, torch.Tensor], latents: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor], token: torch.Tensor, kl: list[torch.Tensor],
        labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """(1/beta) L_tib as KL / beta + mean reconstruction error, and L_lib at weight 1."""
        reconstruction = torch.stack([
            _token_mse(self.ib_decoders[t](latents[s]), inputs[t].detach(),
                       token * (present[s] & present[t])[:, None])
            for s in MODALITIES for t in MODALITIES
        ]).mean()
        unimodal = []
        for m in MODALITIES:
            pooled = masked_mean(latents[m], token.bool())
            error = (self.label_heads[m](pooled).squeeze(-1) - labels).abs()
            weight = present[m].to(error.dtype)
            unimodal.append((error * weight).sum() / weight.sum().clamp(min=1.0))
        return {
            "kl": torch.stack(kl).mean() / self.config.beta,
            "reconstruction": reconstruction,
            "unimodal": torch.stack(unimodal).sum(),
        }

    def _translation_loss(
        self, latents: dict[str, torch.Tensor], translated: dict[tuple[str, str], torch.Tensor],
        present: dict[str, torch.Tensor], mask: torch.Tensor, token: torch.Tensor,
    ) -> torch.Tensor:
        """Mean of the nine forward MSEs (+ mean of the nine reverse ones): Eqs. 15, 17, 20."""
        def both(*names: str) -> torch.Tensor:
            ok = torch.stack([present[n] for n in names]).all(0)
            return token * ok[:, None]

        forward, reverse = [], []
        for t in MODALITIES:
            s1, s2 = (s for s in MODALITIES if s != t)
            one, two = translated[(s1, t)], translated[(s2, t)]
            forward += [_token_mse(one, latents[t], both(s1, t)),
                        _token_mse(two, latents[t], both(s2, t)),
                        _token_mse(one + two, latents[t], both(s1, s2, t))]
            if self.config.reverse_translation:
                # t is the SOURCE here: translate it to both others and back
                o1, o2 = (o for o in MODALITIES if o != t)
                back1 = self.translate(o1, t, translated[(t, o1)], mask)
                back2 = self.translate(o2, t, translated[(t, o2)], mask)
                reverse += [_token_mse(back1, latents[t], both(t, o1)),
                            _token_mse(back2, latents[t], both(t, o2)),
                            _token_mse(back1 + back2, latents[t], both(t, o1, o2))]
        loss = torch.stack(forward).mean()
        if reverse:
            loss = loss + torch.stack(reverse).mean()
        return loss

    def _fill_in(
        self, latents: dict[str, torch.Tensor], translated: dict[tuple[str, str], torch.Tensor],
        present: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Each missing modality's bottleneck is the translation from the one present modality or
        the sum of the translations from both (Eq. 19); in the translation stage, with nothing
        missing, a random choice among those and the modality's own bottleneck (official code)."""
        substitute = (self.training and self.stage == "translation"
                      and self.config.translated_fusion_inputs)
        complete = torch.stack(list(present.values())).all(0)
        out = {}
        for t in MODALITIES:
            s1, s2 = (s for s in MODALITIES if s != t)
            one, two = translated[(s1, t)], translated[(s2, t)]
            p1, p2 = present[s1][:, None, None], present[s2][:, None, None]
            filled = torch.where(p1 & p2, one + two, torch.where(p1, one, torch.where(
                p2, two, torch.zeros_like(one))))
            value = (torch.where(present[t][:, None, None], latents[t], filled)
                     if self.config.missing_fill == "translation" else latents[t])
            if substitute:
                choice = torch.randint(0, 4, complete.shape, device=complete.device)
                options = torch.stack([one, two, one + two, latents[t]])  # (4, B, L, C)
                picked = options[choice, torch.arange(choice.shape[0], device=choice.device)]
                value = torch.where(complete[:, None, None], picked, value)
            out[t] = value
        return out

    def _fuse(
        self, latents: dict[str, torch.Tensor], mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MulT over the bottlenecks (Eqs. 21-22), mean over time, residual head."""
        if self.config.conv_padding == "valid":
            kernel = self.config.conv_kernel
            if mask.shape[1] < kernel:
                raise MsakitError(f"cyin: model.conv_padding=valid needs at least model.conv_kernel "
                                  f"({kernel}) steps, the batch has {mask.shape[1]}")
            # step t of the shortened sequence covers input steps t .. t + k - 1
            mask_out = mask[:, kernel - 1:]
        else:
            mask_out = mask
        seqs = {
            m: self.proj[m](latents[m].masked_fill(~mask.unsqueeze(-1), 0.0).transpose(1, 2))
            .transpose(1, 2)
            for m in MODALITIES
        }
        summaries = crossmodal_summaries(
            self.cross, self.memory, {m: (seqs[m], mask_out) for m in MODALITIES}, masked_mean)
        fused = torch.cat([summaries[m] for m in MODALITIES], dim=-1)
        hidden = F.dropout(F.relu(self.proj1(fused)), self.config.output_dropout, self.training)
        hidden = fused + self.proj2(hidden)
        return self.out(hidden).squeeze(-1), {"fused": fused, **summaries}
