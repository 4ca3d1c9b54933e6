"""The fast paths compute what OpenAI's code computes: fused MLP, in-place residuals, channels_last ResNets,
reduced precision (bf16/fp16 weights via `convert_weights`) and `torch.compile`. Correctness only: the speed
itself is measured by benchmarks/bench.py, never asserted here.
"""

import copy

import pytest
import torch
from reference import openai_clip, reference_model, relative_error

from openclip_lite.model import MLP, QuickGELU, ResidualAttentionBlock, build_model, convert_weights

TEXTS = ["a diagram", "a photo of a dog.", "a much longer caption about a small cat sitting on a red mat in the sun", ""]


def inputs(ref, batch: int = 2):
    res = ref.visual.input_resolution
    image = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(0))
    return image, openai_clip.tokenize(TEXTS)


@pytest.fixture(scope="module", params=["tiny-vit", "tiny-rn"])
def tiny(request):
    ref = reference_model(request.param)
    image, text = inputs(ref)
    with torch.no_grad():
        expected = ref.encode_image(image), ref.encode_text(text)
    return ref, image, text, expected


def test_fused_mlp_is_quickgelu_between_the_linears():
    torch.manual_seed(0)
    mlp = MLP(64, 256)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        unfused = mlp.c_proj(QuickGELU()(mlp.c_fc(x)))
        assert relative_error(mlp(x), unfused) < 1e-6
    assert list(dict(mlp.named_parameters())) == ["c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"]


def test_block_leaves_its_input_untouched():
    # the residuals are summed in place into the branches' outputs; the block's input (which callers keep, e.g.
    # as an intermediate) must not change
    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 2).eval()
    x = torch.randn(5, 2, 64)
    before = x.clone()
    with torch.no_grad():
        out = block(x)
    assert torch.equal(x, before) and not torch.equal(out, x)


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
def test_gradients_equal_reference(arch):
    # in-place SiLU and residual sums must not break autograd: training gives OpenAI's gradients
    ref = reference_model(arch)
    ours = build_model(ref.state_dict())
    image, text = inputs(ref)
    for model in (ref, ours):
        model.zero_grad()
        logits, _ = model(image, text)
        logits.logsumexp(dim=-1).sum().backward()
    expected = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        grad, expected_grad = param.grad.double(), expected[name].grad.double()
        # relative, plus an absolute floor for gradients that are zero in exact arithmetic (the attention pool's
        # key bias: softmax ignores a constant added to every score) and so are rounding noise on both sides
        assert (grad - expected_grad).norm() <= 1e-4 * expected_grad.norm() + 1e-6, name


def test_channels_last_resnet_matches_reference():
    # the ResNet converts its input to channels_last; any input layout and channels_last weights give the same features
    ref = reference_model("RN50")
    ours = build_model(ref.state_dict())
    image, _ = inputs(ref)
    with torch.no_grad():
        expected = ref.encode_image(image)
        assert relative_error(ours.encode_image(image), expected) < 1e-5
        assert relative_error(ours.encode_image(image.contiguous(memory_format=torch.channels_last)), expected) < 1e-5
        weights_last = copy.deepcopy(ours).to(memory_format=torch.channels_last)
        assert relative_error(weights_last.encode_image(image), expected) < 1e-5
        stages = ours.visual.stages(image)
    assert [s.shape[1] for s in stages] == [256, 512, 1024, 2048]
    assert all(s.is_contiguous(memory_format=torch.channels_last) for s in stages)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_reduced_precision_on_cpu_matches_fp32_reference(tiny, dtype, tolerance):
    ref, image, text, (image_features, text_features) = tiny
    model = build_model(ref.state_dict())
    convert_weights(model, dtype)
    with torch.no_grad():
        image_out, text_out = model.encode_image(image), model.encode_text(text)
    assert image_out.dtype == dtype and text_out.dtype == dtype
    assert relative_error(image_out.float(), image_features) < tolerance
    assert relative_error(text_out.float(), text_features) < tolerance


@pytest.mark.slow
@pytest.mark.parametrize("freezing", [False, True], ids=["compile", "compile-freezing"])
def test_torch_compile_matches_reference(tiny, freezing):
    # freezing: inductor folds BatchNorm into the convolutions and the weights into the graph (ResNets on the CPU)
    from torch._inductor import config as inductor_config

    ref, image, text, (image_features, text_features) = tiny
    model = build_model(ref.state_dict())
    torch._dynamo.reset()
    encode_image, encode_text = torch.compile(model.encode_image), torch.compile(model.encode_text)
    with torch.no_grad(), inductor_config.patch(freezing=freezing):
        assert relative_error(encode_image(image), image_features) < 1e-5
        assert relative_error(encode_text(text), text_features) < 1e-5
        # a batch with a different last end-of-text position: the text tower's length changes, the answer must not
        assert relative_error(encode_text(text[:2]), text_features[:2]) < 1e-5


@pytest.mark.slow
def test_fullgraph_compile_and_export_match_reference(tiny):
    # one graph for the whole tower: what CUDA graphs ("reduce-overhead") and torch.export need; the text tower's
    # length comes from the data, so the compiled graph slices by it and the exported one runs the whole context
    ref, image, text, (image_features, text_features) = tiny
    model = build_model(ref.state_dict())
    torch._dynamo.reset()
    encode_image = torch.compile(model.encode_image, fullgraph=True)
    encode_text = torch.compile(model.encode_text, fullgraph=True)
    with torch.no_grad():
        assert relative_error(encode_image(image), image_features) < 1e-5
        assert relative_error(encode_text(text), text_features) < 1e-5
        assert relative_error(encode_text(text[:2]), text_features[:2]) < 1e-5

    class TextTower(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, text):
            return self.model.encode_text(text)

    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(TextTower(model), (text[:2],), dynamic_shapes=({0: batch},)).module()
    with torch.no_grad():  # exported with two short prompts, run with the long one and the empty one too
        assert relative_error(exported(text), text_features) < 1e-5
        assert relative_error(exported(text[2:3]), text_features[2:3]) < 1e-5


def test_text_tower_runs_on_a_torch_without_is_exporting(tiny, monkeypatch):
    # torch.compiler.is_exporting came with torch 2.6; setup.py allows torch 2.1
    ref, _, text, (_, text_features) = tiny
    model = build_model(ref.state_dict())
    monkeypatch.delattr(torch.compiler, "is_exporting")
    with torch.no_grad():
        assert relative_error(model.encode_text(text), text_features) < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["ViT-B/32", "RN50"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_reduced_precision_with_autotuning_matches_reference(arch, dtype):
    ref = reference_model(arch)
    model = build_model(ref.state_dict())
    convert_weights(model, dtype)
    model, reference = model.cuda(), ref.cuda()
    image, text = inputs(ref, batch=8)
    image, text = image.cuda(), text.cuda()
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with torch.no_grad():
            image_out, text_out = model.encode_image(image), model.encode_text(text)
            expected_image, expected_text = reference.encode_image(image), reference.encode_text(text)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    tolerance = 1e-2 if dtype == torch.float16 else 3e-2
    assert relative_error(image_out.float(), expected_image) < tolerance
    assert relative_error(text_out.float(), expected_text) < tolerance


def test_load_refuses_dtypes_it_cannot_compute_in():
    import os

    import openclip_lite

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "assets", "demo-model.safetensors")
    for dtype in (torch.float64, torch.int8, "float16"):  # float64: BatchNorm and LayerNorm stay fp32 and would clash
        with pytest.raises(ValueError, match="dtype must be one of torch.float32, torch.float16, torch.bfloat16"):
            openclip_lite.load(demo, device="cpu", dtype=dtype)
    model, _ = openclip_lite.load(demo, device="cpu", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
def test_a_model_as_built_takes_its_shortcuts(arch):
    # every class the towers are built of must be one `pristine` knows: one missing would switch every shortcut off
    # without a word (the numbers stay right, only slower); in training and in reduced precision too
    from openclip_lite.model import pristine

    model = build_model(reference_model(arch).state_dict())
    for step in ("as loaded", "training", "bf16"):
        if step == "training":
            model.train()
        elif step == "bf16":
            convert_weights(model, torch.bfloat16)
        assert pristine(model.visual), step
        assert pristine(model.token_embedding, model.transformer, model.ln_final), step
        assert all(pristine(block) for block in model.transformer.resblocks), step
    model.transformer.resblocks[0].register_forward_hook(lambda module, args, out: None)
    assert not pristine(model.token_embedding, model.transformer, model.ln_final)
