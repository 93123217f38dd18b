// CHECK for the host-only layout tests (tests/flash/*_layout_test.cu, *_tile_test.cu): counts
// failures and prints the first 20; each test's main returns 1 if `failures` is nonzero.
#pragma once
#include <cstdio>

static int failures = 0;
#define CHECK(cond, ...)                                    \
  do {                                                      \
    if (!(cond)) {                                          \
      if (failures++ < 20) {                                \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
        std::printf(__VA_ARGS__);                           \
        std::printf("\n");                                  \
      }                                                     \
    }                                                       \
  } while (0)
