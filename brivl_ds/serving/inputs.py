"""Request inputs checked before they reach the model: base64 images within byte and pixel limits (the pixel count
is read from the header, so a decompression bomb is refused before it is decoded), and texts within length limits.
Every refusal is a `BadInput` with a message the client can act on; the service answers it with a 4xx."""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class InputLimits:
    max_items: int = 64  # inputs per request
    max_image_bytes: int = 8 << 20  # one encoded image, after base64 decoding
    max_pixels: int = 40_000_000  # width x height from the header (PIL's own bomb guard starts at 89 M)
    max_text_chars: int = 1000  # longer texts are refused, not silently cut (the tokenizer truncates to max_length)
    max_body_bytes: int = 64 << 20  # a whole request
    max_k: int = 100  # search results


class BadInput(ValueError):
    """A request input the service refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, reason: str = "bad_input"):
        super().__init__(message)
        self.status, self.reason = status, reason


def decode_image(encoded: str, limits: InputLimits, where: str = "image") -> bytes:
    """The bytes of a base64 image (plain or a data: URI), checked to be a decodable format within the limits."""
    if encoded.startswith(("http://", "https://", "ftp://", "file:")):
        raise BadInput(f"{where}: images are sent inline as base64; URLs are not fetched", reason="url")
    if encoded.startswith("data:"):
        header, _, encoded = encoded.partition(",")
        if not header.endswith(";base64"):
            raise BadInput(f"{where}: a data URI must be base64-encoded (data:image/...;base64,...)")
    encoded = "".join(encoded.split())  # MIME-style line breaks (`base64` without -w0) are not errors
    too_large = BadInput(f"{where}: the image is larger than {limits.max_image_bytes} bytes", 413, "image_too_large")
    if len(encoded) > (limits.max_image_bytes + 2) // 3 * 4 + 4:  # refused before decoding a huge string
        raise too_large
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{where}: not valid base64") from None
    if not raw:
        raise BadInput(f"{where}: empty image")
    if len(raw) > limits.max_image_bytes:  # the check above counts base64 groups of 3 bytes: a few more pass it
        raise too_large
    check_image_header(raw, limits, where)
    return raw


def check_image_header(raw: bytes, limits: InputLimits, where: str = "image") -> None:
    """Refuse what is not an image, and images with more pixels than allowed, from the header alone."""
    try:
        with Image.open(io.BytesIO(raw)) as image:  # parses the header; pixel data is not decoded here
            width, height = image.size
    except Image.DecompressionBombError:
        raise BadInput(f"{where}: too many pixels (decompression bomb guard)", reason="too_many_pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadInput(f"{where}: not a decodable image ({type(err).__name__}: {str(err)[:200]})",
                       reason="undecodable") from None
    if width * height > limits.max_pixels:
        raise BadInput(f"{where}: {width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels} "
                       "(decompression bomb guard)", reason="too_many_pixels")


def check_texts(texts: list[str], limits: InputLimits, where: str = "input") -> None:
    for i, text in enumerate(texts):
        if not text.strip():
            raise BadInput(f"{where}[{i}]: empty text", reason="empty_text")
        if len(text) > limits.max_text_chars:
            raise BadInput(f"{where}[{i}]: {len(text)} characters exceeds the limit of {limits.max_text_chars}",
                           reason="text_too_long")
