#!/usr/bin/env bash
# Source on a GPU machine of this workplace (torch 2.11 image, no registry) before running a bench script:
# installs the pinned wheels carried in .wheels/ (bench/fetch_wheels.sh) and sets the environment the benches expect.
#   source bench/gpu_env.sh && python3 bench/bench_train.py ...
python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/pp .wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/pp:$PWD/src:$PWD/bench PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export OMNITUNE_CACHE=/tmp/omnitune-cache PYTHONUNBUFFERED=1 OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
