/* Upstream's chat_completion_tool_sum sample: the host runs the tool loop and calls sum. */
#include <stdlib.h>
#include <string.h>

#include "spear.h"

static char arena[131072];
static char response[65536];

static int read_int(const char *args, const char *key, long *out) {
  const char *at = strstr(args, key);
  if (at == NULL) return -1;
  at = strchr(at, ':');
  if (at == NULL) return -1;
  *out = strtol(at + 1, NULL, 10);
  return 0;
}

static int32_t sum(const char *args, int32_t args_len, char *out, uint32_t *out_len) {
  (void)args_len;
  long a = 0, b = 0;
  if (read_int(args, "\"a\"", &a) || read_int(args, "\"b\"", &b)) return -22;
  spear_printf("sum invoked: a=%ld b=%ld sum=%ld cap=%u\n", a, b, a + b, *out_len);
  int n = snprintf(out, *out_len, "{\"sum\":%ld}", a + b);
  if (n < 0 || (uint32_t)n >= *out_len) { *out_len = (uint32_t)n + 1; return -28; }
  *out_len = (uint32_t)n;
  return 0;
}

int main(void) {
  int32_t fd = cchat_create();
  if (fd < 0) { spear_printf("cchat_create failed: %d\n", fd); exit(1); }
  char value[32];
  snprintf(value, sizeof value, "%u", (unsigned)(uintptr_t)arena);
  cchat_set(fd, "tool_arena_ptr", value);
  cchat_set(fd, "tool_arena_len", "131072");
  cchat_set(fd, "max_total_tool_calls", "4");
  cchat_set(fd, "max_iterations", "4");
  cchat_set(fd, "model", "\"gpt-4o-mini\"");
  const char *text = "Please call sum(a,b) for a=7 and b=35.";
  cchat_write_msg(fd, "user", 4, text, (int32_t)strlen(text));
  spear_tool_fn fn = sum;
  int32_t offset = (int32_t)(uintptr_t)fn;
  spear_printf("tool_fn_offset=%d\n", offset);
  const char *schema =
      "{\"type\":\"function\",\"function\":{\"name\":\"sum\",\"description\":\"a+b\","
      "\"parameters\":{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"},"
      "\"b\":{\"type\":\"integer\"}},\"required\":[\"a\",\"b\"]}}}";
  int32_t rc = cchat_write_fn(fd, offset, schema, (int32_t)strlen(schema));
  spear_printf("cchat_write_fn_rc=%d\n", rc);
  int32_t resp = cchat_send(fd, CCHAT_SEND_AUTO_TOOL_CALL | CCHAT_SEND_METRICS);
  if (resp < 0) { spear_printf("cchat_send failed: %d\n", resp); exit(1); }
  uint32_t len = sizeof response - 1;
  int32_t n = cchat_recv(resp, response, &len);
  if (n < 0) { spear_printf("cchat_recv failed\n"); exit(1); }
  response[n] = 0;
  spear_printf("chat response (%d bytes):\n%s\n", n, response);
  char usage[256];
  uint32_t usage_len = sizeof usage - 1;
  int32_t m = cchat_ctl(resp, CCHAT_CTL_GET_METRICS, usage, &usage_len);
  if (m >= 0) { usage[m] = 0; spear_printf("usage=%s\n", usage); }
  cchat_close(resp);
  cchat_close(fd);
  return 0;
}
