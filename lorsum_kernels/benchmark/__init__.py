"""``lorsum-bench``: op and step speed on every backend present (``cli``), step peak memory (``memory``)."""
