"""OpenAI's CLIP in plain PyTorch modules.

Every parameter and buffer is named exactly as in OpenAI's state dicts (`visual.conv1.weight`,
`transformer.resblocks.0.attn.in_proj_weight`, `visual.attnpool.q_proj.weight`, ...), so released checkpoints
load with `load_state_dict(strict=True)` and nothing is renamed. The speed lives inside these modules:
attention is one `F.scaled_dot_product_attention` call on batch-first tensors with the packed `in_proj`
weights, the text tower is causal via `is_causal`, and it stops at the last end-of-text token in the batch. Both
towers read one token of the last block (the class token, the end-of-text token), so the last block computes the
query, attention output and MLP of that token only.

Called one by one, the modules keep OpenAI's contracts (a block or a transformer takes and returns
(n_ctx, batch_size, width), `attn` is an `nn.MultiheadAttention` called as OpenAI's blocks call it, `mlp` the
`nn.Sequential` of c_fc, gelu, c_proj), so code written against OpenAI's modules (prompt learners that call
`model.transformer`, loops over `resblocks`, LoRA that looks for `nn.MultiheadAttention`) works unchanged. The
shortcuts above leave out work whose result no one reads, and are taken only while nothing else can read or
change it: a tower with a hook anywhere in it, a module whose `forward` was replaced, or a module swapped for
another class (a wrapper, LoRA, quantisation) runs OpenAI's order of operations on every position instead, each
module called (see `pristine`). Same numbers either way.
"""

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CheckpointError, InputError


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, as OpenAI's (fp16 LayerNorm loses too much)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's weights were trained with; plain GELU changes the outputs."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def built(module: nn.Module) -> None:
    """Record the class of `module` and of every module inside it, for `pristine`: called last in `__init__`."""
    module._built_classes = tuple(type(m) for m in module.modules())


def pristine(*modules: nn.Module) -> bool:
    """Whether these modules are as this file built them: no hook on them or on any module inside, no module's
    `forward` (or a block's `attention`) replaced on the instance or on its class since this file was imported, no
    module swapped for another (against the record `built` made), no block given another `attn_mask`.

    Only then may a tower compute around its modules' own forward, leaving out positions no one reads or folding a
    weight into another product: a hook, a patched `forward` or a wrapper must see, and change, what it would in
    OpenAI's model. Checked at every call (about 0.1 ms for ViT-B/32's image tower), so a change made at any time
    takes effect at the next call, also in a `torch.compile`d model (a patched method is found by identity, which
    its guards check). Global module hooks (`register_module_forward_hook`) do not count: profilers such as
    `FlopCounterMode` use them to measure the code as it runs, not to read a module's output.
    """
    for module in modules:
        inside = list(module.modules())
        for m in inside:
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return False
            methods = OWN_METHODS.get(type(m))
            if methods is None or (isinstance(m, ResidualAttentionBlock) and m.attn_mask_changed):  # another class, another mask
                return False
            for name, function in methods:  # replaced on the instance, or on the class (as OpenAI-era code patches)
                if getattr(getattr(m, name), "__func__", None) is not function:
                    return False
        record = getattr(module, "_built_classes", None)
        if record is not None and tuple(type(m) for m in inside) != record:
            return False
    return True


def causal_mask(n_ctx: int, dtype: torch.dtype = torch.float32, device: "torch.device | str | None" = None) -> Tensor:
    """OpenAI's additive causal mask, (n_ctx, n_ctx): 0 on and below the diagonal, -inf above it."""
    return torch.full((n_ctx, n_ctx), float("-inf"), dtype=dtype, device=device).triu_(1)


class MultiheadAttention(nn.MultiheadAttention):
    """OpenAI's attention module, torch's `nn.MultiheadAttention` (same parameters, call, hooks and attributes),
    with the batch-first paths the towers take while nothing watches.

    `nn.MultiheadAttention` wants sequence-first tensors and falls back to a slow path whenever a mask or fp16 on
    CPU is involved; `self_attention` always calls `F.scaled_dot_product_attention` (flash/memory-efficient
    kernels on GPU) with the packed `in_proj` weights, causal through `is_causal`.
    """

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)

    def self_attention(self, x: Tensor, causal: bool = False, need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """
        x : shape = (batch_size, n_ctx, width)
        returns the output, same shape, and with `need_weights` the attention maps (batch_size, heads, n_ctx, n_ctx)
        """
        n, t, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(n, t, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (n, heads, t, head_dim)
        if need_weights:
            out, weights = attention_with_weights(q, k, v, causal)
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, is_causal=causal), None
        return self.out_proj(out.transpose(1, 2).reshape(n, t, c)), weights

    def forward_rows(self, x: Tensor, rows: Tensor, causal: bool = False) -> Tensor:
        """The output at one position per batch item, the only query: x : (batch_size, n_ctx, width) -> (batch_size, width)

        rows : (batch_size,) positions; causal, each sees the keys up to its own.
        With one query, W_k and W_v move to its side: qᵀ(W_k x_j + b_k) = (W_kᵀq)ᵀx_j + qᵀb_k, whose last term is
        the same for every key (softmax drops it), and Σ_j a_j (W_v x_j + b_v) = W_v (Σ_j a_j x_j) + b_v. So no
        key or value is projected: per head, two (1, width) products replace n_ctx rows of the two matmuls.
        """
        n, t, c = x.shape
        w_q, w_k, w_v = self.in_proj_weight.split(c)
        b_q, _, b_v = self.in_proj_bias.split(c)
        q = F.linear(x[torch.arange(n, device=x.device), rows], w_q, b_q) * self.head_dim**-0.5  # (n, width)
        q = q.view(n, self.num_heads, self.head_dim).transpose(0, 1)  # (heads, n, head_dim): one batched matmul per head, no broadcast copies
        w_k, w_v = w_k.view(self.num_heads, -1, c), w_v.view(self.num_heads, -1, c)  # (heads, head_dim, width)
        scores = torch.bmm(q, w_k).transpose(0, 1) @ x.transpose(1, 2)  # (n, heads, width) @ (n, width, t) -> (n, heads, t)
        if causal:
            scores = scores.masked_fill(torch.arange(t, device=x.device) > rows.view(n, 1, 1), float("-inf"))
        weights = scores.float().softmax(dim=-1).type(x.dtype)  # fp32 softmax, as SDPA's kernels do
        mixed = torch.bmm(weights, x).transpose(0, 1)  # (heads, n, width)
        out = torch.bmm(mixed, w_v.transpose(1, 2)).transpose(0, 1).reshape(n, c) + b_v  # (heads, n, head_dim) -> (n, width)
        return self.out_proj(out)


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
    def __init__(self, d_model: int, n_head: int, attn_mask: Optional[Tensor] = None):
        """OpenAI's arguments: attn_mask is None (image tower), the additive causal mask (text tower) or any other
        additive mask, which the block then applies as OpenAI's does."""
        super().__init__()
        self.attn = MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = MLP(d_model, d_model * 4)
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask
        self.attn_mask_as_built = self.mask_kind
        built(self)

    @property
    def attn_mask(self) -> Optional[Tensor]:
        """OpenAI's attribute: None, or the additive (n_ctx, n_ctx) mask. SDPA needs only `causal`, read from it."""
        return self._attn_mask

    @attn_mask.setter
    def attn_mask(self, mask: Optional[Tensor]) -> None:
        # compared once here, not at every call: the fast paths know no mask and the causal one (SDPA's is_causal);
        # another mask, or a mask other than the one built with (text made bidirectional), changes the block
        self._attn_mask = mask
        self.causal = (
            mask is not None and mask.dim() == 2 and mask.is_floating_point() and torch.equal(mask, causal_mask(len(mask), mask.dtype, mask.device))
        )
        self.mask_kind = "none" if mask is None else "causal" if self.causal else "custom"
        self.attn_mask_changed = self.mask_kind != self.__dict__.get("attn_mask_as_built", self.mask_kind) or self.mask_kind == "custom"

    def mask_for(self, x: Tensor) -> Optional[Tensor]:
        """x : shape = (n_ctx, batch_size, width) -> `attn_mask` as OpenAI's block passes it to `attn` (the causal
        mask cut to n_ctx, so that shorter sequences take it too)."""
        if self.attn_mask is None:
            return None
        mask = self.attn_mask.to(dtype=x.dtype, device=x.device)
        return mask[: x.shape[0], : x.shape[0]] if self.causal else mask

    def forward(self, x: Tensor, batch_first: bool = False) -> Tensor:
        """x : shape = (n_ctx, batch_size, width) as OpenAI's block, or (batch_size, n_ctx, width) -> the same shape"""
        return self.attend(x, batch_first)[0]

    def attention(self, x: Tensor) -> Tensor:
        """x : shape = (n_ctx, batch_size, width) -> the same shape, OpenAI's `attention`: `attn` as built runs SDPA,
        one that is watched or replaced is called as OpenAI's block calls it."""
        if self.sdpa_applies():
            return self.attn.self_attention(x.transpose(0, 1), self.causal)[0].transpose(0, 1)
        return self.attn(x, x, x, need_weights=False, attn_mask=self.mask_for(x))[0]

    def sdpa_applies(self) -> bool:
        """Whether SDPA may run in `attn`'s place: it is this file's attention, unwatched and unpatched, and the
        block's mask is the one it was built with (none, or the causal one)."""
        return type(self.attn) is MultiheadAttention and pristine(self.attn) and not self.attn_mask_changed

    def attend(self, x: Tensor, batch_first: bool = False, need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """`forward`, and with `need_weights` the attention maps (batch_size, heads, n_ctx, n_ctx), fp32

        As built, only the attention takes batch first (SDPA's layout), every other module gets the layout it gets
        in OpenAI's block, and each residual is summed into its branch's fresh output. Watched, patched or changed
        inside, the block runs OpenAI's steps, each module called and each sum a new tensor (a hook may keep the
        tensor it is given).
        """
        if pristine(self):
            h = self.ln_1(x)
            attn, weights = self.attn.self_attention(h if batch_first else h.transpose(0, 1), self.causal, need_weights)
            x = (attn if batch_first else attn.transpose(0, 1)).add_(x)  # in place into the fresh output: the input untouched
            x = self.mlp(self.ln_2(x)).add_(x)
            return x, weights
        x = x.transpose(0, 1) if batch_first else x
        h = self.ln_1(x)
        if need_weights and not self.sdpa_applies():  # the maps from `attn` itself, per head
            attn, weights = self.attn(h, h, h, need_weights=True, attn_mask=self.mask_for(h), average_attn_weights=False)
            weights = weights.float()
        elif need_weights:
            attn, weights = self.attn.self_attention(h.transpose(0, 1), self.causal, need_weights=True)
            attn = attn.transpose(0, 1)
        else:
            attn, weights = self.attention(h), None
        x = x + attn
        x = x + self.mlp(self.ln_2(x))
        return (x.transpose(0, 1) if batch_first else x), weights

    def forward_rows(self, x: Tensor, rows: Tensor) -> Tensor:
        """x : shape = (batch_size, n_ctx, width) -> the output at one position per batch item, (batch_size, width)

        rows : (batch_size,) positions. Every position is a key and a value, but only these query and pass the MLP.
        """
        attn = self.attn.forward_rows(self.ln_1(x), rows, self.causal)
        x = attn.add_(x[torch.arange(x.shape[0], device=x.device), rows])
        return self.mlp(self.ln_2(x)).add_(x)


class MLP(nn.Sequential):
    """OpenAI's `nn.Sequential` of c_fc -> gelu (QuickGELU) -> c_proj, run with QuickGELU folded into the two matmuls.

    x·σ(1.702x) = silu(1.702x) / 1.702, so c_fc's matmul emits 1.702·h directly (addmm's alpha and beta), one
    in-place SiLU replaces QuickGELU's three elementwise passes and three temporaries over the widest activation,
    and c_proj's matmul divides by 1.702 (alpha). Equal to calling the three within rounding, which is what runs
    when one of them is watched or replaced (LoRA, quantisation).
    """

    def __init__(self, width: int, hidden: int):
        super().__init__(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(hidden, width))]))
        built(self)

    def forward(self, x: Tensor) -> Tensor:
        """x : shape = (..., width) -> (..., width)"""
        if not pristine(self):
            return super().forward(x)
        h = torch.addmm(self.c_fc.bias, x.reshape(-1, x.shape[-1]), self.c_fc.weight.t(), beta=1.702, alpha=1.702)
        h = F.silu(h, inplace=True)
        return torch.addmm(self.c_proj.bias, h, self.c_proj.weight.t(), alpha=1 / 1.702).view(*x.shape[:-1], self.c_proj.out_features)


class Transformer(nn.Module):
    """A stack of residual attention blocks. Called, it is OpenAI's (sequence first); the towers use `forward_rows`."""

    def __init__(self, width: int, layers: int, heads: int, attn_mask: Optional[Tensor] = None):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])
        built(self)

    def forward(self, x: Tensor) -> Tensor:
        """x : shape = (n_ctx, batch_size, width) -> the same shape, as OpenAI's `model.transformer(x)`"""
        return self.resblocks(x)

    def forward_rows(self, x: Tensor, rows: Tensor) -> Tensor:
        """x : shape = (batch_size, n_ctx, width) -> the outputs at one position per batch item, (batch_size, width)

        Nothing in the last block reaches another position, so it computes those positions alone: in ViT-B/32 that
        is 1/50 of the last block's matmuls, 8% of the tower's. Only for a stack as built (see `pristine`).
        """
        *blocks, last = self.resblocks
        for block in blocks:
            x = block.attend(x, batch_first=True)[0]
        return last.forward_rows(x, rows)

    def forward_intermediates(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """x : shape = (batch_size, n_ctx, width) -> the output, every block's output and (with `need_weights`)
        every block's attention maps."""
        hidden, maps = [], []
        for i, block in enumerate(self.resblocks):
            if need_weights:
                # the maps are read inside the block, which a wrapper, a replacement or a patched forward would skip
                if not isinstance(block, ResidualAttentionBlock) or getattr(block.forward, "__func__", None) is not type(block).forward:
                    raise InputError(
                        f"attention maps are read inside each block, and block {i} was wrapped, replaced or had its "
                        f"forward patched ({type(block).__name__}): ask for the intermediates without output_attentions"
                    )
                x, weights = block.attend(x, True, True)
            elif isinstance(block, ResidualAttentionBlock):  # called, so that hooks on the block take part as in `forward`
                x, weights = block(x, batch_first=True), None
            else:  # a block wrapped or replaced takes OpenAI's (n_ctx, batch_size, width)
                x, weights = block(x.transpose(0, 1)).transpose(0, 1), None
            x = x.contiguous()  # a block that is not as built answers a transposed view
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
        built(self)

    def embed(self, x: Tensor) -> Tensor:
        """x : shape = (batch_size, 3, res, res) -> tokens (batch_size, grid ** 2 + 1, width), class token first"""
        n, channels, h, w = x.shape
        conv, tokens = self.conv1, self.positional_embedding.shape[0]
        if is_patchify(conv):
            # conv1 (kernel = stride, no padding) is one matmul over the image's tiles, each flattened as the kernel
            # is (channel, row, column); on the CPU ~20% faster than the convolution, and the tokens come out in
            # (n, grid ** 2, width) order. Pixels past the last whole tile are dropped, as the convolution does.
            (ph, pw), (gh, gw) = conv.kernel_size, (h // conv.kernel_size[0], w // conv.kernel_size[1])
            if gh * gw + 1 != tokens:
                raise image_size_error(h, w, self.input_resolution)
            tiles = x.type(conv.weight.dtype)[:, :, : gh * ph, : gw * pw].reshape(n, channels, gh, ph, gw, pw)
            tiles = tiles.permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, channels * ph * pw)
            x = tiles @ conv.weight.reshape(conv.out_channels, -1).t()  # (n, grid ** 2, width); a channels_last weight is copied
        else:  # a hooked, replaced or reconfigured conv1 is called, as in OpenAI's model
            x = conv(x).flatten(2).transpose(1, 2)  # (n, grid ** 2, width)
            if x.shape[1] + 1 != tokens:
                raise image_size_error(h, w, self.input_resolution)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward(self, x: Tensor) -> Tensor:
        """x : shape = (batch_size, 3, res, res) -> (batch_size, output_dim)"""
        if pristine(self):
            cls = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # the class token is the one read out
            return self.head(self.transformer.forward_rows(self.embed(x), cls))
        # watched or changed: every position through every block, each module called on what it gets in OpenAI's model
        x = self.transformer(self.embed(x).transpose(0, 1)).transpose(0, 1)
        return self.head(x[:, 0, :])

    def head(self, x: Tensor) -> Tensor:
        """x : shape = (..., width) -> (..., output_dim): `ln_post`, then `proj` unless it was set to None (OpenAI's
        model then gives the features before the projection, as linear probes sometimes ask)"""
        x = self.ln_post(x)
        return x if self.proj is None else x @ self.proj

    def forward_intermediates(self, x: Tensor, indices: "int | list[int] | None" = None, need_weights: bool = False) -> dict:
        """x : shape = (batch_size, 3, res, res) -> a dict of

        image_features : (batch_size, output_dim), as `forward`
        image_intermediates : the chosen blocks' outputs, each (batch_size, grid ** 2 + 1, width), class token first
        image_tokens : every final token through `ln_post` and `proj`, (batch_size, grid ** 2 + 1, output_dim)
        image_attentions : with `need_weights`, the chosen blocks' maps, each (batch_size, heads, grid ** 2 + 1, grid ** 2 + 1)
        """
        take = take_indices(self.transformer.layers, indices)
        x, hidden, maps = self.transformer.forward_intermediates(self.embed(x), need_weights)
        out = {
            "image_features": self.head(x[:, 0, :]),  # `forward`'s features, within rounding
            "image_intermediates": [hidden[i] for i in take],
            "image_tokens": self.head(x),
        }
        if need_weights:
            out["image_attentions"] = [maps[i] for i in take]
        return out


def _is_exporting() -> bool:
    """Whether torch.export is tracing this call (torch.compiler.is_exporting, from torch 2.6; never before it)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return is_exporting is not None and is_exporting()


def is_patchify(conv: nn.Module) -> bool:
    """Whether `conv` is a plain, unwatched patch embedding (kernel = stride, no padding, dilation or groups): the
    convolution a tiling and one matmul compute."""
    return (
        type(conv) is nn.Conv2d
        and pristine(conv)
        and conv.stride == conv.kernel_size
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def image_size_error(h: int, w: int, res: int) -> InputError:
    """The error for images whose grid of patches (or ResNet feature map) is not the one the model's position embeddings have."""
    return InputError(
        f"this model takes {res}x{res} images, got {h}x{w}: its preprocess makes them that size, "
        f"or load(..., image_size=N) resamples the model for N x N"
    )


def check_images(image: Tensor, channels: int = 3) -> None:
    """A clear error for what is not a batch of RGB images (or of the channels a replaced conv1 takes), before any
    layer fails on it with a shape message."""
    if image.dim() != 4 or image.shape[1] != channels:
        raise InputError(
            f"expected images as (batch_size, {channels}, height, width), got shape {tuple(image.shape)}; "
            "preprocess(pil_image).unsqueeze(0) makes a batch of one"
        )


def take_indices(count: int, indices: "int | list[int] | None") -> list[int]:
    """Which of `count` layers to return, as open_clip chooses: None all, an int n the last n, a list by index (negative from the end)."""
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise InputError(f"cannot take the last {indices} layers: this tower has {count}; give 1 to {count}, or a list of indices")
        return list(range(count - indices, count))
    take = []
    for i in indices:
        if not -count <= i < count:
            raise InputError(f"layer index {i} is out of range: this tower has {count} layers (indices {-count} to {count - 1})")
        take.append(i % count)
    return take


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.stride = stride
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

    def forward(self, x: Tensor) -> Tensor:
        """x : shape = (batch_size, c, h, w) -> (batch_size, output_dim)"""
        return self.pool(x)[0]

    def pool(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """x : shape = (batch_size, c, h, w) -> (batch_size, output_dim), and the maps (batch_size, heads, 1, hw + 1)

        OpenAI's version lets all hw + 1 tokens attend and then keeps only the first; only its query matters.
        """
        x = self.tokens(x)  # (n, t, c); its sizes are not unpacked, so that torch.fx can trace this
        q = self.q_proj(x[:, :1]).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (n, heads, 1, c / heads)
        k = self.k_proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (n, heads, t, c / heads)
        v = self.v_proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        if need_weights:
            out, weights = attention_with_weights(q, k, v, causal=False)
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v), None
        return self.c_proj(out.transpose(1, 2).flatten(1)), weights  # (n, 1, heads, c / heads) -> (n, c)

    def values(self, x: Tensor) -> Tensor:
        """x : shape = (batch_size, c, h, w) -> every token's value through `c_proj`, (batch_size, h * w + 1, output_dim)

        The pooled output is an attention-weighted mean of exactly these, so each is a position's feature in the
        joint embedding space (the dense features MaskCLIP reads); the mean token comes first.
        """
        return self.c_proj(self.v_proj(self.tokens(x)))


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
        built(self)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: Tensor) -> Tensor:
        # a pool put in its place (nn.Identity for feature maps) takes any size; torch.fx and torch.jit.trace (ONNX's
        # TorchScript exporter) trace sizes, not values, and a graph they record would keep the check's answer
        tracing = isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing()
        if type(self.attnpool) is AttentionPool2d and not tracing:
            h, w = x.shape[-2:]
            grid = round((self.attnpool.positional_embedding.shape[0] - 1) ** 0.5)  # resized with it, as DenseCLIP does
            if -(-h // 2) // 16 != grid or -(-w // 2) // 16 != grid:  # the map the pool gets: a stride-2 conv, then four halvings
                raise image_size_error(h, w, grid * 32)
        # channels_last (NHWC): the layout oneDNN and cuDNN convolve fastest; every later activation inherits it.
        # Only for inference (no autograd, eval mode) on a tower as built: a hook gets OpenAI's contiguous NCHW
        # tensors, on which `.view(n, -1)` works; batch statistics summed over NHWC on the CPU carry ~17x the
        # rounding error; and gradients through NHWC convolutions (CLIP-guided generation, fine-tuning in eval mode)
        # drift from OpenAI's by ~1e-3 on the input, ~4e-5 on the weights
        inference = not self.training and not torch.is_grad_enabled()
        layout = torch.channels_last if inference and pristine(self) else torch.contiguous_format
        x = x.to(dtype=self.conv1.weight.dtype, memory_format=layout)
        x = self.relu1(self.bn1(self.conv1(x)))
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
        return self.attnpool(x)

    def forward_intermediates(self, x: Tensor, indices: "int | list[int] | None" = None, need_weights: bool = False) -> dict:
        """x : shape = (batch_size, 3, res, res) -> a dict of

        image_features : (batch_size, output_dim), as `forward`
        image_intermediates : the chosen stages' outputs (of layer1..layer4), each (batch_size, c, h, w)
        image_tokens : the attention pool's values, (batch_size, h * w + 1, output_dim), the mean token first
        image_attentions : with `need_weights`, one entry: the attention pool's map (batch_size, heads, 1, h * w + 1)
        """
        take = take_indices(4, indices)
        stages = self.stages(x)
        features, weights = self.attnpool.pool(stages[-1], need_weights) if need_weights else (self.attnpool(stages[-1]), None)
        out = {
            "image_features": features,
            "image_intermediates": [stages[i] for i in take],
            "image_tokens": self.attnpool.values(stages[-1]),
        }
        if need_weights:
            out["image_attentions"] = [weights]
        return out


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
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, attn_mask=self.build_attention_mask())
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))
        self.initialize_parameters()

    @torch.no_grad()
    def initialize_parameters(self) -> None:
        """OpenAI's initialisation, value for value under the same seed (its constructor calls it too, so
        `torch.manual_seed(s); CLIP(...)` is OpenAI's model from scratch). The image tower's transformer keeps its
        layers' default initialisation, as there."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            if isinstance(pool, AttentionPool2d):
                for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                    nn.init.normal_(proj.weight, std=pool.c_proj.in_features**-0.5)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for name, param in stage.named_parameters():
                    if name.endswith("bn3.weight"):
                        nn.init.zeros_(param)  # each residual block starts as its shortcut (not the stem's bn3)
        proj_std = self.transformer.width**-0.5 * (2 * self.transformer.layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=self.transformer.width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * self.transformer.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    def build_attention_mask(self) -> Tensor:
        """OpenAI's causal mask of the text tower, (context_length, context_length), which its blocks hold as
        `attn_mask` (and attend by through SDPA's `is_causal` while it is this one)."""
        return causal_mask(self.context_length, device="cpu")  # OpenAI's is a plain attribute, moved to the input at each call

    @property
    def image_channels(self) -> int:
        """The channels the image tower's first convolution takes: 3 (RGB), unless it was replaced (RGB-D...)."""
        return getattr(self.visual.conv1, "in_channels", 3)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: Tensor) -> Tensor:
        """image : shape = (batch_size, 3, res, res) -> features (batch_size, embed_dim), not normalised"""
        check_images(image, self.image_channels)
        return self.visual(image.type(self.dtype))

    def embed_text(self, text: Tensor, full_context: bool = False) -> tuple[Tensor, Tensor]:
        """text : token ids (batch_size, context_length) -> token embeddings (batch_size, n, width), EOT positions

        Only the first n = last EOT position + 1 tokens are kept: attention is causal and features are read at
        the EOT token, so later positions cannot change the result, and short prompts cost a fraction of 77.
        `full_context` keeps all of them (a shape that does not depend on the data: intermediates, ONNX export),
        and so do `torch.jit.trace` and `torch.export`; `torch.compile` keeps the shortcut (also with fullgraph=True).
        """
        if text.dim() != 2 or text.is_floating_point():
            raise InputError(
                f"expected token ids as (batch_size, context_length) integers, got a {text.dtype} tensor of shape "
                f"{tuple(text.shape)}; tokenize(texts) makes them (a single text: tokenize('a dog') is (1, 77))"
            )
        if text.shape[-1] > self.context_length:
            raise InputError(
                f"text has {text.shape[-1]} tokens but this model's context length is {self.context_length}; "
                f"tokenize with context_length={self.context_length}"
            )
        eot = text.argmax(dim=-1)  # EOT has the largest id in the vocabulary
        if full_context or torch.jit.is_tracing() or _is_exporting():  # a traced or exported graph would keep this batch's length for every later one
            n_ctx = text.shape[-1]
        else:
            n_ctx = int(eot.max()) + 1 if text.shape[0] else 1
            torch._check(n_ctx >= 1)  # bounds that let torch.compile(fullgraph=True) slice by a data-dependent length
            torch._check(n_ctx <= text.shape[-1])
        x = self.token_embedding(text[:, :n_ctx]).type(self.dtype)
        return x + self.positional_embedding[:n_ctx].type(self.dtype), eot

    def encode_text(self, text: Tensor, full_context: bool = False) -> Tensor:
        """text : token ids (batch_size, context_length) from `tokenize` -> features (batch_size, embed_dim)

        `full_context` runs every position (see `embed_text`): the same features, slower; for graph export.
        """
        if pristine(self.token_embedding, self.transformer, self.ln_final):
            x, eot = self.embed_text(text, full_context)
            x = self.transformer.forward_rows(x, eot)  # (batch_size, width), at each text's EOT
            return self.ln_final(x).type(self.dtype) @ self.text_projection
        # watched or changed: OpenAI's steps on all context_length positions, as every hook or wrapper sees them there
        x, eot = self.embed_text(text, full_context=True)
        x = self.transformer(x.transpose(0, 1)).transpose(0, 1)
        x = self.ln_final(x).type(self.dtype)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """-> logits_per_image (n_images, n_texts), logits_per_text (n_texts, n_images)"""
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)
        image_features = image_features / image_features.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    def forward_intermediates(
        self,
        image: Optional[Tensor] = None,
        text: Optional[Tensor] = None,
        image_indices: "int | list[int] | None" = None,
        text_indices: "int | list[int] | None" = None,
        output_attentions: bool = False,
    ) -> dict:
        """Per-layer hidden states, final tokens and (when asked) attention maps of either tower or both, named as open_clip names them.

        image : shape = (batch_size, 3, res, res); text : token ids (batch_size, context_length) from `tokenize`
        image_indices, text_indices : which layers (ViT and text: blocks; ResNet: the four stages): None all,
            an int n the last n, or a list of indices (negative from the end)
        output_attentions : also return the chosen layers' attention maps, softmax(QKᵀ/√d) per head, fp32;
            without it attention stays on `F.scaled_dot_product_attention`

        Returns a dict with, for the image (see `VisionTransformer` / `ModifiedResNet.forward_intermediates`):
            image_features (batch_size, embed_dim), `encode_image`'s within rounding; image_intermediates, a list;
            image_tokens (batch_size, tokens, embed_dim); image_attentions, a list
        and for the text, which runs all context_length positions so shapes do not depend on the batch
        (positions after EOT are what OpenAI's model computes there; causal attention keeps them out of the
        features):
            text_features (batch_size, embed_dim), `encode_text`'s within rounding
            text_intermediates : the chosen blocks' outputs, each (batch_size, context_length, width)
            text_eot : `ln_final` of the last block's output at the EOT token, (batch_size, width); the features
                are text_eot @ text_projection
            text_attentions : the chosen blocks' maps, each (batch_size, heads, context_length, context_length), causal
        """
        out = {}
        if image is not None:
            check_images(image, self.image_channels)
            out.update(self.visual.forward_intermediates(image.type(self.dtype), image_indices, output_attentions))
        if text is not None:
            take = take_indices(self.transformer.layers, text_indices)
            x, eot = self.embed_text(text, full_context=True)
            x, hidden, maps = self.transformer.forward_intermediates(x, output_attentions)
            pooled = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot]).type(self.dtype)
            out.update(text_features=pooled @ self.text_projection, text_intermediates=[hidden[i] for i in take], text_eot=pooled)
            if output_attentions:
                out["text_attentions"] = [maps[i] for i in take]
        return out


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
    """Read the architecture from the keys and shapes of an OpenAI-layout state dict (as OpenAI's `build_model`).

    Each size is read from one key and checked against the others that imply it, so a misshapen entry is named
    itself rather than a neighbour whose expected shape was derived from it.
    """
    sd = state_dict

    def dims(key: str, ndim: int) -> tuple[int, ...]:
        if key not in sd:
            some = ", ".join(list(sd)[:3])  # another model's state dict (a torchvision ResNet...) shows in its keys
            raise CheckpointError(f"not a CLIP state dict in OpenAI's layout: missing key {key!r} (its keys begin {some}, ...)")
        value = sd[key]
        if not isinstance(value, Tensor) or value.dim() != ndim or 0 in value.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise CheckpointError(f"checkpoint entry {key!r} has shape {shape}, expected a non-empty {ndim}-D tensor")
        return tuple(value.shape)

    def agree(size: int, key: str, other: int, other_key: str) -> None:
        if size != other:
            raise CheckpointError(f"checkpoint entries {key!r} and {other_key!r} disagree on a size ({size} vs {other}); one of them is misshapen")

    def count(prefix: str, depth: int, suffix: str) -> int:
        return len({k.split(".")[depth] for k in sd if k.startswith(prefix) and k.endswith(suffix)})

    def heads(width: int, key: str) -> int:
        # OpenAI's rule, one head per 64 channels: a width below 64, or one that does not split evenly into
        # width // 64 heads, builds no attention (nn.MultiheadAttention would fail with an assert)
        if width < 64 or width % (width // 64):
            raise CheckpointError(
                f"checkpoint entry {key!r} says an attention layer is {width} wide; CLIP's have one head per 64 "
                "channels, so a width is at least 64 and splits evenly into width // 64 heads"
            )
        return width // 64

    transformer_width = dims("ln_final.weight", 1)[0]
    context_length, width = dims("positional_embedding", 2)
    agree(width, "positional_embedding", transformer_width, "ln_final.weight")
    vocab_size, width = dims("token_embedding.weight", 2)
    agree(width, "token_embedding.weight", transformer_width, "ln_final.weight")
    width, embed_dim = dims("text_projection", 2)
    agree(width, "text_projection", transformer_width, "ln_final.weight")
    if "visual.proj" in sd:
        vision_width, channels, vision_patch_size, patch_w = dims("visual.conv1.weight", 4)
        agree(channels, "visual.conv1.weight", 3, "RGB channels")
        agree(vision_patch_size, "visual.conv1.weight", patch_w, "visual.conv1.weight")
        agree(dims("visual.class_embedding", 1)[0], "visual.class_embedding", vision_width, "visual.conv1.weight")
        width, output_dim = dims("visual.proj", 2)
        agree(width, "visual.proj", vision_width, "visual.conv1.weight")
        agree(output_dim, "visual.proj", embed_dim, "text_projection")
        tokens, width = dims("visual.positional_embedding", 2)
        agree(width, "visual.positional_embedding", vision_width, "visual.conv1.weight")
        grid_size = round((tokens - 1) ** 0.5)
        agree(grid_size**2 + 1, "visual.positional_embedding", tokens, "a square grid plus a class token")
        vision_layers = count("visual.transformer.resblocks.", 3, ".attn.in_proj_weight")
        heads(vision_width, "visual.conv1.weight")
        image_resolution = vision_patch_size * grid_size
    else:
        vision_layers = tuple(count(f"visual.layer{b}.", 2, ".conv1.weight") for b in (1, 2, 3, 4))
        vision_width = dims("visual.layer1.0.conv1.weight", 4)[0]
        tokens, width = dims("visual.attnpool.positional_embedding", 2)
        agree(width, "visual.attnpool.positional_embedding", vision_width * 32, "visual.layer1.0.conv1.weight")
        agree(dims("visual.attnpool.c_proj.weight", 2)[0], "visual.attnpool.c_proj.weight", embed_dim, "text_projection")
        output_width = round((tokens - 1) ** 0.5)
        agree(output_width**2 + 1, "visual.attnpool.positional_embedding", tokens, "a square grid plus a mean token")
        heads(vision_width * 32, "visual.layer1.0.conv1.weight")  # the attention pool's
        vision_patch_size = None
        image_resolution = output_width * 32
    if (vision_layers if isinstance(vision_layers, int) else min(vision_layers)) == 0:
        raise CheckpointError("not a CLIP state dict in OpenAI's layout: a stage of the image tower has no blocks")
    transformer_layers = count("transformer.resblocks.", 2, ".attn.in_proj_weight")
    if transformer_layers == 0:
        raise CheckpointError("not a CLIP state dict in OpenAI's layout: the text tower has no blocks ('transformer.resblocks.*')")
    return dict(
        embed_dim=embed_dim,
        image_resolution=image_resolution,
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=vision_patch_size,
        context_length=context_length,
        vocab_size=vocab_size,
        transformer_width=transformer_width,
        transformer_heads=heads(transformer_width, "ln_final.weight"),
        transformer_layers=transformer_layers,
    )


def resize_image_embeddings(state_dict: dict[str, Tensor], image_size: int) -> dict[str, Tensor]:
    """An OpenAI-layout state dict for another input size: `build_model` on the result takes image_size px images.

    The position embeddings of the image grid (ViT: `visual.positional_embedding`; ResNet:
    `visual.attnpool.positional_embedding`) are resampled bicubically on the grid, with the class (ViT) or mean
    (ResNet) token's row kept, as open_clip's `resize_pos_embed` does. Every other entry is the input's own
    tensor; at the native size the input dict itself is returned, so the model is bit-identical.
    """
    vit = "visual.proj" in state_dict
    key = "visual.positional_embedding" if vit else "visual.attnpool.positional_embedding"
    if key not in state_dict or (vit and "visual.conv1.weight" not in state_dict):
        raise CheckpointError(f"not a CLIP state dict in OpenAI's layout: missing {key!r}")
    stride = state_dict["visual.conv1.weight"].shape[-1] if vit else 32  # pixels per grid cell: the patch, or the ResNet's downsampling
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < stride or image_size % stride:
        # a partial cell would be cropped away by the model, so the preprocess size and the model would disagree
        why = "its patch size" if vit else "a ResNet downsamples 32x"
        raise InputError(f"image_size must be a positive multiple of {stride} for this model ({why}), got {image_size!r}")
    embedding = state_dict[key]
    grid = image_size // stride
    if embedding.shape[0] == grid * grid + 1:
        return state_dict
    return {**state_dict, key: _resample_grid(embedding, grid)}


def _resample_grid(embedding: Tensor, grid: int) -> Tensor:
    """embedding : shape = (1 + old_grid ** 2, width) -> (1 + grid ** 2, width), the first row kept

    open_clip's settings (bicubic, antialiased, align_corners=False), computed in fp32 because CPU bicubic has no
    fp16 kernel everywhere, and returned in the input's dtype.
    """
    first, cells = embedding[:1], embedding[1:]
    old = round(cells.shape[0] ** 0.5)
    cells = cells.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, width, old, old)
    cells = F.interpolate(cells, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    cells = cells.permute(0, 2, 3, 1).reshape(grid * grid, -1)
    return torch.cat([first, cells.to(embedding.dtype)])


def build_model(state_dict: dict[str, Tensor], *, copy: bool = True) -> CLIP:
    """A CLIP in fp32 with the architecture read from `state_dict` and its weights loaded strictly.

    Any checkpoint in OpenAI's layout loads, not only the nine released ones; a missing, extra or misshapen key is
    a CheckpointError that names the key. The model holds copies of the tensors, as OpenAI's does; `copy=False`
    lets it take the fp32 ones instead (for a state dict no one else holds: `load` reads one from the file).
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
    # copies, as OpenAI's load_state_dict into a built model makes: two models built from one state dict (a
    # fine-tuned one beside the zero-shot one, a teacher and its student) must not share their weights
    state_dict = {k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=copy) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def _shorten(keys: list[str], most: int = 5) -> str:
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


# The methods the shortcuts compute around, per class the models are built of, as defined when this file was
# imported: code written for OpenAI's model patches them on the instance or on the class
# (`clip.model.ResidualAttentionBlock.forward = f`, `block.attention = f`), and `pristine` compares against these.
OWN_METHODS: dict[type, tuple[tuple[str, object], ...]] = {
    cls: tuple((name, getattr(cls, name)) for name in ("forward", "attention") if hasattr(cls, name))
    for cls in (
        *(LayerNorm, QuickGELU, MultiheadAttention, ResidualAttentionBlock, MLP, Transformer, VisionTransformer),
        *(Bottleneck, AttentionPool2d, ModifiedResNet, CLIP),
        *(nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear, nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
        *(nn.AvgPool2d, nn.Identity, nn.Sequential, nn.Embedding),
    )
}
