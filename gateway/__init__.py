"""The hems gateway daemon: clock, store, telemetry, forecast, optimize, market agent, envelope, control."""
