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


// ---------------------------------------------------------------- the compute-bound GEMM
// y [M, N] f32 = x [M, K2] bf16 . w [K2, N] bf16, K2 even, for many rows (the statistics'
// block matmuls, thousands of tokens per call).  A float32 GEMM is at the FMA peak of this
// CPU (Zen 4: one 16-lane FMA per cycle); VDPBF16PS does two bf16 products per float32 lane
// per instruction, accumulating in float32, so it has twice the arithmetic rate.
// w arrives packed in 64-column panels of k-pairs: [ceil(N / 64), K2 / 2, 64, 2], element
// (p, kk, n, t) = w[2 kk + t, 64 p + n]: one 64-byte load holds 16 columns' (k, k+1) pairs,
// exactly VDPBF16PS's right operand; the left operand is x's (k, k+1) pair (adjacent in a
// row-major bf16 row) broadcast to every lane.
constexpr int kRows = 6;      // microkernel rows: 6 x 4 = 24 accumulators + 4 weights + 1 broadcast <= 32 zmm
constexpr int64_t kBlock = 96;  // rows per work item (16 microkernels): its x stays in L2

template <int R>
inline void gemm_micro(const uint16_t* x, int64_t K2, const uint16_t* wp, int64_t KP, float* y,
                       int64_t N, int64_t n) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const int32_t* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = reinterpret_cast<const int32_t*>(x + r * K2);
  const uint16_t* q = wp;
  for (int64_t kk = 0; kk < KP; ++kk, q += 2 * kPanel) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(q);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(q + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(q + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(q + 96);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(xr[r][kk]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, w3);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* yr = y + r * N + n;
    for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(yr + 16 * j, tail_mask(n + 16 * j, N), acc[r][j]);
  }
}

// Rows [m0, m1) of y: for each 64-column panel, every 6-row microkernel of the block (the
// panel, K2 * 128 bytes, is re-read from L2 by each).
void gemm_rows(const uint16_t* x, const uint16_t* w, float* y, int64_t K2, int64_t N, int64_t P,
               int64_t m0, int64_t m1) {
  const int64_t KP = K2 / 2;
  for (int64_t p = 0; p < P; ++p) {
    const uint16_t* wp = w + p * KP * 2 * kPanel;
    const int64_t n = p * kPanel;
    int64_t m = m0;
    for (; m + kRows <= m1; m += kRows) gemm_micro<kRows>(x + m * K2, K2, wp, KP, y + m * N, N, n);
    const uint16_t* xm = x + m * K2;
    float* ym = y + m * N;
    switch (m1 - m) {
      case 5: gemm_micro<5>(xm, K2, wp, KP, ym, N, n); break;
      case 4: gemm_micro<4>(xm, K2, wp, KP, ym, N, n); break;
      case 3: gemm_micro<3>(xm, K2, wp, KP, ym, N, n); break;
      case 2: gemm_micro<2>(xm, K2, wp, KP, ym, N, n); break;
      case 1: gemm_micro<1>(xm, K2, wp, KP, ym, N, n); break;
      default: break;
    }
  }
}

// x and w arrive as uint16 (bf16 bits, bitcast in models/bf16_kernel.py): a bf16 array that
// a scan slices per layer is widened by XLA:CPU to a float32 copy of every layer (and
// narrowed back per layer), which cost a third of the kernel's time; uint16 is left alone.
ffi::Error Bf16Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::U16> x, ffi::Buffer<ffi::U16> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 4 || yd.size() != 2 || xd[1] % 2 != 0 || wd[1] * 2 != xd[1] ||
      wd[2] != kPanel || wd[3] != 2 || yd[0] != xd[0] || (yd[1] + kPanel - 1) / kPanel != wd[0]) {
    return ffi::Error::InvalidArgument(
        "lens_bf16_gemm: expected x [M, K2] (K2 even), w [ceil(N / 64), K2 / 2, 64, 2], y [M, N]");
  }
  const int64_t M = xd[0], K2 = xd[1], N = yd[1], P = wd[0];
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.untyped_data());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.untyped_data());
  float* yp = y->typed_data();
  const int64_t items = (M + kBlock - 1) / kBlock;
  if (pool.num_threads() < 2 || items < 2) {
    gemm_rows(xp, wp, yp, K2, N, P, 0, M);
    return ffi::Error::Success();
  }
  // Row blocks handed out one at a time to this thread and one pool task (as in Bf16Matmul:
  // whoever is running takes the next block, so a descheduled helper costs at most a block).
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  auto state = std::make_shared<State>();
  auto work = [=] {
    for (int64_t c; (c = state->next.fetch_add(1)) < items;) {
      gemm_rows(xp, wp, yp, K2, N, P, c * kBlock, std::min(M, (c + 1) * kBlock));
      state->finished.fetch_add(1, std::memory_order_release);
    }
  };
  auto task = work;
  pool.Schedule(std::move(task));
  work();
  while (state->finished.load(std::memory_order_acquire) < items) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LensBf16Matmul, Bf16Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LensBf16Gemm, Bf16Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
