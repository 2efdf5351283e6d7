// The one BLAS routine the native kernels call. Resolved at load time like libmlx's own reference to it: first
// in the global scope (the scipy-openblas32 shim that mmt_mlx/blas.py loads with RTLD_GLOBAL before mlx.core),
// else in the BLAS bundled with libmlx.
#pragma once

extern "C" void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);

namespace mmt {
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;  // CBLAS enum values
}  // namespace mmt
