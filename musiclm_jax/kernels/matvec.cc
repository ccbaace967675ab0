// A matrix-vector product for batch-1 decoding on CPU, as an XLA FFI custom call.
//
//   y[m, n] = sum_k x[m, k] * w[k, n]      (layout "kn": w is [K, N], row-major)
//   y[m, n] = sum_k x[m, k] * w[n, k]      (layout "nk": w is [N, K], the tied embedding table)
//
// x and y are float32; w is float32, bfloat16 or int8 and is widened to float32 in registers, so a narrow weight is
// read from memory at its own width (XLA's CPU backend materialises a float32 copy of it before its dot). The rows
// of x are few (a decoding batch, at most kMaxRows); sums are float32.
//
// The work is split into chunks, claimed by the calling thread and by one helper thread per further core
// (`Helpers`), so every core streams the weight. A chunk is a range of k rows ("kn": each chunk sums into its own
// partial [M, N], which the caller adds up) or of n outputs ("nk": each chunk writes its outputs).
#include <immintrin.h>

#include <algorithm>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 16;

inline float Widen(float w) { return w; }
inline float Widen(int8_t w) { return static_cast<float>(w); }
inline float Widen(uint16_t w) {  // bfloat16 bits
  uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MUSICLM_AVX512 1
// Sixteen weights from `w`, widened to float32; `mask` selects the valid lanes (the rest read as zero).
inline __m512 Load16(const float* w, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, w); }
inline __m512 Load16(const uint16_t* w, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, w)), 16));
}
inline __m512 Load16(const int8_t* w, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w)));
}
inline __mmask16 Lanes(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u); }
#endif

// partial[m, n] = sum over k in [k0, k1) of x[m, k] * w[k, n]. Four rows of w are read per pass over the
// partial, which stays in L1/L2; the weight streams once, row after row.
template <typename W>
void RowsKN(const float* x, const W* w, float* partial, int64_t rows, int64_t k_dim, int64_t n_dim, int64_t k0,
            int64_t k1) {
  std::fill(partial, partial + rows * n_dim, 0.0f);
#ifdef MUSICLM_AVX512
  __m512 a[kMaxRows][4];
  for (int64_t k = k0; k < k1; k += 4) {
    const int64_t depth = std::min<int64_t>(4, k1 - k);
    for (int64_t m = 0; m < rows; ++m) {
      for (int64_t j = 0; j < 4; ++j) a[m][j] = _mm512_set1_ps(j < depth ? x[m * k_dim + k + j] : 0.0f);
    }
    const W* w0 = w + k * n_dim;
    const W* w1 = depth > 1 ? w0 + n_dim : w0;
    const W* w2 = depth > 2 ? w0 + 2 * n_dim : w0;
    const W* w3 = depth > 3 ? w0 + 3 * n_dim : w0;
    for (int64_t n = 0; n < n_dim; n += 16) {
      const __mmask16 mask = Lanes(n_dim - n);
      const __m512 v0 = Load16(w0 + n, mask), v1 = Load16(w1 + n, mask);
      const __m512 v2 = Load16(w2 + n, mask), v3 = Load16(w3 + n, mask);
      for (int64_t m = 0; m < rows; ++m) {
        float* out = partial + m * n_dim + n;
        __m512 acc = _mm512_maskz_loadu_ps(mask, out);
        acc = _mm512_fmadd_ps(a[m][0], v0, acc);
        acc = _mm512_fmadd_ps(a[m][1], v1, acc);
        acc = _mm512_fmadd_ps(a[m][2], v2, acc);
        acc = _mm512_fmadd_ps(a[m][3], v3, acc);
        _mm512_mask_storeu_ps(out, mask, acc);
      }
    }
  }
#else
  for (int64_t k = k0; k < k1; ++k) {
    const W* wk = w + k * n_dim;
    for (int64_t m = 0; m < rows; ++m) {
      const float a = x[m * k_dim + k];
      float* out = partial + m * n_dim;
#pragma omp simd
      for (int64_t n = 0; n < n_dim; ++n) out[n] += a * Widen(wk[n]);
    }
  }
#endif
}

// y[m, n] for n in [n0, n1) = sum_k x[m, k] * w[n, k]: four outputs at a time, each a dot product along k.
template <typename W>
void OutputsNK(const float* x, const W* w, float* y, int64_t rows, int64_t k_dim, int64_t n_dim, int64_t n0,
               int64_t n1) {
#ifdef MUSICLM_AVX512
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t width = std::min<int64_t>(4, n1 - n);
    const W* wn[4];
    for (int64_t j = 0; j < 4; ++j) wn[j] = w + (n + std::min<int64_t>(j, width - 1)) * k_dim;
    for (int64_t m = 0; m < rows; ++m) {
      const float* xm = x + m * k_dim;
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t k = 0; k < k_dim; k += 16) {
        const __mmask16 mask = Lanes(k_dim - k);
        const __m512 xv = _mm512_maskz_loadu_ps(mask, xm + k);
        for (int64_t j = 0; j < 4; ++j) acc[j] = _mm512_fmadd_ps(xv, Load16(wn[j] + k, mask), acc[j]);
      }
      for (int64_t j = 0; j < width; ++j) y[m * n_dim + n + j] = _mm512_reduce_add_ps(acc[j]);
    }
  }
#else
  for (int64_t n = n0; n < n1; ++n) {
    const W* wn = w + n * k_dim;
    for (int64_t m = 0; m < rows; ++m) {
      const float* xm = x + m * k_dim;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < k_dim; ++k) sum += xm[k] * Widen(wn[k]);
      y[m * n_dim + n] = sum;
    }
  }
#endif
}

struct Job {
  const float* x = nullptr;
  const void* w = nullptr;
  float* out = nullptr;  // "kn": partials [chunks, M, N]; "nk": y
  int64_t rows = 0, k_dim = 0, n_dim = 0, span = 0, chunks = 0;
  bool nk = false;
  ffi::DataType dtype = ffi::DataType::F32;
};

template <typename W>
void RunChunk(const Job& job, int64_t c) {
  const W* w = static_cast<const W*>(job.w);
  if (job.nk) {
    const int64_t n0 = c * job.span, n1 = std::min(job.n_dim, n0 + job.span);
    OutputsNK<W>(job.x, w, job.out, job.rows, job.k_dim, job.n_dim, n0, n1);
  } else {
    const int64_t k0 = c * job.span, k1 = std::min(job.k_dim, k0 + job.span);
    RowsKN<W>(job.x, w, job.out + c * job.rows * job.n_dim, job.rows, job.k_dim, job.n_dim, k0, k1);
  }
}

void RunChunkOf(const Job& job, int64_t c) {
  switch (job.dtype) {
    case ffi::DataType::F32: RunChunk<float>(job, c); break;
    case ffi::DataType::BF16: RunChunk<uint16_t>(job, c); break;
    default: RunChunk<int8_t>(job, c); break;
  }
}

int CpuCount() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// One helper thread per further core, started on first use and kept for the process. A decoding step calls the
// kernel every few tens of microseconds, so a helper spins (kSpin) after its last chunk before it sleeps: waking a
// sleeping thread costs about as much as a small product. A job is posted as a ticket, generation << 32 | next
// chunk; a chunk is claimed by a compare-and-swap on the ticket, so a helper that wakes late, or sees a finished
// job, claims nothing and reads no buffer. One job runs at a time; a call that finds one running works alone.
class Helpers {
 public:
  static Helpers& Get() {
    static Helpers* helpers = new Helpers(CpuCount() - 1);  // never destroyed: its threads outlive main()
    return *helpers;
  }

  int64_t size() const { return size_; }

  void Run(const Job& job) {
    if (size_ == 0 || job.chunks == 1 || busy_.exchange(true, std::memory_order_acquire)) {
      for (int64_t c = 0; c < job.chunks; ++c) RunChunkOf(job, c);
      return;
    }
    job_ = job;
    chunks_.store(job.chunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t generation = ++generation_;
    ticket_.store(generation << 32, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      wake_.notify_all();
    }
    Take(generation);
    while (done_.load(std::memory_order_acquire) < job.chunks) _mm_pause();
    busy_.store(false, std::memory_order_release);
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(2000);

  explicit Helpers(int64_t size) : size_(std::max<int64_t>(0, size)) {
    for (int64_t i = 0; i < size_; ++i) std::thread([this] { Loop(); }).detach();
  }

  // Claims and runs chunks of `generation` until none is left.
  void Take(uint64_t generation) {
    for (;;) {
      uint64_t ticket = ticket_.load(std::memory_order_acquire);
      const uint64_t c = ticket & 0xFFFFFFFFu;
      if ((ticket >> 32) != generation || static_cast<int64_t>(c) >= chunks_.load(std::memory_order_relaxed)) return;
      if (!ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel)) continue;
      RunChunkOf(job_, static_cast<int64_t>(c));
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void Loop() {
    uint64_t seen = 0;
    auto idle_since = std::chrono::steady_clock::now();
    for (int spins = 0;; ++spins) {
      const uint64_t generation = ticket_.load(std::memory_order_acquire) >> 32;
      if (generation != seen) {
        seen = generation;
        Take(generation);
        idle_since = std::chrono::steady_clock::now();
        continue;
      }
      if ((spins & 255) == 0 && std::chrono::steady_clock::now() - idle_since > kSpin) {
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        wake_.wait(lock, [&] { return (ticket_.load(std::memory_order_seq_cst) >> 32) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        continue;
      }
      _mm_pause();
    }
  }

  const int64_t size_;
  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> chunks_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  uint64_t generation_ = 0;  // written only by the caller holding busy_
  Job job_;                  // written only by the caller holding busy_, before the ticket that publishes it
  std::mutex mu_;
  std::condition_variable wake_;
};

ffi::Error Matvec(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Result<ffi::Buffer<ffi::F32>> y, bool transposed,
                  int64_t threads) {
  const auto dtype = w.element_type();
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16 && dtype != ffi::DataType::S8) {
    return ffi::Error::InvalidArgument("musiclm_matvec: the weight must be float32, bfloat16 or int8");
  }
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("musiclm_matvec: x and w must be 2-D");
  const int64_t rows = xd[0], k_dim = xd[1];
  const int64_t n_dim = transposed ? wd[0] : wd[1];
  if ((transposed ? wd[1] : wd[0]) != k_dim) {
    return ffi::Error::InvalidArgument("musiclm_matvec: x's last axis does not match the weight's contracted axis");
  }
  if (rows > kMaxRows) return ffi::Error::InvalidArgument("musiclm_matvec: more than 16 rows in x");
  if (rows == 0 || n_dim == 0) return ffi::Error::Success();

  Helpers& helpers = Helpers::Get();
  const int64_t workers = threads == 1 ? 1 : 1 + helpers.size();
  Job job;
  job.x = x.typed_data();
  job.w = w.untyped_data();
  job.rows = rows;
  job.k_dim = k_dim;
  job.n_dim = n_dim;
  job.nk = transposed;
  job.dtype = dtype;
  // Two chunks a worker: a late helper still finds work, and one that is slow holds up at most half its share.
  const int64_t split = transposed ? n_dim : k_dim;
  const int64_t wanted = workers == 1 ? 1 : std::min<int64_t>(2 * workers, std::max<int64_t>(1, split / 8));
  job.span = (split + wanted - 1) / wanted;
  job.chunks = (split + job.span - 1) / job.span;

  thread_local std::vector<float> partials;
  if (transposed) {
    job.out = y->typed_data();
  } else {
    partials.resize(static_cast<size_t>(job.chunks * rows * n_dim));
    job.out = partials.data();
  }
  helpers.Run(job);

  if (!transposed) {
    float* out = y->typed_data();
    const int64_t size = rows * n_dim;
    std::memcpy(out, partials.data(), sizeof(float) * size);
    for (int64_t c = 1; c < job.chunks; ++c) {
      const float* p = partials.data() + c * size;
#pragma omp simd
      for (int64_t i = 0; i < size; ++i) out[i] += p[i];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MusiclmMatvec, Matvec,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed")
                                  .Attr<int64_t>("threads"));
