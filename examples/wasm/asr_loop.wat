;; ASR loop: one rt fd, manual turns, epoll-driven event loop.
;;
;; 1. rt_create; SET_PARAM turn_detection null (manual commit); CONNECT.
;; 2. Audio: from the host source (spear_host.audio_read, `run-wasm --audio FILE`) when there
;;    is one, else 1 s of its own: pcm16 24 kHz noise from an LCG (x = x*1664525 + 1013904223,
;;    seed 12345, sample = x >> 16), written in 100 ms chunks. A write refused with -EAGAIN
;;    waits for EPOLLOUT (draining events meanwhile) and is retried.
;; 3. COMMIT, then wait with spear_epoll_wait and drain with rt_read until -EAGAIN, until the
;;    `...input_audio_transcription.completed` event (or end of file) has been read.
;;
;; Exported globals, for tests: events_read, completed (1 once the transcript came).
;;
;; Memory: 0 len slot | 16 epoll records (8) | 1024 strings | 4096 event buffer (64 KiB)
;;         | 69632 audio.
(module
  (import "spear" "rt_create" (func $rt_create (result i32)))
  (import "spear" "rt_ctl" (func $rt_ctl (param i32 i32 i32 i32) (result i32)))
  (import "spear" "rt_write" (func $rt_write (param i32 i32 i32) (result i32)))
  (import "spear" "rt_read" (func $rt_read (param i32 i32 i32) (result i32)))
  (import "spear" "rt_close" (func $rt_close (param i32) (result i32)))
  (import "spear" "spear_epoll_create" (func $epoll_create (result i32)))
  (import "spear" "spear_epoll_ctl" (func $epoll_ctl (param i32 i32 i32 i32) (result i32)))
  (import "spear" "spear_epoll_wait" (func $epoll_wait (param i32 i32 i32 i32) (result i32)))
  (import "spear" "spear_epoll_close" (func $epoll_close (param i32) (result i32)))
  (import "spear_host" "audio_read" (func $audio_read (param i32 i32) (result i32)))

  (memory (export "memory") 4)

  (global $fd (mut i32) (i32.const 0))
  (global $ep (mut i32) (i32.const 0))
  (global $done (mut i32) (i32.const 0))
  (global $events_read (export "events_read") (mut i32) (i32.const 0))
  (global $completed (export "completed") (mut i32) (i32.const 0))

  (data (i32.const 1024) "{\"key\":\"turn_detection\",\"value\":null}")                   ;; 37
  (data (i32.const 1100) "\"type\":\"conversation.item.input_audio_transcription.completed\"") ;; 62

  ;; 1 when needle[0..nl) occurs in hay[0..hl)
  (func $contains (param $h i32) (param $hl i32) (param $n i32) (param $nl i32) (result i32)
    (local $i i32) (local $j i32)
    (if (i32.lt_u (local.get $hl) (local.get $nl)) (then (return (i32.const 0))))
    (block $none
      (loop $at
        (br_if $none (i32.gt_u (local.get $i) (i32.sub (local.get $hl) (local.get $nl))))
        (local.set $j (i32.const 0))
        (block $differ
          (loop $cmp
            (if (i32.eq (local.get $j) (local.get $nl)) (then (return (i32.const 1))))
            (br_if $differ
              (i32.ne
                (i32.load8_u (i32.add (local.get $h) (i32.add (local.get $i) (local.get $j))))
                (i32.load8_u (i32.add (local.get $n) (local.get $j)))))
            (local.set $j (i32.add (local.get $j) (i32.const 1)))
            (br $cmp)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $at)))
    (i32.const 0))

  ;; n pcm16 samples of LCG noise at p
  (func $gen_audio (param $p i32) (param $n i32) (param $x i32)
    (local $i i32)
    (loop $next
      (local.set $x (i32.add (i32.mul (local.get $x) (i32.const 1664525)) (i32.const 1013904223)))
      (i32.store16 (i32.add (local.get $p) (i32.shl (local.get $i) (i32.const 1)))
                   (i32.shr_u (local.get $x) (i32.const 16)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $next (i32.lt_u (local.get $i) (local.get $n)))))

  ;; read events until -EAGAIN; sets $done on `completed` or end of file
  (func $drain (param $fd i32)
    (local $n i32)
    (block $empty
      (loop $next
        (i32.store (i32.const 0) (i32.const 65536))
        (local.set $n (call $rt_read (local.get $fd) (i32.const 4096) (i32.const 0)))
        (if (i32.le_s (local.get $n) (i32.const 0))
          (then
            ;; 0: end of file; -EAGAIN (-11): drained; anything else: give up on the fd
            (if (i32.ne (local.get $n) (i32.const -11)) (then (global.set $done (i32.const 1))))
            (br $empty)))
        (global.set $events_read (i32.add (global.get $events_read) (i32.const 1)))
        (if (call $contains (i32.const 4096) (local.get $n) (i32.const 1100) (i32.const 62))
          (then
            (global.set $completed (i32.const 1))
            (global.set $done (i32.const 1))))
        (br $next))))

  ;; one epoll wait, then drain; an error from the wait ends the loop
  (func $wait (param $timeout i32)
    (local $n i32)
    (i32.store (i32.const 0) (i32.const 64))
    (local.set $n (call $epoll_wait (global.get $ep) (i32.const 16) (i32.const 0) (local.get $timeout)))
    (if (i32.lt_s (local.get $n) (i32.const 0)) (then (global.set $done (i32.const 1)) (return)))
    (call $drain (global.get $fd)))

  ;; rt_write all of [p, p+len); on -EAGAIN wait for EPOLLOUT and retry
  (func $write_all (param $p i32) (param $len i32)
    (local $r i32)
    (loop $retry
      (local.set $r (call $rt_write (global.get $fd) (local.get $p) (local.get $len)))
      (if (i32.and (i32.eq (local.get $r) (i32.const -11)) (i32.eqz (global.get $done)))
        (then
          (drop (call $epoll_ctl (global.get $ep) (i32.const 2) (global.get $fd) (i32.const 5)))
          (call $wait (i32.const -1))
          (drop (call $epoll_ctl (global.get $ep) (i32.const 2) (global.get $fd) (i32.const 1)))
          (br $retry)))))

  (func (export "_start")
    (local $n i32) (local $off i32)
    (global.set $fd (call $rt_create))
    (i32.store (i32.const 0) (i32.const 37))
    (drop (call $rt_ctl (global.get $fd) (i32.const 1) (i32.const 1024) (i32.const 0)))  ;; SET_PARAM
    (drop (call $rt_ctl (global.get $fd) (i32.const 2) (i32.const 0) (i32.const 0)))     ;; CONNECT
    (global.set $ep (call $epoll_create))
    (drop (call $epoll_ctl (global.get $ep) (i32.const 1) (global.get $fd) (i32.const 1))) ;; ADD IN

    (i32.store (i32.const 0) (i32.const 9600))
    (local.set $n (call $audio_read (i32.const 69632) (i32.const 0)))
    (if (i32.eq (local.get $n) (i32.const -2))
      (then  ;; no host audio: 1 s of our own, 10 writes of 100 ms
        (call $gen_audio (i32.const 69632) (i32.const 24000) (i32.const 12345))
        (loop $chunk
          (call $write_all (i32.add (i32.const 69632) (local.get $off)) (i32.const 4800))
          (local.set $off (i32.add (local.get $off) (i32.const 4800)))
          (br_if $chunk (i32.lt_u (local.get $off) (i32.const 48000)))))
      (else
        (block $eof
          (loop $chunk
            (br_if $eof (i32.le_s (local.get $n) (i32.const 0)))
            (call $write_all (i32.const 69632) (local.get $n))
            (i32.store (i32.const 0) (i32.const 9600))
            (local.set $n (call $audio_read (i32.const 69632) (i32.const 0)))
            (br $chunk)))))

    (drop (call $rt_ctl (global.get $fd) (i32.const 5) (i32.const 0) (i32.const 0)))     ;; COMMIT
    (block $finished
      (loop $events
        (br_if $finished (global.get $done))
        (call $wait (i32.const -1))
        (br $events)))
    (drop (call $epoll_close (global.get $ep)))
    (drop (call $rt_close (global.get $fd)))))
