// A small work-sharing pool for the kernels. The caller runs chunks itself and waits only for chunks that
// other threads have claimed, never for a thread to show up: on a loaded machine (or one shared with a BLAS
// thread pool) a descheduled worker costs nothing, where an OpenMP barrier would stall every region for a
// scheduler time slice.
#pragma once

#include <functional>

namespace mmt {

// Runs fn(0) .. fn(nchunks - 1), each exactly once, on up to nthreads threads (the caller included).
void parallel_for(int nchunks, int nthreads, const std::function<void(int)>& fn);

}  // namespace mmt
