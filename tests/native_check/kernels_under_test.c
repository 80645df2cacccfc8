/* The kernels as the variant under test builds them (its -march / -m flags): both
 * sources in one unit, beside kernels_plain.c in kernel_check. */
#include "qlinear.c"
#include "decode.c"
