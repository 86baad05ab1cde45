# elasticserve build. Every cgo flag is set here, once, so `make build`, `make test`
# and CI share the Go build cache (any change to CGO_* rebuilds llama.cpp: ~3 min).

SHELL := /bin/bash
GO ?= go
ARCH ?= native
BIN := bin
OLLAMA_DIR := $(shell $(GO) list -m -f '{{.Dir}}' github.com/ollama/ollama 2>/dev/null)
LLAMA_CPP := $(OLLAMA_DIR)/llama/llama.cpp
GGML := $(OLLAMA_DIR)/ml/backend/ggml/ggml

export CGO_ENABLED := 1
export CGO_CPPFLAGS := -I$(CURDIR)/third_party -I$(LLAMA_CPP)/include -I$(LLAMA_CPP)/tools/mtmd -I$(GGML)/include
export CGO_CFLAGS := -O3 -march=$(ARCH)
export CGO_CXXFLAGS := -O3 -march=$(ARCH)

MODEL_DIR ?= models/test
MODEL ?= $(MODEL_DIR)/model.gguf
MMPROJ ?= $(MODEL_DIR)/mmproj.gguf
ADDR ?= 127.0.0.1:8080
TEST_TIMEOUT ?= 40m
# Packages without cgo of their own: these run under the race detector.
PURE_PKGS := ./elasticcache/... ./config/... ./api/... ./engine/completion/... ./internal/testmodel/...

.PHONY: deps mod build test test-race vet fmt run model bench clean env

deps:
	@missing=""; \
	for p in nlohmann-json3-dev libstb-dev; do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	else echo "deps: all present"; fi

mod:
	$(GO) mod download

build: deps mod
	$(GO) build -o $(BIN)/ ./cmd/...

model: $(MODEL)
$(MODEL):
	$(GO) run ./cmd/mkmodel --out $(MODEL_DIR)

vet: deps mod
	$(GO) vet ./...

test: deps mod
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...
	$(GO) test -race $(PURE_PKGS)
	$(GO) test -timeout $(TEST_TIMEOUT) ./...

bench: deps mod
	$(GO) test -run '^$$' -bench . -benchtime 1x ./...

run: build model
	@echo "elasticserve on http://$(ADDR)  (model: $(MODEL))"
	@echo "try:  curl -s http://$(ADDR)/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "        -d '{\"messages\":[{\"role\":\"user\",\"content\":\"What color is the circle?\"}],\"max_tokens\":32}'"
	$(BIN)/elasticserve --model $(MODEL) --mmproj $(MMPROJ) --addr $(ADDR)

# `eval "$$(make -s env)"` gives a shell the same cgo flags (and so the same build cache).
env:
	@echo "export CGO_ENABLED=1"; echo "export CGO_CPPFLAGS='$$CGO_CPPFLAGS'"; echo "export CGO_CFLAGS='$$CGO_CFLAGS'"; echo "export CGO_CXXFLAGS='$$CGO_CXXFLAGS'"

clean:
	rm -rf $(BIN)
