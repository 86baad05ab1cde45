# syntax=docker/dockerfile:1
# Multi-stage build of elasticserve (CPU). Not built in CI: no Docker engine runs on the
# development machines (see README). The build uses the same Makefile as everyone else.

FROM golang:1.26-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends nlohmann-json3-dev libstb-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# A portable x86-64 level with AVX2/FMA/F16C; override with --build-arg ARCH=native.
ARG ARCH=x86-64-v3
RUN make build ARCH=${ARCH} && go run ./cmd/mkmodel --out /out/models/test

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl libstdc++6 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /app elasticserve
WORKDIR /app
COPY --from=build /src/bin/elasticserve /app/bin/elasticserve
COPY --from=build /out/models /app/models
USER elasticserve
ENV ELASTICSERVE_ADDR=0.0.0.0:8080 \
    ELASTICSERVE_MODEL=/app/models/test/model.gguf \
    ELASTICSERVE_MMPROJ=/app/models/test/mmproj.gguf \
    ELASTICSERVE_LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1
ENTRYPOINT ["/app/bin/elasticserve"]
