# The alert-responder image: one image, the command picks the role (serve, worker, beat).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY receiver ./receiver
COPY workers ./workers
COPY remediations ./remediations
COPY examples ./examples
COPY deploy/compose ./deploy/compose
# The PostgreSQL client programs the backups run (pg_dump, pg_restore, psql).
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir -c constraints.txt . && useradd --uid 10001 --no-create-home responder \
    && mkdir -p /var/backups/responder && chown 10001 /var/backups/responder
USER 10001
ENTRYPOINT ["responder"]
