// Launch shapes and index arithmetic of the CUDA kernels (csrc/cuda/), written as plain
// host/device functions with no CUDA or ATen dependency: tests/test_gpu_ready.py compiles this
// header with g++ into a small program and checks the shapes (blocks, threads, grid limits,
// chunking, which thread covers which element) for many fragments, without a GPU.
//
// A fragment is elements [start, start + n) of the row-major flat index of a global [R, C]
// matrix; element k sits at row (start + k) / C, column (start + k) % C.
//
// Statistics (row and column sums) add kStatTerms terms per thread in fp32, then widen to
// double, as the CPU kernels do (csrc/cpu/fragment_cpu.cpp: all terms are >= 0, so an fp32
// partial is within kStatTerms - 1 roundings, under 5e-7 relative); everything after that is
// double. Their launch shapes depend on the fragment's geometry only, never on the GPU, so
// every rank and every GPU model adds in the same order and gets the same bits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef __CUDACC__
#define SAGE_HD __host__ __device__
#else
#define SAGE_HD
#endif

namespace sage_dist {
namespace launch {

constexpr int kThreads = 256;                   // threads per block, every kernel
constexpr int kStatTerms = 8;                   // fp32 terms per partial before widening
constexpr int64_t kMaxGridX = 2147483647;       // 2^31 - 1
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kColumnSumBlocks = 1024;      // column sums aim at this many blocks
constexpr int64_t kBlocksPerSM = 8;             // grid-stride kernels: 8 x 256 threads per SM
constexpr int64_t kChunk = 16384;               // multi-tensor apply: elements per block

SAGE_HD inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
SAGE_HD inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b near INT64_MAX.
SAGE_HD inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// Smallest power of two >= x, at most cap (cap a power of two); 1 for x <= 1.
inline int pow2_at_least(int64_t x, int cap) {
  int p = 1;
  while (p < x && p < cap) p <<= 1;
  return p;
}

// Largest power of two <= x, at most cap (cap a power of two); 1 for x <= 1.
inline int pow2_at_most(int64_t x, int cap) {
  int p = 1;
  while (2 * static_cast<int64_t>(p) <= x && 2 * p <= cap) p <<= 1;
  return p;
}

// The rows [first, first + count) that the fragment touches (count = 0 when n = 0).
struct Rows {
  int64_t first = 0;
  int64_t count = 0;
};

SAGE_HD inline Rows rows_of(int64_t n, int64_t C, int64_t start) {
  Rows r;
  r.first = start / C;
  r.count = n <= 0 ? 0 : (start + n - 1) / C - r.first + 1;
  return r;
}

// ---------------------------------------------------------------------------
// Element-wise kernels: a grid-stride loop of kThreads-thread blocks over n elements.
// Enough blocks to fill the GPU (kBlocksPerSM per SM), never more than there are elements
// for, never more than grid.x allows; 0 for n = 0 (no launch).
inline int64_t elementwise_blocks(int64_t n, int64_t sm_count) {
  if (n <= 0) return 0;
  const int64_t cap = max64(1, kBlocksPerSM * sm_count);
  return min64(min64(ceil_div(n, kThreads), cap), kMaxGridX);
}

// (row, column) of a flat index, and a grid-stride loop's step in those terms, so that a
// thread divides twice when it starts and then only adds: no 64-bit `/` or `%` per element.
struct Pos {
  int64_t row;
  int64_t col;
};
struct Step {
  int64_t rows;
  int64_t cols;  // < C
};

SAGE_HD inline Pos pos_of(int64_t flat, int64_t C) { return {flat / C, flat % C}; }
SAGE_HD inline Step step_of(int64_t stride, int64_t C) { return {stride / C, stride % C}; }
SAGE_HD inline void advance(Pos& p, const Step& s, int64_t C) {
  p.row += s.rows;
  p.col += s.cols;
  if (p.col >= C) {
    p.col -= C;
    ++p.row;
  }
}

// ---------------------------------------------------------------------------
// Column sums. A block is block_x columns by block_y row lanes (block_x * block_y <=
// kThreads). Block (tile, band) covers columns col_begin + tile * block_x + [0, block_x) and
// rows first_row + band * band_rows + [0, band_rows); lane y of it takes the rows y,
// y + block_y, ... of the band, adding kStatTerms of them in fp32 before widening to double.
// The block adds its lanes in double, in lane order; with bands > 1 each band writes a
// double partial per column and a second kernel adds the bands in band order.
//
// Columns: the fragment's own min(n, C) columns, from its first one, start % C, on (modulo
// C: a fragment of n < C elements that crosses a row boundary holds the columns at the end
// of one row and at the start of the next, never a column twice); `column` maps the block's
// column index to the matrix's.
// Bands: as many as it takes to reach about kColumnSumBlocks blocks, but never so many
// that a lane gets fewer than kStatTerms rows, never more than grid.y allows.
struct ColumnSumShape {
  int64_t first_row = 0;
  int64_t rows = 0;       // 0: nothing to launch
  int64_t col_begin = 0;
  int64_t cols = 0;       // columns col_begin, col_begin + 1, ... (cols of them, modulo C)
  int block_x = 1;
  int block_y = 1;
  int64_t col_tiles = 0;  // grid.x
  int64_t bands = 0;      // grid.y
  int64_t band_rows = 0;
  bool fits = true;       // false: the grid exceeds the hardware's limits (refuse)
};

// Column of the matrix for column index jj < s.cols of the shape.
SAGE_HD inline int64_t column(const ColumnSumShape& s, int64_t jj, int64_t C) {
  const int64_t j = s.col_begin + jj;
  return j >= C ? j - C : j;
}

inline ColumnSumShape column_sum_shape(int64_t n, int64_t C, int64_t start) {
  ColumnSumShape s;
  const Rows r = rows_of(n, C, start);
  s.first_row = r.first;
  s.rows = r.count;
  if (r.count == 0) return s;
  s.col_begin = start % C;
  s.cols = min64(n, C);
  s.block_x = pow2_at_least(s.cols, 32);
  const int lanes = kThreads / s.block_x;
  s.block_y = pow2_at_least(ceil_div(s.rows, kStatTerms), lanes);
  s.col_tiles = ceil_div(s.cols, s.block_x);
  const int64_t wanted = max64(1, ceil_div(kColumnSumBlocks, s.col_tiles));
  const int64_t most = ceil_div(s.rows, static_cast<int64_t>(s.block_y) * kStatTerms);
  s.bands = min64(min64(wanted, most), kMaxGridY);
  s.band_rows = ceil_div(s.rows, s.bands);
  s.bands = ceil_div(s.rows, s.band_rows);  // no empty band
  s.fits = s.col_tiles <= kMaxGridX && s.bands <= kMaxGridY;
  return s;
}

// ---------------------------------------------------------------------------
// Row sums. threads_per_row consecutive threads (a power of two) sum one row: thread l takes
// the row's elements l, l + threads_per_row, ..., kStatTerms at a time in fp32, then double;
// the row's threads are added in double by a fixed tree. A block holds
// rows_per_block = kThreads / threads_per_row rows and walks groups of them grid-stride,
// so any number of rows fits the grid. threads_per_row follows the longest row piece,
// min(C, n): short rows do not leave most of a block idle, long rows get a whole block.
// `max_blocks` (kBlocksPerSM x the SM count) only spreads the rows: each row's sum is
// computed the same way whatever the grid.
struct RowSumShape {
  int64_t first_row = 0;
  int64_t rows = 0;  // 0: nothing to launch
  int threads_per_row = 1;
  int rows_per_block = kThreads;
  int64_t blocks = 0;  // grid.x
};

inline RowSumShape row_sum_shape(int64_t n, int64_t C, int64_t start, int64_t max_blocks) {
  RowSumShape s;
  const Rows r = rows_of(n, C, start);
  s.first_row = r.first;
  s.rows = r.count;
  if (r.count == 0) return s;
  s.threads_per_row = pow2_at_most(ceil_div(min64(C, n), kStatTerms), kThreads);
  s.rows_per_block = kThreads / s.threads_per_row;
  s.blocks = min64(min64(ceil_div(s.rows, s.rows_per_block), max64(1, max_blocks)), kMaxGridX);
  return s;
}

// ---------------------------------------------------------------------------
// Multi-tensor apply (csrc/include/sage_dist/multi_tensor.cuh): one block per chunk of
// kChunk elements of one tensor; thread t of a block takes the chunk's elements t,
// t + kThreads, ... The whole launch must fit grid.x.
SAGE_HD inline int64_t chunks_of(int64_t numel) { return numel <= 0 ? 0 : ceil_div(numel, kChunk); }

// ---------------------------------------------------------------------------
// Aliasing. The kernels take __restrict__ pointers: memory a kernel writes must overlap
// nothing else it reads or writes. Host only.
//
// Whether two byte ranges [a, a + a_bytes) and [b, b + b_bytes) share a byte (empty ranges
// share none).
inline bool overlaps(uintptr_t a, int64_t a_bytes, uintptr_t b, int64_t b_bytes) {
  if (a_bytes <= 0 || b_bytes <= 0) return false;
  return a < b + static_cast<uintptr_t>(b_bytes) && b < a + static_cast<uintptr_t>(a_bytes);
}

struct Range {
  uintptr_t addr;
  int64_t bytes;
  bool written;
};

struct Clash {
  int64_t a = -1;  // indices into the ranges, -1: none
  int64_t b = -1;
};

// Two ranges that share a byte, at least one of them written ({-1, -1}: none), in
// O(k log k) for k ranges: sorted by address, each range is compared with the furthest-
// reaching range before it, and with the furthest-reaching written one.
inline Clash find_write_overlap(const std::vector<Range>& ranges) {
  std::vector<int64_t> order;
  order.reserve(ranges.size());
  for (size_t i = 0; i < ranges.size(); ++i)
    if (ranges[i].bytes > 0) order.push_back(static_cast<int64_t>(i));
  std::sort(order.begin(), order.end(),
            [&](int64_t x, int64_t y) { return ranges[x].addr < ranges[y].addr; });
  int64_t any = -1, written = -1;
  uintptr_t any_end = 0, written_end = 0;
  for (const int64_t k : order) {
    const Range& r = ranges[k];
    if (written >= 0 && r.addr < written_end) return {written, k};
    if (r.written && any >= 0 && r.addr < any_end) return {any, k};
    const uintptr_t end = r.addr + static_cast<uintptr_t>(r.bytes);
    if (any < 0 || end > any_end) {
      any = k;
      any_end = end;
    }
    if (r.written && (written < 0 || end > written_end)) {
      written = k;
      written_end = end;
    }
  }
  return {};
}

}  // namespace launch
}  // namespace sage_dist
