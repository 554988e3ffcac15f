# B12 / neck-pain CDS Hooks service.  Start command = the documented local command
# `b12-cds serve` (tests/test_serve.py starts exactly that and checks /healthz).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CDS_BIND=0.0.0.0:8080 \
    CDS_DATA_DIR=/var/lib/b12-cds \
    CDS_CARDS_DIR=/app/cards \
    CDS_VALUESETS_DIR=/app/valuesets

WORKDIR /app
COPY pyproject.toml README.md ./
COPY cds_service ./cds_service
RUN pip install --no-cache-dir . && rm -rf /root/.cache

# Card definitions and value sets are data: mount a folder over /app/cards or /app/valuesets
# (or point CDS_CARDS_DIR / CDS_VALUESETS_DIR elsewhere) to replace them.
COPY cards ./cards
COPY valuesets ./valuesets

RUN useradd --system --uid 10001 --no-create-home --home-dir /app cds \
    && mkdir -p /var/lib/b12-cds && chown cds:cds /var/lib/b12-cds && chmod 0700 /var/lib/b12-cds
USER cds
VOLUME ["/var/lib/b12-cds"]
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)" || exit 1

CMD ["b12-cds", "serve"]
