# elasticserve build. Every cgo flag is set here, once, so `make build`, `make test`
# and CI share the Go build cache (any change to CGO_* rebuilds llama.cpp: ~3 min).

SHELL := /bin/bash
GO ?= go
ARCH ?= native
BIN := bin

# The directory of github.com/ollama/ollama (llama.cpp and ggml sources and headers).
# Resolved on first use, once per make run, AFTER downloading the module: make reads this
# file before any recipe runs, so a `:=` with `go list -m` would see an empty module cache
# on a fresh machine and leave every -I below empty ("llama.h: No such file or directory").
OLLAMA_DIR = $(eval OLLAMA_DIR := $(shell $(GO) mod download github.com/ollama/ollama && \
	$(GO) list -m -f '{{.Dir}}' github.com/ollama/ollama))$(or $(OLLAMA_DIR),$(error \
	cannot locate module github.com/ollama/ollama: see `$(GO) mod download github.com/ollama/ollama`))
LLAMA_CPP = $(OLLAMA_DIR)/llama/llama.cpp
GGML = $(OLLAMA_DIR)/ml/backend/ggml/ggml

MODEL_DIR ?= models/demo
MODEL ?= $(MODEL_DIR)/model.gguf
MMPROJ ?= $(MODEL_DIR)/mmproj.gguf
ADDR ?= 127.0.0.1:8080
TEST_TIMEOUT ?= 40m

# The cgo flags, exported to the recipes of the targets that run go (and their
# prerequisites) only, so `make deps` or `make clean` alone never resolve OLLAMA_DIR; with
# them, it is resolved when the first recipe starts. Every go command sees exactly the same
# CGO_* values (here and in `make env`), so all targets share the Go build cache.
CGO_TARGETS := build vet test fuzz bench asan env cuda-src $(MODEL)
$(CGO_TARGETS): export CGO_ENABLED := 1
$(CGO_TARGETS): export CGO_CPPFLAGS = -I$(CURDIR)/third_party -I$(LLAMA_CPP)/include -I$(LLAMA_CPP)/tools/mtmd -I$(GGML)/include
# AMX: with -march=native on a CPU that has it (Sapphire Rapids and later), ggml-cpu.cpp
# calls the AMX buffer type, whose source (ggml-cpu/amx) the Go binding does not compile:
# the link fails. The matrix kernels do not need it; keep it off on x86-64.
ARCH_FLAGS := -march=$(ARCH)
ifeq ($(shell uname -m),x86_64)
ARCH_FLAGS += -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
$(CGO_TARGETS): export CGO_CFLAGS := -O3 $(ARCH_FLAGS)
$(CGO_TARGETS): export CGO_CXXFLAGS := -O3 $(ARCH_FLAGS)
# go build/vet/test run through tools/build/quiet: it hides the C/C++ compiler warnings of
# the github.com/ollama/ollama packages (never errors, never ours); `make build QUIET=`
# shows everything.
QUIET ?= tools/build/quiet

# Packages without cgo of their own: these run under the race detector.
PURE_PKGS := ./elasticcache/... ./config/... ./api/... ./engine/completion/... ./internal/testmodel/... \
	./internal/eval/rouge/... ./internal/eval/answer/... ./internal/eval/shapes/... ./internal/eval/dataset/... \
	./internal/eval/progress/... ./internal/eval/report/... ./internal/eval/bench/...

.PHONY: gpu-bundle fuzz eval deps build-deps mod build test test-race vet fmt run model bench asan clean env cuda cuda-src smoke chartcheck image-check

# GPU: ggml's CUDA backend is a shared library loaded at run time from <bin>/../lib/ollama.
# `make cuda` builds it from the same module sources with CMake and nvcc.
CUDA_ARCHS ?= native
CUDA_BUILD := build/cuda

# Debian packages: BUILD_PKGS to build (header-only libraries the vendored llama.cpp
# includes), TEST_PKGS for `make test` (Chromium drives the playground page in
# integration/playground_test.go). `make deps` installs both (CI runs it as root);
# build, vet and bench ask only for BUILD_PKGS, so `make run` installs no browser.
BUILD_PKGS := nlohmann-json3-dev libstb-dev
TEST_PKGS := chromium

define apt_install
	@missing=""; \
	for p in $(1); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	else echo "deps: all present"; fi
endef

deps:
	$(call apt_install,$(BUILD_PKGS) $(TEST_PKGS))

build-deps:
	$(call apt_install,$(BUILD_PKGS))

mod:
	$(GO) mod download
	cd deploy/helm/chartcheck && $(GO) mod download

build: build-deps mod
	$(QUIET) $(GO) build -o $(BIN)/ ./cmd/...

model: $(MODEL)
$(MODEL):
	$(GO) run ./cmd/mkmodel --out $(MODEL_DIR)

vet: build-deps mod
	$(QUIET) $(GO) vet ./...

test: deps mod
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(QUIET) $(GO) vet ./...
	$(QUIET) $(GO) test -race $(PURE_PKGS)
	$(QUIET) $(GO) test -timeout $(TEST_TIMEOUT) ./...
	$(MAKE) --no-print-directory fuzz FUZZTIME=3s OLLAMA_DIR=$(OLLAMA_DIR)
	$(MAKE) --no-print-directory chartcheck
	$(MAKE) --no-print-directory asan OLLAMA_DIR=$(OLLAMA_DIR)

# Fuzz targets (request decoding, data URLs, image checks); `make fuzz FUZZTIME=5m` for long runs.
FUZZTIME ?= 60s
fuzz:
	@for t in FuzzDecodeChatRequest FuzzParseDataURL FuzzCheckImage; do \
	  $(QUIET) $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) ./api/ || exit 1; \
	done

bench: build-deps mod
	$(QUIET) $(GO) test -run '^$$' -bench . -benchtime 1x ./...

# The cgo packages' tests under AddressSanitizer (C and C++ instrumented; fails on any
# report but a known upstream one): tools/build/asan.sh. Part of `make test`; the first
# run compiles llama.cpp a second time, with the sanitizer (~4 min on 2 cores).
asan: build-deps mod
	QUIET=$(QUIET) GO=$(GO) tools/build/asan.sh

run: build model
	@echo "elasticserve on http://$(ADDR)  (model: $(MODEL))"
	@echo "try:  curl -s http://$(ADDR)/v1/chat/completions -H 'Content-Type: application/json' -d '{\"max_tokens\":16,\"temperature\":0,\"elastic_cache\":{\"policy\":\"full\"},\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"What color is the circle?\"},{\"type\":\"image_url\",\"image_url\":{\"url\":\"data:image/png;base64,'\"\$$(base64 -w0 models/demo/example.png)\"'\"}}]}]}'"
	$(BIN)/elasticserve --model $(MODEL) --mmproj $(MMPROJ) --addr $(ADDR)

# The quick start checked end to end: `make run` on a free port, the README's image request
# (answer " red"), SIGTERM, exit 0. CI runs it on an empty module cache (.ci/run).
smoke:
	tools/build/smoke.sh

# The Helm chart (three configurations and more, rendered with the Helm 3 library, decoded
# strictly into the Kubernetes types, run through our config parser) and docker-compose.yml
# (compose-go), in the nested module deploy/helm/chartcheck: pure Go, its own go.mod, so the
# server does not depend on Helm. A dependency added to the main module can require its
# go.sum to grow: then it is tidied here (commit the result).
chartcheck:
	@cd deploy/helm/chartcheck && { $(GO) mod tidy -diff >/dev/null 2>&1 || { \
	  echo "chartcheck: go mod tidy in deploy/helm/chartcheck (the main module's dependencies changed; commit its go.mod/go.sum)"; \
	  $(GO) mod tidy; }; }
	cd deploy/helm/chartcheck && CGO_ENABLED=0 $(GO) vet ./... && CGO_ENABLED=0 $(GO) test ./...

# The CPU image built from the Dockerfile with buildah and run: one image request (needs
# root, buildah, debootstrap; IMAGE_CHECK_SKIP=1 skips where buildah is absent). Not part
# of `make test`.
image-check:
	tools/image/check.sh

# `eval "$$(make -s env)"` gives a shell the same cgo flags (and so the same build cache).
# A quick quality/latency sweep of the bundled model on a synthetic shapes set.
eval: build model
	$(BIN)/elastic-eval gen-data --out out/shapes --n 20
	$(BIN)/elastic-eval sweep --model $(MODEL) --mmproj $(MMPROJ) --data out/shapes/data.json \
	  --max-samples 8 --max-tokens 32 --prompt-tokens 300 --gen-tokens 64 --batch 4 --out out/eval

env:
	@echo "export CGO_ENABLED=1"; echo "export CGO_CPPFLAGS='$(CGO_CPPFLAGS)'"; echo "export CGO_CFLAGS='$(CGO_CFLAGS)'"; echo "export CGO_CXXFLAGS='$(CGO_CXXFLAGS)'"

# The module's CMake entry point and ggml sources, copied where CMake may write.
cuda-src: mod
	rm -rf $(CUDA_BUILD)/src && mkdir -p $(CUDA_BUILD)/src/ml/backend/ggml
	cp $(OLLAMA_DIR)/CMakeLists.txt $(CUDA_BUILD)/src/
	cp -r $(OLLAMA_DIR)/ml/backend/ggml/ggml $(CUDA_BUILD)/src/ml/backend/ggml/
	chmod -R u+w $(CUDA_BUILD)/src
	printf 'module elasticserve.local/cudabuild\n' > $(CUDA_BUILD)/go.mod # keep its Go files out of ./...

cuda: cuda-src
	@command -v nvcc >/dev/null || { echo "make cuda needs nvcc (CUDA toolkit) and cmake"; exit 1; }
	cmake -S $(CUDA_BUILD)/src -B $(CUDA_BUILD)/out -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHS)
	cmake --build $(CUDA_BUILD)/out --target ggml-cuda -j$$(nproc)
	mkdir -p lib/ollama && cp -a $(CUDA_BUILD)/out/lib/ollama/libggml-cuda.so* $(CUDA_BUILD)/out/lib/ollama/libggml-base.so* lib/ollama/
	@echo "CUDA backend in lib/ollama; bin/elasticserve logs 'backend device ... type=gpu' at start-up"

# Everything a GPU machine without Go needs for the issue-G benchmark, in one folder
# (portable binaries, ggml sources, the script): carry build/gpu and run build/gpu/run.sh.
gpu-bundle:
	$(MAKE) --no-print-directory build ARCH=x86-64-v3 BIN=build/gpu/bin
	$(MAKE) --no-print-directory cuda-src CUDA_BUILD=build/gpu
	sed -i 's/set(GGML_CUDA_FA ON)/set(GGML_CUDA_FA OFF)/' build/gpu/src/CMakeLists.txt
	rm -f build/gpu/bin/mkdemo
	cp tools/gpu/run.sh build/gpu/run.sh
	@du -sh build/gpu

clean:
	rm -rf $(BIN) build lib
