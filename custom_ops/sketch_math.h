// keras_sketch fused optimizer step: the per-element math, shared by the CPU
// kernels (sketch_update_op.cc) and the CUDA kernels (sketch_update_kernels.cu.cc).
//
// This is the C++ twin of the Python path (keras_sketch/state.py `accumulate`
// and the optimizers' `_step` methods); both must stay in step.
//
// Every auxiliary variable ("slot") follows one rule, X <- decay*X + scale*x,
// where x is the slot's input (g, g*g, or RMSprop's increment).  Coefficients
// arrive in one float vector `coefs`:
//   coefs[0], coefs[1]            optimizer scalars (see below)
//   coefs[2+3s .. 4+3s]           slot s: decay, scale, decay - 1
// (s is the slot's input position).  Optimizer scalars: adam (alpha =
// lr*sqrt(1-b2^t)/(1-b1^t), epsilon), adagrad (lr, epsilon), momentum (lr,
// momentum), rmsprop (lr, epsilon).
// Each slot's role (1st moment m or 2nd moment v, sketch_kinds.h) is told by
// the caller, never inferred from the slot's position; OrderSlots turns the
// roles into the order the slots are processed in.
#ifndef KERAS_SKETCH_SKETCH_MATH_H_
#define KERAS_SKETCH_SKETCH_MATH_H_

#include <cstdint>
#include <cmath>

#include "sketch_kinds.h"

#if defined(__CUDACC__)
#define KS_HD __host__ __device__ __forceinline__
#else
#define KS_HD inline
#endif

namespace keras_sketch {

constexpr int64_t kPrime = 2147483647LL;  // 2^31 - 1
constexpr int kMaxDepth = KS_MAX_DEPTH;

// Bucket of row `id` at depth j: ((a*(id mod P) + b) mod P) mod width.
// Hash coefficients are validated to lie in [0, P), ids in [0, rows), so
// every product stays below 2^62.
KS_HD int64_t HashBucket(const int64_t* hash_j, int64_t id, int64_t width) {
  const int64_t x = id % kPrime;
  return ((hash_j[0] * x + hash_j[1]) % kPrime) % width;
}

// Sign of row `id` at depth j: 1 - 2*(((c*(id mod P) + d) mod P) mod 2).
KS_HD float HashSign(const int64_t* hash_j, int64_t id) {
  const int64_t x = id % kPrime;
  return 1.0f - 2.0f * static_cast<float>(((hash_j[2] * x + hash_j[3]) % kPrime) % 2);
}

// Median of n <= kMaxDepth values (mean of the two middle ones for even n),
// as tf.sort + pick in keras_sketch.sketch.Sketch._combine.
KS_HD float Median(float* v, int n) {
  for (int i = 1; i < n; ++i) {
    const float key = v[i];
    int j = i - 1;
    while (j >= 0 && v[j] > key) {
      v[j + 1] = v[j];
      --j;
    }
    v[j + 1] = key;
  }
  const int mid = n / 2;
  return (n % 2) ? v[mid] : 0.5f * (v[mid - 1] + v[mid]);
}

// Which processing position holds the 1st moment (m) and which the 2nd (v);
// -1 when absent.
struct Roles {
  int m = -1;
  int v = -1;
};

// The processing order of `num_slots` slots whose roles (KsSlotRole) the
// caller declared: the 2nd moment first (RMSprop's momentum input reads its
// new estimate), then the 1st.  Fills order[position] = input index and the
// positions' Roles.  Returns nullptr, or what is wrong with the roles.
inline const char* OrderSlots(int optimizer, int num_slots, const int* roles, int* order,
                              Roles* r) {
  if (num_slots < 1 || num_slots > KS_MAX_SLOTS) return "an optimizer step takes 1 or 2 slots";
  int first = -1, second = -1;
  for (int s = 0; s < num_slots; ++s) {
    int* which = roles[s] == kFirstMoment ? &first : roles[s] == kSecondMoment ? &second : nullptr;
    if (which == nullptr) return "a slot role is not first_moment or second_moment";
    if (*which >= 0) return "two slots have the same role";
    *which = s;
  }
  if (!KsRolesAllowed(optimizer, first >= 0, second >= 0))
    return "these slot roles do not fit the optimizer (adam: second_moment and optionally "
           "first_moment; adagrad: second_moment; momentum: first_moment; rmsprop: "
           "second_moment and optionally first_moment)";
  int position = 0;
  *r = Roles();
  if (second >= 0) { r->v = position; order[position++] = second; }
  if (first >= 0) { r->m = position; order[position++] = first; }
  return nullptr;
}

// Input x of the slot at processing position `s` for one element, given the
// gradient g and the new estimate e0 of position 0.  Only RMSprop's momentum
// depends on another slot: its 2nd moment, which OrderSlots puts at 0.
template <int kOpt>
KS_HD float SlotInput(int s, const Roles& r, float g, float e0, const float* c) {
  if (s == r.v) return g * g;
  if (kOpt == kRMSprop) return (c[0] * g) / sqrtf(e0 + c[1]);  // lr*g/sqrt(v+eps)
  return g;                                                    // adam / momentum m
}

// What the step subtracts from the parameter (the `_step` return value),
// from the gradient and the new estimates e0, e1 of positions 0 and 1.
template <int kOpt>
KS_HD float ParamDelta(const Roles& r, bool nesterov, float g, float e0, float e1,
                       const float* c) {
  const float em = r.m == 0 ? e0 : e1;
  const float ev = r.v == 0 ? e0 : e1;
  switch (kOpt) {
    case kAdam:
      return (c[0] * (r.m >= 0 ? em : g)) / (sqrtf(ev) + c[1]);
    case kAdagrad:
      return (c[0] * g) / sqrtf(ev + c[1]);
    case kMomentum:
      return nesterov ? c[0] * (g + c[1] * em) : c[0] * em;
    default:  // kRMSprop
      return r.m >= 0 ? em : (c[0] * g) / sqrtf(ev + c[1]);
  }
}

}  // namespace keras_sketch

#endif  // KERAS_SKETCH_SKETCH_MATH_H_
