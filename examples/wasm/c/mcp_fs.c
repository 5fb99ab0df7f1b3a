/* Upstream's mcp_fs sample: a chat that may use the host's MCP filesystem tools. */
#include <stdlib.h>
#include <string.h>

#include "spear.h"

static char response[65536];

static void must_set(int32_t fd, const char *key, const char *json_value) {
  int32_t rc = cchat_set(fd, key, json_value);
  if (rc != 0) { spear_printf("set %s failed: %d\n", key, rc); exit(1); }
}

int main(void) {
  int32_t fd = cchat_create();
  if (fd < 0) { spear_printf("cchat_create failed: %d\n", fd); exit(1); }
  must_set(fd, "model", "\"gpt-4o-mini\"");
  must_set(fd, "timeout_ms", "30000");
  must_set(fd, "max_iterations", "6");
  must_set(fd, "max_total_tool_calls", "6");
  must_set(fd, "mcp.enabled", "true");
  must_set(fd, "mcp.server_ids", "[\"fs\"]");
  must_set(fd, "mcp.tool_allowlist", "[\"read_*\",\"list_*\"]");
  const char *prompt = "Read Cargo.toml with the filesystem tools, give its first 5 lines, "
                       "then say MCP_OK.";
  cchat_write_msg(fd, "user", 4, prompt, (int32_t)strlen(prompt));
  int32_t resp = cchat_send(fd, CCHAT_SEND_AUTO_TOOL_CALL);
  if (resp < 0) { spear_printf("cchat_send failed: %d\n", resp); exit(1); }
  uint32_t len = sizeof response - 1;
  int32_t n = cchat_recv(resp, response, &len);
  if (n < 0) { spear_printf("cchat_recv failed\n"); exit(1); }
  response[n] = 0;
  spear_printf("response_bytes=%d\n", n);
  spear_printf("response_json=%s\n", response);
  cchat_close(resp);
  cchat_close(fd);
  return 0;
}
