#!/usr/bin/env bash
# The GPU checks of issues 6 and 8 in one go, sized for one call on a lent H100/H200 (at most about 9.5 minutes:
# run it with timeout_s=600 and carry [".whl"], then give the machine back): the CUDA tests (fp16 against OpenAI's
# code, reduced precision, GPU search, the fp16 model from both download sources), then benchmarks/bench.py and
# benchmarks/pipeline.py on the GPU. Logs land in $OUT (or /tmp/gpu-out).
#
# The device image has torch, torchvision, transformers, timm, pyarrow, hypothesis and pytest, not the reference
# implementations or ftfy. Fetch their wheels here first (pure Python, any platform), from the repository root:
#     mkdir -p .git/info && echo /.whl/ >> .git/info/exclude && bash benchmarks/gpu.sh --download
# then run `bash benchmarks/gpu.sh` there with `.whl` carried along.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(ftfy==6.3.1 wcwidth==0.2.13 clip-anytorch==2.6.0 open_clip_torch==3.3.0 setuptools==80.9.0)  # setuptools<81: clip imports pkg_resources
if [ "${1:-}" = "--download" ]; then
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpu-out}"
mkdir -p "$out"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
df -h /dev/shm | tee -a "$out/gpu.txt"  # the DataLoader workers' batches travel through it (about 1.2 GB in flight)
python3 -c "import torch, clip, open_clip, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.txt"

# only the files whose CUDA tests need nothing the image lacks (faiss, ray, milvus, fastapi are not there)
timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors \
    tests/test_model.py tests/test_speed_paths.py tests/test_intermediates.py tests/test_search.py tests/test_robustness.py \
    tests/test_download.py 2>&1 | tee "$out/cuda-tests.txt"
timeout 300 python3 benchmarks/bench.py --device cuda 2>&1 | tee "$out/bench-cuda.txt"
timeout 120 python3 benchmarks/pipeline.py --device cuda --arch ViT-B/16 --images 5000 2>&1 | tee "$out/pipeline-cuda.txt"
