/* emb_*, tts_*, asr_* and img_*: text to speech, the speech back to text, an embedding and
 * an image, each through the router like the HTTP endpoints. */
#include <stdlib.h>
#include <string.h>

#include "spear.h"

static char audio[1 << 20];
static char body[1 << 20];

#define SET(X, fd, key, json)                                                      \
  do {                                                                             \
    char arg_[256];                                                                \
    uint32_t n_ = (uint32_t)snprintf(arg_, sizeof arg_, "{\"key\":\"%s\",\"value\":%s}", key, json); \
    int32_t rc_ = X##_ctl(fd, ONESHOT_CTL_SET_PARAM, arg_, &n_);                   \
    if (rc_ < 0) { spear_printf("set %s failed: %d\n", key, rc_); exit(1); }       \
  } while (0)

#define RUN(X, fd, out, cap, got)                                                  \
  do {                                                                             \
    int32_t resp_ = X##_send(fd, 0);                                               \
    if (resp_ < 0) { spear_printf(#X "_send failed: %d\n", resp_); exit(1); }      \
    uint32_t len_ = cap;                                                           \
    got = X##_recv(resp_, out, &len_);                                             \
    char status_[256];                                                             \
    uint32_t slen_ = sizeof status_ - 1;                                           \
    int32_t s_ = X##_ctl(resp_, ONESHOT_CTL_GET_STATUS, status_, &slen_);          \
    status_[s_ > 0 ? s_ : 0] = 0;                                                  \
    spear_printf(#X "_status=%s\n", status_);                                      \
    X##_close(resp_);                                                              \
    X##_close(fd);                                                                 \
  } while (0)

int main(void) {
  int32_t got;
  const char *words = "open the window";
  int32_t tts = tts_create();
  tts_write(tts, words, (int32_t)strlen(words));
  SET(tts, tts, "model", "\"tts-1\"");
  SET(tts, tts, "voice", "\"alloy\"");
  SET(tts, tts, "response_format", "\"wav\"");
  RUN(tts, tts, audio, sizeof audio, got);
  int32_t audio_len = got;
  spear_printf("tts_bytes=%d\n", audio_len);

  int32_t asr = asr_create();
  asr_write(asr, audio, audio_len);
  SET(asr, asr, "model", "\"whisper-1\"");
  SET(asr, asr, "response_format", "\"json\"");
  RUN(asr, asr, body, sizeof body - 1, got);
  body[got > 0 ? got : 0] = 0;
  spear_printf("asr_json=%s\n", body);

  int32_t emb = emb_create();
  emb_write(emb, words, (int32_t)strlen(words));
  SET(emb, emb, "model", "\"text-embedding-3-small\"");
  SET(emb, emb, "dimensions", "4");
  RUN(emb, emb, body, sizeof body - 1, got);
  body[got > 0 ? got : 0] = 0;
  spear_printf("emb_json=%s\n", body);

  int32_t img = img_create();
  img_write(img, "a red door", 10);
  SET(img, img, "size", "\"256x256\"");
  RUN(img, img, body, sizeof body - 1, got);
  spear_printf("img_bytes=%d\n", got);
  return 0;
}
