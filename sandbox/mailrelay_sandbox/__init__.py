"""mailrelay_sandbox: the dev and test harness (the real control plane's processes, the process kubelet,
a fault-injecting API proxy, real relay processes, an upstream sink, the load generator, the demo), and the
small pieces every harness shares: a raw SMTP client, free ports, polling, process trees.

Used by tests, `make demo` and `make bench`. Production code in relay/ and operator/ never imports it.
"""
