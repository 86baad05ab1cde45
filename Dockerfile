# syntax=docker/dockerfile:1
# Multi-stage build of elasticserve (CPU), bundling the demo model (models/demo). Built and
# run by tools/image/check.sh (`make image-check`: buildah, one image request); the build
# uses the same Makefile as everyone else.

FROM golang:1.26-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends nlohmann-json3-dev libstb-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# A portable x86-64 level with AVX2/FMA/F16C; override with --build-arg ARCH=native.
ARG ARCH=x86-64-v3
RUN make build ARCH=${ARCH} BIN=/out/bin

FROM debian:bookworm-slim
# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can check the image's USER.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl libstdc++6 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 elasticserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin elasticserve
WORKDIR /app
COPY --from=build /out/bin/elasticserve /app/bin/elasticserve
COPY models/demo/model.gguf models/demo/mmproj.gguf models/demo/example.png /app/models/demo/
USER 10001:10001
ENV ELASTICSERVE_ADDR=0.0.0.0:8080 \
    ELASTICSERVE_MODEL=/app/models/demo/model.gguf \
    ELASTICSERVE_MMPROJ=/app/models/demo/mmproj.gguf \
    ELASTICSERVE_LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["/app/bin/elasticserve"]
