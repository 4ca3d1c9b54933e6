"""forward_intermediates, attention maps and other input sizes, against OpenAI's code on random weights.

Hidden states are read from the reference model with forward hooks (OpenAI's transformer is sequence-first, so
they are permuted); attention maps are recomputed here as softmax(QKᵀ/√d) from the reference's weights and the
inputs its blocks actually received. Nothing is compared with numbers typed in or made by the code under test.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import resize_pos_embed
from PIL import Image
from reference import TINY, ReferenceCLIP, openai_clip, relative_error

import openclip_lite as clip
import openclip_lite.model as model_module
from openclip_lite.model import build_model, resize_image_embeddings
from openclip_lite.pretrained import ARCHITECTURES

ARCHS = list(ARCHITECTURES)
TEXTS = ["a photo of a dog.", "a much longer caption about a small cat sitting on a red mat in the sun"]
# (image size, batch): the two smallest architectures at their own size; the others at a small size (the position
# embeddings drawn at that size), which runs every weight of the architecture at a fraction of the cost.
IMAGES = {
    "RN50": (224, 1),
    "ViT-B/32": (224, 2),
    "RN101": (64, 2),
    "RN50x4": (96, 2),
    "RN50x16": (64, 2),
    "RN50x64": (64, 1),
    "ViT-B/16": (64, 2),
    "ViT-L/14": (56, 2),
    "ViT-L/14@336px": (84, 1),
}
SLOW = ("RN50x16", "RN50x64", "ViT-L/14", "ViT-L/14@336px")  # over 250M parameters: most of this file's time
POOL = 1_000_003  # a prime: the random pool's period lines up with no tensor's shape


def random_reference(arch: str, image_size: "int | None" = None, state_dict: "dict | None" = None, seed: int = 0) -> ReferenceCLIP:
    """OpenAI's CLIP (its own code) at `image_size`, with random weights or the given `state_dict`.

    `reference.reference_model` draws every weight three times (PyTorch's init, OpenAI's, a perturbation), which
    takes about 50 CPU-seconds for the nine architectures; here the model is built on the meta device and each
    tensor is filled once from a shared random pool, scaled as the layer needs (1/√fan-in for weights, around 1
    for norms' scales, non-trivial BatchNorm statistics) so that no branch is an identity and activations stay O(1).
    """
    config = list(ARCHITECTURES.get(arch) or TINY[arch])
    if image_size is not None:
        config[1] = image_size
    with torch.device("meta"):
        model = ReferenceCLIP(*config)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True, assign=True)  # the given tensors themselves, no copy
    else:
        model = model.to_empty(device="cpu")
    model = model.float().eval()
    for block in model.transformer.resblocks:  # a plain attribute, not a buffer: it stayed on meta
        block.attn_mask = model.build_attention_mask()
    if state_dict is not None:
        return model
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL, generator=g).repeat(2)  # any window of POOL values is a view: no copy per tensor
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.is_floating_point():
                p.zero_()
                continue
            start, flat = int(torch.randint(POOL, (), generator=g)), p.view(-1)
            for i in range(0, flat.numel(), POOL):
                flat[i : i + POOL].copy_(pool[start : start + min(POOL, flat.numel() - i)])
            if name.endswith("running_var"):
                p.abs_().mul_(0.5).add_(0.5)
            elif name.endswith("running_mean"):
                p.mul_(0.1)
            elif name == "logit_scale":
                p.fill_(math.log(100.0))
            elif p.dim() == 1 and name.endswith("weight"):  # LayerNorm and BatchNorm scales
                p.mul_(0.1).add_(1.0)
            elif p.dim() == 1 or "positional_embedding" in name or "token_embedding" in name:  # biases, embeddings
                p.mul_(0.02)
            elif name in ("visual.proj", "text_projection"):  # used as x @ proj: the fan-in is the first dimension
                p.div_(p.shape[0] ** 0.5)
            else:  # Linear and Conv weights (out, in, ...)
                p.div_(math.prod(p.shape[1:]) ** 0.5)
    return model


class Recorder:
    """Forward hooks that keep each module's output (or, with `inputs`, its first input), in call order."""

    def __init__(self, modules: list, inputs: bool = False):
        self.values: list[torch.Tensor] = []
        if inputs:
            self.handles = [m.register_forward_pre_hook(lambda _, args: self.values.append(args[0])) for m in modules]
        else:
            self.handles = [m.register_forward_hook(lambda _, __, out: self.values.append(out)) for m in modules]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def reference_maps(block: torch.nn.Module, ln_1_out: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d + mask) per head from an OpenAI block's weights and its ln_1 output (seq, n, width) -> (n, heads, seq, seq)"""
    x = ln_1_out.transpose(0, 1)
    n, t, c = x.shape
    heads = block.attn.num_heads
    q, k, _ = F.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
    q, k = (y.view(n, t, heads, c // heads).transpose(1, 2) for y in (q, k))
    scores = q @ k.transpose(-2, -1) / math.sqrt(c // heads)
    if block.attn_mask is not None:
        scores = scores + block.attn_mask
    return scores.softmax(dim=-1)


def reference_pool(pool: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenAI's AttentionPool2d written out: its map (n, heads, 1, hw + 1) and every token's value through c_proj"""
    x = x.flatten(2).permute(2, 0, 1)  # (hw, n, c), as OpenAI's forward
    x = torch.cat([x.mean(dim=0, keepdim=True), x]) + pool.positional_embedding[:, None, :]
    x = x.transpose(0, 1)  # (n, hw + 1, c)
    n, t, c = x.shape
    heads = pool.num_heads
    q = pool.q_proj(x[:, :1]).view(n, 1, heads, -1).transpose(1, 2)
    k = pool.k_proj(x).view(n, t, heads, -1).transpose(1, 2)
    maps = (q @ k.transpose(-2, -1) / math.sqrt(c // heads)).softmax(dim=-1)
    return maps, pool.c_proj(pool.v_proj(x))


@pytest.fixture(scope="module", params=[pytest.param(arch, marks=pytest.mark.slow) if arch in SLOW else arch for arch in ARCHS])
def case(request):
    """One architecture: the reference's captured values and ours, with and without attention maps."""
    arch = request.param
    size, n_images = IMAGES[arch]
    ref = random_reference(arch, size)
    ours = build_model(ref.state_dict())
    vit = hasattr(ref.visual, "transformer")
    image = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(1))
    text = openai_clip.tokenize(TEXTS)
    blocks = ref.visual.transformer.resblocks if vit else [ref.visual.layer1, ref.visual.layer2, ref.visual.layer3, ref.visual.layer4]
    with torch.no_grad():
        with Recorder(list(blocks)) as hidden, Recorder([b.ln_1 for b in blocks] if vit else [ref.visual.attnpool], inputs=not vit) as attn_in:
            image_features = ref.encode_image(image)
        with Recorder(list(ref.transformer.resblocks)) as text_hidden, Recorder([b.ln_1 for b in ref.transformer.resblocks]) as text_ln_1:
            text_features = ref.encode_text(text)
        expected = SimpleNamespace(
            vit=vit,
            image_features=image_features,
            image_hidden=[h.permute(1, 0, 2) for h in hidden.values] if vit else hidden.values,
            text_features=text_features,
            text_hidden=[h.permute(1, 0, 2) for h in text_hidden.values],
            text_maps=[reference_maps(b, x) for b, x in zip(ref.transformer.resblocks, text_ln_1.values)],
        )
        if vit:
            expected.image_maps = [reference_maps(b, x) for b, x in zip(blocks, attn_in.values)]
            expected.image_tokens = ref.visual.ln_post(expected.image_hidden[-1]) @ ref.visual.proj
        else:
            pool_map, expected.image_tokens = reference_pool(ref.visual.attnpool, attn_in.values[0])
            expected.image_maps = [pool_map]
        last = expected.text_hidden[-1][torch.arange(text.shape[0]), text.argmax(dim=-1)]
        expected.text_eot = ref.ln_final(last)
        fast = ours.forward_intermediates(image, text)
        with_maps = ours.forward_intermediates(image, text, output_attentions=True)
    return SimpleNamespace(arch=arch, expected=expected, fast=fast, with_maps=with_maps)


def assert_all_close(actual: list, expected: list, bound: float = 1e-5) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, f"layer {i}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        assert relative_error(a, e) <= bound, f"layer {i}: relative error {relative_error(a, e):.2e}"


@pytest.mark.parametrize("path", ["fast", "with_maps"])
def test_image_hidden_states_equal_reference(case, path):
    out = getattr(case, path)
    assert_all_close(out["image_intermediates"], case.expected.image_hidden)


@pytest.mark.parametrize("path", ["fast", "with_maps"])
def test_text_hidden_states_equal_reference(case, path):
    out = getattr(case, path)
    assert out["text_intermediates"][0].shape[1] == 77  # every position, whatever the batch's longest text
    assert_all_close(out["text_intermediates"], case.expected.text_hidden)


@pytest.mark.parametrize("path", ["fast", "with_maps"])
def test_pooled_outputs_equal_reference(case, path):
    out = getattr(case, path)
    assert relative_error(out["image_features"], case.expected.image_features) <= 1e-5
    assert relative_error(out["text_features"], case.expected.text_features) <= 1e-5
    assert relative_error(out["text_eot"], case.expected.text_eot) <= 1e-5
    assert relative_error(out["image_tokens"], case.expected.image_tokens) <= 1e-5


def test_attention_maps_equal_direct_softmax(case):
    out = case.with_maps
    assert_all_close(out["image_attentions"], case.expected.image_maps)
    assert_all_close(out["text_attentions"], case.expected.text_maps)
    for maps in out["image_attentions"] + out["text_attentions"]:
        torch.testing.assert_close(maps.sum(dim=-1), torch.ones(maps.shape[:-1]), rtol=0, atol=1e-5)
    for maps in out["text_attentions"]:
        assert maps.shape[-2:] == (77, 77)
        assert torch.all(maps.triu(1) == 0), "a text position attends to a later one"
    assert "image_attentions" not in case.fast and "text_attentions" not in case.fast


# --- choosing layers, and the default path, on tiny models (the same code as the large ones) ---


@pytest.fixture(scope="module", params=["tiny-vit", "tiny-rn"])
def tiny(request):
    ref = random_reference(request.param)
    res = ref.visual.input_resolution
    image = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(2))
    return build_model(ref.state_dict()), image, openai_clip.tokenize(TEXTS)


def test_features_equal_encode_image_and_encode_text(tiny):
    model, image, text = tiny
    with torch.no_grad():
        out = model.forward_intermediates(image, text)
        # every token through the last block, and all 77 text positions, against encode_image's and encode_text's
        # runs of the read-out token alone (and the text cut at the last EOT): equal up to rounding in the matmuls
        assert relative_error(out["image_features"], model.encode_image(image)) <= 1e-6
        assert relative_error(out["text_features"], model.encode_text(text)) <= 1e-6
        assert relative_error(out["text_eot"] @ model.text_projection, out["text_features"]) <= 1e-6


@pytest.mark.parametrize(
    "indices, of_2, of_4",  # what to take from a tower of 2 layers (tiny ViT, text) and of 4 (ResNet stages)
    [(None, [0, 1], [0, 1, 2, 3]), (1, [1], [3]), (2, [0, 1], [2, 3]), ([0], [0], [0]), ([-1, 0], [1, 0], [3, 0]), ([1, -2], [1, 0], [1, 2])],
)
def test_layers_are_chosen_as_open_clip_chooses(tiny, indices, of_2, of_4):
    model, image, text = tiny
    vit = hasattr(model.visual, "transformer")
    with torch.no_grad():
        every = model.forward_intermediates(image, text, output_attentions=True)
        chosen = model.forward_intermediates(image, text, image_indices=indices, text_indices=indices, output_attentions=True)
    for key, take in (("image", of_2 if vit else of_4), ("text", of_2)):
        assert len(chosen[f"{key}_intermediates"]) == len(take)
        for got, i in zip(chosen[f"{key}_intermediates"], take):
            assert torch.equal(got, every[f"{key}_intermediates"][i])
        if key == "text" or vit:  # a ResNet's one map is the pool's, whatever the stages chosen
            assert len(chosen[f"{key}_attentions"]) == len(take)
            for got, i in zip(chosen[f"{key}_attentions"], take):
                assert torch.equal(got, every[f"{key}_attentions"][i])
    if not vit:
        assert len(chosen["image_attentions"]) == 1


@pytest.mark.parametrize("indices", [0, 3, [2], [-3], [0, 5]])
def test_a_layer_that_does_not_exist_is_a_clear_error(tiny, indices):
    model, _, text = tiny
    with pytest.raises(ValueError, match="this tower has 2"):
        model.forward_intermediates(text=text, text_indices=indices)


def test_each_tower_alone(tiny):
    model, image, text = tiny
    with torch.no_grad():
        assert set(model.forward_intermediates(image=image)) == {"image_features", "image_intermediates", "image_tokens"}
        assert set(model.forward_intermediates(text=text)) == {"text_features", "text_intermediates", "text_eot"}
        assert model.forward_intermediates() == {}


def test_maps_are_computed_only_when_asked(tiny, monkeypatch):
    model, image, text = tiny

    def explicit_attention(*args, **kwargs):
        raise AssertionError("the explicit softmax ran on the default path")

    monkeypatch.setattr(model_module, "attention_with_weights", explicit_attention)
    with torch.no_grad():
        model.forward_intermediates(image, text)
        model.encode_image(image), model.encode_text(text)
        with pytest.raises(AssertionError, match="explicit softmax"):
            model.forward_intermediates(image, text, output_attentions=True)


# --- other input sizes ---


def open_clip_resize(embedding: torch.Tensor, grid: int) -> torch.Tensor:
    """open_clip's own `resize_pos_embed` on one embedding, with a stand-in for the model it reads the grid from."""
    state_dict = {"visual.positional_embedding": embedding}
    resize_pos_embed(state_dict, SimpleNamespace(visual=SimpleNamespace(grid_size=(grid, grid))))
    return state_dict["visual.positional_embedding"]


@pytest.mark.parametrize("arch, size", [("ViT-B/16", 336), ("ViT-L/14", 336), ("ViT-B/32", 160), ("RN50", 288), ("RN50x4", 224), ("RN50x64", 640)])
def test_resized_embeddings_equal_open_clip(arch, size):
    with torch.device("meta"):  # only the shapes of the other entries matter here
        state_dict = ReferenceCLIP(*ARCHITECTURES[arch]).state_dict()
    vit = "visual.proj" in state_dict
    key = "visual.positional_embedding" if vit else "visual.attnpool.positional_embedding"
    state_dict[key] = torch.randn(state_dict[key].shape, generator=torch.Generator().manual_seed(3))
    resized = resize_image_embeddings(state_dict, size)
    grid = size // (state_dict["visual.conv1.weight"].shape[-1] if vit else 32)
    assert resized[key].shape == (grid * grid + 1, state_dict[key].shape[1])
    assert torch.equal(resized[key], open_clip_resize(state_dict[key], grid))
    assert torch.equal(resized[key][0], state_dict[key][0])  # the class / mean token's row is kept as is
    assert all(resized[k] is v for k, v in state_dict.items() if k != key)


@pytest.mark.parametrize("arch, size", [("ViT-B/16", 336), ("RN50", 288)])
def test_load_at_another_size(arch, size, tmp_path):
    ref = random_reference(arch)
    path = tmp_path / "model.pt"
    torch.save(ref.state_dict(), path)
    model, preprocess = clip.load(str(path), device="cpu", image_size=size)
    assert model.visual.input_resolution == size
    assert preprocess(Image.new("RGB", (500, 400), "red")).shape == (3, size, size)
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(4))
    # OpenAI's code at that size, given the same resampled weights
    expected_model = random_reference(arch, size, state_dict=resize_image_embeddings(ref.state_dict(), size))
    with torch.no_grad():
        features = model.encode_image(image)
        expected = expected_model.encode_image(image)
    assert torch.isfinite(features).all() and features.norm() > 0
    assert torch.isfinite(features / features.norm(dim=-1, keepdim=True)).all()
    assert relative_error(features, expected) <= 1e-5


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
def test_native_size_is_bit_identical(arch, tmp_path):
    ref = random_reference(arch)
    path = tmp_path / "model.pt"
    torch.save(ref.state_dict(), path)
    res = ref.visual.input_resolution
    state_dict = ref.state_dict()
    assert resize_image_embeddings(state_dict, res) is state_dict
    plain, _ = clip.load(str(path), device="cpu")
    native, _ = clip.load(str(path), device="cpu", image_size=res)
    for (name, a), b in zip(plain.state_dict().items(), native.state_dict().values()):
        assert torch.equal(a, b), name
    image = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(plain.encode_image(image), native.encode_image(image))


@pytest.mark.parametrize("arch, size", [("tiny-vit", 40), ("tiny-vit", 0), ("tiny-vit", 32.0), ("tiny-rn", 48), ("tiny-rn", True)])
def test_a_size_the_model_cannot_take_is_a_clear_error(arch, size):
    with pytest.raises(ValueError, match="image_size must be a positive multiple of"):
        resize_image_embeddings(random_reference(arch).state_dict(), size)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
def test_cuda_fp16_intermediates_match_fp32(arch, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(random_reference(arch).state_dict(), path)
    model, _ = clip.load(str(path), device="cuda")  # fp16 weights, fp32 LayerNorm, as OpenAI's load
    fp32, _ = clip.load(str(path), device="cpu")
    res = fp32.visual.input_resolution
    image, text = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(6)), openai_clip.tokenize(TEXTS)
    with torch.no_grad():
        got = model.forward_intermediates(image.cuda(), text.cuda(), output_attentions=True)
        expected = fp32.forward_intermediates(image, text, output_attentions=True)
    assert set(got) == set(expected)
    for key, value in expected.items():
        for a, e in zip(got[key], value) if isinstance(value, list) else [(got[key], value)]:
            assert relative_error(a.cpu(), e) <= 1e-2, key
    assert all(maps.dtype == torch.float32 for maps in got["image_attentions"] + got["text_attentions"])
