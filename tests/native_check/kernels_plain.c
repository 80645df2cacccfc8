/* The same kernels, plain C only (CF_PLAIN), under other names: the reference the
 * variant under test must match. */
#define CF_PLAIN 1
#define cf_has_avx2 plain_cf_has_avx2
#define cf_isa plain_cf_isa
#define cf_linear plain_cf_linear
#define cf_qlinear plain_cf_qlinear
#define cf_dequantize plain_cf_dequantize
#define cf_norm plain_cf_norm
#define cf_forward plain_cf_forward
#include "qlinear.c"
#include "decode.c"
