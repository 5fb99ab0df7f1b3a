/* Upstream's mic_rtasr sample: the host microphone into a realtime transcription session,
 * multiplexed with epoll; transcripts go to stdout, one line per delta or transcript. */
#include <stdlib.h>
#include <string.h>

#include "spear.h"

static char frame[8192];
static char event[65536];
static int warned = 0;

/* The string value of "key":"..." in compact JSON (no unescaping beyond \" and \\). */
static int json_string(const char *json, const char *key, char *out, size_t cap) {
  char pattern[64];
  snprintf(pattern, sizeof pattern, "\"%s\":\"", key);
  const char *at = strstr(json, pattern);
  if (at == NULL) return -1;
  at += strlen(pattern);
  size_t n = 0;
  while (*at && *at != '"' && n + 1 < cap) {
    if (*at == '\\' && at[1]) at++;
    out[n++] = *at++;
  }
  out[n] = 0;
  return 0;
}

static void on_event(const char *json) {
  static char type[256], text[32768];
  if (json[0] != '{' || json_string(json, "type", type, sizeof type)) {
    spear_printf("event_bytes=%d\n", (int)strlen(json));
    return;
  }
  if (!warned && strncmp(type, "transcription", 13) == 0) {
    warned = 1;
    spear_printf("warning: rtasr appears to be using stub transport (event %s)\n", type);
    spear_printf("hint: set transport=websocket and a websocket backend\n");
  }
  if (strstr(type, "transcription") == NULL) {
    spear_printf("event_type=%s\n", type);
    return;
  }
  if (json_string(json, "delta", text, sizeof text) == 0 ||
      json_string(json, "transcript", text, sizeof text) == 0 ||
      json_string(json, "text", text, sizeof text) == 0) {
    fwrite(text, 1, strlen(text), stdout);
    fputc('\n', stdout);
    fflush(stdout);
  } else {
    spear_printf("event_type=%s\n", type);
  }
}

int main(void) {
  int32_t ep = spear_epoll_create();
  int32_t mic = mic_create();
  int32_t asr = rtasr_create();
  if (ep < 0 || mic < 0 || asr < 0) { spear_printf("create failed\n"); exit(1); }
  int32_t mask = SPEAR_EPOLLIN | SPEAR_EPOLLERR | SPEAR_EPOLLHUP;
  spear_epoll_ctl(ep, SPEAR_EPOLL_CTL_ADD, mic, mask);
  spear_epoll_ctl(ep, SPEAR_EPOLL_CTL_ADD, asr, mask);
  const char *mic_cfg = "{\"sample_rate_hz\":24000,\"channels\":1,\"format\":\"pcm16\","
                        "\"frame_ms\":20,\"source\":\"device\",\"fallback\":{\"to_stub\":false}}";
  uint32_t len = (uint32_t)strlen(mic_cfg);
  int32_t rc = mic_ctl(mic, MIC_CTL_SET_PARAM, (void *)mic_cfg, &len);
  if (rc < 0) {
    spear_printf("mic_ctl failed: %d\n", rc);
    uint32_t cap = sizeof event - 1;
    int32_t n = mic_ctl(mic, MIC_CTL_GET_STATUS, event, &cap);
    event[n > 0 ? n : 0] = 0;
    spear_printf("mic_status: %s\n", event);
    exit(1);
  }
  rtasr_set(asr, "transport", "\"websocket\"");
  rtasr_set(asr, "backend", "\"openai-realtime-asr\"");
  rtasr_set(asr, "model", "\"gpt-4o-mini-transcribe\"");
  const char *flush = "{\"strategy\":\"server_vad\",\"vad\":{\"silence_ms\":600},\"flush_on_close\":true}";
  len = (uint32_t)strlen(flush);
  rtasr_ctl(asr, RTASR_CTL_SET_AUTOFLUSH, (void *)flush, &len);
  len = 0;
  rc = rtasr_ctl(asr, RTASR_CTL_CONNECT, NULL, &len);
  if (rc < 0) { spear_printf("rtasr connect failed: %d\n", rc); exit(1); }
  spear_printf("mic_rtasr started\n");
  int32_t records[128];
  for (;;) {
    uint32_t cap = 512;
    int32_t n = spear_epoll_wait(ep, records, &cap, 2000);
    if (n < 0) { spear_printf("ep_wait failed: %d\n", n); break; }
    for (int32_t i = 0; i < n; i++) {
      int32_t fd = records[2 * i], ev = records[2 * i + 1];
      const char *name = fd == mic ? "mic" : "rtasr";
      if (ev & SPEAR_EPOLLIN) {
        if (fd == mic) {
          uint32_t flen = sizeof frame;
          int32_t got = mic_read(mic, frame, &flen);
          if (got > 0) {
            int32_t w = rtasr_write(asr, frame, got);
            if (w < 0 && w != -11) spear_printf("rtasr_write failed: %d\n", w);
          }
        } else {
          uint32_t elen = sizeof event - 1;
          int32_t got = rtasr_read(asr, event, &elen);
          if (got > 0) { event[got] = 0; on_event(event); }
        }
        continue;  /* level-triggered: a hang-up waits until what is queued is read */
      }
      if (ev & SPEAR_EPOLLHUP) { spear_printf("%s hup\n", name); goto done; }
      if (ev & SPEAR_EPOLLERR) { spear_printf("%s err\n", name); goto done; }
    }
  }
done:
  rtasr_close(asr);
  mic_close(mic);
  spear_epoll_close(ep);
  return 0;
}
