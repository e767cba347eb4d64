# vaeserve serving image: ONNX Runtime, gRPC, NumPy and prometheus-client; no torch.
#
#   docker build -t vaeserve:gpu .                   # default target: CUDA 13 + cuDNN 9 runtime
#   docker build -t vaeserve:cpu --target cpu .      # no CUDA libraries; ONNX Runtime runs on CPU
#
# Both final stages copy the same virtual environment from one builder. Every base is Ubuntu 24.04 with
# its python3 (3.12) at /usr/bin, so the venv's interpreter link is valid in each of them.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG UBUNTU_IMAGE=ubuntu:24.04

# ---- builder: the serving install, exactly as the README setup runs it, without extras ----
FROM ${UBUNTU_IMAGE} AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY vaeserve/ vaeserve/
COPY training/ training/
COPY export/ export/
COPY service/ service/
COPY benchmarks/ benchmarks/
RUN python3 -m venv /opt/vaeserve \
    && /opt/vaeserve/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir \
       -c constraints.txt . \
    && if /opt/vaeserve/bin/python -m pip show torch >/dev/null 2>&1; then \
           echo "torch must not be in the serving install" >&2; exit 1; fi

# ---- cpu: for machines without GPUs. The gpu stage below repeats these steps exactly (a test checks it) ----
FROM ${UBUNTU_IMAGE} AS cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 vaeserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin vaeserve
COPY --from=builder /opt/vaeserve /opt/vaeserve
COPY deploy/docker/healthcheck.py /opt/vaeserve/healthcheck.py
# The model repository is mounted here, read-only: /models/<name>/<version>/{encoder.onnx,decoder.onnx,manifest.json}.
# Outside a container the server binds loopback only; here it must bind every interface for -p and pod
# networking to reach it. /metrics is plaintext without auth: publish 8000 only where Prometheus alone reaches.
ENV PATH=/opt/vaeserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VAESERVE_REPOSITORY=/models \
    VAESERVE_HOST=[::] \
    VAESERVE_PORT=50051 \
    VAESERVE_METRICS_HOST=[::] \
    VAESERVE_METRICS_PORT=8000 \
    VAESERVE_DRAIN_SECONDS=10
VOLUME ["/models"]
EXPOSE 50051 8000
USER 10001:10001
# grpc.health.v1 for the whole server: healthy once the models are warmed up, unhealthy while draining.
# With TLS on, the script uses VAESERVE_HEALTH_PORT when set, else TLS to the main port (see the script).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "/opt/vaeserve/healthcheck.py"]
ENTRYPOINT ["vaeserve", "serve"]

# ---- gpu (default target): same as cpu, on the CUDA 13 + cuDNN 9 runtime that onnxruntime-gpu 1.31 needs ----
FROM ${CUDA_IMAGE} AS gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 vaeserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin vaeserve
COPY --from=builder /opt/vaeserve /opt/vaeserve
COPY deploy/docker/healthcheck.py /opt/vaeserve/healthcheck.py
ENV PATH=/opt/vaeserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VAESERVE_REPOSITORY=/models \
    VAESERVE_HOST=[::] \
    VAESERVE_PORT=50051 \
    VAESERVE_METRICS_HOST=[::] \
    VAESERVE_METRICS_PORT=8000 \
    VAESERVE_DRAIN_SECONDS=10
VOLUME ["/models"]
EXPOSE 50051 8000
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "/opt/vaeserve/healthcheck.py"]
ENTRYPOINT ["vaeserve", "serve"]
