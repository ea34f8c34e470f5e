# esim-bridge as a container: non-root, the store on the /data volume, a healthcheck.
#   docker build -t esim-bridge .
#   docker run -d -p 8080:8080 -v esim-bridge-data:/data \
#     -e ESIM_BRIDGE_MQTT_URL=mqtt://user:pass@broker:1883 -e ESIM_BRIDGE_HTTP_TOKEN=... esim-bridge
# The base is a build argument so that tests can build on a local image
# (scripts/test-container); releases use the official one.
ARG PYTHON_IMAGE=python:3.12-slim
# The extras installed with the bridge: postgres (psycopg) lets store.url keep the store in
# PostgreSQL, for several replicas (docker-compose.yml, profile replicas). Leave it out
# with --build-arg EXTRAS= where psycopg has no binary wheel for the platform.
ARG EXTRAS=postgres

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
# A virtualenv, so the same steps work on any Debian-like base (Debian's own Python
# refuses system-wide pip installs); pip and setuptools are not needed at run time.
RUN python3 -m venv /opt/esim-bridge \
    && /opt/esim-bridge/bin/pip install --no-cache-dir --disable-pip-version-check \
        ".${EXTRAS:+[$EXTRAS]}" \
    && /opt/esim-bridge/bin/pip uninstall --yes --quiet pip setuptools
COPY docker/healthcheck.py /opt/esim-bridge/healthcheck.py

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/esim-bridge /opt/esim-bridge
# A fixed uid, so that a bind-mounted /data can be given to it: chown 10001 DIR
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home esim \
    && mkdir -p /data && chown esim:esim /data
USER esim
WORKDIR /data
VOLUME /data
ENV PATH=/opt/esim-bridge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ESIM_BRIDGE_STORE_PATH=/data/esim-bridge.db \
    ESIM_BRIDGE_HTTP_HOST=0.0.0.0
EXPOSE 8080
# Healthy while webhooks are accepted and stored, even when the MQTT broker is away:
# they wait in the outbox and go out when it is back, and restarting the bridge would
# not bring the broker back. Unhealthy when the bridge does not answer or its store
# fails (docker/healthcheck.py); `docker inspect` shows why.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/esim-bridge/bin/python", "/opt/esim-bridge/healthcheck.py"]
# Exec form: esim-bridge is PID 1 and gets docker stop's SIGTERM itself, drains the
# outbox for up to mqtt.shutdown_timeout and says `offline` (give it: docker stop -t 30).
ENTRYPOINT ["esim-bridge"]
CMD ["serve"]
