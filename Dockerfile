# The Proctor gateway (data plane). Built from the repository root by `cdk deploy`
# (infra/constructs/gateway_service.py); .dockerignore lets in only the package sources.

# Build stage: wheels for the project and its dependencies, with a compiler for the optional
# C frame scanner (setup.py) that the slim runtime image could not build.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN pip wheel --no-cache-dir --wheel-dir /wheels /src

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels proctor
# The C frame scanner and recording writer are optional at install time; the image must not ship
# without them (the scanner is 40x slower in Python, the writer a few microseconds a record).
RUN python -c "from data_plane.postgres import framescan; from data_plane.core import recording; \
assert framescan.ACCELERATED and recording.ACCELERATED"

RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin proctor \
    && install -d -o proctor -g proctor -m 0750 /var/spool/proctor
# Declared volumes start as copies of these directories, owner included: the task mounts them
# writable while the root filesystem stays read-only.
VOLUME ["/var/spool/proctor", "/tmp"]

USER 10001:10001
EXPOSE 5432 9090
# On SIGTERM the gateway stops accepting, drains sessions and flushes its spool (ECS stopTimeout: 120 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "data_plane"]
