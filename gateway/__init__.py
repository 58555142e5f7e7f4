"""The hems gateway: the daemon and its pure maths (forecast, optimize, envelope, control)."""
