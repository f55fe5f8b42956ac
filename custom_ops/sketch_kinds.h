// keras_sketch fused optimizer step: the one definition of the optimizer
// kinds, slot kinds and slot roles, shared by the CPU op
// (sketch_update_op.cc), the CUDA kernels (sketch_update_kernels.cu.cc, and
// the C launcher struct in sketch_update_launcher.h) and, parsed from this
// file, the GPU test harness (tests/gpu/).  The names are the strings the op
// takes as attributes; the slot kind names are keras_sketch.sketch.EXACT,
// COUNT_SKETCH and COUNT_MIN (tests/test_fused_op.py checks they agree).
//
// Plain C (the enums sit in namespace keras_sketch when compiled as C++), so
// that C, C++ and CUDA can include it.
#ifndef KERAS_SKETCH_SKETCH_KINDS_H_
#define KERAS_SKETCH_SKETCH_KINDS_H_

#define KS_MAX_SLOTS 2
#define KS_MAX_DEPTH 8

#ifdef __cplusplus
namespace keras_sketch {
#endif

/* The update math the op runs (attr `optimizer`). */
enum KsOptimizer { kAdam = 0, kAdagrad = 1, kMomentum = 2, kRMSprop = 3, kNumOptimizers = 4 };
#define KS_OPTIMIZER_NAMES {"adam", "adagrad", "momentum", "rmsprop"}

/* How a slot is stored (attr `slot_kinds`). */
enum KsSlotKind { kExact = 0, kCountSketch = 1, kCountMin = 2, kNumSlotKinds = 3 };
#define KS_SLOT_KIND_NAMES {"exact", "count_sketch", "count_min"}

/* What a slot holds (attr `slot_roles`):
 *   first_moment:  X <- decay X + scale x with x = g (adam, momentum) or
 *                  RMSprop's increment lr g / sqrt(v + eps);
 *   second_moment: x = g * g (adam, adagrad, rmsprop).
 * Which roles each optimizer takes: KsRolesAllowed below. */
enum KsSlotRole { kFirstMoment = 0, kSecondMoment = 1, kNumSlotRoles = 2 };
#define KS_SLOT_ROLE_NAMES {"first_moment", "second_moment"}

/* Whether `optimizer` runs with exactly the roles `has_first`/`has_second`:
 * adam m+v or v (beta_1 = 0); adagrad v; momentum m; rmsprop v or v+m. */
static inline int KsRolesAllowed(int optimizer, int has_first, int has_second) {
  switch (optimizer) {
    case kAdam: return has_second;
    case kAdagrad: return has_second && !has_first;
    case kMomentum: return has_first && !has_second;
    case kRMSprop: return has_second;
    default: return 0;
  }
}

#ifdef __cplusplus
}  // namespace keras_sketch
#endif

#endif /* KERAS_SKETCH_SKETCH_KINDS_H_ */
