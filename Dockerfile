# omnitune on a CUDA machine: `docker build -t omnitune .` then
#   docker run --gpus all --ipc=host -v $PWD:/work -v ~/.cache/huggingface:/cache/huggingface omnitune train recipe.yaml
# The torch CUDA wheels bring their own CUDA runtime; the base image supplies the user-space driver hooks.
# PyAV and soundfile wheels bundle FFmpeg and libsndfile, so no system codecs are needed.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.11.0
ARG TORCHVISION_VERSION=0.26.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    OMNITUNE_CACHE=/cache/omnitune \
    MPLBACKEND=Agg \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, from the CUDA index, so that installing omnitune does not pull a different build from PyPI.
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/omnitune
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . \
    && python -c "import omnitune, torch, torchvision, transformers, peft; print('omnitune ok; torch', torch.__version__, 'transformers', transformers.__version__)"

RUN useradd --create-home --uid 1000 omnitune \
    && mkdir -p /cache/huggingface /cache/omnitune /work \
    && chown -R omnitune /cache /work
USER omnitune
WORKDIR /work

ENTRYPOINT ["omnitune"]
CMD ["--help"]
