"""The operator's image allow-list (`k2serve operator --allowed-image-prefix`): a K2Deployment whose pods would run
an image outside it is refused before any child (so any pod) exists — a Degraded status with an `ImageAllowed`
False condition and a warning Event — instead of trusting whoever may edit K2Deployments with any image."""

from __future__ import annotations

from dataclasses import dataclass

from k2serve.operator.spec import K2DeploymentSpec

CONDITION = "ImageAllowed"


@dataclass(frozen=True)
class ImageVerdict:
    allowed: bool | None  # None: no allow-list configured
    reason: str
    message: str


def spec_images(spec: K2DeploymentSpec) -> dict[str, str]:
    """Every image the spec's pods run, by the field that names it (defaults resolved as the renderers do)."""
    return {"spec.image": spec.image, "spec.ray.image": spec.ray.image or spec.image,
            "spec.router.image": spec.router.image or spec.image}


def check_images(spec: K2DeploymentSpec, prefixes: tuple[str, ...]) -> ImageVerdict:
    if not prefixes:
        return ImageVerdict(None, "NoAllowList", "no image allow-list configured")
    refused = {field: image for field, image in spec_images(spec).items() if not image.startswith(prefixes)}
    if refused:
        named = ", ".join(f"{field}={image!r}" for field, image in refused.items())
        return ImageVerdict(False, "ImageNotAllowed", f"{named} outside the operator's allowed image prefixes "
                            f"({', '.join(prefixes)}; k2serve operator --allowed-image-prefix)")
    return ImageVerdict(True, "Allowed", f"every image starts with an allowed prefix ({', '.join(prefixes)})")
