"""How `r1box serve` reaches its models: `Backends` (pool.py) is the one door; client.py speaks to one backend."""
