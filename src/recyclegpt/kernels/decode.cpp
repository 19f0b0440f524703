// recyclegpt's CPU kernels for decoding passes: few rows, weights streamed once, every row computed alike
// whatever the pass's row count.
//
// skinny_linear: y = x @ w.T (+ b), a linear layer over a decoding pass's few rows.
// decode_blocks: a stack of transformer blocks (`layers.Block`, `model.run_blocks`) over static KV caches, in one
//                call.
//
// Values are float32 or bfloat16 (the model's dtype); arithmetic is float32 in both. Weights come packed
// (`kernels.pack`): [ceil(N / 16), K, 16], panel j holding outputs 16j..16j+15 for each k in turn, zero rows
// padding N. A tile of 4 panels (64 outputs) reads one contiguous stretch of memory per k and needs no
// horizontal sums: y[m, 16j + i] accumulates x[m, k] * P[j, k, i] over k in order, one fused multiply-add per k,
// then adds the bias. That arithmetic is the same whatever the call's row count, the row's place in it and the
// thread that computes it, so a row decoded alone (`ar`, one token a pass) gets exactly the bits it gets inside
// a wider pass (`verify`), which BLAS libraries do not promise.
//
// decode_blocks runs every block of a pass in one OpenMP parallel region, phases separated by barriers, where
// separate ops would pay a fork/join, a dispatch and their allocations each. Built with -march=native: the 16-lane
// vector type becomes one AVX-512 register, two AVX2 ones or four SSE ones.
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


// ------------------------------------------------------------------------------------------ decode_blocks

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

// out += p * v over D values, one fused multiply-add per value (the same bits with or without vectors).
template <typename T>
inline void axpy(float p, const T* v, float* out, int64_t D) {
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) {
    vec16 o = load16(out + i);
    o += p * load16(v + i);  // one FMA per lane (-ffp-contract=fast), as fmaf below
    std::memcpy(out + i, &o, sizeof(o));
  }
  for (; i < D; ++i) out[i] = __builtin_fmaf(p, to_f(v[i]), out[i]);
}

// One query row's `rep` heads that share a kv head (`layers.cache_attention`): per head r,
// softmax(q_r.k * scale + bias) @ v, reading each cached key and value once for all of them. q and out: rep heads
// of D values each; scores: rep * S floats. Slots whose bias is -inf contribute exactly nothing (exp(-inf) = 0)
// and are skipped. Each head's arithmetic is what it would be alone: slots in order, one dot product per slot.
template <typename T>
inline void attend(const float* q, const T* kc, const T* vc, const float* bias, int64_t S, int64_t D, int64_t rep,
                   float scale, float* scores, float* out) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float mx[64], sum[64];
  for (int64_t r = 0; r < rep; ++r) mx[r] = ninf, sum[r] = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    if (bias[s] == ninf) continue;
    for (int64_t r = 0; r < rep; ++r) {
      const float v = dot(q + r * D, kc + s * D, D) * scale + bias[s];
      scores[r * S + s] = v;
      mx[r] = std::max(mx[r], v);
    }
  }
  for (int64_t r = 0; r < rep; ++r) {
    float* sc = scores + r * S;
    for (int64_t s = 0; s < S; ++s) {
      if (bias[s] == ninf) continue;
      sc[s] = std::exp(sc[s] - mx[r]);
      sum[r] += sc[s];
    }
  }
  for (int64_t i = 0; i < rep * D; ++i) out[i] = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    if (bias[s] == ninf) continue;
    for (int64_t r = 0; r < rep; ++r) {
      const float p = scores[r * S + s] / sum[r];
      if (p != 0.f) axpy(p, vc + s * D, out + r * D, D);
    }
  }
}

// One block's weights, as the op receives them: norms (attn_norm may be null: no norm) and packed linears.
template <typename T>
struct BlockWeights {
  const T *attn_norm, *ffn_norm;
  std::vector<Part<T>> qkv, wo, gate_up, down;
  int64_t qkv_tiles, wo_tiles, gate_up_tiles, down_tiles, F;
  T *k_cache, *v_cache;
};

// x [B, T, d] through L blocks -> [B, T, d] (x's dtype T: float32 or bfloat16; arithmetic float32, each block's
// output and the cache entries rounded to T, as a block-by-block pass rounds them). Block l writes its T new
// keys/values of each row b into k_caches[l] and v_caches[l] [B, Hkv, S, D] at slots[b] ([B, T]); cos, sin
// [B, T, D]: each token's RoPE angles; bias [B or 1, 1, T, S] float32: 0 where a token sees a slot, -inf
// elsewhere (`model.cache_bias`, or a draft tree's). Per block l: attn_norms[l] (or None), ffn_norms[l],
// attn[4l..4l+3] = (wq, wk, wv, wo), qkv_bias[3l..3l+2] = (bq, bk, bv) or Nones, ffn[3l..3l+2] = (w1 gate, w3 up,
// w2 down), packed. All blocks run in one OpenMP parallel region, phases separated by barriers.
template <typename T>
at::Tensor decode_blocks_t(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& attn_norms,
                           at::TensorList ffn_norms, double eps, at::TensorList attn,
                           const c10::List<std::optional<at::Tensor>>& qkv_bias, at::TensorList ffn,
                           const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& bias,
                           at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& slots, int64_t n_head) {
  const int64_t L = static_cast<int64_t>(ffn_norms.size());
  const int64_t Bt = x.size(0), T_ = x.size(1), d = x.size(2), M = Bt * T_;
  const at::Tensor& kc0 = k_caches[0];
  const int64_t D = kc0.size(3), Hkv = kc0.size(1), S = kc0.size(2), H = n_head, rep = H / Hkv;
  TORCH_CHECK(D <= 512 && H % Hkv == 0 && H / Hkv <= 64 && kc0.size(0) >= Bt && bias.size(-1) == S && bias.size(-2) == T_ &&
              cos.size(-1) == D && slots.size(0) == Bt && slots.size(1) == T_, "decode_blocks: shapes do not match");
  const auto dt = x.scalar_type();
  std::vector<BlockWeights<T>> blocks(L);
  int64_t F_max = 0;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor &wq = attn[4 * l], &wk = attn[4 * l + 1], &wv = attn[4 * l + 2], &wo = attn[4 * l + 3];
    const at::Tensor &w1 = ffn[3 * l], &w3 = ffn[3 * l + 1], &w2 = ffn[3 * l + 2];
    const int64_t F = w2.size(1);  // w2 packed [panels(d), F, 16]
    check_packed(wq, H * D, d, dt, "decode_blocks");
    check_packed(wk, Hkv * D, d, dt, "decode_blocks");
    check_packed(wv, Hkv * D, d, dt, "decode_blocks");
    check_packed(wo, d, H * D, dt, "decode_blocks");
    check_packed(w1, F, d, dt, "decode_blocks");
    check_packed(w3, F, d, dt, "decode_blocks");
    check_packed(w2, d, F, dt, "decode_blocks");
    for (const at::Tensor& c : {k_caches[l], v_caches[l]})
      TORCH_CHECK(c.sizes() == kc0.sizes() && c.scalar_type() == dt && c.is_contiguous(),
                  "decode_blocks: every cache [B, Hkv, S, D] in x's dtype, contiguous");
    BlockWeights<T>& w = blocks[l];
    w.attn_norm = opt_ptr<T>(attn_norms.get(l));
    w.ffn_norm = ffn_norms[l].data_ptr<T>();
    // Outputs are filled in below, once the scratch exists.
    w.qkv = {{wq.data_ptr<T>(), opt_ptr<T>(qkv_bias.get(3 * l)), nullptr, H * D, 0},
             {wk.data_ptr<T>(), opt_ptr<T>(qkv_bias.get(3 * l + 1)), nullptr, Hkv * D, 0},
             {wv.data_ptr<T>(), opt_ptr<T>(qkv_bias.get(3 * l + 2)), nullptr, Hkv * D, 0}};
    w.wo = {{wo.data_ptr<T>(), nullptr, nullptr, d, 0}};
    w.gate_up = {{w1.data_ptr<T>(), nullptr, nullptr, F, 0}, {w3.data_ptr<T>(), nullptr, nullptr, F, 0}};
    w.down = {{w2.data_ptr<T>(), nullptr, nullptr, d, 0}};
    w.qkv_tiles = total_tiles(w.qkv);
    w.wo_tiles = total_tiles(w.wo);
    w.gate_up_tiles = total_tiles(w.gate_up);
    w.down_tiles = total_tiles(w.down);
    w.F = F;
    w.k_cache = k_caches[l].data_ptr<T>();
    w.v_cache = v_caches[l].data_ptr<T>();
    F_max = std::max(F_max, F);
  }
  // float32 scratch in one allocation: the residual stream X, normed XN, q, k, v, attention output A, the
  // attention's residual X1, gate G, up U, down O, and each thread's attention scores.
  const int nt = at::get_num_threads();
  const int64_t sizes[] = {M * d, M * d, M * H * D, M * Hkv * D, M * Hkv * D, M * H * D, M * d, M * F_max,
                           M * F_max, M * d, nt * rep * S};
  int64_t total = 0;
  for (int64_t n : sizes) total += n;
  at::Tensor scratch = at::empty({total}, x.options().dtype(at::kFloat)), out = at::empty({Bt, T_, d}, x.options());
  float* bufs[11];
  float* next = scratch.data_ptr<float>();
  for (int i = 0; i < 11; ++i) {
    bufs[i] = next;
    next += sizes[i];
  }
  float *X = bufs[0], *XN = bufs[1], *Q = bufs[2], *Kn = bufs[3], *V = bufs[4], *A = bufs[5], *X1 = bufs[6];
  float *G = bufs[7], *U = bufs[8], *O = bufs[9], *Scores = bufs[10];
  for (BlockWeights<T>& w : blocks) {
    w.qkv[0].Y = Q, w.qkv[1].Y = Kn, w.qkv[2].Y = V;
    w.wo[0].Y = X1;
    w.gate_up[0].Y = G, w.gate_up[1].Y = U;
    w.down[0].Y = O;
  }

  const T *Xin = x.data_ptr<T>(), *C = cos.data_ptr<T>(), *Sn = sin.data_ptr<T>();
  const float* Bias = bias.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  T* Out = out.data_ptr<T>();
  const float scale = 1.f / std::sqrt(static_cast<float>(D)), epsf = static_cast<float>(eps);
  const int64_t bias_rows = bias.size(0) == 1 ? 0 : T_ * S;  // a [1, 1, T, S] bias is shared by every row

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), n = omp_get_num_threads();
    int64_t b0, b1;
    share(M, tid, n, b0, b1);
    for (int64_t m = b0; m < b1; ++m) {
      to_float(Xin + m * d, X + m * d, d);
      rms_norm(X + m * d, blocks[0].attn_norm, epsf, d, XN + m * d);
    }
    for (int64_t l = 0; l < L; ++l) {
      const BlockWeights<T>& w = blocks[l];
#pragma omp barrier
      share(w.qkv_tiles, tid, n, b0, b1);
      linear_tiles(w.qkv, XN, M, d, b0, b1);
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
            w.k_cache[at + j] = from_f<T>(kr[j]);
            w.v_cache[at + j] = from_f<T>(vr[j]);
          }
        }
      }
#pragma omp barrier
      // Per (row, kv head): its `rep` query heads (query head h reads kv head h / rep).
      share(M * Hkv, tid, n, b0, b1);
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t m = i / Hkv, g = i % Hkv, b = m / T_, t = m % T_;
        attend(Q + (m * H + g * rep) * D, w.k_cache + (b * Hkv + g) * S * D, w.v_cache + (b * Hkv + g) * S * D,
               Bias + b * bias_rows + t * S, S, D, rep, scale, Scores + tid * rep * S, A + (m * H + g * rep) * D);
      }
#pragma omp barrier
      share(w.wo_tiles, tid, n, b0, b1);
      linear_tiles(w.wo, A, M, H * D, b0, b1);
#pragma omp barrier
      share(M, tid, n, b0, b1);
      for (int64_t m = b0; m < b1; ++m) {
        for (int64_t i = 0; i < d; ++i) X1[m * d + i] += X[m * d + i];  // the attention's residual
        rms_norm(X1 + m * d, w.ffn_norm, epsf, d, XN + m * d);
      }
#pragma omp barrier
      share(w.gate_up_tiles, tid, n, b0, b1);
      linear_tiles(w.gate_up, XN, M, d, b0, b1);
#pragma omp barrier
      share(M * w.F, tid, n, b0, b1);
      for (int64_t i = b0; i < b1; ++i) G[i] = G[i] / (1.f + std::exp(-G[i])) * U[i];  // silu(gate) * up
#pragma omp barrier
      share(w.down_tiles, tid, n, b0, b1);
      linear_tiles(w.down, G, M, w.F, b0, b1);
#pragma omp barrier
      // The feed-forward's residual: the block's output, rounded to T (a no-op in float32) as it would be
      // between two separate block calls; then the next block's input norm of the same rows.
      share(M, tid, n, b0, b1);
      for (int64_t m = b0; m < b1; ++m) {
        for (int64_t i = m * d; i < (m + 1) * d; ++i) {
          const T y = from_f<T>(O[i] + X1[i]);
          X[i] = to_f(y);
          Out[i] = y;
        }
        if (l + 1 < L) rms_norm(X + m * d, blocks[l + 1].attn_norm, epsf, d, XN + m * d);
      }
    }
  }
  return out;
}

at::Tensor decode_blocks(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& attn_norms,
                         at::TensorList ffn_norms, double eps, at::TensorList attn,
                         const c10::List<std::optional<at::Tensor>>& qkv_bias, at::TensorList ffn,
                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& bias, at::TensorList k_caches,
                         at::TensorList v_caches, const at::Tensor& slots, int64_t n_head) {
  const size_t L = ffn_norms.size();
  TORCH_CHECK(L >= 1 && attn_norms.size() == L && attn.size() == 4 * L && qkv_bias.size() == 3 * L &&
              ffn.size() == 3 * L && k_caches.size() == L && v_caches.size() == L, "decode_blocks: per block 2 "
              "norms, 4 attention weights, 3 q/k/v biases, 3 feed-forward weights and 2 caches");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "decode_blocks: float32 or bfloat16");
  for (const at::Tensor& t : {x, cos, sin})
    TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous(), "decode_blocks: x and the RoPE tables in x's dtype, "
                "contiguous");
  for (const at::Tensor& t : ffn_norms)
    TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous(), "decode_blocks: norms in x's dtype");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous(), "decode_blocks: bias float32, contiguous");
  TORCH_CHECK(x.dim() == 3 && slots.dim() == 2 && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "decode_blocks: x [B, T, d], slots [B, T] int64");
  if (dt == at::kFloat)
    return decode_blocks_t<float>(x, attn_norms, ffn_norms, eps, attn, qkv_bias, ffn, cos, sin, bias, k_caches,
                                  v_caches, slots, n_head);
  return decode_blocks_t<bf16>(x, attn_norms, ffn_norms, eps, attn, qkv_bias, ffn, cos, sin, bias, k_caches,
                               v_caches, slots, n_head);
}

}  // namespace

TORCH_LIBRARY(recyclegpt, m) {
  m.def("skinny_linear(Tensor x, Tensor w, int n, Tensor? b) -> Tensor");
  m.def("decode_blocks(Tensor x, Tensor?[] attn_norms, Tensor[] ffn_norms, float eps, Tensor[] attn, "
        "Tensor?[] qkv_bias, Tensor[] ffn, Tensor cos, Tensor sin, Tensor bias, Tensor(a!)[] k_caches, "
        "Tensor(b!)[] v_caches, Tensor slots, int n_head) -> Tensor");
}

TORCH_LIBRARY_IMPL(recyclegpt, CPU, m) {
  m.impl("skinny_linear", skinny_linear);
  m.impl("decode_blocks", decode_blocks);
}
