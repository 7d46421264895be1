"""Image and video front end: pixels -> patch rows for the vision encoder (MODEL_SPEC §6).

    image / frames (uint8 RGB)
      -> smart_resize: both sides multiples of patch·merge (32), pixel count within [min_pixels, max_pixels]
      -> bicubic resize (PIL, or torch's antialiased uint8 kernel = what torchvision runs on CPU)
      -> (x / 255 − mean) / std
      -> patches of [C, temporal_patch, P, P], rows ordered frame group, block row, block col, row in block,
         col in block (so every merge² consecutive rows form one merged token)

This is transformers' Qwen2-VL image processor (the one Qwen3-Omni's processor loads) and its Qwen2-VL
video processor with the Qwen3-Omni processor's video defaults. Images fill the temporal patch by repeating
themselves; videos with a frame count that is not a multiple of the temporal patch repeat their last frame.

Shapes: P = patch_size, T = temporal_patch_size, M = merge_size, (gh, gw) = the patch grid of one frame.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

# transformers' Qwen2VLImageProcessor class defaults (OpenAI CLIP statistics; pixel bounds of Qwen2-VL).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280
# Qwen3OmniMoeProcessor.videos_kwargs overrides the video processor's size with these (in 32-px blocks).
VIDEO_MIN_PIXELS = 128 * 32 * 32
VIDEO_MAX_PIXELS = 768 * 32 * 32
MAX_ASPECT_RATIO = 200

ImageLike = PIL.Image.Image | np.ndarray | torch.Tensor


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """-> (resized_height, resized_width), both multiples of `factor`.

    Rounds each side to the nearest multiple of `factor` (Python's round: halves go to even), then, if the
    area is above `max_pixels`, scales both sides down by the same factor (floored to multiples, at least one
    `factor`), or, if below `min_pixels`, scales them up (ceiled to multiples). Aspect ratios over 200 and
    empty sides are rejected with ValueError.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image must have positive height and width, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio must be at most {MAX_ASPECT_RATIO}, got {height}x{width}")
    resized_height = round(height / factor) * factor
    resized_width = round(width / factor) * factor
    if resized_height * resized_width > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        resized_height = max(factor, math.floor(height / scale / factor) * factor)
        resized_width = max(factor, math.floor(width / scale / factor) * factor)
    elif resized_height * resized_width < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        resized_height = math.ceil(height * scale / factor) * factor
        resized_width = math.ceil(width * scale / factor) * factor
    return resized_height, resized_width


# ----------------------------------------------------------------------------------------------------------
# Pixels in: any accepted input -> uint8 [H, W, 3]
# ----------------------------------------------------------------------------------------------------------

def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    # Transparent pixels are composited onto white, as transformers' convert_to_rgb does.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def load_image(path, what: str = "image") -> PIL.Image.Image:
    """An image file -> a fully decoded PIL image, turned upright by its EXIF orientation (as transformers'
    `load_image` does). Its mode is kept, so transparency is composited onto white later exactly as for a PIL
    image passed in (transformers' loader instead drops the alpha channel of a file, so a file and the same image
    opened by the caller gave different pixels; here both go through `_pil_to_rgb`).
    FileNotFoundError for a missing file; ValueError naming the file when it is not an image or is damaged."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: image file {path!r} does not exist")
    try:
        with PIL.Image.open(path) as handle:
            handle.load()  # decode now: a truncated file fails here, not later inside preprocessing
            return PIL.ImageOps.exif_transpose(handle)
    except PIL.UnidentifiedImageError as exc:
        raise ValueError(f"{what}: {path!r} is not an image file PIL can read ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data; PIL raises all three
        raise ValueError(f"{what}: image file {path!r} is damaged ({exc})") from exc


def _to_rgb_uint8(image: ImageLike, what: str) -> np.ndarray:
    """-> [H, W, 3] uint8. Arrays are [H, W, 3] or [3, H, W] uint8; PIL images of any mode are converted."""
    if isinstance(image, PIL.Image.Image):
        array = _pil_to_rgb(image)
    else:
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise ValueError(f"{what}: expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
        if image.dtype != np.uint8:
            raise ValueError(f"{what}: expected uint8 pixels in [0, 255], got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 3:
            array = image
        elif image.ndim == 3 and image.shape[0] == 3:
            array = np.moveaxis(image, 0, -1)
        else:
            raise ValueError(f"{what}: expected 3 (RGB) channels as [H, W, 3] or [3, H, W], got shape {image.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what}: image is empty, shape {array.shape}")
    if not array.flags.writeable:  # PIL-backed arrays are read-only; torch.from_numpy wants writable memory
        array = array.copy()
    return np.ascontiguousarray(array)


def _resize(frames: np.ndarray, height: int, width: int, backend: str) -> torch.Tensor:
    """frames: [N, H, W, 3] uint8 -> [N, 3, height, width] uint8 tensor, bicubic with antialiasing."""
    if frames.shape[1:3] == (height, width):
        return torch.from_numpy(frames).permute(0, 3, 1, 2)
    if backend == "pil":
        # Qwen2VLImageProcessorPil: PIL's bicubic filter on the uint8 image.
        out = [np.asarray(PIL.Image.fromarray(f).resize((width, height), resample=PIL.Image.BICUBIC)) for f in frames]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    if backend == "torch":
        # torchvision's tensor resize on CPU: torch's native uint8 antialiased bicubic. Same filter as PIL,
        # but intermediate rounding/clamping differs (mostly ±1; more where one axis grows and one shrinks).
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
        return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    raise ValueError(f"resize_backend must be 'pil' or 'torch', got {backend!r}")


def _normalize(frames: torch.Tensor, image_mean: Sequence[float], image_std: Sequence[float]) -> torch.Tensor:
    """frames: [N, 3, H, W] uint8 -> float32 (x / 255 − mean) / std, fused as (x − 255·mean) / (255·std)."""
    mean = torch.tensor(image_mean, dtype=torch.float64).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(image_std, dtype=torch.float64).view(1, 3, 1, 1) * 255.0
    return (frames.to(torch.float32) - mean.float()) / std.float()


def _target_size(height: int, width: int, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int,
                 what: str) -> tuple[int, int]:
    factor = patch_size * merge_size
    try:
        resized_height, resized_width = smart_resize(height, width, factor, min_pixels, max_pixels)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from exc
    if resized_height < factor or resized_width < factor:
        raise ValueError(f"{what}: {height}x{width} resizes to {resized_height}x{resized_width}, smaller than one "
                         f"{factor}x{factor} merged patch (min_pixels={min_pixels}, max_pixels={max_pixels})")
    return resized_height, resized_width


def _patchify(frames: torch.Tensor, patch_size: int, temporal_patch_size: int, merge_size: int) -> torch.Tensor:
    """frames: [T', 3, H, W] float32 with T' a multiple of temporal_patch_size
    -> [T'/T * gh * gw, 3*T*P*P], rows in (group, block row, block col, row in block, col in block) order."""
    num_frames, channels, height, width = frames.shape
    grid_t, grid_h, grid_w = num_frames // temporal_patch_size, height // patch_size, width // patch_size
    P, T, M = patch_size, temporal_patch_size, merge_size
    x = frames.reshape(grid_t, T, channels, grid_h // M, M, P, grid_w // M, M, P)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/M, gw/M, M, M, C, T, P, P]
    return x.reshape(grid_t * grid_h * grid_w, channels * T * P * P)


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------

def preprocess_images(images: Sequence[ImageLike], patch_size: int = 16, temporal_patch_size: int = 2,
                      merge_size: int = 2, min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS,
                      image_mean: Sequence[float] = IMAGE_MEAN, image_std: Sequence[float] = IMAGE_STD,
                      resize_backend: str = "pil") -> tuple[torch.Tensor, torch.Tensor]:
    """images: list of PIL images (any mode), or uint8 RGB arrays/tensors [H, W, 3] or [3, H, W]
    -> pixel_values [sum_i gh_i*gw_i, 3*T*P*P] float32 (CPU), image_grid_thw [num_images, 3] int64 (rows
       (1, gh, gw)).

    Each image is resized to smart_resize(H, W, P*M, min_pixels, max_pixels), normalised and cut into P×P
    patches; the patch is repeated T times along time, so one image is one temporal group. Rows follow
    transformers' order (block row, block col, row in block, col in block), images concatenated in order.
    resize_backend "pil" matches Qwen2VLImageProcessorPil; "torch" follows the torchvision-backed
    Qwen2VLImageProcessor on CPU (same bicubic filter, different intermediate rounding: on noise images ~1e-2
    relative apart from "pil"). Both are identical when the image already has its target size.
    """
    if len(images) == 0:
        raise ValueError("preprocess_images needs at least one image")
    all_patches, grids = [], []
    for i, image in enumerate(images):
        what = f"image {i}"
        pixels = _to_rgb_uint8(image, what)
        height, width = _target_size(pixels.shape[0], pixels.shape[1], patch_size, merge_size, min_pixels,
                                     max_pixels, what)
        frames = _normalize(_resize(pixels[None], height, width, resize_backend), image_mean, image_std)
        frames = frames.expand(temporal_patch_size, -1, -1, -1)  # [T, 3, H, W]: the image fills the group
        all_patches.append(_patchify(frames, patch_size, temporal_patch_size, merge_size))
        grids.append((1, height // patch_size, width // patch_size))
    return torch.cat(all_patches), torch.tensor(grids, dtype=torch.long)


def preprocess_video(frames: np.ndarray | torch.Tensor | Sequence[ImageLike], fps: float = 1.0,
                     patch_size: int = 16, temporal_patch_size: int = 2, merge_size: int = 2,
                     min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                     image_mean: Sequence[float] = IMAGE_MEAN, image_std: Sequence[float] = IMAGE_STD,
                     resize_backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """frames: [num_frames, H, W, 3] (or [num_frames, 3, H, W]) uint8, or a list of same-size images;
    fps: the rate the frames were sampled at
    -> pixel_values_videos [grid_t*gh*gw, 3*T*P*P] float32 (CPU), video_grid_thw [1, 3] int64,
       video_second_per_grid [1] float32 (= temporal_patch_size / fps, as Qwen3OmniMoeProcessor sets it).

    Every frame gets the same smart_resize target (video pixel bounds by default), then normalisation; the
    last frame is repeated up to a multiple of temporal_patch_size; each group of T consecutive frames forms
    one temporal patch, rows ordered (group, block row, block col, row in block, col in block). No frame
    sampling and no total-pixel cap (transformers' defaults: do_sample_frames and cap_pixels_per_frame off).
    resize_backend "torch" follows the torchvision-backed Qwen2VLVideoProcessor on CPU (transformers has no
    other video processor); "pil" resizes each frame like the PIL image processor.
    """
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        if frames.ndim != 4:
            raise ValueError(f"video must be [num_frames, H, W, 3] or [num_frames, 3, H, W], got shape "
                             f"{tuple(frames.shape)}")
        frames = list(frames)
    if len(frames) == 0:
        raise ValueError("video has no frames")
    pixels = [_to_rgb_uint8(frame, f"video frame {i}") for i, frame in enumerate(frames)]
    if any(p.shape != pixels[0].shape for p in pixels):
        raise ValueError(f"video frames differ in size: {sorted({p.shape for p in pixels})}")
    height, width = _target_size(pixels[0].shape[0], pixels[0].shape[1], patch_size, merge_size, min_pixels,
                                 max_pixels, "video")
    video = _normalize(_resize(np.stack(pixels), height, width, resize_backend), image_mean, image_std)
    if pad := -len(pixels) % temporal_patch_size:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])  # [T', 3, H, W]
    patches = _patchify(video, patch_size, temporal_patch_size, merge_size)
    grid_thw = torch.tensor([[video.shape[0] // temporal_patch_size, height // patch_size, width // patch_size]],
                            dtype=torch.long)
    second_per_grid = torch.tensor([temporal_patch_size / fps], dtype=torch.float32)
    return patches, grid_thw, second_per_grid
