// keras_sketch fused sketched-optimizer step: TensorFlow custom ops, CPU kernels.
//
//   KerasSketchDenseApply(var, slots..., hash, grad[rows, dim], coefs)
//   KerasSketchSparseApply(var, slots..., hash, grad[k, dim], coefs, ids[k], valid[k])
//
// Attributes: `optimizer` (the math), and per slot `slot_kinds` (how it is
// stored) and `slot_roles` (what it holds: first_moment or second_moment), in
// the order the slots are passed; the names are defined once in
// sketch_kinds.h.  The op never infers a role from a slot's position.
//
// Both update, in place, the parameter `var` (any shape with rows*dim
// elements, seen as its row-major [rows, dim] view) and its auxiliary
// variables `slots` (exact [rows, dim] tables or sketches [depth, width, dim]
// sharing the hash coefficients `hash` [depth, 4]).  The math is
// keras_sketch/state.py `accumulate` + the optimizers' `_step`:
//
// * dense: every slot X <- decay*X + scale*x (a sketch decays whole and gets
//   the sketch of scale*x added), then the estimates are queried and the
//   parameter updated.  Depth 1 (the default): rows are grouped by bucket, and
//   each bucket's rows are accumulated, queried and applied while they are in
//   cache (one pass over the gradient from memory).  Depth > 1: pass 1 per
//   sketched slot (threads own disjoint bucket ranges, so no two threads write
//   one bucket), pass 2 over rows queries and applies.  No [rows, dim]
//   temporary exists in either case.
// * sparse (unique row ids, `valid` masks padding): per slot, query all
//   touched rows, add all per-row deltas (decay-1)*X_prev + scale*x to their
//   buckets, query again; then update the touched parameter rows.
//
// Validation failures are InvalidArgument errors; nothing is written before
// all inputs are checked.
#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "sketch_math.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/kernels/training_op_helpers.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tensorflow {
namespace {

using CPUDevice = Eigen::ThreadPoolDevice;
using namespace keras_sketch;  // NOLINT

#define KS_COMMON_OP_DEF                                         \
  Input("var: resource")                                         \
      .Input("slots: num_slots * resource")                      \
      .Input("hash: int64")                                      \
      .Input("grad: T")                                          \
      .Input("coefs: T")                                         \
      .Attr("T: {float}")                                        \
      .Attr("num_slots: int >= 1")                               \
      .Attr("optimizer: string")                                 \
      .Attr("slot_kinds: list(string)")                          \
      .Attr("slot_roles: list(string)")                          \
      .Attr("rows: int >= 0")                                    \
      .Attr("nesterov: bool = false")

REGISTER_OP("KerasSketchDenseApply")
    .KS_COMMON_OP_DEF
    .SetIsStateful()
    .SetShapeFn(shape_inference::NoOutputs)
    .Doc("Fused dense sketched-optimizer step, in place (see keras_sketch/fused.py).");

REGISTER_OP("KerasSketchSparseApply")
    .KS_COMMON_OP_DEF
    .Input("ids: int64")
    .Input("valid: bool")
    .SetIsStateful()
    .SetShapeFn(shape_inference::NoOutputs)
    .Doc("Fused sparse-rows sketched-optimizer step, in place (see keras_sketch/fused.py).");

// The attribute strings of sketch_kinds.h's enums.
const char* const kOptimizerNames[] = KS_OPTIMIZER_NAMES;
const char* const kSlotKindNames[] = KS_SLOT_KIND_NAMES;
const char* const kSlotRoleNames[] = KS_SLOT_ROLE_NAMES;

// The enum value named `name` in names[0..n), or -1.
int IndexOf(const char* const* names, int n, const std::string& name) {
  for (int i = 0; i < n; ++i)
    if (name == names[i]) return i;
  return -1;
}

std::string Join(const char* const* names, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out += (i ? ", " : "") + std::string(names[i]);
  return out;
}

// One auxiliary variable during a step (at its processing position).
struct Slot {
  int input = 0;           // its index among the op's `slots` inputs
  int kind = kExact;
  bool sketched = false;  // [depth, width, dim] table, hashed rows
  bool is_signed = false; // count-sketch that is not the identity map
  float* data = nullptr;
  float decay = 0, scale = 0, decay_minus_1 = 0;
};

// Everything a kernel needs; built and validated in Compute.
struct Problem {
  int optimizer = kAdam;
  bool nesterov = false;
  Roles roles;
  int num_slots = 0;
  int64_t rows = 0, dim = 0;
  int depth = 1;
  int64_t width = 0;          // of the sketched slots (all equal)
  bool identity = false;      // sketches are the identity map (width == rows)
  bool any_sketch = false;
  const int64_t* hash = nullptr;
  const float* coefs = nullptr;
  float* param = nullptr;
  Slot slots[2];
};

// Runs fn(lo, hi) over [0, total) on TensorFlow's CPU worker threads.
void ParallelRange(OpKernelContext* ctx, int64_t total, int64_t cost_per_unit,
                   const std::function<void(int64_t, int64_t)>& fn) {
  if (total <= 0) return;
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  workers->ParallelFor(total, std::max<int64_t>(cost_per_unit, 1), fn);
}

// Locations (bucket, sign) of n rows at every depth: H[j*n + r], S[j*n + r].
struct Locations {
  std::vector<int64_t> bucket;
  std::vector<float> sign;
  int64_t n = 0;
};

void Locate(OpKernelContext* ctx, const Problem& p, const int64_t* ids, int64_t n,
            Locations* loc) {
  loc->n = n;
  loc->bucket.assign(static_cast<size_t>(p.depth) * n, 0);
  loc->sign.assign(static_cast<size_t>(p.depth) * n, 1.0f);
  ParallelRange(ctx, n, 20 * p.depth, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t id = ids ? ids[r] : r;
      for (int j = 0; j < p.depth; ++j) {
        if (p.identity) {
          loc->bucket[j * n + r] = id;
        } else {
          loc->bucket[j * n + r] = HashBucket(p.hash + 4 * j, id, p.width);
          loc->sign[j * n + r] = HashSign(p.hash + 4 * j, id);
        }
      }
    }
  });
}

// Estimate of entry r of `loc` in sketched slot s (Sketch.query semantics).
void QueryRow(const Problem& p, const Slot& s, const Locations& loc, int64_t r, float* out) {
  const int64_t dim = p.dim;
  const float* row[kMaxDepth];
  float sg[kMaxDepth];
  for (int j = 0; j < p.depth; ++j) {
    row[j] = s.data + (j * p.width + loc.bucket[j * loc.n + r]) * dim;
    sg[j] = s.is_signed ? loc.sign[j * loc.n + r] : 1.0f;
  }
  if (s.kind == kCountMin) {
    const float s0 = sg[0];
    for (int64_t d = 0; d < dim; ++d) out[d] = s0 * row[0][d];
    for (int j = 1; j < p.depth; ++j) {
      const float* rj = row[j];
      const float sj = sg[j];
      for (int64_t d = 0; d < dim; ++d) out[d] = std::min(out[d], sj * rj[d]);
    }
    for (int64_t d = 0; d < dim; ++d) out[d] = std::max(out[d], 0.0f);
  } else if (p.depth == 1) {
    const float s0 = sg[0];
    for (int64_t d = 0; d < dim; ++d) out[d] = s0 * row[0][d];
  } else {
    float v[kMaxDepth];
    for (int64_t d = 0; d < dim; ++d) {
      for (int j = 0; j < p.depth; ++j) v[j] = sg[j] * row[j][d];
      out[d] = Median(v, p.depth);
    }
  }
}

// x = scale * input of slot s for one row (g: gradient row, e0: new estimate
// of slot 0, used by RMSprop's momentum slot only).
template <int kOpt>
void SlotInputRow(const Problem& p, int s, const float* g, const float* e0, float* x) {
  const float scale = p.slots[s].scale;
  const Roles r = p.roles;
  const float* c = p.coefs;
  for (int64_t d = 0; d < p.dim; ++d) x[d] = scale * SlotInput<kOpt>(s, r, g[d], e0[d], c);
}

// Per-thread scratch: est[2] new estimates, x and tmp row buffers.
struct Scratch {
  explicit Scratch(int64_t dim) : buf(4 * std::max<int64_t>(dim, 1)), dim(dim) {}
  float* est(int s) { return buf.data() + s * dim; }
  float* x() { return buf.data() + 2 * dim; }
  float* tmp() { return buf.data() + 3 * dim; }
  std::vector<float> buf;
  int64_t dim;
};

// Does slot s need slot 0's new estimate as input (RMSprop momentum)?
bool NeedsSlot0(const Problem& p, int s) { return p.optimizer == kRMSprop && s == p.roles.m; }

// Dense pass 2 for one row: exact slots decay-and-add in place, sketched
// slots are queried, the parameter row gets its update.
template <int kOpt>
void FinishDenseRow(const Problem& p, const Locations& loc, int64_t i, const float* g,
                    Scratch* sc) {
  const int64_t dim = p.dim;
  for (int s = 0; s < p.num_slots; ++s) {
    const Slot& slot = p.slots[s];
    float* e = sc->est(s);
    if (slot.sketched) {
      QueryRow(p, slot, loc, i, e);
    } else {
      float* x = sc->x();
      SlotInputRow<kOpt>(p, s, g, sc->est(0), x);
      float* X = slot.data + i * dim;
      const float decay = slot.decay;
      for (int64_t d = 0; d < dim; ++d) {
        X[d] = X[d] * decay + x[d];
        e[d] = X[d];
      }
    }
  }
  float* w = p.param + i * dim;
  const float* e0 = sc->est(0);
  const float* e1 = sc->est(p.num_slots > 1 ? 1 : 0);
  const Roles r = p.roles;
  const bool nesterov = p.nesterov;
  const float* c = p.coefs;
  for (int64_t d = 0; d < dim; ++d) w[d] -= ParamDelta<kOpt>(r, nesterov, g[d], e0[d], e1[d], c);
}

// Adds scale*input of row i into its bucket of sketched slot s at depth j.
template <int kOpt>
void AccumulateRow(const Problem& p, int s, const Locations& loc, int j, int64_t i,
                   const float* g, Scratch* sc) {
  const Slot& slot = p.slots[s];
  if (NeedsSlot0(p, s)) QueryRow(p, p.slots[0], loc, i, sc->est(0));
  float* x = sc->x();
  SlotInputRow<kOpt>(p, s, g, sc->est(0), x);
  float* bucket = slot.data + (j * p.width + loc.bucket[j * loc.n + i]) * p.dim;
  const float sign = slot.is_signed ? loc.sign[j * loc.n + i] : 1.0f;
  for (int64_t d = 0; d < p.dim; ++d) bucket[d] += sign * x[d];
}

template <int kOpt>
void DenseStep(OpKernelContext* ctx, const Problem& p, const float* grad) {
  const int64_t rows = p.rows, dim = p.dim;
  const int64_t row_cost = 12 * dim * (1 + p.depth);
  if (!p.any_sketch) {
    Locations none;
    ParallelRange(ctx, rows, row_cost, [&](int64_t lo, int64_t hi) {
      Scratch sc(dim);
      for (int64_t i = lo; i < hi; ++i) FinishDenseRow<kOpt>(p, none, i, grad + i * dim, &sc);
    });
    return;
  }
  Locations loc;
  Locate(ctx, p, nullptr, rows, &loc);
  if (p.depth == 1) {
    // Group rows by bucket (counting sort), then finish each bucket's rows
    // right after accumulating them: a thread owns whole buckets.
    const int64_t width = p.width;
    std::vector<int64_t> start(width + 1, 0), order(rows);
    for (int64_t i = 0; i < rows; ++i) ++start[loc.bucket[i] + 1];
    for (int64_t b = 0; b < width; ++b) start[b + 1] += start[b];
    {
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t i = 0; i < rows; ++i) order[fill[loc.bucket[i]]++] = i;
    }
    const int64_t bucket_cost = row_cost * std::max<int64_t>(1, rows / width);
    ParallelRange(ctx, width, bucket_cost, [&](int64_t lo, int64_t hi) {
      Scratch sc(dim);
      for (int64_t b = lo; b < hi; ++b) {
        for (int s = 0; s < p.num_slots; ++s) {
          const Slot& slot = p.slots[s];
          if (!slot.sketched) continue;
          float* bucket = slot.data + b * dim;
          const float decay = slot.decay;
          for (int64_t d = 0; d < dim; ++d) bucket[d] *= decay;
          for (int64_t k = start[b]; k < start[b + 1]; ++k) {
            const int64_t i = order[k];
            AccumulateRow<kOpt>(p, s, loc, 0, i, grad + i * dim, &sc);
          }
        }
        for (int64_t k = start[b]; k < start[b + 1]; ++k) {
          const int64_t i = order[k];
          FinishDenseRow<kOpt>(p, loc, i, grad + i * dim, &sc);
        }
      }
    });
    return;
  }
  // Depth > 1.  Pass 1, per sketched slot in order: a thread owns a range of
  // the flat [depth * width] buckets, decays them and adds the rows hashed
  // there (it scans the bucket ids of all rows, not their gradients).
  const int64_t total = p.depth * p.width;
  for (int s = 0; s < p.num_slots; ++s) {
    const Slot& slot = p.slots[s];
    if (!slot.sketched) continue;
    const int64_t bucket_cost = row_cost * std::max<int64_t>(1, rows / p.width) + rows / 8;
    ParallelRange(ctx, total, bucket_cost, [&](int64_t lo, int64_t hi) {
      Scratch sc(dim);
      for (int64_t b = lo; b < hi; ++b) {
        float* bucket = slot.data + b * dim;
        for (int64_t d = 0; d < dim; ++d) bucket[d] *= slot.decay;
      }
      for (int j = static_cast<int>(lo / p.width); j < p.depth && j * p.width < hi; ++j) {
        const int64_t blo = std::max<int64_t>(lo - j * p.width, 0);
        const int64_t bhi = std::min<int64_t>(hi - j * p.width, p.width);
        const int64_t* bj = loc.bucket.data() + j * rows;
        for (int64_t i = 0; i < rows; ++i) {
          if (bj[i] >= blo && bj[i] < bhi) AccumulateRow<kOpt>(p, s, loc, j, i, grad + i * dim, &sc);
        }
      }
    });
  }
  // Pass 2: rows.
  ParallelRange(ctx, rows, row_cost, [&](int64_t lo, int64_t hi) {
    Scratch sc(dim);
    for (int64_t i = lo; i < hi; ++i) FinishDenseRow<kOpt>(p, loc, i, grad + i * dim, &sc);
  });
}

template <int kOpt>
void SparseStep(OpKernelContext* ctx, const Problem& p, const float* grad, const int64_t* ids,
                const bool* valid, int64_t k) {
  const int64_t dim = p.dim;
  std::vector<int64_t> rows_used;  // positions r of valid entries
  rows_used.reserve(k);
  for (int64_t r = 0; r < k; ++r)
    if (valid[r]) rows_used.push_back(r);
  const int64_t n = static_cast<int64_t>(rows_used.size());
  if (n == 0) return;
  std::vector<int64_t> used_ids(n);
  for (int64_t q = 0; q < n; ++q) used_ids[q] = ids[rows_used[q]];
  Locations loc;
  if (p.any_sketch) Locate(ctx, p, used_ids.data(), n, &loc);
  // New estimates of every slot for the n rows, and one delta buffer.
  std::vector<float> est(static_cast<size_t>(p.num_slots) * n * dim);
  std::vector<float> delta(static_cast<size_t>(n) * dim);
  auto E = [&](int s, int64_t q) { return est.data() + (s * n + q) * dim; };
  const int64_t row_cost = 12 * dim * (1 + p.depth);
  const float* zeros_row = nullptr;
  std::vector<float> zeros(dim, 0.0f);
  zeros_row = zeros.data();
  for (int s = 0; s < p.num_slots; ++s) {
    const Slot& slot = p.slots[s];
    const bool needs0 = NeedsSlot0(p, s);
    if (!slot.sketched) {
      ParallelRange(ctx, n, row_cost, [&](int64_t lo, int64_t hi) {
        Scratch sc(dim);
        for (int64_t q = lo; q < hi; ++q) {
          const float* g = grad + rows_used[q] * dim;
          float* x = sc.x();
          SlotInputRow<kOpt>(p, s, g, needs0 ? E(0, q) : zeros_row, x);
          float* X = slot.data + used_ids[q] * dim;
          float* e = E(s, q);
          for (int64_t d = 0; d < dim; ++d) {
            X[d] = X[d] + (slot.decay_minus_1 * X[d] + x[d]);
            e[d] = X[d];
          }
        }
      });
      continue;
    }
    // Query all touched rows, compute their deltas...
    ParallelRange(ctx, n, row_cost, [&](int64_t lo, int64_t hi) {
      Scratch sc(dim);
      for (int64_t q = lo; q < hi; ++q) {
        const float* g = grad + rows_used[q] * dim;
        float* prev = sc.tmp();
        QueryRow(p, slot, loc, q, prev);
        float* x = sc.x();
        SlotInputRow<kOpt>(p, s, g, needs0 ? E(0, q) : zeros_row, x);
        float* dl = delta.data() + q * dim;
        for (int64_t d = 0; d < dim; ++d) dl[d] = slot.decay_minus_1 * prev[d] + x[d];
      }
    });
    // ...add them all (threads own bucket ranges: no two write one bucket)...
    ParallelRange(ctx, p.depth * p.width, std::max<int64_t>(1, n * 2 / std::max<int64_t>(p.width, 1)) * dim + 8,
                  [&](int64_t lo, int64_t hi) {
      for (int j = static_cast<int>(lo / p.width); j < p.depth && j * p.width < hi; ++j) {
        const int64_t blo = std::max<int64_t>(lo - j * p.width, 0);
        const int64_t bhi = std::min<int64_t>(hi - j * p.width, p.width);
        const int64_t* bj = loc.bucket.data() + j * n;
        const float* sj = loc.sign.data() + j * n;
        for (int64_t q = 0; q < n; ++q) {
          if (bj[q] < blo || bj[q] >= bhi) continue;
          float* bucket = slot.data + (j * p.width + bj[q]) * dim;
          const float sign = slot.is_signed ? sj[q] : 1.0f;
          const float* dl = delta.data() + q * dim;
          for (int64_t d = 0; d < dim; ++d) bucket[d] += sign * dl[d];
        }
      }
    });
    // ...and query them again.
    ParallelRange(ctx, n, row_cost, [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q) QueryRow(p, slot, loc, q, E(s, q));
    });
  }
  ParallelRange(ctx, n, row_cost, [&](int64_t lo, int64_t hi) {
    const Roles r = p.roles;
    const float* c = p.coefs;
    for (int64_t q = lo; q < hi; ++q) {
      const float* g = grad + rows_used[q] * dim;
      const float* e0 = E(0, q);
      const float* e1 = E(p.num_slots > 1 ? 1 : 0, q);
      float* w = p.param + used_ids[q] * dim;
      for (int64_t d = 0; d < dim; ++d) w[d] -= ParamDelta<kOpt>(r, p.nesterov, g[d], e0[d], e1[d], c);
    }
  });
}

class SketchApplyOp : public OpKernel {
 public:
  SketchApplyOp(OpKernelConstruction* c, bool sparse) : OpKernel(c), sparse_(sparse) {
    OP_REQUIRES_OK(c, c->GetAttr("num_slots", &num_slots_));
    std::string optimizer;
    OP_REQUIRES_OK(c, c->GetAttr("optimizer", &optimizer));
    optimizer_ = IndexOf(kOptimizerNames, kNumOptimizers, optimizer);
    OP_REQUIRES(c, optimizer_ >= 0,
                errors::InvalidArgument("optimizer must be one of ",
                                        Join(kOptimizerNames, kNumOptimizers), ", got '", optimizer, "'"));
    std::vector<std::string> kinds, roles;
    OP_REQUIRES_OK(c, c->GetAttr("slot_kinds", &kinds));
    OP_REQUIRES_OK(c, c->GetAttr("slot_roles", &roles));
    OP_REQUIRES_OK(c, c->GetAttr("rows", &rows_));
    OP_REQUIRES_OK(c, c->GetAttr("nesterov", &nesterov_));
    OP_REQUIRES(c, static_cast<int>(kinds.size()) == num_slots_ &&
                       static_cast<int>(roles.size()) == num_slots_,
                errors::InvalidArgument("slot_kinds and slot_roles need one entry per slot (",
                                        num_slots_, "), got ", kinds.size(), " and ", roles.size()));
    std::vector<int> role_ids;
    for (int s = 0; s < num_slots_; ++s) {
      const int kind = IndexOf(kSlotKindNames, kNumSlotKinds, kinds[s]);
      OP_REQUIRES(c, kind >= 0,
                  errors::InvalidArgument("slot_kinds[", s, "] must be one of ",
                                          Join(kSlotKindNames, kNumSlotKinds), ", got '", kinds[s], "'"));
      const int role = IndexOf(kSlotRoleNames, kNumSlotRoles, roles[s]);
      OP_REQUIRES(c, role >= 0,
                  errors::InvalidArgument("slot_roles[", s, "] must be one of ",
                                          Join(kSlotRoleNames, kNumSlotRoles), ", got '", roles[s], "'"));
      kinds_.push_back(kind);
      role_ids.push_back(role);
    }
    const char* problem = OrderSlots(optimizer_, num_slots_, role_ids.data(), order_, &roles_);
    OP_REQUIRES(c, problem == nullptr,
                errors::InvalidArgument(optimizer, " with slot_roles [", absl::StrJoin(roles, ", "),
                                        "]: ", problem ? problem : ""));
    // RMSprop's sketched momentum reads the new 2nd moment while it is
    // accumulated: that must be a sketch too (as the optimizer builds it).
    OP_REQUIRES(c, !(optimizer_ == kRMSprop && roles_.m >= 0 && kinds_[order_[roles_.m]] != kExact &&
                     kinds_[order_[roles_.v]] == kExact),
                errors::InvalidArgument("a sketched RMSprop momentum needs a sketched 2nd moment"));
  }

  void Compute(OpKernelContext* ctx) override {
    const int n = num_slots_;
    // Every variable is checked before any TensorFlow helper touches it: the
    // locking and copy-on-write helpers read the buffer as float and abort
    // the process (CHECK failure) on any other dtype.
    std::vector<core::RefCountPtr<Var>> vars(n + 1);
    for (int i = 0; i <= n; ++i) {
      OP_REQUIRES_OK(ctx, LookupFloatVariable(ctx, i, &vars[i]));
      for (int j = 0; j < i; ++j)
        OP_REQUIRES(ctx, vars[j].get() != vars[i].get(),
                    errors::InvalidArgument(InputName(j), " and ", InputName(i),
                                            " are the same variable; each must be its own"));
    }
    std::vector<int> var_inputs;
    for (int i = 0; i <= n; ++i) var_inputs.push_back(i);
    auto locks = MaybeLockVariableInputMutexesInOrder<CPUDevice, float>(ctx, true, sparse_, var_inputs);
    // Under the locks: a concurrent assign may have changed a shape, never a dtype.
    Tensor var;
    OP_REQUIRES_OK(ctx, GetInputTensorFromVariable<CPUDevice, float>(ctx, 0, true, sparse_, &var));
    std::vector<Tensor> slots(n);
    for (int s = 0; s < n; ++s)
      OP_REQUIRES_OK(ctx, GetInputTensorFromVariable<CPUDevice, float>(ctx, s + 1, true, sparse_, &slots[s]));
    const Tensor& hash = ctx->input(n + 1);
    const Tensor& grad = ctx->input(n + 2);
    const Tensor& coefs = ctx->input(n + 3);

    Problem p;
    p.optimizer = optimizer_;
    p.nesterov = nesterov_;
    p.num_slots = n;
    p.roles = roles_;
    p.rows = rows_;
    // --- validation: nothing is written before every check passed ---
    OP_REQUIRES(ctx, var.IsInitialized() && var.dtype() == DT_FLOAT,
                errors::InvalidArgument("var must be an initialized float32 variable"));
    OP_REQUIRES(ctx, grad.dims() == 2,
                errors::InvalidArgument("grad must be 2-D, got shape ", grad.shape().DebugString()));
    p.dim = grad.dim_size(1);
    // rows * dim is compared with the variable's size only once it is known
    // not to overflow (rows = 2^62, dim = 4 would wrap around to 0).
    OP_REQUIRES(ctx, p.dim == 0 || rows_ <= std::numeric_limits<int64_t>::max() / p.dim,
                errors::InvalidArgument("rows * dim = ", rows_, " * ", p.dim, " overflows int64"));
    OP_REQUIRES(ctx, var.NumElements() == rows_ * p.dim,
                errors::InvalidArgument("var has ", var.NumElements(), " elements, expected rows * dim = ",
                                        rows_, " * ", p.dim));
    if (!sparse_) {
      OP_REQUIRES(ctx, grad.dim_size(0) == rows_,
                  errors::InvalidArgument("grad must be [rows, dim] = [", rows_, ", ", p.dim,
                                          "], got ", grad.shape().DebugString()));
    }
    OP_REQUIRES(ctx, coefs.dims() == 1 && coefs.NumElements() == 2 + 3 * n,
                errors::InvalidArgument("coefs must be a vector of ", 2 + 3 * n, " floats, got ",
                                        coefs.shape().DebugString()));
    OP_REQUIRES(ctx, hash.dims() == 2 && hash.dim_size(1) == 4 && hash.dim_size(0) >= 1 &&
                         hash.dim_size(0) <= kMaxDepth,
                errors::InvalidArgument("hash must be [depth, 4] with 1 <= depth <= ", kMaxDepth,
                                        ", got ", hash.shape().DebugString()));
    p.depth = static_cast<int>(hash.dim_size(0));
    p.hash = hash.flat<int64_t>().data();
    for (int64_t e = 0; e < hash.NumElements(); ++e)
      OP_REQUIRES(ctx, p.hash[e] >= 0 && p.hash[e] < kPrime,
                  errors::InvalidArgument("hash coefficients must lie in [0, 2^31 - 1)"));
    p.coefs = coefs.flat<float>().data();
    p.width = -1;
    for (int position = 0; position < n; ++position) {
      const int s = order_[position];  // the input index: names, kinds, coefficients
      Slot& slot = p.slots[position];
      const Tensor& t = slots[s];
      OP_REQUIRES(ctx, t.IsInitialized() && t.dtype() == DT_FLOAT,
                  errors::InvalidArgument("slot ", s, " must be an initialized float32 variable"));
      slot.input = s;
      slot.kind = kinds_[s];
      slot.data = const_cast<float*>(t.flat<float>().data());
      slot.decay = p.coefs[2 + 3 * s];
      slot.scale = p.coefs[3 + 3 * s];
      slot.decay_minus_1 = p.coefs[4 + 3 * s];
      if (slot.kind == kExact) {
        OP_REQUIRES(ctx, t.dims() == 2 && t.dim_size(0) == rows_ && t.dim_size(1) == p.dim,
                    errors::InvalidArgument("exact slot ", s, " must be [", rows_, ", ", p.dim,
                                            "], got ", t.shape().DebugString()));
        continue;
      }
      slot.sketched = true;
      p.any_sketch = true;
      OP_REQUIRES(ctx, t.dims() == 3 && t.dim_size(0) == p.depth && t.dim_size(2) == p.dim &&
                           t.dim_size(1) >= 1,
                  errors::InvalidArgument("sketch slot ", s, " must be [depth=", p.depth,
                                          ", width, dim=", p.dim, "], got ", t.shape().DebugString()));
      OP_REQUIRES(ctx, p.width < 0 || p.width == t.dim_size(1),
                  errors::InvalidArgument("sketches of one variable must have one width"));
      p.width = t.dim_size(1);
    }
    if (p.any_sketch) {
      p.identity = p.width >= rows_;
      OP_REQUIRES(ctx, !p.identity || (p.depth == 1 && p.width == rows_),
                  errors::InvalidArgument("an identity sketch (width >= rows) must be [1, rows, dim]"));
      for (int s = 0; s < n; ++s)
        p.slots[s].is_signed = p.slots[s].sketched && p.slots[s].kind == kCountSketch && !p.identity;
    } else {
      p.depth = 1;
    }
    p.param = var.flat<float>().data();
    const float* g = grad.flat<float>().data();

    if (!sparse_) {
      Dispatch(ctx, p, g, nullptr, nullptr, 0);
      return;
    }
    const Tensor& ids = ctx->input(n + 4);
    const Tensor& valid = ctx->input(n + 5);
    const int64_t k = grad.dim_size(0);
    OP_REQUIRES(ctx, ids.dims() == 1 && ids.dim_size(0) == k && valid.dims() == 1 &&
                         valid.dim_size(0) == k,
                errors::InvalidArgument("ids and valid must be vectors of length ", k,
                                        " (grad rows), got ", ids.shape().DebugString(), " and ",
                                        valid.shape().DebugString()));
    const int64_t* id = ids.flat<int64_t>().data();
    const bool* ok = valid.flat<bool>().data();
    std::vector<int64_t> sorted;
    sorted.reserve(k);
    for (int64_t r = 0; r < k; ++r) {
      if (!ok[r]) continue;
      OP_REQUIRES(ctx, id[r] >= 0 && id[r] < rows_,
                  errors::InvalidArgument("ids[", r, "] = ", id[r], " is not in [0, ", rows_, ")"));
      sorted.push_back(id[r]);
    }
    std::sort(sorted.begin(), sorted.end());
    OP_REQUIRES(ctx, std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end(),
                errors::InvalidArgument("ids must be unique (merge duplicates first)"));
    Dispatch(ctx, p, g, id, ok, k);
  }

 private:
  void Dispatch(OpKernelContext* ctx, const Problem& p, const float* g, const int64_t* ids,
                const bool* valid, int64_t k) {
    if (p.rows == 0 || p.dim == 0) return;
    // The kernels allocate their temporaries (bucket ids, orders, estimates)
    // on this thread before writing anything; running out of memory there is
    // an error, not a crash, and leaves every variable as it was.
    try {
      switch (p.optimizer) {
        case kAdam: Run<kAdam>(ctx, p, g, ids, valid, k); break;
        case kAdagrad: Run<kAdagrad>(ctx, p, g, ids, valid, k); break;
        case kMomentum: Run<kMomentum>(ctx, p, g, ids, valid, k); break;
        default: Run<kRMSprop>(ctx, p, g, ids, valid, k); break;
      }
    } catch (const std::bad_alloc&) {
      ctx->SetStatus(errors::ResourceExhausted("keras_sketch: out of memory for the step's temporaries"));
    } catch (const std::length_error&) {
      ctx->SetStatus(errors::ResourceExhausted("keras_sketch: the step's temporaries are too large"));
    }
  }

  std::string InputName(int i) const {
    return i == 0 ? std::string("var") : "slot " + std::to_string(i - 1);
  }

  // The variable behind resource input `i`, if it is an initialized float32
  // variable (read from the Var itself, not through a helper that copies it).
  absl::Status LookupFloatVariable(OpKernelContext* ctx, int i, core::RefCountPtr<Var>* out) {
    absl::Status status = LookupResource(ctx, HandleFromInput(ctx, i), out);
    if (!status.ok())
      return errors::InvalidArgument(InputName(i), " is not an existing variable: ", status.message());
    Var* v = out->get();
    tf_shared_lock l(*v->mu());
    if (!v->is_initialized || !v->tensor()->IsInitialized())
      return errors::InvalidArgument(InputName(i), " is an uninitialized variable");
    if (v->tensor()->dtype() != DT_FLOAT)
      return errors::InvalidArgument(InputName(i), " must be a float32 variable, got ",
                                     DataTypeString(v->tensor()->dtype()));
    return absl::OkStatus();
  }
  template <int kOpt>
  void Run(OpKernelContext* ctx, const Problem& p, const float* g, const int64_t* ids,
           const bool* valid, int64_t k) {
    if (sparse_) {
      SparseStep<kOpt>(ctx, p, g, ids, valid, k);
    } else {
      DenseStep<kOpt>(ctx, p, g);
    }
  }

  bool sparse_;
  int num_slots_ = 0;
  int optimizer_ = kAdam;
  std::vector<int> kinds_;  // by input index
  int order_[KS_MAX_SLOTS] = {0, 0};  // processing position -> input index
  Roles roles_;             // processing positions of m and v
  int64_t rows_ = 0;
  bool nesterov_ = false;
};

class DenseApplyOp : public SketchApplyOp {
 public:
  explicit DenseApplyOp(OpKernelConstruction* c) : SketchApplyOp(c, false) {}
};
class SparseApplyOp : public SketchApplyOp {
 public:
  explicit SparseApplyOp(OpKernelConstruction* c) : SketchApplyOp(c, true) {}
};

REGISTER_KERNEL_BUILDER(
    Name("KerasSketchDenseApply").Device(DEVICE_CPU).TypeConstraint<float>("T"), DenseApplyOp);
REGISTER_KERNEL_BUILDER(
    Name("KerasSketchSparseApply").Device(DEVICE_CPU).TypeConstraint<float>("T"), SparseApplyOp);

}  // namespace
}  // namespace tensorflow
