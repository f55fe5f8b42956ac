// keras_sketch fused sketched-optimizer step: CUDA kernels behind the plain C
// launcher of sketch_update_launcher.h.  Same math as the CPU kernels
// (sketch_math.h).
//
// Layout: one thread block per row (grid-stride over rows), its threads
// stride over `dim`, so any dim works (1, 7, 33, 4097, ...): no element is
// skipped and no shape assumption is made.  The block computes its row's
// buckets and signs once into shared memory.  Bucket accumulation uses
// atomicAdd on global memory: rows hashed to one bucket never race.
//
// Dense: per sketched slot, decay the table, then atomically add every row's
// scale*input; then one pass queries, updates exact slots and the parameter.
// Sparse: per slot, compute per-row deltas from the previous estimates (all
// rows first), atomically add them, query again; then update the parameters.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "sketch_math.h"
#include "sketch_update_launcher.h"

namespace keras_sketch {
namespace {

struct Args {
  ks_problem p;
  Roles roles;
  bool identity;
  bool is_signed[KS_MAX_SLOTS];
};

struct RowLoc {
  int64_t bucket[kMaxDepth];
  float sign[kMaxDepth];
};

// Thread 0 of the block locates row `id`; all threads wait.
__device__ void LocateRow(const Args& a, int64_t id, RowLoc* loc) {
  __syncthreads();  // previous row's readers are done
  if (threadIdx.x == 0) {
    for (int j = 0; j < a.p.depth; ++j) {
      loc->bucket[j] = a.identity ? id : HashBucket(a.p.hash[j], id, a.p.width);
      loc->sign[j] = a.identity ? 1.0f : HashSign(a.p.hash[j], id);
    }
  }
  __syncthreads();
}

__device__ float QueryElem(const Args& a, int s, const RowLoc& loc, int64_t d) {
  const float* table = a.p.slot[s];
  const int kind = a.p.slot_kind[s];
  const int64_t dim = a.p.dim;
  float v[kMaxDepth];
  for (int j = 0; j < a.p.depth; ++j) {
    const float sg = a.is_signed[s] ? loc.sign[j] : 1.0f;
    v[j] = sg * table[(j * a.p.width + loc.bucket[j]) * dim + d];
  }
  if (kind == kCountMin) {
    float m = v[0];
    for (int j = 1; j < a.p.depth; ++j) m = fminf(m, v[j]);
    return fmaxf(m, 0.0f);
  }
  return a.p.depth == 1 ? v[0] : Median(v, a.p.depth);
}


__global__ void ScaleKernel(float* table, int64_t n, float factor) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    table[i] *= factor;
}

template <int kOpt>
__global__ void DenseAccumulateKernel(Args a, int s, const float* grad) {
  __shared__ RowLoc loc;
  const int64_t dim = a.p.dim;
  const float scale = a.p.coefs[3 + 3 * s];
  const bool needs0 = kOpt == kRMSprop && s == a.roles.m;
  for (int64_t i = blockIdx.x; i < a.p.rows; i += gridDim.x) {
    LocateRow(a, i, &loc);
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      const float e0 = needs0 ? QueryElem(a, 0, loc, d) : 0.0f;
      const float x = scale * SlotInput<kOpt>(s, a.roles, grad[i * dim + d], e0, a.p.coefs);
      for (int j = 0; j < a.p.depth; ++j) {
        const float sg = a.is_signed[s] ? loc.sign[j] : 1.0f;
        atomicAdd(a.p.slot[s] + (j * a.p.width + loc.bucket[j]) * dim + d, sg * x);
      }
    }
  }
}

template <int kOpt>
__global__ void DenseFinishKernel(Args a, const float* grad) {
  __shared__ RowLoc loc;
  const int64_t dim = a.p.dim;
  for (int64_t i = blockIdx.x; i < a.p.rows; i += gridDim.x) {
    LocateRow(a, i, &loc);
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      const float g = grad[i * dim + d];
      float e[KS_MAX_SLOTS] = {0.0f, 0.0f};
      for (int s = 0; s < a.p.num_slots; ++s) {
        if (a.p.slot_kind[s] == kExact) {
          float* X = a.p.slot[s] + i * dim + d;
          const float x = a.p.coefs[3 + 3 * s] * SlotInput<kOpt>(s, a.roles, g, e[0], a.p.coefs);
          *X = *X * a.p.coefs[2 + 3 * s] + x;
          e[s] = *X;
        } else {
          e[s] = QueryElem(a, s, loc, d);
        }
      }
      a.p.param[i * dim + d] -=
          ParamDelta<kOpt>(a.roles, a.p.nesterov, g, e[0], e[a.p.num_slots > 1 ? 1 : 0], a.p.coefs);
    }
  }
}

__device__ bool RowOk(const Args& a, const int64_t* ids, const uint8_t* valid, int64_t q) {
  return valid[q] && ids[q] >= 0 && ids[q] < a.p.rows;
}

// Sparse, sketched slot s: delta[q] = (decay-1)*prev + scale*input.
template <int kOpt>
__global__ void SparseDeltaKernel(Args a, int s, const float* grad, const int64_t* ids,
                                  const uint8_t* valid, int64_t k, const float* est, float* delta) {
  __shared__ RowLoc loc;
  const int64_t dim = a.p.dim;
  const float scale = a.p.coefs[3 + 3 * s], dm1 = a.p.coefs[4 + 3 * s];
  for (int64_t q = blockIdx.x; q < k; q += gridDim.x) {
    if (!RowOk(a, ids, valid, q)) continue;  // uniform per block
    LocateRow(a, ids[q], &loc);
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      const float e0 = est[q * dim + d];  // slot 0's new estimate (written before)
      const float x = scale * SlotInput<kOpt>(s, a.roles, grad[q * dim + d], e0, a.p.coefs);
      delta[q * dim + d] = dm1 * QueryElem(a, s, loc, d) + x;
    }
  }
}

__global__ void SparseAddKernel(Args a, int s, const int64_t* ids, const uint8_t* valid, int64_t k,
                                const float* delta) {
  __shared__ RowLoc loc;
  const int64_t dim = a.p.dim;
  for (int64_t q = blockIdx.x; q < k; q += gridDim.x) {
    if (!RowOk(a, ids, valid, q)) continue;
    LocateRow(a, ids[q], &loc);
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x)
      for (int j = 0; j < a.p.depth; ++j) {
        const float sg = a.is_signed[s] ? loc.sign[j] : 1.0f;
        atomicAdd(a.p.slot[s] + (j * a.p.width + loc.bucket[j]) * dim + d, sg * delta[q * dim + d]);
      }
  }
}

// Sparse: new estimates of slot s (exact slots are updated here too).
template <int kOpt>
__global__ void SparseQueryKernel(Args a, int s, const float* grad, const int64_t* ids,
                                  const uint8_t* valid, int64_t k, float* est) {
  __shared__ RowLoc loc;
  const int64_t dim = a.p.dim;
  float* out = est + s * k * dim;
  for (int64_t q = blockIdx.x; q < k; q += gridDim.x) {
    if (!RowOk(a, ids, valid, q)) continue;
    const int64_t id = ids[q];
    LocateRow(a, id, &loc);
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      if (a.p.slot_kind[s] == kExact) {
        float* X = a.p.slot[s] + id * dim + d;
        const float x = a.p.coefs[3 + 3 * s] *
                        SlotInput<kOpt>(s, a.roles, grad[q * dim + d], est[q * dim + d], a.p.coefs);
        *X = *X + (a.p.coefs[4 + 3 * s] * *X + x);
        out[q * dim + d] = *X;
      } else {
        out[q * dim + d] = QueryElem(a, s, loc, d);
      }
    }
  }
}

template <int kOpt>
__global__ void SparseParamKernel(Args a, const float* grad, const int64_t* ids,
                                  const uint8_t* valid, int64_t k, const float* est) {
  const int64_t dim = a.p.dim;
  const float* e1 = est + (a.p.num_slots > 1 ? k * dim : 0);
  for (int64_t q = blockIdx.x; q < k; q += gridDim.x) {
    if (!RowOk(a, ids, valid, q)) continue;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      const int64_t e = q * dim + d;
      a.p.param[ids[q] * dim + d] -=
          ParamDelta<kOpt>(a.roles, a.p.nesterov, grad[e], est[e], e1[e], a.p.coefs);
    }
  }
}

// Validates the problem and copies it into `a` with its slots in processing
// order (OrderSlots: from the roles the caller declared, never from their
// positions), so the kernels index slots by processing position.
int Check(const ks_problem* p, Args* a) {
  if (!p || !p->param || p->rows < 0 || p->dim < 0 || p->num_slots < 1 ||
      p->num_slots > KS_MAX_SLOTS || p->optimizer < 0 || p->optimizer >= kNumOptimizers)
    return KS_EINVAL;
  const int64_t kMax = INT64_MAX;
  if (p->dim > 0 && p->rows > kMax / p->dim) return KS_EINVAL;  // rows * dim overflows
  int order[KS_MAX_SLOTS];
  if (OrderSlots(p->optimizer, p->num_slots, p->slot_role, order, &a->roles) != nullptr)
    return KS_EINVAL;
  a->p = *p;
  bool any_sketch = false;
  for (int pos = 0; pos < p->num_slots; ++pos) {
    const int s = order[pos];
    if (!p->slot[s] || p->slot_kind[s] < 0 || p->slot_kind[s] >= kNumSlotKinds) return KS_EINVAL;
    a->p.slot[pos] = p->slot[s];
    a->p.slot_kind[pos] = p->slot_kind[s];
    a->p.slot_role[pos] = p->slot_role[s];
    for (int c = 0; c < 3; ++c) a->p.coefs[2 + 3 * pos + c] = p->coefs[2 + 3 * s + c];
    any_sketch |= p->slot_kind[s] != kExact;
  }
  if (any_sketch) {
    if (p->depth < 1 || p->depth > kMaxDepth || p->width < 1) return KS_EINVAL;
    if (p->dim > 0 && p->width > kMax / (p->depth * p->dim)) return KS_EINVAL;
    if (p->width >= p->rows && (p->depth != 1 || p->width != p->rows)) return KS_EINVAL;
    for (int j = 0; j < p->depth; ++j)
      for (int c = 0; c < 4; ++c)
        if (p->hash[j][c] < 0 || p->hash[j][c] >= kPrime) return KS_EINVAL;
    const Roles& r = a->roles;
    if (p->optimizer == kRMSprop && r.m >= 0 && a->p.slot_kind[r.m] != kExact &&
        a->p.slot_kind[r.v] == kExact)
      return KS_EINVAL;
  } else {
    a->p.depth = 1;
    a->p.width = p->rows;
  }
  a->identity = a->p.width >= p->rows;
  for (int s = 0; s < KS_MAX_SLOTS; ++s)
    a->is_signed[s] = s < p->num_slots && a->p.slot_kind[s] == kCountSketch && !a->identity;
  return 0;
}

int Threads(int64_t dim) { return static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (dim + 31) / 32 * 32))); }
int Blocks(int64_t n) { return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, 65535))); }

template <int kOpt>
int Dense(const Args& a, const float* grad, cudaStream_t st) {
  const int threads = Threads(a.p.dim), blocks = Blocks(a.p.rows);
  for (int s = 0; s < a.p.num_slots; ++s) {
    if (a.p.slot_kind[s] == kExact) continue;
    const int64_t n = a.p.depth * a.p.width * a.p.dim;
    ScaleKernel<<<Blocks((n + 255) / 256), 256, 0, st>>>(a.p.slot[s], n, a.p.coefs[2 + 3 * s]);
    DenseAccumulateKernel<kOpt><<<blocks, threads, 0, st>>>(a, s, grad);
  }
  DenseFinishKernel<kOpt><<<blocks, threads, 0, st>>>(a, grad);
  return static_cast<int>(cudaGetLastError());
}

template <int kOpt>
int Sparse(const Args& a, const float* grad, const int64_t* ids, const uint8_t* valid, int64_t k,
           float* ws, cudaStream_t st) {
  float* est = ws;                              // [num_slots, k, dim]
  float* delta = ws + a.p.num_slots * k * a.p.dim;  // [k, dim]
  const int threads = Threads(a.p.dim), blocks = Blocks(k);
  for (int s = 0; s < a.p.num_slots; ++s) {
    if (a.p.slot_kind[s] != kExact) {
      SparseDeltaKernel<kOpt><<<blocks, threads, 0, st>>>(a, s, grad, ids, valid, k, est, delta);
      SparseAddKernel<<<blocks, threads, 0, st>>>(a, s, ids, valid, k, delta);
    }
    SparseQueryKernel<kOpt><<<blocks, threads, 0, st>>>(a, s, grad, ids, valid, k, est);
  }
  SparseParamKernel<kOpt><<<blocks, threads, 0, st>>>(a, grad, ids, valid, k, est);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace keras_sketch

using namespace keras_sketch;  // NOLINT

extern "C" int ks_dense_apply(const ks_problem* problem, const float* grad, void* stream) {
  Args a;
  if (int rc = Check(problem, &a)) return rc;
  if (!grad) return KS_EINVAL;
  if (a.p.rows == 0 || a.p.dim == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (a.p.optimizer) {
    case kAdam: return Dense<kAdam>(a, grad, st);
    case kAdagrad: return Dense<kAdagrad>(a, grad, st);
    case kMomentum: return Dense<kMomentum>(a, grad, st);
    default: return Dense<kRMSprop>(a, grad, st);
  }
}

extern "C" size_t ks_sparse_workspace_bytes(const ks_problem* problem, int64_t k) {
  // 0 for invalid arguments or a size that does not fit size_t.
  if (!problem || k < 0 || problem->dim < 0 || problem->num_slots < 1 ||
      problem->num_slots > KS_MAX_SLOTS)
    return 0;
  const size_t per_row = sizeof(float) * static_cast<size_t>(problem->num_slots + 1);
  const size_t rows = static_cast<size_t>(k), dim = static_cast<size_t>(problem->dim);
  if (dim && rows > SIZE_MAX / dim) return 0;
  if (rows * dim > SIZE_MAX / per_row) return 0;
  return per_row * rows * dim;
}

extern "C" int ks_sparse_apply(const ks_problem* problem, const float* grad, const int64_t* ids,
                               const uint8_t* valid, int64_t k, void* workspace, void* stream) {
  Args a;
  if (int rc = Check(problem, &a)) return rc;
  if (k < 0 || (k > 0 && (!grad || !ids || !valid || !workspace))) return KS_EINVAL;
  if (k == 0 || a.p.rows == 0 || a.p.dim == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  float* ws = static_cast<float*>(workspace);
  switch (a.p.optimizer) {
    case kAdam: return Sparse<kAdam>(a, grad, ids, valid, k, ws, st);
    case kAdagrad: return Sparse<kAdagrad>(a, grad, ids, valid, k, ws, st);
    case kMomentum: return Sparse<kMomentum>(a, grad, ids, valid, k, ws, st);
    default: return Sparse<kRMSprop>(a, grad, ids, valid, k, ws, st);
  }
}

extern "C" int ks_device_count(int* count) { return static_cast<int>(cudaGetDeviceCount(count)); }
extern "C" int ks_malloc(void** ptr, size_t bytes) { return static_cast<int>(cudaMalloc(ptr, bytes)); }
extern "C" int ks_free(void* ptr) { return static_cast<int>(cudaFree(ptr)); }
extern "C" int ks_memcpy_to_device(void* dst, const void* src, size_t bytes) {
  return static_cast<int>(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}
extern "C" int ks_memcpy_to_host(void* dst, const void* src, size_t bytes) {
  return static_cast<int>(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}
extern "C" int ks_synchronize(void) { return static_cast<int>(cudaDeviceSynchronize()); }
extern "C" int ks_time_dense(const ks_problem* problem, const float* grad, int iters, float* ms) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  cudaEventRecord(start, 0);
  int rc = 0;
  for (int i = 0; i < iters && rc == 0; ++i) rc = ks_dense_apply(problem, grad, nullptr);
  cudaEventRecord(stop, 0);
  cudaEventSynchronize(stop);
  cudaEventElapsedTime(ms, start, stop);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return rc;
}
