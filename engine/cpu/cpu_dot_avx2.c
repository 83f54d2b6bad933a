#include "cpu_dot.h"
void cpu__kernels_avx2(cpu__kernels *k) { (void)k; }
