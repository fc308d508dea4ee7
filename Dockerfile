# Plain image: runs `sidecar run` with the example config. Hardening arrives later.
# Build from the directory that holds both this checkout and shared/ (for the tokenizer files):
#   docker build -f main/Dockerfile -t llm-sidecar .
FROM python:3.11-slim
WORKDIR /app
COPY main/pyproject.toml main/README.md ./
COPY main/sidecar ./sidecar
COPY main/conf ./conf
RUN pip install --no-cache-dir . && useradd --system --home /var/lib/sidecar sidecar \
    && mkdir -p /var/lib/sidecar && chown sidecar /var/lib/sidecar
# Tokenizer encodings baked in so the container works air-gapped.
COPY shared/tiktoken /usr/share/sidecar/tiktoken
ENV SIDECAR_TOKENIZER_DIR=/usr/share/sidecar/tiktoken \
    SIDECAR_LISTEN=0.0.0.0:8080 \
    SIDECAR_METER_DB=/var/lib/sidecar/meter.db
USER sidecar
WORKDIR /var/lib/sidecar
EXPOSE 8080
STOPSIGNAL SIGTERM
CMD ["sidecar", "run", "-c", "/app/conf/sidecar.example.yaml"]
