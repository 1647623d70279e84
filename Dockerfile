# r1box in a container, for sites that prefer containers to the appliance image: the same runtime (Debian
# bookworm's python3 and the runtime wheels only, no export stack), the same model artifact, the same /healthz.
#
#   docker build -t r1box --build-context model="$(.venv/bin/python -c 'from export.artifacts import cached_artifact; print(cached_artifact("qwen2.5-coder-0.5b-instruct"))')" .
#   docker run -p 8080:8080 -p 8443:8443 -p 9464:9464 -v r1box-data:/var/lib/r1box \
#       -v "$PWD/config.toml:/etc/r1box/config.toml:ro" --env-file secrets.env r1box
#   docker exec -it CONTAINER r1box admin add-user alice --role admin --config /etc/r1box/config.toml
# config.toml and secrets.env: as on the appliance's CONFIG drive (firmware_image/config/). The container runs the
# box's two processes under Debian's supervisor (appliance/ops/supervisord.conf): `r1box model` on the container's
# loopback, `r1box serve` on every address; set R1BOX_MODEL_KEY in secrets.env for the key between them.
FROM debian:bookworm-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY appliance /src/appliance
COPY export /src/export
RUN python3 -m venv /opt/r1box/venv && /opt/r1box/venv/bin/pip install --no-cache-dir /src

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 ca-certificates supervisor \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /var/lib/r1box --create-home --shell /usr/sbin/nologin r1box
COPY --from=build /opt/r1box/venv /opt/r1box/venv
COPY --from=model . /usr/share/r1box/model
COPY firmware_image/config/config.toml /etc/r1box/config.toml
COPY appliance/ops/supervisord.conf /etc/r1box/supervisord.conf
ENV R1BOX_DATA=/var/lib/r1box PATH=/opt/r1box/venv/bin:$PATH
USER r1box
VOLUME /var/lib/r1box
EXPOSE 8080 8443 9464
# the same check as the appliance's: where [server] says the service listens, over TLS when it speaks it
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["r1box", "health", "--config", "/etc/r1box/config.toml"]
CMD ["supervisord", "--configuration", "/etc/r1box/supervisord.conf"]
