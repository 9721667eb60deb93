# syntax=docker/dockerfile:1
# ldx-hotfolder: watched-folder OCR daemon. Multi-stage: the build stage makes a virtual
# environment with the package; the runtime stage copies it onto a slim Python, runs as
# a fixed non-root user, and exposes the inbox, outbox and state as volumes.
#
#   docker build -t ldx-hotfolder .
#   docker compose up -d            (see compose.yaml: read-only root, no capabilities,
#                                    the API key as the secret "api-key")

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon ./daemon
RUN python -m venv /opt/ldx-hotfolder \
    && /opt/ldx-hotfolder/bin/pip install --no-cache-dir /src \
    && /opt/ldx-hotfolder/bin/python -m compileall -q /opt/ldx-hotfolder

FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
ARG GID=10001
LABEL org.opencontainers.image.title="ldx-hotfolder" \
      org.opencontainers.image.description="Watched-folder OCR daemon for the LDX hub RenderOCR API"
RUN groupadd --system --gid "${GID}" ldx-hotfolder \
    && useradd --system --uid "${UID}" --gid "${GID}" --no-create-home \
       --home-dir /var/lib/ldx-hotfolder --shell /usr/sbin/nologin ldx-hotfolder \
    && install -d -o "${UID}" -g "${GID}" -m 0750 /srv/inbox /srv/outbox \
    && install -d -o "${UID}" -g "${GID}" -m 0700 /var/lib/ldx-hotfolder
COPY --from=build /opt/ldx-hotfolder /opt/ldx-hotfolder
COPY docker/config.toml /etc/ldx-hotfolder/config.toml
# The API key comes from the secret file /run/secrets/api-key: the variable holds its
# path, never the key (DL3064 flags the name only).
# hadolint ignore=DL3064
ENV PATH=/opt/ldx-hotfolder/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LDX_HOTFOLDER_CONFIG=/etc/ldx-hotfolder/config.toml \
    LDX_HOTFOLDER_HUB__API_KEY_FILE=/run/secrets/api-key \
    LDX_HOTFOLDER_LOG_FORMAT=json
VOLUME ["/srv/inbox", "/srv/outbox", "/var/lib/ldx-hotfolder"]
USER ${UID}:${GID}
WORKDIR /var/lib/ldx-hotfolder
# SIGTERM lets uploads and downloads reach a safe point; give the container time to stop
# (compose: stop_grace_period).
STOPSIGNAL SIGTERM
# Fails when the daemon is stuck (no heartbeat for stall_timeout), blind (watcher,
# intake or pipeline dead), or holds work until a person acts (key rejected, plan or
# credit refusing); asks the daemon over its socket, nothing is written while idle. The
# daemon also exits by itself (status 70) when a part stays dead, so a restart policy
# restarts it: Docker does not restart unhealthy containers.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["ldx-hotfolder", "health"]
ENTRYPOINT ["ldx-hotfolder"]
CMD ["run"]
