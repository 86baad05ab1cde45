// Package llama is elasticserve's only cgo layer: a thin Go API over llama.cpp's C API
// (llama.h, mtmd.h) as compiled by github.com/ollama/ollama/llama. Go types go in and come
// out; every C allocation is owned by one Go value and freed by its Close method.
//
// Building needs the include paths and flags set by the project Makefile (CGO_CPPFLAGS).
package llama

/*
#cgo CFLAGS: -std=c11
#cgo CXXFLAGS: -std=c++17
#include <stdlib.h>
#include "ggml.h"
#include "ggml-backend.h"
#include "llama.h"
#include "elastic_hook.h"
*/
import "C"

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	ollama "github.com/ollama/ollama/llama"
)

var initOnce sync.Once

// logLevel is the minimum llama.cpp log level forwarded to stderr (GGML_LOG_LEVEL_*).
// llama.cpp's logger is process-wide, so this one knob is too.
var logLevel atomic.Int32

// LogLevel selects which llama.cpp messages reach stderr.
type LogLevel int32

const (
	LogDebug LogLevel = C.GGML_LOG_LEVEL_DEBUG
	LogInfo  LogLevel = C.GGML_LOG_LEVEL_INFO
	LogWarn  LogLevel = C.GGML_LOG_LEVEL_WARN
	LogError LogLevel = C.GGML_LOG_LEVEL_ERROR
	LogNone  LogLevel = C.GGML_LOG_LEVEL_ERROR + 1
)

// Init loads the ggml backends (CPU, plus CUDA when libggml-cuda is found) and the
// llama.cpp runtime. It is safe to call more than once.
func Init(level LogLevel) {
	logLevel.Store(int32(level))
	initOnce.Do(func() {
		ollama.BackendInit()
		C.es_log_install(C.int(level))
	})
	C.es_log_set_level(C.int(level))
}

// SystemInfo is llama.cpp's feature line (AVX2 = 1 | ...).
func SystemInfo() string {
	return C.GoString(C.llama_print_system_info())
}

// Device describes one ggml backend device.
type Device struct {
	Name        string
	Description string
	Type        string // cpu, gpu, igpu, accel
	FreeBytes   uint64
	TotalBytes  uint64
}

// Devices lists the backend devices ggml found.
func Devices() []Device {
	n := int(C.ggml_backend_dev_count())
	out := make([]Device, 0, n)
	for i := 0; i < n; i++ {
		d := C.ggml_backend_dev_get(C.size_t(i))
		var free, total C.size_t
		C.ggml_backend_dev_memory(d, &free, &total)
		typ := "cpu"
		switch C.ggml_backend_dev_type(d) {
		case C.GGML_BACKEND_DEVICE_TYPE_GPU:
			typ = "gpu"
		case C.GGML_BACKEND_DEVICE_TYPE_IGPU:
			typ = "igpu"
		case C.GGML_BACKEND_DEVICE_TYPE_ACCEL:
			typ = "accel"
		}
		out = append(out, Device{
			Name:        C.GoString(C.ggml_backend_dev_name(d)),
			Description: C.GoString(C.ggml_backend_dev_description(d)),
			Type:        typ,
			FreeBytes:   uint64(free),
			TotalBytes:  uint64(total),
		})
	}
	return out
}

// HasGPU reports whether a GPU backend was loaded.
func HasGPU() bool {
	for _, d := range Devices() {
		if d.Type == "gpu" || d.Type == "igpu" {
			return true
		}
	}
	return false
}

// Feature reports one "NAME = 1" flag of SystemInfo.
func Feature(name string) bool {
	return strings.Contains(SystemInfo(), fmt.Sprintf("%s = 1", name))
}
