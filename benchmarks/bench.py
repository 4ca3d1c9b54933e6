"""Inference throughput: openclip_lite against OpenAI's code, open_clip and transformers, same weights, one process.

    python benchmarks/bench.py                                   # CUDA if present: fp16, ViT-B/32 ViT-B/16 ViT-L/14 RN50
    python benchmarks/bench.py --device cpu                      # fp32, ViT-B/32, 16 images / 64 texts
    python benchmarks/bench.py --models RN50,ViT-L/14 --batch-size 128 --dtype bf16 --inputs image

Every model gets one set of random weights in OpenAI's layout (OpenAI's own initialisation, then every tensor
perturbed so that no branch is an identity), and each implementation is built from that state dict the way its
own loader builds OpenAI's checkpoints:

- openclip-lite: `build_model` + `convert_weights` (fp16/bf16 weights, fp32 LayerNorm/BatchNorm), as `load` does;
- OpenAI's code (clip-anytorch): `clip.model.build_model`, fp16 as `clip.load` on CUDA, `.float()` on the CPU;
- open_clip: `build_model_from_openai_state_dict`, what `open_clip.create_model(..., pretrained="openai")` runs;
- transformers: `CLIPModel` (ViTs only: it has no ResNet CLIP) with `attn_implementation="sdpa"`, the weights
  converted here from OpenAI's layout (q/k/v split of `in_proj`, projections transposed), the whole model cast to
  the dtype as `from_pretrained(dtype=...)` does.

Before any timing, every implementation's image and text features are compared with OpenAI's code in fp32 on
the same device (max over samples of ||a - b|| / ||b||), so the peers are known to compute the same thing.

Inputs: images in the compute dtype; text at 77 tokens (random ids with the end-of-text token last) and short
prompts ("a photo of a dog.", 8 tokens padded to 77 by `tokenize`, as every user's prompts are). Each timing
round calls one implementation `iters` times between two synchronisations; rounds go round-robin over the
implementations (rotating who goes first), so a change in machine load hits all of them alike. Reported:
items/s of the fastest round and of the median round, the ratio to the best peer (fastest rounds), achieved
FLOP/s (each implementation's own executed FLOPs, counted by `torch.utils.flop_counter`) and MFU: the model's
FLOPs per second against a matmul peak measured here in the same dtype (the best of measurements at the start and
after each case). The model's FLOPs are those of the full forward pass, the most any implementation executes on
the input (the peers all run it whole), so that MFU compares speed: openclip-lite skips work whose result is never
read (the last block's other tokens; the padding after the longest end-of-text), which lowers its executed FLOPs,
not the model's; on short prompts its MFU can pass 1 for that reason. On CUDA also the peak memory one call needs
(`max_memory_allocated` above what was allocated before it, plus the implementation's own weights). On the CPU
also the fewest process CPU-seconds a round took per call, and its ratio: on a machine shared with other
processes, wall time counts their time slices too, CPU time mostly does not.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmark this checkout, not an installed copy

import openclip_lite
from openclip_lite.model import build_model, convert_weights
from openclip_lite.pretrained import ARCHITECTURES

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip-anytorch imports pkg_resources, which warns
    import clip
    import clip.model
import open_clip
import open_clip.model
import transformers

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# what a relative error above means that an implementation does not compute CLIP (fp32 on CUDA: cuDNN convs use TF32)
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
SHORT_PROMPT = "a photo of a dog."
SOT, EOT = 49406, 49407


# the CPU's flash attention is missing from flop_counter's table; its FLOPs are those of any SDPA kernel
if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:

    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


@dataclass
class Implementation:
    name: str
    model: nn.Module
    encode_image: Callable[[Tensor], Tensor]
    encode_text: Callable[[Tensor], Tensor] | None
    weight_bytes: int


# ---------------------------------------------------------------------------------------------------- weights


def random_state_dict(name: str, seed: int = 0) -> dict[str, Tensor]:
    """OpenAI's CLIP of architecture `name` with OpenAI's initialisation, every float tensor perturbed (fp32, CPU).

    OpenAI zero-initialises each ResNet block's last BatchNorm and sets LayerNorms to one, which would hide a
    wrongly converted branch; BatchNorm statistics are made non-trivial too (as tests/reference.py does). Values
    are rounded to fp16, the precision OpenAI released its weights in.
    """
    torch.manual_seed(seed)
    model = clip.model.CLIP(*ARCHITECTURES[name])
    g = torch.Generator().manual_seed(seed + 1)
    state_dict = {}
    for key, value in model.state_dict().items():
        value = value.clone()
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=g)
            if key.endswith("running_var"):
                value = 0.5 + torch.rand(value.shape, generator=g)
            elif key.endswith("running_mean"):
                value = 0.1 * noise
            elif key == "logit_scale":
                value = torch.tensor(4.6052)
            elif (".bn" in key or "downsample.1" in key or ".ln" in key or "ln_" in key) and key.endswith("weight"):
                value = 1.0 + 0.1 * noise
            else:
                value = value + 0.02 * noise
            # fp16-representable, as OpenAI's released weights are: OpenAI's and open_clip's loaders pass the weights
            # through fp16 even for fp32 use, and every implementation must hold the same values
            value = value.half().float()
        state_dict[key] = value
    return state_dict


def openai_to_transformers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenAI's ViT-CLIP state dict in transformers' `CLIPModel` layout (the logic of its conversion script)."""
    out = {
        "logit_scale": sd["logit_scale"],
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t().contiguous(),
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],  # sic: transformers' spelling
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
    }
    for src_prefix, dst_prefix in (("transformer.resblocks.", "text_model.encoder.layers."), ("visual.transformer.resblocks.", "vision_model.encoder.layers.")):
        layers = {int(k[len(src_prefix) :].split(".")[0]) for k in sd if k.startswith(src_prefix)}
        for i in layers:
            src, dst = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
            for part, tensor in (("weight", sd[src + "attn.in_proj_weight"]), ("bias", sd[src + "attn.in_proj_bias"])):
                q, k, v = tensor.chunk(3)
                out[dst + f"self_attn.q_proj.{part}"], out[dst + f"self_attn.k_proj.{part}"], out[dst + f"self_attn.v_proj.{part}"] = q, k, v
            for theirs, ours in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[dst + theirs + ".weight"] = sd[src + ours + ".weight"]
                out[dst + theirs + ".bias"] = sd[src + ours + ".bias"]
    return out


# ---------------------------------------------------------------------------------------------- implementations


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _cast_like_openai(model: nn.Module, dtype: torch.dtype) -> None:
    """OpenAI's `convert_weights` (which only knows fp16) for any dtype: conv/linear/attention weights and projections."""

    def cast(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
        if isinstance(m, nn.MultiheadAttention):
            for attr in ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v"]:
                tensor = getattr(m, attr)
                if tensor is not None:
                    tensor.data = tensor.data.to(dtype)
        for attr in ["text_projection", "proj"]:
            if hasattr(m, attr) and getattr(m, attr) is not None:
                getattr(m, attr).data = getattr(m, attr).data.to(dtype)

    model.apply(cast)


def build_ours(sd: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> Implementation:
    model = build_model(dict(sd))
    if dtype != torch.float32:
        convert_weights(model, dtype)
    model = model.to(device).eval()
    return Implementation("openclip-lite", model, model.encode_image, model.encode_text, _weight_bytes(model))


def build_openai(sd: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> Implementation:
    model = clip.model.build_model(dict(sd))  # fp16 weights, as clip.load gives on CUDA
    if dtype != torch.float16:
        model.float()  # what clip.load does on the CPU
        if dtype != torch.float32:
            _cast_like_openai(model, dtype)
    model = model.to(device).eval()
    return Implementation("OpenAI clip", model, model.encode_image, model.encode_text, _weight_bytes(model))


def build_open_clip(sd: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> Implementation:
    cast_dtype = None if dtype == torch.float32 else dtype
    model = open_clip.model.build_model_from_openai_state_dict(dict(sd), cast_dtype=cast_dtype)  # fp16 weights
    if dtype != torch.float16:  # as open_clip.load_openai_model does for precision "fp32" / "bf16"
        model.float()
        if dtype != torch.float32:
            open_clip.model.convert_weights_to_lp(model, dtype=dtype)
    model = model.to(device).eval()
    return Implementation("open_clip", model, model.encode_image, model.encode_text, _weight_bytes(model))


def build_transformers(name: str, sd: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> Implementation | None:
    embed_dim, image_resolution, vision_layers, vision_width, patch_size, context_length, vocab_size, text_width, text_heads, text_layers = ARCHITECTURES[name]
    if not isinstance(vision_layers, int):
        return None  # transformers has no ResNet CLIP
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": text_width,
            "intermediate_size": 4 * text_width,
            "num_hidden_layers": text_layers,
            "num_attention_heads": text_heads,
            "max_position_embeddings": context_length,
            "hidden_act": "quick_gelu",
            "projection_dim": embed_dim,
            "bos_token_id": SOT,
            "eos_token_id": EOT,
        },
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": 4 * vision_width,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_width // 64,
            "image_size": image_resolution,
            "patch_size": patch_size,
            "hidden_act": "quick_gelu",
            "projection_dim": embed_dim,
        },
        projection_dim=embed_dim,
    )
    model = transformers.CLIPModel._from_config(config, attn_implementation="sdpa")
    model.load_state_dict(openai_to_transformers(sd), strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"transformers picked attention {model.config._attn_implementation!r}, not sdpa")

    def encode_image(image: Tensor) -> Tensor:
        return model.get_image_features(pixel_values=image).pooler_output

    def encode_text(text: Tensor) -> Tensor:
        return model.get_text_features(input_ids=text).pooler_output

    return Implementation("transformers", model, encode_image, encode_text, _weight_bytes(model))


def build_all(name: str, sd: dict[str, Tensor], dtype: torch.dtype, device: torch.device, peers: list[str]) -> list[Implementation]:
    impls = [build_ours(sd, dtype, device)]
    if "openai" in peers:
        impls.append(build_openai(sd, dtype, device))
    if "open_clip" in peers:
        impls.append(build_open_clip(sd, dtype, device))
    if "transformers" in peers:
        hf = build_transformers(name, sd, dtype, device)
        if hf is not None:
            impls.append(hf)
    return impls


# ---------------------------------------------------------------------------------------------------- inputs


def long_text(batch_size: int, seed: int = 0) -> Tensor:
    """Token ids of 77 tokens each: start-of-text, random words, end-of-text last (a caption that fills the context)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, SOT, (batch_size, 77), generator=g)
    text[:, 0], text[:, -1] = SOT, EOT
    return text


def short_text(batch_size: int) -> Tensor:
    return openclip_lite.tokenize([SHORT_PROMPT] * batch_size)


# -------------------------------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max over samples of ||actual - expected|| / ||expected||, in float64"""
    actual, expected = actual.double(), expected.double()
    return float(((actual - expected).norm(dim=-1) / expected.norm(dim=-1)).max())


def check_outputs(name: str, sd: dict[str, Tensor], impls: list[Implementation], dtype: torch.dtype, device: torch.device) -> None:
    """Every implementation against OpenAI's code in fp32 on the same device; exits if one computes something else."""
    reference = clip.model.build_model(dict(sd)).float().to(device).eval()
    res = reference.visual.input_resolution
    image = torch.randn(4, 3, res, res, generator=torch.Generator().manual_seed(1)).to(device)
    text = torch.cat([openclip_lite.tokenize([SHORT_PROMPT, "a diagram", "", "a much longer caption about a small cat on a red mat"]), long_text(2, seed=1)]).to(device)
    with torch.inference_mode():
        expected_image, expected_text = reference.encode_image(image), reference.encode_text(text)
        del reference
        errors = []
        for impl in impls:
            image_error = relative_error(impl.encode_image(image.to(dtype)).float(), expected_image)
            text_error = relative_error(impl.encode_text(text).float(), expected_text)
            errors.append(f"{impl.name} image {image_error:.1e} text {text_error:.1e}")
            worst = max(image_error, text_error) if math.isfinite(image_error + text_error) else float("nan")
            if not worst <= TOLERANCE[dtype]:  # NaN (an fp16 overflow) fails too
                sys.exit(f"{name}: {impl.name} differs from OpenAI's fp32 features by {worst:.2e} (> {TOLERANCE[dtype]:.0e}); its numbers would not be comparable")
    print(f"# {name}: max relative error vs OpenAI's code in fp32: " + "; ".join(errors), flush=True)


def count_flops(fn: Callable[[Tensor], Tensor], x: Tensor) -> int:
    """FLOPs of fn(x), counted on two samples and scaled (every implementation's cost is linear in the batch)."""
    with FlopCounterMode(display=False) as counter:
        fn(x[:2])
    return counter.get_total_flops() * x.shape[0] // 2


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """The best FLOP/s of a large square matmul in `dtype` here: the yardstick for MFU."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    iters = 20 if device.type == "cuda" else 1
    best = math.inf
    for i in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        synchronize(device)
        if i:  # the first round is the warm-up
            best = min(best, (time.perf_counter() - start) / iters)
    return 2 * n**3 / best


def time_round(fn: Callable[[Tensor], Tensor], x: Tensor, iters: int, device: torch.device) -> tuple[float, float]:
    """-> (wall seconds, process CPU seconds) per call"""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn(x)
    synchronize(device)
    return (time.perf_counter() - start) / iters, (time.process_time() - cpu_start) / iters


def peak_memory(fn: Callable[[Tensor], Tensor], x: Tensor, device: torch.device) -> int | None:
    """Bytes one call allocates at its peak beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(x)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@dataclass
class Result:
    impl: str
    best_s: float
    median_s: float
    cpu_s: float  # the fewest process CPU-seconds of a round; on a shared CPU, less sensitive to other processes
    flops: int
    peak_bytes: int | None
    weight_bytes: int


def benchmark_case(method: str, impls: list[Implementation], x: Tensor, args: argparse.Namespace, device: torch.device) -> list[Result]:
    """Time `impl.<method>(x)` for every implementation (compiled where --compile says so)."""
    fns, iters, flops, peaks = {}, {}, {}, {}
    for impl in impls:
        eager = getattr(impl, method)
        compiled = args.compile == "all" or (args.compile == "ours" and impl.name == "openclip-lite")
        fns[impl.name] = fn = torch.compile(eager) if compiled else eager
        flops[impl.name] = count_flops(eager, x)
        for _ in range(args.warmup):
            fn(x)
        if compiled:  # check_outputs checked the eager function; the compiled one must agree with it
            error = relative_error(fn(x).float(), eager(x).float())
            print(f"# {impl.name} compiled: max relative error vs eager {error:.1e}", flush=True)
            if error > TOLERANCE[x.dtype if x.is_floating_point() else args.dtype]:
                sys.exit(f"{impl.name}: torch.compile changed the outputs by {error:.2e}; its numbers would not be comparable")
        peaks[impl.name] = peak_memory(fn, x, device)
        one, _ = time_round(fn, x, 1, device)
        iters[impl.name] = max(1, math.ceil(args.min_round_time / one))
    times = {impl.name: [] for impl in impls}
    for r in range(args.repeats):
        for impl in impls[r % len(impls) :] + impls[: r % len(impls)]:
            times[impl.name].append(time_round(fns[impl.name], x, iters[impl.name], device))
    results = []
    for i in impls:
        wall = [t for t, _ in times[i.name]]
        cpu = min(c for _, c in times[i.name])
        results.append(Result(i.name, min(wall), statistics.median(wall), cpu, flops[i.name], peaks[i.name], i.weight_bytes))
    return results


def print_results(model: str, case: str, batch: int, results: list[Result], peak_flops: float, device: torch.device) -> None:
    peers = [r for r in results if r.impl != "openclip-lite"]
    best_peer = min(peers, key=lambda r: r.best_s) if peers else None
    best_peer_cpu = min(peers, key=lambda r: r.cpu_s) if peers else None
    model_flops = max(r.flops for r in results)  # the full forward pass, which the peers run whole
    for r in results:
        ratio = f"{best_peer.best_s / r.best_s:.2f}x" if best_peer else "-"
        achieved = r.flops / r.best_s
        memory = f"{(r.weight_bytes + r.peak_bytes) / 2**20:,.0f}" if r.peak_bytes is not None else "-"
        cpu = f" | {r.cpu_s:,.2f} | {best_peer_cpu.cpu_s / r.cpu_s:.2f}x" if device.type == "cpu" and best_peer_cpu else (" | - | -" if device.type == "cpu" else "")
        print(
            f"| {model} | {case} | {batch} | {r.impl} | {batch / r.best_s:,.1f} | {batch / r.median_s:,.1f} | {r.best_s * 1e3:,.1f} "
            f"| {ratio} | {achieved / 1e12:.3f} | {model_flops / r.best_s / peak_flops:.2f} | {memory}{cpu} |",
            flush=True,
        )


def versions() -> str:
    return (
        f"torch {torch.__version__}, clip-anytorch {_dist_version('clip-anytorch')}, open_clip {open_clip.__version__}, "
        f"transformers {transformers.__version__}, openclip-lite {openclip_lite.__version__}"
    )


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", help="comma-separated; default ViT-B/32,ViT-B/16,ViT-L/14,RN50 on CUDA, ViT-B/32 on the CPU")
    parser.add_argument("--batch-size", type=int, help="images per call; default 256 on CUDA (128 for ViT-L/14), 16 on the CPU")
    parser.add_argument("--text-batch-size", type=int, help="texts per call; default 256 on CUDA, 64 on the CPU")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--inputs", default="image,text77,short", help="comma-separated from image, text77, short")
    parser.add_argument("--peers", default="openai,open_clip,transformers", help="comma-separated from openai, open_clip, transformers")
    parser.add_argument("--compile", choices=["none", "ours", "all"], default="none", help="wrap encode_image/encode_text in torch.compile")
    parser.add_argument("--freezing", action="store_true", help="with --compile: inductor's freezing (weights as constants, BatchNorm folded into convs)")
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True, help="cuDNN autotuning, for every implementation")
    parser.add_argument("--warmup", type=int, help="calls before timing; default 5 on CUDA, 1 on the CPU")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per implementation")
    parser.add_argument("--min-round-time", type=float, help="seconds a round lasts at least; default 0.5 on CUDA, 0 (one call) on the CPU")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on the CPU")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available here; use --device cpu")
    args.models = (args.models or ("ViT-B/32,ViT-B/16,ViT-L/14,RN50" if cuda else "ViT-B/32")).split(",")
    unknown = [m for m in args.models if m not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; available: {', '.join(ARCHITECTURES)}")
    args.inputs = args.inputs.split(",")
    if not set(args.inputs) <= {"image", "text77", "short"}:
        parser.error(f"unknown input(s) in {args.inputs}; choose from image, text77, short")
    args.peers = [p for p in args.peers.split(",") if p]
    args.dtype = DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    args.text_batch_size = args.text_batch_size or (256 if cuda else 64)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.min_round_time = args.min_round_time if args.min_round_time is not None else (0.5 if cuda else 0.0)
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.freezing:
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
    peak = matmul_peak(device, args.dtype)
    print(f"# {datetime.date.today()} | {device_name(device)} | {versions()}")
    print(f"# dtype {str(args.dtype).removeprefix('torch.')} | measured {str(args.dtype).removeprefix('torch.')} matmul peak {peak / 1e12:.3f} TFLOP/s | compile {args.compile}{' (freezing)' if args.freezing else ''}"
          + (f" | cudnn.benchmark {args.cudnn_benchmark}" if device.type == "cuda" else f" | load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"))
    cpu = device.type == "cpu"
    print("| model | input | batch | implementation | items/s (best) | items/s (median) | ms/batch (best) | vs best peer | TFLOP/s | MFU | peak MiB |"
          + (" CPU-s/batch (best) | vs best peer (CPU-s) |" if cpu else ""))
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if cpu else ""))
    for name in args.models:
        sd = random_state_dict(name)
        impls = build_all(name, sd, args.dtype, device, args.peers)
        check_outputs(name, sd, impls, args.dtype, device)
        res = ARCHITECTURES[name][1]
        image_batch = args.batch_size or (16 if device.type == "cpu" else 128 if name.startswith("ViT-L") else 256)
        for case in args.inputs:
            if case == "image":
                batch, method = image_batch, "encode_image"
                x = torch.randn(batch, 3, res, res, device=device, dtype=args.dtype)
            else:
                batch, method = args.text_batch_size, "encode_text"
                x = (long_text(batch) if case == "text77" else short_text(batch)).to(device)
            with torch.inference_mode():
                results = benchmark_case(method, impls, x, args, device)
            peak = max(peak, matmul_peak(device, args.dtype))  # the best seen: on a shared machine, load comes and goes
            print_results(name, case if case == "image" else f"text, {'77 tokens' if case == 'text77' else repr(SHORT_PROMPT)}", batch, results, peak, device)
        del impls, sd
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cpu":
        print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"# TFLOP/s: each implementation's executed FLOPs; MFU: the full model's FLOPs (the most any implementation executes), "
          f"against the best matmul peak measured up to the end of each case (in the end {peak / 1e12:.3f} TFLOP/s)")


if __name__ == "__main__":
    main()
