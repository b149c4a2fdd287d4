"""Per-sample image + box transform (encoded bytes -> uint8 image, official box layout), in the data workers.

The CPU side stays uint8 from decode to collate: the crop is drawn from the image header, the JPEG is decoded only
as finely as that crop needs, and crop + resize, flip, colour and blur run on the small output image. ImageNet
normalisation happens on the accelerator (`models.brivl.normalize_images`, called by `Batch.to`), so workers ship
4x fewer bytes.

How this differs from the straightforward pipeline (PIL decode -> torchvision RandomResizedCrop ->
RandomHorizontalFlip -> ColorJitter -> RandomGrayscale -> RandomApply(GaussianBlur) -> ToTensor -> Normalize).
Same: the crop distribution (`sample_crop` is RandomResizedCrop.get_params draw for draw), flip, the jitter factor
distributions (no hue), grayscale and blur probabilities, the blur kernel (9 taps, sigma 0.1..2, reflect padding),
and the box geometry (tv_tensors.BoundingBoxes through v2.functional, SanitizeBoundingBoxes' 1 px rule). Different:

* Reduced-scale decode: a JPEG is decoded at 1/2, 1/4 or 1/8 by libjpeg's scaled IDCT (PIL `draft`) when the crop
  still spans >= size decoded pixels both ways, and the crop is then rounded to whole decoded pixels: crop corners
  snap to multiples of 2, 4 or 8 original pixels (under half an output pixel); the boxes follow the snapped crop,
  so they stay exact with respect to the pixels. The IDCT's low-pass differs slightly from a bilinear one.
* Resampling: torch's uint8 antialiased bilinear kernel (what torchvision uses for uint8 tensors) instead of PIL's;
  they agree to within a grey level on average.
* Colour: brightness, contrast, saturation and grayscale are one affine colour matrix applied in float, rounded
  and clipped once. Without clipping these maps commute, so torchvision's random order of the jitter ops matters
  only through its intermediate clipping (and PIL's truncation), which we do not reproduce: a highlight pushed
  over 255 by one op and pulled back by the next keeps its detail here. The contrast mean is the image's exact luma
  mean, not PIL's integer-rounded one.
* Blur: 8-bit fixed point (weights in 1/256, rounded after each pass), within 1-2 grey levels of the float result.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from brivl_ds.config import AugmentConfig

BLUR_KERNEL = 9  # taps, as torchvision GaussianBlur(kernel_size=9)
BLUR_SIGMA = (0.1, 2.0)
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, what PIL's convert("L") and torchvision's grayscale use


# ------------------------------------------------------------------------------------------------ random parameters
@dataclass(frozen=True)
class Params:
    """One sample's random draws. crop = (top, left, height, width) in original pixels, like torchvision."""
    crop: tuple[int, int, int, int]
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    grayscale: bool = False
    blur_sigma: float | None = None


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=gen).item())


def _bernoulli(gen: torch.Generator, p: float) -> bool:
    return p > 0 and bool(torch.rand(1, generator=gen).item() < p)


def sample_crop(gen: torch.Generator, width: int, height: int, scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, draw for draw, on `gen` instead of the global RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(gen, scale[0], scale[1])
        aspect = math.exp(_uniform(gen, log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop at the nearest allowed aspect ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(gen: torch.Generator, aug: AugmentConfig, width: int, height: int) -> Params:
    """Training draws in torchvision's order: crop, flip, jitter factors, grayscale, blur."""
    if aug.crop_scale_min < 1.0:
        crop = sample_crop(gen, width, height, (aug.crop_scale_min, 1.0), (aug.crop_ratio_min, aug.crop_ratio_max))
    else:
        crop = (0, 0, height, width)
    flip = _bernoulli(gen, aug.hflip_prob)
    j = aug.color_jitter
    b, c, s = (_uniform(gen, max(0.0, 1 - j), 1 + j) for _ in range(3)) if j > 0 else (1.0, 1.0, 1.0)
    gray = _bernoulli(gen, aug.grayscale_prob)
    sigma = _uniform(gen, *BLUR_SIGMA) if _bernoulli(gen, aug.blur_prob) else None
    return Params(crop, flip, b, c, s, gray, sigma)


# ------------------------------------------------------------------------------------------------------ image path
def decode_for_crop(image: Image.Image, crop: tuple[int, int, int, int], size: int) -> tuple[torch.Tensor, int]:
    """Decode an opened (not yet loaded) image just finely enough that the crop keeps >= size x size pixels.

    Returns (pixels uint8 [3, h, w], scale) with decoded = original / scale; only JPEG decodes at reduced scale
    (1/2, 1/4, 1/8). The tensor is a channel-first view of the read-only array np.asarray makes (one copy out of
    PIL); it is only read, as the resize writes new memory, so a writable second copy of the largest array of the
    pipeline is not needed."""
    width, height = image.size
    _, _, h, w = crop
    drafted = image.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
    scale = round(width / drafted[1][2]) if drafted is not None else 1
    image.load()  # raises on truncated or corrupt data (PIL's LOAD_TRUNCATED_IMAGES stays off)
    if image.mode != "RGB":
        image = image.convert("RGB")  # grey, palette, CMYK, alpha, 16-bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": see the docstring
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1), scale


def crop_in_decoded(crop: tuple[int, int, int, int], scale: int, height: int, width: int
                    ) -> tuple[int, int, int, int]:
    """The crop in reduced-scale pixels, rounded to whole pixels and kept inside the decoded image. Times `scale`
    it is the crop actually taken, so the boxes follow it (at most scale/2 original pixels from the drawn one,
    under half an output pixel since the crop spans >= size decoded pixels)."""
    top, left, h, w = crop
    h_d, w_d = max(1, min(height, round(h / scale))), max(1, min(width, round(w / scale)))
    return min(round(top / scale), height - h_d), min(round(left / scale), width - w_d), h_d, w_d


def image_geometry(pixels: torch.Tensor, crop: tuple[int, int, int, int], flip: bool, size: int) -> torch.Tensor:
    """Crop + resize in one antialiased bilinear pass (torch's vectorised uint8 kernel, what torchvision's tensor
    resize uses: within a grey level of PIL's, several times faster), then the flip. Contiguous uint8 out (the
    kernel may answer channels-last), so that collating is a memcpy."""
    image = F.resized_crop(pixels, *crop, [size, size], antialias=True).contiguous()
    return F.horizontal_flip(image) if flip else image


def color_matrix(p: Params, mean_luma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness, contrast, saturation (then grayscale) as one affine RGB map y = M x + offset."""
    ones = np.ones((3, 1))
    m = p.brightness * p.contrast * (p.saturation * np.eye(3) + (1 - p.saturation) * ones * LUMA)
    offset = p.brightness * (1 - p.contrast) * mean_luma * np.ones((3, 1))
    if p.grayscale:
        m = ones * (LUMA @ m)  # luma of the jittered image in all three channels; the offset is grey already
    return torch.from_numpy(m).float(), torch.from_numpy(offset).float()


def adjust_color(image: torch.Tensor, p: Params) -> torch.Tensor:
    """uint8 [3, S, S] -> uint8, one float pass for all colour ops, rounded and clipped once."""
    if p.brightness == p.contrast == p.saturation == 1.0 and not p.grayscale:
        return image
    x = image.reshape(3, -1).float()
    mean_luma = float(torch.from_numpy(LUMA).float() @ x.mean(dim=1)) if p.contrast != 1.0 else 0.0
    m, offset = color_matrix(p, mean_luma)
    y = torch.addmm(offset + 0.5, m, x).clamp_(0, 255)  # + 0.5 then truncation = rounding, one pass fewer
    return torch.from_numpy(y.numpy().astype(np.uint8)).view(image.shape)  # numpy's cast: ~6x torch's here


def _blur_pass(x: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """One 9-tap pass along `axis` of a padded uint8 array, in uint16 fixed point (weights sum to 256)."""
    n = x.shape[axis] - (BLUR_KERNEL - 1)
    half = BLUR_KERNEL // 2

    def tap(i: int) -> np.ndarray:
        return x[(slice(None),) * axis + (slice(i, i + n),)]

    acc = tap(half).astype(np.uint16)
    acc *= weights[half]
    term = np.empty_like(acc)
    for i in range(half):  # symmetric kernel: add the mirrored taps first (<= 510 * 128 fits in uint16)
        if weights[i]:
            np.add(tap(i), tap(BLUR_KERNEL - 1 - i), out=term, dtype=np.uint16)
            term *= weights[i]
            acc += term
    acc += 128
    acc >>= 8
    return acc.astype(np.uint8)


def blur_weights(sigma: float) -> np.ndarray:
    """torchvision's Gaussian kernel in 1/256 steps, the rounding error folded into the centre tap."""
    x = np.arange(BLUR_KERNEL) - BLUR_KERNEL // 2
    k = np.exp(-0.5 * (x / sigma) ** 2)
    w = np.round(k / k.sum() * 256).astype(np.int64)
    w[BLUR_KERNEL // 2] += 256 - w.sum()
    return w.astype(np.uint16)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """uint8 [3, H, W] Gaussian blur like torchvision's GaussianBlur(9): separable, reflect padding."""
    weights = blur_weights(sigma)
    if weights[BLUR_KERNEL // 2] == 256:
        return image
    half = BLUR_KERNEL // 2
    padded = np.pad(image.numpy(), ((0, 0), (half, half), (half, half)), mode="reflect")
    return torch.from_numpy(_blur_pass(_blur_pass(padded, weights, axis=2), weights, axis=1))


# ------------------------------------------------------------------------------------------------------- box path
def as_boxes(boxes) -> torch.Tensor:
    """A list, array or tensor of xyxy boxes (possibly empty or None) -> float32 [n, 4]."""
    return torch.as_tensor(np.asarray(boxes if boxes is not None else [], dtype=np.float32)).reshape(-1, 4)


def transform_boxes(boxes: torch.Tensor, width: int, height: int, crop: tuple[int, int, int, int], flip: bool,
                    size: int, train: bool) -> torch.Tensor:
    """Original-pixel xyxy boxes -> output pixels. Training: crop (top, left, height, width; boxes clipped to it),
    flip, and drop boxes under 1 px (torchvision's SanitizeBoundingBoxes). Eval: the official scaling
    box * (S/W, S/H), every box kept."""
    bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
    if not train:
        return F.clamp_bounding_boxes(F.resize(bb, [size, size])).as_subclass(torch.Tensor)
    bb = F.resized_crop(bb, *crop, [size, size])
    if flip:
        bb = F.horizontal_flip(bb)
    bb, _ = F.sanitize_bounding_boxes(F.clamp_bounding_boxes(bb), min_size=1.0)
    return bb.as_subclass(torch.Tensor)


def grid_boxes(width: int, height: int, g: int) -> torch.Tensor:
    """A g x g grid of boxes over the image (the official later version's replacement for detector boxes)."""
    xs = torch.linspace(0, width, g + 1)
    ys = torch.linspace(0, height, g + 1)
    return torch.tensor([[xs[i], ys[j], xs[i + 1], ys[j + 1]] for j in range(g) for i in range(g)])


def box_sequence(boxes: torch.Tensor, size: int, max_boxes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official layout: the first max_boxes boxes, then the whole image [0, 0, S, S], zero-padded to max_boxes + 1;
    returns (boxes [max_boxes + 1, 4], mask [max_boxes + 1] with True for real boxes)."""
    kept = boxes[:max_boxes].float().reshape(-1, 4)
    whole = torch.tensor([[0.0, 0.0, float(size), float(size)]])
    real = torch.cat([kept, whole])
    out = torch.zeros(max_boxes + 1, 4)
    out[: real.shape[0]] = real
    mask = torch.zeros(max_boxes + 1, dtype=torch.bool)
    mask[: real.shape[0]] = True
    return out, mask


# ----------------------------------------------------------------------------------------------------- public API
class PairTransform:
    """Encoded image bytes + original-pixel boxes -> (uint8 image [3, S, S], boxes [max_boxes + 1, 4], mask).

    Output is size x size without keeping the aspect ratio (the official dataset code resizes to S x S). Training:
    random resized crop (scale crop_scale_min..1, aspect crop_ratio_min..max; none when crop_scale_min is 1),
    horizontal flip, brightness/contrast/saturation jitter (no hue: captions name colours), grayscale, Gaussian blur
    (9 taps, sigma 0.1..2), each with its AugmentConfig probability; eval: plain resize. See the module docstring
    for how this differs from torchvision at the pixel level. Rows without boxes get a grid x grid grid over the
    output image when grid > 0 (a fixed pooling layout on the network input, as in the official later version).

    Deterministic in (data, boxes, seed): all draws come from a private torch.Generator; the global RNG is never
    touched. Raises on undecodable or truncated data. Picklable (DataLoader workers).
    """

    def __init__(self, aug: AugmentConfig, size: int, max_boxes: int, grid: int, train: bool):
        self.aug, self.size, self.max_boxes, self.grid, self.train = aug, size, max_boxes, grid, train

    def params(self, seed: int, width: int, height: int) -> Params:
        if not self.train:
            return Params(crop=(0, 0, height, width))
        return sample_params(torch.Generator().manual_seed(seed), self.aug, width, height)

    def __call__(self, data: bytes, boxes, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        encoded = Image.open(io.BytesIO(data))  # reads the header only: the crop is drawn before decoding
        width, height = encoded.size
        p = self.params(seed, width, height)
        pixels, scale = decode_for_crop(encoded, p.crop, self.size)
        crop = crop_in_decoded(p.crop, scale, *pixels.shape[1:])
        image = adjust_color(image_geometry(pixels, crop, p.flip, self.size), p)
        if p.blur_sigma is not None:
            image = gaussian_blur(image, p.blur_sigma)
        boxes = as_boxes(boxes)
        taken = tuple(v * scale for v in crop)  # the crop the pixels went through, in original pixels
        out_boxes = transform_boxes(boxes, width, height, taken, p.flip, self.size, self.train)
        if self.grid > 0 and len(boxes) == 0:
            out_boxes = grid_boxes(self.size, self.size, self.grid)
        seq, mask = box_sequence(out_boxes, self.size, self.max_boxes)
        return image, seq, mask

