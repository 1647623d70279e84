// MatMulInt4 (domain ai.r1box): Y = A · Wᵀ for int4 (or 6-bit) weights in blocks along K with a scale and a zero
// point each, the arithmetic of onnxruntime's MatMulNBits at accuracy level 4 (activations quantized to int8 per
// block), laid out so that one unpacked block of weights serves every row of A: lanes are 16 output columns, each
// 32-bit lane accumulates 4 consecutive k (AVX512-VNNI's vpdpbusd; AVX2's vpmaddubsw and vpmaddwd on CPUs without
// it), so a batched step reads its weights once and never sums across lanes. The library is built for any x86-64;
// each path carries its own target and the CPU picks one at load.
//
// W: [N/16][K/block][block/8][64] bytes; byte 4j+i of group g holds column j's k = 8g+i in its low nibble and
//    k = 8g+4+i in its high one. At 6 bits (levels 0…63: a narrow output projection, stored by the artifact in 8-bit
//    MatMulNBits) a group is 96 bytes: those 64 hold each level's low four bits, and byte c of the 32 after them
//    the top two bits of byte c's two levels (bits 0-1 the low nibble's, 2-3 the high's) and of byte c+32's (4-7).
// params: fp16 [N/16][K/block][2][16], the 16 columns' scales then their zero points: a block's are one cache line,
//    and at block 32 they take 0.125 bytes a weight instead of float's 0.25 (a decode step reads every weight: bytes
//    are its time). r1box's export writes fp16-exact scales (as llama.cpp's Q4_0 and Q8_0 store theirs), so the
//    products stay MatMulNBits's.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;     // output columns per tile
constexpr int64_t kTilesPerTask = 4;
// A tile's weights are one stream, read once a step: asking for the line 2 KB ahead keeps enough of it in flight that
// a row waits on memory far less. The 1.5B's step on an Intel Xeon, one stream: VNNI 47–48 → 39–40 ms (1 KB ahead
// 41–42, 4 KB as 2, 8 KB 40.5–41), AVX2 55 → 40; sixteen rows 127 → 95–101 and 226 → 200–204.
constexpr int64_t kPrefetchBytes = 2048;

struct Quantized {  // A in int8, per row and block: the scale and the sum of the levels (for the zero points)
  std::vector<int8_t> levels;
  std::vector<float> scales, sums;
};

struct Step {
  const Quantized* a;
  int64_t group_bytes;  // 64 at 4 bits, 96 at 6
  const uint8_t* weights;
  const uint16_t* params;
  float* y;
  int64_t rows, k, n, block;
};

using QuantizeFn = void (*)(const float*, int64_t, int64_t, int64_t, Quantized&);
using TileFn = void (*)(const Step&, int64_t, int64_t);

constexpr int64_t group_bytes(int bits) { return bits == 4 ? 64 : 96; }

void resize(Quantized& q, int64_t rows, int64_t k, int64_t block) {
  q.levels.resize(rows * k);
  q.scales.resize(rows * (k / block));
  q.sums.resize(rows * (k / block));
}

// AVX512-VNNI: vpdpbusd multiplies 4 unsigned weight bytes by 4 signed activation bytes and adds them into a 32-bit
// lane in one instruction; a zmm register holds the tile's 16 columns.
namespace vnni {

#define R1BOX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))

constexpr int64_t kMaxRows = 16;  // rows of A sharing one pass over a tile's weights

R1BOX_TARGET void quantize(const float* a, int64_t rows, int64_t k, int64_t block, Quantized& q) {
  const int64_t blocks = k / block;
  resize(q, rows, k, block);
  for (int64_t r = 0; r < rows; r++) {
    for (int64_t b = 0; b < blocks; b++) {
      const float* x = a + r * k + b * block;
      __m512 top = _mm512_setzero_ps();
      for (int64_t i = 0; i < block; i += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
      const float amax = _mm512_reduce_max_ps(top), scale = amax / 127.0f;
      // 127 / amax rather than 1 / scale, as onnxruntime's MLAS does: hidden states built from quantized
      // embeddings put many values on exact halves of a level, where the two round apart
      const __m512 inverse = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
      __m512i sum = _mm512_setzero_si512();
      int8_t* out = q.levels.data() + r * k + b * block;
      for (int64_t i = 0; i < block; i += 16) {
        const __m512i level = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), inverse));  // to nearest even
        sum = _mm512_add_epi32(sum, level);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtsepi32_epi8(level));
      }
      q.scales[r * blocks + b] = scale;
      q.sums[r * blocks + b] = static_cast<float>(_mm512_reduce_add_epi32(sum));
    }
  }
}

template <int Rows, int Bits>
R1BOX_TARGET void tile_rows(const Step& s, int64_t tile, int64_t row0) {
  // vpdpbusd's latency is several cycles: with few rows, each row gets several accumulators so that enough
  // independent sums are in flight (low and high nibbles apart, and alternate groups apart)
  constexpr int kChains = Rows >= 8 ? 1 : Rows >= 4 ? 2 : 4;
  const int64_t blocks = s.k / s.block, groups = s.block / 8;
  const int8_t* levels = s.a->levels.data() + row0 * s.k;
  const float* a_scales = s.a->scales.data() + row0 * blocks;
  const float* a_sums = s.a->sums.data() + row0 * blocks;
  const __m512i nibble = _mm512_set1_epi8(15), three = _mm512_set1_epi8(3), twelve = _mm512_set1_epi8(12);
  constexpr int64_t stride = group_bytes(Bits);
  __m512 out[Rows];
  for (int r = 0; r < Rows; r++) out[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    __m512i dot[Rows][kChains];
    for (int r = 0; r < Rows; r++)
      for (int c = 0; c < kChains; c++) dot[r][c] = _mm512_setzero_si512();
    const uint8_t* w = s.weights + ((tile * blocks + b) * groups) * stride;
    const int8_t* x = levels + b * s.block;
    for (int64_t g = 0; g < groups; g++) {
      _mm_prefetch(reinterpret_cast<const char*>(w + g * stride + kPrefetchBytes), _MM_HINT_T0);
      const __m512i packed = _mm512_loadu_si512(w + g * stride);
      __m512i low = _mm512_and_si512(packed, nibble);
      __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
      if constexpr (Bits == 6) {  // the top bits: bytes 0-31's in the low nibbles, 32-63's in the high ones
        const __m256i top = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * stride + 64));
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(top), _mm256_srli_epi16(top, 4), 1);
        low = _mm512_or_si512(low, _mm512_slli_epi16(_mm512_and_si512(both, three), 4));
        high = _mm512_or_si512(high, _mm512_slli_epi16(_mm512_and_si512(both, twelve), 2));
      }
      const int c_low = (kChains == 4 ? 2 * (g & 1) : 0), c_high = c_low + (kChains > 1 ? 1 : 0);
      for (int r = 0; r < Rows; r++) {
        int32_t first, second;
        std::memcpy(&first, x + r * s.k + g * 8, 4);
        std::memcpy(&second, x + r * s.k + g * 8 + 4, 4);
        dot[r][c_low] = _mm512_dpbusd_epi32(dot[r][c_low], low, _mm512_set1_epi32(first));
        dot[r][c_high] = _mm512_dpbusd_epi32(dot[r][c_high], high, _mm512_set1_epi32(second));
      }
    }
    const uint16_t* params = s.params + (tile * blocks + b) * 2 * kLanes;
    const __m512 w_scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(params)));
    const __m512 w_zero = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(params + kLanes)));
    for (int r = 0; r < Rows; r++) {
      __m512i total = dot[r][0];
      for (int c = 1; c < kChains; c++) total = _mm512_add_epi32(total, dot[r][c]);
      // Σ a·(q − z) = Σ a·q − z·Σ a, all in whole numbers until the two scales
      const __m512 centred =
          _mm512_fnmadd_ps(w_zero, _mm512_set1_ps(a_sums[r * blocks + b]), _mm512_cvtepi32_ps(total));
      out[r] = _mm512_fmadd_ps(centred, _mm512_mul_ps(w_scale, _mm512_set1_ps(a_scales[r * blocks + b])), out[r]);
    }
  }
  for (int r = 0; r < Rows; r++) _mm512_storeu_ps(s.y + (row0 + r) * s.n + tile * kLanes, out[r]);
}

#undef R1BOX_TARGET

}  // namespace vnni

// AVX2 (x86-64-v3): vpmaddubsw multiplies unsigned weight bytes by signed activation bytes and adds pairs into
// 16-bit lanes, vpmaddwd then adds pairs of those into 32-bit ones. A weight is at most 15 and a level at most 127
// in size, so a 16-bit lane holds four groups' products (8 × 2 × 15 × 127 = 30480) before they must widen: one
// vpmaddwd per four groups; 6-bit levels (up to 63) widen every group (2 × 2 × 63 × 127 = 32004). A ymm register
// holds 8 columns, a tile's half. Rows go eight at a time: some sums spill to the stack, yet 16 rows of a 1536 × 8960
// MatMul ran as fast as four at a time, and 1.5× faster than two.
namespace avx2 {

#define R1BOX_TARGET __attribute__((target("avx2,fma,f16c")))

constexpr int64_t kMaxRows = 8;

R1BOX_TARGET void quantize(const float* a, int64_t rows, int64_t k, int64_t block, Quantized& q) {
  const int64_t blocks = k / block;
  resize(q, rows, k, block);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t r = 0; r < rows; r++) {
    for (int64_t b = 0; b < blocks; b++) {
      const float* x = a + r * k + b * block;
      __m256 top = _mm256_setzero_ps();
      for (int64_t i = 0; i < block; i += 8) top = _mm256_max_ps(top, _mm256_and_ps(_mm256_loadu_ps(x + i), magnitude));
      __m128 half = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
      half = _mm_max_ps(half, _mm_movehl_ps(half, half));
      const float amax = _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half))), scale = amax / 127.0f;
      const __m256 inverse = _mm256_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);  // as MLAS: see vnni::quantize
      __m256i sum = _mm256_setzero_si256();
      int8_t* out = q.levels.data() + r * k + b * block;
      for (int64_t i = 0; i < block; i += 8) {
        const __m256i level = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), inverse));
        sum = _mm256_add_epi32(sum, level);
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(level), _mm256_extracti128_si256(level, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packs_epi16(words, words));
      }
      __m128i total = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      total = _mm_add_epi32(total, _mm_shuffle_epi32(total, 0x4e));
      total = _mm_add_epi32(total, _mm_shuffle_epi32(total, 0xb1));
      q.scales[r * blocks + b] = scale;
      q.sums[r * blocks + b] = static_cast<float>(_mm_cvtsi128_si32(total));
    }
  }
}

// Halves: how many 8-column halves of the tile one pass takes. With one or two rows both (each cache line of weights
// read once); with more, one at a time, so that the rows' sums stay in registers.
template <int Rows, int Bits, int Halves = (Rows <= 2 ? 2 : 1)>
R1BOX_TARGET void tile_rows(const Step& s, int64_t tile, int64_t row0) {
  constexpr int64_t stride = group_bytes(Bits), groups_per_widen = Bits == 4 ? 4 : 1;
  const int64_t blocks = s.k / s.block, groups = s.block / 8;
  const int8_t* levels = s.a->levels.data() + row0 * s.k;
  const float* a_scales = s.a->scales.data() + row0 * blocks;
  const float* a_sums = s.a->sums.data() + row0 * blocks;
  const __m256i nibble = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const __m256i three = _mm256_set1_epi8(3), twelve = _mm256_set1_epi8(12);
  for (int64_t first_half = 0; first_half < 2; first_half += Halves) {
    __m256 out[Rows][Halves];
    for (int r = 0; r < Rows; r++)
      for (int h = 0; h < Halves; h++) out[r][h] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
      const uint8_t* w = s.weights + ((tile * blocks + b) * groups) * stride;
      const int8_t* x = levels + b * s.block;
      __m256i dot[Rows][Halves];
      for (int r = 0; r < Rows; r++)
        for (int h = 0; h < Halves; h++) dot[r][h] = _mm256_setzero_si256();
      for (int64_t g0 = 0; g0 < groups; g0 += groups_per_widen) {
        __m256i narrow[Rows][Halves];
        for (int r = 0; r < Rows; r++)
          for (int h = 0; h < Halves; h++) narrow[r][h] = _mm256_setzero_si256();
        for (int64_t g = g0; g < std::min(groups, g0 + groups_per_widen); g++) {
          _mm_prefetch(reinterpret_cast<const char*>(w + g * stride + kPrefetchBytes), _MM_HINT_T0);
          for (int h = 0; h < Halves; h++) {
            const int64_t half = first_half + h;
            const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * stride + half * 32));
            __m256i low = _mm256_and_si256(packed, nibble);
            __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
            if constexpr (Bits == 6) {  // this half's top bits: the low nibbles of the 32 bytes after, or the high
              __m256i top = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * stride + 64));
              if (half == 1) top = _mm256_srli_epi16(top, 4);
              low = _mm256_or_si256(low, _mm256_slli_epi16(_mm256_and_si256(top, three), 4));
              high = _mm256_or_si256(high, _mm256_slli_epi16(_mm256_and_si256(top, twelve), 2));
            }
            for (int r = 0; r < Rows; r++) {
              int32_t first, second;
              std::memcpy(&first, x + r * s.k + g * 8, 4);
              std::memcpy(&second, x + r * s.k + g * 8 + 4, 4);
              narrow[r][h] = _mm256_add_epi16(narrow[r][h], _mm256_maddubs_epi16(low, _mm256_set1_epi32(first)));
              narrow[r][h] = _mm256_add_epi16(narrow[r][h], _mm256_maddubs_epi16(high, _mm256_set1_epi32(second)));
            }
          }
        }
        for (int r = 0; r < Rows; r++)
          for (int h = 0; h < Halves; h++)
            dot[r][h] = _mm256_add_epi32(dot[r][h], _mm256_madd_epi16(narrow[r][h], ones));
      }
      for (int h = 0; h < Halves; h++) {
        const uint16_t* params = s.params + (tile * blocks + b) * 2 * kLanes + (first_half + h) * 8;
        const __m256 w_scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(params)));
        const __m256 w_zero = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(params + kLanes)));
        for (int r = 0; r < Rows; r++) {
          const __m256 centred = _mm256_fnmadd_ps(w_zero, _mm256_set1_ps(a_sums[r * blocks + b]),
                                                  _mm256_cvtepi32_ps(dot[r][h]));
          out[r][h] = _mm256_fmadd_ps(centred, _mm256_mul_ps(w_scale, _mm256_set1_ps(a_scales[r * blocks + b])),
                                      out[r][h]);
        }
      }
    }
    for (int r = 0; r < Rows; r++)
      for (int h = 0; h < Halves; h++)
        _mm256_storeu_ps(s.y + (row0 + r) * s.n + tile * kLanes + (first_half + h) * 8, out[r][h]);
  }
}

#undef R1BOX_TARGET

}  // namespace avx2

template <TileFn (*Pick)(int64_t, int64_t), int64_t MaxRows>
void run_tiles(void* data, size_t task) {
  const Step& s = *static_cast<const Step*>(data);
  const int64_t tiles = s.n / kLanes;
  const int64_t end = std::min<int64_t>(tiles, (task + 1) * kTilesPerTask);
  for (int64_t tile = task * kTilesPerTask; tile < end; tile++)
    for (int64_t row0 = 0; row0 < s.rows; row0 += MaxRows)
      Pick(std::min(MaxRows, s.rows - row0), s.group_bytes)(s, tile, row0);
}

template <int Bits, int... R>
constexpr std::array<TileFn, sizeof...(R)> vnni_table(std::integer_sequence<int, R...>) {
  return {&vnni::tile_rows<R + 1, Bits>...};
}
template <int Bits, int... R>
constexpr std::array<TileFn, sizeof...(R)> avx2_table(std::integer_sequence<int, R...>) {
  return {&avx2::tile_rows<R + 1, Bits>...};
}
constexpr auto kVnniTiles4 = vnni_table<4>(std::make_integer_sequence<int, vnni::kMaxRows>{});
constexpr auto kVnniTiles6 = vnni_table<6>(std::make_integer_sequence<int, vnni::kMaxRows>{});
constexpr auto kAvx2Tiles4 = avx2_table<4>(std::make_integer_sequence<int, avx2::kMaxRows>{});
constexpr auto kAvx2Tiles6 = avx2_table<6>(std::make_integer_sequence<int, avx2::kMaxRows>{});
TileFn vnni_tile(int64_t rows, int64_t bytes) {
  return (bytes == group_bytes(4) ? kVnniTiles4 : kVnniTiles6)[rows - 1];
}
TileFn avx2_tile(int64_t rows, int64_t bytes) {
  return (bytes == group_bytes(4) ? kAvx2Tiles4 : kAvx2Tiles6)[rows - 1];
}

struct Isa {
  const char* name;
  QuantizeFn quantize;
  void (*run)(void*, size_t);
};

// chosen once per process: the instructions this CPU has (and its operating system saves the registers of)
const Isa& isa() {
  static const Isa chosen = [] {
    __builtin_cpu_init();
#ifndef R1BOX_AVX2_ONLY  // the tests' build, which checks the AVX2 path on a CPU that would take the other
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      return Isa{"avx512-vnni", vnni::quantize, run_tiles<vnni_tile, vnni::kMaxRows>};
#endif
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return Isa{"avx2", avx2::quantize, run_tiles<avx2_tile, avx2::kMaxRows>};
    return Isa{nullptr, nullptr, nullptr};
  }();
  return chosen;
}

struct Kernel {
  int64_t k, n, block, bits;

  explicit Kernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    k = ki.GetAttribute<int64_t>("K");
    n = ki.GetAttribute<int64_t>("N");
    block = ki.GetAttribute<int64_t>("block_size");
    bits = ki.GetAttribute<int64_t>("bits");
    if (block < 16 || block % 16 != 0 || k % block != 0 || n % kLanes != 0 || n <= 0)
      fail("MatMulInt4: block_size must be a multiple of 16 dividing K, and N a positive multiple of 16");
    if (bits != 4 && bits != 6) fail("MatMulInt4: bits must be 4 or 6");
  }

  [[noreturn]] static void fail(const std::string& message) {
    Ort::ThrowOnError(Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, message.c_str()));
    throw std::logic_error(message);  // not reached: ThrowOnError throws on any status
  }

  static void expect_size(const Ort::ConstValue& value, int64_t size, const char* name) {
    if (value.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(size))
      fail(std::string("MatMulInt4: ") + name + " must hold " + std::to_string(size) + " elements");
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Ort::KernelContext ctx(context);
      const auto a = ctx.GetInput(0);
      std::vector<int64_t> shape = a.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.empty() || shape.back() != k) fail("MatMulInt4: A's last dimension must be K = " + std::to_string(k));
      const auto weights = ctx.GetInput(1), params = ctx.GetInput(2);
      expect_size(weights, n * k / 128 * group_bytes(bits), "the weights");  // a group: 8 k of 16 columns
      expect_size(params, 2 * n * (k / block), "the scales and zero points");
      int64_t rows = 1;
      for (size_t i = 0; i + 1 < shape.size(); i++) rows *= shape[i];
      shape.back() = n;
      auto y = ctx.GetOutput(0, shape);
      if (rows == 0) return nullptr;
      thread_local Quantized quantized;
      isa().quantize(a.GetTensorData<float>(), rows, k, block, quantized);
      Step step{&quantized, group_bytes(bits), weights.GetTensorData<uint8_t>(),
                static_cast<const uint16_t*>(params.GetTensorRawData()), y.GetTensorMutableData<float>(), rows, k, n,
                block};
      const int64_t tasks = (n / kLanes + kTilesPerTask - 1) / kTilesPerTask;
      ctx.ParallelFor(isa().run, static_cast<size_t>(tasks), 0, &step);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }
};

struct MatMulInt4 : Ort::CustomOpBase<MatMulInt4, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    }
  }
  const char* GetName() const { return "MatMulInt4"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                      : index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

// MatMulNBits's tensors into MatMulInt4's, at load: weights [N][K/block][block/2] at 4 bits (k even in the low nibble)
// or [N][K/block][block] at 6 (levels below 64, one a byte: 8-bit MatMulNBits), scales and zero points fp16
// [N][K/block] (converted by the caller, zero points unpacked). N % 16 == 0, block % 16 == 0.
extern "C" void r1box_int4_pack(const uint8_t* b, const uint16_t* scales, const uint16_t* zeros, int64_t n, int64_t k,
                                int64_t block, int64_t bits, uint8_t* weights, uint16_t* params) {
  const int64_t blocks = k / block, groups = block / 8, stride = group_bytes(static_cast<int>(bits));
  for (int64_t tile = 0; tile < n / kLanes; tile++)
    for (int64_t bl = 0; bl < blocks; bl++) {
      uint8_t* out = weights + (tile * blocks + bl) * groups * stride;
      std::memset(out, 0, groups * stride);
      uint16_t* line = params + (tile * blocks + bl) * 2 * kLanes;
      for (int64_t j = 0; j < kLanes; j++) {
        const int64_t column = tile * kLanes + j;
        uint8_t level[256];  // block ≤ 256: eligible() in int4_kernel.py
        if (bits == 4) {
          const uint8_t* src = b + (column * blocks + bl) * (block / 2);
          for (int64_t i = 0; i < block / 2; i++) level[2 * i] = src[i] & 15, level[2 * i + 1] = src[i] >> 4;
        } else {
          std::memcpy(level, b + (column * blocks + bl) * block, block);
        }
        for (int64_t g = 0; g < groups; g++)
          for (int i = 0; i < 4; i++) {
            const int at = j * 4 + i;
            const uint8_t first = level[8 * g + i], second = level[8 * g + 4 + i];
            out[g * stride + at] = static_cast<uint8_t>((first & 15) | ((second & 15) << 4));
            if (bits == 6)
              out[g * stride + 64 + at % 32] |=
                  static_cast<uint8_t>(((first >> 4) | ((second >> 4) << 2)) << (at / 32 * 4));
          }
        line[j] = scales[column * blocks + bl];
        line[kLanes + j] = zeros[column * blocks + bl];
      }
    }
}

// which of the kernel's paths this CPU runs ("avx512-vnni", "avx2"), or null where neither can
extern "C" const char* r1box_int4_isa() { return isa().name; }

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  if (isa().name == nullptr)
    return Ort::GetApi().CreateStatus(ORT_FAIL, "MatMulInt4 needs AVX2 and FMA or AVX512-VNNI; this CPU has neither");
  static MatMulInt4 op;
  static Ort::CustomOpDomain* domain = [] {
    auto* d = new Ort::CustomOpDomain("ai.r1box");  // lives as long as the process: sessions keep pointers to it
    d->Add(&op);
    return d;
  }();
  try {
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
