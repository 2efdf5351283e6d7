/* cblas_sgemm/dgemm/cgemm (the BLAS calls of MLX's CPU matmul) forwarded to the OpenBLAS of the PyPI package
 * scipy-openblas32, whose symbols carry a scipy_ prefix. mmt_mlx/blas.py loads that library and then this one
 * with RTLD_GLOBAL before mlx.core, so MLX's matmul binds to OpenBLAS instead of its bundled reference BLAS.
 * The scipy_ symbols are left undefined here and resolve against the already loaded library. */
typedef int blas_int; /* scipy-openblas32: 32-bit integers; CBLAS enums are ints */

void scipy_cblas_sgemm(int, int, int, blas_int, blas_int, blas_int, float, const float*, blas_int, const float*,
                       blas_int, float, float*, blas_int);
void scipy_cblas_dgemm(int, int, int, blas_int, blas_int, blas_int, double, const double*, blas_int,
                       const double*, blas_int, double, double*, blas_int);
void scipy_cblas_cgemm(int, int, int, blas_int, blas_int, blas_int, const void*, const void*, blas_int,
                       const void*, blas_int, const void*, void*, blas_int);

__attribute__((visibility("default"))) void cblas_sgemm(int order, int ta, int tb, blas_int m, blas_int n,
                                                        blas_int k, float alpha, const float* a, blas_int lda,
                                                        const float* b, blas_int ldb, float beta, float* c,
                                                        blas_int ldc) {
  scipy_cblas_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

__attribute__((visibility("default"))) void cblas_dgemm(int order, int ta, int tb, blas_int m, blas_int n,
                                                        blas_int k, double alpha, const double* a, blas_int lda,
                                                        const double* b, blas_int ldb, double beta, double* c,
                                                        blas_int ldc) {
  scipy_cblas_dgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

__attribute__((visibility("default"))) void cblas_cgemm(int order, int ta, int tb, blas_int m, blas_int n,
                                                        blas_int k, const void* alpha, const void* a,
                                                        blas_int lda, const void* b, blas_int ldb,
                                                        const void* beta, void* c, blas_int ldc) {
  scipy_cblas_cgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
