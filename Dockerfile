# The runwatch worker (processors, ClickHouse sink, read API) for docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY runwatch ./runwatch
COPY producers ./producers
COPY processors ./processors
COPY sinks ./sinks
COPY dashboards ./dashboards
RUN pip install --no-cache-dir . && useradd --create-home --uid 1000 runwatch && mkdir /data && chown runwatch /data
USER runwatch
ENV RUNWATCH_HOME=/data
EXPOSE 8765
CMD ["runwatch", "worker"]
