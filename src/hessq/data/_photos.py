"""Real photos that ship with scikit-image (``skimage.data``), cut into seeded random resized crops.

There is no ImageNet on this machine; these photos give a small, offline, natural-image set
to calibrate with and to score a quantized ImageNet model by its top-1 agreement with FP32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from hessq._errors import ConfigError, MissingDependencyError

#: skimage.data photos bundled with scikit-image itself (no download); grey ones are stacked to RGB.
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
    "hubble_deep_field",
    "camera",
    "coins",
    "clock",
    "moon",
    "brick",
    "grass",
    "gravel",
)


def load_photos(names: tuple[str, ...] | list[str] = PHOTOS) -> dict[str, torch.Tensor]:
    """The named skimage photos as uint8 RGB tensors (3, H, W); ``stereo_motorcycle`` gives its two views."""
    try:
        import skimage.data
    except ImportError:
        raise MissingDependencyError("the photo set needs scikit-image: pip install scikit-image  (or pip install 'hessq[zeroq]')") from None
    out: dict[str, torch.Tensor] = {}
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ConfigError(f"skimage.data has no photo {name!r}")
        image = loader()
        views = {f"{name}_left": image[0], f"{name}_right": image[1]} if isinstance(image, tuple) else {name: image}
        for key, arr in views.items():
            arr = np.asarray(arr)
            if arr.dtype != np.uint8:
                raise ConfigError(f"skimage photo {key!r} is {arr.dtype}, expected uint8")
            if arr.ndim == 2:
                arr = np.stack([arr] * 3, axis=-1)
            out[key] = torch.from_numpy(np.ascontiguousarray(arr[..., :3])).permute(2, 0, 1).contiguous()
    return out


def photo_crops(
    num_crops: int,
    *,
    size: int = 224,
    seed: int = 0,
    scale: tuple[float, float] = (0.1, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    names: tuple[str, ...] | list[str] = PHOTOS,
) -> torch.Tensor:
    """``num_crops`` random resized crops (uint8, (N, 3, size, size)) of the skimage photos.

    Crop k comes from photo k mod P; its area is a uniform fraction in ``scale`` of the photo and
    its aspect ratio log-uniform in ``ratio`` (as torchvision's RandomResizedCrop), then it is
    resized with antialiased bilinear interpolation. Different seeds give different crops.
    """
    if num_crops < 1:
        raise ConfigError(f"num_crops must be >= 1, got {num_crops}")
    photos = list(load_photos(names).values())
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for k in range(num_crops):
        img = photos[k % len(photos)]
        _, h, w = img.shape
        for _ in range(20):
            area = h * w * float(torch.empty(1).uniform_(*scale, generator=gen))
            logr = torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
            r = math.exp(float(logr))
            cw, ch = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            ch = cw = min(h, w)
        top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = img[:, top : top + ch, left : left + cw].float()[None]
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        crops.append(resized.round().clamp(0, 255).to(torch.uint8)[0])
    return torch.stack(crops)
