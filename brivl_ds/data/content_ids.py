"""Content ids of a pair: which image and which caption it is, so that copies of a query's own pair among its
negatives (false negatives: a re-crawled image, a caption shared by many pairs) can be recognised and masked.

An id is the first 63 bits of a SHA-256: of the encoded image bytes (as `image_sha256` in the shards), and of the
normalised caption (Unicode NFKC, lower case, runs of whitespace collapsed, ends stripped). Real ids are >= 0;
negative ids are never produced here and mark entries that carry no content (see moco/queue.py).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

import torch

ID_COLUMNS = ("image", "caption")
"""Columns of a [N, 2] id tensor, in order."""
_SPACES = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def _id(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: non-negative as an int64


def image_id(image: bytes) -> int:
    return _id(hashlib.sha256(image).digest())


def caption_id(text: str) -> int:
    return _id(hashlib.sha256(normalize_caption(text).encode("utf-8")).digest())


def pair_ids(image: bytes, text: str) -> tuple[int, int]:
    return image_id(image), caption_id(text)


def as_tensor(ids: list[tuple[int, int]]) -> torch.Tensor:
    """[N, 2] int64 in ID_COLUMNS order."""
    return torch.tensor(ids, dtype=torch.long).reshape(len(ids), len(ID_COLUMNS))
