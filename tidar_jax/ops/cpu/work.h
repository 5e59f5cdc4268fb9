// Splitting one FFI call's work over XLA's intra-op thread pool.
#ifndef TIDAR_JAX_OPS_CPU_WORK_H_
#define TIDAR_JAX_OPS_CPU_WORK_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace tidar {

// Runs item(i) for i in [0, total). Items are claimed from a shared counter by the calling thread and by helpers it
// schedules on the pool; the caller waits only for items already claimed (running), so a helper that never gets a
// thread (the pool busy with other work) cannot block it. `item` must stay valid until this returns.
template <typename Item>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t total, const Item& item) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto drain = [total, &item](Progress& p) {
    for (int64_t i; (i = p.next.fetch_add(1)) < total;) {
      item(i);
      p.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  // A helper that starts after every item was claimed touches only `progress`, which it co-owns: `item` is used
  // only for a claimed item, i.e. before the caller returns.
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([progress, drain] { drain(*progress); });
  drain(*progress);
  while (progress->done.load(std::memory_order_acquire) < total) {
  }
}

}  // namespace tidar

#endif  // TIDAR_JAX_OPS_CPU_WORK_H_
