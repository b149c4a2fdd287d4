"""PairTransform: boxes follow the pixels (property tests on drawn rectangles), the official eval layout,
determinism without the global RNG, input modes, and the pixel ops against torchvision's."""
from __future__ import annotations

import io
import pickle
import random
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, UnidentifiedImageError
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from brivl_ds.config import AugmentConfig, base
from brivl_ds.bench import data as bench
from brivl_ds.data.transforms import PairTransform, Params, adjust_color, gaussian_blur, sample_crop

BACKGROUND, DRAWN = (20, 90, 200), (250, 220, 30)
GEOMETRY = AugmentConfig(crop_scale_min=0.25, hflip_prob=0.5)  # crop, flip, resize; no colour ops
S = 48


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def photo(width: int = 120, height: int = 90, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def drawn_mask(image: torch.Tensor, tol: int) -> np.ndarray:
    """[S, S] bool: output pixels of (nearly) the drawn colour."""
    diff = (image.permute(1, 2, 0).numpy().astype(int) - np.array(DRAWN)).__abs__().max(axis=-1)
    return diff <= tol


def centres_inside(box: np.ndarray, margin: float) -> np.ndarray:
    """[S, S] bool: pixels whose centre lies inside `box` grown by `margin` (shrunk if negative)."""
    c = np.arange(S) + 0.5
    x1, y1, x2, y2 = box
    inx = (c >= x1 - margin) & (c <= x2 + margin)
    iny = (c >= y1 - margin) & (c <= y2 + margin)
    return iny[:, None] & inx[None, :]


@st.composite
def scenes(draw):
    """An image at least 1.5 S on each side (the crop is never upscaled much) with one rectangle, 1 px and up."""
    w, h = draw(st.integers(72, 200)), draw(st.integers(72, 200))
    x1, y1 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
    x2, y2 = draw(st.integers(x1 + 1, w)), draw(st.integers(y1 + 1, h))
    return w, h, (x1, y1, x2, y2), draw(st.integers(0, 2**31 - 1))


def check_box_matches_pixels(data: bytes, box, seed: int, tol: int, margin: float, inside_share: float,
                             outside_share: float) -> None:
    image, seq, mask = PairTransform(GEOMETRY, S, 4, 0, train=True)(data, [box], seed)
    drawn = drawn_mask(image, tol)
    if mask.sum() == 2:  # the box survived: it is the drawn rectangle's image, no bigger and no smaller
        out = seq[0].numpy()
        assert (0 <= out).all() and (out <= S).all() and out[2] - out[0] >= 1 and out[3] - out[1] >= 1
        interior = centres_inside(out, -margin)
        if interior.sum() >= 4:
            assert drawn[interior].mean() >= inside_share, "pixels inside the box are not the drawn colour"
        outside = drawn & ~centres_inside(out, margin)
        assert outside.sum() <= outside_share * max(drawn.sum(), 1), "drawn pixels lie outside the box"
    else:  # dropped: at most a sub-pixel sliver of the rectangle is left
        assert mask.sum() == 1 and torch.equal(seq[0], torch.tensor([0.0, 0, S, S]))
        assert drawn.sum() <= S


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes())
def test_boxes_follow_pixels_png(scene):
    w, h, box, seed = scene
    image = Image.new("RGB", (w, h), BACKGROUND)
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=DRAWN)
    check_box_matches_pixels(encode(image), box, seed, tol=40, margin=1.5, inside_share=1.0, outside_share=0.0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes())
def test_boxes_follow_pixels_jpeg(scene):
    """JPEG exercises the reduced-scale decode (crops of 2-4 S decode at 1/2 or 1/4) and its crop snapping."""
    w, h, box, seed = scene
    image = Image.new("RGB", (w, h), BACKGROUND)
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=DRAWN)
    data = encode(image, "JPEG", quality=95, subsampling=0)
    check_box_matches_pixels(data, box, seed, tol=60, margin=2.5, inside_share=0.95, outside_share=0.02)


def test_crop_is_drawn_like_torchvision():
    for seed in range(50):
        width, height = 100 + 7 * seed, 400 - 5 * seed
        ours = sample_crop(torch.Generator().manual_seed(seed), width, height, (0.25, 1.0), (3 / 4, 4 / 3))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            theirs = RandomResizedCrop.get_params(torch.empty(3, height, width), [0.25, 1.0], [3 / 4, 4 / 3])
        assert ours == tuple(theirs)


def test_eval_scales_boxes_like_the_official_code():
    w, h, size = 300, 200, 64
    boxes = [[10.0, 20.0, 110.0, 120.0], [0.0, 0.0, 300.0, 200.0], [250.5, 150.25, 299.0, 199.0]]
    image, seq, mask = PairTransform(AugmentConfig(), size, 5, 6, train=False)(encode(photo(w, h)), boxes, 0)
    expected = torch.tensor(boxes) * torch.tensor([size / w, size / h, size / w, size / h])
    assert image.shape == (3, size, size) and image.dtype == torch.uint8
    assert torch.allclose(seq[:3], expected, atol=1e-4)
    assert torch.equal(seq[3], torch.tensor([0.0, 0.0, size, size]))
    assert torch.equal(seq[4:], torch.zeros(2, 4))
    assert mask.tolist() == [True, True, True, True, False, False]
    _, seq, _ = PairTransform(AugmentConfig(), size, 5, 0, train=False)(encode(photo(w, h)), [[-9.0, -9, 320, 210]], 0)
    assert torch.equal(seq[0], torch.tensor([0.0, 0, size, size]))  # clipped to the image


def test_at_most_max_boxes_plus_the_whole_image():
    boxes = [[i, i, i + 20.0, i + 10.0] for i in range(40)]
    for train in (False, True):
        _, seq, mask = PairTransform(base().data.augment, 32, 36, 0, train)(encode(photo()), np.array(boxes), 3)
        assert seq.shape == (37, 4) and mask.shape == (37,) and mask.dtype == torch.bool
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert torch.equal(seq[n - 1], torch.tensor([0.0, 0.0, 32, 32])) and (seq[n:] == 0).all()
    assert n <= 37


def test_grid_fallback_only_for_rows_without_boxes():
    data = encode(photo())
    _, seq, mask = PairTransform(AugmentConfig(), 60, 36, 6, train=True)(data, [], 0)
    assert mask.all()
    assert torch.allclose(seq[0], torch.tensor([0.0, 0, 10, 10]))
    assert torch.allclose(seq[35], torch.tensor([50.0, 50, 60, 60]))
    _, _, mask = PairTransform(AugmentConfig(), 60, 36, 0, train=True)(data, None, 0)
    assert mask.sum() == 1  # grid 0: the whole image only
    _, seq, mask = PairTransform(AugmentConfig(), 60, 36, 6, train=True)(data, [[0.0, 0, 60, 45]], 0)
    assert mask.sum() == 2 and torch.allclose(seq[0], torch.tensor([0.0, 0, 30, 30]))


def test_deterministic_in_seed_and_leaves_global_rng_alone():
    t = PairTransform(base().data.augment, 48, 8, 0, train=True)
    data, boxes = encode(photo(200, 150), "JPEG", quality=90), [[10.0, 10, 150, 120], [100.0, 50, 190, 140]]
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = t(data, boxes, 7)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]
    for a, b in zip(first, t(data, boxes, 7)):
        assert torch.equal(a, b)
    others = [t(data, boxes, seed) for seed in range(8, 12)]
    assert all(not torch.equal(first[0], o[0]) for o in others)
    assert pickle.loads(pickle.dumps(t))(data, boxes, 7)[0].equal(first[0])  # DataLoader workers


@pytest.mark.parametrize("cut", [None, 0.5])
def test_undecodable_or_truncated_bytes_raise(cut):
    t = PairTransform(AugmentConfig(), 32, 4, 0, train=False)
    if cut is None:
        data = b"not an image" * 100
    else:
        data = encode(photo(200, 150), "JPEG")
        data = data[: int(len(data) * cut)]
    # PIL's own errors (LOAD_TRUNCATED_IMAGES stays off): never a silently grey or partial image
    with pytest.raises(UnidentifiedImageError if cut is None else OSError,
                       match="cannot identify image file" if cut is None else "image file is truncated"):
        t(data, [], 0)
    png = encode(photo(200, 150))
    with pytest.raises(OSError, match="image file is truncated"):
        t(png[: len(png) // 2], [], 0)


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("L", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"),
                                      ("CMYK", "JPEG"), ("RGB", "WEBP"), ("I;16", "PNG"), ("1", "PNG")])
def test_any_input_mode_gives_rgb_uint8(mode, fmt):
    image = photo(90, 70).convert(mode) if mode != "I;16" else Image.new("I;16", (90, 70), 3000)
    for train in (False, True):
        out, _, _ = PairTransform(base().data.augment, 40, 4, 0, train)(encode(image, fmt), [], 1)
        assert out.shape == (3, 40, 40) and out.dtype == torch.uint8 and out.is_contiguous()


def test_reduced_scale_decode_matches_full_decode():
    """A 640 x 480 JPEG at 64 px eval decodes at 1/4; the result is the full decode's resize, up to filtering."""
    yy, xx = np.mgrid[0:480, 0:640]
    pixels = np.stack([xx * 255 // 640, yy * 255 // 480, (xx + yy) % 256 // 2], axis=-1).astype(np.uint8)
    data = encode(Image.fromarray(pixels), "JPEG", quality=95)
    ours, _, _ = PairTransform(AugmentConfig(), 64, 4, 0, train=False)(data, [], 0)
    full = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
    reference = F.resize(full, [64, 64], antialias=True)
    assert (ours.int() - reference.int()).abs().float().mean() < 2.0


def test_colour_matrix_matches_torchvision_where_nothing_clips():
    """The fused matrix equals torchvision's op-by-op jitter + grayscale when no op saturates a pixel."""
    image = torch.from_numpy(np.random.default_rng(0).integers(90, 166, (3, 32, 32), dtype=np.uint8))
    for b, c, s, gray in [(1.1, 0.8, 1.3, False), (0.9, 1.2, 0.7, False), (1.05, 0.9, 1.2, True)]:
        ours = adjust_color(image, Params(crop=(0, 0, 32, 32), brightness=b, contrast=c, saturation=s, grayscale=gray))
        x = image.float() / 255
        x = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(x, b), c), s)
        x = F.rgb_to_grayscale(x, num_output_channels=3) if gray else x
        assert (ours.float() - x * 255).abs().max() <= 1.0


def test_blur_matches_torchvision():
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 40, 50), dtype=np.uint8))
    for sigma in (0.3, 0.8, 1.5, 2.0):
        reference = F.gaussian_blur(image.float(), [9, 9], [sigma, sigma])
        assert (gaussian_blur(image, sigma).float() - reference).abs().max() <= 2.0
    assert torch.equal(gaussian_blur(image, 0.1), image)  # sigma 0.1: the 8-bit kernel is the identity


def test_bench_quick_runs(capsys):
    report = bench.main(["--quick", "--n", "4", "--stages"])
    assert set(report["sizes"]) == {64}
    assert "samples/s" in capsys.readouterr().out


def test_bench_stage_timer_runs_the_same_transform():
    """The bench times PairTransform's steps one by one; they must still add up to PairTransform."""
    t = PairTransform(base().data.augment, 40, 8, 6, train=True)
    for seed, (data, boxes) in enumerate(bench.make_inputs(6, 120)):
        boxes = boxes if seed % 2 else []
        for a, b in zip(t(data, boxes, seed), bench.timed_sample(t, data, boxes, seed, Counter())):
            assert torch.equal(a, b)
