/* neoxja._kernels: the weight-streaming kernels of the CPU decode path (AVX-512).

Decoding one token reads every weight once, so a batch-1 linear layer is a GEMV whose speed is the rate at which
its weights stream from memory. These kernels keep that rate close to the memory bandwidth for three weight
formats by decoding weights in registers and never writing a dequantized copy:

  FMT_BF16  bf16 [N, K]                                   (plain bf16 checkpoints)
  FMT_INT8  int8 [N, K], w = q * SCB[n] / 127             (load_in_8bit)
  FMT_4BIT  4-bit code indices, one absmax per 64           (load_in_4bit, nf4 or fp4: the code book is an argument)
            in the runtime layout made by neoxja.kernels.pack_4bit (see there); absmax in fp32, or in bf16 / fp16
            where that holds it exactly (neoxja.kernels.narrow_absmax)

Products and sums are fp32 (weights decode exactly to fp32), so results equal F.linear on the dequantized fp32
weights up to summation order. `gemv` serves M <= 8 activation rows (batch-1 and small-batch decode); for prefill,
`dequantize` writes the weights out once and PyTorch's matmul takes over. `decode_attention` is one decode step of
attention (rotary, cache write, softmax-weighted sum) and `decode_layers` whole decoder layers around it.

It is plain C with no PyTorch headers, so building it never needs torch: tensors arrive as data pointers
(tensor.data_ptr()) plus sizes, and the Python side (neoxja.kernels) checks shapes, dtypes and contiguity. Work is
split over output rows with OpenMP; torch ships libgomp under the same soname, so once torch is imported both share
one OpenMP runtime and one thread pool. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__))
#error "neoxja._kernels needs AVX-512 F/BW/VL; without it neoxja uses its PyTorch fallback"
#endif
#include <immintrin.h>

#define INLINE static inline __attribute__((always_inline))

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 }; /* dtype codes (fp16: 4-bit absmax only); neoxja.kernels._DT mirrors
                                                them */
enum { FMT_BF16 = 0, FMT_INT8 = 1, FMT_4BIT = 2 };
enum { MAX_M = 8 };
#ifdef __AVX512BF16__
enum { HAVE_BF16 = 1 };
#else
enum { HAVE_BF16 = 0 };
#endif
static const float INV127 = 7.874015718698502e-3f; /* fp32(1/127), the factor bitsandbytes' int8 dequantization uses */

/* ---- scalar bf16 <-> fp32 (round to nearest even, as torch does) ---- */

INLINE float bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE uint16_t f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Element i of a scale array in `sdt` (fp32; bf16 or fp16 for 4-bit absmax), exactly as fp32 */
INLINE float scale_at(const void *s, int sdt, int64_t i)
{
    if (sdt == DT_F32) return ((const float *)s)[i];
    uint16_t h = ((const uint16_t *)s)[i];
    return sdt == DT_BF16 ? bf16_to_f32(h) : _cvtsh_ss(h);
}

INLINE int64_t scale_bytes(int sdt) { return sdt == DT_F32 ? 4 : 2; }

/* Same rounding for 16 lanes of finite values (dequantized weights): vcvtneps2bf16 would flush denormals. */
INLINE __m256i f32x16_to_bf16(__m512 v)
{
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

INLINE __m512 bf16x16_to_f32(__m256i v)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* 16 fp32 or bf16 values as fp32 (exact) */
INLINE __m512 load16(const void *src, int64_t off, int dt)
{
    if (dt == DT_BF16) return bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)src + off)));
    return _mm512_loadu_ps((const float *)src + off);
}

INLINE void store16(void *out, int64_t off, int dt, __m512 v)
{
    if (dt == DT_BF16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + off), f32x16_to_bf16(v));
    else
        _mm512_storeu_ps((float *)out + off, v);
}

/* ---- activations ---- */

/* x [M, K] (fp32 or bf16, K a multiple of 32) -> xp [M, Kp] fp32, zero-padded to Kp, in the element order the
   weight decoder yields: for bf16 weights each 32-element chunk becomes its 16 even then its 16 odd elements (see
   decode32); the other formats keep the natural order. */
static void prepare_x(float *xp, const void *x, int xdt, int64_t M, int64_t K, int64_t Kp, int evens_first)
{
    const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
    for (int64_t m = 0; m < M; m++) {
        float *dst = xp + m * Kp;
        for (int64_t k = 0; k < K; k += 32) {
            __m512 a = load16(x, m * K + k, xdt), b = load16(x, m * K + k + 16, xdt);
            if (evens_first) {
                __m512 e = _mm512_permutex2var_ps(a, evens, b);
                b = _mm512_permutex2var_ps(a, odds, b);
                a = e;
            }
            _mm512_storeu_ps(dst + k, a);
            _mm512_storeu_ps(dst + k + 16, b);
        }
        memset(dst + K, 0, (size_t)(Kp - K) * sizeof(float));
    }
}

/* ---- weight decoding ---- */

/* 32 consecutive weights of a bf16 or int8 row, as two fp32 vectors. A bf16 pair (2j, 2j+1) shares a 32-bit lane:
   shifting the lane left by 16 gives element 2j exactly and masking the low half gives 2j+1, one instruction each,
   which is why prepare_x puts the activations of a chunk in even-then-odd order. */
INLINE void decode32(int fmt, const void *row, int64_t k, __m512 *w0, __m512 *w1)
{
    if (fmt == FMT_BF16) {
        __m512i v = _mm512_loadu_si512((const uint16_t *)row + k);
        *w0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        *w1 = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
    } else {
        const int8_t *p = (const int8_t *)row + k;
        *w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
        *w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
    }
}

/* 4-bit runtime layout. A row, padded to Kp (a multiple of 128), is cut into 64-byte lines of 128 weights and the
   lines into groups: 8 lines (1024 weights, 16 absmax blocks) while 8 are left, then 4, 2 and 1 for the rest (a
   2560-wide row: 8 + 8 + 4). Line l of a group of L lines holds its group's steps s = 4l + t (t 0..3): nibble t (from
   the least significant) of 16-bit lane w = 2j + e (j 0..15, e 0..1). Every step's pair j belongs to block
   j mod 2L of the group, so 32-bit lane j of any sum of products stays within one block, and a row's block scales
   multiply its sums once per group (`group_scale`) instead of once per block (see dot4_one_row for what that
   gained). In its block, step s's pair j holds elements 8L q + 8l + 2t + e with q = j div 2L: the block's 8/L
   lanes take turns in runs of 8L elements, so pair j of step s is the activations' pair 32b + 4L q + s of the group
   (`pair_base`). Decoding a step:
   - bf16 path (AVX512-BF16, bf16 activations): shifting the line right by 4t leaves the step's indices in the low
     bits of the 32 lanes; vpermw reads the low 5 bits, so a 32-entry table holding the code book twice, rounded to
     bf16, turns them into 32 bf16 weights at once, and vdpbf16ps multiplies them with the step's 32 activations,
     summing each pair in fp32 lane j: half the instructions per weight;
   - fp32 path: vpermps reads the low 4 bits of each 32-bit lane, so the dword lanes shifted right by 4t (by 16 + 4t)
     give the even (odd) weight of every pair exactly, matched with activations stored evens then odds per step. */
INLINE int group_lines(int64_t lines_left)
{
    return lines_left >= 8 ? 8 : lines_left >= 4 ? 4 : lines_left >= 2 ? 2 : 1;
}

/* The absmax of the group's 2L blocks (at `a`, in `sdt`: fp32, or bf16 / fp16 where those hold every value exactly,
   see neoxja.kernels.narrow_absmax) as fp32 in the lanes whose sums they scale: lane j gets block j mod 2L. */
INLINE __m512 group_scale(const void *a, int L, int sdt)
{
    __mmask16 blocks = (__mmask16)((1u << (2 * L)) - 1);
    __m512 v;
    if (sdt == DT_F32) {
        v = _mm512_maskz_loadu_ps(blocks, a);
    } else {
        __m256i h = _mm256_maskz_loadu_epi16(blocks, a);
        v = sdt == DT_BF16 ? bf16x16_to_f32(h) : _mm512_cvtph_ps(h);
    }
    if (L == 8) return v;
    const __m512i j = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_permutexvar_ps(_mm512_and_si512(j, _mm512_set1_epi32(2 * L - 1)), v);
}

/* Lane j: the activations' pair (counted from the group's start) that step 0's pair j multiplies; step s adds s. */
INLINE __m512i pair_base(int L)
{
    const __m512i j = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i block = _mm512_and_si512(j, _mm512_set1_epi32(2 * L - 1));
    __m512i turn = _mm512_srli_epi32(j, __builtin_ctz(2 * L));
    return _mm512_add_epi32(_mm512_slli_epi32(block, 5), _mm512_mullo_epi32(turn, _mm512_set1_epi32(4 * L)));
}

/* The even and odd weights of step t of a line's 16 pairs, as fp32 (fp32 path) */
INLINE void decode4(__m512i line, int t, __m512 code, __m512 *even, __m512 *odd)
{
    *even = _mm512_permutexvar_ps(_mm512_srli_epi32(line, 4 * t), code);
    *odd = _mm512_permutexvar_ps(_mm512_srli_epi32(line, 16 + 4 * t), code);
}

/* ---- GEMV: y[m, n] = sum_k x[m, k] w[n, k] (* SCB[n] / 127 for int8) + bias[n] ----
   A tile is R rows x M activation rows over one block of K: rows n, n + stride, ..., n + (R-1) stride; its sums are
   added to part[r * stride * M + m].
   PREFETCH: with contiguous tiles (stride 1) a tile reads R rows side by side, each a short stream (a 2560-wide
   4-bit row is 20 cache lines) that the hardware prefetcher hardly ramps up on before it ends. The rows of the next
   tile follow in memory, so each line read also asks for the same line R rows further (the next tile), into L2;
   that alone raised single-thread streaming by 15-60 % here (benchmarks/matmul.py). `ahead` is that distance in
   bytes along each row's stream.
   STREAMS (M = 1): a thread's rows are cut into R runs and a tile takes the i-th row of every run, so the thread
   reads R long sequential streams instead of R short ones per tile. Measured on 2 cores with 1 GiB of weights
   (benchmarks/matmul.py, quiet host): bf16 48 -> 57 GB/s with a prefetch 2 rows ahead, and 1 KB ahead instead of
   2 rows (10-20 KB) gained another ~2 % (pools of 1 GiB per ABEJA 2.7B shape, GB/s from 2 rows to 1 KB:
   query_key_value 56.1 -> 57.5, attention.dense 54.4 -> 54.8, dense_h_to_4h 56.7 -> 57.2, dense_4h_to_h 57.2 ->
   59.0; 768 and 1536 bytes in between). 4-bit (dot4_one_row): 1 KB ahead on rows of up to 2 KB, 2 rows ahead on
   longer ones, and once per group the absmax stream at the same point ahead (ahead / 8 bytes: it holds an eighth of
   the weights' bytes). Pools of 1 GiB per shape, quiet host, GB/s from 2 rows ahead without the absmax prefetch:
   query_key_value 48.8 -> 52.3, attention.dense 44.6 -> 47.9, dense_h_to_4h 49.3 -> 51.6 (1280-byte rows: 512-1024
   bytes ahead best, 1536 and more no gain), dense_4h_to_h 48.0 -> 49.9 (5120-byte rows: from the absmax prefetch;
   0.5-1 KB ahead read 38-41, 2-7.5 KB as 2 rows).
   int8, whose decoding costs most, stays on contiguous tiles (55 GB/s there, 51-52 strided with a prefetch 2
   or 3 rows ahead, 53-54 with dot4_one_row's out-of-line treatment). */

INLINE void zero(int R, int M, __m512 acc[][MAX_M])
{
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
}

INLINE void add_partials(int R, int M, int64_t stride, __m512 acc[][MAX_M], float *part)
{
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) part[r * stride * M + m] += _mm512_reduce_add_ps(acc[r][m]);
}

INLINE void tile_32(int fmt, int R, int M, int64_t n, int64_t stride, int64_t ahead, const void *w, int64_t K,
                    int64_t k0, int64_t k1, const float *xp, float *part)
{
    size_t esize = fmt == FMT_BF16 ? 2 : 1;
    __m512 acc[8][MAX_M];
    zero(R, M, acc);
    for (int64_t k = k0; k < k1; k += 32) {
        __m512 w0[8], w1[8];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const char *row = (const char *)w + (n + r * stride) * K * esize;
            if (ahead) _mm_prefetch(row + k * esize + ahead, _MM_HINT_T1); /* see PREFETCH */
            decode32(fmt, row, k, &w0[r], &w1[r]);
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) { /* each activation vector is loaded once and used for all R rows */
            __m512 xa = _mm512_loadu_ps(xp + m * K + k), xb = _mm512_loadu_ps(xp + m * K + k + 16);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++)
                acc[r][m] = _mm512_fmadd_ps(w1[r], xb, _mm512_fmadd_ps(w0[r], xa, acc[r][m]));
        }
    }
    add_partials(R, M, stride, acc, part);
}

#ifdef __AVX512BF16__
/* bf16 weights times bf16 activations (AVX512-BF16): vdpbf16ps multiplies 32 pairs exactly and sums them in fp32, so
   the raw weights need no decoding at all and batched decode (M > 1), which is compute-bound, runs twice as fast. */
INLINE void tile_bf16_dot(int R, int M, int64_t n, int64_t stride, int64_t ahead, const uint16_t *w, int64_t K,
                          int64_t k0, int64_t k1, const uint16_t *xb, float *part)
{
    __m512 acc[8][MAX_M];
    zero(R, M, acc);
    for (int64_t k = k0; k < k1; k += 32) {
        __m512i wv[8];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const uint16_t *row = w + (n + r * stride) * K;
            if (ahead) _mm_prefetch((const char *)(row + k) + ahead, _MM_HINT_T1); /* see PREFETCH */
            wv[r] = _mm512_loadu_si512(row + k);
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            __m512i xv = _mm512_loadu_si512(xb + m * K + k);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv);
        }
    }
    add_partials(R, M, stride, acc, part);
}
#endif

/* Sums of products accumulate per group of lines, whose block scales then multiply them (see the layout): one FMA per
   row and activation row per group. K = row length padded to 128; k0 and k1 lie on group boundaries. `dot` (a
   compile-time constant at each call) picks the bf16 path (xb, codebf) or the fp32 one (xp, code). */
INLINE void tile_4bit(int dot, int R, int M, int64_t n, int64_t stride, int64_t ahead, const uint8_t *w,
                      const void *absmax, int sdt, __m512 code, __m512i codebf, int64_t K, int64_t k0, int64_t k1,
                      const float *xp, const uint16_t *xb, float *part)
{
    __m512 acc[4][MAX_M];
    zero(R, M, acc);
    for (int64_t k = k0; k < k1;) {
        int L = group_lines((K - k) / 128);
        __m512 s[4][MAX_M];
        zero(R, M, s);
        for (int l = 0; l < L; l++, k += 128) {
            __m512i line[4];
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                const uint8_t *p = w + (n + r * stride) * (K / 2) + k / 2;
                if (ahead) _mm_prefetch((const char *)p + ahead, _MM_HINT_T1); /* see PREFETCH */
                line[r] = _mm512_loadu_si512(p);
            }
#pragma GCC unroll 4
            for (int t = 0; t < 4; t++) {
#ifdef __AVX512BF16__
                if (dot) {
                    __m512i wt[4];
#pragma GCC unroll 4
                    for (int r = 0; r < R; r++)
                        wt[r] = _mm512_permutexvar_epi16(_mm512_srli_epi16(line[r], 4 * t), codebf);
#pragma GCC unroll 8
                    for (int m = 0; m < M; m++) {
                        __m512i xv = _mm512_loadu_si512(xb + m * K + k + 32 * t);
#pragma GCC unroll 4
                        for (int r = 0; r < R; r++)
                            s[r][m] = _mm512_dpbf16_ps(s[r][m], (__m512bh)wt[r], (__m512bh)xv);
                    }
                    continue;
                }
#endif
                __m512 even[4], odd[4];
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) decode4(line[r], t, code, &even[r], &odd[r]);
#pragma GCC unroll 8
                for (int m = 0; m < M; m++) {
                    __m512 xe = _mm512_loadu_ps(xp + m * K + k + 32 * t);
                    __m512 xo = _mm512_loadu_ps(xp + m * K + k + 32 * t + 16);
#pragma GCC unroll 4
                    for (int r = 0; r < R; r++)
                        s[r][m] = _mm512_fmadd_ps(odd[r], xo, _mm512_fmadd_ps(even[r], xe, s[r][m]));
                }
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            int64_t block = (n + r * stride) * (K / 64) + (k - 128 * L) / 64;
            __m512 a = group_scale((const char *)absmax + block * scale_bytes(sdt), L, sdt);
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) acc[r][m] = _mm512_fmadd_ps(s[r][m], a, acc[r][m]);
        }
    }
    add_partials(R, M, stride, acc, part);
}

#ifdef __AVX512BF16__
/* 64 bytes at p, after a prefetch (T1) of the line `ahead` bytes further along its stream. In asm so that the prefetch
   stays beside its load: as an intrinsic GCC moved the four rows' prefetches to the top of the loop, which read 3-7 %
   slower from memory. */
INLINE __m512i prefetch_load(const uint8_t *p, int64_t ahead)
{
    __m512i v;
    __asm__("prefetcht1 %1\n\tvmovdqu64 %2, %0" : "=v"(v) : "m"(*(p + ahead)), "m"(*(const __m512i *)p));
    return v;
}

/* tile_4bit's bf16 path for one activation row (the same products, summed in two registers), out of line, with one
   pointer per row, prefetching `ahead` bytes further along each row's stream (see PREFETCH). Inlined into gemv_rows,
   GCC kept the row addresses in vector registers (20-28 vmovq per four lines). Measured on 2 cores, pools of 1 GiB
   of each ABEJA 2.7B shape, quiet host (GB/s, inlined without prefetch -> inlined with -> out of line): dense_4h_to_h
   (5120-byte rows) 39 -> 47.5 -> 52; query_key_value 50 -> 46 -> 48.5; dense_h_to_4h 48.5 -> 46 -> 50.5;
   attention.dense 45 -> 41 -> 43.5. Per 64-byte line: 3 shifts, 4 vpermw and 4 vdpbf16ps, and per group of lines one
   FMA (see the layout; two FMAs per line before it): ~7 cycles a line, 30 GB/s on one core from L2 (27-28 with two
   FMAs per line), yet from memory within 1 % of before, weighted by bytes per layer (GB/s, before -> now, probe
   63-65: query_key_value 47.3 -> 50.1, attention.dense 42.7 -> 43.2, dense_h_to_4h 49.8 -> 50.0, dense_4h_to_h
   50.9 -> 49.0): at batch 1 the memory streams, not the vector units, set the pace. Batched decode (tile_4bit),
   compute-bound, gained 25-30 %. Each row sums steps t = 0, 1 and t = 2, 3 in two registers, which keeps the chains
   of dependent vdpbf16ps short enough for four rows to hide their latency. */
INLINE void dot4_one_row(int R, const uint8_t *w, const void *absmax, int sdt, int64_t n, int64_t stride,
                         int64_t K, int64_t ahead, const uint16_t *xb, __m512i codebf, float *part)
{
    const uint8_t *p[4];
    const char *a[4];
    int64_t sb = scale_bytes(sdt);
    __m512 acc[4];
    for (int r = 0; r < R; r++) {
        p[r] = w + (n + r * stride) * (K / 2);
        a[r] = (const char *)absmax + (n + r * stride) * (K / 64) * sb;
        acc[r] = _mm512_setzero_ps();
    }
    __m512 s0[4], s1[4];
    for (int r = 0; r < R; r++) s0[r] = s1[r] = _mm512_setzero_ps();
    int L = group_lines(K / 128), left = L; /* the group's lines, and how many of them are still to come */
    for (const uint16_t *x = xb, *end = xb + K; x < end; x += 128) {
        __m512bh x0 = (__m512bh)_mm512_loadu_si512(x), x1 = (__m512bh)_mm512_loadu_si512(x + 32);
        __m512bh x2 = (__m512bh)_mm512_loadu_si512(x + 64), x3 = (__m512bh)_mm512_loadu_si512(x + 96);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            __m512i line = prefetch_load(p[r], ahead);
            s0[r] = _mm512_dpbf16_ps(s0[r], (__m512bh)_mm512_permutexvar_epi16(line, codebf), x0);
            s0[r] = _mm512_dpbf16_ps(s0[r], (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(line, 4), codebf), x1);
            s1[r] = _mm512_dpbf16_ps(s1[r], (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(line, 8), codebf), x2);
            s1[r] = _mm512_dpbf16_ps(s1[r], (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(line, 12), codebf),
                                     x3);
            p[r] += 64;
        }
        if (--left == 0) {
            for (int r = 0; r < R; r++) {
                acc[r] = _mm512_fmadd_ps(_mm512_add_ps(s0[r], s1[r]), group_scale(a[r], L, sdt), acc[r]);
                s0[r] = s1[r] = _mm512_setzero_ps();
                a[r] += 2 * L * sb;
                _mm_prefetch(a[r] + ahead * sb / 32, _MM_HINT_T1); /* see STREAMS */
            }
            left = L = group_lines((end - x) / 128 - 1); /* lines after this one (0 at the end: the loop stops) */
        }
    }
    for (int r = 0; r < R; r++) part[r * stride] += _mm512_reduce_add_ps(acc[r]);
}

static __attribute__((noinline)) void dot4_one_row_4(const uint8_t *w, const void *absmax, int sdt, int64_t n,
                                                     int64_t stride, int64_t K, int64_t ahead, const uint16_t *xb,
                                                     __m512i codebf, float *part)
{
    dot4_one_row(4, w, absmax, sdt, n, stride, K, ahead, xb, codebf, part);
}

static __attribute__((noinline)) void dot4_one_row_1(const uint8_t *w, const void *absmax, int sdt, int64_t n,
                                                     int64_t stride, int64_t K, int64_t ahead, const uint16_t *xb,
                                                     __m512i codebf, float *part)
{
    dot4_one_row(1, w, absmax, sdt, n, stride, K, ahead, xb, codebf, part);
}
#endif

typedef struct {
    int fmt, ydt, bdt, sdt; /* sdt: scale's dtype */
    int64_t M, N, K; /* K: row length of w in elements (padded Kp for FMT_4BIT) */
    const void *w;
    const void *scale; /* FMT_INT8: SCB, the per-row absmax (fp32); FMT_4BIT: per-block absmax; else NULL */
    const float *code;  /* FMT_4BIT: the 16-entry code book */
    const float *xp;
    const uint16_t *xb; /* bf16 activations [M, K] (zero-padded) for the AVX512-BF16 paths of FMT_4BIT and FMT_BF16 */
    const void *bias;
    void *y;
    int gelu; /* decode_layers' dense_h_to_4h: GELU on its bf16 outputs, each thread on the rows it wrote */
} Gemv;

INLINE void tile(const Gemv *g, int fmt, int R, int M, int64_t n, int64_t stride, int64_t ahead, int64_t k0, int64_t k1,
                 __m512 code, __m512i codebf, float *part)
{
#ifdef __AVX512BF16__
    if (fmt == FMT_BF16 && g->xb) {
        tile_bf16_dot(R, M, n, stride, ahead, g->w, g->K, k0, k1, g->xb, part);
        return;
    }
    if (fmt == FMT_4BIT && g->xb && M == 1 && (R == 4 || R == 1)) {
        (R == 4 ? dot4_one_row_4 : dot4_one_row_1)(g->w, g->scale, g->sdt, n, stride, g->K, ahead, g->xb, codebf,
                                                   part);
        return;
    }
#endif
    if (fmt == FMT_4BIT && g->xb)
        tile_4bit(1, R, M, n, stride, ahead, g->w, g->scale, g->sdt, code, codebf, g->K, k0, k1, g->xp, g->xb, part);
    else if (fmt == FMT_4BIT)
        tile_4bit(0, R, M, n, stride, ahead, g->w, g->scale, g->sdt, code, codebf, g->K, k0, k1, g->xp, g->xb, part);
    else
        tile_32(fmt, R, M, n, stride, ahead, g->w, g->K, k0, k1, g->xp, part);
}

/* Rows [n0, n1) of y from their sums (part, from row n0 on): int8's row scale, the bias, the output dtype. */
INLINE void store_rows(const Gemv *g, int fmt, int M, int64_t n0, int64_t n1, const float *part)
{
    for (int64_t n = n0; n < n1; n++)
        for (int m = 0; m < M; m++) {
            float v = part[(n - n0) * M + m];
            if (fmt == FMT_INT8) v = v * scale_at(g->scale, g->sdt, n) * INV127; /* scale = SCB, the row's absmax */
            if (g->bias)
                v += g->bdt == DT_BF16 ? bf16_to_f32(((const uint16_t *)g->bias)[n]) : ((const float *)g->bias)[n];
            if (g->ydt == DT_BF16)
                ((uint16_t *)g->y)[m * g->N + n] = f32_to_bf16(v);
            else
                ((float *)g->y)[m * g->N + n] = v;
        }
}

/* Bytes of one weight row (4-bit: without its absmax) */
INLINE int64_t row_bytes(const Gemv *g, int fmt)
{
    return fmt == FMT_BF16 ? 2 * g->K : fmt == FMT_INT8 ? g->K : g->K / 2;
}

/* How far ahead a batch-1 strided stream prefetches (see STREAMS), for rows of `row` bytes */
INLINE int64_t stream_ahead(int fmt, int64_t row)
{
    return fmt == FMT_BF16 || row <= 2048 ? 1024 : 2 * row;
}

/* The bf16 path's vpermw table: the code book rounded to bf16, twice (zeros for other formats). */
INLINE __m512i code_table_bf16(const Gemv *g, int fmt)
{
    uint16_t table[32];
    for (int i = 0; i < 32; i++) table[i] = fmt == FMT_4BIT ? f32_to_bf16(g->code[i & 15]) : 0;
    return _mm512_loadu_si512(table);
}

/* Rows [n0, n1): R-row tiles (strided for M = 1, see STREAMS) and single rows for the remainder, then scale, bias and
   store. For M > 1, K is walked
   in blocks whose activations (M x kblock fp32, 16 KB; for 4-bit whole 1024-weight groups, 8-32 KB) stay in L1 while
   all the rows go by; one activation row is small enough to stream from L2, and then each weight row is read in one
   sequential run. The format, R and M are compile-time constants at every call site, so each (format, R, M) gets its
   own unrolled, register-resident copy. */
INLINE void gemv_rows(const Gemv *g, int fmt, int R, int M, int64_t n0, int64_t n1, float *part)
{
    int64_t kblock = M == 1 ? g->K : fmt == FMT_4BIT ? (M <= 2 ? 2048 : 1024) : (4096 / M) & ~127;
    __m512 code = fmt == FMT_4BIT ? _mm512_loadu_ps(g->code) : _mm512_setzero_ps();
    __m512i codebf = code_table_bf16(g, fmt);
    memset(part, 0, (size_t)((n1 - n0) * M) * sizeof(float));
    int64_t row = row_bytes(g, fmt);
    if (M == 1 && fmt != FMT_INT8) { /* see STREAMS for the prefetch distances */
        int64_t run = (n1 - n0) / R, n = n0 + R * run, ahead = stream_ahead(fmt, row);
        for (int64_t i = 0; i < run; i++) tile(g, fmt, R, M, n0 + i, run, ahead, 0, g->K, code, codebf, part + i);
        for (; n < n1; n++) tile(g, fmt, 1, M, n, 1, ahead, 0, g->K, code, codebf, part + (n - n0));
    } else
        for (int64_t k0 = 0; k0 < g->K; k0 += kblock) {
            int64_t k1 = k0 + kblock < g->K ? k0 + kblock : g->K, n = n0;
            for (; n + R <= n1; n += R)
                tile(g, fmt, R, M, n, 1, R * row, k0, k1, code, codebf, part + (n - n0) * M);
            for (; n < n1; n++) tile(g, fmt, 1, M, n, 1, row, k0, k1, code, codebf, part + (n - n0) * M);
        }
    store_rows(g, fmt, M, n0, n1, part);
}

/* Rows per tile: as many as keep the accumulators (R*M, twice that for 4-bit block sums) in the 32 registers. */
#define DISPATCH_M(FMT, RFOR)                                                                                  \
    switch (g->M) {                                                                                            \
    case 1: gemv_rows(g, FMT, RFOR(1), 1, n0, n1, part); break;                                               \
    case 2: gemv_rows(g, FMT, RFOR(2), 2, n0, n1, part); break;                                               \
    case 3: gemv_rows(g, FMT, RFOR(3), 3, n0, n1, part); break;                                               \
    case 4: gemv_rows(g, FMT, RFOR(4), 4, n0, n1, part); break;                                               \
    case 5: gemv_rows(g, FMT, RFOR(5), 5, n0, n1, part); break;                                               \
    case 6: gemv_rows(g, FMT, RFOR(6), 6, n0, n1, part); break;                                               \
    case 7: gemv_rows(g, FMT, RFOR(7), 7, n0, n1, part); break;                                               \
    default: gemv_rows(g, FMT, RFOR(8), 8, n0, n1, part); break;                                              \
    }
#define ROWS_32(m) ((m) == 1 ? 8 : (m) <= 4 ? 4 : 2)
#define ROWS_4BIT(m) ((m) <= 2 ? 4 : (m) <= 4 ? 2 : 1)

static void gemv_range(const Gemv *g, int64_t n0, int64_t n1, float *part)
{
    if (g->fmt == FMT_4BIT) {
        DISPATCH_M(FMT_4BIT, ROWS_4BIT)
    } else if (g->fmt == FMT_INT8) {
        DISPATCH_M(FMT_INT8, ROWS_32)
    } else {
        DISPATCH_M(FMT_BF16, ROWS_32)
    }
}

/* ---- splitting a GEMV's rows between the threads ----
   Each thread takes one contiguous run of rows (a whole number of 8-row tiles), so it streams its part of the
   weights sequentially. At batch 1 the runs are cut into items (one tile each: R rows, see STREAMS) that the owner
   claims from the front while a thread done with its own run takes half of what is left from the back. With even
   runs the two threads finished each GEMV of a decode step 10-15 us apart at random (per-phase timings at 32
   layers; fitting the split to their average speeds changed nothing), and every barrier kept the early one
   waiting. The owner claims at least ~16 KB of weights at a time, and an eighth of what is left while that is
   more: the claims are locked instructions, and with one per 16 KB the GEMVs read 2-9 % slower. Which thread
   computes a row does not change its value. Measured in one process, the two ways taking turns, 32 layers
   (decode tok/s, medians of 18 and 10 rounds): nf4 27.74 -> 28.83, int8 17.24 -> 17.83. */
enum { MAX_SPLIT = 64 }; /* threads beyond this many get no rows */
typedef struct {
    int64_t n0, n1, items;
    uint64_t claim; /* (back << 32) | front: the items [front, back) not yet claimed */
    int ready;      /* the owner has zeroed the run's sums: others may take items */
    char pad[28];   /* one cache line per thread */
} Slot;
typedef struct {
    int T, steal;
    Slot slot[MAX_SPLIT];
} Split;

/* Rows per tile of a batch-1 GEMV */
INLINE int tile_rows_m1(int fmt) { return fmt == FMT_4BIT ? ROWS_4BIT(1) : ROWS_32(1); }

/* Thread t of T: rows [n0, n1), an even share of N in whole 8-row tiles */
static void even_rows(int64_t N, int64_t t, int64_t T, int64_t *n0, int64_t *n1)
{
    int64_t tiles = (N + 7) / 8;
    *n0 = tiles * t / T * 8;
    *n1 = t == T - 1 ? N : tiles * (t + 1) / T * 8;
}

static void split_plan(Split *s, const Gemv *g, int T)
{
    int64_t used = T < MAX_SPLIT ? T : MAX_SPLIT;
    s->T = T;
    s->steal = g->M == 1;
    for (int64_t t = 0; t < used; t++) {
        Slot *slot = &s->slot[t];
        even_rows(g->N, t, used, &slot->n0, &slot->n1);
        slot->items = (slot->n1 - slot->n0) / tile_rows_m1(g->fmt);
        slot->claim = (uint64_t)slot->items << 32;
        slot->ready = 0;
    }
}

/* Claim up to `want` items of `slot` from the front (owner) or half of what is left from the back (another
   thread); returns the count and sets *first, or 0 when nothing is left to claim. */
static int64_t claim_items(Slot *slot, int64_t want, int back, int64_t *first)
{
    uint64_t word = __atomic_load_n(&slot->claim, __ATOMIC_ACQUIRE);
    for (;;) {
        int64_t front = (int64_t)(uint32_t)word, end = (int64_t)(word >> 32), left = end - front;
        if (left <= 0 || (back && left < 2)) return 0;
        int64_t take = back ? (left + 1) / 2 : left <= want ? left : want > left / 8 ? want : left / 8;
        uint64_t next = back ? ((uint64_t)(end - take) << 32) | (uint64_t)front
                             : ((uint64_t)end << 32) | (uint64_t)(front + take);
        if (__atomic_compare_exchange_n(&slot->claim, &word, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            *first = back ? end - take : front;
            return take;
        }
    }
}

/* The activations of a 4-bit GEMV, x [M, K], in the order its steps read them (see the layout): step s of a group of
   L lines starting at element g0 reads pair g0/2 + pair_base(L)[j] + s of x in lane j; pairs past K are zero. bf16
   path: the pairs as they are (xb); fp32 path: each step's 16 even then 16 odd elements, as fp32 (xp). */
static void prepare_x_4bit(const Gemv *g, const void *x, int xdt, int64_t K)
{
    const __m512i halves = _mm512_set1_epi32((int)0xffff0000u), one = _mm512_set1_epi32(1);
    for (int64_t m = 0; m < g->M; m++) {
        const void *row = xdt == DT_BF16 ? (const void *)((const uint16_t *)x + m * K) : (const float *)x + m * K;
        for (int64_t g0 = 0; g0 < g->K;) {
            int L = group_lines((g->K - g0) / 128);
            __m512i pair = _mm512_add_epi32(pair_base(L), _mm512_set1_epi32((int)(g0 / 2)));
            for (int s = 0; s < 4 * L; s++, pair = _mm512_add_epi32(pair, one)) {
                __mmask16 real = _mm512_cmplt_epi32_mask(pair, _mm512_set1_epi32((int)(K / 2)));
                int64_t at = m * g->K + g0 + 32 * s;
                if (xdt == DT_BF16) {
                    __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), real, pair, row, 4);
                    if (g->xb) {
                        _mm512_storeu_si512((uint16_t *)g->xb + at, v);
                        continue;
                    }
                    _mm512_storeu_ps((float *)g->xp + at, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
                    _mm512_storeu_ps((float *)g->xp + at + 16, _mm512_castsi512_ps(_mm512_and_si512(v, halves)));
                } else {
                    __m512i even = _mm512_slli_epi32(pair, 1), odd = _mm512_add_epi32(even, one);
                    _mm512_storeu_ps((float *)g->xp + at,
                                     _mm512_mask_i32gather_ps(_mm512_setzero_ps(), real, even, row, 4));
                    _mm512_storeu_ps((float *)g->xp + at + 16,
                                     _mm512_mask_i32gather_ps(_mm512_setzero_ps(), real, odd, row, 4));
                }
            }
            g0 += 128 * L;
        }
    }
}

/* The activations of one GEMV, [M, K] in `xdt`, into the buffer its path reads (xb: bf16 for the AVX512-BF16 paths;
   xp: fp32 in decoder order), zero-padded to g->K. */
static void prepare_activations(const Gemv *g, const void *x, int xdt, int64_t K)
{
    if (g->fmt == FMT_4BIT)
        prepare_x_4bit(g, x, xdt, K);
    else if (g->xb)
        for (int64_t m = 0; m < g->M; m++) {
            memcpy((uint16_t *)g->xb + m * g->K, (const uint16_t *)x + m * K, (size_t)K * sizeof(uint16_t));
            memset((uint16_t *)g->xb + m * g->K + K, 0, (size_t)(g->K - K) * sizeof(uint16_t));
        }
    else
        prepare_x((float *)g->xp, x, xdt, g->M, K, g->K, g->fmt == FMT_BF16);
}

/* A GEMV whose activation buffers xp (fp32, M x Kp) and xb (bf16, M x Kp, or NULL without AVX512-BF16) are given;
   xb is used where the format has a bf16 path and the activations are bf16. Returns 0 for an unsupported shape. */
static int gemv_init(Gemv *g, int fmt, int ydt, int xdt, int64_t M, int64_t N, int64_t K, const void *w,
                     const void *scale, int sdt, const float *code, const void *bias, int bdt, void *y, float *xp,
                     uint16_t *xb)
{
    if (M < 1 || M > MAX_M || N < 1 || K < 1 || (fmt == FMT_4BIT ? K % 64 : K % 32) != 0 || fmt < FMT_BF16 ||
        fmt > FMT_4BIT || sdt < DT_F32 || sdt > (fmt == FMT_4BIT ? DT_F16 : DT_F32))
        return 0;
    int dot = xb && (fmt == FMT_4BIT || fmt == FMT_BF16) && xdt == DT_BF16;
    Gemv init = {fmt, ydt, bdt, sdt, M, N, fmt == FMT_4BIT ? (K + 127) / 128 * 128 : K, w, scale, code, xp,
                 dot ? xb : NULL, bias, y, 0};
    *g = init;
    return 1;
}

static void gelu_bf16(uint16_t *v, int64_t n);

INLINE void gelu_rows(const Gemv *g, int64_t n0, int64_t n1)
{
    if (g->gelu)
        for (int64_t m = 0; m < g->M; m++) gelu_bf16((uint16_t *)g->y + m * g->N + n0, n1 - n0);
}

/* Items [i0, i1) of a batch-1 run (slot): strided tiles for 4-bit and bf16, contiguous ones for int8 (see STREAMS),
   adding to their rows' sums in `part` (the team's N sums, zeroed by the run's owner). */
INLINE void run_items(const Gemv *g, int fmt, const Slot *slot, int64_t i0, int64_t i1, __m512 code, __m512i codebf,
                      float *part)
{
    const int R = tile_rows_m1(fmt);
    int64_t row = row_bytes(g, fmt), n0 = slot->n0;
    if (fmt == FMT_INT8)
        for (int64_t n = n0 + R * i0; n < n0 + R * i1; n += R)
            tile(g, fmt, R, 1, n, 1, R * row, 0, g->K, code, codebf, part + n);
    else
        for (int64_t i = i0; i < i1; i++)
            tile(g, fmt, R, 1, n0 + i, slot->items, stream_ahead(fmt, row), 0, g->K, code, codebf, part + n0 + i);
}

/* The rows of items [i0, i1) of a batch-1 run from their sums: scale, bias, store, GELU. */
INLINE void finish_items(const Gemv *g, int fmt, const Slot *slot, int64_t i0, int64_t i1, const float *part)
{
    const int R = tile_rows_m1(fmt);
    int contiguous = fmt == FMT_INT8;
    for (int r = 0; r < (contiguous ? 1 : R); r++) {
        int64_t a = contiguous ? slot->n0 + R * i0 : slot->n0 + r * slot->items + i0;
        int64_t b = contiguous ? slot->n0 + R * i1 : a + (i1 - i0);
        store_rows(g, fmt, 1, a, b, part + a);
        gelu_rows(g, a, b);
    }
}

/* Batch 1: this thread zeroes its run's sums and opens its items to the others, does its rows past the whole tiles,
   then claims its items block by block (~16 KB of weights each) until none is left, and stores what it did; then it
   takes other threads' items from the back while any are left. */
INLINE void share_items(const Gemv *g, int fmt, Split *split, int t, float *part)
{
    const int R = tile_rows_m1(fmt);
    __m512 code = fmt == FMT_4BIT ? _mm512_loadu_ps(g->code) : _mm512_setzero_ps();
    __m512i codebf = code_table_bf16(g, fmt);
    Slot *own = &split->slot[t];
    int64_t rest = own->n0 + R * own->items;
    memset(part + own->n0, 0, (size_t)(own->n1 - own->n0) * sizeof(float));
    __atomic_store_n(&own->ready, 1, __ATOMIC_RELEASE);
    if (rest < own->n1) {
        gemv_rows(g, fmt, 1, 1, rest, own->n1, part + rest);
        gelu_rows(g, rest, own->n1);
    }
    int64_t block = 16384 / (R * row_bytes(g, fmt)), first, count;
    if (block < 1) block = 1;
    while ((count = claim_items(own, block, 0, &first)) > 0)
        run_items(g, fmt, own, first, first + count, code, codebf, part);
    /* the claims stop where the front meets the back: the owner did [0, front) */
    finish_items(g, fmt, own, 0, (int64_t)(uint32_t)__atomic_load_n(&own->claim, __ATOMIC_ACQUIRE), part);
    int used = split->T < MAX_SPLIT ? split->T : MAX_SPLIT;
    for (int v = 1; v < used; v++) {
        Slot *other = &split->slot[(t + v) % used];
        if (!__atomic_load_n(&other->ready, __ATOMIC_ACQUIRE)) continue; /* not started: its owner does it all */
        while ((count = claim_items(other, 0, 1, &first)) > 0) {
            run_items(g, fmt, other, first, first + count, code, codebf, part);
            finish_items(g, fmt, other, first, first + count, part);
        }
    }
}

/* Inside a parallel region: this thread's share of y's rows (`split`, made for this GEMV by split_plan). `part`:
   N x M floats shared by the team. */
static void gemv_share(const Gemv *g, float *part, Split *split)
{
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    if (T != split->T) { /* a team smaller than asked for (nested or limited parallelism): even tiles */
        int64_t n0, n1;
        even_rows(g->N, t, T, &n0, &n1);
        if (n1 > n0) {
            gemv_range(g, n0, n1, part + n0 * g->M);
            gelu_rows(g, n0, n1);
        }
        return;
    }
    if (t >= MAX_SPLIT) return;
    if (split->steal) {
        if (g->fmt == FMT_4BIT)
            share_items(g, FMT_4BIT, split, t, part);
        else if (g->fmt == FMT_INT8)
            share_items(g, FMT_INT8, split, t, part);
        else
            share_items(g, FMT_BF16, split, t, part);
        return;
    }
    const Slot *own = &split->slot[t];
    if (own->n1 > own->n0) {
        gemv_range(g, own->n0, own->n1, part + own->n0 * g->M);
        gelu_rows(g, own->n0, own->n1);
    }
}

INLINE int64_t padded_k(int64_t K) { return (K + 127) / 128 * 128; }

static PyObject *py_gemv(PyObject *self, PyObject *args)
{
    int fmt, ydt, xdt, sdt, bdt, nthreads;
    unsigned long long y, x, w, scale, code, bias;
    Py_ssize_t M, N, K;
    if (!PyArg_ParseTuple(args, "iKiKiKKiKKinnni", &fmt, &y, &ydt, &x, &xdt, &w, &scale, &sdt, &code, &bias, &bdt, &M,
                          &N, &K, &nthreads))
        return NULL;
    /* buffers for the rows asked for (sizes clamped to something valid: gemv_init rejects bad shapes below) */
    int64_t Kp = padded_k(K > 0 ? K : 1), rows = M >= 1 && M <= MAX_M ? M : 1;
    float *xp = aligned_alloc(64, (size_t)(rows * Kp) * sizeof(float));
    uint16_t *xb = aligned_alloc(64, (size_t)(rows * Kp) * sizeof(uint16_t));
    float *part = malloc((size_t)(N > 0 ? N : 1) * (size_t)rows * sizeof(float));
    Gemv g;
    int ok = xp && xb && part;
    if (ok && !gemv_init(&g, fmt, ydt, xdt, M, N, K, (const void *)w, (const void *)scale, sdt, (const float *)code,
                         (const void *)bias, bdt, (void *)y, xp, HAVE_BF16 ? xb : NULL)) {
        free(xp), free(xb), free(part);
        PyErr_Format(PyExc_ValueError, "gemv: unsupported format %d or shape M=%zd N=%zd K=%zd", fmt, M, N, K);
        return NULL;
    }
    if (ok) {
        Split split __attribute__((aligned(64)));
        split_plan(&split, &g, nthreads);
        Py_BEGIN_ALLOW_THREADS
        prepare_activations(&g, (const void *)x, xdt, K);
#pragma omp parallel num_threads(nthreads)
        gemv_share(&g, part, &split);
        Py_END_ALLOW_THREADS
    }
    free(xp), free(xb), free(part);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---- dequantization (prefill): out [N, K] in fp32 or bf16, natural order ---- */

static void dequant_row(int fmt, int64_t n, const void *w, const void *scale, int sdt, const float *code, int64_t K,
                        void *out, int odt)
{
    if (fmt == FMT_INT8) {
        /* (q * SCB) * (1/127), in this order, is bitsandbytes' int8_vectorwise_dequant (scale = SCB). */
        __m512 s = _mm512_set1_ps(scale_at(scale, sdt, n)), inv127 = _mm512_set1_ps(INV127);
        for (int64_t k = 0; k < K; k += 16) {
            __m128i q = _mm_loadu_si128((const __m128i *)((const int8_t *)w + n * K + k));
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), s), inv127);
            store16(out, n * K + k, odt, v);
        }
        return;
    }
    /* 4-bit (see the layout): dword j of line l of a group of L lines holds run r = L q + l (elements 8r..8r+7) of
       block j mod 2L, q = j div 2L. Each 16 elements of a block are two runs: their dwords spread over 16 lanes,
       shifted so that each lane's index is in its low 4 bits, then looked up in the code book and scaled. */
    int64_t Kp = (K + 127) / 128 * 128;
    const uint8_t *bytes = (const uint8_t *)w + n * (Kp / 2);
    const __m512 c = _mm512_loadu_ps(code);
    const __m512i shift = _mm512_set_epi32(28, 12, 24, 8, 20, 4, 16, 0, 28, 12, 24, 8, 20, 4, 16, 0);
    for (int64_t g0 = 0; g0 < K;) {
        int L = group_lines((Kp - g0) / 128);
        __m512i line[8];
        for (int l = 0; l < L; l++) line[l] = _mm512_loadu_si512(bytes + g0 / 2 + 64 * l);
        __m512i which[4]; /* the dwords of runs r, r + 1 of block 0; block b's are b further */
        for (int r = 0; r < 8; r += 2)
            which[r / 2] = _mm512_mask_blend_epi32(0xff00, _mm512_set1_epi32(2 * L * (r / L)),
                                                   _mm512_set1_epi32(16 + 2 * L * ((r + 1) / L)));
        for (int b = 0; b < 2 * L && g0 + 64 * b < K; b++) { /* K is a multiple of 64: padding is whole blocks */
            __m512 a = _mm512_set1_ps(scale_at(scale, sdt, n * (Kp / 64) + g0 / 64 + b));
            for (int r = 0; r < 8; r += 2) {
                __m512i dwords = _mm512_add_epi32(which[r / 2], _mm512_set1_epi32(b));
                __m512i runs = _mm512_permutex2var_epi32(line[r % L], dwords, line[(r + 1) % L]);
                __m512i idx = _mm512_srlv_epi32(runs, shift);
                store16(out, n * K + g0 + 64 * b + 8 * r, odt, _mm512_mul_ps(_mm512_permutexvar_ps(idx, c), a));
            }
        }
        g0 += 128 * L;
    }
}

static PyObject *py_dequantize(PyObject *self, PyObject *args)
{
    int fmt, odt, sdt, nthreads;
    unsigned long long out, w, scale, code;
    Py_ssize_t N, K;
    if (!PyArg_ParseTuple(args, "iKiKKiKnni", &fmt, &out, &odt, &w, &scale, &sdt, &code, &N, &K, &nthreads))
        return NULL;
    if (N < 1 || K < 1 || K % (fmt == FMT_4BIT ? 64 : 16) != 0 || (fmt != FMT_INT8 && fmt != FMT_4BIT) ||
        sdt < DT_F32 || sdt > (fmt == FMT_4BIT ? DT_F16 : DT_F32)) {
        PyErr_Format(PyExc_ValueError, "dequantize: unsupported format %d, scale dtype %d or shape N=%zd K=%zd", fmt,
                     sdt, N, K);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        dequant_row(fmt, n, (const void *)w, (const void *)scale, sdt, (const float *)code, K, (void *)out, odt);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- blockwise 4-bit quantization (quantize-at-load): bitsandbytes' rule, bit-exact with the PyTorch version in
   neoxja.quantization (same fp32 operations: absmax, reciprocal of max(absmax, 1e-38), multiply, clamp) ---- */

static const float NF4_THRESHOLDS[15] = { /* fp32 midpoints of the NF4 code; a value on one takes the lower index */
    -0.8480963706970215f, -0.6106328964233398f, -0.4599952697753906f, -0.33967941999435425f, -0.23460739850997925f,
    -0.13791173696517944f, -0.045525018125772476f, 0.03979014977812767f, 0.120255246758461f, 0.2035212516784668f,
    0.2920137643814087f, 0.3893125355243683f, 0.5016634464263916f, 0.6427869200706482f, 0.8614784479141235f};
/* FP4: the pivots of bitsandbytes' CUDA dQuantizeFP4 on |x| and the 3-bit pattern of each magnitude rank */
static const float FP4_PIVOTS[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f,
                                    0.8333333f};

static void quantize_block(const void *w, int wdt, int64_t b, int nf4, uint8_t *idx, float *absmax)
{
    __m512 v[4], m = _mm512_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = load16(w, b * 64 + 16 * i, wdt);
        m = _mm512_max_ps(m, _mm512_abs_ps(v[i]));
    }
    float a = _mm512_reduce_max_ps(m);
    absmax[b] = a;
    __m512 r = _mm512_set1_ps(1.0f / (a > 1e-38f ? a : 1e-38f)), one = _mm512_set1_ps(1.0f);
    const __m512i ones = _mm512_set1_epi32(1);
    const __m512i patterns = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 3, 2, 5, 4, 7, 6, 1, 0); /* by magnitude rank */
    for (int i = 0; i < 4; i++) {
        __m512 x = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v[i], r), _mm512_sub_ps(_mm512_setzero_ps(), one)), one);
        __m512i q = _mm512_setzero_si512();
        if (nf4) {
            for (int t = 0; t < 15; t++) { /* index = number of thresholds below x */
                __mmask16 below = _mm512_cmp_ps_mask(_mm512_set1_ps(NF4_THRESHOLDS[t]), x, _CMP_LT_OQ);
                q = _mm512_mask_add_epi32(q, below, q, ones);
            }
        } else {
            __m512 ax = _mm512_abs_ps(x);
            for (int t = 0; t < 7; t++) {
                __mmask16 below = _mm512_cmp_ps_mask(_mm512_set1_ps(FP4_PIVOTS[t]), ax, _CMP_LT_OQ);
                q = _mm512_mask_add_epi32(q, below, q, ones);
            }
            __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
            q = _mm512_permutexvar_epi32(q, patterns);
            q = _mm512_mask_or_epi32(q, negative, q, _mm512_set1_epi32(8)); /* the sign bit */
        }
        _mm_storeu_si128((__m128i *)(idx + b * 64 + 16 * i), _mm512_cvtepi32_epi8(q));
    }
}

static PyObject *py_quantize_4bit(PyObject *self, PyObject *args)
{
    int wdt, nf4, nthreads;
    unsigned long long idx, absmax, w;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KKKinpi", &idx, &absmax, &w, &wdt, &n, &nf4, &nthreads)) return NULL;
    if (n < 1 || n % 64 != 0) {
        PyErr_Format(PyExc_ValueError, "quantize_4bit: n=%zd is not a positive multiple of 64", n);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < n / 64; b++)
        quantize_block((const void *)w, wdt, b, nf4, (uint8_t *)idx, (float *)absmax);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- decode attention: one new query per sequence against its cached keys and values ---- */

/* up to 16 fp32 or bf16 values (mask `m` selects lanes; the rest read as 0) as fp32 */
INLINE __m512 load16_masked(const void *src, int64_t off, int dt, __mmask16 m)
{
    if (dt == DT_BF16) return bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)src + off));
    return _mm512_maskz_loadu_ps(m, (const float *)src + off);
}

INLINE void store16_masked(void *out, int64_t off, int dt, __m512 v, __mmask16 m)
{
    if (dt == DT_BF16)
        _mm256_mask_storeu_epi16((uint16_t *)out + off, m, f32x16_to_bf16(v));
    else
        _mm512_mask_storeu_ps((float *)out + off, m, v);
}

/* e^x for x <= 0 (softmax after subtracting the maximum): e^x = 2^n e^r with |r| <= ln2/2, e^r by its Taylor
   polynomial to degree 7 (relative error < 1e-7); below -87.3 the result is 0, as fp32 expf underflows. */
INLINE __m512 exp_nonpositive(__m512 x)
{
    __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(live, p, n);
}

enum { MAX_HEAD_CHUNKS = 16 }; /* head_dim <= 256 */

/* softmax(q . k_t * scale + mask_t) weighted sum of v_t for one (sequence, head); `s` is scratch for T scores */
static void attend_one(const float *q, const void *k, const void *v, int kdt, int64_t T, int64_t D, int64_t st,
                       float scale, const float *mask, void *out, int odt, float *s)
{
    int chunks = (int)((D + 15) / 16);
    __mmask16 tail = (__mmask16)((1u << (D - 16 * (chunks - 1))) - 1u);
    __m512 qv[MAX_HEAD_CHUNKS], acc[MAX_HEAD_CHUNKS];
    for (int c = 0; c < chunks; c++) {
        qv[c] = load16_masked(q, 16 * c, DT_F32, c == chunks - 1 ? tail : 0xffff);
        acc[c] = _mm512_setzero_ps();
    }
    float top = -INFINITY;
    for (int64_t t = 0; t < T; t++) {
        __m512 dot = _mm512_setzero_ps();
        for (int c = 0; c < chunks; c++)
            dot = _mm512_fmadd_ps(qv[c], load16_masked(k, t * st + 16 * c, kdt, c == chunks - 1 ? tail : 0xffff), dot);
        s[t] = _mm512_reduce_add_ps(dot) * scale + (mask ? mask[t] : 0.0f);
        if (s[t] > top) top = s[t];
    }
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; t += 16) {
        __mmask16 m = T - t >= 16 ? 0xffff : (__mmask16)((1u << (T - t)) - 1u);
        __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t),
                                                                         _mm512_set1_ps(top))));
        _mm512_mask_storeu_ps(s + t, m, e);
        total = _mm512_add_ps(total, e);
    }
    for (int64_t t = 0; t < T; t++) {
        __m512 p = _mm512_set1_ps(s[t]);
        for (int c = 0; c < chunks; c++) {
            __m512 vc = load16_masked(v, t * st + 16 * c, kdt, c == chunks - 1 ? tail : 0xffff);
            acc[c] = _mm512_fmadd_ps(p, vc, acc[c]);
        }
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int c = 0; c < chunks; c++)
        store16_masked(out, 16 * c, odt, _mm512_mul_ps(acc[c], inv), c == chunks - 1 ? tail : 0xffff);
}

/* One decode step of attention for one (sequence, head), from the qkv projection of its new token ([q | k | v], D
   values each): rotate query and key (GPT-NeoX half-split rotary on the first R channels, 16 channels a step, in
   fp32 with both products rounded before the sum as PyTorch's fp32 rotary does, then rounded to the activations'
   dtype as a separate rotary would store them), write key and value at position `pos` of the cache (row stride st),
   then attend over positions 0..pos. */
static void decode_one(const void *qkv, int dt, const void *cos, const void *sin, int64_t R, int64_t D, void *kc,
                       void *vc, int64_t st, int64_t pos, float scale, const float *mask, void *out, float *s)
{
    float q[16 * MAX_HEAD_CHUNKS];
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    int64_t half = R / 2;
    for (int64_t i0 = 0; i0 < D; i0 += 16) {
        __m512i i = _mm512_add_epi32(lane, _mm512_set1_epi32((int)i0));
        __mmask16 live = _mm512_cmplt_epi32_mask(i, _mm512_set1_epi32((int)D));
        __mmask16 low = live & _mm512_cmplt_epi32_mask(i, _mm512_set1_epi32((int)half));
        __mmask16 high = live & ~low & _mm512_cmplt_epi32_mask(i, _mm512_set1_epi32((int)R));
        __m512 qi = load16_masked(qkv, i0, dt, live), ki = load16_masked(qkv, D + i0, dt, live);
        /* x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]: channel i pairs with i + R/2 (low) or i - R/2 */
        __m512 qj = _mm512_mask_mov_ps(load16_masked(qkv, i0 + half, dt, low), high,
                                       load16_masked(qkv, i0 - half, dt, high));
        __m512 kj = _mm512_mask_mov_ps(load16_masked(qkv, D + i0 + half, dt, low), high,
                                       load16_masked(qkv, D + i0 - half, dt, high));
        __m512 c = load16_masked(cos, i0, dt, low | high), sn = load16_masked(sin, i0, dt, low | high);
        sn = _mm512_mask_sub_ps(sn, low, _mm512_setzero_ps(), sn);
        qi = _mm512_mask_mov_ps(qi, low | high, _mm512_add_ps(_mm512_mul_ps(qi, c), _mm512_mul_ps(qj, sn)));
        ki = _mm512_mask_mov_ps(ki, low | high, _mm512_add_ps(_mm512_mul_ps(ki, c), _mm512_mul_ps(kj, sn)));
        if (dt == DT_BF16) /* the query as a separate rotary would store it */
            qi = bf16x16_to_f32(f32x16_to_bf16(qi));
        _mm512_storeu_ps(q + i0, qi);
        store16_masked(kc, pos * st + i0, dt, ki, live);
        store16_masked(vc, pos * st + i0, dt, load16_masked(qkv, 2 * D + i0, dt, live), live);
    }
    attend_one(q, kc, vc, dt, pos + 1, D, st, scale, mask, out, dt, s);
}

/* The cached keys and values of one layer and the step's rotary tables: kc, vc [B, H, capacity, D] with strides sb,
   sh, st (elements); cos, sin [B, R]; mask [B, pos + 1] fp32 or NULL. */
typedef struct {
    const void *cos, *sin;
    int64_t H, D, R;
    void *kc, *vc;
    int64_t sb, sh, st, pos;
    float scale;
    const float *mask;
} Attention;

/* Inside a parallel region: the team shares the B x H (sequence, head) pairs of one decode step; qkv [B, H, 3D],
   out [B, H * D], both in `dt`; `s`: this thread's scratch for pos + 1 scores. */
static void attend_share(const Attention *a, const void *qkv, int dt, int64_t B, void *out, float *s)
{
    size_t esize = dt == DT_BF16 ? 2 : 4;
    int64_t H = a->H, D = a->D, R = a->R;
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H, ko = (b * a->sb + h * a->sh) * (int64_t)esize;
        decode_one((const char *)qkv + (b * H * 3 * D + h * 3 * D) * esize, dt, (const char *)a->cos + b * R * esize,
                   (const char *)a->sin + b * R * esize, R, D, (char *)a->kc + ko, (char *)a->vc + ko, a->st, a->pos,
                   a->scale, a->mask ? a->mask + b * (a->pos + 1) : NULL, (char *)out + (b * H + h) * D * esize, s);
    }
}

static int attention_valid(Py_ssize_t B, const Attention *a)
{
    if (B < 1 || a->H < 1 || a->D < 1 || a->D > 16 * MAX_HEAD_CHUNKS || a->R < 0 || a->R > a->D || a->R % 2 ||
        a->pos < 0) {
        PyErr_Format(PyExc_ValueError, "decode_attention: unsupported shape B=%zd H=%lld D=%lld R=%lld pos=%lld", B,
                     (long long)a->H, (long long)a->D, (long long)a->R, (long long)a->pos);
        return 0;
    }
    return 1;
}

static PyObject *py_decode_attention(PyObject *self, PyObject *args)
{
    unsigned long long qkv, cos, sin, kc, vc, mask, out;
    int dt, nthreads;
    Py_ssize_t B, H, D, R, sb, sh, st, pos;
    float scale;
    if (!PyArg_ParseTuple(args, "KiKKnnnnKKnnnnfKKi", &qkv, &dt, &cos, &sin, &B, &H, &D, &R, &kc, &vc, &sb, &sh, &st,
                          &pos, &scale, &mask, &out, &nthreads))
        return NULL;
    Attention a = {(const void *)cos, (const void *)sin, H, D, R, (void *)kc, (void *)vc, sb, sh, st, pos, scale,
                   (const float *)mask};
    if (!attention_valid(B, &a)) return NULL;
    float *scores = malloc((size_t)nthreads * (size_t)(pos + 1) * sizeof(float));
    if (!scores) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(nthreads)
    attend_share(&a, (const void *)qkv, dt, B, (void *)out, scores + omp_get_thread_num() * (pos + 1));
    Py_END_ALLOW_THREADS
    free(scores);
    Py_RETURN_NONE;
}

/* ---- decoder layers in one call (decoding, bf16 activations) ----
   The decode step of a layer is four GEMVs, attention and a few vector operations on M rows (one new token per
   sequence). Called one by one from Python, the small operations and the call overheads cost ~150 us per layer,
   ~5 ms per token at 32 layers; one native call per layer still left ~45 us of Python and ~50 us of native set-up
   and waiting per layer. Here a run of layers (all of them, usually) is one call and one parallel region, the
   layers separated by barriers. The rounding points are those of the module path (neoxja.modeling.Layer): every
   tensor the module path stores in bf16 is rounded to bf16 here at the same place, so the two agree up to the last
   bit of the layer norms' and GELU's fp32 arithmetic. */

/* LayerNorm of one row into bf16: mean and (biased) variance in fp32, then (x - mean) * rstd * w + b, rounded once. */
static void layer_norm_row(const uint16_t *x, const void *w, const void *b, int pdt, float eps, int64_t H,
                           uint16_t *out)
{
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < H; i += 16) sum = _mm512_add_ps(sum, load16(x, i, DT_BF16));
    float mean = _mm512_reduce_add_ps(sum) / (float)H;
    __m512 mv = _mm512_set1_ps(mean), sq = _mm512_setzero_ps();
    for (int64_t i = 0; i < H; i += 16) {
        __m512 d = _mm512_sub_ps(load16(x, i, DT_BF16), mv);
        sq = _mm512_fmadd_ps(d, d, sq);
    }
    __m512 rstd = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sq) / (float)H + eps));
    for (int64_t i = 0; i < H; i += 16) {
        __m512 v = _mm512_mul_ps(_mm512_sub_ps(load16(x, i, DT_BF16), mv), rstd);
        v = _mm512_fmadd_ps(v, load16(w, i, pdt), b ? load16(b, i, pdt) : _mm512_setzero_ps());
        store16(out, i, DT_BF16, v);
    }
}

/* erfc(z) for z >= 0 with a fractional error below 1.2e-7: t exp(-z^2 + P(t)), t = 1 / (1 + z/2), P the Chebyshev
   fit of Press et al., Numerical Recipes, 6.2. */
INLINE __m512 erfc_nonnegative(__m512 z)
{
    static const float P[10] = {-1.26551223f, 1.00002368f, 0.37409196f, 0.09678418f, -0.18628806f,
                                0.27886807f,  -1.13520398f, 1.48851587f, -0.82215223f, 0.17087277f};
    __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(z, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_set1_ps(P[9]);
    for (int i = 8; i >= 0; i--) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(P[i]));
    return _mm512_mul_ps(t, exp_nonpositive(_mm512_fnmadd_ps(z, z, p)));
}

/* GELU (the exact, erf form) in place on bf16 values: x (1 + erf(x / sqrt 2)) / 2, with 1 + erf(u) = 2 - erfc(u)
   for u >= 0 and erfc(-u) below, so neither side loses precision by cancellation. */
static void gelu_bf16(uint16_t *v, int64_t n)
{
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1u);
        __m512 x = load16_masked(v, i, DT_BF16, m);
        __m512 c = erfc_nonnegative(_mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f)));
        __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
        __m512 one_plus_erf = _mm512_mask_mov_ps(_mm512_sub_ps(_mm512_set1_ps(2.0f), c), neg, c);
        store16_masked(v, i, DT_BF16, _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), one_plus_erf), m);
    }
}

/* out = round(a + b) elementwise for bf16 a and b (b may be fp32 when it is a parameter) */
static void add_bf16(uint16_t *out, const uint16_t *a, const void *b, int bdt, int64_t n)
{
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1u);
        store16_masked(out, i, DT_BF16, _mm512_add_ps(load16_masked(a, i, DT_BF16, m), load16_masked(b, i, bdt, m)),
                       m);
    }
}

/* The fixed arguments of one layer's decode step (its weights, norms and shapes), checked once by `layer_plan`
   (which returns None for a layer the kernel cannot run) and kept by the Python side, as bytes, until something
   they point at changes; `decode_layers` takes one per layer. Linear layers in order: query_key_value,
   attention.dense, dense_h_to_4h, dense_4h_to_h. */
typedef struct {
    int fmt[4], sdt[4], bdt[4];
    const void *w[4], *scale[4], *bias[4];
    const float *code[4];
    int64_t N[4], K[4];
    const void *ln1w, *ln1b, *ln2w, *ln2b, *dbias;
    int pdt, dbdt, parallel;
    float eps1, eps2, attn_scale;
    int64_t H, heads;
} LayerPlan;

static PyObject *py_layer_plan(PyObject *self, PyObject *args)
{
    PyObject *lt[4];
    unsigned long long ln1w, ln1b, ln2w, ln2b, dbias;
    int pdt, dbdt, parallel;
    float eps1, eps2, attn_scale;
    Py_ssize_t H, heads;
    if (!PyArg_ParseTuple(args, "OOOOKKKKfKifiinnf", &lt[0], &lt[1], &lt[2], &lt[3], &ln1w, &ln1b, &ln2w, &ln2b,
                          &eps1, &dbias, &dbdt, &eps2, &pdt, &parallel, &H, &heads, &attn_scale))
        return NULL;
    LayerPlan p = {.ln1w = (const void *)ln1w, .ln1b = (const void *)ln1b, .ln2w = (const void *)ln2w,
                   .ln2b = (const void *)ln2b, .dbias = (const void *)dbias, .pdt = pdt, .dbdt = dbdt,
                   .parallel = parallel, .eps1 = eps1, .eps2 = eps2, .attn_scale = attn_scale, .H = H,
                   .heads = heads};
    for (int i = 0; i < 4; i++) {
        unsigned long long w, scale, code, bias;
        Py_ssize_t N, K;
        if (!PyArg_ParseTuple(lt[i], "iKKiKKinn", &p.fmt[i], &w, &scale, &p.sdt[i], &code, &bias, &p.bdt[i], &N, &K))
            return NULL;
        p.w[i] = (const void *)w, p.scale[i] = (const void *)scale, p.code[i] = (const float *)code;
        p.bias[i] = (const void *)bias, p.N[i] = N, p.K[i] = K;
        Gemv probe;
        if (!gemv_init(&probe, p.fmt[i], DT_BF16, DT_BF16, 1, N, K, p.w[i], p.scale[i], p.sdt[i], p.code[i],
                       p.bias[i], p.bdt[i], NULL, NULL, NULL)) {
            Py_RETURN_NONE; /* a format or shape the kernel does not take */
        }
    }
    int64_t I = p.N[2];
    if (H < 16 || H % 16 || heads < 1 || H % heads || H / heads > 16 * MAX_HEAD_CHUNKS || p.K[0] != H ||
        p.N[0] != 3 * H || p.K[1] != H || p.N[1] != H || p.K[2] != H || p.K[3] != I || p.N[3] != H) {
        Py_RETURN_NONE; /* shapes that are not one GPT-NeoX layer's */
    }
    return PyBytes_FromStringAndSize((const char *)&p, sizeof p);
}

/* The buffers of one decode step through a run of layers: per layer its four GEMVs and its attention (cache), and
   bf16 work rows shared by all layers: h (normed input), qkv, attn, d (attention output), r (residual), u (MLP
   hidden), o (MLP out), and two rows the layers' outputs alternate between. */
typedef struct {
    int64_t L, M, H, I;
    const LayerPlan *plans;
    Gemv *g;        /* [L][4] */
    Attention *att; /* [L] */
    uint16_t *h, *qkv, *attn, *d, *r, *u, *o, *between[2];
    float *part, *scores; /* scores: per thread, pos + 1 floats */
    Split *split;         /* the rows of the GEMV at hand */
} Step;

/* One thread, before a GEMV: its activations (`x` [M, K] in bf16) and its split of the rows. */
static void gemv_prepare(const Step *s, const Gemv *g, const uint16_t *x, int64_t K)
{
    prepare_activations(g, x, DT_BF16, K);
    split_plan(s->split, g, omp_get_num_threads());
}

/* Layer l's input: the step's input for the first layer, else the previous layer's output. */
INLINE const uint16_t *layer_input(const Step *s, int64_t l, const uint16_t *x)
{
    return l == 0 ? x : s->between[(l - 1) & 1];
}

/* The end of layer l: its output row(s) = MLP output + residual(s), into `y`. */
static void layer_finish(const Step *s, int64_t l, const uint16_t *xin, uint16_t *y)
{
    int64_t n = s->M * s->H;
    if (s->plans[l].parallel) { /* mlp + attn + x, left to right */
        add_bf16(s->o, s->o, s->d, DT_BF16, n);
        add_bf16(y, s->o, xin, DT_BF16, n);
    } else {
        add_bf16(y, s->o, s->r, DT_BF16, n);
    }
}

/* Inside a parallel region: layers 0..L-1 of one decode step, x -> y. Between the barriers one thread does the
   small work (norms, residuals, activation copies) and the team shares the GEMVs (dense_h_to_4h with its GELU) and
   the attention. */
static void layers_share(const Step *s, const uint16_t *x, uint16_t *y)
{
    int64_t M = s->M, H = s->H;
    float *scores = s->scores + omp_get_thread_num() * (s->att[0].pos + 1);
    for (int64_t l = 0; l < s->L; l++) {
        const LayerPlan *p = &s->plans[l];
        const Gemv *g = &s->g[4 * l];
        const uint16_t *xin = layer_input(s, l, x);
#pragma omp single
        {
            if (l > 0) layer_finish(s, l - 1, layer_input(s, l - 1, x), s->between[(l - 1) & 1]);
            for (int64_t m = 0; m < M; m++)
                layer_norm_row(xin + m * H, p->ln1w, p->ln1b, p->pdt, p->eps1, H, s->h + m * H);
            gemv_prepare(s, &g[0], s->h, H);
        }
        gemv_share(&g[0], s->part, s->split);
#pragma omp barrier
        attend_share(&s->att[l], s->qkv, DT_BF16, M, s->attn, scores);
#pragma omp single
        gemv_prepare(s, &g[1], s->attn, H);
        gemv_share(&g[1], s->part, s->split);
#pragma omp barrier
#pragma omp single
        {
            if (p->dbias)
                for (int64_t m = 0; m < M; m++) add_bf16(s->d + m * H, s->d + m * H, p->dbias, p->dbdt, H);
            const uint16_t *mlp_in = xin; /* parallel residual: both branches read the layer input */
            if (!p->parallel) {
                add_bf16(s->r, s->d, xin, DT_BF16, M * H); /* r = attn + x */
                mlp_in = s->r;
            }
            for (int64_t m = 0; m < M; m++)
                layer_norm_row(mlp_in + m * H, p->ln2w, p->ln2b, p->pdt, p->eps2, H, s->h + m * H);
            gemv_prepare(s, &g[2], s->h, H);
        }
        gemv_share(&g[2], s->part, s->split);
#pragma omp barrier
#pragma omp single
        gemv_prepare(s, &g[3], s->u, p->N[2]); /* GELU is done: see Gemv.gelu */
        gemv_share(&g[3], s->part, s->split);
#pragma omp barrier
    }
#pragma omp single
    layer_finish(s, s->L - 1, layer_input(s, s->L - 1, x), y);
}

static PyObject *py_decode_layers(PyObject *self, PyObject *args)
{
    unsigned long long x, out, cos, sin, mask;
    PyObject *plan_bytes, *cache_bytes;
    int nthreads;
    Py_ssize_t M, H, heads, R, sb, sh, st, pos;
    if (!PyArg_ParseTuple(args, "KKnnnSSKKnnnnnKi", &x, &out, &M, &H, &heads, &plan_bytes, &cache_bytes, &cos, &sin,
                          &R, &sb, &sh, &st, &pos, &mask, &nthreads))
        return NULL;
    Py_ssize_t L = PyBytes_GET_SIZE(plan_bytes) / (Py_ssize_t)sizeof(LayerPlan);
    if (L < 1 || PyBytes_GET_SIZE(plan_bytes) != L * (Py_ssize_t)sizeof(LayerPlan) ||
        PyBytes_GET_SIZE(cache_bytes) != L * 2 * (Py_ssize_t)sizeof(uint64_t) || M < 1 || M > MAX_M) {
        PyErr_SetString(PyExc_ValueError, "decode_layers: expected one plan and one (keys, values) pair per layer, and "
                                          "1 to 8 rows");
        return NULL;
    }
    /* copies: a bytes object's data carries no alignment promise */
    LayerPlan *plans = malloc((size_t)L * sizeof(LayerPlan));
    uint64_t *caches = malloc((size_t)L * 2 * sizeof(uint64_t));
    Gemv *g = malloc((size_t)L * 4 * sizeof(Gemv));
    Attention *att = malloc((size_t)L * sizeof(Attention));
    if (!plans || !caches || !g || !att) {
        free(plans), free(caches), free(g), free(att);
        return PyErr_NoMemory();
    }
    memcpy(plans, PyBytes_AS_STRING(plan_bytes), (size_t)L * sizeof(LayerPlan));
    memcpy(caches, PyBytes_AS_STRING(cache_bytes), (size_t)L * 2 * sizeof(uint64_t));
    int64_t I = 0;
    int ok = 1;
    for (Py_ssize_t l = 0; l < L && ok; l++) {
        const LayerPlan *p = &plans[l];
        Attention a = {(const void *)cos, (const void *)sin, p->heads, H / p->heads, R, (void *)caches[2 * l],
                       (void *)caches[2 * l + 1], sb, sh, st, pos, p->attn_scale, (const float *)mask};
        att[l] = a;
        ok = p->H == H && p->heads == heads && attention_valid(M, &a);
        if (p->N[2] > I) I = p->N[2];
    }
    if (!ok) {
        free(plans), free(caches), free(g), free(att);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "decode_layers: a plan was made for another width or head count");
        return NULL;
    }
    int64_t widest = padded_k(I > H ? I : H);
    uint16_t *work = malloc((size_t)M * (size_t)(H + 3 * H + H + H + H + I + H + 2 * H) * sizeof(uint16_t));
    float *xp = aligned_alloc(64, (size_t)(M * widest) * sizeof(float));
    uint16_t *xb = aligned_alloc(64, (size_t)(M * widest) * sizeof(uint16_t));
    float *part = malloc((size_t)(M * (3 * H > I ? 3 * H : I)) * sizeof(float));
    float *scores = malloc((size_t)nthreads * (size_t)(pos + 1) * sizeof(float));
    if (!work || !xp || !xb || !part || !scores) {
        free(plans), free(caches), free(g), free(att), free(work), free(xp), free(xb), free(part), free(scores);
        return PyErr_NoMemory();
    }
    Step s = {L, M, H, I, plans, g, att};
    s.h = work, s.qkv = s.h + M * H, s.attn = s.qkv + M * 3 * H, s.d = s.attn + M * H, s.r = s.d + M * H;
    s.u = s.r + M * H, s.o = s.u + M * I, s.between[0] = s.o + M * H, s.between[1] = s.between[0] + M * H;
    Split split __attribute__((aligned(64)));
    s.part = part, s.scores = scores, s.split = &split;
    for (Py_ssize_t l = 0; l < L; l++) {
        const LayerPlan *p = &plans[l];
        void *outs[4] = {s.qkv, s.d, s.u, s.o};
        for (int i = 0; i < 4; i++) /* layer_plan checked every format and shape */
            gemv_init(&g[4 * l + i], p->fmt[i], DT_BF16, DT_BF16, M, p->N[i], p->K[i], p->w[i], p->scale[i],
                      p->sdt[i], p->code[i], p->bias[i], p->bdt[i], outs[i], xp, HAVE_BF16 ? xb : NULL);
        g[4 * l + 2].gelu = 1;
    }
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(nthreads)
    layers_share(&s, (const uint16_t *)x, (uint16_t *)out);
    Py_END_ALLOW_THREADS
    free(plans), free(caches), free(g), free(att), free(work), free(xp), free(xb), free(part), free(scores);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"gemv", py_gemv, METH_VARARGS,
     "gemv(fmt, y, ydt, x, xdt, w, scale, sdt, code, bias, bdt, M, N, K, nthreads): y[M,N] = x[M,K] @ W[N,K]^T "
     "(+ bias)"},
    {"dequantize", py_dequantize, METH_VARARGS,
     "dequantize(fmt, out, odt, w, scale, sdt, code, N, K, nthreads): out[N,K] = decoded weights"},
    {"decode_attention", py_decode_attention, METH_VARARGS,
     "decode_attention(qkv, dt, cos, sin, B, H, D, R, kc, vc, sb, sh, st, pos, scale, mask, out, nthreads): rotary, "
     "cache write at pos and attention for one new token per sequence"},
    {"layer_plan", py_layer_plan, METH_VARARGS,
     "layer_plan(linears, ln1 w, b, ln2 w, b, eps1, dense_bias, dbdt, eps2, pdt, parallel, hidden, heads, scale): "
     "one layer's fixed decode arguments, checked, as bytes for decode_layers"},
    {"decode_layers", py_decode_layers, METH_VARARGS,
     "decode_layers(x, out, M, hidden, heads, plans, caches, cos, sin, R, sb, sh, st, pos, mask, nthreads): a run of "
     "decoder layers for one new token per row, in one parallel region"},
    {"quantize_4bit", py_quantize_4bit, METH_VARARGS,
     "quantize_4bit(idx, absmax, w, wdt, n, nf4, nthreads): code indices (uint8 [n]) and absmax (fp32 [n/64])"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "FMT_BF16", FMT_BF16) || PyModule_AddIntConstant(m, "FMT_INT8", FMT_INT8) ||
        PyModule_AddIntConstant(m, "FMT_4BIT", FMT_4BIT) ||
#ifdef __AVX512BF16__
        PyModule_AddIntConstant(m, "BF16_CODE_4BIT", 1)) {
#else
        PyModule_AddIntConstant(m, "BF16_CODE_4BIT", 0)) {
#endif
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
