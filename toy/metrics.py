"""
Measuring toy-world videos: a detector made of pixel heuristics (no learned model, so it cannot be gamed the way
a learned reward can) and video metrics in the spirit of VBench's dimensions.

    detect(video)                 uint8 [T, H, W, 3] -> what is in it: colour, shape, direction, size, speed
    video_metrics(videos, prompts) -> prompt alignment (per attribute accuracy), dynamic degree, motion,
                                  background flicker, subject consistency, averaged over the videos

How the detector reads a video, per frame: the background is the frame's median colour (the object covers at
most ~15% of it); the object's colour is the mean of the pixels far (> 60 levels) from the background; each
pixel's coverage `alpha` is its projection onto (colour - background), so anti-aliased and blurred edges count
in proportion. Then over the frames:
- colour: the nearest world colour to the mean object colour;
- direction and speed: the displacement of the coverage-weighted centroid from the first to the last frame
  (its dominant axis and sign; its length against the world's travel distances);
- shape: the bounding box's aspect ratio width / height: 1 for a ball, 2.17 for a bar, 1 / 2.17 for a pillar,
  split at the geometric midpoints (a symmetric blur keeps it on the right side); the fill ratio is reported;
- size: the bounding box's half-extent against the world's three radii.
"""
import math

import numpy as np

from toy import world as W

FOREGROUND = 60.0  # RGB distance from the background above which a pixel is surely the object
BAR_ASPECT = math.sqrt(W.BAR[0] / W.BAR[1])  # geometric midpoint of a ball's aspect (1) and a bar's (2.17)
MIN_AREA = 4.0  # pixels: less coverage than this and the frame has no object


def nearest(value, table):
    """The key of `table` whose value is closest to `value` (scalars or vectors)."""
    keys = list(table)
    dist = [np.linalg.norm(np.asarray(table[k], np.float64) - value) for k in keys]
    return keys[int(np.argmin(dist))]


def frame_object(frame):
    """One frame uint8 [H, W, 3] -> dict(bg, color, area, cx, cy, box_w, box_h, fill) or None if no object."""
    x = frame.astype(np.float32)
    bg = np.median(x.reshape(-1, 3), axis=0)
    far = np.linalg.norm(x - bg, axis=-1) > FOREGROUND
    if far.sum() < MIN_AREA:
        return None
    color = x[far].mean(0)
    d = color - bg
    alpha = np.clip(((x - bg) @ d) / (d @ d), 0, 1)  # [H, W] coverage
    area = alpha.sum()
    if area < MIN_AREA:
        return None
    ys, xs = np.mgrid[0:frame.shape[0], 0:frame.shape[1]]
    cx, cy = (alpha * xs).sum() / area, (alpha * ys).sum() / area
    # the bounding box: the columns and rows where the coverage reaches one half somewhere
    cols, rows = np.nonzero(alpha.max(0) > 0.5)[0], np.nonzero(alpha.max(1) > 0.5)[0]
    if len(cols) == 0 or len(rows) == 0:
        return None
    box_w, box_h = cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
    inside = alpha > 0.5  # the shape's own area for the fill ratio: a blur's halo moves no pixel across one half
    return dict(bg=bg, color=color, area=area, cx=cx, cy=cy, box_w=float(box_w), box_h=float(box_h),
                fill=inside.sum() / (box_w * box_h))


def detect(video, world=W.World()):
    """uint8 [T, H, W, 3] -> dict(color, shape, direction, size, speed, found, plus the raw numbers
    motion (px), fill, aspect, color_std, area_cv); None attributes where no object was found in any frame."""
    objs = [frame_object(f) for f in video]
    idx = [i for i, o in enumerate(objs) if o is not None]
    found = [objs[i] for i in idx]
    result = dict(found=len(found) / len(objs))
    if not found:
        return dict(result, color=None, shape=None, direction=None, size=None, speed=None, motion=0.0)
    color = np.mean([o["color"] for o in found], axis=0)
    fill = float(np.median([o["fill"] for o in found]))
    aspect = float(np.median([o["box_w"] / o["box_h"] for o in found]))
    half = float(np.median([(o["box_w"] + o["box_h"]) / 4 for o in found]))
    first, last = found[0], found[-1]
    dx, dy = last["cx"] - first["cx"], last["cy"] - first["cy"]
    if abs(dx) >= abs(dy):
        direction, along = ("right" if dx > 0 else "left"), abs(dx)
    else:
        direction, along = ("down" if dy > 0 else "up"), abs(dy)
    # the travel between the first and the last frame FOUND, scaled to the whole clip
    span = (len(objs) - 1) / max(idx[-1] - idx[0], 1)
    areas = np.array([o["area"] for o in found])
    return dict(result,
                color=nearest(color, W.COLORS),
                shape="bar" if aspect > BAR_ASPECT else ("pillar" if aspect < 1 / BAR_ASPECT else "ball"),
                direction=direction,
                size=nearest(half / world.radius, W.SIZES),
                speed=nearest(along * span / world.travel, W.SPEEDS),
                motion=float(np.hypot(dx, dy) * span), fill=fill, aspect=aspect,
                color_std=float(np.linalg.norm(np.std([o["color"] for o in found], axis=0))),
                area_cv=float(areas.std() / areas.mean()))


ATTRIBUTES = ("color", "shape", "direction", "size", "speed")


def background_flicker(video):
    """Mean absolute change (uint8 levels) between consecutive frames over pixels that are background in both
    (far from the object, by FOREGROUND / 2): 0 for the world's videos, whose background never changes."""
    x = video.astype(np.float32)
    bg = np.median(x.reshape(len(x), -1, 3), axis=1)[:, None, None]  # [T, 1, 1, 3]
    still = np.linalg.norm(x - bg, axis=-1) < FOREGROUND / 2  # [T, H, W]
    both = still[1:] & still[:-1]
    diff = np.abs(x[1:] - x[:-1]).mean(-1)
    return float(diff[both].mean()) if both.any() else float("nan")


def video_metrics(videos, prompts, world=W.World()):
    """Videos uint8 [B, T, H, W, 3] (or a list) and their prompts -> dict of averages:
    - acc_<attribute>: the detector agrees with the prompt (prompt alignment, as VBench's object class, colour...);
      acc_core: colour, shape and direction all right; acc_all: all five;
    - dynamic_degree: share of videos whose object moves more than half the slowest travel (VBench's dimension
      of the same name); motion: mean centroid travel over the clip, pixels;
    - flicker: background_flicker (uint8 levels; VBench's temporal flickering, on the static part);
    - subject consistency: found (share of frames with an object), color_std (RGB levels) and area_cv (std / mean
      of the object's area over time), 0 for a perfectly stable object."""
    dets = [detect(v, world) for v in videos]
    specs = [W.parse_prompt(p) for p in prompts]
    out = {}
    for a in ATTRIBUTES:
        out[f"acc_{a}"] = float(np.mean([d[a] == getattr(s, a) for d, s in zip(dets, specs)]))
    core = [all(d[a] == getattr(s, a) for a in ("color", "shape", "direction")) for d, s in zip(dets, specs)]
    out["acc_core"] = float(np.mean(core))
    out["acc_all"] = float(np.mean([all(d[a] == getattr(s, a) for a in ATTRIBUTES) for d, s in zip(dets, specs)]))
    slow = world.travel * W.SPEEDS["slowly"]
    out["dynamic_degree"] = float(np.mean([d["motion"] > slow / 2 for d in dets]))
    out["motion"] = float(np.mean([d["motion"] for d in dets]))
    out["flicker"] = float(np.nanmean([background_flicker(v) for v in videos]))
    out["found"] = float(np.mean([d["found"] for d in dets]))
    out["color_std"] = float(np.mean([d.get("color_std", np.nan) for d in dets if d["color"] is not None] or [np.nan]))
    out["area_cv"] = float(np.mean([d.get("area_cv", np.nan) for d in dets if d["color"] is not None] or [np.nan]))
    return out


def format_metrics(m, keys=("acc_color", "acc_shape", "acc_direction", "acc_core", "acc_all", "dynamic_degree",
                            "flicker")):
    return " ".join(f"{k.removeprefix('acc_')} {m[k]:.2f}" for k in keys)
