"""Session-wide test settings shared by every folder."""

import os

# Collectives over loopback only, and one intra-op thread per process so several Ray actors on 2 cores
# don't oversubscribe.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
