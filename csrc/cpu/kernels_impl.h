// The CPU hot loops, written once over a 16-lane fp32 vector type (csrc/cpu/isa.h).
//
// Included once by each of isa_generic.cpp, isa_avx2.cpp, isa_avx512.cpp, after that file has
// defined, inside `namespace sage_dist { namespace SD_ISA_NS { namespace {`:
//   V  16 fp32 lanes: V(float) broadcast, zero(), load/load_n (fp32, or bf16 bits as uint16_t;
//      load_n zero-pads lanes >= n), store, + - *, abs(), sign() (as elementwise::sign),
//      add_n(acc, x, n) (acc + x in lanes < n, acc elsewhere);
//   D  32 double lanes: zero(), add(V f0, V f1) (lane l += double(f0[l]), lane 16 + l +=
//      double(f1[l])), sum() (the lanes added as a tree: l + (l + 16), then + 8, + 4, + 2, + 1);
//   B  the running max of |bits| of fp32 values: zero(), add(V), max();
// and `namespace ew` = that file's copy of the shared math (sage_dist/elementwise.h).
//
// Every vector operation is one IEEE-rounded operation per lane (no FMA: -ffp-contract=off),
// in the order the scalar code and the pure-PyTorch references use, so each term, each update
// and therefore each canonical sum is the same bit for bit in every ISA's build.

namespace sage_dist {
namespace elementwise {  // (renamed per ISA by the including file, as every use here)
template <>
inline SD_ISA_NS::V sign_of<SD_ISA_NS::V>(SD_ISA_NS::V x) {
  return x.sign();
}
}  // namespace elementwise

namespace SD_ISA_NS {
namespace {

#define SD_ALWAYS_INLINE inline __attribute__((always_inline))

constexpr int kW = 16;          // lanes
constexpr int kBlockTerms = 8;  // fp32 terms per lane (row sums) or rows (column sums) per block

inline uint32_t abs_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b & 0x7FFFFFFFu;
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}
inline float to_float(float x) { return x; }
inline float to_float(uint16_t h) { return bf16_to_float(h); }

// What the statistics square: the gradient, or SCALE's head momentum formed in registers.
template <typename G>
struct GradX {
  const G* g;
  V vec(int64_t j) const { return V::load(g + j); }
  V vec_n(int64_t j, int n) const { return V::load_n(g + j, n); }
  float at(int64_t j) const { return to_float(g[j]); }
  GradX at_offset(int64_t off) const { return {g + off}; }
};

template <typename G>
struct MomentumX {
  const float* m;
  const G* g;
  ew::MomentumCoeffs k;
  V vec(int64_t j) const { return ew::momentum(V::load(m + j), V::load(g + j), k); }
  V vec_n(int64_t j, int n) const { return ew::momentum(V::load_n(m + j, n), V::load_n(g + j, n), k); }
  float at(int64_t j) const { return ew::momentum(m[j], to_float(g[j]), k); }
  MomentumX at_offset(int64_t off) const { return {m + off, g + off, k}; }
};

// The term (x r c)^2 of a statistic, HR / HC: with the row / column scale. Without a scale
// the product by 1 is left out: x * 1 == x exactly, so this is elementwise::scaled_square
// with r = 1 or c = 1, bit for bit.
template <bool HR, bool HC, typename T>
SD_ALWAYS_INLINE T term(T x, T r, T c) {
  if constexpr (HR && HC) {
    return ew::scaled_square(x, r, c);
  } else if constexpr (HR) {
    const T y = x * r;
    return y * y;
  } else if constexpr (HC) {
    const T y = x * c;
    return y * y;
  } else {
    return x * x;
  }
}

// Canonical row sums (isa.h): term j of a row segment goes to fp32 lane j % 32 (two vectors:
// lanes 0-15, 16-31); a lane adds 8 terms, then its partial goes to a double lane; at the end
// the 32 double lanes are added as a tree (lane l + lane l + 16, then + 8, 4, 2, 1). Two
// independent vectors (and the tree) keep the adds' latency off the critical path.
constexpr int kRowLanes = 2 * kW;

// D (the including file's): the 32 double lanes, kept in registers; D::sum() adds them as the
// tree above.
struct RowAcc {
  V f0, f1;
  D d;
  int k;
  SD_ALWAYS_INLINE RowAcc() : f0(V::zero()), f1(V::zero()), d(D::zero()), k(0) {}
  SD_ALWAYS_INLINE void flush() {
    d.add(f0, f1);
    f0 = f1 = V::zero();
    k = 0;
  }
  SD_ALWAYS_INLINE void add(V t0, V t1) {
    f0 = f0 + t0;
    f1 = f1 + t1;
    if (++k == kBlockTerms) flush();
  }
  // The last, partial vector pair: n < 32 terms.
  SD_ALWAYS_INLINE void add_tail(V t0, V t1, int n) {
    const int n0 = n < kW ? n : kW;
    f0 = V::add_n(f0, t0, n0);
    if (n > kW) f1 = V::add_n(f1, t1, n - kW);
  }
  SD_ALWAYS_INLINE double finish() {
    flush();
    return d.sum();
  }
};

template <bool HR, bool HC, bool CHECK, typename X>
SD_ALWAYS_INLINE void row_step(RowAcc& a, const X& x, const V& rv, const float* c, int64_t j, B& bits) {
  const V one(1.f);
  const V x0 = x.vec(j), x1 = x.vec(j + kW);
  if constexpr (CHECK) {
    bits.add(x0);
    bits.add(x1);
  }
  a.add(term<HR, HC>(x0, rv, HC ? V::load(c + j) : one),
        term<HR, HC>(x1, rv, HC ? V::load(c + j + kW) : one));
}

template <bool HR, bool HC, bool CHECK, typename X>
SD_ALWAYS_INLINE void row_tail(RowAcc& a, const X& x, const V& rv, const float* c, int64_t j, int n,
                     B& bits) {
  const V one(1.f);
  const int n0 = n < kW ? n : kW, n1 = n - n0;
  const V x0 = x.vec_n(j, n0), x1 = n1 ? x.vec_n(j + kW, n1) : V::zero();
  if constexpr (CHECK) {
    bits.add(x0);
    bits.add(x1);
  }
  a.add_tail(term<HR, HC>(x0, rv, HC ? V::load_n(c + j, n0) : one),
             n1 ? term<HR, HC>(x1, rv, HC ? V::load_n(c + j + kW, n1) : one) : V::zero(), n);
}

// The canonical sum of the terms of one row segment of `len` elements.
template <bool HR, bool HC, bool CHECK, typename X>
double row_sq(const X& x, float r, const float* c, int64_t len, B& bits_out) {
  B bits = bits_out;  // (a local copy stays in a register)
  RowAcc a;
  const V rv(r);
  int64_t j = 0;
  for (; j + kRowLanes <= len; j += kRowLanes) row_step<HR, HC, CHECK>(a, x, rv, c, j, bits);
  if (j < len) row_tail<HR, HC, CHECK>(a, x, rv, c, j, static_cast<int>(len - j), bits);
  if constexpr (CHECK) bits_out = bits;
  return a.finish();
}

// The same for two rows of equal length at once (shared loads of c), each summed exactly as
// row_sq sums it. `ahead` (or null): the next 2 len elements to be read after a few more
// rows, requested into cache at the pace of this pair's own reads (see sweep_t).
template <bool HC, bool CHECK, typename X>
void row_sq2(const X& x, const X& y, const float* c, int64_t len, B& bits_out, double& sx,
             double& sy, const char* ahead = nullptr) {
  B bits = bits_out;
  RowAcc a, b;
  const V one(1.f);
  int64_t j = 0;
  constexpr int64_t kStep = kRowLanes * sizeof(*x.g);  // bytes of one step of one row
  for (; j + kRowLanes <= len; j += kRowLanes) {
    if (ahead) {
      const char* q = ahead + 2 * (j / kRowLanes) * kStep;
      for (int64_t o = 0; o < 2 * kStep; o += 64) __builtin_prefetch(q + o, 0, 2);
    }
    row_step<false, HC, CHECK>(a, x, one, c, j, bits);
    row_step<false, HC, CHECK>(b, y, one, c, j, bits);
  }
  if (j < len) {
    row_tail<false, HC, CHECK>(a, x, one, c, j, static_cast<int>(len - j), bits);
    row_tail<false, HC, CHECK>(b, y, one, c, j, static_cast<int>(len - j), bits);
  }
  if constexpr (CHECK) bits_out = bits;
  sx = a.finish();
  sy = b.finish();
}

// acc[j] += term of element j, j in [0, len): one row's share of a column sum.
template <bool HR, bool HC, typename X>
SD_ALWAYS_INLINE void add_col_terms(float* acc, const X& x, float r, const float* c, int64_t len) {
  const V rv(r), one(1.f);
  int64_t j = 0;
  for (; j + kW <= len; j += kW)
    (V::load(acc + j) + term<HR, HC>(x.vec(j), rv, HC ? V::load(c + j) : one)).store(acc + j);
  for (; j < len; ++j) acc[j] = acc[j] + term<HR, HC>(x.at(j), r, HC ? c[j] : 1.f);
}

inline void flush_block(float* acc32, double* out64, int64_t C) {
  for (int64_t j = 0; j < C; ++j) {
    out64[j] += static_cast<double>(acc32[j]);
    acc32[j] = 0.f;
  }
}

// The columns [c0, c1) of global row i that the fragment holds, at offset `off` in it.
struct RowSpan {
  int64_t c0, c1, off;
};
inline RowSpan row_span(int64_t i, int64_t n, int64_t C, int64_t start) {
  const int64_t a = std::max(start, i * C), b = std::min(start + n, (i + 1) * C);
  return {a - i * C, b - i * C, a - start};
}

// Column sums of one chunk of rows (isa.h): blocks of 8 rows in fp32, then doubles.
template <typename AddRow>
void column_chunk(int64_t n, int64_t C, int64_t start, int64_t i0, int64_t i1, float* acc32,
                  double* out64, const AddRow& add_row) {
  std::fill(acc32, acc32 + C, 0.f);
  int rows = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const RowSpan s = row_span(i, n, C, start);
    add_row(acc32 + s.c0, i, s.c0, s.c1 - s.c0, s.off);
    if (++rows == kBlockTerms) {
      flush_block(acc32, out64, C);
      rows = 0;
    }
  }
  if (rows) flush_block(acc32, out64, C);
}

// ---------------------------------------------------------------------------------------
template <typename G, bool CHECK>
void colsum_abs_chunk_t(const G* g, int64_t n, int64_t C, int64_t start, int64_t i0, int64_t i1,
                        float* acc32, double* out64, uint32_t* bits) {
  B b = B::zero();
  uint32_t tail_bits = 0;
  column_chunk(n, C, start, i0, i1, acc32, out64,
               [&](float* acc, int64_t, int64_t, int64_t len, int64_t off) {
                 const G* row = g + off;
                 int64_t j = 0;
                 for (; j + kW <= len; j += kW) {
                   const V x = V::load(row + j);
                   if constexpr (CHECK) b.add(x);
                   (V::load(acc + j) + x.abs()).store(acc + j);
                 }
                 for (; j < len; ++j) {
                   const float x = to_float(row[j]);
                   if constexpr (CHECK) tail_bits = std::max(tail_bits, abs_bits(x));
                   acc[j] = acc[j] + std::fabs(x);
                 }
               });
  if constexpr (CHECK) *bits = std::max({*bits, b.max(), tail_bits});
}

void colsum_abs_chunk(const void* g, bool g_bf16, int64_t n, int64_t C, int64_t start,
                      int64_t i0, int64_t i1, float* acc32, double* out64, uint32_t* bits) {
  if (g_bf16) {
    const auto* gp = static_cast<const uint16_t*>(g);
    bits ? colsum_abs_chunk_t<uint16_t, true>(gp, n, C, start, i0, i1, acc32, out64, bits)
         : colsum_abs_chunk_t<uint16_t, false>(gp, n, C, start, i0, i1, acc32, out64, bits);
  } else {
    const auto* gp = static_cast<const float*>(g);
    bits ? colsum_abs_chunk_t<float, true>(gp, n, C, start, i0, i1, acc32, out64, bits)
         : colsum_abs_chunk_t<float, false>(gp, n, C, start, i0, i1, acc32, out64, bits);
  }
}

// ---------------------------------------------------------------------------------------
// sq_sums: calls f(x) with the source of the statistic (gradient or momentum, fp32 or bf16).
template <typename F>
void with_source(const cpu::SqArgs& a, const F& f) {
  if (a.g_bf16) {
    const auto* g = static_cast<const uint16_t*>(a.g);
    if (a.m) {
      f(MomentumX<uint16_t>{a.m, g, ew::make_momentum_coeffs(a.beta)});
    } else {
      f(GradX<uint16_t>{g});
    }
  } else {
    const auto* g = static_cast<const float*>(a.g);
    if (a.m) {
      f(MomentumX<float>{a.m, g, ew::make_momentum_coeffs(a.beta)});
    } else {
      f(GradX<float>{g});
    }
  }
}

// Calls f(std::bool_constant<HR>, std::bool_constant<HC>).
template <typename F>
void with_scales(bool hr, bool hc, const F& f) {
  if (hr) {
    hc ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  } else {
    hc ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
  }
}

void sq_cols_chunk(const cpu::SqArgs& a, int64_t i0, int64_t i1, float* acc32, double* out64) {
  with_source(a, [&](const auto& x) {
    with_scales(a.r != nullptr, a.c != nullptr, [&](auto hr, auto hc) {
      constexpr bool HR = decltype(hr)::value, HC = decltype(hc)::value;
      column_chunk(a.n, a.C, a.start, i0, i1, acc32, out64,
                   [&](float* acc, int64_t i, int64_t c0, int64_t len, int64_t off) {
                     add_col_terms<HR, HC>(acc, x.at_offset(off), HR ? a.r[i] : 1.f,
                                           HC ? a.c + c0 : nullptr, len);
                   });
    });
  });
}

void sq_rows(const cpu::SqArgs& a, int64_t i0, int64_t i1, float* out) {
  with_source(a, [&](const auto& x) {
    with_scales(a.r != nullptr, a.c != nullptr, [&](auto hr, auto hc) {
      constexpr bool HR = decltype(hr)::value, HC = decltype(hc)::value;
      B unused = B::zero();
      for (int64_t i = i0; i < i1; ++i) {
        const RowSpan s = row_span(i, a.n, a.C, a.start);
        out[i] = static_cast<float>(row_sq<HR, HC, false>(
            x.at_offset(s.off), HR ? a.r[i] : 1.f, HC ? a.c + s.c0 : nullptr, s.c1 - s.c0,
            unused));
      }
    });
  });
}

// ---------------------------------------------------------------------------------------
// The column terms (x r)^2 of the n <= 8 rows of one block, per column added in row order
// from the first term in fp32, then widened into out64: bit for bit what add_col_terms row
// after row and flush_block give (0 + t == t for a square), without storing and reloading
// the fp32 partials between rows, which bounded the column pass.
template <typename G>
SD_ALWAYS_INLINE void block_col_terms(const G* g, int64_t C, const float* r, int n,
                                      float* acc32, double* out64) {
  V rv[kBlockTerms];
  for (int k = 0; k < n; ++k) rv[k] = V(r[k]);
  const V one(1.f);
  int64_t j = 0;
  for (; j + kW <= C; j += kW) {
    V sum = term<true, false>(V::load(g + j), rv[0], one);
    for (int k = 1; k < n; ++k) sum = sum + term<true, false>(V::load(g + k * C + j), rv[k], one);
    sum.store(acc32 + j);
  }
  for (; j < C; ++j) {
    float sum = term<true, false>(to_float(g[j]), r[0], 1.f);
    for (int k = 1; k < n; ++k) sum = sum + term<true, false>(to_float(g[k * C + j]), r[k], 1.f);
    acc32[j] = sum;
  }
  flush_block(acc32, out64, C);
}

// One Sinkhorn iteration over whole rows [i0, i1): row sum with the current c, the row's new
// scale, its column terms with that scale. The same row_sq / blocks as sq_rows (dim 1, r
// absent) and sq_cols_chunk (dim 0, c absent), so the phase-by-phase path gets the same
// numbers. Block by block (8 rows; chunks start on a block): the rows' sums in pairs, their
// new scales, then the block's column terms while its rows are in L1/L2. While a pair is
// summed, the same pair of the next block is prefetched: on a gradient that is not in cache
// (a sharded run's sweeps, one per iteration) the hardware prefetcher alone left a core at
// ~8 GB/s of its ~24; with this ~11 (x40 [256, 1376] fragments, one thread). A sweep over
// a matrix already in cache (a whole matrix's iterations after the first) goes without: the
// prefetches then only cost issue slots (one in-cache sweep of a [1376, 512] matrix, one
// thread: 68 -> 57-59 us). Prefetches change no result.
template <typename G, bool HC, bool CHECK>
void sweep_t(const G* g, int64_t C, int64_t i0, int64_t i1, const float* c, float* r, float rt,
             float eps, float* acc32, double* out64, uint32_t* bits, bool prefetch) {
  B b = B::zero();
  auto row = [&](int64_t i) { return GradX<G>{g + i * C}; };
  for (int64_t b0 = i0; b0 < i1; b0 += kBlockTerms) {
    const int64_t b1 = std::min(i1, b0 + kBlockTerms);
    int64_t i = b0;
    for (; i + 1 < b1; i += 2) {
      double s0, s1;
      const int64_t next = i + kBlockTerms;
      row_sq2<HC, CHECK>(row(i), row(i + 1), c, C, b, s0, s1,
                         prefetch && next + 1 < i1 ? reinterpret_cast<const char*>(g + next * C)
                                                   : nullptr);
      r[i] = ew::sinkhorn_rescale(r[i], static_cast<float>(s0), rt, eps);
      r[i + 1] = ew::sinkhorn_rescale(r[i + 1], static_cast<float>(s1), rt, eps);
    }
    if (i < b1) {  // an odd last row
      const double s = row_sq<false, HC, CHECK>(row(i), 1.f, c, C, b);
      r[i] = ew::sinkhorn_rescale(r[i], static_cast<float>(s), rt, eps);
    }
    block_col_terms(g + b0 * C, C, r + b0, static_cast<int>(b1 - b0), acc32, out64);
  }
  if constexpr (CHECK) *bits = std::max(*bits, b.max());
}

template <typename G>
void sweep_g(const G* g, int64_t C, int64_t i0, int64_t i1, const float* c, float* r, float rt,
             float eps, float* acc32, double* out64, uint32_t* bits, bool prefetch) {
  const auto run = [&](auto hc, auto check) {
    sweep_t<G, decltype(hc)::value, decltype(check)::value>(g, C, i0, i1, c, r, rt, eps, acc32,
                                                            out64, bits, prefetch);
  };
  if (c) {
    bits ? run(std::true_type{}, std::true_type{}) : run(std::true_type{}, std::false_type{});
  } else {
    bits ? run(std::false_type{}, std::true_type{}) : run(std::false_type{}, std::false_type{});
  }
}

void sinkhorn_sweep(const void* g, bool g_bf16, int64_t C, int64_t i0, int64_t i1,
                    const float* c, float* r, float rt, float eps, float* acc32, double* out64,
                    uint32_t* bits, bool prefetch) {
  if (g_bf16) {
    sweep_g(static_cast<const uint16_t*>(g), C, i0, i1, c, r, rt, eps, acc32, out64, bits,
            prefetch);
  } else {
    sweep_g(static_cast<const float*>(g), C, i0, i1, c, r, rt, eps, acc32, out64, bits,
            prefetch);
  }
}

// ---------------------------------------------------------------------------------------
void scaled_rows(float* p, const float* g, const float* r, const float* c, int64_t n, int64_t C,
                 int64_t start, int64_t i0, int64_t i1, double lr, double wd, double step) {
  const ew::ScaledCoeffs k = ew::make_scaled_coeffs(lr, wd, step);
  const V one(1.f);
  for (int64_t i = i0; i < i1; ++i) {
    const RowSpan s = row_span(i, n, C, start);
    float* pp = p + s.off;
    const float* gg = g + s.off;
    const float* cc = c ? c + s.c0 : nullptr;
    const float ri = r ? r[i] : 1.f;
    const V rv(ri);
    const int64_t len = s.c1 - s.c0;
    int64_t j = 0;
    for (; j + kW <= len; j += kW)
      ew::scaled_update(V::load(pp + j), V::load(gg + j), rv, cc ? V::load(cc + j) : one, k)
          .store(pp + j);
    for (; j < len; ++j) pp[j] = ew::scaled_update(pp[j], gg[j], ri, cc ? cc[j] : 1.f, k);
  }
}

template <bool MF>
void sage_rows_t(float* p, float* m, const float* g, const float* h, int64_t n, int64_t C,
                 int64_t start, int64_t i0, int64_t i1, ew::SageCoeffs k) {
  k.momentum_first = MF;  // a constant in each instantiation: no branch per element
  for (int64_t i = i0; i < i1; ++i) {
    const RowSpan s = row_span(i, n, C, start);
    float* pp = p + s.off;
    float* mm = m + s.off;
    const float* gg = g + s.off;
    const float* hh = h + s.c0;
    const int64_t len = s.c1 - s.c0;
    int64_t j = 0;
    for (; j + kW <= len; j += kW) {
      V pv = V::load(pp + j), mv = V::load(mm + j);
      ew::sage_update(pv, mv, V::load(gg + j), V::load(hh + j), k);
      pv.store(pp + j);
      mv.store(mm + j);
    }
    for (; j < len; ++j) ew::sage_update(pp[j], mm[j], gg[j], hh[j], k);
  }
}

void sage_rows(float* p, float* m, const float* g, const float* h, int64_t n, int64_t C,
               int64_t start, int64_t i0, int64_t i1, double lr, double beta1, double beta2,
               double wd, bool momentum_first) {
  const ew::SageCoeffs k = ew::make_sage_coeffs(lr, beta1, beta2, wd, momentum_first);
  momentum_first ? sage_rows_t<true>(p, m, g, h, n, C, start, i0, i1, k)
                 : sage_rows_t<false>(p, m, g, h, n, C, start, i0, i1, k);
}

const cpu::Kernels kTable = {SD_ISA_NAME,  &colsum_abs_chunk, &sq_cols_chunk, &sq_rows,
                             &sinkhorn_sweep, &scaled_rows,    &sage_rows};

}  // namespace
}  // namespace SD_ISA_NS
}  // namespace sage_dist

#undef SD_ALWAYS_INLINE
