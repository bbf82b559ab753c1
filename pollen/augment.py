"""Data augmentation for image clients: a named policy of random transforms, drawn per example.

``data.augment`` names the policy. Only a client's local training sees it
(``Split.training_inputs``); evaluation, central or federated, reads the images as they
are (``Split.inputs_of``).

    none     nothing (the default)
    affine   rotation up to 10 degrees, shift up to 10% of the side, scale 0.9-1.1; no
             flips: for digits, characters and other images whose orientation carries meaning
    photo    zoom into 80-100% of the area at a random place, horizontal flip, brightness
             and contrast up to 20%: for photographs of objects and scenes

torchvision's v2 transforms are the usual tool, but the torchvision wheel that pairs with
torch 2.13 loads none of its operators on the CPU build of torch here ("operator
torchvision::nms does not exist" on import), and its transforms draw one set of
parameters for a whole batch. So the few operations needed are written with torch: one
random affine map per image (``affine_grid`` + ``grid_sample``, edges replicated so a
shifted digit keeps its black background) and a per-image brightness and contrast
change in pixel space, all drawn from the training's own generator so a seeded run
repeats exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation the images carry (pollen.data.to_model_input)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Policy:
    """Ranges the random transforms are drawn from, uniformly, independently per image."""

    degrees: float = 0.0  # rotation in [-degrees, degrees]
    translate: float = 0.0  # shift in [-translate, translate] of the side, each axis
    scale: tuple[float, float] = (1.0, 1.0)  # zoom factor (above 1: into the image)
    flip: bool = False  # mirror left-right with probability 1/2
    jitter: float = 0.0  # brightness and contrast factors in [1 - jitter, 1 + jitter]


POLICIES: dict[str, Policy | None] = {
    "none": None,
    "affine": Policy(degrees=10.0, translate=0.1, scale=(0.9, 1.1)),
    # zooming by up to 1/sqrt(0.8) keeps 80-100% of the area; the shift stays inside the zoomed margin
    "photo": Policy(translate=0.05, scale=(1.0, 1 / math.sqrt(0.8)), flip=True, jitter=0.2),
}


def augmented(images: torch.Tensor, policy: Policy, generator: torch.Generator) -> torch.Tensor:
    """A randomly transformed copy of normalised images [N, 3, H, W], one draw per image."""
    n = len(images)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-policy.degrees, policy.degrees) * math.pi / 180
    zoom = uniform(*policy.scale)
    shift = torch.stack([uniform(-policy.translate, policy.translate) for _ in range(2)], dim=1) * 2  # [-1, 1] units
    mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if policy.flip else torch.ones(n)
    # affine_grid maps each output pixel to where it samples the input: zooming in samples a smaller area
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * mirror, -sin, shift[:, 0]], dim=1),
                         torch.stack([sin * mirror, cos, shift[:, 1]], dim=1)], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if policy.jitter:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        pixels = out * std + mean
        brightness = uniform(1 - policy.jitter, 1 + policy.jitter).view(n, 1, 1, 1)
        contrast = uniform(1 - policy.jitter, 1 + policy.jitter).view(n, 1, 1, 1)
        pixels = pixels * brightness
        gray = pixels.mean(dim=(1, 2, 3), keepdim=True)
        pixels = ((pixels - gray) * contrast + gray).clamp(0.0, 1.0)
        out = (pixels - mean) / std
    return out
