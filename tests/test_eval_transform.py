"""Stage three's evaluation transform, as the papers publish it: the short side resized to the
test scale (256 for 224 crops; here 37 for the tiny model's 32), then the centre crop.

The video is a linear grey ramp, so where each output pixel comes from can be worked out on paper:
pixel (i, j) of the crop samples the frame at x = (j + x0 + 1/2) W / w - 1/2 (likewise y), and a
linear ramp stays linear under any normalised symmetric resize filter. The expected crop is that
formula, not the project's resize code.
"""

from __future__ import annotations

import dataclasses

import av
import numpy as np
import pytest

H, W = 48, 96


def _ramp(x, y):
    return 20 + 1.5 * x + 1.0 * y


def _write_ramp(path, n=8):
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.repeat(np.round(_ramp(xx, yy)).astype(np.uint8)[:, :, None], 3, axis=2)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=8, options={"qp": "0", "preset": "veryfast"})
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for _ in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _expected(short: int, size: int) -> np.ndarray:
    """The (size, size) centre crop of the frame resized to short side ``short``, from the ramp."""
    h, w = short, int(round(W * short / H))
    y0, x0 = (h - size) // 2, (w - size) // 2
    i, j = np.mgrid[0:size, 0:size]
    return _ramp((j + x0 + 0.5) * W / w - 0.5, (i + y0 + 0.5) * H / h - 0.5)


def _tuner(demo_small, paradigm: str, recipe: str):
    from pipeline.datasets import load_dataset
    from stages.augment import AugmentCfg
    from stages.finetune import DistContext, FinetuneCfg, Finetuner
    from stages.recipes import resolve_recipe, stage_three_recipe

    rec = stage_three_recipe(paradigm, recipe)
    base = dataclasses.asdict(FinetuneCfg(paradigm=paradigm, model="tiny", frames=4, workers=0))
    values, _ = resolve_recipe(rec, {}, base)
    spec = load_dataset("demo", data_root=demo_small.root)
    return Finetuner(spec, FinetuneCfg(**values), {**rec.head, "layers": "1", "pos_rows": "8"},
                     AugmentCfg(**rec.augment), dist_ctx=DistContext(), log=lambda *a: None)


@pytest.mark.parametrize("paradigm,recipe,short", [("text4vis", "paper", 37), ("actionclip", "paper", 37),
                                                   ("text4vis", "quick", 32)])
def test_evaluation_views_are_the_test_scale_then_the_centre_crop(demo_small, tmp_path, paradigm, recipe, short):
    from cache.datasets import VideoItem

    tuner = _tuner(demo_small, paradigm, recipe)
    size = tuner.info.image_size
    assert size == 32 and tuner.eval_data.resize == short  # 32 x 256 / 224 = 36.6 -> 37 (the paper recipes)
    data = tuner.eval_data
    data.items = [VideoItem(str(_write_ramp(tmp_path / "ramp.mp4")), 0)]
    item = data[0]
    assert item["valid"], item["error"]
    video = item["video"].numpy()  # (V, T, 3, S, S) uint8
    clips, crops = (4, 3) if (paradigm, recipe) == ("text4vis", "paper") else (1, 1)  # the paper's test views
    assert video.shape == (clips * crops, 4, 3, size, size)
    centre = (crops // 2) * clips  # crop-major: view s * C + c; the middle crop of three is the centre
    got = video[centre, 0, 0].astype(np.float64)
    inner = (slice(3, size - 3), slice(3, size - 3))  # away from the frame's border (filter support)
    right = np.abs(got - _expected(short, size))[inner].max()
    other = 32 if short == 37 else 37
    wrong = np.abs(got - _expected(other, size))[inner].max()
    assert right < 3.0 < 6.0 < wrong, (right, wrong)
