"""The other end of the wire: market operator, DSO envelope publisher, community simulation."""
