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
    assert Wrapper.calls == len(blocks) - 1  # every block but the last, which computes one token per text
    seen, handles = hook_outputs([ours.visual.transformer.resblocks[0]])
    ours.forward_intermediates(image=images(ref))
    handles[0].remove()
    assert len(seen) == 1
