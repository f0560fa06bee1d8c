"""Video latents for diffusion models: procedurally generated clips (no download), or a directory of .npy clips.

Built-in videos: each clip shows 1-3 shapes (discs, squares, bars) with their own brightness, moving with
constant velocities (wrapping around the frame) and rotating; rendered at 2x the latent resolution and encoded
to latents by a fixed space-to-depth patchify (each 2x2 pixel block of each colour channel becomes 4 latent
channels), so no pretrained VAE is needed and the task (predict the motion) is learnable.

Each row r of the data set is a pure function of (seed, r): the clip, the noise and the timestep, so training
is resumable exactly and every layout sees the same batch. A batch holds the flow-matching (rectified flow)
training triple: noisy = (1 - t) * clean + t * noise, timesteps t in [0, 1], velocity = noise - clean.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meshweave.core.batch import Batch

NUM_ROWS = 1 << 16  # distinct built-in rows (the sampler shuffles them per epoch)
ENCODE_FACTOR = 2  # space-to-depth factor of the fixed latent encoding
NOISE_DRAWS_PER_CLIP = 64  # rows per .npy clip: the same clip with different noise and timesteps


class VideoDataError(ValueError):
    """A clip directory that cannot be used (named in the message)."""


def space_to_depth(frames: torch.Tensor, factor: int) -> torch.Tensor:
    """(T, C, H*f, W*f) -> (T, C*f*f, H, W): the fixed latent encoding."""
    t, c, h, w = frames.shape
    x = frames.reshape(t, c, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(t, c * factor * factor, h // factor, w // factor)


def render_clip(frames: int, height: int, width: int, colours: int, g: torch.Generator) -> torch.Tensor:
    """(frames, colours, height, width) in [-1, 1]: moving, rotating shapes on a dark background."""
    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    video = torch.full((frames, colours, height, width), -1.0)
    for _ in range(int(torch.randint(1, 4, (), generator=g))):
        kind = int(torch.randint(0, 3, (), generator=g))
        size = float(torch.empty(()).uniform_(0.12, 0.3, generator=g)) * min(height, width)
        pos = torch.rand(2, generator=g) * torch.tensor([height, width])
        vel = (torch.rand(2, generator=g) - 0.5) * 0.3 * min(height, width)
        angle, spin = float(torch.rand((), generator=g)) * math.pi, float(torch.rand((), generator=g) - 0.5)
        colour = torch.rand(colours, generator=g) * 1.6 - 0.6
        f = torch.arange(frames, dtype=torch.float32)[:, None, None]  # all frames at once: (F, 1, 1)
        cy, cx = pos[0] + vel[0] * f, pos[1] + vel[1] * f
        dy = (ys - cy + height / 2) % height - height / 2  # wrap around the frame
        dx = (xs - cx + width / 2) % width - width / 2
        a = angle + spin * f
        u, v = dx * a.cos() + dy * a.sin(), -dx * a.sin() + dy * a.cos()
        if kind == 0:
            inside = (u * u + v * v).sqrt() - size / 2
        elif kind == 1:
            inside = torch.maximum(u.abs(), v.abs()) - size / 2
        else:
            inside = torch.maximum(u.abs() - size, v.abs() - size / 5)
        mask = torch.sigmoid(-inside * 2.0)[:, None]  # soft edges, (F, 1, H, W)
        video = video * (1 - mask) + colour[None, :, None, None] * mask
    return video


class FlowMatchingVideos:
    """Rows of (noisy latents, timestep, velocity) from clean clips given by `clip(row)`; see the module doc."""

    def __init__(self, clip, num_rows: int, seed: int) -> None:
        self.clip, self.num_rows, self.seed = clip, num_rows, seed

    def __len__(self) -> int:
        return self.num_rows

    def row(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        clean = self.clip(r)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + r + 1)
        noise = torch.randn(clean.shape, generator=g)
        t = torch.rand((), generator=g)
        return (1 - t) * clean + t * noise, t, noise - clean

    def batch(self, rows: list[int]) -> Batch:
        noisy, t, velocity = (torch.stack(x) for x in zip(*(self.row(r) for r in rows)))
        fields = {"noisy": noisy, "timesteps": t, "velocity": velocity}
        return Batch(fields, dict.fromkeys(fields))  # no sequence dim: the model shards its own activations


def builtin_clip(model: Any, seed: int):
    """row -> clean latents (T, C, H, W) of the built-in moving-shapes videos for the model's latent shape."""
    f = ENCODE_FACTOR if model.channels % (ENCODE_FACTOR ** 2) == 0 else 1
    colours = model.channels // (f * f)

    def clip(r: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 7_919 + r)
        return space_to_depth(render_clip(model.frames, model.height * f, model.width * f, colours, g), f)

    return clip


def npy_clips(path: str | Path, model: Any) -> list[Path]:
    """The .npy files of a directory (sorted), each a clip of float latents (T, C, H, W) of the model's shape."""
    root = Path(path)
    files = sorted(root.glob("*.npy")) if root.is_dir() else [root] if root.suffix == ".npy" else []
    if not files:
        raise VideoDataError(f"data.path: {str(root)!r} holds no .npy latent clips; give a directory of (T, C, H, W) "
                             f"float arrays")
    want = (model.frames, model.channels, model.height, model.width)
    for f in files:
        shape = tuple(np.load(f, mmap_mode="r", allow_pickle=False).shape)
        if shape != want:
            raise VideoDataError(f"data.path: clip {f.name} has shape {shape}, the model wants (frames, channels, "
                                 f"height, width) = {want}; set model.* to match")
    return files


def build_video_dataset(cfg: Any) -> FlowMatchingVideos:
    """The data set `cfg.data.source` names for a video model `cfg.model`: builtin/synthetic = moving shapes,
    path = the .npy clips under `cfg.data.path` (row r: clip r mod the number of clips)."""
    seed = cfg.train.seed
    if cfg.data.source == "path":
        files = npy_clips(cfg.data.path, cfg.model)
        clip = lambda r: torch.from_numpy(np.load(files[r % len(files)], allow_pickle=False).astype(np.float32))
        return FlowMatchingVideos(clip, len(files) * NOISE_DRAWS_PER_CLIP, seed)
    return FlowMatchingVideos(builtin_clip(cfg.model, seed), NUM_ROWS, seed)
