FROM python:3.12-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip install --no-cache-dir . && useradd --system --home /data esim && mkdir -p /data \
    && chown esim /data

USER esim
WORKDIR /data
ENV ESIM_BRIDGE_STORE_PATH=/data/esim-bridge.db \
    ESIM_BRIDGE_HTTP_HOST=0.0.0.0
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz').status != 200)"
ENTRYPOINT ["esim-bridge"]
CMD ["serve"]
