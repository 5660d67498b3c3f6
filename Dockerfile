# Small image running the proxy; mount your config and a log directory:
#   docker build -t llm-cost-proxy .
#   docker run -p 9002:9002 -v $PWD/config.yml:/app/config.yml:ro -v $PWD/logs:/app/logs \
#              -e OPENAI_API_KEY llm-cost-proxy
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    COST_TRACKING_FILE=/app/logs/cost-tracking.jsonl

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install ".[tokenizer,fast]" \
    && useradd --system --uid 10001 --home /app proxy \
    && mkdir -p /app/logs && chown proxy /app/logs
COPY config.yml ./config.yml

USER proxy
EXPOSE 9002
# Listen on all interfaces inside the container; publish the port to choose who reaches it.
CMD ["python", "-m", "proxy", "--config", "/app/config.yml", "--host", "0.0.0.0", "--port", "9002"]
