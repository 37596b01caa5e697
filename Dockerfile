# eth-twisted: the server and the client in one small image.
#
#   docker build -t eth-twisted .
#   docker run -p 8080:8080 -v eth-state:/var/lib/eth-twisted eth-twisted
#       server and client together (`eth run`), dashboard on :8080
#   docker run -p 8888:8888 eth-twisted eth server --host 0.0.0.0 --port 8888
#       any single command; `twistd eth-server ...` works too (see the entrypoint)
#
# Stages: `build` installs the app into a virtualenv with scripts/install-app
# (the same script CI runs into a fresh virtualenv); `test` adds the test
# tools for `docker compose run test`; the last stage, `runtime`, is the
# default target: the virtualenv on a clean slim base, run as a non-root user.

ARG PYTHON_VERSION=3.12
ARG DEBIAN_RELEASE=bookworm

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
# .dockerignore makes the context an allowlist (sources, packaging, tests).
COPY . .
RUN PIP_NO_CACHE_DIR=1 scripts/install-app /opt/eth-twisted/venv /src


# anvil (a local Ethereum dev node) for the live tests, from its npm package.
FROM node:20-${DEBIAN_RELEASE}-slim AS anvil
ARG TARGETARCH=amd64
ARG ANVIL_VERSION=1.7.1
WORKDIR /anvil
RUN npm install --no-save --no-audit --no-fund "@foundry-rs/anvil-linux-${TARGETARCH}@${ANVIL_VERSION}" \
    && cp "node_modules/@foundry-rs/anvil-linux-${TARGETARCH}/bin/anvil" /anvil/anvil


# The test suite against the compose MariaDB and Redis (docker-compose.yml).
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS test
# What the tests run besides Python: redis-server (the private Redis some live tests kill and
# restart), nc (the seed-style client), openssl, sslscan and testssl (the link's TLS policy).
# Chromium is not here: the `browser` tests stay with the host's CI (ETH_TEST_MARKERS).
# Debian's current packages are wanted (security updates), hence no version pin
# (.hadolint.yaml, DL3008).
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server netcat-openbsd openssl sslscan testssl.sh \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src /src
COPY --from=anvil /anvil/anvil /usr/local/bin/anvil
# dev: ruff and mypy, which tests/test_lint.py runs.
# /src/.venv: the checkout's usual venv path (scripts/setup) names this venv too.
RUN PIP_NO_CACHE_DIR=1 /src/scripts/install-app --extras test,dev /opt/eth-twisted/venv /src \
    && ln -s /opt/eth-twisted/venv /src/.venv \
    && useradd --system --uid 10001 --user-group --home-dir /src --no-create-home eth \
    && chown -R eth:eth /src
ENV PATH=/opt/eth-twisted/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
USER 10001:10001
CMD ["python", "-m", "pytest", "-p", "no:cacheprovider", "-m", "not browser and not fault and not container"]


FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime
LABEL org.opencontainers.image.title="eth-twisted" \
      org.opencontainers.image.description="Ethereum chain-head relay: Twisted client and server, acknowledged delivery into SQL and Redis" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --system --gid 10001 eth \
    && useradd --system --uid 10001 --gid eth --home-dir /var/lib/eth-twisted --no-create-home \
       --shell /usr/sbin/nologin eth \
    && install -d -o eth -g eth -m 0750 /var/lib/eth-twisted
COPY --from=build /opt/eth-twisted/venv /opt/eth-twisted/venv
COPY scripts/install-app /opt/eth-twisted/install-app
COPY deploy/docker/entrypoint /usr/local/bin/eth-entrypoint
# Twisted's plugin cache, written here as root: the non-root user cannot
# write site-packages and would otherwise warn at every start.
RUN /opt/eth-twisted/install-app --dropin-cache /opt/eth-twisted/venv
ENV PATH=/opt/eth-twisted/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STATE_DIRECTORY=/var/lib/eth-twisted \
    ETH_HEALTHCHECK_URL=http://127.0.0.1:8080/healthz
# The SQLite file (eth-server.sqlite3) and the client's outbox
# (eth-client-spool.sqlite3) live here: keep it on a volume.
VOLUME ["/var/lib/eth-twisted"]
WORKDIR /var/lib/eth-twisted
USER 10001:10001
# 9999: netstring ingest; 8080: server (or `eth run`) stats, dashboard,
# /healthz; 8081: the client's stats when it runs alone.
EXPOSE 9999 8080 8081
# The slim image has no curl: Python's urllib does the check. Override
# ETH_HEALTHCHECK_URL for a command whose stats listen elsewhere.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['ETH_HEALTHCHECK_URL'], timeout=4)"]
ENTRYPOINT ["/usr/local/bin/eth-entrypoint"]
CMD ["eth", "run", "--stats", "tcp:8080:interface=0.0.0.0"]
