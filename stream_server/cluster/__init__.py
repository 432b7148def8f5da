"""Many nodes, one line: membership (heartbeats and leases) and the signed grants that send a
client to the node whose slot it was granted. The line itself is the Redis admission store."""
