// recyclegpt's CPU kernels for decoding passes: few rows, weights streamed once, every row computed alike
// whatever the pass's row count.
//
// skinny_linear: y = x @ w.T (+ b), a linear layer over a decoding pass's few rows.
// decode_block:  one transformer block of the model (`layers.Block`) over a static KV cache, in one call.
//
// Values are float32 or bfloat16 (the model's dtype); arithmetic is float32 in both. Weights come packed
// (`kernels.pack`): [ceil(N / 16), K, 16], panel j holding outputs 16j..16j+15 for each k in turn, zero rows
// padding N. A tile of 4 panels (64 outputs) reads one contiguous stretch of memory per k and needs no
// horizontal sums: y[m, 16j + i] accumulates x[m, k] * P[j, k, i] over k in order, one fused multiply-add per k,
// then adds the bias. That arithmetic is the same whatever the call's row count, the row's place in it and the
// thread that computes it, so a row decoded alone (`ar`, one token a pass) gets exactly the bits it gets inside
// a wider pass (`verify`), which BLAS libraries do not promise.
//
// decode_block runs a whole block in one OpenMP parallel region, phases separated by barriers, where separate
// ops would pay a fork/join and a dispatch each. Built with -march=native: the 16-lane vector type becomes one
// AVX-512 register, two AVX2 ones or four SSE ones.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

typedef float vec16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
using bf16 = c10::BFloat16;
constexpr int64_t PANEL = 16;  // outputs per panel (`kernels.PANEL`)
constexpr int64_t TILE = 4;    // panels per tile: 64 outputs, 4 accumulators per row

// Values in memory are float32 or bfloat16; arithmetic is float32 throughout.
inline float to_f(float v) { return v; }
inline float to_f(bf16 v) { return static_cast<float>(v); }
template <typename T>
inline T from_f(float v) { return T(v); }  // bf16: round to nearest even, as torch's .to(torch.bfloat16)

inline vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vec16 load16(const bf16* p) {  // 16 bf16 -> 16 float32: the bits shifted into the high half
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  vec16 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

// Rows [m0, m0 + MB) of float32 X [M, K] x panels [p0, p0 + NB) of packed P (K values per panel row), into
// float32 Y [M, N].
template <int MB, int NB, typename W>
inline void tile(const float* X, const W* P, const W* B, float* Y, int64_t K, int64_t N, int64_t m0, int64_t p0) {
  vec16 acc[MB][NB];
#pragma GCC unroll 16
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NB; ++c) acc[r][c] = vec16{};
  const W* base = P + p0 * K * PANEL;
  for (int64_t k = 0; k < K; ++k) {
    vec16 wv[NB];
#pragma GCC unroll 16
    for (int c = 0; c < NB; ++c) wv[c] = load16(base + (c * K + k) * PANEL);
#pragma GCC unroll 16
    for (int r = 0; r < MB; ++r) {
      const float xs = X[(m0 + r) * K + k];
#pragma GCC unroll 16
      for (int c = 0; c < NB; ++c) acc[r][c] += xs * wv[c];  // one FMA (-ffp-contract=fast)
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int c = 0; c < NB; ++c) {
      float out[PANEL];
      std::memcpy(out, &acc[r][c], sizeof(out));
      const int64_t n0 = (p0 + c) * PANEL;
      for (int64_t i = 0; i < PANEL && n0 + i < N; ++i)
        Y[(m0 + r) * N + n0 + i] = out[i] + (B ? to_f(B[n0 + i]) : 0.f);
    }
}

// Panels [p0, p0 + NB) for every row, 4 rows at a time (the tile's weights stay in L1 across row blocks).
template <int NB, typename W>
inline void rows(const float* X, const W* P, const W* B, float* Y, int64_t M, int64_t K, int64_t N, int64_t p0) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, NB>(X, P, B, Y, K, N, m, p0);
  for (; m < M; ++m) tile<1, NB>(X, P, B, Y, K, N, m, p0);
}

// One linear layer's share of a phase: packed weight, bias, float32 output [M, N], its first tile in the phase.
template <typename W>
struct Part {
  const W* P;
  const W* B;
  float* Y;
  int64_t N, first_tile;
};

int64_t panels_of(int64_t N) { return (N + PANEL - 1) / PANEL; }

// Numbers the parts' tiles one after the other; returns the total.
template <typename W>
int64_t total_tiles(std::vector<Part<W>>& parts) {
  int64_t tiles = 0;
  for (Part<W>& part : parts) {
    part.first_tile = tiles;
    tiles += (panels_of(part.N) + TILE - 1) / TILE;
  }
  return tiles;
}

// Tiles [begin, end) over `parts` (in order), for all M rows of X [M, K].
template <typename W>
void linear_tiles(const std::vector<Part<W>>& parts, const float* X, int64_t M, int64_t K, int64_t begin,
                  int64_t end) {
  size_t p = 0;
  for (int64_t i = begin; i < end; ++i) {
    while (p + 1 < parts.size() && i >= parts[p + 1].first_tile) ++p;
    const Part<W>& part = parts[p];
    const int64_t p0 = (i - part.first_tile) * TILE, np = panels_of(part.N);
    if (p0 + TILE <= np) {
      rows<TILE>(X, part.P, part.B, part.Y, M, K, part.N, p0);
    } else {
      for (int64_t q = p0; q < np; ++q) rows<1>(X, part.P, part.B, part.Y, M, K, part.N, q);
    }
  }
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void check_packed(const at::Tensor& p, int64_t N, int64_t K, at::ScalarType dtype, const char* op) {
  TORCH_CHECK(p.scalar_type() == dtype && p.is_contiguous() && p.dim() == 3 && p.size(0) == panels_of(N) &&
              p.size(1) == K && p.size(2) == PANEL, op, ": a weight is not packed for N=", N, ", K=", K,
              " in the input's dtype (kernels.pack)");
}

template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i]);
}

// x [..., K] -> [..., N] for packed weight w (N outputs) and bias b, in x's dtype.
template <typename T>
at::Tensor skinny_linear_t(const at::Tensor& x, const at::Tensor& w, int64_t N, const std::optional<at::Tensor>& b) {
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0;
  check_packed(w, N, K, x.scalar_type(), "skinny_linear");
  const T* B = opt_ptr<T>(b);
  TORCH_CHECK(!B || (b->is_contiguous() && b->numel() == N), "skinny_linear: bias [N] in x's dtype");
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  std::vector<Part<T>> parts = {{w.data_ptr<T>(), B, y.data_ptr<float>(), N, 0}};
  const int64_t tiles = total_tiles(parts);
  const float* X = xf.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) { linear_tiles(parts, X, M, K, begin, end); });
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return (x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type())).view(sizes);
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, int64_t n, const std::optional<at::Tensor>& b) {
  TORCH_CHECK(x.is_contiguous() && x.dim() >= 1, "skinny_linear: x contiguous");
  if (x.scalar_type() == at::kFloat) return skinny_linear_t<float>(x, w, n, b);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "skinny_linear: float32 or bfloat16");
  return skinny_linear_t<bf16>(x, w, n, b);
}


// ------------------------------------------------------------------------------------------- decode_block

// This thread's contiguous share [begin, end) of n items.
inline void share(int64_t n, int tid, int nt, int64_t& begin, int64_t& end) {
  begin = n * tid / nt;
  end = n * (tid + 1) / nt;
}

// RMSNorm of one row as `layers.RMSNorm` computes it: x * rsqrt(mean(x^2) + eps), times the weight. No weight:
// no norm (the module's first block reads its input as it is), a copy.
template <typename T>
inline void rms_norm(const float* x, const T* w, float eps, int64_t d, float* out) {
  if (!w) {
    std::memcpy(out, x, d * sizeof(float));
    return;
  }
  float ss = 0.f;
  for (int64_t i = 0; i < d; ++i) ss = __builtin_fmaf(x[i], x[i], ss);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = to_f(w[i]) * (x[i] * r);
}

// RoPE, rotate-half layout (`layers.apply_rope`): x * cos + [-x2, x1] * sin, one head of D values in place.
template <typename T>
inline void rope(float* x, const T* cos, const T* sin, int64_t D) {
  const int64_t h = D / 2;
  float tmp[512];
  for (int64_t i = 0; i < D; ++i) tmp[i] = x[i];
  for (int64_t i = 0; i < h; ++i) x[i] = tmp[i] * to_f(cos[i]) - tmp[i + h] * to_f(sin[i]);
  for (int64_t i = h; i < D; ++i) x[i] = tmp[i] * to_f(cos[i]) + tmp[i - h] * to_f(sin[i]);
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  vec16 acc{};
  const int64_t n16 = n - n % 16;
  for (int64_t i = 0; i < n16; i += 16) acc += load16(a + i) * load16(b + i);
  typedef float vec8 __attribute__((vector_size(32)));
  typedef float vec4 __attribute__((vector_size(16)));
  vec8 a8 = __builtin_shufflevector(acc, acc, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15);
  vec4 a4 = __builtin_shufflevector(a8, a8, 0, 1, 2, 3) + __builtin_shufflevector(a8, a8, 4, 5, 6, 7);
  float s = (a4[0] + a4[2]) + (a4[1] + a4[3]);  // lanes summed in a fixed order
  for (int64_t i = n16; i < n; ++i) s = __builtin_fmaf(a[i], to_f(b[i]), s);
  return s;
}

// One query row against the cache (`layers.cache_attention`): softmax(q.k * scale + bias) @ v. Slots whose bias
// is -inf contribute exactly nothing (exp(-inf) = 0) and are skipped.
template <typename T>
inline void attend(const float* q, const T* kc, const T* vc, const float* bias, int64_t S, int64_t D,
                   float scale, float* scores, float* out) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float mx = ninf;
  for (int64_t s = 0; s < S; ++s) {
    if (bias[s] == ninf) {
      scores[s] = ninf;
      continue;
    }
    scores[s] = dot(q, kc + s * D, D) * scale + bias[s];
    mx = std::max(mx, scores[s]);
  }
  float sum = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    scores[s] = scores[s] == ninf ? 0.f : std::exp(scores[s] - mx);
    sum += scores[s];
  }
  for (int64_t i = 0; i < D; ++i) out[i] = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    if (scores[s] == 0.f) continue;
    const float p = scores[s] / sum;
    const T* v = vc + s * D;
    for (int64_t i = 0; i < D; ++i) out[i] = __builtin_fmaf(p, to_f(v[i]), out[i]);
  }
}

// x [B, T, d] -> the block's output [B, T, d] (the dtype T of x: float32 or bfloat16; the arithmetic inside is
// float32 and only the output and the cache entries are rounded to T); writes the T new keys/values of each row
// b into k_cache and v_cache [B, Hkv, S, D] at slots[b] ([B, T]); cos, sin [B, T, D]: each token's RoPE angles;
// bias [B or 1, 1, T, S] float32: 0 where a token sees a slot, -inf elsewhere (`model.cache_bias`, or a draft
// tree's). attn = (wq, wk, wv, wo), qkv_bias = (bq, bk, bv) or Nones, ffn = (w1 gate, w3 up, w2 down), packed.
template <typename T>
at::Tensor decode_block_t(const at::Tensor& x, const std::optional<at::Tensor>& attn_norm,
                          const at::Tensor& ffn_norm, double eps, at::TensorList attn,
                          const c10::List<std::optional<at::Tensor>>& qkv_bias, at::TensorList ffn,
                          const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& bias, at::Tensor& k_cache,
                          at::Tensor& v_cache, const at::Tensor& slots, int64_t n_head) {
  const int64_t Bt = x.size(0), T_ = x.size(1), d = x.size(2), M = Bt * T_;
  const int64_t D = k_cache.size(3), Hkv = k_cache.size(1), S = k_cache.size(2), H = n_head, rep = H / Hkv;
  const int64_t F = ffn[2].size(1);  // w2 packed [panels(d), F, 16]
  TORCH_CHECK(D <= 512 && H % Hkv == 0 && k_cache.size(0) >= Bt && bias.size(-1) == S && bias.size(-2) == T_ &&
              cos.size(-1) == D && slots.size(0) == Bt && slots.size(1) == T_, "decode_block: shapes do not match");
  const auto dt = x.scalar_type();
  check_packed(attn[0], H * D, d, dt, "decode_block");
  check_packed(attn[1], Hkv * D, d, dt, "decode_block");
  check_packed(attn[2], Hkv * D, d, dt, "decode_block");
  check_packed(attn[3], d, H * D, dt, "decode_block");
  check_packed(ffn[0], F, d, dt, "decode_block");
  check_packed(ffn[1], F, d, dt, "decode_block");
  check_packed(ffn[2], d, F, dt, "decode_block");
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor xf = at::empty({M, d}, f32), xn = at::empty({M, d}, f32), q = at::empty({M, H * D}, f32),
             k = at::empty({M, Hkv * D}, f32), v = at::empty({M, Hkv * D}, f32), att = at::empty({M, H * D}, f32),
             x1 = at::empty({M, d}, f32), gate = at::empty({M, F}, f32), up = at::empty({M, F}, f32),
             o = at::empty({M, d}, f32), out = at::empty({Bt, T_, d}, x.options());
  const int nt = at::get_num_threads();
  at::Tensor scratch = at::empty({nt, S}, f32);

  const T *Xin = x.data_ptr<T>(), *an = opt_ptr<T>(attn_norm), *fn = ffn_norm.data_ptr<T>();
  const T *C = cos.data_ptr<T>(), *Sn = sin.data_ptr<T>();
  const float* Bias = bias.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  float *X = xf.data_ptr<float>(), *XN = xn.data_ptr<float>(), *Q = q.data_ptr<float>(), *Kn = k.data_ptr<float>();
  float *V = v.data_ptr<float>(), *A = att.data_ptr<float>(), *X1 = x1.data_ptr<float>();
  float *G = gate.data_ptr<float>(), *U = up.data_ptr<float>(), *O = o.data_ptr<float>();
  T *KC = k_cache.data_ptr<T>(), *VC = v_cache.data_ptr<T>(), *Out = out.data_ptr<T>();
  std::vector<Part<T>> qkv = {{attn[0].data_ptr<T>(), opt_ptr<T>(qkv_bias.get(0)), Q, H * D, 0},
                              {attn[1].data_ptr<T>(), opt_ptr<T>(qkv_bias.get(1)), Kn, Hkv * D, 0},
                              {attn[2].data_ptr<T>(), opt_ptr<T>(qkv_bias.get(2)), V, Hkv * D, 0}};
  std::vector<Part<T>> wo = {{attn[3].data_ptr<T>(), nullptr, X1, d, 0}};
  std::vector<Part<T>> gu = {{ffn[0].data_ptr<T>(), nullptr, G, F, 0}, {ffn[1].data_ptr<T>(), nullptr, U, F, 0}};
  std::vector<Part<T>> down = {{ffn[2].data_ptr<T>(), nullptr, O, d, 0}};
  const int64_t qkv_tiles = total_tiles(qkv), wo_tiles = total_tiles(wo), gu_tiles = total_tiles(gu),
                down_tiles = total_tiles(down);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t bias_rows = bias.size(0) == 1 ? 0 : T_ * S;  // a [1, 1, T, S] bias is shared by every row

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), n = omp_get_num_threads();
    int64_t b0, b1;
    share(M, tid, n, b0, b1);
    for (int64_t m = b0; m < b1; ++m) {
      to_float(Xin + m * d, X + m * d, d);
      rms_norm(X + m * d, an, static_cast<float>(eps), d, XN + m * d);
    }
#pragma omp barrier
    share(qkv_tiles, tid, n, b0, b1);
    linear_tiles(qkv, XN, M, d, b0, b1);
#pragma omp barrier
    // RoPE on q and k; the new keys/values into the cache at their slots.
    share(M * (H + Hkv), tid, n, b0, b1);
    for (int64_t i = b0; i < b1; ++i) {
      const int64_t m = i / (H + Hkv), h = i % (H + Hkv), b = m / T_;
      const T *c = C + m * D, *s = Sn + m * D;
      if (h < H) {
        rope(Q + m * H * D + h * D, c, s, D);
      } else {
        const int64_t g = h - H, at = ((b * Hkv + g) * S + slot[m]) * D;
        float* kr = Kn + m * Hkv * D + g * D;
        const float* vr = V + m * Hkv * D + g * D;
        rope(kr, c, s, D);
        for (int64_t j = 0; j < D; ++j) {
          KC[at + j] = from_f<T>(kr[j]);
          VC[at + j] = from_f<T>(vr[j]);
        }
      }
    }
#pragma omp barrier
    share(M * H, tid, n, b0, b1);
    float* sc = scratch.data_ptr<float>() + tid * S;
    for (int64_t i = b0; i < b1; ++i) {
      const int64_t m = i / H, h = i % H, b = m / T_, t = m % T_, g = h / rep;
      attend(Q + m * H * D + h * D, KC + (b * Hkv + g) * S * D, VC + (b * Hkv + g) * S * D,
             Bias + b * bias_rows + t * S, S, D, scale, sc, A + m * H * D + h * D);
    }
#pragma omp barrier
    share(wo_tiles, tid, n, b0, b1);
    linear_tiles(wo, A, M, H * D, b0, b1);
#pragma omp barrier
    share(M, tid, n, b0, b1);
    for (int64_t m = b0; m < b1; ++m) {
      for (int64_t i = 0; i < d; ++i) X1[m * d + i] += X[m * d + i];  // the attention's residual
      rms_norm(X1 + m * d, fn, static_cast<float>(eps), d, XN + m * d);
    }
#pragma omp barrier
    share(gu_tiles, tid, n, b0, b1);
    linear_tiles(gu, XN, M, d, b0, b1);
#pragma omp barrier
    share(M * F, tid, n, b0, b1);
    for (int64_t i = b0; i < b1; ++i) G[i] = G[i] / (1.f + std::exp(-G[i])) * U[i];  // silu(gate) * up
#pragma omp barrier
    share(down_tiles, tid, n, b0, b1);
    linear_tiles(down, G, M, F, b0, b1);
#pragma omp barrier
    share(M * d, tid, n, b0, b1);
    for (int64_t i = b0; i < b1; ++i) Out[i] = from_f<T>(O[i] + X1[i]);  // the feed-forward's residual
  }
  return out;
}

at::Tensor decode_block(const at::Tensor& x, const std::optional<at::Tensor>& attn_norm, const at::Tensor& ffn_norm,
                        double eps, at::TensorList attn, const c10::List<std::optional<at::Tensor>>& qkv_bias,
                        at::TensorList ffn, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& bias,
                        at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, int64_t n_head) {
  TORCH_CHECK(attn.size() == 4 && qkv_bias.size() == 3 && ffn.size() == 3, "decode_block: 4 attention weights, "
              "3 q/k/v biases, 3 feed-forward weights");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "decode_block: float32 or bfloat16");
  for (const at::Tensor& t : {x, ffn_norm, cos, sin, k_cache, v_cache})
    TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous(), "decode_block: x, norms, RoPE tables and caches in x's "
                "dtype, contiguous");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous(), "decode_block: bias float32, contiguous");
  TORCH_CHECK(x.dim() == 3 && slots.dim() == 2 && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "decode_block: x [B, T, d], slots [B, T] int64");
  if (dt == at::kFloat)
    return decode_block_t<float>(x, attn_norm, ffn_norm, eps, attn, qkv_bias, ffn, cos, sin, bias, k_cache, v_cache,
                                 slots, n_head);
  return decode_block_t<bf16>(x, attn_norm, ffn_norm, eps, attn, qkv_bias, ffn, cos, sin, bias, k_cache, v_cache,
                              slots, n_head);
}

}  // namespace

TORCH_LIBRARY(recyclegpt, m) {
  m.def("skinny_linear(Tensor x, Tensor w, int n, Tensor? b) -> Tensor");
  m.def("decode_block(Tensor x, Tensor? attn_norm, Tensor ffn_norm, float eps, Tensor[] attn, Tensor?[] qkv_bias, "
        "Tensor[] ffn, Tensor cos, Tensor sin, Tensor bias, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, "
        "int n_head) -> Tensor");
}

TORCH_LIBRARY_IMPL(recyclegpt, CPU, m) {
  m.impl("skinny_linear", skinny_linear);
  m.impl("decode_block", decode_block);
}
