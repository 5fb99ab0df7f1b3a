/* spear.h: the host functions spear_rt gives WASM guests (module "spear").
 *
 * The same ABI as upstream SPEAR's SDK for the families spear_rt implements: log,
 * time_now_ms, cchat_* (chat with tool callbacks), and our rt_* realtime fds with epoll.
 * Every call returns an int32: a count or fd on success, -errno on failure (Linux numbers).
 * Output buffers take (out_ptr, out_len_ptr): *out_len_ptr holds the capacity on entry and
 * the written (or required) length on return; too small -> -ENOSPC with the length needed.
 * Imports spear_rt does not provide answer -ENOSYS (38).
 *
 * Build: clang --target=wasm32-wasi -O2 -Wl,--export-table guest.c -o guest.wasm
 */
#ifndef SPEAR_H
#define SPEAR_H

#include <stdint.h>
#include <stdio.h>

#define SPEAR_IMPORT(name) __attribute__((import_module("spear"), import_name(#name)))

/* log(level, text, len): 0 trace, 1 debug, 2 info, 3 warn, 4 error; len <= 16384. */
SPEAR_IMPORT(log) int32_t sp_log(int32_t level, const char *text, int32_t len);
/* Wall-clock Unix time in ms. */
SPEAR_IMPORT(time_now_ms) int64_t time_now_ms(void);
SPEAR_IMPORT(sleep_ms) int32_t sleep_ms(int32_t ms);

/* Chat: a session fd collects messages, tools and parameters; send returns a response fd. */
#define CCHAT_CTL_SET_PARAM 1   /* arg: {"key":K,"value":V} */
#define CCHAT_CTL_GET_METRICS 2 /* response fd: usage JSON into (arg_ptr, arg_len_ptr) */
#define CCHAT_SEND_METRICS 1
#define CCHAT_SEND_AUTO_TOOL_CALL 2 /* the host runs the tool loop through the callbacks */
/* spear_rt's extension: the response fd streams the answer's text (recv: what arrived since
 * the last read; -EAGAIN until more; 0 at the end; EPOLLIN/EPOLLHUP as it goes). */
#define CCHAT_SEND_STREAM 4

SPEAR_IMPORT(cchat_create) int32_t cchat_create(void);
SPEAR_IMPORT(cchat_write_msg)
int32_t cchat_write_msg(int32_t fd, const char *role, int32_t role_len, const char *content,
                        int32_t content_len);
/* A tool: its schema (OpenAI shape), its callback = a function pointer (table index):
 * int32_t fn(const char *args, int32_t args_len, char *out, uint32_t *out_len). */
SPEAR_IMPORT(cchat_write_fn)
int32_t cchat_write_fn(int32_t fd, int32_t fn_offset, const char *json, int32_t json_len);
SPEAR_IMPORT(cchat_ctl)
int32_t cchat_ctl(int32_t fd, int32_t cmd, void *arg, uint32_t *arg_len);
SPEAR_IMPORT(cchat_send) int32_t cchat_send(int32_t fd, int32_t flags);
SPEAR_IMPORT(cchat_recv) int32_t cchat_recv(int32_t fd, char *out, uint32_t *out_len);
SPEAR_IMPORT(cchat_close) int32_t cchat_close(int32_t fd);

/* spear_rt's realtime fds (rt_*): a transcription session per fd. */
#define RT_CTL_SET_PARAM 1
#define RT_CTL_CONNECT 2
#define RT_CTL_GET_STATUS 3
#define RT_CTL_SEND_EVENT 4
#define RT_CTL_COMMIT 5
#define RT_CTL_CLEAR 6
#define RT_CTL_SHUTDOWN_WRITE 7
#define RT_CTL_GET_METRICS 8
SPEAR_IMPORT(rt_create) int32_t rt_create(void);
SPEAR_IMPORT(rt_ctl) int32_t rt_ctl(int32_t fd, int32_t cmd, void *arg, uint32_t *arg_len);
SPEAR_IMPORT(rt_write) int32_t rt_write(int32_t fd, const void *buf, int32_t len);
SPEAR_IMPORT(rt_read) int32_t rt_read(int32_t fd, void *out, uint32_t *out_len);
SPEAR_IMPORT(rt_close) int32_t rt_close(int32_t fd);
/* The run's audio (run-wasm --audio), pcm16 24 kHz mono: bytes copied, 0 at the end. */
__attribute__((import_module("spear_host"), import_name("audio_read")))
int32_t spear_audio_read(void *out, uint32_t *out_len);

/* Realtime ASR (upstream's names for rt fds; its own ctl codes). */
#define RTASR_CTL_SET_PARAM 1
#define RTASR_CTL_CONNECT 2
#define RTASR_CTL_GET_STATUS 3
#define RTASR_CTL_SEND_EVENT 4
#define RTASR_CTL_FLUSH 5
#define RTASR_CTL_CLEAR 6
#define RTASR_CTL_SET_AUTOFLUSH 7
#define RTASR_CTL_GET_AUTOFLUSH 8
SPEAR_IMPORT(rtasr_create) int32_t rtasr_create(void);
SPEAR_IMPORT(rtasr_ctl) int32_t rtasr_ctl(int32_t fd, int32_t cmd, void *arg, uint32_t *arg_len);
SPEAR_IMPORT(rtasr_write) int32_t rtasr_write(int32_t fd, const void *buf, int32_t len);
SPEAR_IMPORT(rtasr_read) int32_t rtasr_read(int32_t fd, void *out, uint32_t *out_len);
SPEAR_IMPORT(rtasr_close) int32_t rtasr_close(int32_t fd);

/* The host's microphone: frames of pcm16 in real time. */
#define MIC_CTL_SET_PARAM 1 /* a plain JSON object: sample_rate_hz, frame_ms, source, ... */
#define MIC_CTL_GET_STATUS 2
SPEAR_IMPORT(mic_create) int32_t mic_create(void);
SPEAR_IMPORT(mic_ctl) int32_t mic_ctl(int32_t fd, int32_t cmd, void *arg, uint32_t *arg_len);
SPEAR_IMPORT(mic_read) int32_t mic_read(int32_t fd, void *out, uint32_t *out_len);
SPEAR_IMPORT(mic_close) int32_t mic_close(int32_t fd);

/* epoll over every fd: level-triggered, 8-byte records (fd, events). */
#define SPEAR_EPOLLIN 0x001
#define SPEAR_EPOLLOUT 0x004
#define SPEAR_EPOLLERR 0x008
#define SPEAR_EPOLLHUP 0x010
#define SPEAR_EPOLL_CTL_ADD 1
#define SPEAR_EPOLL_CTL_MOD 2
#define SPEAR_EPOLL_CTL_DEL 3
SPEAR_IMPORT(spear_epoll_create) int32_t spear_epoll_create(void);
SPEAR_IMPORT(spear_epoll_ctl)
int32_t spear_epoll_ctl(int32_t epfd, int32_t op, int32_t fd, int32_t events);
SPEAR_IMPORT(spear_epoll_wait)
int32_t spear_epoll_wait(int32_t epfd, void *out, uint32_t *out_len, int32_t timeout_ms);
SPEAR_IMPORT(spear_epoll_close) int32_t spear_epoll_close(int32_t epfd);

/* User streams: an outside client's WebSocket to this guest, SSF frames per stream id. */
#define USER_STREAM_IN 1
#define USER_STREAM_OUT 2
#define USER_STREAM_BIDI 3
#define USER_STREAM_CONNECTED 1 /* ctl record kinds */
#define USER_STREAM_SESSION_CLOSED 2
SPEAR_IMPORT(user_stream_ctl_open) int32_t user_stream_ctl_open(void);
SPEAR_IMPORT(user_stream_ctl_read)
int32_t user_stream_ctl_read(int32_t fd, void *out, uint32_t *out_len); /* 8 bytes: id, kind */
SPEAR_IMPORT(user_stream_open) int32_t user_stream_open(int32_t stream_id, int32_t direction);
SPEAR_IMPORT(user_stream_read) int32_t user_stream_read(int32_t fd, void *out, uint32_t *out_len);
SPEAR_IMPORT(user_stream_write) int32_t user_stream_write(int32_t fd, const void *frame, int32_t len);
SPEAR_IMPORT(user_stream_close) int32_t user_stream_close(int32_t fd);

/* One-shot families, the shape of cchat_*: X is emb (embeddings), asr (speech to text: write
 * the audio file's bytes), tts (text to speech: recv gives the audio) or img (an image). */
#define ONESHOT_CTL_SET_PARAM 1 /* {"key":K,"value":V}: model, backend, timeout_ms, fields */
#define ONESHOT_CTL_GET_STATUS 2 /* response fd: {status, content_type, backend, bytes} */
#define SPEAR_ONESHOT(X)                                                                     \
  SPEAR_IMPORT(X##_create) int32_t X##_create(void);                                         \
  SPEAR_IMPORT(X##_write) int32_t X##_write(int32_t fd, const void *buf, int32_t len);       \
  SPEAR_IMPORT(X##_ctl) int32_t X##_ctl(int32_t fd, int32_t cmd, void *arg, uint32_t *len); \
  SPEAR_IMPORT(X##_send) int32_t X##_send(int32_t fd, int32_t flags);                        \
  SPEAR_IMPORT(X##_recv) int32_t X##_recv(int32_t fd, void *out, uint32_t *out_len);         \
  SPEAR_IMPORT(X##_close) int32_t X##_close(int32_t fd);
SPEAR_ONESHOT(emb)
SPEAR_ONESHOT(asr)
SPEAR_ONESHOT(tts)
SPEAR_ONESHOT(img)

typedef int32_t (*spear_tool_fn)(const char *args, int32_t args_len, char *out,
                                 uint32_t *out_len);

/* printf/puts through log, as upstream's SDK does for wasm32 (cut at 1023 bytes). */
#define SPEAR_LOG_BUFFER 1024
#define spear_printf(...)                                                          \
  do {                                                                             \
    char spear_buf_[SPEAR_LOG_BUFFER];                                             \
    int spear_n_ = snprintf(spear_buf_, sizeof spear_buf_, __VA_ARGS__);           \
    if (spear_n_ > (int)sizeof spear_buf_ - 1) spear_n_ = sizeof spear_buf_ - 1;   \
    if (spear_n_ > 0) sp_log(2, spear_buf_, spear_n_);                             \
  } while (0)

/* rtasr_ctl SET_PARAM with a JSON value given as text. */
static inline int32_t rtasr_set(int32_t fd, const char *key, const char *json_value) {
  char arg[1024];
  int n = snprintf(arg, sizeof arg, "{\"key\":\"%s\",\"value\":%s}", key, json_value);
  if (n < 0 || n >= (int)sizeof arg) return -22;
  uint32_t len = (uint32_t)n;
  return rtasr_ctl(fd, RTASR_CTL_SET_PARAM, arg, &len);
}

/* cchat_ctl SET_PARAM with a JSON value given as text (e.g. "\"gpt-4o-mini\"" or "4"). */
static inline int32_t cchat_set(int32_t fd, const char *key, const char *json_value) {
  char arg[1024];
  int n = snprintf(arg, sizeof arg, "{\"key\":\"%s\",\"value\":%s}", key, json_value);
  if (n < 0 || n >= (int)sizeof arg) return -22;
  uint32_t len = (uint32_t)n;
  return cchat_ctl(fd, CCHAT_CTL_SET_PARAM, arg, &len);
}

#endif
