"""Zero-shot helpers against a direct computation with OpenAI's code, and the demo model end to end."""

import os
import random
import re
import subprocess
import sys

import pytest
import torch
from reference import TINY, ReferenceCLIP, openai_clip, reference_model, relative_error

import openclip_lite as clip
from openclip_lite.tokenizer import TextTooLongError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "assets", "demo-model.safetensors")
sys.path.insert(0, os.path.join(ROOT, "tools"))
from shapes import LABELS, draw

CLASSES = ["dog", "cat", "a diagram", "red circle"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a blurry photo of the {}."]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ref = reference_model("ViT-B/32")
    path = tmp_path_factory.mktemp("zs") / "vit.pt"
    torch.save(ref.state_dict(), path)
    model, preprocess = clip.load(str(path), device="cpu")
    return ref, model, preprocess


@pytest.fixture(scope="module")
def short_context_models(tmp_path_factory):
    """A tiny ViT whose positional embedding has 32 rows, not 77: OpenAI's and ours, the same weights."""
    config = list(TINY["tiny-vit"])
    config[5] = 32  # context_length
    torch.manual_seed(0)
    ref = ReferenceCLIP(*config).float().eval()
    path = tmp_path_factory.mktemp("zs32") / "tiny32.pt"
    torch.save(ref.state_dict(), path)
    model, preprocess = clip.load(str(path), device="cpu")
    assert model.context_length == 32
    return ref, model, preprocess


def reference_classifier(ref, classnames, templates, truncate=False):
    """CLIP's prompt ensembling, written out with OpenAI's code."""
    columns = []
    with torch.no_grad():
        for name in classnames:
            tokens = openai_clip.tokenize([t.format(name) for t in templates], context_length=ref.context_length, truncate=truncate)
            f = ref.encode_text(tokens)
            f = f / f.norm(dim=-1, keepdim=True)
            mean = f.mean(dim=0)
            columns.append(mean / mean.norm())
    return torch.stack(columns, dim=1)


def test_default_template_is_clips():
    assert clip.DEFAULT_TEMPLATES == ("a photo of a {}.",)


@pytest.mark.parametrize("templates", [["a photo of a {}."], TEMPLATES])
def test_zero_shot_classifier_equals_reference(models, templates):
    ref, model, _ = models
    actual = clip.zero_shot_classifier(model, CLASSES, templates, batch_size=5)  # batches cut across classes
    expected = reference_classifier(ref, CLASSES, templates)
    assert actual.shape == (512, len(CLASSES))
    assert relative_error(actual, expected) < 1e-5


def test_zero_shot_classifier_default_is_photo_template(models):
    _, model, _ = models
    assert torch.equal(clip.zero_shot_classifier(model, CLASSES), clip.zero_shot_classifier(model, CLASSES, ["a photo of a {}."]))


def test_classify_equals_reference(models, tmp_path):
    ref, model, preprocess = models
    rng = random.Random(0)
    images = [draw(label, rng, size=s) for label, s in zip(LABELS, (50, 224, 300))]
    ref_preprocess = openai_clip.clip._transform(224)
    with torch.no_grad():
        f = ref.encode_image(torch.stack([ref_preprocess(im) for im in images]))
        f = f / f.norm(dim=-1, keepdim=True)
        expected = (ref.logit_scale.exp() * f @ reference_classifier(ref, CLASSES, TEMPLATES)).softmax(dim=-1)
    probs = clip.classify(model, preprocess, images, CLASSES, templates=TEMPLATES)
    assert probs.shape == (3, len(CLASSES))
    assert relative_error(probs, expected) < 1e-5
    # the same images as files and as a preprocessed batch give the same answer
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    assert relative_error(clip.classify(model, preprocess, paths, CLASSES, templates=TEMPLATES), expected) < 1e-5
    batch = torch.stack([preprocess(im) for im in images])
    assert relative_error(clip.classify(model, preprocess, batch, CLASSES, templates=TEMPLATES), expected) < 1e-5


def reference_probs(ref, images, classnames, templates, truncate=False):
    """classify's answer, written out with OpenAI's code: softmax of scaled cosine similarities."""
    preprocess = openai_clip.clip._transform(ref.visual.input_resolution)
    with torch.no_grad():
        f = ref.encode_image(torch.stack([preprocess(im) for im in images]))
        f = f / f.norm(dim=-1, keepdim=True)
        return (ref.logit_scale.exp() * f @ reference_classifier(ref, classnames, templates, truncate)).softmax(dim=-1)


def test_short_context_model(short_context_models):
    # prompts are tokenized to the model's 32 positions, not to the usual 77
    ref, model, preprocess = short_context_models
    actual = clip.zero_shot_classifier(model, CLASSES, TEMPLATES)
    assert actual.shape == (32, len(CLASSES))
    assert relative_error(actual, reference_classifier(ref, CLASSES, TEMPLATES)) < 1e-5
    images = [draw(label, random.Random(1)) for label in LABELS]
    probs = clip.classify(model, preprocess, images, CLASSES, templates=TEMPLATES)
    assert relative_error(probs, reference_probs(ref, images, CLASSES, TEMPLATES)) < 1e-5


def test_truncate(short_context_models):
    ref, model, preprocess = short_context_models
    classes = ["dog", "a very long label " * 8]  # ~33 tokens: past 32 positions
    with pytest.raises(TextTooLongError, match="truncate=True"):
        clip.zero_shot_classifier(model, classes, TEMPLATES)
    with pytest.raises(TextTooLongError, match="truncate=True"):
        clip.classify(model, preprocess, [draw(LABELS[0], random.Random(2))], classes)
    actual = clip.zero_shot_classifier(model, classes, TEMPLATES, truncate=True)
    assert relative_error(actual, reference_classifier(ref, classes, TEMPLATES, truncate=True)) < 1e-5
    images = [draw(label, random.Random(2)) for label in LABELS]
    probs = clip.classify(model, preprocess, images, classes, templates=TEMPLATES, truncate=True)
    assert relative_error(probs, reference_probs(ref, images, classes, TEMPLATES, truncate=True)) < 1e-5


@pytest.mark.parametrize("template", ["a photo of {} {{x}}", "{{}} {}", "{} }}{{"])
def test_templates_with_literal_braces(short_context_models, template):
    # {{ and }} are str.format's literal braces, so these have exactly one slot
    ref, model, _ = short_context_models
    actual = clip.zero_shot_classifier(model, CLASSES, [template])
    assert relative_error(actual, reference_classifier(ref, CLASSES, [template])) < 1e-5


@pytest.mark.parametrize("template", ["a {} }", "a { {}", "a photo", "{} and {}", "a {0}", "a {!r}", "a {:>{}}"])
def test_bad_template_is_named(short_context_models, template):
    _, model, _ = short_context_models
    with pytest.raises(ValueError, match=f"template {re.escape(repr(template))} needs exactly one {{}}"):
        clip.zero_shot_classifier(model, CLASSES, ["a photo of a {}.", template])


def test_generators_are_read_once(short_context_models):
    ref, model, preprocess = short_context_models
    actual = clip.zero_shot_classifier(model, (c for c in CLASSES), (t for t in TEMPLATES))
    assert relative_error(actual, reference_classifier(ref, CLASSES, TEMPLATES)) < 1e-5
    images = [draw(label, random.Random(3)) for label in LABELS]
    probs = clip.classify(model, preprocess, iter(images), (c for c in CLASSES), templates=(t for t in TEMPLATES))
    assert relative_error(probs, reference_probs(ref, images, CLASSES, TEMPLATES)) < 1e-5


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_must_be_positive(short_context_models, batch_size):
    _, model, preprocess = short_context_models
    images = [draw(LABELS[0], random.Random(4))]
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        clip.zero_shot_classifier(model, CLASSES, batch_size=batch_size)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        clip.classify(model, preprocess, images, CLASSES, batch_size=batch_size)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        clip.image_features(model, preprocess, torch.stack([preprocess(images[0])]), batch_size=batch_size)


def test_one_image_alone(short_context_models, tmp_path):
    # a single path (str or pathlib.Path) or PIL image is one image, as a list of one is
    ref, model, preprocess = short_context_models
    image = draw(LABELS[1], random.Random(5))
    image.save(tmp_path / "one.png")
    expected = reference_probs(ref, [image], CLASSES, TEMPLATES)
    for single in (image, str(tmp_path / "one.png"), tmp_path / "one.png"):
        probs = clip.classify(model, preprocess, single, CLASSES, templates=TEMPLATES)
        assert probs.shape == (1, len(CLASSES))
        assert relative_error(probs, expected) < 1e-5


def test_empty_templates_raise(short_context_models):
    # no templates is a mistake in both; only None (left out) means the default
    _, model, preprocess = short_context_models
    with pytest.raises(ValueError, match="at least one template"):
        clip.zero_shot_classifier(model, CLASSES, [])
    with pytest.raises(ValueError, match="at least one template"):
        clip.classify(model, preprocess, [draw(LABELS[0], random.Random(6))], CLASSES, templates=[])


def test_top_k():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert clip.top_k(probs, ["a", "b", "c"], k=2) == [[("b", pytest.approx(0.7)), ("c", pytest.approx(0.2))], [("a", pytest.approx(0.5)), ("c", pytest.approx(0.3))]]
    assert len(clip.top_k(probs, ["a", "b", "c"], k=10)[0]) == 3


def test_top_k_one_row():
    # a 1-D probs is one image's row: the answer is a list of one row, as for probs[None]
    assert clip.top_k(torch.tensor([0.1, 0.7, 0.2]), ["a", "b", "c"], k=2) == [[("b", pytest.approx(0.7)), ("c", pytest.approx(0.2))]]


@pytest.mark.parametrize(
    "probs, labels, k, message",
    [
        (torch.tensor([[0.1, 0.7, 0.2]]), ["a", "b"], 1, "3 columns but 2 labels"),
        (torch.tensor([[0.1, 0.7, 0.2]]), ["a", "b", "c", "d"], 1, "3 columns but 4 labels"),
        (torch.tensor([[0.1, 0.7, 0.2]]), ["a", "b", "c"], 0, "k must be at least 1"),
        (torch.tensor([[0.1, 0.7, 0.2]]), ["a", "b", "c"], -2, "k must be at least 1"),
        (torch.zeros(2, 2, 3), ["a", "b", "c"], 1, r"shape \(num_images, num_labels\)"),
    ],
)
def test_top_k_bad_arguments(probs, labels, k, message):
    with pytest.raises(ValueError, match=message):
        clip.top_k(probs, labels, k)


def test_contrastive_loss_equals_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 5, generator=g) * 3
    n = logits.shape[0]
    image_to_text = -sum(logits[i, i] - torch.logsumexp(logits[i, :], 0) for i in range(n)) / n
    text_to_image = -sum(logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(n)) / n
    assert torch.allclose(clip.contrastive_loss(logits), (image_to_text + text_to_image) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="square"):
        clip.contrastive_loss(torch.zeros(2, 3))


def test_imagenet_data():
    # OpenAI's cleaned-up names keep two duplicates ("missile", "sunglasses"), so 998 distinct
    assert len(clip.IMAGENET_CLASSES) == 1000 and len(set(clip.IMAGENET_CLASSES)) == 998
    assert len(clip.IMAGENET_TEMPLATES) == 80 and all("{}" in t for t in clip.IMAGENET_TEMPLATES)
    assert clip.IMAGENET_CLASSES[0] == "tench" and clip.IMAGENET_CLASSES[-1] == "toilet paper"


def test_demo_model_classifies_held_out_shapes():
    model, preprocess = clip.load(DEMO, device="cpu")
    assert model.visual.input_resolution == 64
    rng = random.Random(20261126)  # not the training seed
    images = [draw(label, rng, size=rng.choice((64, 128, 200))) for label in LABELS for _ in range(8)]
    truth = torch.tensor([i for i in range(len(LABELS)) for _ in range(8)])
    probs = clip.classify(model, preprocess, images, LABELS)
    accuracy = (probs.argmax(dim=-1) == truth).float().mean().item()
    per_class = (probs.argmax(dim=-1) == truth).view(len(LABELS), 8).float().mean(dim=1)
    assert accuracy >= 0.9, f"top-1 {accuracy:.3f}"
    assert per_class.min() >= 0.5, dict(zip(LABELS, per_class.tolist()))


def test_demo_model_sample_images():
    model, preprocess = clip.load(DEMO, device="cpu")
    assets = os.path.join(ROOT, "examples", "assets")
    samples = sorted(f for f in os.listdir(assets) if f.endswith(".jpg"))
    assert len(samples) >= 4
    probs = clip.classify(model, preprocess, [os.path.join(assets, f) for f in samples], LABELS)
    predicted = [LABELS[i] for i in probs.argmax(dim=-1)]
    assert predicted == [f[: -len(".jpg")].replace("_", " ") for f in samples]


@pytest.mark.slow
@pytest.mark.timeout(1600)  # past pytest.ini's 600 s: the training subprocess has its own 1500 s limit
def test_training_script_reproduces_the_demo_model(tmp_path):
    out = tmp_path / "demo.safetensors"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train_demo_model.py"), "--steps", "1000", "--out", str(out), "--samples", ""],
        capture_output=True, text=True, cwd=ROOT, timeout=1500, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    accuracy = float(result.stdout.split("held-out zero-shot top-1 accuracy:")[1].split()[0])
    assert accuracy >= 0.9, result.stdout[-2000:]
    model, preprocess = clip.load(str(out), device="cpu")
    rng = random.Random(7)
    images = [draw(label, rng) for label in LABELS for _ in range(4)]
    truth = torch.tensor([i for i in range(len(LABELS)) for _ in range(4)])
    assert (clip.classify(model, preprocess, images, LABELS).argmax(dim=-1) == truth).float().mean() >= 0.85
