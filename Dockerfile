FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY config ./config
RUN pip install --no-cache-dir . && useradd --create-home gateway && mkdir /data && chown gateway /data
USER gateway
WORKDIR /data

EXPOSE 8080
# SIGTERM (docker stop, Kubernetes) finishes requests in flight and flushes the prediction log.
STOPSIGNAL SIGTERM
ENTRYPOINT ["model-gateway"]
CMD ["serve", "--config", "/app/config/gateway.yaml", "--host", "0.0.0.0"]
