# The image runs the build that `make run`, `make test` and `make bench` run: the hot path
# compiled with mypyc (setup.py). The compiler stays in the build stage.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --create-home gateway && mkdir /data && chown gateway /data
COPY config /app/config
USER gateway
WORKDIR /data

EXPOSE 8080
# SIGTERM (docker stop, Kubernetes) finishes requests in flight and flushes the prediction log.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=2s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=1)"]
ENTRYPOINT ["model-gateway"]
CMD ["serve", "--config", "/app/config/gateway.yaml", "--host", "0.0.0.0"]
