"""mailrelay_operator: a Kopf operator that runs MailRelay resources.

It owns each relay Deployment and its companions, scales on SMTP load, and drains a relay before it
removes it. It never speaks SMTP itself; it steers relays through their admin API.
"""

__version__ = "0.1.0"
