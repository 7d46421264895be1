"""A minimal torchvision stand-in (transformers' Qwen2-VL video processor imports torchvision, which this
environment cannot install): just what the processor calls, with torchvision's CPU uint8 bicubic resize
(`F.interpolate(..., "bicubic", antialias=True)` on uint8, transcribed from torchvision's `resize_image`).
Put the folder `write_standin` fills first on PYTHONPATH of a subprocess that runs the processor."""

import os
import textwrap

TORCHVISION_STANDIN = {
    "torchvision/__init__.py": '__version__ = "0.0.0+standin"\n',
    "torchvision/io/__init__.py": "",  # transformers' video_utils imports it (for decoding, unused here)
    "torchvision/transforms/__init__.py": "from .v2.functional import InterpolationMode\nfrom . import v2\n",
    "torchvision/transforms/functional.py": "def pil_to_tensor(pic):\n    raise NotImplementedError\n",
    "torchvision/transforms/v2/__init__.py": "from . import functional\n",
    "torchvision/transforms/v2/functional.py": textwrap.dedent('''
        import enum
        import torch
        import torch.nn.functional as F

        class InterpolationMode(enum.Enum):
            NEAREST = "nearest"
            NEAREST_EXACT = "nearest-exact"
            BILINEAR = "bilinear"
            BICUBIC = "bicubic"
            BOX = "box"
            HAMMING = "hamming"
            LANCZOS = "lanczos"

        def resize(image, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
            # torchvision resize_image, CPU uint8 bicubic: native uint8 interpolate, align_corners=False
            assert interpolation == InterpolationMode.BICUBIC and image.dtype == torch.uint8
            *lead, c, h, w = image.shape
            if (h, w) == tuple(size):
                return image
            out = F.interpolate(image.reshape(-1, c, h, w), size=list(size), mode="bicubic",
                                align_corners=False, antialias=antialias)
            return out.reshape(*lead, c, *size)

        def normalize(image, mean, std, inplace=False):
            mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
            std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
            return image.sub_(mean).div_(std) if inplace else (image - mean) / std

        def grayscale_to_rgb(image):
            return image if image.shape[-3] == 3 else image.expand(*image.shape[:-3], 3, *image.shape[-2:])
    '''),
}



def write_standin(folder: str) -> str:
    """Write the stand-in package under `folder` -> folder (for PYTHONPATH)."""
    for rel_path, text in TORCHVISION_STANDIN.items():
        os.makedirs(os.path.dirname(os.path.join(folder, rel_path)), exist_ok=True)
        with open(os.path.join(folder, rel_path), "w") as handle:
            handle.write(text)
    return folder
