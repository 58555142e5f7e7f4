"""Device side of the wire: Modbus transport, SunSpec models, typed device natures.

`drivers` knows nothing of MQTT, markets or envelopes. The gateway talks to the natures in
:mod:`drivers.natures` and never to a register address.
"""
