"""Reference models for tests: OpenAI's own code (clip-anytorch), with random weights in OpenAI's layout."""

import warnings

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip-anytorch imports pkg_resources, which warns
    import clip as openai_clip  # noqa: F401
    from clip.model import CLIP as ReferenceCLIP

from openclip_lite.pretrained import ARCHITECTURES

# a tiny architecture of each kind, for tests that need a model but not a released shape
TINY = {
    "tiny-vit": (32, 32, 2, 64, 16, 77, 49408, 64, 1, 2),
    "tiny-rn": (32, 64, (1, 1, 1, 1), 16, None, 77, 49408, 64, 1, 2),
}


def reference_model(arch: str, seed: int = 0) -> ReferenceCLIP:
    """OpenAI's CLIP with random weights, every tensor perturbed so that no branch is an identity.

    OpenAI initialises some weights to zero (a ResNet block's last BatchNorm) or to one (LayerNorm), which would
    hide a wrong branch; BatchNorm statistics are made non-trivial too.
    """
    config = ARCHITECTURES.get(arch) or TINY[arch]
    torch.manual_seed(seed)
    model = ReferenceCLIP(*config).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("running_var"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("running_mean"):
                p.copy_(0.1 * noise)
            elif name == "logit_scale":
                p.copy_(torch.tensor(4.6052) + 0.01 * noise)
            elif (".bn" in name or "downsample.1" in name or ".ln" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.add_(0.02 * noise)
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm())
