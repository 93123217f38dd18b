// NcclRing: the K/V (and dK/dV) exchange of ring attention, NCCL point-to-point from C++.
//
// What it does. One communicator per (process group, device), created from an ncclUniqueId that
// the Python side broadcasts over the torch.distributed group (python/longctx/ring/comm.py), with
// the group's ranks. send_recv(send, recv) posts ONE grouped exchange (ncclGroupStart; every
// send[i] to rank+1 and every recv[i] from rank-1; ncclGroupEnd) on the communicator's own
// high-priority stream and returns at once with a work object:
//   - ordering: the comm stream first waits for an event recorded on the caller's current stream,
//     so the exchange reads send[] only after the kernels that produced it;
//   - work.wait() makes the caller's current stream wait for the exchange (no host sync), so the
//     caller computes the current K/V block while the next one is in flight (double buffering is
//     the caller's: it never receives into a tensor it is computing with or sending);
//   - allocator safety: every tensor is recorded on the comm stream (recordStream), so the caching
//     allocator does not hand its memory out again before the exchange has finished with it;
//   - failures never hang silently: wait_host(work, timeout) polls the work's event from the host;
//     when the timeout passes, or NCCL reports an asynchronous error, the communicator is aborted
//     (ncclCommAbort frees the GPU from the stuck NCCL kernels) and a RuntimeError names the
//     exchange, the peers and the reason; every later call on this communicator raises at once.
// Invariants: exchanges complete in the order they are posted (one stream, one communicator);
// every rank posts the same sequence of exchanges with matching shapes (ring_attn.py does, after
// check.py has compared the ranks' shapes); send[i] and recv[i] have the same dtype and numel and
// are contiguous tensors on the communicator's device.
// NVLink multicast (NVLS) is never used: only send/recv, and the environment's NCCL_NVLS_ENABLE
// is respected.
#include "comm/nccl_ring.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <nccl.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <chrono>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace longctx {
namespace comm {
namespace {

std::string nccl_error(ncclResult_t r) {
  std::ostringstream s;
  s << ncclGetErrorString(r) << " (ncclResult " << static_cast<int>(r) << ")";
  const char* last = ncclGetLastError(nullptr);
  if (last && *last) s << ": " << last;
  return s.str();
}

#define LONGCTX_NCCL(expr, what)                                                        \
  do {                                                                                  \
    ncclResult_t r_ = (expr);                                                           \
    TORCH_CHECK(r_ == ncclSuccess, "longctx ring (NCCL): ", what, " failed: ",          \
                nccl_error(r_));                                                        \
  } while (0)

#define LONGCTX_CUDA(expr, what)                                                        \
  do {                                                                                  \
    cudaError_t e_ = (expr);                                                            \
    TORCH_CHECK(e_ == cudaSuccess, "longctx ring: ", what, " failed: ",                 \
                cudaGetErrorString(e_));                                                \
  } while (0)

ncclDataType_t nccl_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kLong: return ncclInt64;
    case at::kInt: return ncclInt32;
    case at::kByte: return ncclUint8;
    case at::kChar: return ncclInt8;
    default:
      TORCH_CHECK(false, "longctx ring: ", name, " has dtype ", t.scalar_type(),
                  ", which the NCCL exchange does not carry");
  }
}

std::string unique_id() {
  ncclUniqueId id;
  LONGCTX_NCCL(ncclGetUniqueId(&id), "ncclGetUniqueId");
  return std::string(id.internal, NCCL_UNIQUE_ID_BYTES);
}

// One posted exchange: an event recorded on the comm stream after it.
class NcclRingWork {
 public:
  NcclRingWork(int device, std::string what) : device_(device), what_(std::move(what)) {
    c10::cuda::CUDAGuard g(device_);
    LONGCTX_CUDA(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming), "cudaEventCreate");
  }
  ~NcclRingWork() {
    if (done_) cudaEventDestroy(done_);
  }
  NcclRingWork(const NcclRingWork&) = delete;
  NcclRingWork& operator=(const NcclRingWork&) = delete;

  cudaEvent_t event() const { return done_; }
  const std::string& what() const { return what_; }

  // The caller's current stream waits for the exchange; the host does not.
  void wait() const {
    c10::cuda::CUDAGuard g(device_);
    LONGCTX_CUDA(cudaStreamWaitEvent(c10::cuda::getCurrentCUDAStream(device_).stream(), done_, 0),
                 "cudaStreamWaitEvent");
  }
  bool query() const {
    c10::cuda::CUDAGuard g(device_);
    cudaError_t e = cudaEventQuery(done_);
    if (e == cudaErrorNotReady) return false;
    LONGCTX_CUDA(e, "cudaEventQuery");
    return true;
  }

 private:
  int device_;
  std::string what_;
  cudaEvent_t done_ = nullptr;
};

class NcclRing {
 public:
  NcclRing(const std::string& id, int rank, int world_size, int device)
      : rank_(rank), world_(world_size), device_(device) {
    TORCH_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "longctx ring: rank ", rank,
                " outside a group of ", world_size);
    TORCH_CHECK(id.size() == NCCL_UNIQUE_ID_BYTES, "longctx ring: the NCCL unique id must have ",
                NCCL_UNIQUE_ID_BYTES, " bytes, got ", id.size());
    c10::cuda::CUDAGuard g(device_);
    ncclUniqueId uid;
    std::copy(id.begin(), id.end(), uid.internal);
    {
      pybind11::gil_scoped_release nogil;  // init blocks until every rank has joined
      LONGCTX_NCCL(ncclCommInitRank(&comm_, world_, uid, rank_), "ncclCommInitRank");
    }
    int lo = 0, hi = 0;
    LONGCTX_CUDA(cudaDeviceGetStreamPriorityRange(&lo, &hi), "cudaDeviceGetStreamPriorityRange");
    LONGCTX_CUDA(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, hi),
                 "cudaStreamCreateWithPriority");
    LONGCTX_CUDA(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), "cudaEventCreate");
  }

  ~NcclRing() {
    c10::cuda::CUDAGuard g(device_);
    if (comm_) {  // aborted communicators have comm_ == nullptr
      // Destroy waits for posted exchanges; with some still pending (a peer gone) abort instead.
      if (stream_ && cudaStreamQuery(stream_) == cudaSuccess) ncclCommDestroy(comm_);
      else ncclCommAbort(comm_);
    }
    if (ready_) cudaEventDestroy(ready_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  int rank() const { return rank_; }
  int world_size() const { return world_; }
  int device() const { return device_; }
  bool failed() const { return !failed_.empty(); }

  std::shared_ptr<NcclRingWork> send_recv(const std::vector<at::Tensor>& send,
                                          const std::vector<at::Tensor>& recv,
                                          const std::string& what) {
    raise_if_failed();
    TORCH_CHECK(send.size() == recv.size(), "longctx ring: send_recv needs as many receive "
                "buffers as tensors to send, got ", send.size(), " and ", recv.size());
    for (size_t i = 0; i < send.size(); ++i) {
      check_tensor(send[i], "send", i);
      check_tensor(recv[i], "recv", i);
      TORCH_CHECK(send[i].scalar_type() == recv[i].scalar_type() &&
                  send[i].numel() == recv[i].numel(), "longctx ring: send[", i, "] (",
                  send[i].scalar_type(), ", ", send[i].numel(), " elements) and recv[", i, "] (",
                  recv[i].scalar_type(), ", ", recv[i].numel(), " elements) must match");
    }
    c10::cuda::CUDAGuard g(device_);
    cudaStream_t caller = c10::cuda::getCurrentCUDAStream(device_).stream();
    LONGCTX_CUDA(cudaEventRecord(ready_, caller), "cudaEventRecord");
    LONGCTX_CUDA(cudaStreamWaitEvent(stream_, ready_, 0), "cudaStreamWaitEvent");
    auto c10_stream = c10::cuda::getStreamFromExternal(stream_, device_);
    for (const auto* list : {&send, &recv})
      for (const auto& t : *list)
        c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), c10_stream);
    const int next = (rank_ + 1) % world_, prev = (rank_ + world_ - 1) % world_;
    LONGCTX_NCCL(ncclGroupStart(), "ncclGroupStart");
    for (size_t i = 0; i < send.size(); ++i) {
      if (send[i].numel() == 0) continue;
      const ncclDataType_t dt = nccl_dtype(send[i], "send");
      LONGCTX_NCCL(ncclSend(send[i].data_ptr(), send[i].numel(), dt, next, comm_, stream_),
                   "ncclSend");
      LONGCTX_NCCL(ncclRecv(recv[i].data_ptr(), recv[i].numel(), dt, prev, comm_, stream_),
                   "ncclRecv");
    }
    LONGCTX_NCCL(ncclGroupEnd(), "ncclGroupEnd");
    auto work = std::make_shared<NcclRingWork>(device_, what);
    LONGCTX_CUDA(cudaEventRecord(work->event(), stream_), "cudaEventRecord");
    return work;
  }

  // Blocks the host until `work` has finished, at most timeout_s seconds (<= 0: no limit).
  // On a timeout or an NCCL asynchronous error the communicator is aborted and this raises.
  void wait_host(const NcclRingWork& work, double timeout_s) {
    raise_if_failed();
    pybind11::gil_scoped_release nogil;
    const auto start = std::chrono::steady_clock::now();
    int sleep_us = 20;
    while (!work.query()) {
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress) {
        fail(work.what() + ": NCCL reported an asynchronous error: " + nccl_error(async));
      }
      const double waited =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (timeout_s > 0 && waited > timeout_s) {
        std::ostringstream s;
        s << work.what() << " did not complete within " << timeout_s
          << " s: a peer rank probably failed (see its own error) or runs different code; the "
             "NCCL communicator was aborted";
        fail(s.str());
      }
      std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
      sleep_us = std::min(sleep_us * 2, 2000);
    }
  }

  void abort(const std::string& why) {
    std::lock_guard<std::mutex> lock(mu_);
    if (failed_.empty()) {
      failed_ = why.empty() ? std::string("aborted by the caller") : why;
      ncclCommAbort(comm_);
      comm_ = nullptr;
    }
  }

 private:
  // Aborts the communicator and raises (always throws).
  void fail(const std::string& why) {
    abort(why);
    TORCH_CHECK(false, "longctx ring (NCCL, rank ", rank_, "): ", why);
  }

  void raise_if_failed() const {
    TORCH_CHECK(failed_.empty(), "longctx ring (NCCL, rank ", rank_, "): this communicator was "
                "aborted earlier: ", failed_);
  }

  void check_tensor(const at::Tensor& t, const char* name, size_t i) const {
    TORCH_CHECK(t.is_cuda() && t.get_device() == device_, "longctx ring: ", name, "[", i,
                "] must be on cuda:", device_, " (the communicator's device), got ", t.device());
    TORCH_CHECK(t.is_contiguous(), "longctx ring: ", name, "[", i, "] must be contiguous");
  }

  int rank_, world_, device_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  std::mutex mu_;
  std::string failed_;
};

}  // namespace

void register_nccl_ring(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("nccl_unique_id", [] { return py::bytes(unique_id()); },
        "A fresh ncclUniqueId as bytes (rank 0 makes it, the group broadcasts it).");
  m.def("nccl_version", [] {
    int v = 0;
    ncclGetVersion(&v);
    return v;
  }, "The NCCL version this process runs (e.g. 23007 for 2.30.7).");
  py::class_<NcclRingWork, std::shared_ptr<NcclRingWork>>(m, "NcclRingWork")
      .def("wait", &NcclRingWork::wait, "The current stream waits for the exchange (no host sync).")
      .def("query", &NcclRingWork::query, "True once the exchange has finished on the GPU.");
  py::class_<NcclRing, std::shared_ptr<NcclRing>>(m, "NcclRing")
      .def(py::init([](py::bytes id, int rank, int world, int device) {
             return std::make_shared<NcclRing>(std::string(id), rank, world, device);
           }), py::arg("unique_id"), py::arg("rank"), py::arg("world_size"), py::arg("device"))
      .def_property_readonly("rank", &NcclRing::rank)
      .def_property_readonly("world_size", &NcclRing::world_size)
      .def_property_readonly("device", &NcclRing::device)
      .def_property_readonly("failed", &NcclRing::failed)
      .def("send_recv", &NcclRing::send_recv, py::arg("send"), py::arg("recv"), py::arg("what"),
           "Post one grouped exchange (send[i] -> rank+1, recv[i] <- rank-1) on the comm stream.")
      .def("wait_host", &NcclRing::wait_host, py::arg("work"), py::arg("timeout_s"),
           "Block until `work` is done; on timeout abort the communicator and raise.")
      .def("abort", &NcclRing::abort, py::arg("why") = "");
}

}  // namespace comm
}  // namespace longctx
