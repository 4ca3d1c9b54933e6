"""Our model against OpenAI's code, on random weights, for all nine released architectures."""

import pytest
import torch
from PIL import Image
from reference import TINY, openai_clip, reference_model, relative_error

import openclip_lite as clip
from openclip_lite.checkpoint import save_safetensors
from openclip_lite.model import build_model
from openclip_lite.pretrained import ARCHITECTURES

ARCHS = list(ARCHITECTURES)
FORMATS = ["state_dict", "torchscript", "safetensors"]
TEXTS = ["a diagram", "a photo of a dog.", "a much longer caption about a small cat sitting on a red mat in the sun", ""]


def save(model: torch.nn.Module, fmt: str, path, image: torch.Tensor, text: torch.Tensor) -> None:
    if fmt == "state_dict":
        torch.save(model.state_dict(), path)
    elif fmt == "torchscript":  # the container OpenAI released its models in
        traced = torch.jit.trace_module(model, {"encode_image": image[:1], "encode_text": text[:1]}, check_trace=False)
        traced.save(str(path))
    else:  # the hub's layout: the same keys, fp32, without the int entries
        state_dict = {k: v for k, v in model.state_dict().items() if k not in ("input_resolution", "context_length", "vocab_size")}
        save_safetensors(state_dict, path)


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request):
    arch = request.param
    ref = reference_model(arch)
    res = ref.visual.input_resolution
    g = torch.Generator().manual_seed(0)
    large = arch in ("RN50x16", "RN50x64", "ViT-L/14", "ViT-L/14@336px")  # one image keeps CI's time in bounds
    image = torch.randn(1 if large else 2, 3, res, res, generator=g)
    text = openai_clip.tokenize(TEXTS)
    with torch.no_grad():
        expected = ref.encode_image(image), ref.encode_text(text), ref(image, text)[0]
    return arch, ref, image, text, expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_matches_reference(arch_case, fmt, tmp_path):
    _, ref, image, text, (image_features, text_features, logits) = arch_case
    path = tmp_path / f"model.{fmt}"
    save(ref, fmt, path, image, text)
    model, preprocess = clip.load(str(path), device="cpu")
    assert not model.training
    assert model.dtype == torch.float32
    assert model.visual.input_resolution == ref.visual.input_resolution
    assert model.context_length == 77 and model.vocab_size == 49408
    with torch.no_grad():
        assert relative_error(model.encode_image(image), image_features) < 1e-5
        assert relative_error(model.encode_text(text), text_features) < 1e-5
        logits_per_image, logits_per_text = model(image, text)
    # logits are logit_scale x cosine; random weights give cosines near 0, where a relative error is ill-conditioned
    # (1e-6 on the features became 3e-5 on RN50x16's logits), so compare the cosines on their own scale, [-1, 1]
    assert float((logits_per_image - logits).abs().max() / ref.logit_scale.detach().exp()) < 1e-5
    assert torch.equal(logits_per_text, logits_per_image.t())
    assert preprocess(Image.new("RGB", (300, 200))).shape == (3, ref.visual.input_resolution, ref.visual.input_resolution)


@pytest.mark.parametrize("arch", ["ViT-B/32", "RN50"])
def test_state_dict_keys_are_openai_keys(arch):
    ref = reference_model(arch)
    ours = build_model(ref.state_dict())
    expected = {k for k in ref.state_dict() if k not in ("input_resolution", "context_length", "vocab_size")}
    assert set(ours.state_dict()) == expected
    ours.load_state_dict({k: ref.state_dict()[k] for k in expected}, strict=True)


def test_text_features_do_not_depend_on_batch_padding():
    # the text tower stops at the batch's last EOT: a short prompt alone and beside a long one must agree
    model = build_model(reference_model("ViT-B/32").state_dict())
    short, long = openai_clip.tokenize(["a dog"]), openai_clip.tokenize(["a dog " * 30])
    with torch.no_grad():
        alone = model.encode_text(short)
        together = model.encode_text(torch.cat([short, long]))[:1]
    assert relative_error(alone, together) < 1e-5  # fp32 rounding differs with the sequence length


def test_int32_tokens_work():
    model = build_model(reference_model("tiny-vit").state_dict())
    tokens = openai_clip.tokenize(["a dog", "a cat"])
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens.int()), model.encode_text(tokens.long()))


def test_too_many_tokens_is_a_clear_error():
    model = build_model(reference_model("tiny-vit").state_dict())
    with pytest.raises(ValueError, match="context length is 77"):
        model.encode_text(torch.zeros(1, 78, dtype=torch.long))


@pytest.mark.parametrize(
    "arch, size, fits",  # tiny-vit: 32 px, patch 16; tiny-rn: 64 px (OpenAI's code runs or fails as `fits` says)
    [("tiny-vit", 47, True), ("tiny-vit", 48, False), ("tiny-rn", 65, True), ("tiny-rn", 94, True), ("tiny-rn", 95, False), ("tiny-rn", 63, False)],
)
def test_images_a_little_off_size_give_openais_features(arch, size, fits):
    # OpenAI's convolutions drop pixels past the last whole patch (or stride): our patch matmul and stem must too
    ref = reference_model(arch)
    model = build_model(ref.state_dict())
    image = torch.randn(2, 3, size, size - 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if fits:
            assert relative_error(model.encode_image(image), ref.encode_image(image)) < 1e-5
        else:  # OpenAI's fails somewhere inside with a shape message; ours says what size to give
            with pytest.raises(RuntimeError):
                ref.encode_image(image)
            with pytest.raises(ValueError, match=f"takes {ref.visual.input_resolution}x{ref.visual.input_resolution} images, got {size}x{size - 1}"):
                model.encode_image(image)


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 1, 32, 32), (2, 4, 32, 32), (2, 3, 32)])
def test_what_is_not_a_batch_of_rgb_images_is_a_clear_error(arch, shape):
    model = build_model(reference_model(arch).state_dict())
    for call in (model.encode_image, lambda x: model.forward_intermediates(image=x)):
        with pytest.raises(ValueError, match=r"expected images as \(batch_size, 3, height, width\), got shape"):
            call(torch.zeros(shape))


@pytest.mark.parametrize("arch, size", [("tiny-vit", 64), ("tiny-vit", 16), ("tiny-rn", 128), ("tiny-rn", 32)])
def test_images_of_another_size_are_a_clear_error(arch, size):
    model = build_model(reference_model(arch).state_dict())
    res = model.visual.input_resolution
    for call in (model.encode_image, lambda x: model.forward_intermediates(image=x)):
        with pytest.raises(ValueError, match=f"takes {res}x{res} images, got {size}x{size}.*image_size="):
            call(torch.zeros(1, 3, size, size))


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["ViT-B/32", "RN50"])
def test_cuda_fp16_matches_reference(arch, tmp_path):
    ref = reference_model(arch)
    path = tmp_path / "model.pt"
    torch.save(ref.state_dict(), path)
    model, _ = clip.load(str(path), device="cuda")
    assert model.dtype == torch.float16
    # OpenAI's load on CUDA: build_model converts to fp16 (convert_weights) and keeps LayerNorm/BatchNorm in fp32
    expected_model = openai_clip.model.build_model(ref.state_dict()).cuda().eval()
    image = torch.randn(4, 3, ref.visual.input_resolution, ref.visual.input_resolution, device="cuda")
    text = openai_clip.tokenize(TEXTS).cuda()
    with torch.no_grad():
        assert relative_error(model.encode_image(image), expected_model.encode_image(image)) < 1e-2
        assert relative_error(model.encode_text(text), expected_model.encode_text(text)) < 1e-2
    for name, param in model.state_dict().items():
        assert param.dtype == expected_model.state_dict()[name].dtype, name


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn", "RN50", "ViT-B/32"])
def test_a_model_built_from_scratch_is_openais(arch):
    # training from scratch: `torch.manual_seed(s); CLIP(...)` draws OpenAI's values, and so does a later
    # `initialize_parameters()` (which touches only the text tower, the attention pool and the ResNet's bn3s)
    config = ARCHITECTURES.get(arch) or TINY[arch]
    models = []
    for cls in (openai_clip.model.CLIP, clip.CLIP):
        torch.manual_seed(3)
        model = cls(*config)
        first = {k: v.clone() for k, v in model.state_dict().items()}
        model.initialize_parameters()
        models.append((first, model.state_dict()))
    (ref_first, ref_again), (first, again) = models
    assert set(first) == set(ref_first)
    assert [k for k in ref_first if not torch.equal(first[k], ref_first[k])] == []
    assert [k for k in ref_again if not torch.equal(again[k], ref_again[k])] == []


def test_models_built_from_one_state_dict_do_not_share_weights():
    # WiSE-FT keeps the zero-shot model beside the fine-tuned one; distillation builds a teacher from a student
    state_dict = reference_model("tiny-vit").state_dict()
    kept = {k: v.clone() for k, v in state_dict.items()}
    zero_shot, fine_tuned = build_model(state_dict), build_model(state_dict)
    with torch.no_grad():
        for p in fine_tuned.parameters():
            p.mul_(2)
    assert all(torch.equal(v, kept[k]) for k, v in state_dict.items())
    assert all(torch.equal(v, kept[k]) for k, v in zero_shot.state_dict().items())
    teacher = build_model(zero_shot.state_dict())
    with torch.no_grad():
        zero_shot.text_projection.zero_()
    assert torch.equal(teacher.text_projection, kept["text_projection"])


@pytest.mark.parametrize("arch", ["tiny-vit", "tiny-rn"])
def test_modules_have_openais_attributes(arch):
    # code reads module attributes (`block.stride`, `attnpool.num_heads`, `visual.output_dim`): every plain attribute
    # of each OpenAI module is on ours, with the same value
    ref = reference_model(arch)
    ours = dict(build_model(ref.state_dict()).named_modules())
    for name, module in ref.named_modules():
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr == "training" or isinstance(value, torch.Tensor):
                continue
            assert hasattr(ours[name], attr), f"{name or 'model'}.{attr}"
            assert getattr(ours[name], attr) == value, f"{name or 'model'}.{attr}"
