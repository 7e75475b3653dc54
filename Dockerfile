# syntax=docker/dockerfile:1
# The proxy's image: `guardrail serve`, as a non-root user, with CPU torch (for the embedded
# guard) unless TORCH_VARIANT names a CUDA build.
#
#   docker build -t reasoning-guardrail .                                  # CPU torch
#   docker build -t reasoning-guardrail:cu128 --build-arg TORCH_VARIANT=cu128 .
#   docker run -p 8000:8000 reasoning-guardrail                            # demo upstream
#   docker run -p 8000:8000 -v $PWD/guardrail.yaml:/etc/guardrail/guardrail.yaml:ro \
#       reasoning-guardrail --config /etc/guardrail/guardrail.yaml --host 0.0.0.0
#
# Model servers (vLLM for the reasoning model and for a model guard) run in their own images:
# see deploy/compose.yaml.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtualenv with the package and its dependencies ----------------------------------
FROM ${PYTHON_IMAGE} AS build
# cpu, or a CUDA build of PyTorch's index (cu126, cu128...): the wheel index torch comes from.
ARG TORCH_VARIANT=cpu
# Extras installed with the proxy: otel (traces) by default; add vllm only to run a guard
# in-process on vLLM (guard.runner: vllm), which also needs a CUDA TORCH_VARIANT.
ARG EXTRAS=otel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/guardrail
WORKDIR /src
# torch first, from PyTorch's own index at the release constraints/cpu.txt pins: the largest
# layer, rebuilt only when the pin or the variant changes. (PyPI's Linux torch is the CUDA
# build, several GB; the CPU wheel is a fraction of that.)
COPY constraints/ constraints/
RUN /opt/guardrail/bin/pip install \
        --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==$(sed -n 's/^torch==//p' constraints/cpu.txt)"
COPY pyproject.toml README.md ./
COPY guardrail/ guardrail/
COPY server/ server/
COPY offline/ offline/
# The constraint keeps the torch above (2.x+cpu satisfies ==2.x); nothing else is pinned.
RUN /opt/guardrail/bin/pip install -c constraints/cpu.txt ".[${EXTRAS}]" \
    && /opt/guardrail/bin/python -c "import guardrail, server, torch; print(torch.__version__)"

# -- runtime: the virtualenv alone, run by an unprivileged user ---------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --system --gid "${UID}" guardrail \
    && useradd --system --uid "${UID}" --gid guardrail --home-dir /var/lib/guardrail \
        --create-home --shell /usr/sbin/nologin guardrail \
    && mkdir -p /etc/guardrail
COPY --from=build /opt/guardrail /opt/guardrail
# torch's CPU threads (the embedded guard) are the operator's choice: OMP_NUM_THREADS at run
# time (deploy/compose.yaml sets it), else torch takes every core it sees.
ENV PATH=/opt/guardrail/bin:$PATH \
    PYTHONUNBUFFERED=1
# The default case store (sqlite:///data/cases.db) and fallback file land here, in a volume.
WORKDIR /var/lib/guardrail
VOLUME ["/var/lib/guardrail"]
USER guardrail
EXPOSE 8000
# /healthz answers once the app has started (guard loaded, store opened). The slim image has no
# curl: Python's own client does it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["guardrail", "serve"]
# Inside a container the proxy must listen on every interface; a --config replaces this.
CMD ["--host", "0.0.0.0", "--port", "8000"]
