# B12 / neck-pain CDS Hooks service.  Start command = the documented local command
# `b12-cds serve` (tests/integration/test_docker.py runs this CMD as this USER with this ENV).
#
# Base image pinned by version tag (Python 3.11.13 on Debian 12 "bookworm").  For reproducible
# builds pin the digest too (`docker pull python:3.11.13-slim-bookworm` then
# `FROM python:3.11.13-slim-bookworm@sha256:<digest>`); the digest cannot be looked up offline
# on the build machines, so it is not written here.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CDS_BIND=0.0.0.0:8080 \
    CDS_DATA_DIR=/var/lib/b12-cds

WORKDIR /app
# The default cards/ and valuesets/ ship inside the package (setup.py maps them to
# cds_service/_data/); to replace them, mount a folder and point CDS_CARDS_DIR or
# CDS_VALUESETS_DIR at it.  .dockerignore keeps .venv, data/ (keys), .git and caches out.
COPY pyproject.toml setup.py README.md ./
COPY cds_service ./cds_service
COPY cards ./cards
COPY valuesets ./valuesets
RUN pip install --no-cache-dir . && rm -rf /root/.cache /app/build

RUN useradd --system --uid 10001 --no-create-home --home-dir /app cds \
    && mkdir -p /var/lib/b12-cds && chown cds:cds /var/lib/b12-cds && chmod 0700 /var/lib/b12-cds
USER cds
VOLUME ["/var/lib/b12-cds"]
EXPOSE 8080

# Follows CDS_BIND (a wildcard address is checked on loopback), whatever port it is set to.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["b12-cds", "healthcheck"]

CMD ["b12-cds", "serve"]
