"""mailrelay_sandbox: the dev and test harness (real relay processes, sink, emulated cluster, demo).

Used by tests, `make demo` and `make bench`. Production code in relay/ and operator/ never imports it.
"""
