/*
 * elasticserve: stand-in for the miniaudio header.
 *
 * The vendored llama.cpp (via github.com/ollama/ollama) includes
 * "miniaudio/miniaudio.h" from mtmd-helper.cpp, but Go module zips drop
 * vendor/ folders and Debian has no package for it. elasticserve serves
 * images, not audio, so this header declares only the few decoder calls
 * mtmd-helper uses and makes every decode fail. Audio input is therefore
 * rejected ("audio input is not supported") while images are unaffected.
 *
 * Written for this project; it contains no miniaudio code.
 */
#ifndef ELASTICSERVE_MINIAUDIO_SHIM_H
#define ELASTICSERVE_MINIAUDIO_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifndef MA_API
#define MA_API static
#endif

typedef int ma_result;
typedef uint64_t ma_uint64;
typedef uint32_t ma_uint32;

#define MA_SUCCESS 0
#define MA_NOT_IMPLEMENTED (-29)

typedef enum { ma_format_unknown = 0, ma_format_f32 = 5 } ma_format;

typedef struct {
    ma_format format;
    ma_uint32 channels;
    ma_uint32 sampleRate;
} ma_decoder_config;

typedef struct {
    int unused;
} ma_decoder;

static inline ma_decoder_config ma_decoder_config_init(ma_format format, ma_uint32 channels, ma_uint32 sample_rate) {
    ma_decoder_config c;
    c.format = format;
    c.channels = channels;
    c.sampleRate = sample_rate;
    return c;
}

static inline ma_result ma_decoder_init_memory(const void *data, size_t size, const ma_decoder_config *config, ma_decoder *decoder) {
    (void)data; (void)size; (void)config; (void)decoder;
    fprintf(stderr, "elasticserve: audio input is not supported\n");
    return MA_NOT_IMPLEMENTED;
}

static inline ma_result ma_decoder_get_length_in_pcm_frames(ma_decoder *decoder, ma_uint64 *length) {
    (void)decoder;
    if (length) *length = 0;
    return MA_NOT_IMPLEMENTED;
}

static inline ma_result ma_decoder_read_pcm_frames(ma_decoder *decoder, void *frames, ma_uint64 count, ma_uint64 *read) {
    (void)decoder; (void)frames; (void)count;
    if (read) *read = 0;
    return MA_NOT_IMPLEMENTED;
}

static inline ma_result ma_decoder_uninit(ma_decoder *decoder) {
    (void)decoder;
    return MA_SUCCESS;
}

#endif
