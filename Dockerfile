# geopush service image. Build: docker build -t geopush .
# Run:   docker run -p 8080:8080 -e GEOPUSH_AUTH__KEYS='[{"name":"app","key":"<32+ random chars>","scopes":["ingest","devices"]}]' \
#          -e GEOPUSH_LOGGING__PSEUDONYM_KEY="$(openssl rand -hex 32)" geopush
# With auth keys, serve refuses the default logging.pseudonym_key (docs/security.md).
# Without auth keys geopush listens on loopback only, i.e. unreachable from outside the container.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin geopush

WORKDIR /app
COPY pyproject.toml README.md ./
COPY geopush ./geopush
RUN pip install .

COPY config ./config
COPY rules ./rules
COPY stores.geojson NOTICE ./
# The memory backend's snapshot (config: storage.snapshot_path = ../var/state.json).
RUN mkdir -p /app/var && chown geopush:geopush /app/var

USER geopush
ENV GEOPUSH_CONFIG=/app/config/geopush.yaml
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# exec form: geopush is PID 1 and gets SIGTERM for a graceful shutdown
CMD ["geopush", "serve"]
