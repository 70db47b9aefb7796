// AMX tiles (Intel Xeon 4th generation and later): whether this process may use them, and their setup.
//
// A CPU with AMX has eight tile registers of up to 16 rows x 64 bytes and instructions that multiply them
// (`tdpbsud`: int8 x uint8 products summed into 16 x 16 int32 sums, up to 16384 products an instruction). Linux hands out the tile state only on
// request (arch_prctl ARCH_REQ_XCOMP_PERM, process-wide), so `amx_int8_usable` checks the CPU and asks once.
// Functions with tile instructions carry GLMKIT_AMX_TARGET, so the library's other code keeps its flags and
// runs on CPUs without AMX; those functions run only where `amx_int8_usable()` says so.
#pragma once

#include <cstdint>

#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                           (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define GLMKIT_AMX 1
#define GLMKIT_AMX_TARGET __attribute__((target("amx-tile,amx-int8")))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define GLMKIT_AMX 0  // a compiler or system without AMX support: the tile paths are left out
#define GLMKIT_AMX_TARGET
#endif

namespace glmkit_csrc {

inline bool amx_int8_usable() {
  static const bool usable = [] {
#if GLMKIT_AMX
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 24)) || !(d & (1u << 25))) return false;  // AMX-TILE, AMX-INT8
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
