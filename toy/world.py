"""
The toy world: short videos of one coloured shape moving across a plain background, each with the prompt
that describes it, deterministic from a seed. It plays the role nanoGPT's shakespeare_char plays for GPT:
data small enough that the real scripts train end to end on a CPU, and simple enough that what a model
makes can be measured (toy/metrics.py reads colour, shape and direction back from the pixels).

    a red ball moves left                   the 48 core prompts: colour x shape x direction
    a big yellow pillar moves up quickly    + an optional size and speed word

The grammar: "a [SIZE] COLOUR SHAPE moves DIRECTION [SPEED]", an optional word left out meaning its middle
value (medium size, normal speed), so every prompt fixes the look of the video and the seed only moves it
(start position): 4 x 3 x 4 x 3 x 3 = 432 prompts. The object starts on the far side of the centre and
crosses it, so a single frame (the last one, which train_reward.py scores) also shows the direction, by where
the object is.

Two choices made by measurement, on an earlier 48x48 world: the background is one plain grey (with three grey levels, a
word each, a small Wan VAE sat at "mean grey" for 400+ steps, against ~100 with one), and the shapes differ in
their extent, not their outline (ball, a wide bar, a tall pillar): the VAE the budget allows reconstructs
squares and triangles as round blobs (the detector read 0.29-0.38 of their shapes back, chance 0.33), while a
blob's width and height survive.

Held out: the 12 (colour, shape, direction) triples with (colour + shape + direction) % 4 == 0 (indices in
COLORS, SHAPES, DIRECTIONS), in all their sizes and speeds. Every pair of attributes still occurs in training,
so the held-out prompts test composition, not new words.

Frames are uint8 [T, H, W, 3]; `to_model` maps them to [-1, 1] (the Wan VAE's range). All colours stay well
inside it, since diffusers' Wan decode clamps to [-1, 1]. Rendering is anti-aliased (a one-pixel ramp on the
signed distance to the shape's edge), so the VAE is not asked to draw aliasing.
"""
import itertools
from dataclasses import dataclass

import numpy as np
import torch

COLORS = {"red": (220, 45, 45), "green": (45, 190, 70), "blue": (50, 80, 225), "yellow": (225, 205, 45)}
SHAPES = ("ball", "bar", "pillar")  # round; a box 2.2x wider than tall; the same box standing up
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) in image coords
SIZES = {"small": 0.75, None: 1.0, "big": 1.2}  # x the half-extent of a medium object (World.radius)
SPEEDS = {"slowly": 0.6, None: 1.0, "quickly": 1.4}  # x the medium distance travelled (World.travel)
BACKGROUND = 128  # grey level
BAR = (1.3, 0.6)  # half-extents of a bar, x its size; (box_w + box_h) / 4 = r, as for a ball


@dataclass(frozen=True)
class World:
    """Video geometry. 32x32 pixels -> 4x4 Wan latents (the VAE downsamples 8x) with objects 9-19 pixels
    across; 9 frames -> 3 latent frames (the VAE's 1 + 4 + 4), 3 causal blocks of one latent frame
    (--block-size 1, as Causal Forcing's frame-wise model). 48x48 x 21 frames cost 4.5x the tokens and left
    the teacher at chance on held-out prompts within the time budget."""
    height: int = 32
    width: int = 32
    frames: int = 9
    radius: float = 6.0  # half-extent of a medium ball, pixels (small 4.5, big 7.2)
    travel: float = 9.0  # distance a medium-speed object moves over the clip, pixels (slow 5.4, fast 12.6)
    jitter: float = 1.0  # uniform start offset, pixels, along and across the motion


@dataclass(frozen=True)
class Spec:
    color: str
    shape: str
    direction: str
    size: str = None
    speed: str = None

    @property
    def prompt(self):
        size = f"{self.size} " if self.size else ""
        speed = f" {self.speed}" if self.speed else ""
        return f"a {size}{self.color} {self.shape} moves {self.direction}{speed}"

    @property
    def triple(self):
        return self.color, self.shape, self.direction

    @property
    def held_out(self):
        return (list(COLORS).index(self.color) + SHAPES.index(self.shape)
                + list(DIRECTIONS).index(self.direction)) % 4 == 0


def all_specs(core_only=False):
    """Every prompt of the grammar (432), or only the 48 core ones (no optional words)."""
    options = ([None], [None]) if core_only else (list(SIZES), list(SPEEDS))
    return [Spec(c, s, d, size, speed) for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS)
            for size, speed in itertools.product(*options)]


def split(specs):
    """(train, held_out) lists of specs: held out = the 12 (colour, shape, direction) triples of Spec.held_out."""
    return [s for s in specs if not s.held_out], [s for s in specs if s.held_out]


def parse_prompt(prompt):
    """Spec of a prompt of the grammar, or a ValueError naming the prompt."""
    words = prompt.strip().lower().split()
    try:
        assert words[0] == "a"
        i = 1
        size = words[i] if words[i] in SIZES else None
        i += size is not None
        color, shape, moves, direction = words[i:i + 4]
        assert color in COLORS and shape in SHAPES and moves == "moves" and direction in DIRECTIONS
        rest = words[i + 4:]
        assert len(rest) <= 1 and all(w in SPEEDS for w in rest)
        return Spec(color, shape, direction, size, rest[0] if rest else None)
    except (AssertionError, IndexError, ValueError):
        raise ValueError(f"'{prompt}' is not a prompt of the toy world (e.g. 'a red ball moves left')") from None


def coverage(shape, x, y, cx, cy, r):
    """Anti-aliased coverage in [0, 1] of a shape centred at (cx, cy) with size r, at pixel centres x, y
    (broadcasting arrays): clip(0.5 - signed distance to the edge, 0, 1). A ball has radius r; a bar is a box of
    half-extents 1.3 r x 0.6 r (about a ball's area), a pillar the same box standing up."""
    dx, dy = x - cx, y - cy
    if shape == "ball":
        sd = np.sqrt(dx * dx + dy * dy) - r
    else:
        (a, b) = (BAR[0] * r, BAR[1] * r) if shape == "bar" else (BAR[1] * r, BAR[0] * r)
        sd = np.maximum(np.abs(dx) - a, np.abs(dy) - b)
    return np.clip(0.5 - sd, 0.0, 1.0)


def render(spec, seed, world=World(), frames=None):
    """The video of `spec` for `seed`: uint8 [T, H, W, 3]. Deterministic: the seed fixes the start offset.
    frames: a list of frame indices to render only those (e.g. [-1], the last frame)."""
    rng = np.random.default_rng(seed)
    r = world.radius * SIZES[spec.size]
    travel = world.travel * SPEEDS[spec.speed]
    ux, uy = DIRECTIONS[spec.direction]
    along, across = rng.uniform(-world.jitter, world.jitter, size=2)
    # start half the travel before the centre (plus the offsets), end half the travel after it
    cx0 = (world.width - 1) / 2 + ux * (along - travel / 2) + uy * across
    cy0 = (world.height - 1) / 2 + uy * (along - travel / 2) + ux * across
    index = np.arange(world.frames) if frames is None else np.arange(world.frames)[frames]
    f = index.astype(np.float32)[:, None, None] / (world.frames - 1)  # [T, 1, 1]
    y, x = np.mgrid[0:world.height, 0:world.width].astype(np.float32)
    cover = coverage(spec.shape, x[None], y[None], cx0 + ux * travel * f, cy0 + uy * travel * f, r)  # [T, H, W]
    bg = np.full(3, BACKGROUND, np.float32)
    color = np.asarray(COLORS[spec.color], np.float32)
    video = bg + cover[..., None] * (color - bg)  # [T, H, W, 3]
    return np.round(video).astype(np.uint8)


def sample_specs(specs, n, seed):
    """n specs drawn uniformly (with replacement) from `specs`, deterministic from seed."""
    rng = np.random.default_rng(seed)
    return [specs[i] for i in rng.integers(0, len(specs), size=n)]


def to_model(videos):
    """uint8 [B, T, H, W, 3] (numpy or torch) -> float [B, 3, T, H, W] in [-1, 1], the VAE's input."""
    x = torch.as_tensor(np.asarray(videos)).float().div(127.5).sub(1)
    return x.permute(0, 4, 1, 2, 3).contiguous()


def to_uint8(pixels):
    """float [B, 3, T, H, W] in [-1, 1] -> uint8 numpy [B, T, H, W, 3]."""
    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()
