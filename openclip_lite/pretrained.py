"""The nine CLIP models OpenAI released, as data: where each lives and how to check it."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Pretrained:
    hub_repo: str  # a Hugging Face Hub repo with OpenAI's weights in OpenAI's key layout (fp16 values stored as fp32)
    url: str  # OpenAI's original TorchScript archive (fp16); the SHA256 is the second-to-last path segment
    image_size: int

    @property
    def sha256(self) -> str:
        return self.url.split("/")[-2]

    @property
    def filename(self) -> str:
        return self.url.split("/")[-1]


HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # in order of preference

_OPENAI = "https://openaipublic.azureedge.net/clip/models"

# Hub repos and file hashes are carried over from OpenAI's `clip` package and timm's hub repos (see NOTICE).
MODELS: dict[str, Pretrained] = {
    "RN50": Pretrained(
        "timm/resnet50_clip.openai",
        f"{_OPENAI}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
        224,
    ),
    "RN101": Pretrained(
        "timm/resnet101_clip.openai",
        f"{_OPENAI}/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
        224,
    ),
    "RN50x4": Pretrained(
        "timm/resnet50x4_clip.openai",
        f"{_OPENAI}/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
        288,
    ),
    "RN50x16": Pretrained(
        "timm/resnet50x16_clip.openai",
        f"{_OPENAI}/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
        384,
    ),
    "RN50x64": Pretrained(
        "timm/resnet50x64_clip.openai",
        f"{_OPENAI}/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
        448,
    ),
    "ViT-B/32": Pretrained(
        "timm/vit_base_patch32_clip_224.openai",
        f"{_OPENAI}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
        224,
    ),
    "ViT-B/16": Pretrained(
        "timm/vit_base_patch16_clip_224.openai",
        f"{_OPENAI}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
        224,
    ),
    "ViT-L/14": Pretrained(
        "timm/vit_large_patch14_clip_224.openai",
        f"{_OPENAI}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
        224,
    ),
    "ViT-L/14@336px": Pretrained(
        "timm/vit_large_patch14_clip_336.openai",
        f"{_OPENAI}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
        336,
    ),
}


def available_models() -> list[str]:
    """The names of the released models, in OpenAI's order."""
    return list(MODELS)


# The dimensions of each released model, as OpenAI's `build_model` reads them from the weights: for making
# random-weight models of the same shape (tests, benchmarks) without downloading anything. Order of fields is
# `clip.model.CLIP`'s: embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
# context_length, vocab_size, transformer_width, transformer_heads, transformer_layers.
ARCHITECTURES: dict[str, tuple] = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 77, 49408, 640, 10, 12),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 77, 49408, 768, 12, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 77, 49408, 1024, 16, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12),
}
