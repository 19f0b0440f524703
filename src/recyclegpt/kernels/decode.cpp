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
int64_t tiles_of(int64_t N) { return (panels_of(N) + TILE - 1) / TILE; }  // of TILE panels, the last maybe fewer

// Numbers the parts' tiles one after the other; returns the total.
template <typename W>
int64_t total_tiles(std::vector<Part<W>>& parts) {
  int64_t tiles = 0;
  for (Part<W>& part : parts) {
    part.first_tile = tiles;
    tiles += tiles_of(part.N);
  }
  return tiles;
}

// Tile i of one part (its outputs 64i.., fewer at the end) for all M rows of X [M, K].
template <typename W>
inline void part_tile(const Part<W>& part, const float* X, int64_t M, int64_t K, int64_t i) {
  const int64_t p0 = i * TILE, np = panels_of(part.N);
  if (p0 + TILE <= np) {
    rows<TILE>(X, part.P, part.B, part.Y, M, K, part.N, p0);
  } else {
    for (int64_t q = p0; q < np; ++q) rows<1>(X, part.P, part.B, part.Y, M, K, part.N, q);
  }
}

// Tiles [begin, end) over `parts` (in order), for all M rows of X [M, K].
template <typename W>
void linear_tiles(const std::vector<Part<W>>& parts, const float* X, int64_t M, int64_t K, int64_t begin,
                  int64_t end) {
  size_t p = 0;
  for (int64_t i = begin; i < end; ++i) {
    while (p + 1 < parts.size() && i >= parts[p + 1].first_tile) ++p;
    part_tile(parts[p], X, M, K, i - parts[p].first_tile);
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

// The 16 lanes of a dot product's accumulator summed in a fixed order.
inline float lane_sum(vec16 acc) {
  typedef float vec8 __attribute__((vector_size(32)));
  typedef float vec4 __attribute__((vector_size(16)));
  vec8 a8 = __builtin_shufflevector(acc, acc, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15);
  vec4 a4 = __builtin_shufflevector(a8, a8, 0, 1, 2, 3) + __builtin_shufflevector(a8, a8, 4, 5, 6, 7);
  return (a4[0] + a4[2]) + (a4[1] + a4[3]);
}

// R query heads q[r] (D values each) against the cached keys of the nv slots vis[]: sc[r * S + j] =
// q_r . k_vis[j] * scale + bias[r][vis[j]]. Each key is read once for the R heads; each head's dot product is
// computed as it would be alone (16-lane FMAs along D, `lane_sum`, then the tail).
template <int R, typename T>
inline void head_scores(const float* const* q, const T* kc, const int32_t* vis, int64_t nv, const float* const* bias,
                        int64_t D, int64_t S, float scale, float* sc) {
  const int64_t n16 = D - D % 16;
  for (int64_t j = 0; j < nv; ++j) {
    const T* k = kc + vis[j] * D;
    vec16 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = vec16{};
    for (int64_t i = 0; i < n16; i += 16) {
      const vec16 kv = load16(k + i);
      for (int r = 0; r < R; ++r) acc[r] += load16(q[r] + i) * kv;  // one FMA per lane
    }
    for (int r = 0; r < R; ++r) {
      float dot = lane_sum(acc[r]);
      for (int64_t i = n16; i < D; ++i) dot = __builtin_fmaf(q[r][i], to_f(k[i]), dot);
      sc[r * S + j] = dot * scale + bias[r][vis[j]];
    }
  }
}

// out[r] = sum_j p[r * S + j] * v_vis[j] for R heads: per output value, one FMA per slot in order, with the
// accumulators in registers 16 values at a time.
template <int R, typename T>
inline void head_values(const float* p, const T* vc, const int32_t* vis, int64_t nv, int64_t D, int64_t S,
                        float* const* out) {
  int64_t c = 0;
  for (; c + 16 <= D; c += 16) {
    vec16 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = vec16{};
    for (int64_t j = 0; j < nv; ++j) {
      const vec16 v = load16(vc + vis[j] * D + c);
      for (int r = 0; r < R; ++r) acc[r] += p[r * S + j] * v;  // one FMA per lane
    }
    for (int r = 0; r < R; ++r) std::memcpy(out[r] + c, &acc[r], sizeof(vec16));
  }
  for (; c < D; ++c)
    for (int r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t j = 0; j < nv; ++j) acc = __builtin_fmaf(p[r * S + j], to_f(vc[vis[j] * D + c]), acc);
      out[r][c] = acc;
    }
}

// exp of 16 values (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n), within 2 ulp of expf;
// below -87.3, -inf included, exactly 0. Each lane's result depends on its own input only.
inline vec16 exp16(vec16 x) {
  typedef int32_t i32x16 __attribute__((vector_size(64)));
  const vec16 zero{}, lo = zero - 87.33654f, hi = zero + 88.72283f;
  const i32x16 under = x < lo;
  x = x < lo ? lo : (x > hi ? hi : x);
  vec16 fx = x * 1.44269504088896341f + 0.5f;
  vec16 n = __builtin_convertvector(__builtin_convertvector(fx, i32x16), vec16);
  n = n > fx ? n - 1.f : n;  // floor
  const vec16 r = x - n * 0.693359375f - n * -2.12194440e-4f;
  vec16 y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.f;
  const i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
  vec16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  y *= scale;
  return under ? zero : y;
}

// g[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u for n <= 16 values, through `exp16`.
inline void silu16(float* g, const float* u, int64_t n) {
  float gb[16] = {}, ub[16] = {};
  std::memcpy(gb, g, n * sizeof(float));
  std::memcpy(ub, u, n * sizeof(float));
  const vec16 gv = load16(gb), y = gv / (1.f + exp16(vec16{} - gv)) * load16(ub);
  std::memcpy(gb, &y, sizeof(y));
  std::memcpy(g, gb, n * sizeof(float));
}

// R heads' softmax(q.k * scale + bias) @ v over the slots vis[] (`head_scores`, `head_values`). Score rows are
// padded with -inf to a multiple of 16 (exp 0): max and exp go 16 slots at a time, lane by lane; the sums go slot
// by slot in order (the R heads' sums side by side), so a slot's place among the visited ones never matters.
template <int R, typename T>
inline void attend_heads(const float* const* q, const T* kc, const T* vc, const int32_t* vis, int64_t nv,
                         const float* const* bias, int64_t D, int64_t S, float scale, float* sc, float* const* out) {
  head_scores<R>(q, kc, vis, nv, bias, D, S, scale, sc);
  const int64_t n16 = (nv + 15) / 16 * 16;
  const float ninf = -std::numeric_limits<float>::infinity();
  float sum[R];
  for (int r = 0; r < R; ++r) {
    float* row = sc + r * S;
    for (int64_t j = nv; j < n16; ++j) row[j] = ninf;
    vec16 m = load16(row);
    for (int64_t j = 16; j < n16; j += 16) {
      const vec16 v = load16(row + j);
      m = v > m ? v : m;
    }
    float mx = m[0];
    for (int i = 1; i < 16; ++i) mx = std::max(mx, m[i]);
    for (int64_t j = 0; j < n16; j += 16) {
      const vec16 e = exp16(load16(row + j) - mx);
      std::memcpy(row + j, &e, sizeof(e));
    }
    sum[r] = 0.f;
  }
  for (int64_t j = 0; j < nv; ++j)
    for (int r = 0; r < R; ++r) sum[r] += sc[r * S + j];
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < n16; j += 16) {
      const vec16 p = load16(sc + r * S + j) / sum[r];
      std::memcpy(sc + r * S + j, &p, sizeof(p));
    }
  head_values<R>(sc, vc, vis, nv, D, S, out);
}

// Attention of every query head that reads one kv head of one batch row (`layers.cache_attention`): the T rows'
// `rep` heads each, n = T * rep heads with query q[i], bias row bias[i] (a slot is visible where it is not -inf)
// and output out[i]; per head softmax(q.k * scale + bias) @ v. The slots visited are those some row sees, in
// order, each cached key and value read once for up to 4 heads at a time. A slot a row does not see adds exactly
// nothing to that row (a score of -inf, exp 0, a multiply-add of 0 to a sum that is never -0), so each head's
// result has the bits it gets when its row is attended alone: a one-token pass and a wider one agree.
// scratch: 5 * S16 floats (S16: S rounded up to 16; 4 heads' scores, then the visited slots as int32).
template <typename T>
inline void attend(const float* const* q, const T* kc, const T* vc, const float* const* bias, int64_t n, int64_t S,
                   int64_t D, float scale, float* scratch, float* const* out) {
  const int64_t S16 = (S + 15) / 16 * 16;  // score rows' stride: room to pad them to a multiple of 16
  int32_t* vis = reinterpret_cast<int32_t*>(scratch + 4 * S16);
  const float ninf = -std::numeric_limits<float>::infinity();
  int64_t nv = 0;
  for (int64_t s = 0; s < S; ++s) {
    bool seen = false;
    for (int64_t i = 0; i < n && !seen; ++i) seen = bias[i][s] != ninf;
    if (seen) vis[nv++] = static_cast<int32_t>(s);
  }
  for (int64_t i = 0; i < n; i += 4) {
    switch (std::min<int64_t>(4, n - i)) {
      case 4: attend_heads<4>(q + i, kc, vc, vis, nv, bias + i, D, S16, scale, scratch, out + i); break;
      case 3: attend_heads<3>(q + i, kc, vc, vis, nv, bias + i, D, S16, scale, scratch, out + i); break;
      case 2: attend_heads<2>(q + i, kc, vc, vis, nv, bias + i, D, S16, scale, scratch, out + i); break;
      default: attend_heads<1>(q + i, kc, vc, vis, nv, bias + i, D, S16, scale, scratch, out + i);
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
  TORCH_CHECK(D <= 512 && H % Hkv == 0 && kc0.size(0) >= Bt && bias.size(-1) == S && bias.size(-2) == T_ &&
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
    w.gate_up_tiles = tiles_of(F);  // tiles of gate, each with its up tile
    w.down_tiles = total_tiles(w.down);
    w.F = F;
    w.k_cache = k_caches[l].data_ptr<T>();
    w.v_cache = v_caches[l].data_ptr<T>();
    F_max = std::max(F_max, F);
  }
  // float32 scratch in one allocation: the residual stream X, normed XN, q, k, v, attention output A, the
  // attention's residual X1, gate G, up U, down O, and each thread's attention scores.
  const int nt = at::get_num_threads();
  const int64_t S16 = (S + 15) / 16 * 16;
  const int64_t sizes[] = {M * d, M * d, M * H * D, M * Hkv * D, M * Hkv * D, M * H * D, M * d, M * F_max,
                           M * F_max, M * d, nt * 5 * S16};  // attention scratch (`attend`)
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
    std::vector<const float*> qs(T_ * rep), bs(T_ * rep);  // `attend`'s heads: queries, bias rows, outputs
    std::vector<float*> os(T_ * rep);
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
      // Per (batch row, kv head): the query heads of its T rows that read that kv head (query head h reads kv
      // head h / rep).
      share(Bt * Hkv, tid, n, b0, b1);
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t b = i / Hkv, g = i % Hkv;
        for (int64_t t = 0; t < T_; ++t)
          for (int64_t r = 0; r < rep; ++r) {
            const int64_t at = ((b * T_ + t) * H + g * rep + r) * D;
            qs[t * rep + r] = Q + at;
            os[t * rep + r] = A + at;
            bs[t * rep + r] = Bias + b * bias_rows + t * S;
          }
        attend(qs.data(), w.k_cache + (b * Hkv + g) * S * D, w.v_cache + (b * Hkv + g) * S * D, bs.data(),
               T_ * rep, S, D, scale, Scores + tid * 5 * S16, os.data());
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
      // Gate tile i and up tile i, then silu(gate) * up over their outputs, by the same thread (no barrier and no
      // cross-core copy in between), 16 values of a row at a time (`silu16`): every value takes the same path at
      // any row count.
      share(w.gate_up_tiles, tid, n, b0, b1);
      for (int64_t i = b0; i < b1; ++i) {
        part_tile(w.gate_up[0], XN, M, d, i);
        part_tile(w.gate_up[1], XN, M, d, i);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t c = i * TILE * PANEL; c < std::min(w.F, (i + 1) * TILE * PANEL); c += 16)
            silu16(G + m * w.F + c, U + m * w.F + c, std::min<int64_t>(16, w.F - c));
      }
#pragma omp barrier
      share(w.down_tiles, tid, n, b0, b1);
      linear_tiles(w.down, G, M, w.F, b0, b1);
#pragma omp barrier
      // The feed-forward's residual: the block's output, rounded to T (a no-op in float32) as it would be
      // between two separate block calls; then the next block's input norm of the same rows.
      share(M, tid, n, b0, b1);
      for (int64_t m = b0; m < b1; ++m) {
        for (int64_t i = m * d; i < (m + 1) * d; ++i) X[i] = to_f(from_f<T>(O[i] + X1[i]));
        if (l + 1 < L) rms_norm(X + m * d, blocks[l + 1].attn_norm, epsf, d, XN + m * d);
      }
    }
    // The last block's output, from the rows this thread just wrote (X holds values exact in T).
    for (int64_t i = b0 * d; i < b1 * d; ++i) Out[i] = from_f<T>(X[i]);
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
