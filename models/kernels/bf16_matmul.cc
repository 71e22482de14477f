// y[b, n] = sum_k x[b, k] * w[k, n] for float32 x [B, K], bfloat16 w [K, N], float32 y [B, N].
//
// Why this exists (docs/generation.md): XLA:CPU has no bfloat16 dot.  It converts every bf16
// weight to a float32 copy before the dot (no flag tried, oneDNN / XNNPACK / YNNPACK, changes
// that), and inside the decode loop it hoists those converts out of the loop, so a bf16 decode
// step reads the same float32 bytes as a float32 one.  This kernel reads the bf16 weight once,
// widens it in registers (bf16 -> f32 is a 16-bit shift) and accumulates in float32, so a
// batch-1 decode step streams half the bytes.
//
// w arrives packed in 64-column panels ([ceil(N / 64), K, 64], zero columns past N).
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

constexpr int64_t kPanel = 64;  // columns per panel: 4 AVX-512 accumulators

inline __m512 widen(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __mmask16 tail_mask(int64_t n, int64_t n1) {
  if (n >= n1) return 0;
  return n + 16 <= n1 ? static_cast<__mmask16>(0xFFFF)
                      : static_cast<__mmask16>((1u << (n1 - n)) - 1);
}

// Panels [p0, p1) of y for every row b.  w is laid out [panels, K, 64] (models/bf16_kernel.py
// packs it so, zero columns past N), so one panel is one contiguous stream of K * 128 bytes
// that the hardware prefetchers follow, and its 64 outputs stay in 4 registers.  Rows b > 0
// read the panel again from L2 (a panel of a 576-row matrix is 72 KB).
void panels(const float* x, const uint16_t* w, float* y, int64_t B, int64_t K, int64_t N,
            int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* wp = w + p * K * kPanel;
    const int64_t n = p * kPanel;
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const uint16_t* q = wp;
      for (int64_t k = 0; k < K; ++k, q += kPanel) {
        const __m512 xv = _mm512_set1_ps(xb[k]);
        a0 = _mm512_fmadd_ps(xv, widen(q), a0);
        a1 = _mm512_fmadd_ps(xv, widen(q + 16), a1);
        a2 = _mm512_fmadd_ps(xv, widen(q + 32), a2);
        a3 = _mm512_fmadd_ps(xv, widen(q + 48), a3);
      }
      float* yb = y + b * N + n;
      _mm512_mask_storeu_ps(yb, tail_mask(n, N), a0);
      _mm512_mask_storeu_ps(yb + 16, tail_mask(n + 16, N), a1);
      _mm512_mask_storeu_ps(yb + 32, tail_mask(n + 32, N), a2);
      _mm512_mask_storeu_ps(yb + 48, tail_mask(n + 48, N), a3);
    }
  }
}

ffi::Error Bf16Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[1] != xd[1] || wd[2] != kPanel ||
      yd[0] != xd[0] || (yd[1] + kPanel - 1) / kPanel != wd[0]) {
    return ffi::Error::InvalidArgument(
        "lens_bf16_matmul: expected x [B, K], w [ceil(N / 64), K, 64], y [B, N]");
  }
  const int64_t B = xd[0], K = xd[1], N = yd[1], P = wd[0];
  const float* xp = x.typed_data();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.untyped_data());
  float* yp = y->typed_data();
  // Two halves of the panels (each a contiguous stretch of w), taken by this thread and by
  // one task on XLA's intra-op pool: whoever runs first takes the next half.  The pool may
  // be busy (XLA runs independent ops, e.g. the Q / K / V products, at the same time) or
  // its thread descheduled on a loaded machine; then this thread does both halves and only
  // waits for a half the other thread is in the middle of.  The state is shared because
  // the task may start after this call returned.
  if (pool.num_threads() < 2 || P < 4) {
    panels(xp, wp, yp, B, K, N, 0, P);
    return ffi::Error::Success();
  }
  const int64_t split = P / 2;
  struct State {
    std::atomic<int> next{0};
    std::atomic<int> finished{0};
  };
  auto state = std::make_shared<State>();
  auto work = [=] {
    for (int c; (c = state->next.fetch_add(1)) < 2;) {
      panels(xp, wp, yp, B, K, N, c == 0 ? 0 : split, c == 0 ? split : P);
      state->finished.fetch_add(1, std::memory_order_release);
    }
  };
  auto task = work;  // Schedule takes ownership of an rvalue
  pool.Schedule(std::move(task));
  work();
  while (state->finished.load(std::memory_order_acquire) < 2) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LensBf16Matmul, Bf16Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
