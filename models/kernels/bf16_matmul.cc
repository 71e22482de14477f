// y[b, n] = sum_k x[b, k] * w[k, n] for float32 x [B, K], bfloat16 w [K, N], float32 y [B, N].
//
// Why this exists (docs/generation.md): XLA:CPU has no bfloat16 dot.  It converts every bf16
// weight to a float32 copy before the dot (no flag tried, oneDNN / XNNPACK / YNNPACK, changes
// that), and inside the decode loop it hoists those converts out of the loop, so a bf16 decode
// step reads the same float32 bytes as a float32 one.  This kernel reads the bf16 weight once,
// widens it in registers (bf16 -> f32 is a 16-bit shift) and accumulates in float32, so a
// batch-1 decode step streams half the bytes.
//
// Built by models/bf16_kernel.py with the host compiler (-march=native); needs AVX-512.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 8;  // rows of w per pass over y (fewer y loads/stores per weight)

inline __m512 widen(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __mmask16 tail_mask(int64_t n, int64_t n1) {
  return n + 16 <= n1 ? static_cast<__mmask16>(0xFFFF)
                      : static_cast<__mmask16>((1u << (n1 - n)) - 1);
}

// y[:, n:n+16] += x[:, k:k+R] w[k:k+R, n:n+16] for every row b (R rows of w, unrolled).
template <int R, bool kMasked>
inline void tile(const float* x, const uint16_t* wk, float* y, int64_t B, int64_t K, int64_t N,
                 int64_t k, int64_t n, __mmask16 m) {
  __m512 wv[R];
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j) {
    const uint16_t* p = wk + j * N + n;
    wv[j] = widen(kMasked ? _mm256_maskz_loadu_epi16(m, p)
                          : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * K + k;
    float* yb = y + b * N + n;
    __m512 acc = kMasked ? _mm512_maskz_loadu_ps(m, yb) : _mm512_loadu_ps(yb);
    __m512 acc2 = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int j = 0; j + 1 < R; j += 2) {
      acc = _mm512_fmadd_ps(_mm512_set1_ps(xb[j]), wv[j], acc);
      acc2 = _mm512_fmadd_ps(_mm512_set1_ps(xb[j + 1]), wv[j + 1], acc2);
    }
    if (R % 2) acc = _mm512_fmadd_ps(_mm512_set1_ps(xb[R - 1]), wv[R - 1], acc);
    acc = _mm512_add_ps(acc, acc2);
    if (kMasked) {
      _mm512_mask_storeu_ps(yb, m, acc);
    } else {
      _mm512_storeu_ps(yb, acc);
    }
  }
}

// Columns [n0, n1) of y for every row b; w's rows are streamed in order, kRows at a time
// (the last rows one at a time), full 16-column tiles unmasked.
void columns(const float* x, const uint16_t* w, float* y, int64_t B, int64_t K, int64_t N,
             int64_t n0, int64_t n1, int64_t k0 = 0, int64_t k1 = -1) {
  if (k1 < 0) k1 = K;
  for (int64_t b = 0; b < B; ++b) std::memset(y + b * N + n0, 0, (n1 - n0) * sizeof(float));
  const int64_t full_end = n0 + (n1 - n0) / 16 * 16;
  const __mmask16 tail = tail_mask(full_end, n1);
  int64_t k = k0;
  for (; k + kRows <= k1; k += kRows) {
    const uint16_t* wk = w + k * N;
    for (int64_t n = n0; n < full_end; n += 16) tile<kRows, false>(x, wk, y, B, K, N, k, n, 0xFFFF);
    if (full_end < n1) tile<kRows, true>(x, wk, y, B, K, N, k, full_end, tail);
  }
  for (; k < k1; ++k) {
    const uint16_t* wk = w + k * N;
    for (int64_t n = n0; n < full_end; n += 16) tile<1, false>(x, wk, y, B, K, N, k, n, 0xFFFF);
    if (full_end < n1) tile<1, true>(x, wk, y, B, K, N, k, full_end, tail);
  }
}

ffi::Error Bf16Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("lens_bf16_matmul: expected x [B, K] and w [K, N]");
  }
  const int64_t B = xd[0], K = xd[1], N = wd[1];
  const float* xp = x.typed_data();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.untyped_data());
  float* yp = y->typed_data();
  // Two halves of w's rows (each a contiguous stretch of memory, which the prefetchers
  // stream best), taken by this thread and by one task on XLA's intra-op pool: whoever
  // runs first takes the next half.  The pool may be busy (XLA runs independent ops, e.g.
  // the Q / K / V products, at the same time) or its thread descheduled on a loaded
  // machine; then this thread does both halves and only waits for a half the other thread
  // is in the middle of.  The second half accumulates into a scratch row that is added at
  // the end.  The state is shared because the task may start after this call returned.
  if (pool.num_threads() < 2 || K * N < (1 << 18)) {
    columns(xp, wp, yp, B, K, N, 0, N);
    return ffi::Error::Success();
  }
  const int64_t split = K / 2 / kRows * kRows;
  struct State {
    std::atomic<int> next{0};
    std::atomic<int> finished{0};
    std::vector<float> scratch;
  };
  auto state = std::make_shared<State>();
  state->scratch.resize(B * N);
  float* scratch = state->scratch.data();
  auto work = [=] {
    for (int c; (c = state->next.fetch_add(1)) < 2;) {
      if (c == 0) columns(xp, wp, yp, B, K, N, 0, N, 0, split);
      else columns(xp, wp, scratch, B, K, N, 0, N, split, K);
      state->finished.fetch_add(1, std::memory_order_release);
    }
  };
  auto task = work;  // Schedule takes ownership of an rvalue
  pool.Schedule(std::move(task));
  work();
  while (state->finished.load(std::memory_order_acquire) < 2) _mm_pause();
  for (int64_t i = 0; i < B * N; i += 16) {
    const __mmask16 m = tail_mask(i, B * N);
    _mm512_mask_storeu_ps(yp + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, yp + i),
                                                   _mm512_maskz_loadu_ps(m, scratch + i)));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LensBf16Matmul, Bf16Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
