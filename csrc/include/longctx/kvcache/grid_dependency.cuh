// Programmatic dependent launch (Hopper) for the decode kernels: device side.
//
// A kernel launched with the programmatic-stream-serialization attribute may start while the
// kernel before it in the stream is still running, once every CTA of that kernel has called
// grid_dependents_may_launch() (or exited). What it may do before grid_dependency_wait() is
// only work that touches no memory another kernel writes: the decode kernels call the wait as
// their first statement, so the overlap is the launch itself (CTA rasterization, shared-memory
// configuration, kernel entry), never a read of an input or a write of an output. The wait
// returns when the previous grid has completed and its memory operations are visible, so the
// ordering is the same as without the attribute. Both are no-ops below sm_90 and when the launch
// had no programmatic dependency.
#pragma once

namespace longctx {
namespace kvcache {
namespace cuda {

__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_dependents_may_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace cuda
}  // namespace kvcache
}  // namespace longctx
