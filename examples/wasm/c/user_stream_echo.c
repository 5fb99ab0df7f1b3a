/* Upstream's user_stream_echo sample: every frame a client sends comes back unchanged. */
#include <stdlib.h>
#include <string.h>

#include "spear.h"

#define SLOTS 16

static struct {
  int32_t id, fd, pending_len;
  char pending[262144];
} slots[SLOTS];
static char frame[262144];

static int slot_of_fd(int32_t fd) {
  for (int i = 0; i < SLOTS; i++)
    if (slots[i].fd == fd) return i;
  return -1;
}

static int slot_of_id(int32_t id) {
  for (int i = 0; i < SLOTS; i++)
    if (slots[i].fd > 0 && slots[i].id == id) return i;
  return -1;
}

static void try_pending(int s) {
  if (slots[s].pending_len == 0) return;
  int32_t rc = user_stream_write(slots[s].fd, slots[s].pending, slots[s].pending_len);
  if (rc == 0) slots[s].pending_len = 0;
  else if (rc != -11) { spear_printf("user_stream_write failed: %d\n", rc); slots[s].pending_len = 0; }
}

static void free_slot(int s, int32_t ep) {
  spear_epoll_ctl(ep, SPEAR_EPOLL_CTL_DEL, slots[s].fd, 0);
  user_stream_close(slots[s].fd);
  slots[s].fd = 0;
  slots[s].pending_len = 0;
}

int main(void) {
  int32_t ep = spear_epoll_create();
  int32_t ctl = user_stream_ctl_open();
  if (ep < 0 || ctl < 0) { spear_printf("setup failed: %d %d\n", ep, ctl); exit(1); }
  spear_epoll_ctl(ep, SPEAR_EPOLL_CTL_ADD, ctl, SPEAR_EPOLLIN | SPEAR_EPOLLERR | SPEAR_EPOLLHUP);
  spear_printf("user_stream_echo started (waiting for user streams)\n");
  int32_t records[128];
  for (;;) {
    uint32_t cap = 512;
    int32_t n = spear_epoll_wait(ep, records, &cap, 2000);
    if (n < 0) { spear_printf("ep_wait failed: %d\n", n); break; }
    if (n == 0)
      for (int s = 0; s < SLOTS; s++)
        if (slots[s].fd > 0) try_pending(s);
    for (int32_t i = 0; i < n; i++) {
      int32_t fd = records[2 * i], ev = records[2 * i + 1];
      if (fd == ctl) {
        if (ev & SPEAR_EPOLLIN) {
          uint32_t rec[2], len = sizeof rec;
          while (user_stream_ctl_read(ctl, rec, &len) == 8) {
            len = sizeof rec;
            if (rec[1] == USER_STREAM_SESSION_CLOSED) { spear_printf("session closed\n"); goto done; }
            if (rec[1] == USER_STREAM_CONNECTED && slot_of_id((int32_t)rec[0]) < 0) {
              int s = slot_of_fd(0);
              if (s < 0) continue;
              int32_t sfd = user_stream_open((int32_t)rec[0], USER_STREAM_BIDI);
              if (sfd < 0) { spear_printf("user_stream_open failed: %d\n", sfd); continue; }
              slots[s].id = (int32_t)rec[0];
              slots[s].fd = sfd;
              spear_epoll_ctl(ep, SPEAR_EPOLL_CTL_ADD, sfd,
                              SPEAR_EPOLLIN | SPEAR_EPOLLOUT | SPEAR_EPOLLERR | SPEAR_EPOLLHUP);
              spear_printf("stream connected: stream_id=%u fd=%d\n", rec[0], sfd);
            }
          }
        } else if (ev & SPEAR_EPOLLHUP) { spear_printf("ctl hup\n"); goto done; }
        else if (ev & SPEAR_EPOLLERR) { spear_printf("ctl err\n"); goto done; }
        continue;
      }
      int s = slot_of_fd(fd);
      if (s < 0) continue;
      if (ev & SPEAR_EPOLLOUT) try_pending(s);
      if ((ev & SPEAR_EPOLLIN) && slots[s].pending_len == 0) {
        uint32_t len = sizeof frame;
        int32_t got = user_stream_read(fd, frame, &len);
        if (got > 0) {
          int32_t rc = user_stream_write(fd, frame, got);
          if (rc == -11) { memcpy(slots[s].pending, frame, got); slots[s].pending_len = got; }
          else if (rc != 0) spear_printf("user_stream_write failed: %d\n", rc);
        }
      }
      if (ev & SPEAR_EPOLLHUP) { spear_printf("stream hup: stream_id=%d fd=%d\n", slots[s].id, fd); free_slot(s, ep); }
      else if (ev & SPEAR_EPOLLERR) { spear_printf("stream err: stream_id=%d fd=%d\n", slots[s].id, fd); free_slot(s, ep); }
    }
  }
done:
  spear_epoll_close(ep);
  user_stream_close(ctl);
  return 0;
}
