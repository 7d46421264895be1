"""Image/video front end (MODEL_SPEC §6) against transformers' Qwen2-VL processors as Qwen3-Omni configures
them (patch 16, temporal patch 2, merge 2).

Images: compared with Qwen2VLImageProcessorPil, the transformers image processor that runs without
torchvision (the default Qwen2VLImageProcessor needs it, and it is not installed here).
Videos: transformers' only video processor (Qwen2VLVideoProcessor) imports torchvision. We check the video
path two ways: (1) against the PIL image processor run on every frame (hand-derived layout: a video row is
the per-frame rows of its two frames interleaved along time), and (2) against Qwen2VLVideoProcessor itself,
run in a subprocess on a minimal torchvision stand-in whose resize is torchvision's CPU uint8 path
(`F.interpolate(..., "bicubic", antialias=True)` on uint8, transcribed from torchvision's `resize_image`).
"""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

from tests.torchvision_standin import TORCHVISION_STANDIN as _TORCHVISION_STANDIN  # noqa: E402

_RUN_VIDEO_PROCESSOR = textwrap.dedent('''
    import json, sys
    import numpy as np, torch
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor
    spec = json.loads(sys.argv[1])
    processor = Qwen2VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    videos = [np.load(path) for path in spec["inputs"]]
    for video, out_path in zip(videos, spec["outputs"]):
        out = processor(videos=[video], return_tensors="pt", cap_pixels_per_frame=False,
                        **Qwen3OmniMoeProcessor.videos_kwargs)  # what the Qwen3-Omni processor passes
        torch.save({k: out[k] for k in ("pixel_values_videos", "video_grid_thw")}, out_path)
''')


def _start_video_reference():
    """Runs transformers' Qwen2VLVideoProcessor on the torchvision stand-in, in a subprocess started at import,
    before this process imports transformers, so the two ~10 s imports overlap.
    -> (seed, process, videos, output paths, stderr path); the video test waits for it."""
    seed = int(np.random.SeedSequence().generate_state(1)[0])
    rng = np.random.default_rng(seed)
    tmp = tempfile.mkdtemp(prefix="omni_rt_hf_video_")
    for rel_path, text in _TORCHVISION_STANDIN.items():
        os.makedirs(os.path.dirname(os.path.join(tmp, rel_path)), exist_ok=True)
        with open(os.path.join(tmp, rel_path), "w") as f:
            f.write(text)
    # odd frame count + upscale, 4:3 downscale, extreme aspect, no resize needed
    shapes = [(5, 61, 83), (4, 480, 640), (2, 37, 1000), (3, 352, 384)]
    videos = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]
    spec = {"inputs": [os.path.join(tmp, f"video{i}.npy") for i in range(len(videos))],
            "outputs": [os.path.join(tmp, f"ref{i}.pt") for i in range(len(videos))]}
    for video, path in zip(videos, spec["inputs"]):
        np.save(path, video)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tmp, repo]))
    stderr_path = os.path.join(tmp, "stderr.txt")
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", _RUN_VIDEO_PROCESSOR, json.dumps(spec)], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)

    def cleanup():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(cleanup)
    return seed, proc, videos, spec["outputs"], stderr_path


_HF_VIDEO = _start_video_reference()

import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2vl  # noqa: E402
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor  # noqa: E402

from runtime.frontend.vision import (  # noqa: E402
    IMAGE_MAX_PIXELS,
    IMAGE_MEAN,
    IMAGE_MIN_PIXELS,
    IMAGE_STD,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    preprocess_images,
    preprocess_video,
    smart_resize,
)
from tests.oracle import rel_err  # noqa: E402

TOL = 1e-5
PATCH = dict(patch_size=16, temporal_patch_size=2, merge_size=2)
# PIL and torch's uint8 antialiased bicubic use the same filter but round and clamp between their two
# separable passes differently; on noise images (big overshoot) that moves ~2% of values, measured rel <= 1.6e-2.
TORCH_VS_PIL_TOL = 3e-2


@pytest.fixture
def rng():
    seed = int(torch.randint(0, 2**31, ()).item())
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def hf_image_processor(**kwargs):
    return hf_qwen2vl.Qwen2VLImageProcessorPil(**PATCH, **kwargs)


def random_image(rng, height, width, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def report(name, ours, ref):
    err = rel_err(ours, ref)
    print(f"{name}: rows={ours.shape[0]} rel_err={err:.2e} max_abs={(ours - ref).abs().max().item():.2e}")
    return err


def test_defaults_are_transformers_defaults():
    cls = hf_qwen2vl.Qwen2VLImageProcessorPil
    assert (IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS) == (cls.size["shortest_edge"], cls.size["longest_edge"])
    assert np.allclose(IMAGE_MEAN, cls.image_mean, rtol=0, atol=0)
    assert np.allclose(IMAGE_STD, cls.image_std, rtol=0, atol=0)
    video_size = Qwen3OmniMoeProcessor.videos_kwargs["size"]
    assert (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS) == (video_size["shortest_edge"], video_size["longest_edge"])


def test_smart_resize_matches_transformers(rng):
    cases = [(37, 53), (700, 500), (32, 32), (48, 16), (16, 48), (1, 150), (5000, 30), (3000, 4000)]
    cases += [tuple(int(v) for v in rng.integers(1, 2000, 2)) for _ in range(300)]
    bounds = [(IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS), (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS), (1, 10**9), (10**5, 2 * 10**5)]
    for height, width in cases:
        if max(height, width) / min(height, width) > 200:
            continue
        for factor in (28, 32):
            for lo, hi in bounds:
                assert smart_resize(height, width, factor, lo, hi) == hf_qwen2vl.smart_resize(height, width, factor, lo, hi)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)


def test_images_match_transformers(rng):
    """Odd, tiny, prime, large and non-RGB images in one call: values within 1e-5, grids exact."""
    sizes = [(37, 53), (700, 500), (64, 96), (1, 150), (149, 151)]
    sizes += [tuple(int(v) for v in rng.integers(20, 900, 2)) for _ in range(3)]
    images = [random_image(rng, h, w) for h, w in sizes]
    images += [random_image(rng, 61, 47, "RGBA"), random_image(rng, 90, 70, "L")]
    ref = hf_image_processor()(images, return_tensors="pt")
    pixel_values, grid_thw = preprocess_images(images)
    print(f"sizes={sizes} grids={grid_thw.tolist()}")
    assert pixel_values.dtype == torch.float32 and grid_thw.dtype == torch.long
    assert torch.equal(grid_thw, ref["image_grid_thw"])
    assert report("images", pixel_values, ref["pixel_values"]) <= TOL
    assert pixel_values.shape == (int(grid_thw.prod(-1).sum()), 3 * 2 * 16 * 16)


def test_images_with_overrides_match_transformers(rng):
    """A checkpoint's preprocessor_config overrides: pixel bounds that force up- and down-scaling, other stats."""
    overrides = dict(min_pixels=200 * 200, max_pixels=300 * 300, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    images = [random_image(rng, h, w) for h, w in [(37, 53), (700, 500), (250, 260)]]
    ref = hf_image_processor(**overrides)(images, return_tensors="pt")
    pixel_values, grid_thw = preprocess_images(images, **overrides)
    assert torch.equal(grid_thw, ref["image_grid_thw"])
    assert report("images+overrides", pixel_values, ref["pixel_values"]) <= TOL


def test_array_inputs_equal_pil_input(rng):
    pixels = rng.integers(0, 256, (123, 77, 3), dtype=np.uint8)
    expected = preprocess_images([PIL.Image.fromarray(pixels)])
    for image in (pixels, torch.from_numpy(pixels), torch.from_numpy(pixels).permute(2, 0, 1),
                  np.moveaxis(pixels, -1, 0)):
        got = preprocess_images([image])
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_image_repeats_over_time_and_block_order(rng):
    """Hand check of the layout on an image that needs no resize: row = (block row, block col, in-row, in-col),
    each row [C, T, P, P] with both time steps equal to the normalised patch."""
    pixels = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 4x6 patches, already a multiple of 32
    pixel_values, grid_thw = preprocess_images([pixels])
    assert grid_thw.tolist() == [[1, 4, 6]]
    normed = (torch.from_numpy(pixels).permute(2, 0, 1).double() / 255 - torch.tensor(IMAGE_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGE_STD).view(3, 1, 1)
    rows = pixel_values.view(-1, 3, 2, 16, 16)
    index = 0
    for block_row in range(2):
        for block_col in range(3):
            for in_row in range(2):
                for in_col in range(2):
                    r, c = 2 * block_row + in_row, 2 * block_col + in_col
                    patch = normed[:, 16 * r:16 * (r + 1), 16 * c:16 * (c + 1)]
                    assert rel_err(rows[index, :, 0], patch) <= TOL and torch.equal(rows[index, :, 0], rows[index, :, 1])
                    index += 1


def test_torch_resize_backend_close_to_pil(rng):
    images = [random_image(rng, h, w) for h, w in [(37, 53), (700, 500)]]
    pil, grid_pil = preprocess_images(images)
    tv, grid_tv = preprocess_images(images, resize_backend="torch")
    assert torch.equal(grid_pil, grid_tv)
    assert report("torch vs pil resize", tv, pil) <= TORCH_VS_PIL_TOL


# ----------------------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------------------

def video_reference_from_image_processor(frames, **kwargs):
    """Video rows built from the PIL image processor run frame by frame: the row of (group g, patch s) is frame
    2g's patch s and frame 2g+1's patch s stacked along time; an odd last frame is repeated."""
    processor = hf_image_processor(min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS, **kwargs)
    per_frame = [processor([PIL.Image.fromarray(f)], return_tensors="pt") for f in frames]
    grid = per_frame[0]["image_grid_thw"][0]
    patches = [out["pixel_values"].view(-1, 3, 2, 16, 16)[:, :, 0] for out in per_frame]  # [S, C, P, P] each
    if len(patches) % 2:
        patches.append(patches[-1])
    groups = [torch.stack(patches[i:i + 2], dim=2) for i in range(0, len(patches), 2)]  # [S, C, 2, P, P]
    rows = torch.cat(groups).reshape(-1, 3 * 2 * 16 * 16)
    return rows, torch.tensor([[len(groups), int(grid[1]), int(grid[2])]])


@pytest.mark.parametrize("num_frames,height,width", [(5, 61, 83), (4, 360, 500), (1, 300, 200)])
def test_video_layout_against_per_frame_image_processor(rng, num_frames, height, width):
    frames = rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)
    fps = float(rng.uniform(0.5, 4.0))
    ref_rows, ref_grid = video_reference_from_image_processor(frames)
    pixel_values, grid_thw, second_per_grid = preprocess_video(frames, fps=fps, resize_backend="pil")
    assert torch.equal(grid_thw, ref_grid)
    assert report(f"video {num_frames}x{height}x{width}", pixel_values, ref_rows) <= TOL
    assert second_per_grid.tolist() == pytest.approx([2 / fps])
    # The default (torchvision's) resize is close to PIL's (equal when no resize is needed).
    default, grid_default, _ = preprocess_video(list(frames), fps=fps)
    assert torch.equal(grid_default, grid_thw) and rel_err(default, pixel_values) <= TORCH_VS_PIL_TOL


def test_video_without_resize_is_backend_independent(rng):
    frames = torch.from_numpy(rng.integers(0, 256, (3, 352, 384, 3), dtype=np.uint8))  # 352*384 >= min, /32
    pil = preprocess_video(frames, resize_backend="pil")
    tv = preprocess_video(frames.permute(0, 3, 1, 2))  # channels-first tensors are accepted too
    assert all(torch.equal(a, b) for a, b in zip(pil, tv))
    assert pil[1].tolist() == [[2, 22, 24]] and pil[2].tolist() == [2.0]  # fps 1 -> 2 s per temporal patch


def test_video_matches_transformers_video_processor():
    """Default (torchvision) resize backend against Qwen2VLVideoProcessor with the Qwen3-Omni video sizes."""
    seed, proc, videos, outputs, stderr_path = _HF_VIDEO
    print(f"video reference seed={seed}")
    proc.wait(timeout=180)
    with open(stderr_path) as f:
        assert proc.returncode == 0, f.read()[-3000:]
    for video, out_path in zip(videos, outputs):
        ref = torch.load(out_path)
        pixel_values, grid_thw, _ = preprocess_video(video)
        assert torch.equal(grid_thw, ref["video_grid_thw"])
        assert report(f"video {video.shape} vs Qwen2VLVideoProcessor", pixel_values, ref["pixel_values_videos"]) <= TOL


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------

def test_bad_inputs(rng):
    rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        preprocess_images([rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)])
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        preprocess_images([rng.integers(0, 256, (40, 40), dtype=np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        preprocess_images([rgb.astype(np.float32) / 255])
    with pytest.raises(ValueError, match="at least one image"):
        preprocess_images([])
    with pytest.raises(ValueError, match="smaller than one 32x32"):
        preprocess_images([rng.integers(0, 256, (10, 1000, 3), dtype=np.uint8)], min_pixels=0)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_images([rng.integers(0, 256, (2, 500, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="resize_backend"):
        preprocess_images([rgb], resize_backend="cv2")
    with pytest.raises(ValueError, match="no frames"):
        preprocess_video(np.zeros((0, 40, 40, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="no frames"):
        preprocess_video([])
    with pytest.raises(ValueError, match="differ in size"):
        preprocess_video([rgb, rgb[:32]])
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        preprocess_video(rng.integers(0, 256, (2, 40, 40, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="fps"):
        preprocess_video(rgb[None], fps=0)
