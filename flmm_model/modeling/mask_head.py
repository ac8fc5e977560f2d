"""U-Net mask head: per-object text->image attention maps in, coarse mask logits out.

The input of one sample is a stack of attention maps, one channel per (layer, head) of the frozen LMM: for object k,
the attention from k's phrase tokens to the image tokens, laid out on the image-token grid. The head turns each
channel into a distribution over image tokens (divide by its spatial sum), upsamples the grid so its longest side
is `upsample_size` (64 by default), and runs a small U-Net (3 down / 3 up levels, widths 64/128/256/512) that
predicts one mask logit per cell. Only the first convolution depends on the channel count; at 576 channels
(Qwen2.5-VL-3B: 36 layers x 16 heads) the head has about 7.5 M parameters.

The coarse grid covers the whole original image (Qwen's resize keeps the full content, only the aspect ratio
is rounded to the patch grid), which is what the SAM refiner assumes when it maps these logits into its frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flmm_model.modeling.frames import coarse_grid_size


class ConvStage(nn.Module):
    """Two 3x3 convolutions, each followed by GroupNorm (one group) and ReLU; spatial size unchanged."""

    def __init__(self, *, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # No conv bias: the GroupNorm right after it has its own shift.
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(1, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(1, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.block(features)


class UpStage(nn.Module):
    """Bilinear x2 upsampling + 1x1 conv (halves the width), concat with the skip features, then a `ConvStage`."""

    def __init__(self, *, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.stage = ConvStage(in_channels=out_channels + skip_channels, out_channels=out_channels)

    def forward(self, features: Tensor, skip: Tensor) -> Tensor:
        upsampled = F.interpolate(features, scale_factor=2.0, mode="bilinear", align_corners=False)
        upsampled = self.reduce(upsampled)  # (K, out, 2h, 2w)
        return self.stage(torch.cat([upsampled, skip], dim=1))  # (K, out + skip, 2h, 2w) -> (K, out, 2h, 2w)


class UNetMaskHead(nn.Module):
    """Coarse mask logits from per-object attention maps.

    Args:
        in_channels: number of attention channels C = map layers x heads of the LMM (from its config).
        widths: channel widths of the U-Net levels, from full resolution to the bottleneck; len(widths) - 1 is
            the number of down / up levels, and the padded grid side must be a multiple of 2 ** (len(widths) - 1).
        upsample_size: length of the longest side of the coarse grid the attention maps are upsampled to.
    """

    def __init__(self, *, in_channels: int, widths: Sequence[int] = (64, 128, 256, 512), upsample_size: int = 64):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"UNetMaskHead: in_channels must be >= 1, found {in_channels}")
        if len(widths) < 2:
            raise ValueError(f"UNetMaskHead: widths needs at least 2 levels, found {list(widths)}")
        if upsample_size < 1:
            raise ValueError(f"UNetMaskHead: upsample_size must be >= 1, found {upsample_size}")
        self.in_channels = in_channels
        self.widths = tuple(widths)
        self.upsample_size = upsample_size
        self.size_multiple = 2 ** (len(widths) - 1)  # each max-pool halves the grid

        self.stem = ConvStage(in_channels=in_channels, out_channels=widths[0])
        self.down_stages = nn.ModuleList(
            ConvStage(in_channels=widths[i], out_channels=widths[i + 1]) for i in range(len(widths) - 1)
        )
        self.up_stages = nn.ModuleList(
            UpStage(in_channels=widths[i + 1], skip_channels=widths[i], out_channels=widths[i])
            for i in reversed(range(len(widths) - 1))
        )
        self.out_conv = nn.Conv2d(widths[0], 1, kernel_size=1)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Size (h', w') of the coarse grid for an (height, width) attention grid: longest side = upsample_size.

        The scale is s = upsample_size / max(height, width); each side is rounded half up: floor(side * s + 0.5).
        """
        return coarse_grid_size(height, width, self.upsample_size)

    def forward(self, attn_maps: Tensor) -> Tensor:
        """Predict coarse mask logits.

        Args:
            attn_maps: (K, C, h, w) non-negative attention weights of K objects on the image-token grid, any
                float dtype. Each channel is divided by its spatial sum, so the scale of a channel does not matter.

        Returns:
            (K, h', w') mask logits (not probabilities) on the coarse grid, h', w' = `output_size(h, w)`, in the
            dtype of the head's parameters.
        """
        if attn_maps.dim() != 4 or attn_maps.shape[1] != self.in_channels:
            raise ValueError(f"UNetMaskHead: expected attn_maps of shape (K, {self.in_channels}, h, w), "
                             f"found {tuple(attn_maps.shape)}")
        height, width = attn_maps.shape[2:]
        out_height, out_width = self.output_size(height, width)

        # Normalize in float32: attention weights over hundreds of image tokens are small numbers.
        maps = attn_maps.float()
        maps = maps / (maps.sum(dim=(2, 3), keepdim=True) + 1e-6)  # (K, C, h, w), each channel sums to ~1
        maps = F.interpolate(maps, size=(out_height, out_width), mode="bilinear", align_corners=False)
        maps = maps.to(self.out_conv.weight.dtype)  # (K, C, h', w')

        # Pad bottom/right with zeros (no attention) to a multiple of 2 ** levels, crop back at the end.
        pad_height = -out_height % self.size_multiple
        pad_width = -out_width % self.size_multiple
        maps = F.pad(maps, (0, pad_width, 0, pad_height))  # (K, C, H8, W8)
        if maps.device.type == "cpu":  # oneDNN runs these narrow convolutions ~25% faster channels-last (RESULTS.md)
            maps = maps.contiguous(memory_format=torch.channels_last)

        features = self.stem(maps)  # (K, widths[0], H8, W8)
        skips = []
        for stage in self.down_stages:
            skips.append(features)
            features = stage(F.max_pool2d(features, kernel_size=2))  # (K, widths[i + 1], H8 / 2^(i+1), ...)
        for stage in self.up_stages:
            features = stage(features, skips.pop())  # (K, widths[i], H8 / 2^i, W8 / 2^i)
        logits = self.out_conv(features)  # (K, 1, H8, W8)
        return logits[:, 0, :out_height, :out_width]  # (K, h', w')
