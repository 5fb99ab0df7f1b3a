"""`rt_*` hostcalls for WASM tasks: an fd table and epoll in pure Python, and a wasmtime binding.

Layers, imports pointing down:

* `abi`      errno values, ctl commands, epoll flags and bounds-checked guest memory;
* `params`   what `SET_PARAM` accepts (a guest may only narrow host policy);
* `rtfd`     one fd: its queues bounded in bytes, its state and readiness;
* `fdtable`  the ``rt_*`` calls over a table of fds (thread-safe, never blocking);
* `epoll`    ``spear_epoll_*``: level-triggered waits on several fds, injectable clock;
* `link`     the loop side: each connected fd is a `ClientLink` of the session manager;
* `wasm`     wasmtime imports of module ``"spear"``, fuel, epochs, memory limits;
* `guest`    a guest's worker thread next to its session host, stopped with its block;
* `cli`      ``spear-rt run-wasm MODULE [--audio FILE]``.

Only `wasm`, `guest` and `cli` need wasmtime (the ``wasm`` extra); `cli` imports it lazily.
"""
