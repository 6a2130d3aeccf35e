"""How nodes find each other: mDNS on the LAN, bootstrap peers and push-pull gossip elsewhere."""
