#include "teardown.h"

#include "llama.h"
#include "../src/llama-context.h"

// llama_context::sched is private: an explicit instantiation may name it.
namespace {

struct tag_sched {
    using type = ggml_backend_sched_ptr llama_context::*;
    friend type member(tag_sched);
};

template <typename Tag, typename Tag::type M>
struct member_of {
    friend typename Tag::type member(Tag) { return M; }
};

template struct member_of<tag_sched, &llama_context::sched>;

} // namespace

extern "C" void es_context_free(struct llama_context *ctx) {
    if (ctx == nullptr) {
        return;
    }
    (ctx->*member(tag_sched{})).reset();
    llama_free(ctx);
}
