"""Device-side preprocessing: the intake's squares resized to the model's input on the device,
normalized and cut into patches in the layout of transformers' Qwen2VLImageProcessor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.model_loading import LoadedModel
from schemas.images import PreparedImage


def patchify(pixels: Any, patch: int, merge: int, temporal: int) -> Any:
    """(B, C, H, W) normalized -> (B * grid_h * grid_w, C * temporal * patch * patch), in the layout
    of transformers' Qwen2VLImageProcessor (merge-window-major, then C, T, patch rows, patch cols)."""
    batch, channels, height, width = pixels.shape
    grid_h, grid_w = height // patch, width // patch
    x = pixels.reshape(batch, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # B, gh/m, gw/m, mh, mw, C, ph, pw
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)  # a still image fills both frames
    return x.reshape(batch * grid_h * grid_w, channels * temporal * patch * patch)


class ImageBatcher:
    """Resize the intake squares to the model's input on the device, normalize and patchify."""

    def __init__(self, loaded: LoadedModel, side: int) -> None:
        import torch

        self.loaded = loaded
        self.side = side
        self.mean = torch.tensor(loaded.image_mean, device=loaded.device).view(1, 3, 1, 1)
        self.std = torch.tensor(loaded.image_std, device=loaded.device).view(1, 3, 1, 1)
        self.grid = side // loaded.patch_size

    def __call__(self, images: Sequence[PreparedImage]) -> tuple[Any, Any]:
        import torch
        from torch.nn import functional

        device = self.loaded.device
        resized = []
        for image in images:
            square = torch.from_numpy(image.pixels).to(device, non_blocking=True)
            square = square.permute(2, 0, 1).unsqueeze(0).float()
            if square.shape[-1] != self.side:
                # Bicubic with antialiasing, as the reference processor's PIL resize does.
                square = functional.interpolate(
                    square, size=(self.side, self.side), mode="bicubic", antialias=True, align_corners=False
                ).clamp_(0, 255)
            resized.append(square)
        batch = torch.cat(resized).div_(255.0).sub_(self.mean).div_(self.std)
        values = patchify(batch, self.loaded.patch_size, self.loaded.merge_size, self.loaded.temporal_patch_size)
        grid = torch.tensor([[1, self.grid, self.grid]] * len(images), device=device)
        return values.to(self.loaded.model.model.visual.dtype), grid
