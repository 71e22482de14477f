// One pass per row of the "predict the model" metrics (lens/prediction/scoring.py):
//
//   m      [..., P, V] float32  the model's log-probs, one row per position
//   table  [..., U, V] float32  the predictor's log-probs, one row per distinct context
//   index  [..., P]    int32    position p reads table row index[p]
// gives
//   m_val  [..., P, k] float32  the model's top-k log-probs (descending; ties: lower id first)
//   m_idx  [..., P, k] int32    their token ids
//   p_on_m [..., P, k] float32  max(table[index[p], m_idx], floor)
//   kl     [..., P]    float32  sum_v exp(m) * (m - max(table[index[p]], floor))  (not clamped)
//   p_idx  [..., U, k] int32    top-k ids of max(table row, floor), for the rows some position
//                               reads; -1 for the rows none reads (never looked at)
// The leading dims (jax.vmap's batch) must agree; a batch element's index reads its own table.
//
// Why: XLA:CPU runs the same metrics as several passes (top-k, exp, a row reduction that is not
// vectorised well, the gathered predictor row), ~25 ns per element of m on this machine; here each
// row of m is read once, exp is a 16-lane polynomial, and the top-k keeps k <= 64 sorted entries,
// touched only by an element above the current k-th (a vector compare per 16 elements).
// -0.0 ties with +0.0 (values come back as +0.0), as in lens.prediction.scoring.top_k.
// Built by lens/kernels/build.py on first use (host compiler, -march=native); needs AVX-512F
// (every intrinsic here is AVX-512F; lens/kernels/prediction_rows.py checks the CPU for it).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxK = 64;
constexpr int64_t kRowsPerTask = 32;

// exp(x) for log-probs, ~1 ulp: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 Taylor polynomial in r,
// scaled by 2^n.  x is clamped below at -87 (exp(-87) = 1.6e-38, the smallest normal range):
// no denormals, and exp(-inf) stays finite, so -inf * 0 gives NaN exactly where XLA's does.
inline __m512 exp16(__m512 x) {
  // (constant first: MAXPS / MINPS return the second operand when either is NaN, so NaN stays NaN)
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
  x = _mm512_min_ps(_mm512_set1_ps(88.5f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 lanes(int64_t j, int64_t v) {
  return j + 16 <= v ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (v - j)) - 1);
}

// The k largest values seen so far, sorted descending; elements arrive in increasing id order,
// so an element equal to a kept one ranks below it (ties: lower id first).
struct TopK {
  int64_t k, count = 0;
  float val[kMaxK];
  int32_t idx[kMaxK];

  explicit TopK(int64_t k_) : k(k_) {}
  bool full() const { return count == k; }
  float kth() const { return val[k - 1]; }
  void push(float v, int32_t i) {
    v += 0.0f;  // -0.0 -> +0.0
    if (full() && !(v > val[k - 1])) return;
    int64_t pos = full() ? k - 1 : count++;
    while (pos > 0 && val[pos - 1] < v) {
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    val[pos] = v;
    idx[pos] = i;
  }
  // Offer lanes `mask` of x (ids j, j + 1, ...): until full every lane, then only lanes above
  // the current k-th value (one vector compare; the threshold rises as entries arrive).
  void offer(__m512 x, __mmask16 mask, int64_t j) {
    if (!full()) {
      alignas(64) float buf[16];
      _mm512_store_ps(buf, x);
      for (int l = 0; l < 16; ++l)
        if (mask >> l & 1) push(buf[l], static_cast<int32_t>(j + l));
      return;
    }
    mask &= _mm512_cmp_ps_mask(x, _mm512_set1_ps(val[k - 1]), _CMP_GT_OQ);
    if (!mask) return;
    alignas(64) float buf[16];
    _mm512_store_ps(buf, x);
    while (mask) {
      const int l = __builtin_ctz(mask);
      mask &= mask - 1;
      push(buf[l], static_cast<int32_t>(j + l));
    }
  }
};

struct Job {
  const float* m;
  const float* table;
  const int32_t* index;  // already offset to table rows of the whole buffer (b * U + index)
  float* m_val;
  int32_t* m_idx;
  float* p_on_m;
  float* kl;
  int32_t* p_idx;
  int64_t V, k;
  float floor;
};

void model_row(const Job& J, int64_t row) {
  const float* mr = J.m + row * J.V;
  const float* tr = J.table + static_cast<int64_t>(J.index[row]) * J.V;
  const __m512 floor = _mm512_set1_ps(J.floor);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
  TopK top(J.k);
  int64_t j = 0;
  for (; j + 32 <= J.V; j += 32) {  // two vectors per step: two independent accumulators
    const __m512 x0 = _mm512_loadu_ps(mr + j), x1 = _mm512_loadu_ps(mr + j + 16);
    const __m512 t0 = _mm512_max_ps(floor, _mm512_loadu_ps(tr + j));
    const __m512 t1 = _mm512_max_ps(floor, _mm512_loadu_ps(tr + j + 16));
    acc0 = _mm512_fmadd_ps(exp16(x0), _mm512_sub_ps(x0, t0), acc0);
    acc1 = _mm512_fmadd_ps(exp16(x1), _mm512_sub_ps(x1, t1), acc1);
    top.offer(x0, 0xFFFF, j);
    top.offer(x1, 0xFFFF, j + 16);
  }
  for (; j < J.V; j += 16) {
    const __mmask16 mk = lanes(j, J.V);
    const __m512 x = _mm512_maskz_loadu_ps(mk, mr + j);
    const __m512 t = _mm512_max_ps(floor, _mm512_maskz_loadu_ps(mk, tr + j));
    acc0 = _mm512_mask3_fmadd_ps(exp16(x), _mm512_sub_ps(x, t), acc0, mk);
    top.offer(x, mk, j);
  }
  J.kl[row] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (int64_t i = 0; i < J.k; ++i) {
    J.m_val[row * J.k + i] = top.val[i];
    J.m_idx[row * J.k + i] = top.idx[i];
    J.p_on_m[row * J.k + i] = std::max(tr[top.idx[i]], J.floor);
  }
}

void table_row(const Job& J, int64_t row) {
  const float* tr = J.table + row * J.V;
  const __m512 floor = _mm512_set1_ps(J.floor);
  TopK top(J.k);
  for (int64_t j = 0; j < J.V; j += 16) {
    const __mmask16 mk = lanes(j, J.V);
    top.offer(_mm512_max_ps(floor, _mm512_maskz_loadu_ps(mk, tr + j)), mk, j);
  }
  for (int64_t i = 0; i < J.k; ++i) J.p_idx[row * J.k + i] = top.idx[i];
}

ffi::Error PredictionRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> table,
                          ffi::Buffer<ffi::S32> index, ffi::ResultBuffer<ffi::F32> m_val,
                          ffi::ResultBuffer<ffi::S32> m_idx, ffi::ResultBuffer<ffi::F32> p_on_m,
                          ffi::ResultBuffer<ffi::F32> kl, ffi::ResultBuffer<ffi::S32> p_idx, int64_t k,
                          float floor) {
  auto md = m.dimensions();
  auto td = table.dimensions();
  auto id = index.dimensions();
  const size_t r = md.size();
  bool ok = r >= 2 && td.size() == r && id.size() == r - 1 && md[r - 1] == td[r - 1] && id[r - 2] == md[r - 2];
  for (size_t i = 0; ok && i + 2 < r; ++i) ok = md[i] == td[i] && md[i] == id[i];
  if (!ok || k < 1 || k > kMaxK || k > md[r - 1]) {
    return ffi::Error::InvalidArgument(
        "lens_prediction_rows: expected m [..., P, V], table [..., U, V], index [..., P], 1 <= k <= min(64, V)");
  }
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < r; ++i) batch *= md[i];
  const int64_t P = md[r - 2], V = md[r - 1], U = td[r - 2];
  const int32_t* idx_in = index.typed_data();
  // Table rows some position reads (the only ones whose top-k is needed) and the global row of
  // each position; an index outside [0, U) is an error, never a read out of bounds.
  auto rows = std::make_shared<std::vector<int32_t>>(batch * P);
  std::vector<uint8_t> used(batch * U, 0);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t p = 0; p < P; ++p) {
      const int32_t u = idx_in[b * P + p];
      if (u < 0 || u >= U) return ffi::Error::InvalidArgument("lens_prediction_rows: index outside [0, U)");
      (*rows)[b * P + p] = static_cast<int32_t>(b * U + u);
      used[b * U + u] = 1;
    }
  }
  auto table_rows = std::make_shared<std::vector<int64_t>>();
  for (int64_t u = 0; u < batch * U; ++u) {
    if (used[u]) {
      table_rows->push_back(u);
    } else {
      std::fill_n(p_idx->typed_data() + u * k, k, -1);
    }
  }
  const Job J{m.typed_data(), table.typed_data(), rows->data(), m_val->typed_data(), m_idx->typed_data(),
              p_on_m->typed_data(), kl->typed_data(), p_idx->typed_data(), V, k, floor};
  const int64_t model_tasks = (batch * P + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t n_table = static_cast<int64_t>(table_rows->size());
  const int64_t tasks = model_tasks + (n_table + kRowsPerTask - 1) / kRowsPerTask;
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  auto state = std::make_shared<State>();
  const int64_t n_rows = batch * P;
  // Tasks are taken from one counter by this thread and by helpers on XLA's intra-op pool;
  // whoever is free takes the next, so a busy or descheduled pool thread only delays the task
  // it holds.  The state is shared: a helper may start after this call has returned.
  auto work = [=] {
    for (int64_t c; (c = state->next.fetch_add(1)) < tasks;) {
      if (c < model_tasks) {
        for (int64_t i = c * kRowsPerTask, e = std::min(n_rows, i + kRowsPerTask); i < e; ++i) model_row(J, i);
      } else {
        const int64_t s = (c - model_tasks) * kRowsPerTask;
        for (int64_t i = s, e = std::min(n_table, s + kRowsPerTask); i < e; ++i) table_row(J, (*table_rows)[i]);
      }
      state->finished.fetch_add(1, std::memory_order_release);
    }
    (void)rows;  // keeps the row map alive for late helpers
  };
  // this thread + (pool size - 1) helpers: as many workers as the pool has threads
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, tasks - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  // Wait for the tasks other threads are in the middle of: spin briefly, then yield the core
  // (on a loaded machine the thread we wait for may need it).
  for (int spins = 0; state->finished.load(std::memory_order_acquire) < tasks; ++spins) {
    if (spins < 4096) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LensPredictionRows, PredictionRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<float>("floor"));
