"""`make bench`: mailrelay-relay measured against Postfix on this machine, side by side in one run.

What it is for: starting real servers (a private Postfix instance, `mailrelay-relay` processes, Postfix's
`smtp-sink` as the upstream), driving them with `smtp-source` or a small asyncio SMTP client, and printing
figures with their ratios. `python -m bench --help` lists the sub-benchmarks.

What it must not do: touch the system's /etc/postfix or the system Postfix, leave processes or files behind,
or print a number it did not measure (parts not built yet say "not yet measured").
"""
