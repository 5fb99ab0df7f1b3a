/* Upstream's chat_completion sample: one request, the response and who answered. */
#include <stdlib.h>
#include <string.h>

#include "spear.h"

static char response[65536];

static const char *backend_of(const char *json, char *out, size_t cap) {
  const char *at = strstr(json, "\"_spear\":{\"backend\":\"");
  if (at == NULL) return "unknown";
  at += strlen("\"_spear\":{\"backend\":\"");
  size_t n = 0;
  while (at[n] && at[n] != '"' && n + 1 < cap) n++;
  memcpy(out, at, n);
  out[n] = 0;
  return out;
}

int main(void) {
  int32_t fd = cchat_create();
  if (fd < 0) { spear_printf("cchat_create failed: %d\n", fd); exit(1); }
  const char *text = "Hi, what is your name?";
  int32_t rc = cchat_write_msg(fd, "user", 4, text, (int32_t)strlen(text));
  if (rc < 0) { spear_printf("cchat_write_msg failed: %d\n", rc); exit(1); }
  cchat_set(fd, "model", "\"gpt-4o-mini\"");
  spear_printf("debug_model=gpt-4o-mini\n");
  cchat_set(fd, "timeout_ms", "30000");
  int32_t resp = cchat_send(fd, 0);
  if (resp < 0) { spear_printf("cchat_send failed: %d\n", resp); exit(1); }
  uint32_t len = sizeof response - 1;
  int32_t n = cchat_recv(resp, response, &len);
  if (n < 0) { spear_printf("cchat_recv failed\n"); exit(1); }
  response[n] = 0;
  spear_printf("response_bytes=%d\n", n);
  spear_printf("response_json=%s\n", response);
  char backend[128];
  spear_printf("debug_backend=%s\n", backend_of(response, backend, sizeof backend));
  cchat_close(resp);
  cchat_close(fd);
  return 0;
}
