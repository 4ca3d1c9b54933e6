"""Zero-shot helpers against a direct computation with OpenAI's code, and the demo model end to end."""

import os
import random
import subprocess
import sys

import pytest
import torch
from reference import openai_clip, reference_model, relative_error

import openclip_lite as clip

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


def reference_classifier(ref, classnames, templates):
    """CLIP's prompt ensembling, written out with OpenAI's code."""
    columns = []
    with torch.no_grad():
        for name in classnames:
            f = ref.encode_text(openai_clip.tokenize([t.format(name) for t in templates]))
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


def test_top_k():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert clip.top_k(probs, ["a", "b", "c"], k=2) == [[("b", pytest.approx(0.7)), ("c", pytest.approx(0.2))], [("a", pytest.approx(0.5)), ("c", pytest.approx(0.3))]]
    assert len(clip.top_k(probs, ["a", "b", "c"], k=10)[0]) == 3


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
