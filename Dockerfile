# syntax=docker/dockerfile:1
# modelxds image: `make image` (docker build -t modelxds:$(VERSION) .).
# One image for `modelxds serve` and `modelxds label` (the manifests pass the command).

# Python 3.11, the version the project is tested on; tag and digest pinned together.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY modelxds ./modelxds
# The project's wheel and every dependency's, so the runtime stage installs offline
# exactly what was resolved here.
RUN python -m pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links /wheels modelxds
# numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd
RUN groupadd --gid 10001 modelxds \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin modelxds
USER 10001:10001
# ADS (gateways), metrics of `serve`, metrics of `label`
EXPOSE 18000 9091 9092
ENTRYPOINT ["modelxds"]
CMD ["--help"]
