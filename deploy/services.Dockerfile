# The CPU services: writer, review app, backfill, reconcile, db upgrade. Same code, CPU torch.
#   docker build -f deploy/services.Dockerfile -t skutag-services .   (from the repository root)
#   docker run --env-file skutag.env skutag-services writer
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    SKUTAG_WORK_DIR=/var/lib/skutag \
    SKUTAG_METRICS_PORT=9100 \
    SKUTAG_LOG_FORMAT=json

RUN groupadd --system --gid 10001 skutag \
    && useradd --system --uid 10001 --gid skutag --home-dir /var/lib/skutag --create-home skutag

# The CPU build of torch (no CUDA libraries: a fraction of the size); then skutag.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md /src/
COPY pipeline /src/pipeline
COPY workers /src/workers
COPY schemas /src/schemas
COPY migrations /src/migrations
RUN pip install /src && rm -rf /src

USER 10001:10001
WORKDIR /var/lib/skutag
EXPOSE 9100 8686
# The writer's metrics endpoint; compose gives the review app and one-shot jobs their own check.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=5)"]
ENTRYPOINT ["skutag"]
CMD ["writer"]
