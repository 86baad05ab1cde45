// Context teardown around a use-after-free in the vendored llama.cpp (v0.17.4).
#ifndef ELASTICSERVE_TEARDOWN_H
#define ELASTICSERVE_TEARDOWN_H

#ifdef __cplusplus
extern "C" {
#endif

struct llama_context;

// es_context_free frees ctx as llama_free does, but frees its backend scheduler
// first. ~llama_context destroys its members in reverse order of declaration, so
// the backends (declared after the scheduler) are freed before the scheduler,
// whose ggml_backend_sched_free then reads each freed backend's iface.reset (a
// call Ollama's ggml patches add) and calls it when that memory happens to hold a
// non-null pointer again: a rare SIGSEGV inside llama_free, which AddressSanitizer
// reports every time as a heap-use-after-free. Freeing the scheduler while the
// backends live avoids it; the destructor then finds no scheduler to free.
void es_context_free(struct llama_context *ctx);

#ifdef __cplusplus
}
#endif

#endif
