# One file, two images. Build each with its target:
#   docker build --target relay    -t mailrelay-relay:0.1.0 .
#   docker build --target operator -t mailrelay-operator:0.1.0 .
# (A third target, e2e-sink, is a fixture of tests/e2e/kind only.)
# The chart's values.yaml names these repositories; tests/chart/test_images.py keeps them in step.
#
# Both images: a slim Python base, a virtualenv built in a separate stage (no compiler in the result)
# holding that program and its own dependencies only (pyproject.toml's `relay` or `operator` extra; the
# dev sandbox is never copied), a fixed non-root UID/GID 10001, no writes to the root filesystem (run
# with readOnlyRootFilesystem; the relay's spool is a volume, /tmp an emptyDir), and tini as PID 1 so
# SIGTERM reaches the Python process (the relay drains on SIGTERM) and zombies are reaped.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the project's source; each image's virtualenv is built from it with that image's extra ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay/ relay/
COPY operator/ operator/
COPY common/ common/

# The relay's virtualenv: the relay and its dependencies only (no kopf, no kubernetes client; the
# operator's package, which the one wheel also carries, is removed). Bytecode is hash-based and
# unchecked: COPY --from rounds file times, so timestamp-based .pyc files would all look stale and,
# on a read-only root, be compiled again at every start.
FROM build AS build-relay
RUN /opt/venv/bin/pip install --no-compile '.[relay]' \
 && rm -rf /opt/venv/lib/python3*/site-packages/mailrelay_operator /opt/venv/bin/mailrelay-operator \
 && /opt/venv/bin/python -m compileall -q --invalidation-mode unchecked-hash /opt/venv/lib

# The operator's virtualenv: the operator and its dependencies only (no SMTP libraries, no relay).
FROM build AS build-operator
RUN /opt/venv/bin/pip install --no-compile '.[operator]' \
 && rm -rf /opt/venv/lib/python3*/site-packages/mailrelay_relay /opt/venv/bin/mailrelay-relay \
 && /opt/venv/bin/python -m compileall -q --invalidation-mode unchecked-hash /opt/venv/lib

# ---- base: what both runtime images share -------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 mailrelay \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin mailrelay
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /nonexistent

# ---- relay: the SMTP relay --------------------------------------------------------------------------
FROM base AS relay
LABEL org.opencontainers.image.title="mailrelay-relay" \
      org.opencontainers.image.description="Drain-aware outbound SMTP relay" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build-relay /opt/venv /opt/venv
# The spool must be a volume (emptyDir or PVC) so the root filesystem can stay read-only.
ENV MAILRELAY_SPOOL=/var/spool/mailrelay
USER 0:0
RUN mkdir -p /var/spool/mailrelay && chown 10001:10001 /var/spool/mailrelay
USER 10001:10001
VOLUME ["/var/spool/mailrelay"]
EXPOSE 2525 8025
STOPSIGNAL SIGTERM
# tini forwards SIGTERM to the relay's supervisor only (no -g): it drains, then stops its SO_REUSEPORT
# workers itself; a worker that got SIGTERM directly would stop at once and cut its sessions.
ENTRYPOINT ["/usr/bin/tini", "--", "mailrelay-relay"]
CMD []

# ---- operator: the Kopf operator ----------------------------------------------------------------
FROM base AS operator
LABEL org.opencontainers.image.title="mailrelay-operator" \
      org.opencontainers.image.description="Kopf operator that scales and drains mail relays" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build-operator /opt/venv /opt/venv
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "mailrelay-operator"]
CMD []

# ---- e2e-sink: the upstream SMTP sink of tests/e2e/kind/run.sh (a test fixture, never published) ------
# aiosmtpd's own Sink handler, which accepts and discards. The relay image no longer carries aiosmtpd.
FROM ${PYTHON_IMAGE} AS e2e-sink
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN pip install 'aiosmtpd>=1.4.6,<1.5'
USER 10001:10001
EXPOSE 2525
ENTRYPOINT ["python", "-m", "aiosmtpd", "-n", "-l", "0.0.0.0:2525", "-c", "aiosmtpd.handlers.Sink"]
