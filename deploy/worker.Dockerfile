# The GPU worker: skutag on NVIDIA's CUDA runtime, as a non-root user, the model on a volume.
#   docker build -f deploy/worker.Dockerfile -t skutag-worker .     (from the repository root)
#   docker run --gpus 1 -v /srv/models:/models --env-file skutag.env skutag-worker
# The weights are not in the image (17 GB, and pinned by SKUTAG_MODEL / SKUTAG_MODEL_REVISION):
# put them in the volume once, e.g. `hf download Qwen/Qwen3-VL-8B-Instruct --local-dir /srv/models/Qwen3-VL-8B-Instruct`.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/skutag \
    PATH=/opt/skutag/bin:$PATH \
    HF_HOME=/models/hf \
    SKUTAG_MODEL=/models/Qwen3-VL-8B-Instruct \
    SKUTAG_WORK_DIR=/var/lib/skutag \
    SKUTAG_METRICS_PORT=9100 \
    SKUTAG_LOG_FORMAT=json

# Base packages track the pinned CUDA image's Ubuntu release; their security updates are wanted.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && groupadd --system --gid 10001 skutag \
    && useradd --system --uid 10001 --gid skutag --home-dir /var/lib/skutag --create-home skutag \
    && mkdir -p /models \
    && chown skutag:skutag /models

# torch first, pinned: PyPI's Linux wheel is the CUDA build. Then skutag itself.
RUN pip install torch==2.13.0
COPY pyproject.toml README.md /src/
COPY pipeline /src/pipeline
COPY workers /src/workers
COPY schemas /src/schemas
COPY migrations /src/migrations
RUN pip install /src && rm -rf /src

USER 10001:10001
WORKDIR /var/lib/skutag
VOLUME ["/models"]
EXPOSE 9100
# Alive and serving: the worker's metrics endpoint answers (it runs in the worker process).
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=5)"]
# SIGTERM lets running batches finish; give it SKUTAG_BATCH_TIME_LIMIT_S (docker stop -t 330).
STOPSIGNAL SIGTERM
ENTRYPOINT ["skutag"]
CMD ["worker"]
