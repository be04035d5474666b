"""mailrelay_relay: an asyncio SMTP relay that spools every message durably before it answers 250.

It delivers to an upstream smarthost with retries, sheds load with precise SMTP replies (421/455/452),
drains on demand, and exports Prometheus metrics. Nothing in this package knows about Kubernetes.
"""

__version__ = "0.1.0"
