# Small image running the proxy; mount your config and a log directory:
#   docker build -t llm-cost-proxy .
#   mkdir -p logs && docker run --user "$(id -u):$(id -g)" -p 9002:9002 \
#     -v "$PWD/config.yml:/app/config.yml:ro" -v "$PWD/logs:/app/logs" -e OPENAI_API_KEY llm-cost-proxy
# --user makes the container write logs/ as you, so a host-owned logs/ works as it is;
# without it the image's own unprivileged user (uid 10001) needs a logs/ it can write.
#
# Reproducible: the base image by exact version, every Python dependency from
# scripts/requirements.lock by version and hash (scripts/lock.sh regenerates it).
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    COST_TRACKING_FILE=/app/logs/cost-tracking.jsonl

WORKDIR /app
COPY scripts/requirements.lock /tmp/requirements.lock
RUN pip install --require-hashes --no-deps -r /tmp/requirements.lock
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY scripts ./scripts
COPY docs ./docs
# The package itself: its dependencies, and setuptools that builds it, are in already,
# from the lock (no build environment fetched anew).
RUN pip install --no-deps --no-build-isolation . \
    && useradd --system --uid 10001 --home-dir /app --no-create-home proxy \
    && mkdir -p /app/logs && chown proxy /app/logs && chmod 1777 /app/logs
COPY config.yml ./config.yml

USER 10001
EXPOSE 9002
# Listen on all interfaces inside the container; publish the port to choose who reaches it.
CMD ["python", "-m", "proxy", "--config", "/app/config.yml", "--host", "0.0.0.0", "--port", "9002"]
