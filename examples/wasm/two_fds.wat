;; Two sessions at once from one single-threaded guest: one epoll instance watches both fds.
;;
;; fd A: 1.0 s of LCG noise (seed 12345, as in asr_loop.wat); fd B: 1.4 s (seed 777). Both
;; are set to manual commit and connected; their 100 ms chunks are written interleaved
;; (A, B, A, B, ... then B alone), each fd is committed, and then one loop waits on both:
;; every record names a ready fd, which is drained with rt_read until -EAGAIN. The guest stops
;; once both fds have delivered their `completed` transcript (or hung up).
;;
;; Exported globals, for tests: completed_a, completed_b, events_read.
;;
;; Memory: 0 len slot | 16 epoll records (8) | 1024 strings | 4096 event buffer (64 KiB)
;;         | 69632 audio A (48000 B) | 131072 audio B (67200 B).
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

  (memory (export "memory") 4)

  (global $a (mut i32) (i32.const 0))
  (global $b (mut i32) (i32.const 0))
  (global $ep (mut i32) (i32.const 0))
  (global $done_a (mut i32) (i32.const 0))
  (global $done_b (mut i32) (i32.const 0))
  (global $completed_a (export "completed_a") (mut i32) (i32.const 0))
  (global $completed_b (export "completed_b") (mut i32) (i32.const 0))
  (global $events_read (export "events_read") (mut i32) (i32.const 0))

  (data (i32.const 1024) "{\"key\":\"turn_detection\",\"value\":null}")                   ;; 37
  (data (i32.const 1100) "\"type\":\"conversation.item.input_audio_transcription.completed\"") ;; 62

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

  (func $gen_audio (param $p i32) (param $n i32) (param $x i32)
    (local $i i32)
    (loop $next
      (local.set $x (i32.add (i32.mul (local.get $x) (i32.const 1664525)) (i32.const 1013904223)))
      (i32.store16 (i32.add (local.get $p) (i32.shl (local.get $i) (i32.const 1)))
                   (i32.shr_u (local.get $x) (i32.const 16)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $next (i32.lt_u (local.get $i) (local.get $n)))))

  ;; the fd is finished: remember which, and whether its transcript came
  (func $finish (param $fd i32) (param $completed i32)
    (if (i32.eq (local.get $fd) (global.get $a))
      (then
        (global.set $done_a (i32.const 1))
        (if (local.get $completed) (then (global.set $completed_a (i32.const 1)))))
      (else
        (global.set $done_b (i32.const 1))
        (if (local.get $completed) (then (global.set $completed_b (i32.const 1)))))))

  (func $drain (param $fd i32)
    (local $n i32)
    (block $empty
      (loop $next
        (i32.store (i32.const 0) (i32.const 65536))
        (local.set $n (call $rt_read (local.get $fd) (i32.const 4096) (i32.const 0)))
        (if (i32.le_s (local.get $n) (i32.const 0))
          (then
            (if (i32.ne (local.get $n) (i32.const -11)) (then (call $finish (local.get $fd) (i32.const 0))))
            (br $empty)))
        (global.set $events_read (i32.add (global.get $events_read) (i32.const 1)))
        (if (call $contains (i32.const 4096) (local.get $n) (i32.const 1100) (i32.const 62))
          (then (call $finish (local.get $fd) (i32.const 1))))
        (br $next))))

  ;; one wait on both fds; drain every fd a record names
  (func $wait (param $timeout i32)
    (local $n i32) (local $i i32)
    (i32.store (i32.const 0) (i32.const 64))
    (local.set $n (call $epoll_wait (global.get $ep) (i32.const 16) (i32.const 0) (local.get $timeout)))
    (if (i32.lt_s (local.get $n) (i32.const 0))
      (then
        (call $finish (global.get $a) (i32.const 0))
        (call $finish (global.get $b) (i32.const 0))
        (return)))
    (block $end
      (loop $record
        (br_if $end (i32.ge_s (local.get $i) (local.get $n)))
        (call $drain (i32.load (i32.add (i32.const 16) (i32.shl (local.get $i) (i32.const 3)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $record))))

  (func $write_all (param $fd i32) (param $p i32) (param $len i32)
    (local $r i32)
    (loop $retry
      (local.set $r (call $rt_write (local.get $fd) (local.get $p) (local.get $len)))
      (if (i32.eq (local.get $r) (i32.const -11))
        (then
          (drop (call $epoll_ctl (global.get $ep) (i32.const 2) (local.get $fd) (i32.const 5)))
          (call $wait (i32.const -1))
          (drop (call $epoll_ctl (global.get $ep) (i32.const 2) (local.get $fd) (i32.const 1)))
          (br $retry)))))

  (func $open (result i32)
    (local $fd i32)
    (local.set $fd (call $rt_create))
    (i32.store (i32.const 0) (i32.const 37))
    (drop (call $rt_ctl (local.get $fd) (i32.const 1) (i32.const 1024) (i32.const 0)))  ;; SET_PARAM
    (drop (call $rt_ctl (local.get $fd) (i32.const 2) (i32.const 0) (i32.const 0)))     ;; CONNECT
    (drop (call $epoll_ctl (global.get $ep) (i32.const 1) (local.get $fd) (i32.const 1))) ;; ADD IN
    (local.get $fd))

  (func (export "_start")
    (local $off i32)
    (global.set $ep (call $epoll_create))
    (global.set $a (call $open))
    (global.set $b (call $open))
    (call $gen_audio (i32.const 69632) (i32.const 24000) (i32.const 12345))
    (call $gen_audio (i32.const 131072) (i32.const 33600) (i32.const 777))
    (loop $chunk
      (if (i32.lt_u (local.get $off) (i32.const 48000))
        (then (call $write_all (global.get $a) (i32.add (i32.const 69632) (local.get $off)) (i32.const 4800))))
      (call $write_all (global.get $b) (i32.add (i32.const 131072) (local.get $off)) (i32.const 4800))
      (local.set $off (i32.add (local.get $off) (i32.const 4800)))
      (br_if $chunk (i32.lt_u (local.get $off) (i32.const 67200))))
    (drop (call $rt_ctl (global.get $a) (i32.const 5) (i32.const 0) (i32.const 0)))     ;; COMMIT A
    (drop (call $rt_ctl (global.get $b) (i32.const 5) (i32.const 0) (i32.const 0)))     ;; COMMIT B
    (block $finished
      (loop $events
        (br_if $finished (i32.and (global.get $done_a) (global.get $done_b)))
        (call $wait (i32.const -1))
        (br $events)))
    (drop (call $epoll_close (global.get $ep)))
    (drop (call $rt_close (global.get $a)))
    (drop (call $rt_close (global.get $b)))))
