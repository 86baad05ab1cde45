package llama

/*
#include "llama.h"
#include "ggml-cpu.h"
*/
import "C"

import (
	"errors"
	"runtime"
)

// ThreadPool is a set of CPU worker threads that several contexts compute on.
// Each context otherwise keeps threads of its own, which spin for a while after
// every graph: two contexts used in turn (the decode context and the prefill
// context) then compete for the same cores, and a one-token call on one of them
// can wait behind the other's spinning threads for a scheduler time slice (seen on
// 2 cores: prompt chunks of 1 token taking 150-200 ms). Contexts sharing a pool
// run on the same threads, one graph at a time.
//
// Calls that compute on contexts attached to one pool must not overlap (the
// engine's loop goroutine owns them all). Close the pool after every context
// attached to it.
type ThreadPool struct {
	p *C.struct_ggml_threadpool
	n int
}

// NewThreadPool starts n worker threads (n <= 0: the Go runtime's GOMAXPROCS).
func NewThreadPool(n int) (*ThreadPool, error) {
	if n <= 0 {
		n = runtime.GOMAXPROCS(0)
	}
	params := C.ggml_threadpool_params_default(C.int(n))
	p := C.ggml_threadpool_new(&params)
	if p == nil {
		return nil, errors.New("ggml could not start a thread pool")
	}
	return &ThreadPool{p: p, n: n}, nil
}

// Threads is the number of worker threads.
func (t *ThreadPool) Threads() int { return t.n }

// Close stops the threads. Every context attached to the pool must be closed
// first.
func (t *ThreadPool) Close() {
	if t == nil || t.p == nil {
		return
	}
	C.ggml_threadpool_free(t.p)
	t.p = nil
}

// AttachThreadPool makes the context compute its graphs (single tokens and
// batches alike) on t's threads instead of its own.
func (c *Context) AttachThreadPool(t *ThreadPool) {
	C.llama_attach_threadpool(c.c, t.p, t.p)
}
