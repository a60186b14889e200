"""MMSLF: a general (M)LLM teaches a small task-specific model through context-aware prompts
(Zhang, Zhang, Ying, Tang and Yu, "Improving Task-Specific Multimodal Sentiment Analysis with General
MLLMs via Prompting", NeurIPS 2025; official code LOGO-CUHKSZ/MMSLF).

Offline, an MLLM writes "visual cues" and "language cues" for every sample (the label is shown for
training samples only); `msakit cues` writes them to a JSONL file that `model.cues` names. Then two
networks of the same shape (width d = 64) are trained one after the other, as the two stages of the
one training loop (`training.stages: teacher, student`):

1. Teacher. Text states X_l (from the text encoder), audio X_a and vision X_v are projected to d. A
   FROZEN prompt encoder reads the cue text; its states are projected to d and summarised by a
   transformer with L learned extra tokens (L = text length): P = T_p([P0; W_p E(cues)])[:L].
   Each of audio and vision is read by the text through a prompt-modulated cross transformer:
       logits = (Q K^T / sqrt(d_h)) * (P_k V^T / sqrt(d_h)),   Q = W_q LN(X_l), K = W_k LN(X_m),
       V = W_v LN(X_m), P_k = W_pk LN(P)  (element-wise product; d_h the head width)
       H_lm <- H_lm + W_o softmax(logits) V;  H_lm <- H_lm + FF(LN(H_lm))
   A fusion transformer with 4 extra tokens reads [H_la; H_lv]; its 4 token outputs F (B, 4, d) are
   flattened to y_hat = W [F_1; ...; F_4]. Loss: L1(y_hat, y).
2. Student. The same network without any prompt path (the logits are Q K^T / sqrt(d_h); no prompt
   encoder, no W_pk), shallower, trained against the frozen teacher (run on the same batch):
       L = alpha L1(y_hat, y) + beta sum_m L1(A^S_m, A^T_m) + gamma L1(F^S, F^T)
   where A_m are the last cross layer's attention maps and F the fusion tokens; alpha, beta, gamma =
   1, 60, 8 (SIMS, the published setting). alpha is the trainer's task-loss weight (1).

Parity: with BERT and the prompt encoder replaced by the identity, the teacher and student equal
the official ones at MOSI, MOSEI and SIMS sizes (predictions, attention maps, fusion tokens, every
loss term and gradient, dropout included) to 1e-6: benchmarks/parity/mmslf.py, results in
benchmarks/results/parity/mmslf.md. Every place where msakit follows the official code rather than
the paper's text, or departs from the code, with the setting that decides it:
- Attention target. The official teacher returns, as the map the student imitates, the softmax of
  the UNMODULATED logits Q K^T (computed before the prompt term multiplies them); the modulated map
  only drives the teacher's output. `attention_target: unmodulated` (default) follows the code;
  `modulated` distils the map the teacher actually used.
- Teacher mode. While the student trains, the official code leaves the frozen teacher in training
  mode (train_student.py never calls its eval()), so the cross transformers' dropout (0.5) is on
  when it writes the targets; its pretrained BERTs stay in the evaluation mode `from_pretrained`
  puts them in. `teacher_mode: train` (default) does the same (the teacher's text encoder in
  evaluation mode); `eval` gives deterministic targets (no dropout anywhere in the teacher).
- Prompt positions. The official code draws the prompt path's learned positions (the prompt
  transformer's and each cross transformer's) from N(0, 1), while the projected cue states they
  are added to are about 0.2 in size, so the prompt summary P starts (and, in msakit's synthetic
  runs, stays) almost the same for every clip. `prompt_position_std` scales that init; the default
  1 is the official one.
- Encoders. msakit's default text and prompt encoder is the packaged all-MiniLM-L6-v2; the official
  code (and the paper) use bert-base-uncased (bert-base-chinese for SIMS): name a local folder with
  `text_encoder` / `prompt_encoder`. The teacher and student each have their own text encoder, as
  there; the teacher's is fine-tuned (`finetune_text`), the student's frozen
  (`student_finetune_text`), and the teacher's is frozen with the rest of it while the student trains.
- Prompt encoder reads. The prompt encoder is frozen, so its states are computed once per cue text
  (in evaluation mode) and cached; it is not part of the model's parameters or checkpoint. The
  official code runs it on every batch, and while the teacher trains it is in training mode, so its
  BERT dropout is on (without gradients). No switch: the cache needs fixed states.
- Frozen student text encoder. The official student's BERT is frozen but, with the rest of the
  student, in training mode (dropout on); msakit keeps a frozen encoder in evaluation mode. No switch.
- Teacher augmentation. The official teacher trains on inputs thinned at a per-sample keep rate
  r ~ U(0.5, 1): audio/vision features zeroed element-wise, text tokens replaced by [UNK] (here:
  special tokens and padding are kept; precomputed text features lose whole token vectors).
  `augment_min_keep` sets the lower bound (1 = off). The student trains on plain inputs, as there.
- Padding is masked: padded audio/vision frames are not attended to, padded text positions are not
  read by the fusion transformer, padded prompt tokens are not read by the prompt transformer. The
  official code (which pads text to 50 and cues to 512 tokens) attends to all of them. No switch;
  on unpadded inputs the two are the same.
- Schedule. Warm-up then cosine as the official scheduler, but stepped per batch (the official
  steps per epoch). No switch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msakit.data.schema import Batch, FeatureDims
from msakit.data.tokens import BERT_SPECIAL_IDS, BERT_UNK_ID, load_tokenizer, resolve_encoder_path
from msakit.errors import MsakitError
from msakit.missing.masks import blank_out, droppable_positions
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
from msakit.models.layers.attention import multi_head_attention
from msakit.models.layers.prenorm import TokenTransformer
from msakit.models.layers.text import TextEncoder, special_token_ids
from msakit.models.registry import register_model

STAGES = ("teacher", "student")
ATTENTION_TARGETS = ("unmodulated", "modulated")
TEACHER_MODES = ("train", "eval")
KEEP_RATE = Rule("a number in (0, 1]", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                 and 0 < v <= 1)
NO_CUES = ("mmslf: the teacher reads cue texts: set model.cues=PATH "
           "(write one with `msakit cues DATASET --output PATH`)")


@dataclass
class MMSLFConfig(ModelConfig):
    """MMSLF's settings; the defaults are the official MOSI network (models/MMSLF.py)."""

    hidden_dim: int = setting(64, SIZE)  # d
    dim_head: int = setting(32, SIZE)  # every attention is heads x 32 wide inside
    cross_heads: int = setting(4, SIZE)  # the text-to-audio / text-to-vision cross transformers
    cross_mlp_dim: int = setting(128, SIZE)  # SIMS: 768
    teacher_fusion_heads: int = setting(6, SIZE)  # SIMS: 8
    student_fusion_heads: int = setting(6, SIZE)  # SIMS: 4
    fusion_mlp_dim: int = setting(64, SIZE)
    fusion_tokens: int = setting(4, SIZE)
    prompt_heads: int = setting(6, SIZE)  # SIMS: 8
    prompt_mlp_dim: int = setting(128, SIZE)  # SIMS: 64
    prompt_depth: int = setting(2, SIZE)
    teacher_cross_depth: int = setting(6, SIZE)
    teacher_fusion_depth: int = setting(6, SIZE)
    student_cross_depth: int = setting(2, SIZE)  # SIMS: 1 (the official README's command)
    student_fusion_depth: int = setting(2, SIZE)
    dropout: float = setting(0.5, RATE)  # inside the cross transformers; the others have none
    # the official recipe fine-tunes the teacher's text encoder (finetune_text) and keeps the
    # student's frozen (its command has no --bert_finetune)
    student_finetune_text: bool = False
    cues: str | None = None  # the JSONL file `msakit cues` writes
    prompt_encoder: str = "minilm"  # packaged name or local Hugging Face folder; always frozen
    prompt_max_len: int = setting(512, SIZE)  # cue tokens read
    # std of the random init of the prompt path's learned positions; 1 = the official randn
    prompt_position_std: float = setting(1.0, POSITIVE)
    # teacher training keeps each input element with p ~ U(this, 1)
    augment_min_keep: float = setting(0.5, KEEP_RATE)
    attention_weight: float = setting(60.0, WEIGHT)  # beta
    fusion_weight: float = setting(8.0, WEIGHT)  # gamma
    attention_target: str = setting("unmodulated", one_of(*ATTENTION_TARGETS))
    # the frozen teacher's mode while the student trains
    teacher_mode: str = setting("train", one_of(*TEACHER_MODES))


class PromptReader:
    """The frozen encoder that reads cue texts. Its states are cached per text (half precision on
    the CPU): the encoder never trains, so each cue is read once however many epochs run."""

    def __init__(self, name_or_path: str, max_len: int) -> None:
        from transformers import AutoModel

        self.tokenizer = load_tokenizer(name_or_path)
        self.model = AutoModel.from_pretrained(str(resolve_encoder_path(name_or_path)),
                                               local_files_only=True).eval().requires_grad_(False)
        self.max_len = max_len
        self.width = int(self.model.config.hidden_size)
        self.cache: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def _encode_new(self, texts: list[str], chunk: int = 64) -> None:
        for start in range(0, len(texts), chunk):
            part = texts[start:start + chunk]
            tokens = self.tokenizer(part, padding=True, truncation=True, max_length=self.max_len,
                                    return_tensors="pt")
            states = self.model(**tokens).last_hidden_state
            for text, state, mask in zip(part, states, tokens["attention_mask"], strict=True):
                self.cache[text] = state[mask.bool()].to(torch.float16).clone()

    def __call__(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, width) states and their (B, L) mask for `texts`, padded to the longest."""
        new = sorted({t for t in texts if t not in self.cache})
        if new:
            self._encode_new(new)
        states = [self.cache[t] for t in texts]
        length = max(s.shape[0] for s in states)
        padded = torch.zeros(len(texts), length, self.width)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for i, s in enumerate(states):
            padded[i, : s.shape[0]] = s.float()
            mask[i, : s.shape[0]] = True
        return padded.to(device), mask.to(device)


@lru_cache(maxsize=2)
def prompt_reader(name_or_path: str, max_len: int) -> PromptReader:
    """One reader (and one cache) per encoder, shared by every MMSLF model of the process."""
    return PromptReader(name_or_path, max_len)


@lru_cache(maxsize=4)
def _encoder_width(name_or_path: str) -> int:
    config = json.loads((resolve_encoder_path(name_or_path) / "config.json").read_text())
    return int(config["hidden_size"])


def _masked_softmax(logits: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    # the most negative finite value, not -inf: a sample with no valid key gets a uniform row, not NaN
    return logits.masked_fill(~key_mask[:, None, None, :], torch.finfo(logits.dtype).min).softmax(-1)


class ModulatedCrossAttention(nn.Module):
    """The text reads a source modality; with prompt tokens the logits are scaled by P_k V^T."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, with_prompt: bool) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_prompt_k = nn.Linear(dim, inner, bias=False) if with_prompt else None
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(
        self, text: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor,
        prompt: torch.Tensor | None = None, maps: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Output (B, L, dim) and, with `maps`, the unmodulated and the used attention maps
        (B, heads, L, Ls). Without maps or prompt the fused attention kernel runs instead."""
        q, k, v = self.to_q(text), self.to_k(key), self.to_v(value)
        if prompt is None and not maps:
            return self.to_out(multi_head_attention(q, k, v, self.heads, key_mask)), None, None
        q, k, v = self._split(q), self._split(k), self._split(v)
        logits = q @ k.transpose(-1, -2) * self.scale
        plain = _masked_softmax(logits, key_mask) if maps or prompt is None else None
        used = plain
        if prompt is not None:
            prompt_k = self._split(self.to_prompt_k(prompt))
            used = _masked_softmax(logits * (prompt_k @ v.transpose(-1, -2) * self.scale), key_mask)
        out = (used @ v).transpose(1, 2).reshape(text.shape[0], text.shape[1], -1)
        return self.to_out(out), plain, used


class ModulatedCrossLayer(nn.Module):
    def __init__(self, config: MMSLFConfig, with_prompt: bool) -> None:
        super().__init__()
        d = config.hidden_dim
        self.norm_q, self.norm_k, self.norm_v = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.norm_prompt = nn.LayerNorm(d) if with_prompt else None
        self.attn = ModulatedCrossAttention(d, config.cross_heads, config.dim_head, config.dropout,
                                            with_prompt)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = nn.Sequential(
            nn.Linear(d, config.cross_mlp_dim), nn.GELU(), nn.Dropout(config.dropout),
            nn.Linear(config.cross_mlp_dim, d), nn.Dropout(config.dropout),
        )

    def forward(
        self, text: torch.Tensor, source: torch.Tensor, source_mask: torch.Tensor,
        prompt: torch.Tensor | None, maps: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        prompt = None if prompt is None else self.norm_prompt(prompt)
        out, plain, used = self.attn(self.norm_q(text), self.norm_k(source), self.norm_v(source),
                                     source_mask, prompt, maps)
        text = text + out
        return text + self.ff(self.norm_ff(text)), plain, used


class ModulatedCrossTransformer(nn.Module):
    """Learned positions on text, source (and prompt), then `depth` layers updating the text."""

    def __init__(
        self, source_len: int, text_len: int, depth: int, config: MMSLFConfig, with_prompt: bool
    ) -> None:
        super().__init__()
        d = config.hidden_dim
        self.source_positions = nn.Parameter(torch.randn(1, source_len, d))
        self.text_positions = nn.Parameter(torch.randn(1, text_len, d))
        self.prompt_positions = (nn.Parameter(config.prompt_position_std * torch.randn(1, text_len, d))
                                 if with_prompt else None)
        self.layers = nn.ModuleList(ModulatedCrossLayer(config, with_prompt) for _ in range(depth))

    def forward(
        self, source: torch.Tensor, source_mask: torch.Tensor, text: torch.Tensor,
        prompt: torch.Tensor | None = None, maps: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The updated text (B, L, d) and, with `maps`, the LAST layer's unmodulated and used
        attention maps (only the last layer's are distilled, so only they are computed)."""
        source = source + self.source_positions[:, : source.shape[1]]
        text = text + self.text_positions[:, : text.shape[1]]
        if prompt is not None:
            prompt = prompt + self.prompt_positions[:, : prompt.shape[1]]
        for i, layer in enumerate(self.layers):
            text, plain, used = layer(text, source, source_mask, prompt, maps and i == len(self.layers) - 1)
        return text, plain, used


@dataclass
class NetOutput:
    pred: torch.Tensor  # (B,)
    fusion_tokens: torch.Tensor  # (B, fusion_tokens, d)
    attention: dict[str, torch.Tensor] = field(default_factory=dict)  # last layer, unmodulated
    used_attention: dict[str, torch.Tensor] = field(default_factory=dict)  # last layer, as applied


def within_built_lengths(batch: Batch, dims: FeatureDims) -> Batch:
    """`batch` cut to the sequence lengths the positions were built for (`dims`) when the steps
    beyond them are all padding (a dataset padded longer); a longer valid sequence is an error."""
    changes: dict[str, Any] = {}
    dropped = dict(batch.dropped)
    for m in ("text", "audio", "vision"):
        mask, built = getattr(batch, f"{m}_mask"), getattr(dims, f"{m}_len")
        if mask is None or built is None or mask.shape[1] <= built:
            continue
        if bool(mask[:, built:].any()):
            raise MsakitError(f"mmslf: a {m} sequence of {mask.shape[1]} steps holds valid steps beyond "
                              f"the {built} the model was built for")
        changes[f"{m}_mask"] = mask[:, :built]
        if getattr(batch, m) is not None:
            changes[m] = getattr(batch, m)[:, :built]
        if m == "text" and batch.text_ids is not None:
            changes["text_ids"] = batch.text_ids[..., :built]
        if m in dropped:
            dropped[m] = dropped[m][:, :built]
    return batch.with_updates(**changes, dropped=dropped) if changes else batch


class MMSLFNet(nn.Module):
    """One network of MMSLF: the teacher (`prompt_width` given) or the student (no prompt path)."""

    def __init__(
        self, config: MMSLFConfig, dims: FeatureDims, cross_depth: int, fusion_depth: int,
        fusion_heads: int, finetune_text: bool, prompt_width: int | None = None,
    ) -> None:
        super().__init__()
        d, length = config.hidden_dim, dims.text_len
        with_prompt = prompt_width is not None
        self.text_encoder = TextEncoder(replace(config, finetune_text=finetune_text), dims)
        self.project = nn.ModuleDict({
            "text": nn.Linear(self.text_encoder.out_dim, d),
            "audio": nn.Linear(dims.audio, d),
            "vision": nn.Linear(dims.vision, d),
        })
        self.cross = nn.ModuleDict({
            m: ModulatedCrossTransformer(source_len, length, cross_depth, config, with_prompt)
            for m, source_len in (("audio", dims.audio_len), ("vision", dims.vision_len))
        })
        self.fusion = TokenTransformer(2 * length, config.fusion_tokens, fusion_depth, dim=d,
                                       heads=fusion_heads, dim_head=config.dim_head,
                                       mlp_dim=config.fusion_mlp_dim)
        self.head = nn.Linear(config.fusion_tokens * d, 1)
        self.prompt_project = nn.Linear(prompt_width, d) if with_prompt else None
        self.prompt_summary = TokenTransformer(
            config.prompt_max_len, length, config.prompt_depth, dim=d, heads=config.prompt_heads,
            dim_head=config.dim_head, mlp_dim=config.prompt_mlp_dim,
        ) if with_prompt else None
        if self.prompt_summary is not None:
            with torch.no_grad():  # scaled in place: the init draws the same random numbers
                self.prompt_summary.positions.mul_(config.prompt_position_std)

    def forward(
        self, batch: Batch, prompt_states: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None, maps: bool = False,
    ) -> NetOutput:
        """`prompt_states` (B, Lp, width): the frozen prompt encoder's output; None = no prompts.
        `maps`: also return the last cross layers' attention maps."""
        text, text_mask = self.text_encoder(batch)
        if text_mask is not None:  # padded steps are zeroed first: whatever they hold never leaks
            text = torch.where(text_mask[..., None], text, 0.0)
        text = self.project["text"](text)
        prompt = None
        if prompt_states is not None:
            length = text.shape[1]
            prompt = self.prompt_summary(self.prompt_project(prompt_states), prompt_mask, keep=length)[-1]
        read, plain, used = {}, {}, {}
        for m in ("audio", "vision"):
            source, source_mask = getattr(batch, m), getattr(batch, f"{m}_mask")
            if source_mask is None:
                source_mask = torch.ones(source.shape[:2], dtype=torch.bool, device=source.device)
            source = self.project[m](torch.where(source_mask[..., None], source, 0.0))
            read[m], plain[m], used[m] = self.cross[m](source, source_mask, text, prompt, maps)
        fused_mask = None if text_mask is None else torch.cat([text_mask, text_mask], dim=1)
        tokens = self.fusion(torch.cat([read["audio"], read["vision"]], dim=1), fused_mask,
                             keep=self.fusion.tokens.shape[1])[-1]
        pred = self.head(tokens.flatten(1)).squeeze(-1)
        return NetOutput(pred, tokens, plain if maps else {}, used if maps else {})


@register_model("mmslf")
class MMSLF(MSAModel):
    """MMSLF: a prompt-guided teacher distilled into a small prompt-free student (NeurIPS 2025)."""

    config_class = MMSLFConfig
    stages = STAGES

    def __init__(self, config: MMSLFConfig, dims: FeatureDims) -> None:
        super().__init__(config, dims)
        self.prompt_width = int(_encoder_width(config.prompt_encoder))
        self.teacher = MMSLFNet(config, dims, config.teacher_cross_depth, config.teacher_fusion_depth,
                                config.teacher_fusion_heads, config.finetune_text,
                                prompt_width=self.prompt_width)
        self.student = MMSLFNet(config, dims, config.student_cross_depth, config.student_fusion_depth,
                                config.student_fusion_heads, config.student_finetune_text)
        tokens = special_token_ids(config)
        self.unk_id = tokens.get("unk_id", BERT_UNK_ID)
        self.special_ids = tokens.get("special_ids", BERT_SPECIAL_IDS)
        self.set_stage("student")  # what a fresh or loaded model predicts with

    def set_stage(self, stage: str) -> None:
        """"teacher" trains the teacher on cues; "student" trains the student against the frozen
        teacher (and is what evaluation and prediction use afterwards)."""
        super().set_stage(stage)
        for name, net in (("teacher", self.teacher), ("student", self.student)):
            net.requires_grad_(name == stage)
            if net.text_encoder.model is not None and not net.text_encoder.finetune:
                net.text_encoder.model.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> MMSLF:
        super().train(mode)
        if self.stage == "student":
            # the frozen teacher: in training mode (dropout on, its text encoder excepted) while
            # the student trains with `teacher_mode: train`, as in the official code
            self.teacher.train(mode and self.config.teacher_mode == "train")
            self.teacher.text_encoder.eval()
        return self

    @classmethod
    def side_inputs(cls, config: dict[str, Any], training: bool) -> dict[str, str]:
        """The cue file, while a run trains the teacher or distils from it (the student alone
        reads no cues, so a saved model is scored without them)."""
        model, stages = config["model"], [s["name"] for s in config["training"]["stages"]]
        distilling = model["attention_weight"] > 0 or model["fusion_weight"] > 0
        if not training or not ("teacher" in stages or distilling):
            return {}
        if model["cues"] is None:
            raise MsakitError(NO_CUES)
        return {"cues": model["cues"]}

    @property
    def distilling(self) -> bool:
        return self.config.attention_weight > 0 or self.config.fusion_weight > 0

    def prompts(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen prompt encoder's states for the batch's cue texts (`batch.side["cues"]`,
        which the run attaches from `model.cues`)."""
        cues = batch.side.get("cues")
        if cues is None:
            raise MsakitError(NO_CUES)
        missing = [i for i, text in zip(batch.ids, cues, strict=True) if text is None]
        if missing:
            raise MsakitError(
                f"{self.config.cues}: no cues for {len(missing)} sample(s) of this batch, e.g. id "
                f"{missing[0]!r}; run `msakit cues` again on this dataset (it fills in only the "
                "missing ids)"
            )
        reader = prompt_reader(self.config.prompt_encoder, self.config.prompt_max_len)
        return reader(cues, batch.labels.device)

    def augment(self, batch: Batch) -> Batch:
        """The teacher's training inputs: each sample keeps elements with p ~ U(augment_min_keep, 1)."""
        low = self.config.augment_min_keep
        if low >= 1:
            return batch
        keep = torch.empty(len(batch), device=batch.labels.device).uniform_(low, 1.0)
        changes = {}
        for m in ("audio", "vision"):
            x = getattr(batch, m)
            changes.update(blank_out(batch, m, None, torch.rand_like(x) >= keep[:, None, None], self.unk_id))
        droppable = droppable_positions(batch, "text", self.special_ids)
        drop = (torch.rand(droppable.shape, device=keep.device) >= keep[:, None]) & droppable
        changes.update(blank_out(batch, "text", drop, drop.unsqueeze(-1), self.unk_id))
        return batch.with_updates(**changes)

    def run_teacher(self, batch: Batch, maps: bool = False) -> NetOutput:
        return self.teacher(batch, *self.prompts(batch), maps=maps)

    def distillation_losses(self, student: NetOutput, teacher: NetOutput) -> dict[str, torch.Tensor]:
        """beta * sum_m L1(attention maps) and gamma * L1(fusion tokens), student against teacher."""
        cfg = self.config
        target = teacher.attention if cfg.attention_target == "unmodulated" else teacher.used_attention
        attention = sum(F.l1_loss(student.attention[m], target[m]) for m in ("audio", "vision"))
        return {
            "attention": cfg.attention_weight * attention,
            "fusion": cfg.fusion_weight * F.l1_loss(student.fusion_tokens, teacher.fusion_tokens),
        }

    def forward(self, batch: Batch) -> Output:
        batch = within_built_lengths(batch, self.dims)
        if self.stage == "teacher":
            out = self.run_teacher(self.augment(batch) if self.training else batch)
            return Output(out.pred, features={"fusion_tokens": out.fusion_tokens})
        distilling = self.training and self.distilling
        out = self.student(batch, maps=distilling)
        losses = {}
        if distilling:
            with torch.no_grad():
                target = self.run_teacher(batch, maps=True)
            losses = self.distillation_losses(out, target)
        return Output(out.pred, losses=losses, features={"fusion_tokens": out.fusion_tokens})
