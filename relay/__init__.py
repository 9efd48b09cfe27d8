"""The capabilities around the relay in `service.py`, one module each.

The layout is the architecture, lowest first: `config` and `errors`; the upstream side
(`placement`, `upstream`, `events`); what is written to clients (`transcript`, `framing`);
`observability`; `admission` (limits and load shedding); request `checks`; the `replay` store and
resumable `answers`; the `demo` model; the `runtime` that holds it all for one app and the
`response` that relays one stream; and the `serving` layer under the app. Nothing here reads the
environment, starts anything or exits when imported.
"""
