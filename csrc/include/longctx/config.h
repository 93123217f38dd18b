// Portable qualifiers shared by host and device code. Framework-free: no torch headers.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LONGCTX_HOST_DEVICE __host__ __device__ __forceinline__
#define LONGCTX_DEVICE __device__ __forceinline__
#else
#define LONGCTX_HOST_DEVICE inline
#define LONGCTX_DEVICE inline
#endif
