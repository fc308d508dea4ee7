# syntax=docker/dockerfile:1
# Build from the directory that holds both this checkout (main/) and shared/ (the
# tokenizer files):   docker build -f main/Dockerfile -t llm-sidecar .
# Run:                docker run -p 8080:8080 -v sidecar-data:/var/lib/sidecar llm-sidecar
# Linted with hadolint (tests/test_dockerfile.py). Not built in CI: no Docker engine there.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the project and every dependency as wheels --------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY main/pyproject.toml main/README.md ./
COPY main/sidecar ./sidecar
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: the wheels installed, no compiler, no sources, not root ------------
FROM ${PYTHON_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# SIDECAR_KEYS_DB is the path of the hashed keys file, not a secret (hadolint DL3064).
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_TOKENIZER_DIR=/usr/share/sidecar/tiktoken \
    SIDECAR_LISTEN=0.0.0.0:8080 \
    SIDECAR_METER_DB=/var/lib/sidecar/meter.db \
    SIDECAR_KEYS_DB=/var/lib/sidecar/keys.db
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl \
    && groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid sidecar --home-dir /var/lib/sidecar \
       --shell /usr/sbin/nologin sidecar \
    && install -d -o sidecar -g sidecar -m 0750 /var/lib/sidecar
# Tokenizer encodings baked in so the container works air-gapped; checked against
# their published sha256 here, and again by tiktoken when they are loaded.
COPY shared/tiktoken/cl100k_base.tiktoken shared/tiktoken/o200k_base.tiktoken \
     /usr/share/sidecar/tiktoken/
RUN printf '%s  /usr/share/sidecar/tiktoken/%s\n' \
      223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7 cl100k_base.tiktoken \
      446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d o200k_base.tiktoken \
      | sha256sum -c -
COPY main/conf /app/conf
USER 10001:10001
WORKDIR /var/lib/sidecar
VOLUME ["/var/lib/sidecar"]
EXPOSE 8080
# No curl in a slim image: the probe is the package's own stdlib-only script.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "sidecar.healthcheck"]
# Exec form, no shell: `sidecar` is PID 1 and receives SIGTERM itself, then drains
# (timeouts.shutdown_grace, 30 s by default): give `docker stop` a longer --time.
# Other commands: docker run --rm -v sidecar-data:/var/lib/sidecar IMAGE sidecar meter summary
STOPSIGNAL SIGTERM
CMD ["sidecar", "run", "-c", "/app/conf/sidecar.example.yaml"]
