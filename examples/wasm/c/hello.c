/* Upstream's hello sample: logs a greeting and the wall-clock time. */
#include "spear.h"

int main(void) {
  spear_printf("hello spear wasm\n");
  spear_printf("time_now_ms: %lld\n", (long long)time_now_ms());
  return 0;
}
