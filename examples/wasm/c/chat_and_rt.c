/* One epoll loop over a streaming chat answer and a realtime transcription: the chat's text
 * arrives while the guest streams its audio and reads the transcript. */
#include <stdlib.h>
#include <string.h>

#include "spear.h"

static char buf[65536];

static int32_t set_json(int32_t fd, const char *key, const char *json_value) {
  char arg[512];
  uint32_t n = (uint32_t)snprintf(arg, sizeof arg, "{\"key\":\"%s\",\"value\":%s}", key, json_value);
  return rt_ctl(fd, RT_CTL_SET_PARAM, arg, &n);
}

int main(void) {
  int32_t ep = spear_epoll_create();
  int32_t rt = rt_create();
  uint32_t zero = 0;
  if (set_json(rt, "turn_detection", "null") < 0 || rt_ctl(rt, RT_CTL_CONNECT, NULL, &zero) < 0) {
    spear_printf("rt setup failed\n");
    exit(1);
  }
  int32_t chat = cchat_create();
  const char *question = "what is the capital of France";
  cchat_write_msg(chat, "user", 4, question, (int32_t)strlen(question));
  cchat_set(chat, "model", "\"gpt-4o-mini\"");
  int32_t answer = cchat_send(chat, CCHAT_SEND_STREAM | CCHAT_SEND_METRICS);
  if (answer < 0) { spear_printf("cchat_send failed: %d\n", answer); exit(1); }
  spear_epoll_ctl(ep, SPEAR_EPOLL_CTL_ADD, answer, SPEAR_EPOLLIN | SPEAR_EPOLLERR | SPEAR_EPOLLHUP);
  spear_epoll_ctl(ep, SPEAR_EPOLL_CTL_ADD, rt,
                  SPEAR_EPOLLIN | SPEAR_EPOLLOUT | SPEAR_EPOLLERR | SPEAR_EPOLLHUP);
  int chat_done = 0, rt_done = 0, writing = 1, deltas = 0;
  int32_t records[64];
  while (!(chat_done && rt_done)) {
    uint32_t cap = sizeof records;
    int32_t n = spear_epoll_wait(ep, records, &cap, 2000);
    if (n <= 0) { spear_printf("ep_wait: %d\n", n); break; }
    for (int32_t i = 0; i < n; i++) {
      int32_t fd = records[2 * i], ev = records[2 * i + 1];
      if (fd == answer && (ev & SPEAR_EPOLLIN)) {
        uint32_t len = sizeof buf - 1;
        int32_t got = cchat_recv(answer, buf, &len);
        if (got > 0) { buf[got] = 0; deltas++; spear_printf("chat text: %s\n", buf); }
        else if (got == 0) {
          char usage[256];
          uint32_t ulen = sizeof usage - 1;
          int32_t u = cchat_ctl(answer, CCHAT_CTL_GET_METRICS, usage, &ulen);
          usage[u > 0 ? u : 0] = 0;
          spear_printf("chat done after %d reads, usage %s\n", deltas, usage);
          spear_epoll_ctl(ep, SPEAR_EPOLL_CTL_DEL, answer, 0);
          chat_done = 1;
        }
      }
      if (fd == rt && (ev & SPEAR_EPOLLOUT) && writing) {
        uint32_t len = 4800;
        int32_t got = spear_audio_read(buf, &len);
        if (got > 0) rt_write(rt, buf, got);
        else {
          rt_ctl(rt, RT_CTL_COMMIT, NULL, &zero);
          spear_epoll_ctl(ep, SPEAR_EPOLL_CTL_MOD, rt, SPEAR_EPOLLIN | SPEAR_EPOLLERR | SPEAR_EPOLLHUP);
          writing = 0;
        }
      }
      if (fd == rt && (ev & SPEAR_EPOLLIN)) {
        uint32_t len = sizeof buf - 1;
        int32_t got = rt_read(rt, buf, &len);
        if (got > 0) {
          buf[got] = 0;
          const char *done = "\"type\":\"conversation.item.input_audio_transcription.completed\"";
          if (strstr(buf, done)) { spear_printf("transcript event: %s\n", buf); rt_done = 1; }
        }
      }
      if (fd == rt && (ev & (SPEAR_EPOLLHUP | SPEAR_EPOLLERR)) && !rt_done) {
        spear_printf("rt ended early\n");
        exit(1);
      }
    }
  }
  cchat_close(answer);
  cchat_close(chat);
  rt_close(rt);
  spear_epoll_close(ep);
  return 0;
}
