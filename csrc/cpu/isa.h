// The CPU kernels' hot loops, compiled once per vector ISA and chosen at run time.
//
// csrc/cpu/kernels_impl.h holds the loops, written once over a 16-lane fp32 vector type;
// isa_generic.cpp, isa_avx2.cpp and isa_avx512.cpp compile it with the base build's flags,
// `#pragma GCC target("avx2")` and `#pragma GCC target("avx512f")`, each inside its own
// namespaces (so no inline function compiled for one ISA can stand in for another's). The
// first call picks the best set the CPU supports (__builtin_cpu_supports); the environment
// variable SAGE_DIST_CPU_ISA (auto | avx512 | avx2 | generic) or sage_dist_set_cpu_isa()
// asks for another one (a set the CPU lacks is never chosen). Every set gives the same
// numbers bit for bit: the lanes, blocks and chunks of every sum are the same in all three
// (the "canonical" order below), and the updates are per element.
//
// Canonical sums (all terms >= 0):
//   row sum of one row segment: term j goes to fp32 lane j % 32 (two 16-lane vectors); each
//     lane adds 8 terms in fp32, then its fp32 partial is added to a double lane; the 32
//     double lanes are added as a tree at the end (lane l + lane l + 16, then + 8, 4, 2, 1).
//   column sums over the rows of a fragment: the rows are cut into chunks of
//     rows_per_chunk(C) rows (counted from the fragment's first row), each chunk into
//     blocks of 8 rows; a block adds its rows per column in fp32, in row order; the block
//     partials are added to a double per column and chunk; the chunks' doubles are added in
//     chunk order. So the result does not depend on how chunks are spread over threads.
#pragma once

#include <cstdint>

namespace sage_dist {
namespace cpu {

// Rows per chunk of a column sum: about 128K elements, a multiple of the 8-row block.
inline int64_t rows_per_chunk(int64_t C) {
  const int64_t rows = (int64_t{1} << 17) / (C > 0 ? C : 1);
  return rows < 8 ? 8 : (rows + 7) / 8 * 8;
}

// The value an element's |bits| must reach to be Inf or NaN (fp32 exponent all ones).
constexpr uint32_t kNonfiniteBits = 0x7F800000u;

// Inputs of the sums of squares of (x r c): x = g, or SCALE's head momentum
// beta m + (1 - beta) g when m is set. g holds fp32, or bf16 bits when g_bf16.
struct SqArgs {
  const void* g;
  bool g_bf16;
  const float* m;  // nullable
  double beta;
  const float* r;  // nullable: ones
  const float* c;  // nullable: ones
  int64_t n, C, start;
};

// Every loop takes the fragment [start, start + n) of a row-major matrix with C columns and
// the global rows [i0, i1) of it to work on. Column-sum loops write one chunk's partials:
// out64[C] (zeroed by the caller) with acc32[C] as scratch. `bits`, when not null, gets the
// max of |bits| over the elements of g (Inf or NaN iff >= kNonfiniteBits).
struct Kernels {
  const char* name;
  void (*colsum_abs_chunk)(const void* g, bool g_bf16, int64_t n, int64_t C, int64_t start,
                           int64_t i0, int64_t i1, float* acc32, double* out64, uint32_t* bits);
  void (*sq_cols_chunk)(const SqArgs& a, int64_t i0, int64_t i1, float* acc32, double* out64);
  void (*sq_rows)(const SqArgs& a, int64_t i0, int64_t i1, float* out);
  // One Sinkhorn iteration's sweep over the whole rows [i0, i1) of a whole [R, C] matrix:
  // for each row its sum of (g c)^2 (c null: ones), its new scale r[i] (sinkhorn_rescale
  // with target rt), then its terms (g r[i])^2 into the chunk's column partials.
  // `prefetch`: g is (likely) not in cache; its next rows are requested ahead of the reads.
  void (*sinkhorn_sweep)(const void* g, bool g_bf16, int64_t C, int64_t i0, int64_t i1,
                         const float* c, float* r, float rt, float eps, float* acc32,
                         double* out64, uint32_t* bits, bool prefetch);
  // fp32 parameter and gradient only (other dtypes: the base build's loops).
  void (*scaled_rows)(float* p, const float* g, const float* r, const float* c, int64_t n,
                      int64_t C, int64_t start, int64_t i0, int64_t i1, double lr, double wd,
                      double step);
  void (*sage_rows)(float* p, float* m, const float* g, const float* h, int64_t n, int64_t C,
                    int64_t start, int64_t i0, int64_t i1, double lr, double beta1,
                    double beta2, double wd, bool momentum_first);
};

const Kernels* kernels_generic();
const Kernels* kernels_avx2();    // null when not compiled in (not x86-64 / not GCC-like)
const Kernels* kernels_avx512();  // idem

// The set in use (chosen on the first call).
const Kernels& kernels();

}  // namespace cpu
}  // namespace sage_dist

// For Python (ctypes) and the tests: the name of the set in use, and a way to ask for one.
// sage_dist_set_cpu_isa returns 0 when `name` ("auto", "avx512", "avx2", "generic") is
// now in use, -1 when the CPU lacks it or the name is unknown (nothing changes then).
extern "C" const char* sage_dist_cpu_isa();
extern "C" int sage_dist_set_cpu_isa(const char* name);
