// AMX tiles (Intel Xeon 4th generation and later): whether this process may use them, and their setup.
//
// A CPU with AMX has eight tile registers of up to 16 rows x 64 bytes and instructions that multiply them
// (`tdpbf16ps`: 16 x 32 bfloat16 by 32 x 16 bfloat16, added into 16 x 16 float32 sums, 8192 products an
// instruction). Linux hands out the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, for the whole
// process), so `amx_bf16_usable` checks the CPU and asks, once. Functions with tile instructions carry
// GLMKIT_AMX_TARGET (which allows AVX512-BF16 too), so the rest of the library keeps its flags and runs on CPUs
// without AMX; those functions run only where `amx_bf16_usable()` says so.
#pragma once

#include <cstdint>

#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                           (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define GLMKIT_AMX 1
#define GLMKIT_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512bf16")))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define GLMKIT_AMX 0  // a compiler or system without AMX support: the tile paths are left out
#define GLMKIT_AMX_TARGET
#endif

namespace glmkit_csrc {

inline bool amx_bf16_usable() {
  static const bool usable = [] {
#if GLMKIT_AMX
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;  // AMX-BF16, AMX-TILE
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;  // AVX512-BF16
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return false;
#endif
  }();
  return usable;
}

// The `ldtilecfg` operand (palette 1): each tile's rows and bytes per row; unused tiles stay 0 x 0.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};

  TileConfig& tile(int t, int tile_rows, int bytes_per_row) {
    rows[t] = uint8_t(tile_rows), colsb[t] = uint16_t(bytes_per_row);
    return *this;
  }
};

}  // namespace glmkit_csrc
