/* placeholder replaced below */
#include "cpu_dot.h"
void cpu__kernels_avx512(cpu__kernels *k) { (void)k; }
