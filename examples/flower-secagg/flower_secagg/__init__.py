"""A Flower app whose training rounds are aggregated by a secagg server."""
