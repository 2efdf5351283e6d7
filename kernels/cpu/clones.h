// MMT_CLONES: GCC on x86 builds an AVX2 + FMA clone (x86-64-v3) of a function beside the portable one and picks
// one when the library loads. A single "avx2,fma" string is not that: GCC splits it into two clones, "avx2"
// without FMA and "fma" without AVX2, and the loader picks the AVX2 one, so every multiply-add ran as two
// instructions (attention, the gated activation and the Gaussian blur until 2026-12-04).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define MMT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MMT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MMT_CLONES
#endif
