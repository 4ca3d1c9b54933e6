"""Code written against OpenAI's modules works on ours: called one by one, each module keeps OpenAI's contract.

Prompt learners (CoOp and its kin) call `model.transformer` on sequence-first tensors; feature extractors and
Grad-CAM hook blocks; LoRA and quantisation replace the MLP's linears. Each is done here to OpenAI's model and to
ours, built from the same weights, and must give the same numbers.
"""

import pytest
import torch
from reference import openai_clip, reference_model, relative_error
from torch import nn

from openclip_lite.model import build_model

TEXTS = ["a diagram", "a photo of a dog.", "a much longer caption about a small cat sitting on a red mat in the sun"]


@pytest.fixture(scope="module", params=["tiny-vit", "tiny-rn"])
def pair(request):
    ref = reference_model(request.param)
    return ref, build_model(ref.state_dict())


def images(model, n: int = 2) -> torch.Tensor:
    res = model.visual.input_resolution
    return torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_prompt_learner_text_encoder(pair):
    # CoOp's TextEncoder: learned context vectors in place of token embeddings, then OpenAI's modules by hand
    ref, ours = pair
    tokens = openai_clip.tokenize(TEXTS)
    prompts = ref.token_embedding(tokens) + 0.1 * torch.randn(len(TEXTS), 77, ref.transformer.width, generator=torch.Generator().manual_seed(1))

    def encode(model):
        x = prompts + model.positional_embedding
        x = model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # NLD -> LND -> NLD
        x = model.ln_final(x)
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection

    assert relative_error(encode(ours), encode(ref)) < 1e-5


@torch.no_grad()
def test_blocks_called_one_by_one(pair):
    ref, ours = pair
    x = torch.randn(77, 3, ref.transformer.width, generator=torch.Generator().manual_seed(2))  # (n_ctx, batch, width)
    expected, actual = x, x
    for ref_block, our_block in zip(ref.transformer.resblocks, ours.transformer.resblocks):
        expected, actual = ref_block(expected), our_block(actual)
        assert actual.shape == expected.shape and relative_error(actual, expected) < 1e-5


def hook_outputs(modules: list[nn.Module]) -> tuple[list[torch.Tensor], list]:
    outputs = []
    handles = [m.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone())) for m in modules]
    return outputs, handles


@torch.no_grad()
@pytest.mark.parametrize("arch, tower", [("tiny-vit", "image"), ("tiny-vit", "text"), ("tiny-rn", "text")])  # a ResNet's image tower: below
def test_hooks_see_what_they_see_in_openai_model(arch, tower):
    # Grad-CAM and feature extractors hook the last block (among others): it must run, on every position
    ref = reference_model(arch)
    ours = build_model(ref.state_dict())
    x = images(ref) if tower == "image" else openai_clip.tokenize(TEXTS)
    results = []
    for model in (ref, ours):
        blocks = (model.visual.transformer if tower == "image" else model.transformer).resblocks
        watched = [blocks[0], blocks[-1], blocks[-1].ln_1, blocks[-1].mlp.c_fc] + ([model.visual.conv1] if tower == "image" else [model.ln_final])
        outputs, handles = hook_outputs(watched)
        features = model.encode_image(x) if tower == "image" else model.encode_text(x)
        for handle in handles:
            handle.remove()
        results.append((features, outputs))
    (ref_features, ref_outputs), (our_features, our_outputs) = results
    assert relative_error(our_features, ref_features) < 1e-5
    assert len(our_outputs) == len(ref_outputs) == 5
    for actual, expected in zip(our_outputs, ref_outputs):
        assert actual.shape == expected.shape and relative_error(actual, expected) < 1e-5
    # hooks gone, the shortcuts come back: the same features again
    features = ours.encode_image(x) if tower == "image" else ours.encode_text(x)
    assert relative_error(features, ref_features) < 1e-5


@torch.no_grad()
def test_resnet_hooks_and_attention_pool():
    ref = reference_model("tiny-rn")
    ours = build_model(ref.state_dict())
    x = images(ref)
    results = []
    for model in (ref, ours):
        outputs, handles = hook_outputs([model.visual.layer4, model.visual.attnpool])
        model.encode_image(x)
        for handle in handles:
            handle.remove()
        results.append(outputs)
    for actual, expected in zip(*reversed(results)):
        assert isinstance(actual, torch.Tensor) and actual.shape == expected.shape
        assert relative_error(actual, expected) < 1e-5


class LoRALinear(nn.Linear):
    """loralib's shape of LoRA: an nn.Linear subclass whose forward adds a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__(base.in_features, base.out_features)
        self.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(3)
        self.lora_A = nn.Parameter(0.1 * torch.randn(rank, base.in_features, generator=g))
        self.lora_B = nn.Parameter(0.1 * torch.randn(base.out_features, rank, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.lora_A.t() @ self.lora_B.t()


def with_lora(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        if hasattr(module, "c_fc") and hasattr(module, "c_proj"):  # the MLP of every block, in both models
            module.c_fc, module.c_proj = LoRALinear(module.c_fc), LoRALinear(module.c_proj)
    return model


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
def test_lora_on_the_mlp_takes_effect_and_trains(arch):
    ref, ours = with_lora(reference_model(arch)), with_lora(build_model(reference_model(arch).state_dict()))
    tokens = openai_clip.tokenize(TEXTS)
    expected, actual = ref.encode_text(tokens).detach(), ours.encode_text(tokens)
    with torch.no_grad():
        plain = build_model(reference_model(arch).state_dict()).encode_text(tokens)
    assert relative_error(actual.detach(), expected) < 1e-5
    assert relative_error(actual.detach(), plain) > 1e-3  # the update is in the features, not ignored
    actual.sum().backward()
    lora = [p for name, p in ours.named_parameters() if name.startswith("transformer.") and "lora_" in name]  # the text tower's
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


@torch.no_grad()
def test_dynamic_quantization():
    ref = reference_model("tiny-vit")
    ours = build_model(ref.state_dict())
    quantized = torch.ao.quantization.quantize_dynamic(ours, {nn.Linear}, dtype=torch.qint8)
    assert any(type(m) is not nn.Linear and "Linear" in type(m).__name__ for m in quantized.modules())
    tokens = openai_clip.tokenize(TEXTS)
    # int8 weights: near the fp32 features, not equal to them
    assert 0 < relative_error(quantized.encode_text(tokens), ref.encode_text(tokens)) < 0.1


@torch.no_grad()
def test_empty_batches(pair):
    # a filter that left nothing: OpenAI's encode_text returns (0, embed_dim), and so does ours, for images too
    ref, ours = pair
    tokens = torch.zeros(0, 77, dtype=torch.long)
    embed_dim = ref.text_projection.shape[1]
    assert ours.encode_text(tokens).shape == ref.encode_text(tokens).shape == (0, embed_dim)
    assert ours.encode_image(images(ref, 0)).shape == (0, embed_dim)


@torch.no_grad()
def test_bad_inputs_raise_what_code_written_for_openai_catches(pair):
    # OpenAI's model fails on these deep inside (RuntimeError, or ValueError); ours says what is wrong, as an
    # InputError, which is both, so the `except` around OpenAI's calls still catches it
    from openclip_lite.errors import InputError

    ref, ours = pair
    res = ref.visual.input_resolution
    tokens = openai_clip.tokenize(TEXTS)
    cases = {
        "images of twice the size": lambda m: m.encode_image(torch.randn(1, 3, 2 * res, 2 * res)),
        "one image without a batch": lambda m: m.encode_image(torch.randn(3, res, res)),
        "78 tokens": lambda m: m.encode_text(torch.cat([tokens, tokens[:, :1]], dim=1)),
        "one text without a batch": lambda m: m.encode_text(tokens[0]),
    }
    for case, call in cases.items():
        with pytest.raises((RuntimeError, ValueError)) as expected:  # a ResNet's BatchNorm raises ValueError for 3-D input
            call(ref)
        with pytest.raises(InputError) as info:
            call(ours)
        caught_by = RuntimeError if isinstance(expected.value, RuntimeError) else ValueError
        assert isinstance(info.value, caught_by), case


@torch.no_grad()
def test_traced_text_encoder_takes_longer_texts(pair):
    # torch.jit.trace records shapes: traced on short prompts, the text tower must still run all 77 positions
    ref, ours = pair
    short, long = openai_clip.tokenize(["a dog", "a cat"]), openai_clip.tokenize(TEXTS[-1:] * 2)
    traced = torch.jit.trace_module(ours, {"encode_text": (short,)}, check_trace=False)
    assert relative_error(traced.encode_text(long), ref.encode_text(long)) < 1e-5


@torch.no_grad()
def test_resnet_hooks_get_openai_layout():
    # a hook that flattens a stage's output with .view, as written for OpenAI's contiguous tensors
    ref = reference_model("tiny-rn")
    ours = build_model(ref.state_dict())
    flat = []
    handle = ours.visual.layer4.register_forward_hook(lambda module, args, out: flat.append(out.view(out.shape[0], -1)))
    ours.encode_image(images(ref))
    handle.remove()
    assert flat[0].shape[0] == 2


@torch.no_grad()
def test_profilers_measure_the_fast_path():
    # FlopCounterMode watches every module through global hooks; those do not switch the shortcuts off, so it
    # counts what runs: on short prompts, far fewer FLOPs than OpenAI's full context
    from torch.utils.flop_counter import FlopCounterMode

    ref = reference_model("tiny-vit")
    ours = build_model(ref.state_dict())
    tokens = openai_clip.tokenize(["a dog", "a cat"])
    counted = []
    for model in (ref, ours):
        with FlopCounterMode(display=False) as counter:
            model.encode_text(tokens)
        counted.append(counter.get_total_flops())
    assert counted[1] < counted[0] / 5


class Wrapper(nn.Module):
    """What activation-checkpointing wrappers look like: the block inside, attributes passed through."""

    calls = 0

    def __init__(self, block: nn.Module):
        super().__init__()
        self.inner = block

    def forward(self, *args, **kwargs):
        Wrapper.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


@torch.no_grad()
def test_wrapped_blocks_are_called_and_hooks_fire_in_intermediates():
    ref = reference_model("tiny-vit")
    ours = build_model(ref.state_dict())
    blocks = ours.transformer.resblocks
    for i in range(len(blocks)):
        blocks[i] = Wrapper(blocks[i])
    Wrapper.calls = 0
    tokens = openai_clip.tokenize(TEXTS)
    assert relative_error(ours.encode_text(tokens), ref.encode_text(tokens)) < 1e-5
    assert Wrapper.calls == len(blocks)  # every block, the last too: a wrapper may change what its block gives
    seen, handles = hook_outputs([ours.visual.transformer.resblocks[0]])
    ours.forward_intermediates(image=images(ref))
    handles[0].remove()
    assert len(seen) == 1


class Tanh(nn.Module):
    """A plain wrapper that changes its block's output, as adapters and prompt-tuning wrappers do."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x).tanh()


def patch_forward(module: nn.Module) -> None:
    """MaskCLIP's and SCLIP's way: the instance's forward replaced, here by one that takes tanh of the output."""
    forward = module.forward

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        return (out[0].tanh(), out[1]) if isinstance(out, tuple) else out.tanh()

    module.forward = patched


def change_last_block(how: str, blocks: nn.Sequential) -> None:
    if how == "forward patched":
        patch_forward(blocks[-1])
    elif how == "attention's forward patched":
        patch_forward(blocks[-1].attn)
    elif how == "block's attention patched":  # attention-rollout scripts replace `attention` to collect the maps
        attention = blocks[-1].attention
        blocks[-1].attention = lambda x: attention(x).tanh()
    elif how == "wrapped":
        blocks[-1] = Tanh(blocks[-1])
    elif how == "replaced by Identity":
        blocks[-1] = nn.Identity()


@torch.no_grad()
@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("how", ["forward patched", "attention's forward patched", "block's attention patched", "wrapped", "replaced by Identity"])
def test_a_changed_last_block_is_what_runs(how, tower):
    # the towers compute the last block's read-out token themselves while it is as built; a patched forward or a
    # module put in its place must run instead, as in OpenAI's model, not be computed around
    features = []
    for model in (reference_model("tiny-vit"), build_model(reference_model("tiny-vit").state_dict())):
        x = images(model) if tower == "image" else openai_clip.tokenize(TEXTS)
        encode = model.encode_image if tower == "image" else model.encode_text
        plain = encode(x)
        change_last_block(how, (model.visual.transformer if tower == "image" else model.transformer).resblocks)
        features.append(encode(x))
        assert relative_error(features[-1], plain) > 1e-3  # the change shows in the features
    assert relative_error(features[1], features[0]) < 1e-5


def block_outputs(model: nn.Module, tower: str) -> list[nn.Module]:
    blocks = (model.visual.transformer if tower == "image" else model.transformer).resblocks
    return [blocks[0].attn, blocks[0].mlp, blocks[-1].attn, blocks[-1].mlp]


@pytest.mark.parametrize("tower", ["image", "text"])
def test_hooks_may_keep_outputs_and_take_gradients(tower):
    # feature extractors keep a module's output without cloning it, attention-relevance code puts full backward
    # hooks on `attn` and `mlp`: neither may see a tensor that the block later changes in place
    seen = []
    for model in (reference_model("tiny-vit"), build_model(reference_model("tiny-vit").state_dict())):
        outputs, grads = [], []
        handles = []
        for module in block_outputs(model, tower):
            handles.append(module.register_forward_hook(lambda module, args, out, kept=outputs: kept.append(out[0] if isinstance(out, tuple) else out)))
            handles.append(module.register_full_backward_hook(lambda module, grad_in, grad_out, kept=grads: kept.append(grad_out[0])))
        x = images(model) if tower == "image" else openai_clip.tokenize(TEXTS)
        features = model.encode_image(x) if tower == "image" else model.encode_text(x)
        features.square().sum().backward()
        for handle in handles:
            handle.remove()
        seen.append((outputs, grads))
    (ref_outputs, ref_grads), (our_outputs, our_grads) = seen
    assert len(our_outputs) == len(ref_outputs) == 4 and len(our_grads) == len(ref_grads) == 4
    for actual, expected in zip(our_outputs + our_grads, ref_outputs + ref_grads):
        assert actual.shape == expected.shape and relative_error(actual.detach(), expected) < 1e-5


@torch.no_grad()
def test_attention_and_mlp_are_openais_modules():
    # LoRA libraries find attention by `isinstance(m, nn.MultiheadAttention)` and call it as OpenAI's blocks do, or
    # put a plain `nn.MultiheadAttention` in its place; neuron probes hook `mlp.gelu`
    ref = reference_model("tiny-vit")
    ours = build_model(ref.state_dict())
    ref_attn, our_attn = ref.transformer.resblocks[0].attn, ours.transformer.resblocks[0].attn
    assert isinstance(our_attn, nn.MultiheadAttention)
    for name in ("embed_dim", "num_heads", "head_dim", "batch_first", "dropout"):
        assert getattr(our_attn, name) == getattr(ref_attn, name), name
    mask = ref.build_attention_mask()
    assert torch.equal(ours.build_attention_mask(), mask)
    x = torch.randn(77, 3, ref.transformer.width, generator=torch.Generator().manual_seed(4))
    expected = ref_attn(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert relative_error(our_attn(x, x, x, need_weights=False, attn_mask=mask)[0], expected) < 1e-6
    our_mlp, ref_mlp = ours.transformer.resblocks[0].mlp, ref.transformer.resblocks[0].mlp
    assert isinstance(our_mlp, nn.Sequential) and list(dict(our_mlp.named_children())) == list(dict(ref_mlp.named_children()))
    assert our_mlp[0] is our_mlp.c_fc and relative_error(our_mlp.gelu(x), ref_mlp.gelu(x)) < 1e-6
    tokens = openai_clip.tokenize(TEXTS)
    plain = ours.encode_text(tokens)
    for model in (ref, ours):
        for block in model.transformer.resblocks:
            replacement = nn.MultiheadAttention(block.attn.embed_dim, block.attn.num_heads)
            replacement.load_state_dict(block.attn.state_dict())
            with torch.no_grad():
                replacement.out_proj.weight.mul_(2)  # so that the replacement's own weights visibly run
            block.attn = replacement
    expected = ref.encode_text(tokens)
    assert relative_error(expected, plain) > 1e-3
    assert relative_error(ours.encode_text(tokens), expected) < 1e-5


def test_resnet_trains_as_openais():
    # fine-tuning a ResNet runs BatchNorm on batch statistics: in OpenAI's layout (NCHW), not channels_last, whose
    # sums round differently, so that features and gradients are OpenAI's
    ref = reference_model("tiny-rn").train()
    ours = build_model(ref.state_dict()).train()
    x = images(ref, 4)
    features = []
    for model in (ref, ours):
        out = model.encode_image(x)
        out.square().sum().backward()
        features.append(out.detach())
    assert relative_error(features[1], features[0]) < 1e-6
    expected = dict(ref.named_parameters())
    for name, param in ours.visual.named_parameters():
        grad, expected_grad = param.grad.double(), expected["visual." + name].grad.double()
        # with a floor for the attention pool's key bias, whose gradient is zero in exact arithmetic (softmax ignores
        # a constant added to every score) and so rounding noise on both sides
        assert (grad - expected_grad).norm() <= 1e-5 * expected_grad.norm() + 1e-6, name


def with_plain_attention(model: nn.Module) -> nn.Module:
    """Every block's attn swapped for a plain nn.MultiheadAttention holding the same weights."""
    for module in list(model.modules()):
        if isinstance(getattr(module, "attn", None), nn.MultiheadAttention):
            replacement = nn.MultiheadAttention(module.attn.embed_dim, module.attn.num_heads)
            replacement.load_state_dict(module.attn.state_dict())
            module.attn = replacement
    return model


@torch.no_grad()
def test_attention_maps_of_changed_blocks():
    # forward_intermediates with maps on a model whose attention was swapped: the features are still the model's
    # own, the maps still softmax(QKᵀ/√d) per head
    from openclip_lite.errors import InputError

    ref = reference_model("tiny-vit")
    x, tokens = images(ref), openai_clip.tokenize(TEXTS)
    plain = build_model(ref.state_dict()).forward_intermediates(x, tokens, output_attentions=True)
    swapped = with_plain_attention(build_model(ref.state_dict()))
    out = swapped.forward_intermediates(x, tokens, output_attentions=True)
    assert relative_error(out["image_features"], ref.encode_image(x)) < 1e-5
    assert relative_error(out["text_features"], ref.encode_text(tokens)) < 1e-5
    for key in ("image_attentions", "text_attentions"):
        for actual, expected in zip(out[key], plain[key]):
            assert actual.dtype == torch.float32 and actual.shape == expected.shape
            assert relative_error(actual, expected) < 1e-5
    # a block whose forward is patched, or that is wrapped, would be skipped by reading the maps inside it: refused
    for how in ("forward patched", "wrapped"):
        changed = build_model(ref.state_dict())
        change_last_block(how, changed.visual.transformer.resblocks)
        with pytest.raises(InputError, match="block 1 was wrapped, replaced or had its forward patched"):
            changed.forward_intermediates(x, output_attentions=True)
        assert relative_error(changed.forward_intermediates(x)["image_features"], changed.encode_image(x)) < 1e-6


@torch.no_grad()
def test_intermediates_are_contiguous():
    # code written for open_clip flattens them with .view; blocks as built and blocks changed alike
    for ours in (build_model(reference_model("tiny-vit").state_dict()), with_plain_attention(build_model(reference_model("tiny-vit").state_dict()))):
        out = ours.forward_intermediates(images(ours), openai_clip.tokenize(TEXTS))
        assert all(h.is_contiguous() for h in out["image_intermediates"] + out["text_intermediates"])
        assert out["image_intermediates"][0].view(2, -1).shape[0] == 2


@torch.no_grad()
def test_a_forward_patched_after_compiling_takes_effect():
    # torch.compile guards on what `pristine` reads: a patch made after the first compiled call recompiles
    ref, ours = reference_model("tiny-vit"), build_model(reference_model("tiny-vit").state_dict())
    tokens = openai_clip.tokenize(TEXTS)
    compiled = torch.compile(ours.encode_text, fullgraph=True)
    compiled(tokens)
    for model in (ref, ours):
        patch_forward(model.transformer.resblocks[-1])
    assert relative_error(compiled(tokens), ref.encode_text(tokens)) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("cls", ["ResidualAttentionBlock", "MultiheadAttention"])
def test_a_method_patched_on_the_class_takes_effect(monkeypatch, cls):
    # `clip.model.ResidualAttentionBlock.forward = f` before `clip.load`, as code written for OpenAI's model does;
    # nn.MultiheadAttention.forward patched for both models at once
    import clip.model as openai_model

    from openclip_lite import model as our_model

    ref = reference_model("tiny-vit")
    ours = build_model(ref.state_dict())
    x, tokens = images(ref), openai_clip.tokenize(TEXTS)
    plain = ours.encode_image(x)
    for module in (openai_model, our_model) if cls == "ResidualAttentionBlock" else (nn,):
        forward = getattr(module, cls).forward
        monkeypatch.setattr(getattr(module, cls), "forward", lambda self, *args, forward=forward, **kwargs: tanh_of(forward(self, *args, **kwargs)))
    assert relative_error(ours.encode_image(x), ref.encode_image(x)) < 1e-5
    assert relative_error(ours.encode_text(tokens), ref.encode_text(tokens)) < 1e-5
    assert relative_error(ours.encode_image(x), plain) > 1e-3


def tanh_of(out):
    return (out[0].tanh(), out[1]) if isinstance(out, tuple) else out.tanh()


@torch.no_grad()
@pytest.mark.parametrize("change", ["proj set to None", "conv1 padded", "conv1 taking RGB-D", "ResNet pool removed"])
def test_changed_image_towers_run_as_openais(change):
    # linear probes read the features before the projection; RGB-D models widen conv1; detectors and saliency models
    # drop the attention pool to feed larger images and read the feature map
    arch = "tiny-rn" if change == "ResNet pool removed" else "tiny-vit"
    ref = reference_model(arch)
    ours = build_model(ref.state_dict())
    res, channels = ref.visual.input_resolution, 3
    for model in (ref, ours):
        if change == "proj set to None":
            model.visual.proj = None
        elif change == "conv1 padded":
            model.visual.conv1.padding = (4, 4)  # the same grid of patches, shifted by a quarter patch
        elif change == "conv1 taking RGB-D":
            old = model.visual.conv1
            model.visual.conv1 = nn.Conv2d(4, old.out_channels, old.kernel_size, old.stride, bias=False)
            model.visual.conv1.weight.copy_(torch.cat([old.weight, old.weight[:, :1]], dim=1))
            channels = 4
        else:
            model.visual.attnpool = nn.Identity()
            res = 2 * res  # any size, as the pool was what fixed it
    x = torch.randn(2, channels, res, res, generator=torch.Generator().manual_seed(5))
    expected, actual = ref.visual(x), ours.encode_image(x) if change != "ResNet pool removed" else ours.visual(x)
    assert actual.shape == expected.shape and relative_error(actual, expected) < 1e-5


@torch.no_grad()
def test_attention_masks_are_openais_attributes():
    # code written for OpenAI's blocks reads `attn_mask`, sets it (bidirectional text, a custom vision mask,
    # LongCLIP's longer context), and builds blocks and transformers with OpenAI's arguments
    from openclip_lite.model import Transformer

    ref = reference_model("tiny-vit")
    ours = build_model(ref.state_dict())
    assert ours.visual.transformer.resblocks[0].attn_mask is None
    assert torch.equal(ours.transformer.resblocks[0].attn_mask, ref.transformer.resblocks[0].attn_mask)
    x, tokens = images(ref), openai_clip.tokenize(TEXTS)
    plain_text, plain_image = ours.encode_text(tokens), ours.encode_image(x)
    grid = ref.visual.positional_embedding.shape[0]
    custom = torch.zeros(grid, grid).fill_diagonal_(-1.0)  # each token a little less attentive to itself
    for model in (ref, ours):
        for block in model.transformer.resblocks:
            block.attn_mask = None  # bidirectional text
        for block in model.visual.transformer.resblocks:
            block.attn_mask = custom
    assert relative_error(ours.encode_text(tokens), ref.encode_text(tokens)) < 1e-5
    assert relative_error(ours.encode_image(x), ref.encode_image(x)) < 1e-5
    assert relative_error(ours.encode_text(tokens), plain_text) > 1e-3 and relative_error(ours.encode_image(x), plain_image) > 1e-3
    for model in (ref, ours):  # the masks they were built with: the shortcuts again
        for block in model.transformer.resblocks:
            block.attn_mask = model.build_attention_mask()
        for block in model.visual.transformer.resblocks:
            block.attn_mask = None
    assert relative_error(ours.encode_text(tokens), plain_text) < 1e-6
    width = ref.transformer.width
    ref_stack = openai_clip.model.Transformer(width, 2, 1, attn_mask=ref.build_attention_mask())
    our_stack = Transformer(width, 2, 1, attn_mask=ours.build_attention_mask())
    our_stack.load_state_dict(ref_stack.state_dict())
    h = torch.randn(77, 3, width, generator=torch.Generator().manual_seed(6))
    assert relative_error(our_stack(h), ref_stack(h)) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
def test_a_model_in_channels_last_runs_as_openais(arch):
    # `model.to(memory_format=torch.channels_last)` is a common speed-up, and a checkpoint saved from such a model
    # keeps that layout
    ref = reference_model(arch)
    ours = build_model(ref.state_dict()).to(memory_format=torch.channels_last)
    x = images(ref)
    assert relative_error(ours.encode_image(x), ref.encode_image(x)) < 1e-5
    again = build_model(ours.state_dict())
    assert relative_error(again.encode_image(x), ref.encode_image(x)) < 1e-5


def test_input_gradients_of_a_resnet_are_openais():
    # CLIP-guided generation: a frozen perceptor in eval mode, gradients to the image through encode_image
    ref = reference_model("RN50").requires_grad_(False)
    ours = build_model(ref.state_dict()).requires_grad_(False)
    text = openai_clip.tokenize(TEXTS)
    start = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))  # seed 0 happened to round alike
    grads = []
    for model in (ref, ours):
        image = start.clone().requires_grad_(True)
        logits, _ = model(image, text)
        (1 - logits[:, 0] / 100).sum().backward()
        grads.append(image.grad)
    assert relative_error(grads[1], grads[0]) < 1e-5


@torch.no_grad()
def test_torchvision_feature_extractor_on_a_resnet():
    # torchvision's create_feature_extractor traces the image tower with torch.fx, as feature-map code does
    from torchvision.models.feature_extraction import create_feature_extractor

    ref = reference_model("tiny-rn")
    ours = build_model(ref.state_dict())
    nodes = {"layer3": "layer3", "layer4": "layer4", "attnpool": "pooled"}
    x = images(ref)
    expected = create_feature_extractor(ref.visual, return_nodes=nodes)(x)
    actual = create_feature_extractor(ours.visual, return_nodes=nodes)(x)
    for key in nodes.values():
        assert relative_error(actual[key], expected[key]) < 1e-5, key


@torch.no_grad()
def test_torch_jit_trace_of_a_resnet():
    ref = reference_model("tiny-rn")
    ours = build_model(ref.state_dict())
    x = images(ref)
    traced = torch.jit.trace(ours.visual, x, check_trace=False)
    assert relative_error(traced(images(ref, 3)), ref.visual(images(ref, 3))) < 1e-5
