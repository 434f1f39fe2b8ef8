# One image for every service of docker-compose.yml: the dask scheduler, the workers
# and the notebook server all run the same Python and the same `pipeline`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/pipeline
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
# The project and its runtime dependencies (dask, distributed, zarr, bokeh for the
# dashboard, prometheus_client for the scheduler's /metrics), plus what the notebook
# service needs.
RUN pip install . jupyterlab matplotlib

# Not root.  /data is where the named volume is mounted in every service: created here
# so that a new volume starts owned by this user.
RUN useradd --create-home --uid 1000 dask \
    && mkdir -p /data /home/dask/notebooks \
    && chown dask:dask /data /home/dask/notebooks
USER dask
WORKDIR /data

EXPOSE 8786 8787 8888
CMD ["dask", "scheduler"]
