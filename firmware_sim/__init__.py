"""Simulated SunSpec devices over real Modbus servers, driven by one physical home model."""
