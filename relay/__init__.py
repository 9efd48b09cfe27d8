"""The capabilities around the relay in `service.py`, one module each.

The layout is the architecture, lowest first: `config` and `errors`; the upstream side
(`placement`, `upstream`, `events`); what is written to clients (`transcript`, `framing`);
`observability`; `tracing` (OpenTelemetry, when OTEL_* turn it on); `fallback` (the next upstream
when one fails before the answer starts, and the breakers); each client key's `limits`;
`admission` (MAX_STREAMS, the start queue and load shedding); request `checks`; the `replay` store
and resumable `answers`; the `demo` model; the `runtime` that holds it all for one app, the
`handling` every route shares and the `response` that relays one stream; and the `serving` layer
under the app. Nothing here reads the environment, starts anything or exits when imported.
"""
