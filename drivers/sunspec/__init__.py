"""SunSpec: model definitions from the official JSON, decoding/encoding, discovery."""
