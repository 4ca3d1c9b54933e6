"""OpenAI's CLIP in plain PyTorch modules.

Every parameter and buffer is named exactly as in OpenAI's state dicts (`visual.conv1.weight`,
`transformer.resblocks.0.attn.in_proj_weight`, `visual.attnpool.q_proj.weight`, ...), so released checkpoints
load with `load_state_dict(strict=True)` and nothing is renamed. The speed lives inside these modules:
attention is one `F.scaled_dot_product_attention` call on batch-first tensors with the packed `in_proj`
weights, the text tower is causal via `is_causal`, and it stops at the last end-of-text token in the batch.
"""

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CheckpointError


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, as OpenAI's (fp16 LayerNorm loses too much)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's weights were trained with; plain GELU changes the outputs."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class MultiheadAttention(nn.Module):
    """Self-attention with the parameter names of `nn.MultiheadAttention` (packed `in_proj_weight`), batch first.

    `nn.MultiheadAttention` wants sequence-first tensors and falls back to a slow path whenever a mask or fp16 on
    CPU is involved; this one always calls `F.scaled_dot_product_attention`, which picks flash/memory-efficient
    kernels on GPU.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: bool = False, need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """
        x : shape = (batch_size, n_ctx, width)
        returns the output, same shape, and with `need_weights` the attention maps (batch_size, heads, n_ctx, n_ctx)
        """
        n, t, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(n, t, 3, self.heads, -1).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (n, heads, t, head_dim)
        if need_weights:
            out, weights = attention_with_weights(q, k, v, causal)
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, is_causal=causal), None
        return self.out_proj(out.transpose(1, 2).reshape(n, t, c)), weights


def attention_with_weights(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """The explicit softmax(QKᵀ/√d)·V, for when the caller wants the maps (SDPA does not return them).

    q : shape = (batch_size, heads, n_query, head_dim); k, v : (batch_size, heads, n_key, head_dim)
    """
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        t, s = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(t, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    weights = scores.softmax(dim=-1)
    return (weights @ v.float()).type(q.dtype), weights


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))])
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: Tensor, causal: bool = False, need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        attn, weights = self.attn(self.ln_1(x), causal, need_weights)
        x = x + attn
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class Transformer(nn.Module):
    """A stack of residual attention blocks on batch-first tensors (OpenAI's is sequence-first)."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.width, self.layers, self.causal = width, layers, causal
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        """x : shape = (batch_size, n_ctx, width)"""
        for block in self.resblocks:
            x, _ = block(x, self.causal)
        return x

    def forward_intermediates(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The output plus every block's output and (with `need_weights`) every block's attention maps."""
        hidden, maps = [], []
        for block in self.resblocks:
            x, weights = block(x, self.causal, need_weights)
            hidden.append(x)
            if need_weights:
                maps.append(weights)
        return x, hidden, maps


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.patch_size = patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, x: Tensor) -> Tensor:
        """x : shape = (batch_size, 3, res, res) -> tokens (batch_size, grid ** 2 + 1, width), class token first"""
        x = self.conv1(x.type(self.conv1.weight.dtype))  # (n, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (n, grid ** 2, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward(self, x: Tensor) -> Tensor:
        """x : shape = (batch_size, 3, res, res) -> (batch_size, output_dim)"""
        x = self.transformer(self.embed(x))
        return self.ln_post(x[:, 0, :]) @ self.proj


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # all convs have stride 1; an avgpool after the second conv downsamples (anti-aliased, as OpenAI's)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean of the feature map, with position embeddings, attends over every position."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: Optional[int] = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def tokens(self, x: Tensor) -> Tensor:
        """x : shape = (batch_size, c, h, w) -> (batch_size, h * w + 1, c), the mean token first"""
        x = x.flatten(2).transpose(1, 2)  # (n, hw, c)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        return x + self.positional_embedding.to(x.dtype)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """x : shape = (batch_size, c, h, w) -> (batch_size, output_dim), and the maps (batch_size, heads, 1, hw + 1)

        OpenAI's version lets all hw + 1 tokens attend and then keeps only the first; only its query matters.
        """
        x = self.tokens(x)
        n, t, c = x.shape
        q = self.q_proj(x[:, :1]).view(n, 1, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(n, t, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(n, t, self.num_heads, -1).transpose(1, 2)
        if need_weights:
            out, weights = attention_with_weights(q, k, v, causal=False)
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v), None
        return self.c_proj(out.transpose(1, 2).reshape(n, c)), weights


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: a 3-conv stem with an avgpool, anti-aliased strided blocks, attention pooling at the end."""

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int, input_resolution: int = 224, width: int = 64):
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)

        embed_dim = width * 32  # the ResNet feature dimension
        self.attnpool = AttentionPool2d(input_resolution // 32, embed_dim, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x.type(self.conv1.weight.dtype))))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def stages(self, x: Tensor) -> list[Tensor]:
        """x : shape = (batch_size, 3, res, res) -> the four stage outputs, the last (batch_size, width * 32, res / 32, res / 32)"""
        outs = []
        x = self.stem(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        """x : shape = (batch_size, 3, res, res) -> (batch_size, output_dim)"""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)[0]


class CLIP(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        # vision
        image_resolution: int,
        vision_layers: "tuple[int, int, int, int] | int",
        vision_width: int,
        vision_patch_size: Optional[int],
        # text
        context_length: int,
        vocab_size: int,
        transformer_width: int,
        transformer_heads: int,
        transformer_layers: int,
    ):
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(
                layers=tuple(vision_layers),
                output_dim=embed_dim,
                heads=vision_width * 32 // 64,
                input_resolution=image_resolution,
                width=vision_width,
            )
        else:
            self.visual = VisionTransformer(
                input_resolution=image_resolution,
                patch_size=vision_patch_size,
                width=vision_width,
                layers=vision_layers,
                heads=vision_width // 64,
                output_dim=embed_dim,
            )
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, causal=True)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))

    @torch.no_grad()
    def initialize_parameters(self) -> None:
        """OpenAI's initialisation, for training from scratch (loading a checkpoint overwrites every value)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(proj.weight, std=pool.c_proj.in_features**-0.5)
            for name, param in self.visual.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(param)  # each residual block starts as an identity
        for transformer in [self.transformer] + ([self.visual.transformer] if isinstance(self.visual, VisionTransformer) else []):
            proj_std = transformer.width**-0.5 * (2 * transformer.layers) ** -0.5
            for block in transformer.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=transformer.width**-0.5)
                nn.init.zeros_(block.attn.in_proj_bias)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * transformer.width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)
        self.logit_scale.fill_(math.log(1 / 0.07))

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: Tensor) -> Tensor:
        """image : shape = (batch_size, 3, res, res) -> features (batch_size, embed_dim), not normalised"""
        return self.visual(image.type(self.dtype))

    def embed_text(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """text : token ids (batch_size, context_length) -> token embeddings (batch_size, n, width), EOT positions

        Only the first n = last EOT position + 1 tokens are kept: attention is causal and features are read at
        the EOT token, so later positions cannot change the result, and short prompts cost a fraction of 77.
        """
        if text.shape[-1] > self.context_length:
            raise ValueError(
                f"text has {text.shape[-1]} tokens but this model's context length is {self.context_length}; "
                f"tokenize with context_length={self.context_length}"
            )
        eot = text.argmax(dim=-1)  # EOT has the largest id in the vocabulary
        n_ctx = int(eot.max()) + 1 if text.shape[0] else 1
        x = self.token_embedding(text[:, :n_ctx]).type(self.dtype)
        return x + self.positional_embedding[:n_ctx].type(self.dtype), eot

    def encode_text(self, text: Tensor) -> Tensor:
        """text : token ids (batch_size, context_length) from `tokenize` -> features (batch_size, embed_dim)"""
        x, eot = self.embed_text(text)
        x = self.transformer(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return self.ln_final(x).type(self.dtype) @ self.text_projection

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """-> logits_per_image (n_images, n_texts), logits_per_text (n_texts, n_images)"""
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)
        image_features = image_features / image_features.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def convert_weights(model: nn.Module, dtype: torch.dtype = torch.float16) -> None:
    """Cast the weights OpenAI keeps in fp16 to `dtype`, and only those: LayerNorm, BatchNorm and embeddings stay fp32.

    This is OpenAI's `convert_weights`, so a CUDA model holds the same values as OpenAI's; the modules cast their
    inputs to the weights' dtype and compute LayerNorm in fp32.
    """

    def cast(module: nn.Module) -> None:
        names = ()
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            names = ("weight", "bias")
        elif isinstance(module, MultiheadAttention):
            names = ("in_proj_weight", "in_proj_bias")
        for name in names + ("text_projection", "proj"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                param.data = param.data.to(dtype)

    model.apply(cast)


# int entries OpenAI's TorchScript archives carry beside the weights; they are implied by the shapes
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")


def model_config(state_dict: dict[str, Tensor]) -> dict:
    """Read the architecture from the keys and shapes of an OpenAI-layout state dict (as OpenAI's `build_model`)."""
    sd = state_dict
    try:
        vit = "visual.proj" in sd
        if vit:
            vision_width = sd["visual.conv1.weight"].shape[0]
            vision_layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.") and k.endswith(".attn.in_proj_weight")})
            vision_patch_size = sd["visual.conv1.weight"].shape[-1]
            grid_size = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            image_resolution = vision_patch_size * grid_size
        else:
            vision_layers = tuple(
                len({k.split(".")[2] for k in sd if k.startswith(f"visual.layer{b}.") and k.endswith(".conv1.weight")}) for b in (1, 2, 3, 4)
            )
            vision_width = sd["visual.layer1.0.conv1.weight"].shape[0]
            output_width = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision_patch_size = None
            image_resolution = output_width * 32
        transformer_width = sd["ln_final.weight"].shape[0]
        config = dict(
            embed_dim=sd["text_projection"].shape[1],
            image_resolution=image_resolution,
            vision_layers=vision_layers,
            vision_width=vision_width,
            vision_patch_size=vision_patch_size,
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            transformer_width=transformer_width,
            transformer_heads=transformer_width // 64,
            transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.") and k.endswith(".attn.in_proj_weight")}),
        )
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"not a CLIP state dict in OpenAI's layout: missing or misshapen {e}") from e
    return config


def build_model(state_dict: dict[str, Tensor]) -> CLIP:
    """A CLIP in fp32 with the architecture read from `state_dict` and its weights loaded strictly.

    Any checkpoint in OpenAI's layout loads, not only the nine released ones; a missing, extra or misshapen key is
    a CheckpointError that names the key.
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in NON_WEIGHT_KEYS}
    config = model_config(state_dict)
    with torch.device("meta"):
        model = CLIP(**config)
    expected = model.state_dict()
    for key in expected:
        # BatchNorm's step counter plays no part in eval; some converters drop it
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            "not a CLIP checkpoint in OpenAI's layout: "
            + (f"missing keys {_shorten(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected keys {_shorten(unexpected)}" if unexpected else "")
        )
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.shape != expected[key].shape:
            raise CheckpointError(f"checkpoint entry {key!r} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
        if value.is_floating_point() != expected[key].is_floating_point():
            raise CheckpointError(f"checkpoint entry {key!r} has dtype {value.dtype}, expected {expected[key].dtype}")
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def _shorten(keys: list[str], most: int = 5) -> str:
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")
