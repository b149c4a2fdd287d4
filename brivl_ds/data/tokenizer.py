"""Tokenizers from local directories only (Chinese RoBERTa tokenizers are character-level for Chinese)."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerBase

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_char_tokenizer(texts: list[str], out_dir: str | Path) -> Path:
    """A BERT-style character vocabulary of `texts`, saved as a Hugging Face tokenizer directory."""
    chars = sorted({c for t in texts for c in t.lower() if not c.isspace()})
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + [c for c in chars if c not in SPECIAL_TOKENS])}
    out = Path(out_dir)
    BertTokenizer(vocab=vocab, tokenize_chinese_chars=True).save_pretrained(out)
    return out


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist (nothing is downloaded at run time)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
