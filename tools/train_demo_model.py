"""Train the demo model: a tiny CLIP that learns coloured shapes from synthetic images, in a few CPU minutes.

It uses the same modules and OpenAI's key layout as the released models, and the real BPE vocabulary, so
`clip.load("examples/assets/demo-model.safetensors")` and `clip.tokenize` work on it like on any other
checkpoint. Run from the repository root:

    python tools/train_demo_model.py            # writes examples/assets/demo-model.safetensors and sample images
"""

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shapes import CAPTION_TEMPLATES, LABELS, draw

import openclip_lite as clip
from openclip_lite.checkpoint import save_safetensors
from openclip_lite.loss import contrastive_loss
from openclip_lite.model import CLIP
from openclip_lite.transform import preprocess

# small widths; one head per 64 channels, as `build_model` infers; 77 tokens so the default `tokenize` fits
TEXT = dict(context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)
CONFIGS = {
    "vit": dict(embed_dim=64, image_resolution=64, vision_layers=3, vision_width=64, vision_patch_size=8, **TEXT),
    "rn": dict(embed_dim=64, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=16, vision_patch_size=None, **TEXT),
}


def batch(rng: random.Random, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Every label once, each drawn afresh with a random caption template: no false negatives in the loss."""
    labels = LABELS[:]
    rng.shuffle(labels)
    images = torch.stack([transform(draw(label, rng, size=rng.choice((64, 96, 128)))) for label in labels])
    texts = clip.tokenize([rng.choice(CAPTION_TEMPLATES).format(label) for label in labels])
    return images, texts


@torch.no_grad()
def accuracy(model: CLIP, transform, seed: int, per_label: int = 10) -> float:
    rng = random.Random(seed)
    images = [draw(label, rng) for label in LABELS for _ in range(per_label)]
    truth = torch.tensor([i for i in range(len(LABELS)) for _ in range(per_label)])
    probs = clip.classify(model, transform, images, LABELS)
    return float((probs.argmax(dim=-1) == truth).float().mean())


def train(config: dict, steps: int, seed: int, lr: float = 1e-3, log_every: int = 250) -> CLIP:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = CLIP(**config)
    transform = preprocess(config["image_resolution"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    start = time.time()
    for step in range(1, steps + 1):
        model.train()
        images, texts = batch(rng, transform)
        logits_per_image, _ = model(images, texts)
        loss = contrastive_loss(logits_per_image)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # at most 100, as in CLIP's training
        if step % log_every == 0 or step == steps:
            model.eval()
            print(f"step {step:5d}  loss {loss.item():.4f}  held-out accuracy {accuracy(model, transform, seed + 999, per_label=3):.2f}  {time.time() - start:.0f}s", flush=True)
    return model.eval()


def save(model: CLIP, path: str) -> None:
    """fp16 values (as OpenAI's releases), with embedding rows of tokens never seen in training zeroed.

    The real vocabulary has 49,408 tokens but the captions use a few dozen: the zeroed rows change nothing the
    model can be asked about words it never saw, and they make the committed file compress to a fraction.
    """
    state_dict = {k: v.detach().half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    used = torch.zeros(model.vocab_size, dtype=torch.bool)
    for template in CAPTION_TEMPLATES:
        for label in LABELS:
            used[clip.tokenize(template.format(label)).long()] = True
    state_dict["token_embedding.weight"][~used] = 0
    save_safetensors(state_dict, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--arch", choices=sorted(CONFIGS), default="rn")
    parser.add_argument("--out", default="examples/assets/demo-model.safetensors")
    parser.add_argument("--samples", default="examples/assets", help="where to draw a few sample images ('' for none)")
    args = parser.parse_args()

    torch.set_num_threads(1)  # the matrices are tiny: more threads only add synchronisation
    model = train(CONFIGS[args.arch], args.steps, args.seed, args.lr)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    save(model, args.out)
    reloaded, transform = clip.load(args.out, device="cpu")
    print(f"held-out zero-shot top-1 accuracy: {accuracy(reloaded, transform, seed=args.seed + 1000):.3f}")
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB)")
    if args.samples:
        draw_samples(args.samples)


def draw_samples(folder: str) -> None:
    """A few sample images for the examples, named after their label."""
    rng = random.Random(12345)
    for label in ("red circle", "blue square", "green triangle", "yellow circle", "purple square", "orange triangle"):
        path = os.path.join(folder, label.replace(" ", "_") + ".jpg")
        draw(label, rng, size=160).save(path, quality=92)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
