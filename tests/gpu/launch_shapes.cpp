// Host-side checks of csrc/include/sage_dist/launch.h, the launch shapes and index arithmetic
// of the CUDA kernels, compiled with g++ by tests/test_gpu_ready.py (no CUDA, no torch).
//
// Each command checks the invariants of one shape (grid limits, block sizes, that every
// element of the fragment is covered exactly once by the threads the kernel would launch, that
// no thread adds more than kStatTerms terms in fp32) and prints the shape as key=value pairs;
// a failed check prints "FAIL ..." and exits 1.
//
//   column N C START            column-sum shape (coverage simulated when N <= 4e6)
//   row N C START MAX_BLOCKS    row-sum shape (coverage simulated when N <= 4e6)
//   elementwise N SMS           blocks of a grid-stride kernel
//   cursor N C START STRIDE     the (row, col) cursor of a grid-stride loop vs / and %
//   chunks NUMEL                multi-tensor chunks of one tensor
//   alias                       find_write_overlap against brute force on random ranges
//   precision R C START N MODE  column sums of |g| and g^2, row sums of g^2 over the fragment
//                               [START, START + N) of an [R, C] matrix (MODE: random, cols,
//                               rows: see fill) added in the kernels' order, against exact
//                               (long double) sums: max relative error; also the errors of
//                               the previous kernels' orders (fp32 over 128 rows per column;
//                               fp32 over a row's elements t, t + 256, ... per thread)
//   selftest                    all of the above on many random and edge-case fragments
#include "sage_dist/launch.h"

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace sage_dist::launch;

static int failures = 0;

#define EXPECT(cond, ...)                                  \
  do {                                                     \
    if (!(cond)) {                                         \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                            \
      std::printf("\n");                                   \
      ++failures;                                          \
      return false;                                        \
    }                                                      \
  } while (0)

static bool is_pow2(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

// ------------------------------------------------------------------- column sums
static bool check_column(int64_t n, int64_t C, int64_t start, bool print) {
  const ColumnSumShape s = column_sum_shape(n, C, start);
  if (print)
    std::printf("first_row=%" PRId64 " rows=%" PRId64 " col_begin=%" PRId64 " cols=%" PRId64
                " block_x=%d block_y=%d col_tiles=%" PRId64 " bands=%" PRId64
                " band_rows=%" PRId64 " fits=%d blocks=%" PRId64 "\n",
                s.first_row, s.rows, s.col_begin, s.cols, s.block_x, s.block_y, s.col_tiles,
                s.bands, s.band_rows, static_cast<int>(s.fits), s.col_tiles * s.bands);
  if (n == 0) {
    EXPECT(s.rows == 0, "n=0 must launch nothing");
    return true;
  }
  const int64_t first = start / C, last = (start + n - 1) / C;
  EXPECT(s.first_row == first && s.rows == last - first + 1, "rows");
  EXPECT(is_pow2(s.block_x) && s.block_x <= 32, "block_x=%d", s.block_x);
  EXPECT(is_pow2(s.block_y) && s.block_x * s.block_y <= kThreads, "block %dx%d", s.block_x,
         s.block_y);
  EXPECT(s.col_begin == start % C && s.cols == min64(n, C), "columns");
  EXPECT(s.col_tiles * s.block_x >= s.cols && (s.col_tiles - 1) * s.block_x < s.cols,
         "col_tiles=%" PRId64, s.col_tiles);
  EXPECT(s.bands >= 1 && s.bands <= kMaxGridY, "bands=%" PRId64, s.bands);
  EXPECT(s.band_rows * s.bands >= s.rows && s.band_rows * (s.bands - 1) < s.rows,
         "bands=%" PRId64 " band_rows=%" PRId64, s.bands, s.band_rows);
  EXPECT(s.fits == (s.col_tiles <= kMaxGridX), "fits");
  if (n > 4000000) return true;
  // Coverage: what each thread of the grid adds, as column_sums_kernel walks it.
  std::vector<uint8_t> seen(static_cast<size_t>(n), 0);
  for (int64_t band = 0; band < s.bands; ++band) {
    const int64_t r0 = band * s.band_rows, r1 = min64(s.rows, r0 + s.band_rows);
    for (int64_t tile = 0; tile < s.col_tiles; ++tile)
      for (int y = 0; y < s.block_y; ++y)
        for (int x = 0; x < s.block_x; ++x) {
          const int64_t jj = tile * s.block_x + x;
          if (jj >= s.cols) continue;
          const int64_t j = column(s, jj, C);
          EXPECT(j >= 0 && j < C, "column %" PRId64, j);
          for (int64_t ri = r0 + y; ri < r1; ri += s.block_y) {
            const int64_t k = (s.first_row + ri) * C + j - start;
            if (k >= 0 && k < n) ++seen[static_cast<size_t>(k)];
          }
        }
  }
  for (int64_t k = 0; k < n; ++k)
    EXPECT(seen[static_cast<size_t>(k)] == 1, "element %" PRId64 " added %d times", k,
           seen[static_cast<size_t>(k)]);
  return true;
}

// ------------------------------------------------------------------- row sums
static bool check_row(int64_t n, int64_t C, int64_t start, int64_t max_blocks, bool print) {
  const RowSumShape s = row_sum_shape(n, C, start, max_blocks);
  if (print)
    std::printf("first_row=%" PRId64 " rows=%" PRId64 " threads_per_row=%d rows_per_block=%d"
                " blocks=%" PRId64 "\n",
                s.first_row, s.rows, s.threads_per_row, s.rows_per_block, s.blocks);
  if (n == 0) {
    EXPECT(s.rows == 0, "n=0 must launch nothing");
    return true;
  }
  EXPECT(is_pow2(s.threads_per_row) && s.threads_per_row <= kThreads, "tpr");
  EXPECT(s.threads_per_row * s.rows_per_block == kThreads, "rows_per_block");
  EXPECT(s.blocks >= 1 && s.blocks <= kMaxGridX && s.blocks <= max64(1, max_blocks),
         "blocks=%" PRId64, s.blocks);
  EXPECT((s.blocks - 1) * s.rows_per_block < s.rows, "an idle block");
  // A thread gets at least kStatTerms elements of a full row when the rows allow it, and
  // a row never waits for more threads than it has groups of kStatTerms elements.
  const int64_t L = min64(C, n);
  EXPECT(s.threads_per_row == 1 || s.threads_per_row * kStatTerms <= L + kStatTerms * 2, "tpr");
  if (n > 4000000) return true;
  std::vector<uint8_t> seen(static_cast<size_t>(n), 0);
  std::vector<uint8_t> row_done(static_cast<size_t>(s.rows), 0);
  for (int64_t b = 0; b < s.blocks; ++b)
    for (int64_t base = b * s.rows_per_block; base < s.rows;
         base += s.blocks * s.rows_per_block)
      for (int t = 0; t < kThreads; ++t) {
        const int lane = t & (s.threads_per_row - 1), slot = t / s.threads_per_row;
        const int64_t ri = base + slot;
        if (ri >= s.rows) continue;
        if (lane == 0) ++row_done[static_cast<size_t>(ri)];
        const int64_t i = s.first_row + ri, row0 = i * C;
        const int64_t a = max64(start, row0), e1 = min64(start + n, row0 + C);
        for (int64_t e = a + lane; e < e1; e += s.threads_per_row)
          ++seen[static_cast<size_t>(e - start)];
      }
  for (int64_t ri = 0; ri < s.rows; ++ri)
    EXPECT(row_done[static_cast<size_t>(ri)] == 1, "row %" PRId64 " written %d times", ri,
           row_done[static_cast<size_t>(ri)]);
  for (int64_t k = 0; k < n; ++k)
    EXPECT(seen[static_cast<size_t>(k)] == 1, "element %" PRId64 " added %d times", k,
           seen[static_cast<size_t>(k)]);
  return true;
}

// ------------------------------------------------------------------- element-wise, cursor
static bool check_elementwise(int64_t n, int64_t sms, bool print) {
  const int64_t b = elementwise_blocks(n, sms);
  if (print) std::printf("blocks=%" PRId64 "\n", b);
  if (n == 0) {
    EXPECT(b == 0, "n=0 must launch nothing");
    return true;
  }
  EXPECT(b >= 1 && b <= kMaxGridX, "blocks=%" PRId64, b);
  EXPECT(b <= max64(1, kBlocksPerSM * sms), "more blocks than the GPU holds");
  EXPECT((b - 1) * kThreads < n, "an idle block");
  return true;
}

// Walks the first `steps` iterations of threads t of a grid-stride loop with the cursor and
// compares with / and %. Threads: the first, last and a middle one of the grid.
static bool check_cursor(int64_t n, int64_t C, int64_t start, int64_t stride, int64_t steps,
                         bool print) {
  const Step st = step_of(stride, C);
  EXPECT(st.cols >= 0 && st.cols < C, "step");
  int64_t checked = 0;
  for (int64_t t : {int64_t{0}, stride / 2, stride - 1}) {
    if (t >= n) continue;
    Pos p = pos_of(start + t, C);
    int64_t k = 0;
    for (int64_t e = t; e < n && k < steps; e += stride, advance(p, st, C), ++k) {
      const int64_t flat = start + e;
      EXPECT(p.row == flat / C && p.col == flat % C,
             "C=%" PRId64 " start=%" PRId64 " e=%" PRId64 ": (%" PRId64 ", %" PRId64
             ") != (%" PRId64 ", %" PRId64 ")",
             C, start, e, p.row, p.col, flat / C, flat % C);
      ++checked;
    }
  }
  if (print) std::printf("checked=%" PRId64 "\n", checked);
  return true;
}

// ------------------------------------------------------------------- aliasing
static bool check_alias(std::mt19937_64& rng, int rounds) {
  for (int r = 0; r < rounds; ++r) {
    const int k = 1 + static_cast<int>(rng() % 8);
    std::vector<Range> rs;
    for (int i = 0; i < k; ++i)
      rs.push_back({static_cast<uintptr_t>(1000 + rng() % 200),
                    static_cast<int64_t>(rng() % 4 == 0 ? 0 : rng() % 40),
                    static_cast<bool>(rng() % 2)});
    bool expected = false;
    for (int i = 0; i < k; ++i)
      for (int j = i + 1; j < k; ++j)
        if ((rs[i].written || rs[j].written) &&
            overlaps(rs[i].addr, rs[i].bytes, rs[j].addr, rs[j].bytes))
          expected = true;
    const Clash c = find_write_overlap(rs);
    EXPECT((c.a >= 0) == expected, "round %d: found=%d expected=%d", r, c.a >= 0, expected);
    if (c.a >= 0) {
      const Range &x = rs[static_cast<size_t>(c.a)], &y = rs[static_cast<size_t>(c.b)];
      EXPECT(c.a != c.b && (x.written || y.written) && overlaps(x.addr, x.bytes, y.addr, y.bytes),
             "the reported pair does not clash");
    }
  }
  EXPECT(!overlaps(100, 8, 108, 8) && overlaps(100, 9, 108, 8) && !overlaps(100, 0, 100, 8),
         "overlaps");
  return true;
}

// ------------------------------------------------------------------- precision
// Values like a gradient's (mode "random": normal, a spread of magnitudes across columns), or
// the hard case for fp32 accumulation: every term of a column ("cols") or of a row ("rows")
// the same value, drawn from [0.5, 1), so that the roundings of a long fp32 sum pile up.
static void fill(std::vector<float>& g, int64_t C, int64_t start, const std::string& mode,
                 uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uniform(0.5f, 1.f);
  std::vector<float> line;
  for (size_t k = 0; k < g.size(); ++k) {
    const int64_t flat = start + static_cast<int64_t>(k);
    if (mode == "random") {
      const float scale = 1e-3f * (1.f + static_cast<float>((flat % C) % 7));
      g[k] = normal(rng) * scale;
      continue;
    }
    const int64_t key = mode == "cols" ? flat % C : flat / C - start / C;
    while (static_cast<int64_t>(line.size()) <= key) line.push_back(uniform(rng));
    g[k] = line[static_cast<size_t>(key)];
  }
}

// Column sums of terms (kind 0: |g|, kind 1: g^2) over the fragment [start, start + n), in
// column_sums_kernel's order (+ combine_bands_kernel), and in the previous kernel's order
// (fp32 over blocks of 128 rows, then double).
static void column_sums_like_kernel(const std::vector<float>& g, int64_t n, int64_t C,
                                    int64_t start, int kind, std::vector<float>& out,
                                    std::vector<float>& old_out) {
  auto term = [&](int64_t k) { return kind == 0 ? std::fabs(g[k]) : g[k] * g[k]; };
  const ColumnSumShape s = column_sum_shape(n, C, start);
  out.assign(static_cast<size_t>(C), 0.f);
  std::vector<double> partial(static_cast<size_t>(s.bands * s.cols), 0.0);
  for (int64_t band = 0; band < s.bands; ++band) {
    const int64_t r0 = band * s.band_rows, r1 = min64(s.rows, r0 + s.band_rows);
    for (int64_t jj = 0; jj < s.cols; ++jj) {
      const int64_t j = column(s, jj, C);
      double block = 0.0;
      for (int y = 0; y < s.block_y; ++y) {
        double acc = 0.0;
        float part = 0.f;
        int terms = 0;
        for (int64_t ri = r0 + y; ri < r1; ri += s.block_y) {
          const int64_t k = (s.first_row + ri) * C + j - start;
          if (k >= 0 && k < n) part += term(k);
          if (++terms == kStatTerms) {
            acc += part;
            part = 0.f;
            terms = 0;
          }
        }
        acc += part;
        block += acc;
      }
      partial[static_cast<size_t>(band * s.cols + jj)] = block;
    }
  }
  for (int64_t jj = 0; jj < s.cols; ++jj) {
    double sum = 0.0;
    for (int64_t b = 0; b < s.bands; ++b) sum += partial[static_cast<size_t>(b * s.cols + jj)];
    out[static_cast<size_t>(column(s, jj, C))] = static_cast<float>(sum);
  }
  // The previous kernel: thread (column, block of 128 rows) in fp32, blocks added in double.
  old_out.assign(static_cast<size_t>(C), 0.f);
  const int64_t first = start / C, last = (start + n - 1) / C;
  for (int64_t j = 0; j < C; ++j) {
    double sum = 0.0;
    for (int64_t i0 = first; i0 <= last; i0 += 128) {
      float f = 0.f;
      for (int64_t i = i0; i < min64(last + 1, i0 + 128); ++i) {
        const int64_t k = i * C + j - start;
        if (k >= 0 && k < n) f += term(k);
      }
      sum += f;
    }
    old_out[static_cast<size_t>(j)] = static_cast<float>(sum);
  }
}

// Row sums of g^2 in row_sums_kernel's order (tree over the row's threads in double).
static void row_sums_like_kernel(const std::vector<float>& g, int64_t n, int64_t C,
                                 int64_t start, int64_t R, std::vector<float>& out) {
  const RowSumShape s = row_sum_shape(n, C, start, 1 << 20);
  out.assign(static_cast<size_t>(R), 0.f);
  std::vector<double> lanes(static_cast<size_t>(s.threads_per_row));
  for (int64_t ri = 0; ri < s.rows; ++ri) {
    const int64_t i = s.first_row + ri, row0 = i * C;
    const int64_t a = max64(start, row0), b = min64(start + n, row0 + C);
    for (int lane = 0; lane < s.threads_per_row; ++lane) {
      double acc = 0.0;
      float part = 0.f;
      int terms = 0;
      for (int64_t e = a + lane; e < b; e += s.threads_per_row) {
        const float x = g[e - start];
        part += x * x;
        if (++terms == kStatTerms) {
          acc += part;
          part = 0.f;
          terms = 0;
        }
      }
      lanes[static_cast<size_t>(lane)] = acc + part;
    }
    for (int w = s.threads_per_row / 2; w > 0; w >>= 1)
      for (int lane = 0; lane < w; ++lane) lanes[static_cast<size_t>(lane)] += lanes[lane + w];
    out[static_cast<size_t>(i)] = static_cast<float>(lanes[0]);
  }
}

// Row sums of g^2 in the previous kernel's order: 256 threads per row, each adding its
// elements t, t + 256, ... in fp32, then an fp32 tree.
static void row_sums_old(const std::vector<float>& g, int64_t n, int64_t C, int64_t start,
                         int64_t R, std::vector<float>& out) {
  out.assign(static_cast<size_t>(R), 0.f);
  const Rows r = rows_of(n, C, start);
  std::vector<float> lanes(256);
  for (int64_t i = r.first; i < r.first + r.count; ++i) {
    const int64_t a = max64(start, i * C), b = min64(start + n, (i + 1) * C);
    for (int t = 0; t < 256; ++t) {
      float f = 0.f;
      for (int64_t e = a + t; e < b; e += 256) f += g[e - start] * g[e - start];
      lanes[static_cast<size_t>(t)] = f;
    }
    for (int w = 128; w > 0; w >>= 1)
      for (int t = 0; t < w; ++t) lanes[static_cast<size_t>(t)] += lanes[t + w];
    out[static_cast<size_t>(i)] = lanes[0];
  }
}

static double max_rel(const std::vector<float>& got, const std::vector<long double>& exact) {
  double worst = 0.0;
  for (size_t j = 0; j < got.size(); ++j) {
    if (exact[j] == 0) continue;
    const double e = static_cast<double>(std::fabs((static_cast<long double>(got[j]) - exact[j]) /
                                                   exact[j]));
    if (e > worst) worst = e;
  }
  return worst;
}

static bool precision(int64_t R, int64_t C, int64_t start, int64_t n, const std::string& mode) {
  std::vector<float> g(static_cast<size_t>(n));
  fill(g, C, start, mode, 12345);
  std::vector<long double> abs_exact(static_cast<size_t>(C), 0), sq_exact(static_cast<size_t>(C), 0),
      row_exact(static_cast<size_t>(R), 0);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t flat = start + k, i = flat / C, j = flat % C;
    const float sq = g[k] * g[k];  // each square is rounded to fp32 first, as in the kernels
    abs_exact[static_cast<size_t>(j)] += std::fabs(g[k]);
    sq_exact[static_cast<size_t>(j)] += sq;
    row_exact[static_cast<size_t>(i)] += sq;
  }
  std::vector<float> col_abs, old_abs, col_sq, old_sq, rows, old_rows;
  column_sums_like_kernel(g, n, C, start, 0, col_abs, old_abs);
  column_sums_like_kernel(g, n, C, start, 1, col_sq, old_sq);
  row_sums_like_kernel(g, n, C, start, R, rows);
  row_sums_old(g, n, C, start, R, old_rows);
  std::printf("colsum_abs=%.3e sq_cols=%.3e sq_rows=%.3e old_colsum_abs=%.3e old_sq_cols=%.3e"
              " old_sq_rows=%.3e\n",
              max_rel(col_abs, abs_exact), max_rel(col_sq, sq_exact), max_rel(rows, row_exact),
              max_rel(old_abs, abs_exact), max_rel(old_sq, sq_exact), max_rel(old_rows, row_exact));
  return true;
}

// ------------------------------------------------------------------- selftest
static bool selftest() {
  std::mt19937_64 rng(7);
  int64_t cases = 0;
  const int64_t Cs[] = {1, 2, 3, 7, 8, 31, 32, 33, 64, 100, 255, 256, 257, 1000, 2048, 5461,
                        50000};
  for (int64_t C : Cs) {
    for (int rep = 0; rep < 12; ++rep) {
      const int64_t R = 1 + static_cast<int64_t>(rng() % (C < 64 ? 3000 : 200));
      const int64_t total = R * C;
      int64_t a = static_cast<int64_t>(rng() % static_cast<uint64_t>(total + 1));
      int64_t b = static_cast<int64_t>(rng() % static_cast<uint64_t>(total + 1));
      if (rep == 0) a = 0, b = total;              // whole
      if (rep == 1) a = C * (R / 2), b = a;        // empty
      if (rep == 2) a = 0, b = min64(total, 1);    // one element
      if (a > b) std::swap(a, b);
      const int64_t n = b - a;
      if (!check_column(n, C, a, false) || !check_row(n, C, a, 1 + rng() % 2000, false))
        return false;
      for (int64_t stride : {int64_t{1}, int64_t{7}, int64_t{256}, int64_t{256 * 1056}})
        if (!check_cursor(n, C, a, stride, 1000, false)) return false;
      cases += 1;
    }
  }
  // Geometry far beyond memory: only the arithmetic is checked (no coverage walk).
  const int64_t big[][3] = {
      {int64_t{1} << 20, (int64_t{1} << 31) + 11, (int64_t{1} << 40) + 3},  // C > 2^31
      {int64_t{3} << 31, 1, 5},                      // 6.4e9 rows of one column
      {int64_t{3} << 31, 3, 0},
      {int64_t{1} << 33, 50000, (int64_t{1} << 31) + 17},
      {100, int64_t{1} << 40, (int64_t{1} << 40) - 50},  // crosses one row boundary
  };
  for (const auto& c : big) {
    if (!check_column(c[0], c[1], c[2], false)) return false;
    if (!check_row(c[0], c[1], c[2], 132 * kBlocksPerSM, false)) return false;
    if (!check_cursor(c[0], c[1], c[2], 256 * 1056, 5000, false)) return false;
    if (!check_cursor(c[0], c[1], c[2], 256, 5000, false)) return false;
    cases += 1;
  }
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{255}, int64_t{256}, int64_t{257},
                    int64_t{1} << 31, int64_t{1} << 45})
    for (int64_t sms : {int64_t{0}, int64_t{1}, int64_t{40}, int64_t{132}})
      if (!check_elementwise(n, sms, false)) return false;
  if (!check_alias(rng, 20000)) return false;
  std::printf("OK cases=%" PRId64 "\n", cases);
  return true;
}

static int64_t arg(char** argv, int i) { return std::strtoll(argv[i], nullptr, 10); }

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s column|row|elementwise|cursor|chunks|alias|precision|selftest ...\n",
                 argv[0]);
    return 2;
  }
  const std::string cmd = argv[1];
  bool ok = false;
  if (cmd == "column" && argc == 5) {
    ok = check_column(arg(argv, 2), arg(argv, 3), arg(argv, 4), true);
  } else if (cmd == "row" && argc == 6) {
    ok = check_row(arg(argv, 2), arg(argv, 3), arg(argv, 4), arg(argv, 5), true);
  } else if (cmd == "elementwise" && argc == 4) {
    ok = check_elementwise(arg(argv, 2), arg(argv, 3), true);
  } else if (cmd == "cursor" && argc == 6) {
    ok = check_cursor(arg(argv, 2), arg(argv, 3), arg(argv, 4), arg(argv, 5), 100000, true);
  } else if (cmd == "chunks" && argc == 3) {
    std::printf("chunks=%" PRId64 " chunk=%" PRId64 "\n", chunks_of(arg(argv, 2)), kChunk);
    ok = true;
  } else if (cmd == "alias" && argc == 2) {
    std::mt19937_64 rng(11);
    ok = check_alias(rng, 50000);
    if (ok) std::printf("OK\n");
  } else if (cmd == "precision" && argc == 7) {
    ok = precision(arg(argv, 2), arg(argv, 3), arg(argv, 4), arg(argv, 5), argv[6]);
  } else if (cmd == "selftest" && argc == 2) {
    ok = selftest();
  } else {
    std::fprintf(stderr, "bad arguments\n");
    return 2;
  }
  return ok && failures == 0 ? 0 : 1;
}
