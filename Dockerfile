# One image for every evalfarm service: the scheduler (cpu queue), GPU workers (gpu queue), Flower and the CLI.
# torch from PyPI ships its own CUDA runtime; the host needs only the NVIDIA driver and the container toolkit.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY evalfarm ./evalfarm
RUN pip install . \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin evalfarm \
    && mkdir -p /data/store /var/lib/evalfarm/weights /weights \
    && chown -R evalfarm:evalfarm /data /var/lib/evalfarm /weights

# Named volumes mounted on these paths start with this ownership, so the non-root user can write to them.
ENV EVALFARM_STORE=/data/store \
    EVALFARM_HOME=/var/lib/evalfarm

USER evalfarm
WORKDIR /home/evalfarm
ENTRYPOINT ["evalfarm"]
CMD ["--help"]
