"""Policy serving: an openpi-compatible websocket server with dynamic batching, and its clients.

    pirl serve checkpoint=DIR [port=8000 host=127.0.0.1 max_batch=16 ...]    (configs/serve.yaml)
    pirl eval policy=ws://host:port episodes=50                              (remote evaluation)

Modules: protocol (msgpack + numpy, openpi's encoding), inputs (request layouts and validation), policy
(checkpoint -> one batched action function; the guidance hook), server (websocket server, batching,
shutdown), client (openpi-compatible client; `RemoteActor` for `pirl eval`), broker (one action per
control step from the chunks, the next chunk optionally prefetched). See docs/serve.md.
"""
