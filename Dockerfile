# The alert-responder image: one image, the command picks the role (serve, worker, beat).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY receiver ./receiver
COPY workers ./workers
COPY remediations ./remediations
COPY examples ./examples
RUN pip install --no-cache-dir -c constraints.txt . && useradd --uid 10001 --no-create-home responder
USER 10001
ENTRYPOINT ["responder"]
