# The service in a container: `docker build -t streaming-relay .` then
# `docker run --rm -p 8000:8000 --stop-timeout 30 -e OPENAI_API_KEY -e API_KEYS streaming-relay`.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000

WORKDIR /app

# Dependencies in their own layer: rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install -r requirements.txt

RUN useradd --create-home --uid 10001 relay
COPY service.py .
COPY relay/ relay/
COPY static/ static/
USER relay

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=2)"]

# Exec form: SIGTERM reaches the service itself, which lets open streams finish (SHUTDOWN_GRACE_SECONDS).
CMD ["python", "service.py"]
