"""Keeping transactional workers deciding: progress, heartbeat, watchdog, restarts.

librdkafka's transactional calls can block past their timeout after a broker restart
(librdkafka#5456, #5511). A blocked C call cannot be interrupted from Python, so the
bound is kept one level up: the worker names each step it takes (``progress``), a
watchdog thread ends the process when a step outlasts its bound (``watchdog``), and a
parent process starts a fresh one (``supervisor``). Errors that do return (a fenced
producer, a broker that is away) start a fresh worker in the same process
(``resilient``). Whether a service can work now, the broker and the outbox answering,
is its readiness (``readiness``), served beside its metrics as ``/readyz`` (``probes``).
"""
