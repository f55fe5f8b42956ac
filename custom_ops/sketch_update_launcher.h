/* keras_sketch fused sketched-optimizer step: plain C launcher of the CUDA
 * kernels (custom_ops/sketch_update_kernels.cu.cc).
 *
 * No TensorFlow here: pointers, sizes and a CUDA stream, so the kernels can be
 * driven from ctypes/CuPy (tests/gpu/) or wired into a framework's GPU kernel.
 * All tensors are device pointers, row-major float32:
 *   param [rows, dim]; exact slot [rows, dim]; sketch slot [depth, width, dim];
 *   grad [rows, dim] (dense) or [k, dim] (sparse); ids [k] int64; valid [k] uint8.
 * `hash` ([depth][4], a b c d in [0, 2^31-1)) and `coefs` (see sketch_math.h;
 * per slot in the order of `slot`) are host arrays, copied into the kernel
 * arguments.
 * Sparse ids must be unique among valid entries (merge duplicates first);
 * out-of-range ids are skipped, never written.
 * Every function returns 0 on success, KS_EINVAL for bad arguments, or a
 * cudaError_t value. */
#ifndef KERAS_SKETCH_LAUNCHER_H_
#define KERAS_SKETCH_LAUNCHER_H_

#include <stddef.h>
#include <stdint.h>

#include "sketch_kinds.h" /* KsOptimizer, KsSlotKind, KsSlotRole, KS_MAX_* */

#ifdef __cplusplus
extern "C" {
#endif

#define KS_EINVAL 1000

typedef struct {
  int optimizer;            /* KsOptimizer */
  int nesterov;             /* momentum only */
  int num_slots;            /* 1 or 2 */
  int slot_kind[KS_MAX_SLOTS]; /* KsSlotKind */
  int slot_role[KS_MAX_SLOTS]; /* KsSlotRole: told, never inferred from the order */
  float* slot[KS_MAX_SLOTS];
  float* param;
  int64_t rows, dim;
  int depth;                /* of the sketches (1..8) */
  int64_t width;            /* of the sketches; width == rows: identity map */
  int64_t hash[KS_MAX_DEPTH][4];
  float coefs[2 + 3 * KS_MAX_SLOTS];
} ks_problem;

/* Dense step: every row of `grad` [rows, dim]. */
int ks_dense_apply(const ks_problem* problem, const float* grad, void* stream);

/* Bytes of device workspace ks_sparse_apply needs for k rows. */
size_t ks_sparse_workspace_bytes(const ks_problem* problem, int64_t k);

/* Sparse step on k unique rows; `workspace` has ks_sparse_workspace_bytes. */
int ks_sparse_apply(const ks_problem* problem, const float* grad, const int64_t* ids,
                    const uint8_t* valid, int64_t k, void* workspace, void* stream);

/* Small cudart helpers so a harness needs nothing but ctypes (the library
 * links the CUDA runtime statically). */
int ks_device_count(int* count);
int ks_malloc(void** ptr, size_t bytes);
int ks_free(void* ptr);
int ks_memcpy_to_device(void* dst, const void* src, size_t bytes);
int ks_memcpy_to_host(void* dst, const void* src, size_t bytes);
int ks_synchronize(void);
/* Milliseconds of `iters` dense steps, timed with CUDA events. */
int ks_time_dense(const ks_problem* problem, const float* grad, int iters, float* ms);

#ifdef __cplusplus
}
#endif

#endif /* KERAS_SKETCH_LAUNCHER_H_ */
